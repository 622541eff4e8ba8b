"""Placement: which node a new instance goes on, and which of its GPUs it gets. A node named by a person is taken
as named (it must be approved); otherwise the instance goes where its GPUs are free, among the approved nodes that
are online (`local`, served by the hub's own workers, always is)."""
from __future__ import annotations

from dataclasses import dataclass

from django.core.exceptions import ValidationError
from django.db.models import Count, Prefetch
from django.utils import timezone

from .models import GPU, LOCAL_NODE, GPUAssignment, Node
from .nodes import node_state


@dataclass
class Candidate:
    """A node as placement sees it: whether it takes new instances, its free GPUs (index order), its instances."""

    node: Node
    usable: bool
    why_not: str  # "" when usable, else "offline", "waiting for approval", ...
    free: list[int]
    total: int
    instances: int

    @property
    def is_local(self) -> bool:
        return self.node.name == LOCAL_NODE


@dataclass(frozen=True)
class Placement:
    node: Node
    gpu_indexes: list[int]


def gpu_is_free(gpu: GPU) -> bool:
    """No instance holds it, or it is shareable and none holds it exclusively: the rule services._check_gpus
    applies to one GPU, for many at once (`gpu` comes with its assignments prefetched)."""
    holders = gpu.assignments.all()
    return not holders or (gpu.shareable and not any(a.exclusive for a in holders))


def candidates(**node_filter) -> list[Candidate]:
    """Every node (or those `node_filter` picks), `local` first, with what placement needs, in a fixed number of
    queries whatever the number of nodes."""
    gpus = GPU.objects.filter(present=True).order_by("index").prefetch_related(
        Prefetch("assignments", queryset=GPUAssignment.objects.only("id", "gpu_id", "exclusive")))
    nodes = Node.objects.annotate(instance_count=Count("instances", distinct=True)).prefetch_related(
        Prefetch("gpus", queryset=gpus, to_attr="present_gpus")).filter(**node_filter)
    now = timezone.now()
    found = []
    for node in nodes:
        found.append(Candidate(node=node, usable=not (why := _why_not(node, now)), why_not=why,
                               free=[gpu.index for gpu in node.present_gpus if gpu_is_free(gpu)],
                               total=len(node.present_gpus), instances=node.instance_count))
    return sorted(found, key=lambda c: (not c.is_local, c.node.name))  # local first, as people read them


def _why_not(node: Node, now) -> str:
    """Why nothing may be placed on `node` unasked: "" when it may."""
    if node.name == LOCAL_NODE:
        return ""
    state = node_state(node, now)
    if not node.approved:
        return "waiting for approval"
    if state.kind == "never":
        return "no heartbeat yet"
    if not state.online:
        return "offline"
    return ""


def node_for_new_instance(name) -> Node | None:
    """The node a person named for a new instance (form, command line); None for none named (empty). Only approved
    nodes take instances."""
    if name is None or name == "":
        return None
    known = ", ".join(Node.objects.filter(approved=True).values_list("name", flat=True)) or "none"
    if not isinstance(name, str) or "\x00" in name or len(name) > 63:
        raise ValidationError({"node": [f"There is no such node. Known: {known}."]})
    node = Node.objects.filter(name=name).first()
    if node is None:
        raise ValidationError({"node": [f"There is no node '{name}'. Known: {known}."]})
    check_node_takes_instances(node)
    return node


def check_node_takes_instances(node: Node) -> None:
    if not node.approved and node.name != LOCAL_NODE:
        raise ValidationError({"node": [
            f"Node {node} is waiting for approval; approve it on the Nodes page (or `manage.py hosts approve "
            f"{node}`) before placing instances on it."]})


def place(*, gpu_count: int, node: Node | None = None, template=None) -> Placement:
    """Where a new instance wanting `gpu_count` GPUs goes: on `node` when one is named (its first free GPUs), else
    on the usable node with the most free GPUs, then the fewest instances (`local` first on a tie). CPU instances
    (0 GPUs) go to the usable node with the fewest instances, `local` first on a tie. `template`, when the instance
    comes from one, only words the refusal."""
    if isinstance(gpu_count, bool) or not isinstance(gpu_count, int) or not 0 <= gpu_count <= 32767:
        raise ValidationError({"gpu_count": ["Give the number of GPUs as a whole number from 0 (CPU mode)."]})
    if node is not None:
        check_node_takes_instances(node)
        (named,) = candidates(pk=node.pk)
        if len(named.free) < gpu_count:
            raise ValidationError({"gpus": [_single_node_refusal(named, gpu_count, template)]})
        return Placement(node=node, gpu_indexes=named.free[:gpu_count])
    every = candidates()
    usable = [c for c in every if c.usable and len(c.free) >= gpu_count]
    if not usable:
        if len(every) == 1 and every[0].is_local:
            # One host, as before there were nodes: the refusal names its GPUs, not nodes.
            raise ValidationError({"gpus": [_single_node_refusal(every[0], gpu_count, template)]})
        raise ValidationError({"node": [_refusal(every, gpu_count)]})
    if gpu_count:
        best = min(usable, key=lambda c: (-len(c.free), c.instances, not c.is_local, c.node.name))
    else:
        best = min(usable, key=lambda c: (c.instances, not c.is_local, c.node.name))
    return Placement(node=best.node, gpu_indexes=best.free[:gpu_count])


def _single_node_refusal(candidate: Candidate, gpu_count: int, template) -> str:
    free = len(candidate.free)
    if template is not None:
        return (f"The template asks for {gpu_count} GPU(s) but only {free} are free on node {candidate.node}; "
                "free some or create without the template.")
    return f"{gpu_count} GPU(s) are wanted but only {free} are free on node {candidate.node}; free some first."


def _refusal(every: list[Candidate], gpu_count: int) -> str:
    """"No node has 2 free GPUs: local 1 free of 4, gpu-2 offline, gpu-3 0 free of 2. Free GPUs or add a node." """
    wanted = f"{gpu_count} free GPU{'s' if gpu_count != 1 else ''}" if gpu_count else "room for a CPU instance"
    parts = [f"{c.node} {len(c.free)} free of {c.total}" if c.usable else f"{c.node} {c.why_not}" for c in every]
    return f"No node has {wanted}: {', '.join(parts)}. Free GPUs or add a node."
