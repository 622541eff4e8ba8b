"""Model library jobs: thin wrappers around storage_app.library."""
import logging

from comfyhub.operations import OperationError, operation_job

from . import library

logger = logging.getLogger(__name__)


@operation_job("models_scan", label="Scan model library", queue="long")
def scan_models(report):
    result = library.scan(report)
    shared_input = refresh_shared_input(force=True)
    for links in shared_input.values():
        for instance_id, names in links["linked"].items():
            report.log(f"shared input linked into {instance_id}: {', '.join(names)}")
        for instance_id, names in links["unlinked"].items():
            report.log(f"shared input links dropped from {instance_id} (files gone): {', '.join(names)}")
        for instance_id, problem in links["refused"].items():
            report.log(f"shared input links of {instance_id} refused: {problem}", "WARNING")
    report.progress(100, f"{result.new} new, {result.changed} changed, {result.missing} missing")
    return {"new": result.new, "changed": result.changed, "missing": result.missing, "unchanged": result.unchanged,
            "problems": [{"path": p, "reason": r} for p, r in result.problems]}


@operation_job("models_verify", label="Verify model checksums", queue="long", timeout=48 * 3600)
def verify_models(report, *, full=False):
    report.log("Scanning the library first.")
    library.scan(report)
    result = library.verify(report, full=full)
    summary = {"hashed": result.hashed, "skipped": result.skipped, "bytes": result.bytes,
               "mismatches": result.mismatches, "problems": [{"path": p, "reason": r} for p, r in result.problems]}
    if result.hashed:
        report.log("Checking what running instances see of the library.")
        summary["sharing"] = check_sharing.body(report)
    if result.mismatches:
        raise OperationError(f"{len(result.mismatches)} file(s) do not match their expected or previous hash: "
                             + ", ".join(result.mismatches[:10]) + ". See the models page for the evidence.")
    return summary


@operation_job("models_promote", label="Promote inbox file", queue="long")
def promote_model(report, *, instance_pk, path):
    from instances.models import Instance

    instance = Instance.objects.select_related("node").filter(pk=instance_pk).first()
    if instance is None:
        raise OperationError("The instance no longer exists.")
    try:
        return library.promote(instance, path, report)
    except library.PromoteError as exc:
        raise OperationError(str(exc)) from exc


@operation_job("models_sharing", label="Check model sharing", queue="long")
def check_sharing(report):
    """Ask every running instance what it sees of the library; record it on the instance."""
    from django.utils import timezone

    from instances.models import Instance

    from .services import library_visibility

    running = list(Instance.objects.select_related("node").filter(desired_state=Instance.DesiredState.RUNNING))
    summary = {}
    for number, instance in enumerate(running, 1):
        visibility = library_visibility(instance)
        visibility["checked_at"] = timezone.now().isoformat()
        Instance.objects.filter(pk=instance.pk).update(library_check=visibility)
        if not visibility["reachable"]:
            report.log(f"{instance}: not reachable ({visibility['error']})", "WARNING")
        elif visibility["unseen_verified"]:
            report.log(f"{instance}: cannot see {len(visibility['unseen_verified'])} verified file(s): "
                       + ", ".join(visibility["unseen_verified"][:5]), "ERROR")
        else:
            report.log(f"{instance}: sees the whole library")
        summary[instance.instance_id] = {"reachable": visibility["reachable"],
                                         "unseen_verified": visibility.get("unseen_verified", [])}
        report.progress(100 * number / len(running), instance.instance_id)
    return summary


def serving_node_name() -> str:
    """The node this worker serves: the one whose queue the current job came from (node.<name>[.long]; the hub's
    default and long are `local`), else this process's NODE_NAME."""
    from django.conf import settings
    from rq import get_current_job

    from comfyhub import queues
    from instances.models import LOCAL_NODE

    job = get_current_job()
    origin = getattr(job, "origin", "") or ""
    if origin.startswith(queues.NODE_QUEUE_PREFIX):
        rest = origin[len(queues.NODE_QUEUE_PREFIX):]
        return rest[:-len(".long")] if rest.endswith(".long") else rest
    if origin:
        return LOCAL_NODE
    return settings.NODE_NAME


def _serving(node_name, doing):
    """The Node row of `node_name`, when this worker serves it; an OperationError otherwise (a job sent to the wrong
    node touches nothing)."""
    from instances.models import Node

    here = serving_node_name()
    if node_name != here:
        raise OperationError(f"This worker serves node '{here}', not '{node_name}': nothing was {doing}.")
    return Node.objects.filter(name=node_name).first()


@operation_job("models_verify_node", label="Verify a node's model library", queue="long", timeout=48 * 3600)
def verify_models_on_node(report, *, node_name, full=False):
    """On the node: compare its shared/models with the library's SHA-256s (library.verify_node)."""
    node = _serving(node_name, "checked")
    if node is None:
        raise OperationError(f"Node {node_name} is not in the registry any more.")
    try:
        result = library.verify_node(node, report, full=full)
    except library.NodeVerifyError as exc:
        raise OperationError(str(exc)) from exc
    counts = result.counts
    summary = ", ".join(f"{counts[status]} {status}" for status in ("ok", "differs", "missing", "unreadable")
                        if counts.get(status))
    report.progress(100, f"{result.checked} checked: {summary or 'nothing to check'}")
    if result.problems:
        raise OperationError(
            f"Node {node_name}: {len(result.problems)} of {result.checked} library file(s) are not the library's "
            "there: " + "; ".join(f"{path} {status}" for path, status, _ in result.problems[:10])
            + ". See the models page (filter by node) for each one.")
    return {"node": node_name, **result.as_dict()}


@operation_job("model_cache_warm", label="Warm model cache", queue="long", timeout=48 * 3600)
def warm_model_cache(report, *, node_name, paths=(), references=(), instance_pk=None):
    """Copy library files into this node's model cache, verified (services.model_cache_warm_now), from the node's own
    shared library; what the cache holds is recorded for the hub's pages."""
    from instances.models import Instance

    from . import layout, modelcache
    from .services import model_cache_warm_now

    node = _serving(node_name, "copied")
    instance = None
    if instance_pk is not None:
        instance = Instance.objects.select_related("node").filter(pk=instance_pk).first()
        if instance is None:
            raise OperationError("The instance no longer exists.")
    try:
        result = model_cache_warm_now(paths=paths, references=references, instance=instance, report=report,
                                      library_root=layout.shared_models_dir(node))
    except modelcache.CacheError as exc:
        _record_cache(node)
        raise OperationError(str(exc)) from exc
    _record_cache(node)
    report.progress(100, f"{len(result['copied'])} copied, {len(result['hits'])} already cached, "
                         f"{len(result['evicted'])} evicted, {len(result['refused'])} refused")
    if result["refused"]:
        raise OperationError(f"{len(result['refused'])} file(s) were not cached (the others were): "
                             + "; ".join(f"{path}: {reason}" for path, reason in result["refused"][:5]))
    return result


@operation_job("model_cache_check", label="Check model cache", queue="long", timeout=48 * 3600)
def check_model_cache(report, *, node_name):
    """Hash this node's cached model files again; drop those that no longer match the library."""
    from . import modelcache

    node = _serving(node_name, "checked")
    try:
        result = modelcache.check(report=report)
    except modelcache.CacheError as exc:
        _record_cache(node)
        raise OperationError(str(exc)) from exc
    _record_cache(node)
    report.progress(100, f"{result.checked} checked, {len(result.dropped)} dropped")
    return result.as_dict()


def _record_cache(node):
    """What this node's cache holds, recorded for the hub (another node's cache is shown from this)."""
    from . import layout, modelcache
    from .services import model_cache_record

    if node is None:
        return
    if layout.model_cache_root() is None:
        status = {"configured": False}
    else:
        status = modelcache.status()
    model_cache_record(node=node, status=status)


def scheduled_full_verify():
    """Periodic (rq cron): a full re-verification of the library, recorded as an operation like any other, and of
    each online node's copy of it on that node's agent (what its instances actually read)."""
    from django.core.exceptions import ValidationError

    from comfyhub import operations
    from instances.nodes import nodes_taking_jobs

    from .services import models_verify_node

    queued = [str(operations.enqueue(verify_models, full=True).pk)]
    for node in nodes_taking_jobs():
        try:
            queued.append(str(models_verify_node(node_name=node.name, full=True).pk))
        except (ValidationError, operations.NodeUnavailable) as exc:
            logger.warning("No scheduled verification of node %s's library copy: %s", node.name, exc)
    return queued


# --- Snapshots -------------------------------------------------------------------------------------------------

def _instance(instance_pk):
    from instances.models import Instance

    instance = Instance.objects.select_related("node", "template").filter(pk=instance_pk).first()
    if instance is None:
        raise OperationError("The instance no longer exists.")
    return instance


@operation_job("snapshot_create", label="Create snapshot", queue="long")
def create_snapshot(report, *, instance_pk, kind, include_output=False, note="", user_pk=None, automatic=""):
    from django.contrib.auth import get_user_model

    from . import snapshots

    user = get_user_model().objects.filter(pk=user_pk).first() if user_pk else None
    instance = _instance(instance_pk)
    try:
        snapshot = snapshots.create(instance, kind=kind, include_output=include_output, note=note, user=user,
                                    automatic=automatic, report=report)
    except snapshots.SnapshotError as exc:
        raise OperationError(str(exc)) from exc
    pruned = []
    if automatic == "schedule":
        pruned = prune_scheduled(instance, report)
    return {"snapshot": snapshot.pk, "archive": snapshot.archive, "size": snapshot.size, "sha256": snapshot.sha256,
            "pruned": pruned}


def prune_scheduled(instance, report):
    from . import snapshots
    from .models import Snapshot

    scheduled = Snapshot.objects.filter(instance=instance, automatic="schedule").order_by("-created_at")
    pruned = []
    for old in scheduled[instance.snapshot_keep:]:
        snapshots.delete_archive(old)
        pruned.append(old.archive)
        report.log(f"retention: deleted {old.archive} (keeping the last {instance.snapshot_keep})")
    return pruned


@operation_job("snapshot_restore", label="Restore snapshot", queue="long")
def restore_snapshot(report, *, snapshot_pk, user_pk=None):
    from . import snapshots

    return snapshots.restore_into_instance(snapshot_pk=snapshot_pk, user_pk=user_pk, report=report)


@operation_job("snapshot_clone", label="Clone snapshot", queue="long")
def clone_snapshot(report, *, snapshot_pk, new_instance_id, gpu_indexes, node_pk=None, marker=None, user_pk=None):
    from . import snapshots

    return snapshots.clone_into_new_instance(snapshot_pk=snapshot_pk, new_instance_id=new_instance_id,
                                             gpu_indexes=gpu_indexes, node_pk=node_pk, marker=marker,
                                             user_pk=user_pk, report=report)


@operation_job("snapshot_import_manager", label="Import ComfyUI-Manager snapshot")
def import_manager_snapshot(report, *, instance_pk, nodes, file_nodes=(), pips=()):
    from instances import customnodes

    instance = _instance(instance_pk)
    installed, failed = [], []
    for number, node in enumerate(nodes, 1):
        name = customnodes.name_from_url(node["url"])
        report.progress(100 * (number - 1) / max(len(nodes), 1), name)
        try:
            if customnodes.folder_of(instance, name) is not None:
                installed.append({"url": node["url"], "result": "already there"})
                continue
            created = customnodes.install(instance, node["url"], node.get("commit", ""), report=report)
            if node.get("disabled"):
                customnodes.set_enabled(created, False)
            installed.append({"url": node["url"], "result": f"installed at {created.commit[:12]}"})
        except customnodes.CustomNodeError as exc:
            failed.append({"url": node["url"], "error": str(exc)})
            report.log(f"{node['url']}: {exc}", "ERROR")
    result = {"installed": installed, "failed": failed, "not_installed": {"file_custom_nodes": list(file_nodes),
                                                                           "pips": list(pips)}}
    if file_nodes or pips:
        report.log(f"Not installed (ComfyHub installs git nodes only): {len(file_nodes)} single-file node(s) "
                   f"{', '.join(file_nodes)}; {len(pips)} extra pip package(s) {', '.join(pips)}. Install those by "
                   "hand if the instance needs them.", "WARNING")
    if failed:
        raise OperationError(f"{len(failed)} of {len(nodes)} node(s) failed: "
                             + "; ".join(f"{f['url']}: {f['error']}" for f in failed[:5]))
    return result


def refresh_shared_input(*, force=False):
    """Periodic (rq cron, every minute) and after `models scan` (force): link files added to the shared input folder
    into every instance's input/ and drop the links to removed ones (layout.refresh_shared_input). Cheap when nothing
    changed: one listing of each node's shared input folder, compared with the names seen last (kept in Redis); only
    a change visits the instances' folders. Links depend on names alone, so a rewritten file needs no visit."""
    import hashlib
    import logging

    from comfyhub import queues
    from instances.models import Instance, Node

    from . import layout

    connection = queues.get_connection("default")
    summary = {}
    for node in Node.objects.all():
        names = layout.shared_input_names(node)
        if names is None:
            continue
        seen = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()
        key = f"comfyhub:shared-input-seen:{node.pk}"
        if not force and connection.get(key) == seen.encode():
            continue
        ids = list(Instance.objects.filter(node=node).values_list("instance_id", flat=True))
        result = layout.refresh_shared_input(ids, node)
        for instance_id, problem in result["refused"].items():
            logging.getLogger(__name__).warning("Shared input links of %s refused: %s", instance_id, problem)
        connection.set(key, seen)  # a refused instance is retried at its next build or start, or the next change
        summary[node.name] = result
    return summary


def scheduled_snapshots():
    """Periodic (rq cron, hourly): a config snapshot of each instance whose schedule is due."""
    from django.utils import timezone

    from comfyhub import operations
    from instances.models import Instance

    from .models import Snapshot

    queued = []
    for instance in Instance.objects.filter(snapshot_every_hours__gt=0):
        last = Snapshot.objects.filter(instance=instance, automatic="schedule").order_by("-created_at").first()
        due = last is None or timezone.now() - last.created_at >= timezone.timedelta(
            hours=instance.snapshot_every_hours) - timezone.timedelta(minutes=5)
        if due:
            try:
                operations.enqueue(create_snapshot, target=instance, instance_pk=instance.pk, kind="config",
                                   automatic="schedule")
            except operations.NodeUnavailable as exc:
                # One instance's node being offline must not cost the others their snapshots; the next pass retries.
                logger.warning("No scheduled snapshot of %s: %s", instance.instance_id, exc)
                continue
            queued.append(instance.instance_id)
    return queued


@operation_job("legacy_plan", label="Plan legacy migration", queue="long")
def legacy_plan(report, *, source, instance_id="", mode="move"):
    """The plan behind the migration page: the folder is looked at here, on a worker, never in the request."""
    from django.core.exceptions import ValidationError

    from .services import legacy_plan as make_plan

    report.log(f"Planning the migration of {source} into instance '{instance_id}' ({mode}).")
    try:
        plan = make_plan(source=source, instance_id=instance_id, mode=mode)
    except ValidationError as exc:
        raise OperationError(" ".join(exc.messages)) from exc
    report.progress(100, f"{len(plan.entries)} file(s) to carry, {len(plan.conflicts)} conflict(s)")
    return plan.as_dict(limit=LEGACY_PLAN_LIMIT)


LEGACY_PLAN_LIMIT = 500  # files, conflicts and reports kept in the operation's result (the counts stay whole)


@operation_job("legacy_migrate", label="Migrate legacy install", queue="long", timeout=48 * 3600)
def legacy_migrate(report, *, source, instance_id="", mode="move", user_pk=None):
    from django.contrib.auth import get_user_model
    from django.core.exceptions import ValidationError

    from .services import legacy_migrate_now

    user = get_user_model().objects.filter(pk=user_pk).first() if user_pk else None
    try:
        return legacy_migrate_now(source=source, instance_id=instance_id, mode=mode, user=user, report=report)
    except ValidationError as exc:
        raise OperationError(" ".join(exc.messages)) from exc
