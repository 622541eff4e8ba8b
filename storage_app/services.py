"""Model library services, shared by the models page, the admin, the `models` command and the jobs."""
from __future__ import annotations

import re
from pathlib import Path

from django.core.exceptions import ValidationError

from comfyhub import operations
from comfyhub.cli import human_size

from . import layout, library
from .models import ModelAsset


def models_scan(*, user=None):
    return operations.enqueue("storage_app.jobs.scan_models", user=user)


def models_verify(*, full: bool = False, user=None):
    return operations.enqueue("storage_app.jobs.verify_models", user=user, full=full)


def models_promote(*, instance, path: str, user=None):
    if not path or ".." in path.split("/") or path.startswith("/"):
        raise ValidationError({"path": [f"'{path}' is not a path inside the instance's models/ folder."]})
    return operations.enqueue("storage_app.jobs.promote_model", target=instance, user=user, instance_pk=instance.pk,
                              path=path)


def validate_sha256(value: str) -> str:
    digest = (value or "").strip().lower()
    if digest and not library.SHA256_RE.match(digest):
        raise ValidationError({"expected_sha256": ["A SHA-256 is 64 hexadecimal digits (0-9, a-f)."]})
    return digest


def asset_set_expected(*, asset: ModelAsset, sha256: str) -> ModelAsset:
    """Type in the expected SHA-256 of one file; the next verify compares against it."""
    digest = validate_sha256(sha256)
    asset.expected_sha256 = digest
    asset.expected_source = ModelAsset.ExpectedSource.TYPED if digest else ModelAsset.ExpectedSource.NONE
    if asset.sha256 and digest:
        if asset.sha256 == digest:
            asset.status, asset.status_reason = ModelAsset.Status.VERIFIED, ""
        else:
            asset.status = ModelAsset.Status.MISMATCH
            asset.status_reason = "differs from the expected hash (typed in)"
    asset.save()
    return asset


def models_import_hashes(*, text: str) -> dict:
    result = library.import_hashes(text)
    if result["bad"] and not result["matched"] and not result["unknown"]:
        raise ValidationError({"file": ["No line is in sha256sum format ('<64 hex digits>  <path>'): "
                                        + "; ".join(result["bad"][:5])]})
    return result


def models_export_hashes() -> str:
    return library.export_hashes()


def library_visibility(instance) -> dict:
    """Ask a running instance which model files it sees per folder and compare with the library and its inbox.

    Returns {"reachable", "folders": {folder: {"missing": [...], "extra": [...]}}, "unseen_verified": [...]}."""
    from instances.comfyui_api import ComfyUI, ComfyUIError

    comfyui = ComfyUI.of(instance)
    library_names: dict[str, set[str]] = {}
    verified: dict[str, set[str]] = {}
    for asset in ModelAsset.objects.exclude(status=ModelAsset.Status.MISSING).only("path", "folder", "status"):
        name = asset.path.split("/", 1)[1] if "/" in asset.path else asset.path
        library_names.setdefault(asset.folder, set()).add(name)
        if asset.status == ModelAsset.Status.VERIFIED:
            verified.setdefault(asset.folder, set()).add(name)
    from instances.remote import NodeReadError

    from .checks import instance_inbox

    try:
        inbox = instance_inbox(instance)  # read on the instance's node (another node's by its agent)
    except NodeReadError as exc:
        # Without its inbox, files it downloaded itself would be shown as strangers: nothing is compared.
        return {"reachable": False, "error": f"its inbox on node {instance.node.name} could not be read: {exc}"}
    inbox_names: dict[str, set[str]] = {}
    for item in inbox:
        if not item["problem"] and "/" in item["path"]:
            inbox_names.setdefault(item["folder"], set()).add(item["path"].split("/", 1)[1])
    report = {"reachable": True, "folders": {}, "unseen_verified": []}
    for folder in layout.MODEL_FOLDERS:
        try:
            seen = set(comfyui.models(folder))
        except ComfyUIError as exc:
            if exc.status_code == 404:
                continue  # this ComfyUI version has no such folder
            return {"reachable": False, "error": str(exc)}
        expected = library_names.get(folder, set())
        missing = sorted(expected - seen)
        extra = sorted(seen - expected - inbox_names.get(folder, set()))
        if missing or extra:
            report["folders"][folder] = {"missing": missing, "extra": extra}
        report["unseen_verified"] += [f"{folder}/{n}" for n in sorted(verified.get(folder, set()) - seen)]
    return report


# --- Nodes: their copy of the library, their model cache ------------------------------------------------------

NODE_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _named_node(node_name: str, *, default: str = ""):
    """The Node row named (a node name is checked before it is looked up); `default` when none is given. None only
    for this process's own node when the registry has no row for it (a fresh single host)."""
    from django.conf import settings

    from instances.models import Node

    this = settings.NODE_NAME
    name = node_name or default or this
    if not isinstance(name, str) or not NODE_NAME_RE.fullmatch(name):
        shown = str(name)[:63].encode("unicode_escape").decode()
        raise ValidationError({"node": [f"'{shown}' is not a node name (lowercase letters, digits and '-', at most "
                                        f"63 characters); leave it out for this node ('{this}')."]})
    node = Node.objects.filter(name=name).first()
    if node is None and name != this:
        known = ", ".join(Node.objects.order_by("name").values_list("name", flat=True)) or "none"
        raise ValidationError({"node": [f"No node '{name}'. Known: {known}."]})
    return name, node


def models_verify_node(*, node_name: str, full: bool = False, user=None):
    """Queue the check of one node's copy of the shared library on that node's agent (`local`: the hub's workers):
    per library file ok, differs or missing, against the library's SHA-256s."""
    if not node_name:
        raise ValidationError({"node": ["Name the node whose copy of the library to check, e.g. gpu-2 (`hosts list` "
                                        "lists them)."]})
    name, node = _named_node(node_name)
    if node is None:
        from instances.services import local_node

        node = local_node()
    if not ModelAsset.objects.exclude(status=ModelAsset.Status.MISSING).exclude(sha256="").exists():
        raise ValidationError({"node": ["The library has no hashed file yet, so there is nothing to compare node "
                                        f"{name}'s copy with: run models verify first."]})
    return operations.enqueue("storage_app.jobs.verify_models_on_node", target=node, user=user, node_name=name,
                              full=full)


def model_node_summary() -> list[dict]:
    """Per node that was checked: its files per status and when it was checked last, in one query."""
    from django.db.models import Count, Max, Min

    from .models import ModelNodeCheck

    rows = (ModelNodeCheck.objects.exclude(asset__status=ModelAsset.Status.MISSING)
            .values("node__name", "status").annotate(files=Count("id"), last=Max("checked_at"), first=Min("checked_at"))
            .order_by("node__name", "status"))
    summary: dict[str, dict] = {}
    for row in rows:
        entry = summary.setdefault(row["node__name"], {"node": row["node__name"], "counts": {}, "problems": 0,
                                                       "checked_at": None})
        entry["counts"][row["status"]] = row["files"]
        if row["status"] in ModelNodeCheck.PROBLEM_STATUSES:
            entry["problems"] += row["files"]
        if entry["checked_at"] is None or row["last"] > entry["checked_at"]:
            entry["checked_at"] = row["last"]
    return list(summary.values())


def _cache_node(node_name: str, *, instance=None):
    """The node whose cache is meant: the instance's when warming for one, else the one named, else this node
    (NODE_NAME). Returns (name, Node row or None). Another node's cache is reached through its agent; one whose agent
    reported no cache is refused here."""
    from django.conf import settings

    from .models import ModelCacheReport

    if instance is not None:
        if node_name and node_name != instance.node.name:
            raise ValidationError({"instance": [f"{instance} runs on node '{instance.node.name}', not on "
                                                f"'{str(node_name)[:63]}': warm that node's cache for it (leave "
                                                "--node out)."]})
        node_name = instance.node.name
    name, node = _named_node(node_name)
    missing = (f"Node '{name}' has no model cache: set MODEL_CACHE_PATH (a folder on its fast disk) and "
               "MODEL_CACHE_MAX_GB in its environment, then restart ComfyHub there")
    if name == settings.NODE_NAME:
        if layout.model_cache_root() is None:
            raise ValidationError({"node": [missing + "."]})
    elif node is not None:
        report = ModelCacheReport.objects.filter(node=node).first()
        if report is not None and report.status.get("configured") is False:
            raise ValidationError({"node": [f"{missing} (its agent reported so at "
                                            f"{report.reported_at:%Y-%m-%d %H:%M:%S} UTC)."]})
    return name, node


def model_cache_warm(*, node_name: str = "", paths=(), instance=None, workflow: bytes | None = None, user=None):
    """Queue copying into a node's cache (this one unless named; the instance's for an instance), run by that node's
    agent: library files (models/<folder>/<file>), the model files an instance's workflows name, or those a workflow
    file names. Exactly one of the three."""
    from . import modelcache

    given = [bool(paths), instance is not None, workflow is not None]
    if sum(given) != 1:
        raise ValidationError({"files": ["Say what to warm, one of: library files (models/<folder>/<file>), an "
                                         "instance (its workflows' model files), or a workflow file."]})
    name, node = _cache_node(node_name, instance=instance)
    cleaned, references = [], []
    if paths:
        errors = []
        for path in paths:
            try:
                cleaned.append(modelcache.library_path(path))
            except modelcache.CacheError as exc:
                errors.append(str(exc))
        if errors:
            raise ValidationError({"files": errors[:10]})
        cleaned = list(dict.fromkeys(cleaned))
        known = set(ModelAsset.objects.filter(path__in=cleaned).values_list("path", flat=True))
        if unknown := [path for path in cleaned if path not in known]:
            raise ValidationError({"files": [f"Not in the shared library: {', '.join(unknown[:10])}. Put the files in "
                                             "shared/models/<folder>/ and scan, or check the names (models list)."]})
    if workflow is not None:
        from instances.workflows import WorkflowError, parse_workflow, workflow_needs

        try:
            needs = workflow_needs(parse_workflow(workflow))
        except WorkflowError as exc:
            raise ValidationError({"workflow": [str(exc)]}) from exc
        references = sorted([folder, ref] for folder, ref in needs.models)
        if not references:
            raise ValidationError({"workflow": ["This workflow names no model file; nothing to warm."]})
    return operations.enqueue("storage_app.jobs.warm_model_cache", target=instance, node=node, user=user,
                              node_name=name, paths=cleaned, references=references,
                              instance_pk=instance.pk if instance is not None else None)


def model_cache_warm_now(*, paths=(), references=(), instance=None, report=None, library_root=None) -> dict:
    """Resolve what to warm and warm it, in this process (the job, on the node): an instance's workflows are read
    here, from its folder on the node, and the copies come from `library_root`, the node's own shared/models."""
    from comfyhub.operations import NullReport

    from . import modelcache

    report = report or NullReport()
    references = [tuple(reference) for reference in references]
    if instance is not None:
        references += instance_model_references(instance, report)
    found, unknown = modelcache.resolve(references)
    if unknown:
        report.log(f"{len(unknown)} model file(s) named are not in the shared library (the instance's own, or "
                   f"missing), not cached: {', '.join(unknown[:20])}", "WARNING")
    wanted = list(dict.fromkeys([*paths, *found]))
    if not wanted:
        report.log("Nothing of the shared library to warm.")
    result = modelcache.warm(wanted, report=report, library_root=library_root)
    return {**result.as_dict(), "not_in_library": unknown}


def instance_model_references(instance, report=None) -> list[tuple[str, str]]:
    """(folder, name) of every model file the instance's workflows (user/default/workflows) name; a workflow that
    cannot be read is named in the log and skipped."""
    from comfyhub.operations import NullReport
    from instances.workflows import WorkflowError, list_workflows, parse_workflow, read_workflow, workflow_needs

    report = report or NullReport()
    references = set()
    try:
        listed = list_workflows(instance)
    except WorkflowError as exc:
        report.log(f"{instance}'s workflows cannot be read: {exc}", "WARNING")
        return []
    for item in listed:
        if item["symlink"]:
            continue
        try:
            references |= workflow_needs(parse_workflow(read_workflow(instance, item["path"]))).models
        except WorkflowError as exc:
            report.log(f"{instance}: skipped workflow {item['path']}: {exc}", "WARNING")
    report.log(f"{instance}: {len(listed)} workflow(s) name {len(references)} model file(s)")
    return sorted(references)


def model_cache_check(*, node_name: str = "", user=None):
    """Queue a check of a node's cache on that node (this one unless named): every cached file hashed again, those
    that no longer match dropped."""
    name, node = _cache_node(node_name)
    return operations.enqueue("storage_app.jobs.check_model_cache", node=node, user=user, node_name=name)


def model_cache_status(*, node_name: str = "") -> dict:
    """A node's cache as its index records it: this node's read here; another node's as its agent last recorded it
    (after a warm or a check there), with `reported_at`; {"configured": None, ...} when it never reported."""
    from django.conf import settings

    from . import modelcache
    from .models import ModelCacheReport

    name, node = _named_node(node_name)
    if name == settings.NODE_NAME:
        if layout.model_cache_root() is None:
            return {"configured": False, "node": name, "limit_bytes": modelcache.limit_bytes(), "reported_at": None}
        return {"node": name, "reported_at": None, **modelcache.status()}
    report = ModelCacheReport.objects.filter(node=node).first()
    if report is None:
        return {"node": name, "configured": None, "reported_at": None}
    return {**report.status, "node": name, "reported_at": report.reported_at}


def model_cache_reports() -> list:
    """The caches other nodes' agents recorded, for the models page."""
    from django.conf import settings

    from .models import ModelCacheReport

    return list(ModelCacheReport.objects.select_related("node").exclude(node__name=settings.NODE_NAME)
                .order_by("node__name"))


def model_cache_record(*, node, status: dict) -> None:
    """Record what a node's cache holds (its agent, after a warm or a check), trimmed to what the page shows."""
    from django.utils import timezone

    from .models import ModelCacheReport

    kept = {**status, "entries": status.get("entries", [])[:50], "dropped": status.get("dropped", [])[:20]}
    ModelCacheReport.objects.update_or_create(node=node, defaults={"status": kept, "reported_at": timezone.now()})


# --- Snapshots -------------------------------------------------------------------------------------------------

def _user_pk(user):
    return user.pk if user is not None and getattr(user, "is_authenticated", False) else None


def snapshot_create(*, instance, kind: str = "config", include_output: bool = False, note: str = "", user=None):
    from .models import Snapshot

    if kind not in Snapshot.Kind.values:
        raise ValidationError({"kind": [f"'{kind}' is not a snapshot kind; use config or full."]})
    if len(note) > 300:
        raise ValidationError({"note": ["Keep the note under 300 characters."]})
    return operations.enqueue("storage_app.jobs.create_snapshot", target=instance, user=user, instance_pk=instance.pk,
                              kind=kind, include_output=include_output, note=note, user_pk=_user_pk(user))


def snapshot_restore(*, snapshot, user=None):
    if snapshot.instance_id is None:
        raise ValidationError({"snapshot": [f"Instance '{snapshot.instance_label}' no longer exists; clone the "
                                            "snapshot into a new instance instead."]})
    return operations.enqueue("storage_app.jobs.restore_snapshot", target=snapshot.instance, user=user,
                              snapshot_pk=snapshot.pk, user_pk=_user_pk(user))


def snapshot_clone(*, snapshot, new_instance_id: str, gpu_indexes=(), node=None, user=None):
    """Queue a new instance made from `snapshot`, on `node` (default the hub's `local`) with its GPUs `gpu_indexes`
    there. Onto another node the clone runs on that node's agent, which reads the archive through the shared
    COMFY_BACKUPS_PATH (checked first, as moves check it)."""
    from instances.models import LOCAL_NODE, Instance

    from instances.services import check_gpu_selection

    problem = layout.instance_id_problem(new_instance_id)
    if problem:
        raise ValidationError({"new_instance_id": [problem]})
    # The clone runs the snapshot's image: refused up front when this ComfyHub no longer allows it.
    from django.conf import settings

    from instances import runtime

    config = (snapshot.manifest or {}).get("instance")
    image = (config.get("image") if isinstance(config, dict) else "") or settings.COMFY_IMAGE
    if problem := runtime.image_problem(image):
        raise ValidationError({"snapshot": [problem]})
    if Instance.objects.filter(instance_id=new_instance_id).exists():
        raise ValidationError({"new_instance_id": [f"An instance '{new_instance_id}' already exists; pick another id."]})
    if node is not None and node.name == LOCAL_NODE:
        node = None  # the hub's own node: the single-host clone, unchanged
    if node is None:
        check_gpu_selection(indexes=list(gpu_indexes))
        return operations.enqueue("storage_app.jobs.clone_snapshot", user=user, snapshot_pk=snapshot.pk,
                                  new_instance_id=new_instance_id, gpu_indexes=list(gpu_indexes),
                                  user_pk=_user_pk(user))
    return _snapshot_clone_onto(snapshot=snapshot, new_instance_id=new_instance_id, gpu_indexes=list(gpu_indexes),
                                node=node, user=user)


def _snapshot_clone_onto(*, snapshot, new_instance_id, gpu_indexes, node, user):
    """The clone on another node: refused at once when that node takes no instances or jobs now or lacks the GPUs;
    the hub writes the shared-backups marker its agent must find before it creates anything."""
    from instances import placement
    from instances.services import check_gpu_selection

    from . import snapshots

    placement.check_node_takes_instances(node)
    if refusal := node.refusal():
        raise ValidationError({"node": [f"Cannot clone onto node {node}: {refusal}"]})
    check_gpu_selection(indexes=gpu_indexes, node=node)
    marker = snapshots.backups_marker_write(operations.NullReport())
    try:
        return operations.enqueue("storage_app.jobs.clone_snapshot", node=node, user=user, snapshot_pk=snapshot.pk,
                                  new_instance_id=new_instance_id, gpu_indexes=gpu_indexes, node_pk=node.pk,
                                  marker=marker, user_pk=_user_pk(user))
    except operations.NodeUnavailable as exc:
        Path(marker["path"]).unlink(missing_ok=True)
        raise ValidationError({"node": [f"Cannot clone onto node {node}: {exc}"]}) from exc
    except operations.queues.QueueUnavailable:
        Path(marker["path"]).unlink(missing_ok=True)
        raise


def snapshot_delete(*, snapshot):
    from . import snapshots

    try:
        snapshots.delete_archive(snapshot)
    except (snapshots.SnapshotError, OSError) as exc:
        raise ValidationError({"snapshot": [f"Could not delete the archive: {exc}"]}) from exc


def snapshot_export_manager(*, snapshot) -> dict:
    from . import snapshots

    return snapshots.to_manager(snapshot)


def snapshot_import_manager(*, instance, data, user=None):
    from . import snapshots

    try:
        nodes = snapshots.parse_manager(data)
    except snapshots.SnapshotError as exc:
        raise ValidationError({"file": [str(exc)]}) from exc
    file_nodes, pips = snapshots.manager_extras(data)
    return operations.enqueue("storage_app.jobs.import_manager_snapshot", target=instance, user=user,
                              instance_pk=instance.pk, nodes=nodes, file_nodes=file_nodes, pips=pips)


# --- Legacy migration ------------------------------------------------------------------------------------------

def _legacy_choices(*, source: str, instance_id: str, mode: str, absolute: bool = False) -> str:
    """The checks that need no file system (so a page that runs them reveals nothing about the host); the folder
    itself is checked by the job. Returns the instance id to use."""
    from django.conf import settings

    instance_id = instance_id or settings.COMFY_INSTANCE_ID
    if mode not in ("move", "copy"):
        raise ValidationError({"mode": [f"Unknown mode '{mode}'; use move or copy."]})
    if problem := layout.instance_id_problem(instance_id):
        raise ValidationError({"instance_id": [problem]})
    if not source or not source.strip() or any(ord(char) < 32 for char in source):
        raise ValidationError({"source": ["Give the old install's folder as a path (no line breaks)."]})
    if absolute and not Path(source).is_absolute():
        raise ValidationError({"source": ["Give the folder as an absolute path, e.g. /srv/ComfyUI."]})
    return instance_id


def legacy_plan(*, source: str, instance_id: str = "", mode: str = "move"):
    """The plan, computed here (the CLI, and the planning job). A source that overlaps ComfyHub's storage or lies
    outside LEGACY_SOURCE_ROOTS is refused before anything is looked at."""
    from . import migration

    instance_id = _legacy_choices(source=source, instance_id=instance_id, mode=mode)
    try:
        return migration.make_plan(Path(source).expanduser(), instance_id=instance_id, mode=mode)
    except migration.MigrationError as exc:
        raise ValidationError({"source": [str(exc)]}) from exc


def legacy_plan_start(*, source: str, instance_id: str = "", mode: str = "move", user=None):
    """Plan on a worker (the page): the request itself never looks at the host's folders."""
    instance_id = _legacy_choices(source=source, instance_id=instance_id, mode=mode, absolute=True)
    return operations.enqueue("storage_app.jobs.legacy_plan", user=user, source=source, instance_id=instance_id,
                              mode=mode)


def legacy_register(*, instance_id: str, user=None):
    """The migrated instance, registered and ready to start (on 8188 when free)."""
    from instances import services as instance_services
    from instances.models import Instance

    existing = Instance.objects.filter(instance_id=instance_id).first()
    if existing:
        return existing
    node = instance_services.local_node()
    start, _ = instance_services.port_range_setting()
    taken = Instance.objects.filter(node=node, host_port=start).exists() or \
        instance_services.port_bound_on_host(node.bind_address, start)
    return instance_services.instance_create(instance_id=instance_id, display_name="ComfyUI (migrated)",
                                             host_port=None if taken else start, node=node, user=user)


def legacy_migrate_now(*, source: str, instance_id: str = "", mode: str = "move", user=None, report=None) -> dict:
    """Plan and carry out a migration in this process (the CLI, and the job behind the page). Run again after an
    interruption, it finishes what the interrupted run left, even when that run had emptied the source."""
    from comfyhub.operations import OperationError

    from . import migration

    plan = legacy_plan(source=source, instance_id=instance_id, mode=mode)
    instance = legacy_register(instance_id=plan.instance_id, user=user)
    try:
        layout.build_shared_tree(instance.node)
        layout.build_instance_tree(instance.instance_id, instance.node)
    except layout.LayoutError as exc:  # e.g. a link planted where a folder belongs: refused before anything moved
        raise ValidationError({"instance_id": [f"{exc} Nothing was moved."]}) from exc
    plan = legacy_plan(source=source, instance_id=plan.instance_id, mode=mode)  # again: the build made folders
    if report is not None:
        if plan.previous and plan.previous["files_done"]:
            report.log(f"An earlier run carried {plan.previous['files_done']} file(s) already"
                       + (" and was interrupted: finishing it." if plan.previous["unfinished"] else "."))
        totals = plan.totals()
        report.log(f"{len(plan.entries)} file(s) to carry: " + (", ".join(
            f"{group}: {t['files']} ({human_size(t['bytes'])})" for group, t in totals.items()) or "none"))
    try:
        done = migration.execute(plan, report)
    except (migration.MigrationError, layout.LayoutError) as exc:
        raise OperationError(str(exc)) from exc
    except OSError as exc:  # a full disk, a folder made read-only: what was carried is journaled
        raise OperationError(f"The migration stopped: {exc}. Fix that and run it again: it resumes.") from exc
    layout.link_shared_input(instance.instance_id, instance.node)
    return {"instance": instance.instance_id, "port": instance.host_port, **done}


def legacy_migrate(*, source: str, instance_id: str = "", mode: str = "move", user=None):
    """Queue the migration; the job checks the folder and plans again before moving anything."""
    instance_id = _legacy_choices(source=source, instance_id=instance_id, mode=mode, absolute=True)
    return operations.enqueue("storage_app.jobs.legacy_migrate", user=user, source=source, instance_id=instance_id,
                              mode=mode, user_pk=_user_pk(user))
