"""Bringing an instance's container to the state its registry row asks for: build, pull, create, start, stop,
remove. Runs inside operations (see jobs.py); one instance is changed by one operation at a time."""
from __future__ import annotations

import contextlib
import threading
import time

from django.conf import settings
from django.utils import timezone
from redis.exceptions import LockError, RedisError

from comfyhub import queues
from comfyhub.operations import OperationError
from storage_app import layout

from . import clusters, docker_engine, health, runtime
from .models import Instance

LOCK_WAIT_SECONDS = 900

_held = threading.local()  # the names of the instance locks this thread holds


@contextlib.contextmanager
def instance_lock(instance: Instance, report=None):
    """Serialise operations on one instance (two starts at once give one container).

    Re-entrant in one thread: an operation of several steps (a restore: stop, swap the files, start) holds it from
    the first step to the last and calls `stop` and `start` inside, which take it again without waiting for
    themselves. A keeper thread renews it while it is held, so no step outlives it, however long it takes; a
    killed worker's lock expires on its own."""
    name = f"comfyhub:lock:instance:{instance.instance_id}"
    if not hasattr(_held, "names"):
        _held.names = set()
    held = _held.names
    if name in held:
        yield
        return
    lock = queues.get_connection().lock(
        name, timeout=settings.INSTANCE_START_TIMEOUT + 600, blocking_timeout=LOCK_WAIT_SECONDS,
        thread_local=False,  # the keeper renews it from its own thread
    )
    try:
        acquired = lock.acquire(blocking=False)
        if not acquired:
            if report:
                report.log(f"Waiting for another operation on {instance} to finish...")
            acquired = lock.acquire()
    except RedisError as exc:
        raise OperationError(queues.unavailable_message(exc)) from exc
    if not acquired:
        raise OperationError(f"Another operation on instance '{instance}' did not finish within "
                             f"{LOCK_WAIT_SECONDS} s; try again later.")
    done = threading.Event()
    keeper = threading.Thread(target=_keep, args=(lock, done), daemon=True, name=f"keep-{name}")
    keeper.start()
    held.add(name)
    try:
        yield
    finally:
        held.discard(name)
        done.set()
        keeper.join()
        with contextlib.suppress(LockError, RedisError):
            lock.release()


def _keep(lock, done: threading.Event):
    """Reset the lock's expiry every third of it until `done`."""
    while not done.wait(lock.timeout / 3):
        with contextlib.suppress(LockError, RedisError):
            lock.reacquire()


def engine_for(instance: Instance, consequence: str = ""):
    try:
        return docker_engine.require_engine(instance.node.docker_host or None)
    except docker_engine.EngineError as exc:
        raise OperationError(f"{exc} {consequence}".strip()) from exc


def build_directories(instance: Instance, report) -> dict:
    try:
        result = layout.build_shared_tree(instance.node)
        layout.build_instance_tree(instance.instance_id, instance.node, result)
    except (layout.LayoutError, OSError) as exc:
        raise OperationError(f"Could not build the directories of '{instance}': {exc}") from exc
    for path in result.created:
        report.log(f"created {path}")
    if result.links:
        report.log(f"linked {len(result.links)} shared input file(s) into input/")
    for name in result.skipped_links:
        report.log(f"kept the instance's own input/{name} (a shared input file has the same name)", "WARNING")
    report.log(f"{len(result.created)} folder(s) created, {result.existing} already there")
    if instance.status == Instance.Status.NEW:
        Instance.objects.filter(pk=instance.pk, status=Instance.Status.NEW).update(status=Instance.Status.STOPPED)
    return {"created": len(result.created), "existing": result.existing, "links": len(result.links)}


def ensure_image(engine, instance: Instance, report) -> str:
    """The id of the instance's image on its node, pulled first when the node lacks it."""
    if found := docker_engine.image_id(engine, instance.image):
        return found
    report.log(f"Image {instance.image} is not on this host; pulling it.")
    try:
        docker_engine.pull_image(engine, instance.image,
                                 on_progress=lambda pct, msg: report.progress(10 + pct * 0.5, msg))
    except docker_engine.EngineError as exc:
        raise OperationError(str(exc)) from exc
    return docker_engine.image_id(engine, instance.image) or ""


def start(instance: Instance, report) -> dict:
    with instance_lock(instance, report):
        instance.refresh_from_db()
        # Saved before INSTANCE_IMAGES_ALLOWED was narrowed, or written past the services: it does not run.
        if problem := runtime.image_problem(instance.image):
            raise OperationError(f"{problem} Nothing was started; change the instance's image.")
        if instance.gpus_released:
            _take_gpus_back(instance, report)
        engine = engine_for(instance)
        try:
            report.progress(5, "building directories")
            build_directories(instance, report)
            # The id the tag names now: a tag rebuilt or re-pulled since the container was made recreates it.
            spec = runtime.container_spec(instance, image_id=ensure_image(engine, instance, report))
            state = docker_engine.container_state(engine, spec.name)
            if state and state.labels.get(runtime.LABEL_CONFIG) != spec.config_hash:
                made_from = state.labels.get(runtime.LABEL_IMAGE_ID, "")
                if made_from and made_from != spec.image_id:
                    report.log(f"The image {instance.image} was updated since the container was made "
                               f"({made_from[:19]} -> {spec.image_id[:19]}): recreating it (data stays).")
                else:
                    report.log("The configuration changed since the container was made: recreating it (data stays).")
                docker_engine.remove_container(engine, spec.name)
                state = None
            container_id = state.id if state else ""
            member = clusters.membership(instance)
            if member is not None:
                # Its ComfyUI-Distributed reads the file when it loads: written before the container starts.
                if (synced := clusters.sync_member(instance, report))["failed"]:
                    raise OperationError(f"{synced['note']} Nothing was started.")
            if state is None:
                report.progress(60, "creating the container")
                container_id = docker_engine.create_container(engine, spec)
            if member is not None:
                clusters.join_network(engine, instance, report)  # before it starts: the names resolve at once
            if state is None or not state.running:
                report.progress(65, "starting the container")
                docker_engine.start_container(engine, spec.name)
                Instance.objects.filter(pk=instance.pk).update(started_at=timezone.now())
            else:
                report.log("The container is already running.")
            Instance.objects.filter(pk=instance.pk).update(
                container_id=container_id, config_hash=spec.config_hash, status=Instance.Status.STARTING,
                status_detail="waiting for ComfyUI to answer",
            )
            report.progress(70, "waiting for ComfyUI to answer")
            result = _wait_until_healthy(engine, instance, report)
            if member is not None:
                _sync_cluster_here(instance, member[0], report)  # its master's file now lists it as enabled
            return result
        except docker_engine.EngineError as exc:
            Instance.objects.filter(pk=instance.pk).update(status=Instance.Status.ERROR, status_detail=str(exc)[:500])
            raise OperationError(str(exc)) from exc
        finally:
            engine.close()


def start_failure(state) -> str | None:
    """Why a container that is meant to be starting has failed ("exited with code 3"), or None while it may still
    come up. Once Docker has restarted it, the first exit code is gone (a restarted container reads 0): say so."""
    if state is None:
        return "crashed (the container vanished)"
    if state.status in ("exited", "dead") and state.restart_count == 0:
        return f"exited with code {state.exit_code}" + (" (out of memory)" if state.oom_killed else "")
    if state.status in ("exited", "dead") or state.restart_count > 0:
        times = "once" if state.restart_count == 1 else f"{state.restart_count} times"
        return f"crashed (Docker restarted it {times})"
    return None


def _wait_until_healthy(engine, instance: Instance, report) -> dict:
    started = time.monotonic()
    deadline = started + settings.INSTANCE_START_TIMEOUT
    # ComfyUI often answers within a fraction of a second: look every 20 ms for the first seconds, then back off.
    pause = 0.02
    while True:
        state = docker_engine.container_state(engine, instance.container_name)
        if why := start_failure(state):
            logs = docker_engine.container_logs(engine, instance.container_name, tail=30).strip()
            detail = f"ComfyUI {why} while starting"
            # Don't let Docker keep restarting something that cannot start.
            docker_engine.stop_container(engine, instance.container_name, timeout=5)
            Instance.objects.filter(pk=instance.pk).update(status=Instance.Status.ERROR, status_detail=detail)
            raise OperationError((f"{detail}. Last log lines:\n{logs}" if logs else detail + ".")
                                 + "\n" + runtime.arguments_hint(instance))
        stats = health.system_stats(instance)
        if stats is not None:
            Instance.objects.filter(pk=instance.pk).update(
                status=Instance.Status.HEALTHY, status_detail="", checked_at=timezone.now(), restart_count=0,
            )
            report.progress(100, "healthy")
            # The node types it offers are remembered when it stops (and by the health checks while it runs): asking
            # for /object_info here would hold up every start by what is the slowest call of a real ComfyUI.
            devices = [d.get("name", "") for d in stats.get("devices", [])]
            report.log(f"ComfyUI answers on {instance.url} ({', '.join(devices) or 'no devices'})")
            return {"url": instance.url, "devices": devices}
        if time.monotonic() > deadline:
            Instance.objects.filter(pk=instance.pk).update(
                status=Instance.Status.UNHEALTHY,
                status_detail=f"ComfyUI did not answer within {settings.INSTANCE_START_TIMEOUT} s",
            )
            raise OperationError(f"The container runs, but ComfyUI did not answer on {instance.url} within "
                                 f"{settings.INSTANCE_START_TIMEOUT} s; check its logs. "
                                 + runtime.arguments_hint(instance))
        report.progress(75, "waiting for ComfyUI to answer")  # written at most every so often; cancels the wait
        time.sleep(pause)
        if time.monotonic() - started > 2:
            pause = min(pause * 1.5, 0.5)


def stop(instance: Instance, report, *, give_back_gpus: bool = False) -> dict:
    with instance_lock(instance, report):
        if give_back_gpus:  # idle stop: a start asked since (and run first) wins
            instance.refresh_from_db()
            if instance.desired_state != Instance.DesiredState.STOPPED:
                report.log(f"{instance} was started again meanwhile: left running, its GPUs kept.")
                return {"stopped": None, "skipped": "started again meanwhile"}
        engine = engine_for(instance)
        try:
            report.progress(10, "remembering the node types it offers")
            from .services import node_types_of

            # For workflow pre-flights while it is stopped; kept as it was if it does not answer.
            node_types_of(instance)
            report.progress(20, "stopping the container")
            docker_engine.stop_container(engine, instance.container_name)
        except docker_engine.EngineError as exc:
            raise OperationError(str(exc)) from exc
        finally:
            engine.close()
        Instance.objects.filter(pk=instance.pk).update(status=Instance.Status.STOPPED, status_detail="")
        if (member := clusters.membership(instance)) is not None:
            _sync_cluster_here(instance, member[0], report)  # its master's file now lists it as not enabled
        result = {"stopped": instance.instance_id}
        if give_back_gpus:
            from .services import gpus_give_back

            if given := gpus_give_back(instance):
                report.log(f"GPU(s) {', '.join(map(str, given))} given back: free for other instances until its next "
                           "start, which takes as many again (the same ones when free).")
                result["gpus_given_back"] = given
        report.progress(100, "stopped")
        return result


def _take_gpus_back(instance: Instance, report) -> None:
    """Idle stop gave its GPUs back: take as many again before anything else (services.gpus_take_back)."""
    from django.core.exceptions import ValidationError

    from .services import gpus_take_back

    wanted = list(instance.gpus_released)
    try:
        got = gpus_take_back(instance)
    except ValidationError as exc:
        raise OperationError(f"{' '.join(exc.messages)} Nothing was started.") from exc
    if got is not None:
        moved = "" if got == wanted else f" (GPU(s) {', '.join(map(str, wanted))} were held by others)"
        report.log(f"Took GPU(s) {', '.join(map(str, got))} back, given back by idle stop{moved}.")
    instance.refresh_from_db()


def _sync_cluster_here(instance: Instance, cluster, report):
    """The files of `cluster`'s members on this instance's node rewritten where they differ; members on other nodes
    follow at their node's next reconcile. A failure here is logged, never the start's or the stop's."""
    try:
        clusters.sync_node(instance.node, report, cluster=cluster)
    except Exception as exc:  # noqa: BLE001  (a sync is a courtesy here; the reconcile repeats it)
        report.log(f"The cluster's files were not brought up to date: {exc}", "WARNING")


def restart(instance: Instance, report) -> dict:
    with instance_lock(instance, report):  # no other operation between the stop and the start
        stop(instance, report)
        return start(instance, report)


def delete(instance: Instance, report, *, purge_data: bool) -> dict:
    from .services import purge_instance_data

    if problem := clusters.deletion_problem(instance):
        raise OperationError(f"{problem} Nothing was deleted.")
    with instance_lock(instance, report):
        engine = engine_for(instance, "The instance was not deleted.")
        try:
            report.progress(20, "removing the container")
            docker_engine.remove_container(engine, instance.container_name)
        except docker_engine.EngineError as exc:
            raise OperationError(f"{exc} The instance was not deleted.") from exc
        finally:
            engine.close()
        instance_id, node = instance.instance_id, instance.node
        instance.delete()
        report.log(f"Removed container {instance.container_name} and the registry entry.")
        if purge_data:
            report.progress(60, "deleting the instance's data")
            purge_instance_data(instance_id, node)
            report.log(f"Deleted {layout.instance_dir(instance_id, node)} (shared data untouched).")
        else:
            report.log(f"Kept the data in {layout.instance_dir(instance_id, node)}.")
        return {"deleted": instance_id, "purged": purge_data}
