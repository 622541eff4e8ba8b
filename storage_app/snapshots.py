"""Snapshots of an instance: archives under COMFY_BACKUPS_PATH, restores that swap in only complete trees, clones.

Archives are gzipped tar files made by GNU tar (fast on many small files). Restores never trust them: the hash is
checked first, every member is inspected (no absolute paths, no '..', no links leaving the tree, no devices), the
archive is extracted into a staging folder next to the instance, and only a complete extraction is swapped in.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from . import layout
from .models import Snapshot

MANIFEST_NAME = "comfyhub-snapshot.json"
CONFIG_TREES = ("user",)
FULL_TREES = ("user", "custom_nodes", "models", "python-packages")


class SnapshotError(Exception):
    pass


def backups_root() -> Path:
    return settings.COMFY_BACKUPS_PATH


def archive_path(snapshot: Snapshot) -> Path:
    path = (backups_root() / snapshot.archive).resolve()
    if not path.is_relative_to(backups_root().resolve()):
        raise SnapshotError(f"The archive path {snapshot.archive} leaves the backups folder.")
    return path


# --- What goes in ---------------------------------------------------------------------------------------------

def registry_config(instance) -> dict:
    return {
        "instance_id": instance.instance_id, "display_name": instance.display_name,
        "description": instance.description, "image": instance.image, "extra_args": list(instance.extra_args),
        "extra_env": dict(instance.extra_env), "host_port": instance.host_port,
        "gpus": [gpu.index for gpu in instance.assigned_gpus()],
        "template": instance.template.name if instance.template_id else None,
    }


def custom_node_manifest(instance) -> list[dict]:
    """Each entry of custom_nodes/: its origin URL and commit, read as files (instances.gitrepo), never by running
    git, whose configuration the instance's code could have written. `dirty` is None: only git knows it."""
    from instances import gitrepo

    from . import safefs

    root = layout.instance_dir(instance.instance_id, instance.node)
    found = []
    try:
        with safefs.opened_dir(root, "custom_nodes") as fd:
            entries = sorted(((e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
                              for e in os.scandir(fd)))
    except (FileNotFoundError, safefs.UnsafePathError):
        return found
    for entry_name, is_dir, is_file in entries:
        if entry_name.startswith(".") or entry_name == "__pycache__":
            continue
        disabled = entry_name.endswith(".disabled")
        item = {"folder": entry_name[:-9] if disabled else entry_name, "disabled": disabled, "git_url": "",
                "commit": "", "dirty": None, "pip": [], "file": is_file}
        folder = f"custom_nodes/{entry_name}"
        if is_dir:
            repo = gitrepo.read(root, folder)
            item["git_url"], item["commit"] = repo.origin_url, repo.commit
            try:
                requirements = safefs.read_bytes(root, f"{folder}/requirements.txt", 1024 * 1024)
            except (FileNotFoundError, safefs.UnsafePathError):
                requirements = b""
            item["pip"] = [line.strip() for line in requirements.decode("utf-8", errors="replace").splitlines()
                           if line.strip() and not line.strip().startswith("#")]
        found.append(item)
    return found


# --- Create ---------------------------------------------------------------------------------------------------

def create(instance, *, kind: str, include_output: bool = False, note: str = "", user=None, automatic: str = "",
           report=None) -> Snapshot:
    root = layout.instance_dir(instance.instance_id, instance.node)
    if not root.is_dir():
        raise SnapshotError(f"{root} does not exist: build the instance first.")
    trees = [t for t in (CONFIG_TREES if kind == Snapshot.Kind.CONFIG else FULL_TREES) if (root / t).exists()]
    if include_output and (root / "output").exists():
        trees.append("output")
    manifest = {
        "format": 1, "kind": kind, "include_output": include_output, "trees": trees,
        "created_at": timezone.now().isoformat(), "instance": registry_config(instance),
        "custom_nodes": custom_node_manifest(instance),
    }
    folder = backups_root() / instance.instance_id
    folder.mkdir(parents=True, exist_ok=True)
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    name = f"{instance.instance_id}-{kind}-{stamp}-{uuid.uuid4().hex[:6]}.tar.gz"
    final = folder / name
    staging = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=folder))
    try:
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        partial = folder / f".{name}.partial"
        _log(report, f"archiving {', '.join(trees) or 'nothing'} of {instance}")
        _tar_create(partial, [(staging, MANIFEST_NAME)] + [(root, tree) for tree in trees])
        digest, size = _sha256(partial)
        os.replace(partial, final)
    except OSError as exc:
        _cleanup(folder / f".{name}.partial")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SnapshotError(f"The backups disk is full ({backups_root()}); free space and try again. "
                                "Nothing was written.") from exc
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    snapshot = Snapshot.objects.create(
        instance=instance, instance_label=instance.instance_id, kind=kind, include_output=include_output,
        automatic=automatic, note=note, archive=str(final.relative_to(backups_root())), size=size, sha256=digest,
        manifest=manifest, created_by=user if user is not None and getattr(user, "is_authenticated", False) else None)
    _log(report, f"snapshot {final.name}: {size} bytes, sha256 {digest}")
    return snapshot


def _tar_create(target: Path, members: list[tuple[Path, str]]):
    command = ["tar", "--create", "--gzip", "--file", str(target), "--numeric-owner", "--no-wildcards"]
    for base, name in members:
        command += ["-C", str(base), name]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        message = done.stderr.strip() or f"tar exited with {done.returncode}"
        if "No space left" in message:
            raise OSError(errno.ENOSPC, message)
        raise SnapshotError(f"Creating the archive failed: {message}")


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(4 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _cleanup(path: Path):
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# --- Check and extract ----------------------------------------------------------------------------------------

def verify_archive(snapshot: Snapshot) -> Path:
    path = archive_path(snapshot)
    if not path.is_file():
        raise SnapshotError(f"The archive {snapshot.archive} is missing from {backups_root()}.")
    digest, _ = _sha256(path)
    if digest != snapshot.sha256:
        raise SnapshotError(f"The archive {snapshot.archive} is damaged: its SHA-256 is {digest}, the snapshot "
                            f"recorded {snapshot.sha256}. Nothing was restored.")
    return path


def check_members(archive: Path, allowed_trees) -> list[tarfile.TarInfo]:
    """Every member, or SnapshotError naming the first one that could escape or is not plain data."""
    allowed = set(allowed_trees) | {MANIFEST_NAME}
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
    for member in members:
        name = member.name
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts:
            raise SnapshotError(f"Refused: the archive entry '{name}' points outside the instance.")
        if not parts or parts[0] not in allowed:
            raise SnapshotError(f"Refused: the archive entry '{name}' is not part of a snapshot.")
        if member.isdev() or member.isfifo():
            raise SnapshotError(f"Refused: the archive entry '{name}' is a device or pipe.")
        if member.issym() or member.islnk():
            target = member.linkname
            resolved = PurePosixPath(os.path.normpath(PurePosixPath(name).parent / target)) if member.issym() \
                else PurePosixPath(os.path.normpath(target))
            if target.startswith("/") and not target.startswith(f"{layout.CONTAINER_SHARED}/input/"):
                raise SnapshotError(f"Refused: the link '{name}' points to {target}, outside the instance.")
            if not target.startswith("/") and (str(resolved).startswith("..") or resolved.is_absolute()):
                raise SnapshotError(f"Refused: the link '{name}' points to {target}, outside the instance.")
    return members


def read_manifest(archive: Path) -> dict:
    with tarfile.open(archive, "r:gz") as tar:
        try:
            handle = tar.extractfile(MANIFEST_NAME)
        except KeyError as exc:
            raise SnapshotError("The archive has no comfyhub-snapshot.json: not a ComfyHub snapshot.") from exc
        return json.loads(handle.read(10 << 20))


def extract_to_staging(archive: Path, parent: Path, trees) -> Path:
    """Extract into a new staging folder under `parent` (same filesystem as the instance, so the swap is a
    rename). On any failure, disk full included, the staging folder is removed and the error re-raised."""
    check_members(archive, trees)
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=parent))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(staging, filter=_safe_filter)
        return staging
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SnapshotError(f"The disk filled up while extracting into {parent}; the instance was left exactly "
                                "as it was. Free space and try again.") from exc
        raise


def _safe_filter(member, path):
    member = tarfile.data_filter(member, path)
    if os.geteuid() == 0 and member is not None:
        member = member.replace(uid=settings.PUID, gid=settings.PGID, uname="", gname="", deep=False)
    return member


def swap_in(staging: Path, root: Path, trees) -> None:
    """Replace root/<tree> with staging/<tree> for each tree; all or nothing."""
    moved_aside = []
    token = uuid.uuid4().hex[:8]
    try:
        for tree in trees:
            current, incoming = root / tree, staging / tree
            if not incoming.exists():
                continue
            if os.path.lexists(current):
                aside = root / f".{tree}.replaced-{token}"
                os.rename(current, aside)
                moved_aside.append((aside, current))
            os.rename(incoming, current)
    except BaseException:
        for aside, current in reversed(moved_aside):
            if os.path.lexists(current):
                shutil.rmtree(current, ignore_errors=True)
            os.rename(aside, current)
        raise
    for aside, _ in moved_aside:
        shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def restore_files(snapshot: Snapshot, instance, report=None) -> list[str]:
    """Put the snapshot's trees back into `instance`'s folder (which must exist)."""
    archive = verify_archive(snapshot)
    manifest = read_manifest(archive)
    trees = manifest.get("trees", [])
    root = layout.instance_dir(instance.instance_id, instance.node)
    root.mkdir(parents=True, exist_ok=True)
    _log(report, f"extracting {', '.join(trees)} into a staging folder")
    staging = extract_to_staging(archive, root, trees)
    _log(report, "swapping the restored folders in")
    swap_in(staging, root, trees)
    return trees


def restore_clone(snapshot: Snapshot, new_root: Path, report=None) -> dict:
    """Extract into a brand-new instance folder (staged next to it, renamed into place when complete)."""
    archive = verify_archive(snapshot)
    manifest = read_manifest(archive)
    if os.path.lexists(new_root):
        raise SnapshotError(f"{new_root} already exists; pick another id.")
    new_root.parent.mkdir(parents=True, exist_ok=True)
    staging = extract_to_staging(archive, new_root.parent, manifest.get("trees", []))
    (staging / MANIFEST_NAME).unlink(missing_ok=True)
    os.rename(staging, new_root)
    return manifest


def delete_archive(snapshot: Snapshot):
    with transaction.atomic():
        path = archive_path(snapshot)
        snapshot.delete()
        _cleanup(path)


# --- ComfyUI-Manager snapshot format --------------------------------------------------------------------------

def to_manager(snapshot: Snapshot) -> dict:
    git_nodes, file_nodes, pips = {}, [], {}
    for node in snapshot.manifest.get("custom_nodes", []):
        if node.get("git_url"):
            git_nodes[node["git_url"]] = {"hash": node.get("commit", ""), "disabled": bool(node.get("disabled"))}
        elif node.get("file"):
            file_nodes.append({"filename": node["folder"], "disabled": bool(node.get("disabled"))})
        for requirement in node.get("pip", []):
            pips[requirement] = ""
    return {"comfyui": "", "git_custom_nodes": git_nodes, "file_custom_nodes": file_nodes, "pips": pips}


def manager_extras(data) -> tuple[list[str], list[str]]:
    """What a ComfyUI-Manager snapshot holds besides git nodes: single-file nodes and pip packages."""
    files = [str(item.get("filename", item)) if isinstance(item, dict) else str(item)
             for item in data.get("file_custom_nodes") or []]
    pips = list((data.get("pips") or {}).keys()) if isinstance(data.get("pips"), dict) else []
    return files, pips


def parse_manager(data) -> list[dict]:
    if not isinstance(data, dict) or not isinstance(data.get("git_custom_nodes", {}), dict):
        raise SnapshotError("Not a ComfyUI-Manager snapshot (expected an object with 'git_custom_nodes').")
    nodes = []
    for url, info in data.get("git_custom_nodes", {}).items():
        info = info if isinstance(info, dict) else {}
        nodes.append({"url": url, "commit": str(info.get("hash", "")), "disabled": bool(info.get("disabled"))})
    return nodes


def _log(report, message, level="INFO"):
    if report is not None:
        report.log(message, level)
