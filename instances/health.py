"""Health and isolation: what the engine and ComfyUI itself say about each instance, compared with the registry.

`reconcile_node` runs every INSTANCE_HEALTH_INTERVAL seconds (comfyhub.cron: local's on the hub, every other online
node's on its agent, where its engine and ports are) and records each instance's observed status, ComfyUI's queue and
its GPUs' memory; work in the queue is activity (instances/idle.py). It never starts or restarts anything (Docker's
restart policy backs off and gives up on crash loops)."""
from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from storage_app import layout

from . import comfyui_api, docker_engine, runtime
from .models import Instance, Node, note_in_use

logger = logging.getLogger(__name__)


def system_stats(instance: Instance, timeout: float | None = None) -> dict | None:
    """ComfyUI's /system_stats from the instance's published port, or None when it does not answer."""
    try:
        return comfyui_api.ComfyUI.of(instance).system_stats(timeout)
    except comfyui_api.ComfyUIError:
        return None


def queue_of(instance: Instance, timeout: float | None = None) -> dict | None:
    """ComfyUI's queue as {"running": n, "pending": m}, or None when it does not answer /queue."""
    try:
        queue = comfyui_api.ComfyUI.of(instance).queue(timeout)
    except comfyui_api.ComfyUIError:
        return None
    return {"running": queue.running, "pending": queue.pending}


# An instance's answers are its own code's: at most this many devices are recorded, names cut to this length.
MAX_DEVICES = 16
MAX_DEVICE_NAME = 200


def vram_of(instance: Instance, stats: dict | None) -> list[dict]:
    """Memory of each GPU ComfyUI reports: {"name", "index" (ComfyUI's), "gpu" (the host GPU's index, when the
    devices match the assignment one to one, in the order the container was given them), "used", "total"} (bytes;
    used = vram_total - vram_free)."""
    devices = [d for d in ((stats or {}).get("devices") or []) if isinstance(d, dict) and d.get("type") != "cpu"]
    devices = devices[:MAX_DEVICES]
    assigned = instance.assigned_gpus()
    vram = []
    for position, device in enumerate(devices):
        total, free = device.get("vram_total"), device.get("vram_free")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in (total, free)):
            continue
        index = device.get("index")
        vram.append({
            "name": str(device.get("name") or "")[:MAX_DEVICE_NAME],
            "index": index if isinstance(index, int) and not isinstance(index, bool) else None,
            "gpu": assigned[position].index if len(assigned) == len(devices) else None,
            "used": int(max(total - free, 0)), "total": int(total),
        })
    return vram


def isolation_checks(instance: Instance, state: docker_engine.ContainerState | None, stats: dict | None,
                     all_states: list[docker_engine.ContainerState]) -> list[dict]:
    """The checks shown on the instance page; each says what was expected and what was found."""
    if state is None:
        return []
    checks = []
    shared = str(layout.shared_root(instance.node))
    own = str(layout.instance_dir(instance.instance_id, instance.node))
    mounts = {m["destination"]: m for m in state.mounts}

    shared_mount = mounts.get(layout.CONTAINER_SHARED)
    checks.append(_check(
        "shared storage is read-only",
        bool(shared_mount) and not shared_mount["rw"] and shared_mount["source"] == shared,
        f"/shared is {'missing' if not shared_mount else ('read-write' if shared_mount['rw'] else 'read-only')}"
        + (f" from {shared_mount['source']}" if shared_mount else ""),
    ))
    instance_mount = mounts.get(layout.CONTAINER_INSTANCE)
    checks.append(_check(
        "instance storage is its own",
        bool(instance_mount) and instance_mount["rw"] and instance_mount["source"] == own,
        f"/instance from {instance_mount['source'] if instance_mount else 'nowhere'} (expected {own})",
    ))

    assigned = sorted(gpu.device_id for gpu in instance.assigned_gpus())
    granted = sorted(state.device_ids)
    detail = f"assigned {', '.join(assigned) or 'none'}; container got {', '.join(granted) or 'none'}"
    ok = assigned == granted
    if stats is not None:
        reported = [d for d in stats.get("devices", []) if d.get("type") != "cpu"]
        detail += f"; ComfyUI reports {len(reported)} GPU(s)"
        ok = ok and len(reported) == len(assigned)
    checks.append(_check("GPUs match the assignment", ok, detail))

    shared_rw = []
    for other in all_states:
        if other.id == state.id:
            continue
        for mount in other.mounts:
            if mount["rw"] and mount["source"] in {m["source"] for m in state.mounts if m["rw"]}:
                shared_rw.append(f"{other.name} also writes {mount['source']}")
    checks.append(_check("no other container writes its folders", not shared_rw,
                         "; ".join(shared_rw) or "no other container mounts its read-write folders"))

    library = instance.library_check or {}
    if library.get("reachable"):
        unseen = library.get("unseen_verified", [])
        checks.append(_check(
            "sees the verified shared library", not unseen,
            (f"cannot see {len(unseen)} verified file(s): {', '.join(unseen[:5])}" if unseen else
             "every verified library file is listed by ComfyUI") + f" (checked {library.get('checked_at', '?')})",
        ))

    port_users = [other.name for other in all_states
                  if other.id != state.id and any(port == instance.host_port for _, port in other.host_ports)]
    own_port = any(port == instance.host_port for _, port in state.host_ports)
    checks.append(_check(
        "its port is its own",
        own_port and not port_users,
        (f"port {instance.host_port} also published by {', '.join(port_users)}" if port_users else
         f"port {instance.host_port} {'published by this container only' if own_port else 'not published'}"),
    ))
    return checks


def _check(name, ok, detail):
    return {"check": name, "ok": bool(ok), "detail": detail}


def observe(instance: Instance, state, stats, checks) -> tuple[str, str]:
    """The observed status (and a short reason) from the container's state and ComfyUI's answer."""
    S = Instance.Status
    if state is None:
        if instance.desired_state == Instance.DesiredState.RUNNING:
            return S.ERROR, "the container is missing; start the instance to recreate it"
        if not layout.instance_dir(instance.instance_id, instance.node).exists():
            return S.NEW, ""
        return S.STOPPED, ""
    if state.status == "restarting":
        return S.CRASH_LOOPING, f"Docker is restarting it after crashes ({state.restart_count} so far)"
    if state.status in ("exited", "dead", "created"):
        if state.restart_count >= settings.INSTANCE_MAX_RESTARTS:
            return S.CRASH_LOOPING, (f"gave up after {state.restart_count} restarts; last exit code "
                                     f"{state.exit_code}{' (out of memory)' if state.oom_killed else ''}; see logs")
        if instance.desired_state == Instance.DesiredState.RUNNING and state.status != "created":
            return S.ERROR, f"exited with code {state.exit_code}{' (out of memory)' if state.oom_killed else ''}"
        return S.STOPPED, ""
    if state.status == "paused":
        return S.UNHEALTHY, "the container is paused"
    # running
    failed = [c["check"] for c in checks if not c["ok"]]
    if stats is None:
        started = _parse_docker_time(state.started_at)
        if started and timezone.now() - started < timedelta(seconds=settings.INSTANCE_START_TIMEOUT):
            return S.STARTING, "waiting for ComfyUI to answer"
        return S.UNHEALTHY, "ComfyUI does not answer /system_stats"
    if failed:
        return S.UNHEALTHY, "isolation check failed: " + ", ".join(failed)
    return S.HEALTHY, ""


def _parse_docker_time(value: str):
    if not value or value.startswith("0001-"):
        return None
    try:
        return datetime.fromisoformat(value[:26].rstrip("Z") + "+00:00")
    except ValueError:
        return None


def reconcile_node(node: Node) -> Counter:
    """Record the observed status of every instance on `node`. Returns how many are in each status."""
    from .services import instances_with_relations

    instances = list(instances_with_relations().filter(node=node))
    now = timezone.now()
    try:
        engine = docker_engine.require_engine(node.docker_host or None)
    except docker_engine.EngineError as exc:
        Instance.objects.filter(node=node).exclude(status=Instance.Status.NEW).update(
            status=Instance.Status.UNKNOWN, status_detail=str(exc)[:500], checked_at=now)
        return Counter({Instance.Status.UNKNOWN: len(instances)})
    try:
        # All containers, not only ComfyHub's: any of them could share a folder or a port with an instance.
        states = docker_engine.list_containers(engine)
    except docker_engine.EngineError as exc:
        Instance.objects.filter(node=node).update(status=Instance.Status.UNKNOWN, status_detail=str(exc)[:500])
        return Counter({Instance.Status.UNKNOWN: len(instances)})
    finally:
        engine.close()
    by_name = {state.name: state for state in states}
    running = [i for i in instances if (by_name.get(i.container_name) or _NONE).running]
    with ThreadPoolExecutor(max_workers=16) as pool:
        # Both questions are put to every instance at once (twice the threads the one question had), so a pass takes
        # as long as before, even when instances hang until the timeout.
        stats_answers, queue_answers = pool.map(system_stats, running), pool.map(queue_of, running)
        answers = dict(zip([i.pk for i in running], stats_answers))
        queues = dict(zip([i.pk for i in running], queue_answers))

    counts = Counter()
    changed, busy = [], []
    for instance in instances:
        state = by_name.get(instance.container_name)
        stats = answers.get(instance.pk)
        checks = isolation_checks(instance, state, stats, states)
        status, detail = observe(instance, state, stats, checks)
        if state is not None and state.running and state.labels.get(runtime.LABEL_CONFIG) != instance.config_hash:
            detail = (detail + "; " if detail else "") + "its container was changed outside ComfyHub"
        queue = queues.get(instance.pk)
        health = {"checks": checks, "devices": [d.get("name") for d in (stats or {}).get("devices", [])],
                  "comfyui_version": ((stats or {}).get("system") or {}).get("comfyui_version", ""),
                  "queue": queue, "vram": vram_of(instance, stats)}
        if queue and (queue["running"] or queue["pending"]):
            busy.append(instance.pk)
        counts[status] += 1
        if (instance.status, instance.status_detail, instance.health) != (status, detail, health) or \
                (state and instance.restart_count != state.restart_count):
            instance.status, instance.status_detail, instance.health = status, detail[:500], health
            instance.restart_count = state.restart_count if state else 0
            if state:
                instance.container_id = state.id
            changed.append(instance)
        instance.checked_at = now
    Instance.objects.bulk_update(
        changed, ["status", "status_detail", "health", "restart_count", "container_id"], batch_size=200)
    if busy:
        # Work in the queue is activity (for its whole cluster); a later request through the hub is not undone.
        note_in_use(busy, now)
    # Node types are remembered when an instance stops; one that answers and has none remembered yet (never stopped
    # through ComfyHub: started, then crashed or still running) gets them now, once.
    unknown = [i for i in instances if i.status == Instance.Status.HEALTHY and not i.node_types]
    if unknown:
        with ThreadPoolExecutor(max_workers=8) as pool:  # asked in threads, written here (one connection)
            offered = list(pool.map(_node_types_offered, unknown))
        for instance, types in zip(unknown, offered):
            if types:
                Instance.objects.filter(pk=instance.pk).update(node_types=types)
    Instance.objects.filter(node=node).update(checked_at=now)
    _sync_clusters(node)
    return counts


def _sync_clusters(node: Node):
    """The gpu_config.json of every cluster member on `node` rewritten where it differs from the statuses just
    recorded (a worker that stopped is `enabled: false` after this pass). Never fails the pass."""
    from . import clusters

    try:
        clusters.sync_node(node)
    except Exception:  # noqa: BLE001
        logger.exception("Could not bring the cluster members' gpu_config.json on node %s up to date", node)


def _node_types_offered(instance: Instance) -> list[str] | None:
    try:
        return sorted(comfyui_api.ComfyUI.of(instance).object_info())
    except comfyui_api.ComfyUIError:
        return None


class _Missing:
    running = False


_NONE = _Missing()


def reconcile_node_named(name: str) -> dict:
    """The pass for one node, by name (a node agent's periodic job, queued by the hub; a node deleted meanwhile
    has nothing to reconcile)."""
    node = Node.objects.filter(name=name).first()
    return dict(reconcile_node(node)) if node is not None else {}


def reconcile_all() -> dict:
    """Every node's pass in this process (tests, benchmarks). The periodic job runs local's on the hub and each
    other node's on its agent (instances.jobs.reconcile_instances), where its engine and ports are."""
    totals = Counter()
    for node in Node.objects.all():
        totals.update(reconcile_node(node))
    return dict(totals)
