"""Model library services, shared by the models page, the admin, the `models` command and the jobs."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from django.core.exceptions import ValidationError

from comfyhub import operations

from . import jobs, layout, library
from .models import ModelAsset


def models_scan(*, user=None):
    return operations.enqueue(jobs.scan_models, user=user)


def models_verify(*, full: bool = False, user=None):
    return operations.enqueue(jobs.verify_models, user=user, full=full)


def models_promote(*, instance, path: str, user=None):
    if not path or ".." in path.split("/") or path.startswith("/"):
        raise ValidationError({"path": [f"'{path}' is not a path inside the instance's models/ folder."]})
    return operations.enqueue(jobs.promote_model, target=instance, user=user, instance_pk=instance.pk, path=path)


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


def library_visibility(instance, timeout: float = 5.0) -> dict:
    """Ask a running instance which model files it sees per folder and compare with the library and its inbox.

    Returns {"reachable", "folders": {folder: {"missing": [...], "extra": [...]}}, "unseen_verified": [...]}."""
    from instances.health import probe_host

    base = f"http://{probe_host(instance)}:{instance.host_port}"
    library_names: dict[str, set[str]] = {}
    verified: dict[str, set[str]] = {}
    for asset in ModelAsset.objects.exclude(status=ModelAsset.Status.MISSING).only("path", "folder", "status"):
        name = asset.path.split("/", 1)[1] if "/" in asset.path else asset.path
        library_names.setdefault(asset.folder, set()).add(name)
        if asset.status == ModelAsset.Status.VERIFIED:
            verified.setdefault(asset.folder, set()).add(name)
    inbox_names: dict[str, set[str]] = {}
    for item in library.inbox(instance):
        if not item["problem"] and "/" in item["path"]:
            inbox_names.setdefault(item["folder"], set()).add(item["path"].split("/", 1)[1])
    report = {"reachable": True, "folders": {}, "unseen_verified": []}
    for folder in layout.MODEL_FOLDERS:
        try:
            with urllib.request.urlopen(f"{base}/models/{folder}", timeout=timeout) as response:
                seen = set(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                continue  # this ComfyUI version has no such folder
            return {"reachable": False, "error": f"{base}/models/{folder} answered {exc.code}"}
        except (OSError, ValueError) as exc:
            return {"reachable": False, "error": f"{base} does not answer: {exc}"}
        expected = library_names.get(folder, set())
        missing = sorted(expected - seen)
        extra = sorted(seen - expected - inbox_names.get(folder, set()))
        if missing or extra:
            report["folders"][folder] = {"missing": missing, "extra": extra}
        report["unseen_verified"] += [f"{folder}/{n}" for n in sorted(verified.get(folder, set()) - seen)]
    return report


# --- Snapshots -------------------------------------------------------------------------------------------------

def _user_pk(user):
    return user.pk if user is not None and getattr(user, "is_authenticated", False) else None


def snapshot_create(*, instance, kind: str = "config", include_output: bool = False, note: str = "", user=None):
    from .models import Snapshot

    if kind not in Snapshot.Kind.values:
        raise ValidationError({"kind": [f"'{kind}' is not a snapshot kind; use config or full."]})
    if len(note) > 300:
        raise ValidationError({"note": ["Keep the note under 300 characters."]})
    return operations.enqueue(jobs.create_snapshot, target=instance, user=user, instance_pk=instance.pk, kind=kind,
                              include_output=include_output, note=note, user_pk=_user_pk(user))


def snapshot_restore(*, snapshot, user=None):
    if snapshot.instance_id is None:
        raise ValidationError({"snapshot": [f"Instance '{snapshot.instance_label}' no longer exists; clone the "
                                            "snapshot into a new instance instead."]})
    return operations.enqueue(jobs.restore_snapshot, target=snapshot.instance, user=user, snapshot_pk=snapshot.pk,
                              user_pk=_user_pk(user))


def snapshot_clone(*, snapshot, new_instance_id: str, gpu_indexes=(), user=None):
    from instances.models import Instance

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
    check_gpu_selection(indexes=list(gpu_indexes))
    return operations.enqueue(jobs.clone_snapshot, user=user, snapshot_pk=snapshot.pk, new_instance_id=new_instance_id,
                              gpu_indexes=list(gpu_indexes), user_pk=_user_pk(user))


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
    return operations.enqueue(jobs.import_manager_snapshot, target=instance, user=user, instance_pk=instance.pk,
                              nodes=nodes, file_nodes=file_nodes, pips=pips)


def restore_into_instance(*, snapshot_pk, user_pk=None, report=None) -> dict:
    """Job body: check, snapshot what is there now, stop, swap in the archived trees, restore settings, restart."""
    from django.contrib.auth import get_user_model

    from comfyhub.operations import OperationError
    from instances import containers, services as instance_services
    from instances.models import Instance

    from . import snapshots
    from .models import Snapshot

    snapshot = Snapshot.objects.select_related("instance__node").get(pk=snapshot_pk)
    instance = snapshot.instance
    if instance is None:
        raise OperationError(f"Instance '{snapshot.instance_label}' no longer exists; clone the snapshot instead.")
    user = get_user_model().objects.filter(pk=user_pk).first() if user_pk else None
    root = layout.instance_dir(instance.instance_id, instance.node)
    try:
        report.progress(2, "checking the archive")
        plan = snapshots.check_archive(snapshot, snapshots.staging_parent(root))  # refuse before anything changes
        report.log(f"the archive passed every check: {', '.join(plan.trees) or 'nothing'} to restore, "
                   f"{plan.unpacked} bytes unpacked (at most {plan.limit.bytes})")
        for item in (snapshot.manifest or {}).get("skipped", []) if isinstance(snapshot.manifest, dict) else []:
            report.log(f"not in this snapshot (left out when it was taken): {item.get('path')} ({item.get('why')})",
                       "WARNING")
        report.progress(5, "taking a snapshot of the current state first")
        undo = snapshots.create(instance, kind=snapshot.kind, include_output=snapshot.include_output,
                                note=f"automatic, before restoring snapshot {snapshot.pk}", user=user,
                                automatic="before-restore", report=report)
    except snapshots.SnapshotError as exc:
        message = str(exc)
        raise OperationError(message if "Nothing was restored" in message or "nothing was restored" in message
                             else f"{message} Nothing was restored.") from exc
    was_running = instance.desired_state == Instance.DesiredState.RUNNING
    if was_running:
        report.progress(20, "stopping the instance")
        containers.stop(instance, report)
    try:
        report.progress(30, "restoring files")
        trees = snapshots.restore_files(snapshot, instance, report)
    except (snapshots.SnapshotError, OSError) as exc:
        if was_running:
            containers.start(instance, report)
        raise OperationError(f"{exc} The instance was left as it was (undo snapshot {undo.pk} kept).") from exc
    config = snapshot.manifest.get("instance", {})
    kept = []
    try:
        instance_services.instance_update(
            instance=instance, display_name=config.get("display_name", instance.display_name),
            description=config.get("description", instance.description), image=config.get("image", instance.image),
            extra_args=config.get("extra_args", []), extra_env=config.get("extra_env", {}), host_port=None,
            gpu_indexes=[g.index for g in instance.assigned_gpus()], user=user)
        kept = ["GPUs and port stay as they are now"]
    except ValidationError as exc:
        kept = [f"registry settings not restored: {'; '.join(exc.messages)}"]
        report.log(kept[0], "WARNING")
    Instance.objects.filter(pk=instance.pk).update(desired_state=Instance.DesiredState.RUNNING if was_running
                                                   else Instance.DesiredState.STOPPED)
    if was_running:
        report.progress(80, "starting the instance again")
        containers.start(Instance.objects.select_related("node").get(pk=instance.pk), report)
    report.progress(100, "restored")
    return {"restored": trees, "undo_snapshot": undo.pk, "notes": kept, "restarted": was_running}


def clone_into_new_instance(*, snapshot_pk, new_instance_id, gpu_indexes, user_pk=None, report=None) -> dict:
    from django.contrib.auth import get_user_model

    from comfyhub.operations import OperationError
    from instances import services as instance_services

    from . import snapshots
    from .models import Snapshot

    snapshot = Snapshot.objects.get(pk=snapshot_pk)
    user = get_user_model().objects.filter(pk=user_pk).first() if user_pk else None
    config = snapshot.manifest.get("instance", {})
    try:
        snapshots.verify_archive(snapshot)
        instance = instance_services.instance_create(
            instance_id=new_instance_id, display_name=config.get("display_name", ""),
            description=config.get("description", ""), image=config.get("image", ""),
            extra_args=config.get("extra_args", []), extra_env=config.get("extra_env", {}),
            gpu_indexes=gpu_indexes, user=user)
    except snapshots.SnapshotError as exc:
        raise OperationError(f"{exc} Nothing was created.") from exc
    except ValidationError as exc:
        raise OperationError("Cannot create the clone: " + "; ".join(exc.messages)) from exc
    try:
        report.progress(30, "extracting into the new instance's folder")
        snapshots.restore_clone(snapshot, layout.instance_dir(new_instance_id, instance.node), report)
        layout.build_shared_tree(instance.node)
        layout.build_instance_tree(new_instance_id, instance.node)
    except (snapshots.SnapshotError, OSError) as exc:
        instance.delete()
        raise OperationError(f"{exc} The clone was not created.") from exc
    report.progress(100, f"cloned into {new_instance_id}")
    return {"instance": new_instance_id, "port": instance.host_port,
            "gpus": [g.index for g in instance.assigned_gpus()]}


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
    return operations.enqueue(jobs.legacy_plan, user=user, source=source, instance_id=instance_id, mode=mode)


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
            f"{group}: {t['files']} ({library.human_size(t['bytes'])})" for group, t in totals.items()) or "none"))
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
    return operations.enqueue(jobs.legacy_migrate, user=user, source=source, instance_id=instance_id, mode=mode,
                              user_pk=_user_pk(user))
