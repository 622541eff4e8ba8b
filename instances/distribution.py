"""One ComfyUI on several GPUs and ComfyUI instances calling each other (issue #15, besides clusters): the built-in
"multi-gpu" template, which host GPU each `cuda:N` inside an instance's container is, the URLs at which its peers
answer from inside it (for ComfyUI_NetDist's `remote_url`), and the check that they do."""
from __future__ import annotations

import ipaddress
import logging

from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from comfyhub import operations
from comfyhub.models import Operation
from comfyhub.operations import NullReport, OperationError, operation_job

from . import access, probes, services
from .comfyui_api import base_url
from .models import LOCAL_NODE, Instance, InstanceTemplate

logger = logging.getLogger(__name__)

# --- The multi-GPU template ----------------------------------------------------------------------------------

MULTIGPU_TEMPLATE = "multi-gpu"
MULTIGPU_GPUS = 2
MULTIGPU_DESCRIPTION = (
    "Built in: one ComfyUI spread over two or more GPUs with ComfyUI-MultiGPU (MULTIGPU_NODE_URL at "
    "MULTIGPU_NODE_REF). Its loaders (CheckpointLoaderSimpleMultiGPU, UNETLoaderMultiGPU, CLIPLoaderMultiGPU, "
    "VAELoaderMultiGPU, ...) put each model on a device such as cuda:1; the instance's page shows which host GPU "
    "each cuda:N is. ComfyHub makes this template when it is missing and never changes it after: edit it freely.")


def multigpu_template_ensure() -> InstanceTemplate | None:
    """The built-in "multi-gpu" template, made with ComfyUI-MultiGPU at its pinned ref when no template of that name
    exists. An existing one is left exactly as an operator keeps it. None when the settings give a source the rules
    refuse (a local source without CUSTOM_NODE_LOCAL_SOURCES): said in the log, nothing made."""
    existing = InstanceTemplate.objects.filter(name=MULTIGPU_TEMPLATE).first()
    if existing is not None:
        return existing
    try:
        with transaction.atomic():
            return services.template_create(
                name=MULTIGPU_TEMPLATE, description=MULTIGPU_DESCRIPTION, gpu_count=MULTIGPU_GPUS,
                min_gpus=MULTIGPU_GPUS,
                custom_nodes=[{"url": settings.MULTIGPU_NODE_URL, "ref": settings.MULTIGPU_NODE_REF}])
    except (ValidationError, IntegrityError) as exc:
        if InstanceTemplate.objects.filter(name=MULTIGPU_TEMPLATE).exists():
            return InstanceTemplate.objects.get(name=MULTIGPU_TEMPLATE)  # made meanwhile by another process
        logger.warning("The built-in template '%s' was not made: %s", MULTIGPU_TEMPLATE,
                       " ".join(getattr(exc, "messages", [str(exc)])))
        return None


# --- GPUs inside the container -------------------------------------------------------------------------------

def gpu_map(instance: Instance) -> list[dict]:
    """Which host GPU each `cuda:N` inside the container is: [{"cuda", "index", "uuid", "name"}]. The container
    gets its GPUs ordered by host index with CUDA_DEVICE_ORDER=PCI_BUS_ID (instances/runtime.py), the order NVML
    numbers them in, so cuda:N is the N-th assigned GPU by index."""
    return [{"cuda": f"cuda:{number}", "index": gpu.index, "uuid": gpu.uuid, "name": gpu.name}
            for number, gpu in enumerate(instance.assigned_gpus())]


# --- NetDist peers -------------------------------------------------------------------------------------------

def netdist_peers(instance: Instance, *, user=None) -> list[dict]:
    """Every other instance (those `user` may use, when given), with the URL at which it answers from inside
    `instance`'s container: [{"instance", "url" (None when there is none), "how"}].

    A fellow member of its cluster on the same node: by container name over the cluster's network. Any other: at
    its node's address and published port, when that address is one a container can reach (not loopback, not a
    wildcard). Otherwise no URL, and "how" says why and what to change."""
    peers = Instance.objects.exclude(pk=instance.pk).select_related("node").order_by("node__name", "instance_id")
    if user is not None:
        peers = peers.filter(pk__in=access.usable_by(user).values("pk"))
    from . import clusters  # where cluster members reach each other is clusters' rule; it never imports this module

    found = clusters.membership(instance)
    cluster = found[0] if found else None
    fellows = {cluster.master_id, *cluster.workers.values_list("instance_id", flat=True)} if cluster else set()
    listed = []
    for peer in peers:
        if peer.pk in fellows and peer.node_id == instance.node_id:
            listed.append({"instance": peer, "url": clusters.url_of(peer, instance) + "/",
                           "how": f"by container name over cluster {cluster.name}'s network (both on node "
                                  f"{peer.node})"})
        else:
            listed.append(_by_address(instance, peer))
    return listed


def _by_address(instance: Instance, peer: Instance) -> dict:
    """A peer at its node's address and published port, when a container can reach that address."""
    node = peer.node
    address = node.bind_address
    try:
        kind = ipaddress.ip_address(address)
    except ValueError:
        kind = None
    if kind is not None and not kind.is_loopback and not kind.is_unspecified:
        return {"instance": peer, "url": base_url(address, peer.host_port) + "/",
                "how": f"at node {node}'s address and {peer}'s published port"}
    fix = ("set its agent's NODE_ADDRESS to an address containers reach" if node.name != LOCAL_NODE else
           "set its bind address (the admin's Nodes) to an address containers reach")
    if kind is not None and kind.is_unspecified:
        why = f"published on every address of node {node} ({address}), and ComfyHub knows none of them: {fix}"
    else:
        why = f"only on node {node}'s loopback ({address or 'no address'}), which no container reaches: {fix}"
    if peer.node_id == instance.node_id:
        why += f", or put {instance} and {peer} in a cluster (they then reach each other over its network)"
    return {"instance": peer, "url": None, "how": why + "."}


NETDIST_CHECK = "netdist_check"


def netdist_check(*, instance: Instance, user=None) -> Operation:
    """Ask, from inside `instance`'s container, whether each peer URL (those `user` may use) answers /system_stats:
    an operation on the instance's node; its result is the latest check (netdist_last_check)."""
    if operations.running_on(NETDIST_CHECK, instance):
        raise ValidationError({"peers": [f"A check of {instance}'s peers is under way; wait for it to finish."]})
    peers = [peer for peer in netdist_peers(instance, user=user) if peer["url"]]
    if not peers:
        raise ValidationError({"peers": [f"No peer of '{instance}' has a URL to check from inside it; the NetDist "
                                         "list says for each why, and what to change."]})
    return operations.enqueue(check_peers, target=instance, node=instance.node, user=user, instance_pk=instance.pk,
                              peers=[{"instance": peer["instance"].instance_id, "url": peer["url"]} for peer in peers])


def netdist_probe(instance: Instance, peers: list[dict], report=None) -> dict:
    """Each peer's `url` + "system_stats" asked from inside `instance`'s container: {"instance", "peers": [{"instance",
    "url", "ok", "detail"}], "reachable", "checked"}."""
    report = report or NullReport()
    asked = {peer["url"] + "system_stats": peer for peer in peers}
    report.log(f"asking {len(asked)} URL(s) from inside {instance.container_name}")
    found = {reach.url: reach for reach in probes.reach_from_inside(instance, list(asked))}
    results = []
    for url, peer in asked.items():
        reach = found.get(url) or probes.Reach(url, False, f"not asked (at most {probes.MAX_URLS} at a time)")
        results.append({"instance": peer["instance"], "url": peer["url"], "ok": reach.ok, "detail": reach.detail})
        report.log(f"{peer['instance']} {url}: {'answers' if reach.ok else 'does not answer'} ({reach.detail})",
                   "INFO" if reach.ok else "WARNING")
    return {"instance": instance.instance_id, "peers": results,
            "reachable": sum(1 for result in results if result["ok"]), "checked": len(results)}


@operation_job(NETDIST_CHECK, label="Check NetDist peers from inside", timeout=120)
def check_peers(report, *, instance_pk, peers):
    instance = Instance.objects.select_related("node").filter(pk=instance_pk).first()
    if instance is None:
        raise OperationError("The instance no longer exists (deleted while this operation waited).")
    return netdist_probe(instance, peers, report)


def netdist_last_check(instance: Instance) -> Operation | None:
    """The latest NetDist check of `instance` (queued, running or done), or None."""
    return Operation.objects.filter(kind=NETDIST_CHECK, target_type=ContentType.objects.get_for_model(Instance),
                                    target_id=str(instance.pk)).order_by("-created_at").first()
