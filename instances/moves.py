"""Moving an instance to another node: one "Move instance" operation on the hub that runs each step on the node whose
folders and engine it touches, and switches the registry row only once the copy answers on the target.

The snapshot travels through COMFY_BACKUPS_PATH, which must be one shared filesystem mounted at the same path on every
node: the first two steps prove it (the source writes a marker there, the target must read it) before anything
changes. Steps on `local` run inside the move's own job (the hub's workers are local's), so a hub with one worker
cannot wait on itself; every other node's steps go to its agent's queue and the move waits for their Operation rows.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from comfyhub import operations
from comfyhub.models import Operation
from comfyhub.operations import OperationCancelled, OperationError
from storage_app import layout

from . import placement, suboperations
from .models import GPU, LOCAL_NODE, GPUAssignment, Instance, Node

KIND = "instance_move"


# --- Asking for a move (the service: page, command) ----------------------------------------------------------

@dataclass(frozen=True)
class MovePlan:
    target: Node
    host_port: int
    gpu_indexes: list[int]


def move_target(name) -> Node:
    """The node a person named as a move's target (page, command line)."""
    if name is None or name == "":
        known = ", ".join(Node.objects.filter(approved=True).values_list("name", flat=True)) or "none"
        raise ValidationError({"node": [f"Name the node to move to. Known: {known}."]})
    return placement.node_for_new_instance(name)


def move_plan(*, instance: Instance, target: Node) -> MovePlan:
    """Where on `target` the instance would go (its GPU count re-placed, a free port), or ValidationError saying why
    it cannot go there now: the same node, a node offline or not approved, no free GPUs or port."""
    from . import services

    source = instance.node
    if target.pk == source.pk:
        raise ValidationError({"node": [f"{instance} is already on node {target}; pick another node."]})
    placement.check_node_takes_instances(target)
    for node, role in ((source, "source"), (target, "target")):
        if refusal := node.refusal():
            raise ValidationError({"node": [f"Cannot move {instance} ({role} node): {refusal}"]})
    gpu_count = len(instance.gpu_choice())  # GPUs idle stop gave back count: it runs on them
    placed = placement.place(gpu_count=gpu_count, node=target)
    port = services.instance_free_port(target, preferred=instance.host_port)
    if port is None:
        raise ValidationError({"node": [f"Node {target} has no free port left in {target.port_range_start}-"
                                        f"{target.port_range_end}; free one or widen its range."]})
    return MovePlan(target=target, host_port=port, gpu_indexes=placed.gpu_indexes)


def instance_move(*, instance: Instance, target: Node, user=None) -> Operation:
    """Queue the move of `instance` to `target` (refused at once when it cannot go there now)."""
    from . import services

    if operations.running_on(KIND, instance):
        raise ValidationError({"node": [f"{instance} is being moved already; wait for that move to finish."]})
    plan = move_plan(instance=instance, target=target)
    return operations.enqueue("instances.jobs.move_instance", target=instance, node=services.local_node(), user=user,
                              instance_pk=instance.pk, target_pk=target.pk, host_port=plan.host_port,
                              gpu_indexes=plan.gpu_indexes, user_pk=user.pk if services._person(user) else None)


# --- The move (its job, on the hub) ----------------------------------------------------------------------------

class StepFailed(Exception):
    def __init__(self, step: str, why: str):
        super().__init__(f"{step}: {why}")
        self.step, self.why = step, why


class _Steps:
    """Runs steps on nodes for one move, waiting for each; cancel-aware until `settle()` (the undo runs in full)."""

    def __init__(self, report, instance, user):
        self.report, self.instance, self.user = report, instance, user
        self.settling = False

    def run(self, step: str, node: Node, job: str, **kwargs):
        self.report.log(f"{step} on node {node}")
        if node.name == LOCAL_NODE:
            try:
                return import_string(job).body(self.report, **kwargs)
            except OperationError as exc:
                raise StepFailed(step, str(exc)) from exc
            except Exception as exc:  # noqa: BLE001 - an unexpected failure of a step is undone like any other
                raise StepFailed(step, f"{type(exc).__name__}: {exc}") from exc
        try:
            operation = operations.enqueue(job, node=node, target=self.instance, user=self.user, **kwargs)
        except operations.queues.QueueUnavailable as exc:
            raise StepFailed(step, str(exc)) from exc
        return self._wait(step, node, operation)

    def _wait(self, step, node, operation):
        try:
            ended = suboperations.wait(self.report, {step: (node, operation)}, poll_seconds=0.1, cancel_running=True,
                                       cancellable=not self.settling)[step]
        except OperationCancelled:
            with contextlib.suppress(OperationError):  # it ended meanwhile
                operations.operation_cancel(operation=operation)
            raise
        if ended.refusal:
            raise StepFailed(step, f"node {node} went away while it ran: {ended.refusal}")
        if ended.row is None:
            raise StepFailed(step, f"its operation {operation.pk} was deleted while it ran")
        if ended.row.status != Operation.Status.SUCCEEDED:
            raise StepFailed(step, ended.row.error or ended.row.get_status_display())
        return ended.row.result


def move_instance(*, instance_pk, target_pk, host_port, gpu_indexes, user_pk=None, report) -> dict:
    from django.contrib.auth import get_user_model

    instance = Instance.objects.select_related("node").filter(pk=instance_pk).first()
    target = Node.objects.filter(pk=target_pk).first()
    if instance is None or target is None:
        raise OperationError("The instance or the target node no longer exists; nothing was moved.")
    user = get_user_model().objects.filter(pk=user_pk).first() if user_pk else None
    source = instance.node
    was_running = instance.desired_state == Instance.DesiredState.RUNNING
    steps = _Steps(report, instance, user)
    report.log(f"moving {instance} from node {source} to node {target} (port {host_port}, GPUs "
               f"{', '.join(map(str, gpu_indexes)) or 'none'}); it {'runs' if was_running else 'is stopped'}")
    frozen = restored = False
    try:
        report.progress(5, "checking that both nodes see the backups folder")
        marker = steps.run("check shared backups (write)", source, "instances.jobs.move_marker_write")
        steps.run("check shared backups (read)", target, "instances.jobs.move_marker_read", source_name=source.name,
                  **marker)
        report.progress(15, "stopping and snapshotting on the source")
        frozen = True
        snapshot = steps.run("stop and snapshot on the source", source, "instances.jobs.move_freeze",
                             instance_pk=instance.pk, target_name=target.name, user_pk=user_pk)
        report.progress(40, "restoring on the target")
        restored = True
        steps.run("restore on the target", target, "instances.jobs.move_restore", instance_pk=instance.pk,
                  target_pk=target.pk, snapshot_pk=snapshot["snapshot"])
        report.progress(65, "starting on the target")
        started = steps.run("start on the target", target, "instances.jobs.move_start", instance_pk=instance.pk,
                            target_pk=target.pk, host_port=host_port, gpu_indexes=gpu_indexes)
        report.progress(85, "switching the registry")
        _switch(instance, target, host_port, gpu_indexes, started.get("container_id", ""))
    except (StepFailed, OperationCancelled) as exc:
        steps.settling = True
        cancelled = isinstance(exc, OperationCancelled)
        undone = _undo(steps, instance, source, target, frozen=frozen, restored=restored, was_running=was_running)
        if cancelled:
            report.log(f"cancelled; {undone}")
            raise
        raise OperationError(f"The move failed at step '{exc.step}': {exc.why}\n{undone}") from None
    except ValidationError as exc:  # the switch: the target's GPUs or port were taken meanwhile
        steps.settling = True
        undone = _undo(steps, instance, source, target, frozen=True, restored=True, was_running=was_running)
        raise OperationError(f"The move failed at step 'switch the registry': {'; '.join(exc.messages)}\n{undone}") \
            from None
    steps.settling = True
    instance = Instance.objects.select_related("node").get(pk=instance.pk)
    notes = []
    if not was_running:
        try:
            steps.run("stop on the target (it was stopped)", target, "instances.jobs.stop_instance",
                      instance_pk=instance.pk)
        except StepFailed as exc:
            notes.append(f"it was left running on {target}: {exc}")
    report.progress(92, "removing the source's container and folder")
    try:
        steps.run("remove from the source", source, "instances.jobs.move_remove", instance_id=instance.instance_id,
                  node_pk=source.pk)
    except StepFailed as exc:
        notes.append(f"the source's container or folder {layout.instance_dir(instance.instance_id, source)} on "
                     f"{source} could not be removed ({exc}); remove them by hand")
    for note in notes:
        report.log(note, "WARNING")
    report.progress(100, f"on node {target}")
    return {"instance": instance.instance_id, "from": source.name, "to": target.name, "port": host_port,
            "gpus": gpu_indexes, "snapshot": snapshot["snapshot"], "running": was_running, "notes": notes}


def _undo(steps, instance, source, target, *, frozen, restored, was_running) -> str:
    """Put the instance back as it was on the source; says what was done (and what could not be)."""
    said = []
    if restored:
        try:
            steps.run("remove the copy from the target", target, "instances.jobs.move_remove",
                      instance_id=instance.instance_id, node_pk=target.pk)
            said.append(f"the copy on {target} was removed")
        except StepFailed as exc:
            said.append(f"the copy on {target} could not be removed ({exc.why}); remove container "
                        f"{instance.container_name} and {layout.instance_dir(instance.instance_id, target)} there "
                        "by hand")
    if frozen and was_running:
        try:
            steps.run("start again on the source", source, "instances.jobs.start_instance", instance_pk=instance.pk)
            said.append(f"{instance} runs on {source} again")
        except StepFailed as exc:
            said.append(f"{instance} stays on {source} but did not start again: {exc.why}")
    else:
        said.append(f"{instance} stays on {source} as it was")
    return "; ".join(said) + "."


def _switch(instance, target, host_port, gpu_indexes, container_id):
    """The registry row now says the instance is on `target`: node, port, GPUs, in one transaction."""
    gpus = list(GPU.objects.filter(node=target, index__in=gpu_indexes, present=True))
    if len(gpus) != len(gpu_indexes):
        raise ValidationError({"gpus": [f"GPUs {gpu_indexes} are no longer all present on node {target}."]})
    try:
        with transaction.atomic():
            Instance.objects.filter(pk=instance.pk).update(
                node=target, host_port=host_port, container_id=container_id, status=Instance.Status.HEALTHY,
                status_detail="", checked_at=timezone.now(), gpus_released=[])
            GPUAssignment.objects.filter(instance=instance).delete()
            for gpu in gpus:
                GPUAssignment.objects.create(instance=instance, gpu=gpu, exclusive=not gpu.shareable)
    except IntegrityError as exc:
        raise ValidationError({"node": [f"the port {host_port} or the GPUs {gpu_indexes} on {target} were taken "
                                        f"meanwhile ({exc})"]}) from None


# --- The steps (each on its node, from instances.jobs) ----------------------------------------------------------

def marker_write(report) -> dict:
    """On the source: mark the backups folder (storage_app.snapshots says how)."""
    from storage_app import snapshots

    return snapshots.backups_marker_write(report)


def marker_read(*, name, token, path, source_name, report, action="move") -> dict:
    """On the target: the source's mark must be seen, or the move stops here with nothing changed."""
    from storage_app import snapshots

    return snapshots.backups_marker_read(name=name, token=token, path=path, source_name=source_name, report=report,
                                         action=action)


def freeze(*, instance, target_name, user=None, report) -> dict:
    """On the source: stop it (when it runs) and take a full snapshot with its outputs."""
    from storage_app import snapshots

    from . import containers

    if instance.desired_state == Instance.DesiredState.RUNNING:
        containers.stop(instance, report)
    try:
        snapshot = snapshots.create(instance, kind="full", include_output=True, note=f"moving to node {target_name}",
                                    user=user, automatic="move", report=report)
    except (snapshots.SnapshotError, OSError) as exc:
        raise OperationError(f"Could not take the snapshot: {exc}") from exc
    return {"snapshot": snapshot.pk, "archive": snapshot.archive}


def restore(*, instance, target, snapshot_pk, report) -> dict:
    """On the target: the snapshot extracted into the target's instances root (a complete tree or nothing)."""
    from storage_app import snapshots
    from storage_app.models import Snapshot

    snapshot = Snapshot.objects.get(pk=snapshot_pk)
    root = layout.instance_dir(instance.instance_id, target)
    if root.exists() or root.is_symlink():
        raise OperationError(f"{root} already exists on node {target} (kept from an earlier instance?); move or "
                             "remove it there, then move again.")
    try:
        snapshots.restore_clone(snapshot, root, report)
        layout.build_shared_tree(target)
        layout.build_instance_tree(instance.instance_id, target)
    except (snapshots.SnapshotError, layout.LayoutError, OSError) as exc:
        raise OperationError(f"Could not restore the snapshot on node {target}: {exc}") from exc
    return {"folder": str(root)}


def on_node(instance: Instance, node: Node, host_port: int, gpu_indexes) -> Instance:
    """An unsaved copy of `instance` as it will be on `node` (port, GPUs): what the container there is made from
    before the registry says so."""
    shadow = copy.copy(instance)
    shadow.node, shadow.host_port = node, host_port
    gpus = GPU.objects.filter(node=node, index__in=gpu_indexes)
    shadow._prefetched_objects_cache = {"assignments": [GPUAssignment(gpu=gpu) for gpu in gpus]}
    return shadow


def start_copy(*, instance, target, host_port, gpu_indexes, report) -> dict:
    """On the target: its container made from the moved folder and started; it must answer as healthy. The
    registry row is not touched (it still says the source)."""
    from . import containers, docker_engine, health, runtime

    shadow = on_node(instance, target, host_port, gpu_indexes)
    if problem := runtime.image_problem(shadow.image):
        raise OperationError(problem)
    engine = containers.engine_for(shadow)
    try:
        spec = runtime.container_spec(shadow, image_id=containers.ensure_image(engine, shadow, report))
        if docker_engine.container_state(engine, spec.name) is not None:
            docker_engine.remove_container(engine, spec.name)  # left by an earlier move that failed here
        container_id = docker_engine.create_container(engine, spec)
        docker_engine.start_container(engine, spec.name)
        deadline = time.monotonic() + settings.INSTANCE_START_TIMEOUT
        while health.system_stats(shadow) is None:
            if why := containers.start_failure(docker_engine.container_state(engine, spec.name)):
                logs = docker_engine.container_logs(engine, spec.name, tail=30).strip()
                docker_engine.stop_container(engine, spec.name, timeout=5)  # no more restarts while it is undone
                raise OperationError(f"ComfyUI did not start on node {target} ({why})"
                                     + (f". Last log lines:\n{logs}" if logs else "."))
            if time.monotonic() > deadline:
                raise OperationError(f"ComfyUI did not answer on node {target} within "
                                     f"{settings.INSTANCE_START_TIMEOUT} s.")
            report.progress(70, "waiting for ComfyUI to answer on the target")
            time.sleep(0.1)
        report.log(f"ComfyUI answers on {shadow.url}")
        return {"container_id": container_id, "url": shadow.url}
    except docker_engine.EngineError as exc:
        raise OperationError(str(exc)) from exc
    finally:
        engine.close()


def remove_from(*, instance_id, node, report) -> dict:
    """On `node`: the instance's container and folder there removed (its snapshot stays)."""
    from . import docker_engine
    from .services import purge_instance_data

    engine = docker_engine.require_engine(node.docker_host or None)
    try:
        name = f"{settings.CONTAINER_NAME_PREFIX}{instance_id}"
        if docker_engine.container_state(engine, name) is not None:
            docker_engine.remove_container(engine, name)
            report.log(f"removed container {name} on node {node}")
    except docker_engine.EngineError as exc:
        raise OperationError(str(exc)) from exc
    finally:
        engine.close()
    try:
        purge_instance_data(instance_id, node)
    except layout.LayoutError as exc:
        raise OperationError(str(exc)) from exc
    report.log(f"removed {layout.instance_dir(instance_id, node)} on node {node}")
    return {"removed": instance_id, "node": node.name}
