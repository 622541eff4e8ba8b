"""Nodes as GPU hosts (not ComfyUI's custom nodes): a node agent registers its node and reports heartbeats; an
operator approves a node before its agent takes jobs; whether a node is online follows from its last heartbeat.
The Nodes page, the `hosts` command, the admin and the agent all go through these services."""
from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.models import Count, Prefetch, Q
from django.utils import timezone

from comfyhub import queues

from .models import (  # noqa: F401  (the node's state is the model's; kept importable from here)
    GPU, LOCAL_NODE, NODE_OFFLINE_AFTER_MISSED, GPUAssignment, Instance, Node, NodeState, node_state, offline_after,
)

logger = logging.getLogger(__name__)

# Missed heartbeats after which a node is shown offline (the interval is NODE_HEARTBEAT_SECONDS).
NODE_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
STORAGE_ROOTS = ("shared", "instances", "backups")


def node_queue_names(name: str) -> list[str]:
    """The RQ queues a node's agent takes jobs from: quick ones, then long ones."""
    return [queues.node_queue(name, "default"), queues.node_queue(name, "long")]


@functools.cache  # a process keeps its boot and its network namespace: read once, not on every proxied request
def network_identity() -> str:
    """Which loopback this process sees: the kernel's boot id and this process's network namespace. Two processes
    with the same identity reach the same 127.0.0.1 (an agent beside the hub, on its own Docker engine); any other
    node's loopback is its own machine's. Empty when /proc does not tell."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            boot = handle.read().strip()
        namespace = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return ""
    return f"{boot}/net:{namespace}" if boot else ""


def shares_hubs_loopback(node: Node) -> bool:
    """Whether the hub reaches `node`'s loopback as its own: `local`, or a node whose agent last reported the hub's
    network identity."""
    if node.name == LOCAL_NODE:
        return True
    reported = (node.heartbeat or {}).get("network_identity")
    return bool(reported) and reported == network_identity()


def node_name_problem(name) -> str | None:
    """Why `name` cannot name a node an agent serves, or None when it can."""
    if not isinstance(name, str) or not name:
        return "A node name is required."
    if not NODE_NAME_RE.fullmatch(name):
        return ("Use lowercase letters a-z, digits and '-', starting and ending with a letter or digit, at most 63 "
                "characters, e.g. gpu-2.")
    if name == LOCAL_NODE:
        return ("'local' is served by the hub's own workers (`manage.py serve`), not by an agent; give this host "
                "its own name, e.g. gpu-2.")
    return None


class NodeGone(Exception):
    """The node an agent reports for was deleted while it ran."""


# --- The agent's side --------------------------------------------------------------------------------------------

def node_register(*, name: str, address: str) -> tuple[Node, bool]:
    """The node `name`, made unapproved if it is new; its address is the agent's NODE_ADDRESS either way.
    Returns it and whether it was made now."""
    problem = node_name_problem(name)
    if problem:
        raise ValidationError({"node": [problem]})
    now = timezone.now()
    node, created = Node.objects.get_or_create(
        name=name, defaults={"approved": False, "registered_at": now, "bind_address": address})
    if not created and node.bind_address != address:
        Node.objects.filter(pk=node.pk).update(bind_address=address)
        node.bind_address = address
    return node, created


def node_heartbeat(*, node: Node, heartbeat: dict, address: str) -> bool:
    """Record a heartbeat; returns whether the node is approved (the agent takes jobs only then)."""
    now = timezone.now()
    # Online since now when the last heartbeat is too old, or there was none: one conditional update, so a heartbeat
    # racing a slow one never moves online_since.
    Node.objects.filter(pk=node.pk).filter(
        Q(last_heartbeat_at__isnull=True) | Q(last_heartbeat_at__lt=now - offline_after())
    ).update(online_since=now)
    if not Node.objects.filter(pk=node.pk).update(last_heartbeat_at=now, heartbeat=heartbeat, bind_address=address):
        raise NodeGone(f"Node {node.name} is not in the registry any more (an operator deleted it?); restart its "
                       "agent to register it again.")
    return Node.objects.filter(pk=node.pk, approved=True).exists()


# --- Periodic jobs on nodes ------------------------------------------------------------------------------------------

# Housekeeping job statuses during which another of the same job is not queued for the node.
_PENDING = ("queued", "started", "deferred", "scheduled")


def nodes_taking_jobs(now: datetime | None = None) -> list[Node]:
    """The nodes other than `local` whose agent takes jobs now: approved, and its heartbeats coming."""
    now = now or timezone.now()
    return list(Node.objects.exclude(name=LOCAL_NODE).filter(approved=True,
                                                             last_heartbeat_at__gte=now - offline_after()))


def node_queue_housekeeping(node: Node, func, key: str, kwargs: dict, replace_abandoned: bool = False) -> bool:
    """Put a housekeeping job (no Operation row, like the hub's own periodic jobs) on the node's quick queue, for its
    agent, unless the last one (`key`) is still waiting or running there: an agent that is away or busy gets one,
    not a pile. `replace_abandoned`: the caller knows no agent of this node runs a job now (one that is starting),
    so a job marked started was a killed agent's and is replaced. Returns whether it was queued; Redis not answering
    is a warning's worth (the next pass tries again)."""
    from redis.exceptions import RedisError
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    job_id = f"{key}-{node.name}"
    try:
        connection = queues.get_connection(node.job_queue("default"))
        try:
            status = Job.fetch(job_id, connection=connection).get_status(refresh=False)
            if status in _PENDING and not (replace_abandoned and status == "started"):
                return False
        except NoSuchJobError:
            pass
        queues.get_queue(node.job_queue("default")).enqueue(
            func, kwargs=kwargs, job_id=job_id, description=f"{key} on {node.name}", result_ttl=0,
            failure_ttl=24 * 3600, job_timeout=300)
    except RedisError as exc:
        logger.warning("Could not queue %s for node %s: %s", key, node.name, exc)
        return False
    return True


# --- The operator's side -------------------------------------------------------------------------------------------

def node_approve(*, node: Node, user=None) -> bool:
    """Approve the node: its agent takes jobs from its next heartbeat on. Returns False when it already was."""
    changed = Node.objects.filter(pk=node.pk, approved=False).update(approved=True)
    node.approved = True
    return bool(changed)


def node_revoke_approval(*, node: Node, user=None) -> bool:
    """Withdraw approval: its agent finishes the job it is running and takes no more. Returns False when it was not
    approved."""
    if node.name == LOCAL_NODE:
        raise ValidationError({"node": ["'local' is served by the hub's own workers; its approval cannot be "
                                        "revoked."]})
    changed = Node.objects.filter(pk=node.pk, approved=True).update(approved=False)
    node.approved = False
    return bool(changed)


# --- What a node is doing ---------------------------------------------------------------------------------------------

@dataclass
class NodeRow:
    """One node as the Nodes page and `hosts list` show it."""

    node: Node
    state: NodeState
    gpus_total: int
    gpus_held: int  # held by instances that are meant to run
    gpus_free: int  # no instance holds them, or they are shareable
    instance_count: int
    storage: list = field(default_factory=list)

    @property
    def docker_version(self) -> str:
        return self.node.heartbeat.get("docker_version") or ""

    @property
    def docker_error(self) -> str:
        return self.node.heartbeat.get("docker_error") or ""

    @property
    def comfyhub_version(self) -> str:
        return self.node.heartbeat.get("comfyhub_version") or ""

    @property
    def load(self) -> list:
        return self.node.heartbeat.get("load") or []


def nodes_with_relations():
    """Nodes with what their rows show, in a fixed number of queries whatever the number of nodes and instances."""
    holders = Prefetch("assignments", queryset=GPUAssignment.objects.select_related("instance"))
    return Node.objects.annotate(instance_count=Count("instances", distinct=True)).prefetch_related(
        Prefetch("gpus", queryset=GPU.objects.filter(present=True).prefetch_related(holders), to_attr="present_gpus"))


def node_row(node: Node, now: datetime | None = None) -> NodeRow:
    """`node` must come from nodes_with_relations()."""
    held = free = 0
    for gpu in node.present_gpus:
        assignments = gpu.assignments.all()
        if any(a.instance.desired_state == Instance.DesiredState.RUNNING for a in assignments):
            held += 1
        if gpu.shareable or not assignments:
            free += 1
    storage = [entry for entry in node.heartbeat.get("storage") or [] if isinstance(entry, dict)]
    return NodeRow(node=node, state=node_state(node, now), gpus_total=len(node.present_gpus), gpus_held=held,
                   gpus_free=free, instance_count=node.instance_count, storage=storage)


def node_rows() -> list[NodeRow]:
    now = timezone.now()
    return [node_row(node, now) for node in nodes_with_relations()]


def node_named(name: str) -> Node | None:
    """The node with its row's relations, or None."""
    if not isinstance(name, str) or "\x00" in name:
        return None  # PostgreSQL takes no NUL byte in a text it compares
    return nodes_with_relations().filter(name=name).first()


def node_as_json(row: NodeRow) -> dict:
    """A node as `hosts list --json` and `hosts show --json` print it (docs/cli.md)."""
    node, state = row.node, row.state
    return {
        "name": node.name,
        "state": state.kind,
        "since": state.since.isoformat() if state.since else None,
        "approved": node.approved,
        "address": node.bind_address,
        "registered_at": node.registered_at.isoformat() if node.registered_at else None,
        "last_heartbeat_at": node.last_heartbeat_at.isoformat() if node.last_heartbeat_at else None,
        "gpus": {"total": row.gpus_total, "held": row.gpus_held, "free": row.gpus_free},
        "instances": row.instance_count,
        "heartbeat": node.heartbeat,
    }
