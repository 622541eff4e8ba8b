"""Idle stop: a running instance with no traffic through the hub and an empty ComfyUI queue for its `idle_stop_after`
minutes is stopped, so its GPUs go back to the others. Activity is `last_activity_at` (the proxy's
access.note_activity, and work the health pass saw in its queue) or, when later, its start.

Each node's instances are stopped by an operation on that node's queue: the hub's workers for `local`, a node's agent
for its own, where their ports are (their /queue is asked from there)."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

from django.utils import timezone

from comfyhub import operations, queues
from comfyhub.models import Operation

from . import comfyui_api, services
from .models import LOCAL_NODE, Instance, Node, note_in_use

logger = logging.getLogger(__name__)

KIND = "idle_stop"
# Only an instance ComfyHub sees running and answering may be stopped for idleness: one starting, crash-looping or in
# error is someone's problem to look at, not idle.
RUNNING_STATUSES = (Instance.Status.HEALTHY, Instance.Status.UNHEALTHY)


def idle_reason(minutes: int) -> str:
    return (f"Stopped after {minutes} min idle: no traffic through the hub and an empty queue. Its GPUs are free for "
            "others until its next start.")


def last_activity(instance: Instance) -> datetime | None:
    """When it was last used: traffic through the hub, work in its queue, or its start, whichever is latest."""
    moments = [moment for moment in (instance.last_activity_at, instance.started_at) if moment is not None]
    return max(moments) if moments else None


def idle_stop_at(instance: Instance) -> datetime | None:
    """When idle stop will stop it if nothing happens until then; None when idle stop is off or it never ran."""
    since = last_activity(instance)
    if not instance.idle_stop_after or since is None:
        return None
    return since + timedelta(minutes=instance.idle_stop_after)


def idle_stop_expected(instance: Instance) -> datetime | None:
    """idle_stop_at for an instance idle stop may stop now (wanted running, seen running); None otherwise."""
    if instance.desired_state != Instance.DesiredState.RUNNING or instance.status not in RUNNING_STATUSES:
        return None
    return idle_stop_at(instance)


def idle_due(now: datetime | None = None, *, node: str = LOCAL_NODE) -> list[Instance]:
    """Running instances of `node` (a node's name) with idle stop on whose idle time is over (their queue not asked
    yet)."""
    now = now or timezone.now()
    candidates = Instance.objects.select_related("node").filter(
        node__name=node, desired_state=Instance.DesiredState.RUNNING, status__in=RUNNING_STATUSES,
        idle_stop_after__gt=0)
    return [instance for instance in candidates if (at := idle_stop_expected(instance)) is not None and at <= now]


def idle_check() -> str | None:
    """The periodic check, on the hub: for `local` and each node whose agent takes jobs, queue that node's idle-stop
    operation on its queue when one of its instances' idle time is over. Nothing is recorded otherwise (one operation
    a minute would bury the real ones), nor while the node's last one is still queued or running. Returns local's
    operation id, or None; the other nodes' are logged."""
    from .nodes import nodes_taking_jobs

    local = _check_node(Node.objects.filter(name=LOCAL_NODE).first())
    for node in nodes_taking_jobs():
        try:
            queued = _check_node(node)
        except queues.QueueUnavailable as exc:  # went offline since it was listed, or Redis is down
            logger.warning("Idle check of node %s not queued: %s", node.name, exc)
            continue
        if queued:
            logger.info("Idle stop of node %s queued on %s: operation %s", node.name, node.job_queue(), queued)
    return local


def _check_node(node: Node | None) -> str | None:
    if node is None or not idle_due(node=node.name):
        return None
    queue_name = node.job_queue("default")
    if Operation.objects.filter(kind=KIND, queue_name=queue_name, status__in=Operation.ACTIVE_STATUSES).exists():
        return None
    if node.name == LOCAL_NODE:  # the single-host path, as it always was
        return str(operations.enqueue("instances.jobs.stop_idle_instances").pk)
    return str(operations.enqueue("instances.jobs_nodes.stop_idle_instances_on_node", node=node,
                                  node_name=node.name).pk)


def stop_idle(report, *, node: str = LOCAL_NODE) -> dict:
    """Stop every instance of `node` (where this runs) whose idle time is over and whose queue, asked now, is empty.
    An instance whose ComfyUI does not answer /queue is left running (its queue may hold work); one with work in its
    queue is active."""
    now = timezone.now()
    due = idle_due(now, node=node)
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(_ask_queue, due))
    # Work in any queue first: it is activity for that instance's whole cluster, whose other members may be due too
    # (decided below on their rows as they are then).
    note_in_use([instance.pk for instance, answer in zip(due, answers)
                 if not isinstance(answer, comfyui_api.ComfyUIError) and not answer.empty], timezone.now())
    stopped, skipped = [], []

    def skip(instance, why):
        report.log(f"{instance}: not stopped: {why}")
        skipped.append({"instance": instance.instance_id, "why": why})

    for instance, answer in zip(due, answers):
        if isinstance(answer, comfyui_api.ComfyUIError):
            skip(instance, f"ComfyUI does not answer /queue, so its queue may hold work ({answer})")
            continue
        if not answer.empty:
            skip(instance, f"its queue has work ({answer.running} running, {answer.pending} pending), which counts "
                           "as activity")
            continue
        # While its queue was asked someone may have used it through the hub, stopped it, or changed its idle stop:
        # decide on the row as it is now.
        fresh = Instance.objects.filter(pk=instance.pk).values(
            "desired_state", "status", "idle_stop_after", "last_activity_at", "started_at").first()
        if fresh is None or fresh["desired_state"] != Instance.DesiredState.RUNNING:
            skip(instance, "it was stopped or deleted meanwhile")
            continue
        if fresh["status"] not in RUNNING_STATUSES:
            skip(instance, f"it is {fresh['status']} now, not running")
            continue
        if not fresh["idle_stop_after"]:
            skip(instance, "idle stop was turned off meanwhile")
            continue
        used = fresh["last_activity_at"] != instance.last_activity_at or fresh["started_at"] != instance.started_at
        for field in ("idle_stop_after", "last_activity_at", "started_at", "status"):
            setattr(instance, field, fresh[field])
        if idle_stop_at(instance) > timezone.now():
            skip(instance, "it was used meanwhile (through the hub, or work in its cluster's queues)" if used
                 else f"its idle stop time was raised to {instance.idle_stop_after} min meanwhile")
            continue
        since = last_activity(instance)
        try:
            operation = services.instance_stop(instance=instance, reason=idle_reason(instance.idle_stop_after),
                                               give_back_gpus=True)
        except queues.QueueUnavailable as exc:
            skip(instance, f"its stop could not be queued ({exc})")
            continue
        report.log(f"{instance}: stopped, idle since {timezone.localtime(since):%Y-%m-%d %H:%M:%S} (idle stop after "
                   f"{instance.idle_stop_after} min); stop operation {operation.pk}")
        stopped.append({"instance": instance.instance_id, "idle_since": since.isoformat(),
                        "operation": str(operation.pk)})
    if not due:
        report.log("No instance is idle past its idle-stop time." if node == LOCAL_NODE
                   else f"No instance of node {node} is idle past its idle-stop time.")
    return {"stopped": stopped, "skipped": skipped}


def _ask_queue(instance: Instance):
    try:
        return comfyui_api.ComfyUI.of(instance).queue()
    except comfyui_api.ComfyUIError as exc:
        return exc
