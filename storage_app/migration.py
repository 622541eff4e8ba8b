"""Migrating a single-instance install (the seed's ./data tree, or a plain ComfyUI folder) into the layout.

models -> shared/models/<folder>/, input -> shared/input/, custom_nodes, user, output -> instances/<id>/;
temp is not carried. The plan is computed before anything moves. Files are moved by rename on one filesystem;
across filesystems they are copied to a temporary name, verified by SHA-256, renamed into place, and only then
removed from the source. A journal (intent before, done after each file) makes a migration killed at any point
resumable: running it again finishes the job, and every file exists whole in the source or the destination.

A source that overlaps ComfyHub's own storage (a storage root, the data folder, the project folder) is refused
before anything is planned: from there every file would be its own "duplicate" and be deleted. The destinations
(the shared tree, the instance's folder) are written through `safefs` only: no link there is ever followed.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from . import layout, safefs

CARRIED = {
    "models": "shared-models", "input": "shared-input",
    "custom_nodes": "instance", "user": "instance", "output": "instance",
}
PARTIAL_SUFFIX = ".comfyhub-partial"
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".sft", ".gguf", ".pkl")
CHUNK = 4 << 20


class MigrationError(Exception):
    pass


@dataclass
class Entry:
    source: str
    destination: str
    size: int
    action: str  # move, copy, dedupe, rename
    group: str  # shared-models, shared-input, instance:<folder>


@dataclass
class Plan:
    source: str
    layout: str
    instance_id: str
    mode: str
    entries: list[Entry] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)
    not_carried: list[str] = field(default_factory=list)
    # What earlier runs of this source did (from its journal), or None when it was never migrated.
    previous: dict | None = None

    def totals(self) -> dict:
        totals: dict[str, dict] = {}
        for entry in self.entries:
            bucket = totals.setdefault(entry.group, {"files": 0, "bytes": 0, "deduplicated": 0, "renamed": 0})
            bucket["files"] += 1
            bucket["bytes"] += entry.size
            if entry.action == "dedupe":
                bucket["deduplicated"] += 1
            if entry.action == "rename":
                bucket["renamed"] += 1
        return totals

    def as_dict(self, limit: int | None = None) -> dict:
        """The plan as JSON; with `limit`, long lists are cut to that many items (their full counts are kept in
        files_total, conflicts_total and reports_total)."""
        cut = (lambda items: items[:limit]) if limit is not None else (lambda items: items)
        return {"source": self.source, "layout": self.layout, "instance_id": self.instance_id, "mode": self.mode,
                "totals": self.totals(), "conflicts": cut(self.conflicts), "reports": cut(self.reports),
                "not_carried": self.not_carried, "previous": self.previous,
                "files": cut([asdict(e) for e in self.entries]), "files_total": len(self.entries),
                "conflicts_total": len(self.conflicts), "reports_total": len(self.reports)}


# --- Where a source may be -------------------------------------------------------------------------------------

def protected_roots() -> list[tuple[str, Path, bool]]:
    """(what it is, path, whether a source inside it is refused too) for every folder a source must keep out of."""
    roots = [
        ("the shared library (COMFY_SHARED_PATH)", settings.COMFY_SHARED_PATH, True),
        ("the instances' folders (COMFY_INSTANCES_PATH)", settings.COMFY_INSTANCES_PATH, True),
        ("the snapshots folder (COMFY_BACKUPS_PATH)", settings.COMFY_BACKUPS_PATH, True),
        ("ComfyHub's data folder (COMFYHUB_DATA_DIR)", settings.DATA_DIR, True),
        # Inside the project folder is allowed: the single-instance setup kept its ./data there.
        ("ComfyHub's project folder", settings.BASE_DIR, False),
    ]
    try:
        from instances.models import Node

        for node in Node.objects.exclude(shared_path="", instances_path=""):
            if node.shared_path:
                roots.append((f"node {node.name}'s shared library", Path(node.shared_path), True))
            if node.instances_path:
                roots.append((f"node {node.name}'s instances' folders", Path(node.instances_path), True))
    except DatabaseError:
        pass  # no database yet: the configured roots still apply
    return roots


def _identity(path: Path):
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _chain(path: Path) -> set:
    """The identities of path's parents: a bind mount of a root is the same folder under another name."""
    return {ident for parent in path.parents if (ident := _identity(parent)) is not None}


def _overlap(source: Path, root: Path) -> str | None:
    root = Path(os.path.realpath(root))
    if source == root:
        return "is"
    if root in source.parents:
        return "is inside"
    if source in root.parents:
        return "contains"
    source_id, root_id = _identity(source), _identity(root)
    if source_id is None or root_id is None:
        return None
    if source_id == root_id:
        return "is"
    if root_id in _chain(source):
        return "is inside"
    if source_id in _chain(root):
        return "contains"
    return None


def check_source(source) -> Path:
    """The source folder, resolved once (every later step works on this path only), or MigrationError when it
    overlaps ComfyHub's storage or lies outside LEGACY_SOURCE_ROOTS. Whether the folder exists is not checked
    here."""
    text = os.fspath(source)
    if not text.strip() or any(ord(char) < 32 for char in text):
        raise MigrationError("Give the source as a folder path (no control characters, no line breaks).")
    given = Path(text).expanduser()
    if not given.is_absolute():
        given = Path.cwd() / given
    resolved = Path(os.path.realpath(given))
    shown = str(resolved) if resolved == Path(os.path.normpath(given)) else f"{given} (a link to {resolved})"
    for label, root, inside_too in protected_roots():
        relation = _overlap(resolved, root)
        if relation is None or (relation == "is inside" and not inside_too):
            continue
        raise MigrationError(
            f"{shown} {relation} {label}, {root}: ComfyHub migrates only from a folder outside its own storage "
            "(from there every file would count as a duplicate of itself and be deleted). Nothing was planned or "
            "moved. Give the old install's own folder, e.g. the ./data of the single-instance setup.")
    allowed = [Path(os.path.realpath(root)) for root in settings.LEGACY_SOURCE_ROOTS]
    if allowed and not any(resolved == root or root in resolved.parents for root in allowed):
        raise MigrationError(
            f"{shown} is outside the folders LEGACY_SOURCE_ROOTS allows ({', '.join(map(str, allowed))}). Move the "
            "old install into one of them, or add its folder to LEGACY_SOURCE_ROOTS.")
    return resolved


# --- The plan --------------------------------------------------------------------------------------------------

def source_folders(source: Path) -> tuple[str, dict[str, list[Path]]]:
    """Which folders of `source` hold what: {'models': [..], 'user': [..], ...}."""
    source = Path(source)
    if not source.is_dir():
        raise MigrationError(f"{source} is not a folder.")
    found: dict[str, list[Path]] = {}
    kind = "comfyui"
    candidates = [source]
    comfy = source / "comfy"
    if comfy.is_dir() and not comfy.is_symlink() and \
            any((comfy / name).is_dir() for name in (*CARRIED, "temp")):
        candidates = [comfy, source]
        kind = "legacy-data"
    for base in candidates:
        for name in (*CARRIED, "temp"):
            folder = base / name
            if folder.is_dir() and not folder.is_symlink():
                found.setdefault(name, []).append(folder)
    if not any(name in found for name in CARRIED):
        raise MigrationError(f"{source} holds none of models/, custom_nodes/, user/, input/, output/ (nor "
                             "comfy/<those>): not a ComfyUI install or a legacy data folder.")
    if kind == "comfyui" and (source / "comfy").is_dir() is False and (source / "main.py").exists() is False \
            and "models" not in found and "custom_nodes" not in found:
        kind = "legacy-data"
    return kind, found


def destination_root(name: str, instance_id: str) -> tuple[str, Path]:
    group = CARRIED[name]
    if group == "shared-models":
        return group, layout.shared_models_dir()
    if group == "shared-input":
        return group, layout.shared_input_dir()
    return f"instance:{name}", layout.instance_dir(instance_id) / name


def trusted_root(group: str, instance_id: str) -> Path:
    """The folder ComfyHub made whose parents no container can change: every destination of `group` is reached
    from it through safefs, one component at a time, never following a link."""
    if group.startswith("instance:"):
        return layout.instance_dir(instance_id)
    return layout.shared_root()


def make_plan(source: Path, *, instance_id: str, mode: str = "move") -> Plan:
    if mode not in ("move", "copy"):
        raise MigrationError(f"Unknown mode '{mode}'; use move or copy.")
    problem = layout.instance_id_problem(instance_id)
    if problem:
        raise MigrationError(f"Invalid instance id '{instance_id}': {problem}")
    source = check_source(source)
    previous = journal_summary(source)
    if previous and previous["unfinished"] and (previous["instance_id"], previous["mode"]) != (instance_id, mode):
        raise MigrationError(
            f"An interrupted migration of {source} into instance '{previous['instance_id']}' ({previous['mode']}) is "
            f"unfinished; run it again with --instance-id {previous['instance_id']} --mode {previous['mode']} (the "
            "same choices on the page) to finish it first.")
    try:
        kind, folders = source_folders(source)
    except MigrationError:
        if previous is None:
            raise
        # An earlier run carried everything already (and maybe was stopped before it said so): nothing is left
        # to plan, and running it finishes what that run left.
        kind, folders = previous.get("layout") or "migrated", {}
    plan = Plan(source=str(source), layout=kind, instance_id=instance_id, mode=mode, previous=previous)
    if "temp" in folders:
        plan.not_carried += [str(f) for f in folders["temp"]]
    claimed: set[str] = set()
    for name in CARRIED:
        group, dest_root = destination_root(name, instance_id)
        root = trusted_root(group, instance_id)
        for folder in folders.get(name, []):
            for path, info in _walk(folder, plan):
                relative = path.relative_to(folder)
                if name == "custom_nodes" and path.suffix.lower() in MODEL_SUFFIXES:
                    plan.reports.append({"kind": "model inside custom_nodes", "path": str(path),
                                         "note": "carried with its node; move it to the shared library by hand if "
                                                 "other instances should see it"})
                destination = dest_root / relative
                entry = _plan_file(path, info, root, destination, group, mode, plan, claimed)
                if entry is not None:
                    claimed.add(entry.destination)
                    plan.entries.append(entry)
    return plan


def _walk(folder: Path, plan: Plan):
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in sorted(dirnames):
            full = Path(dirpath) / name
            if full.is_symlink():
                plan.conflicts.append({"kind": "symlink", "path": str(full), "target": os.readlink(full),
                                       "resolution": "reported, not followed"})
        dirnames[:] = sorted(d for d in dirnames if not (Path(dirpath) / d).is_symlink() and d != "__pycache__")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(PARTIAL_SUFFIX):
                continue
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                plan.conflicts.append({"kind": "symlink", "path": str(path), "target": os.readlink(path),
                                       "resolution": "reported, not followed"})
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            if not os.access(path, os.R_OK) or _unreadable(path):
                plan.conflicts.append({"kind": "unreadable", "path": str(path),
                                       "resolution": "left in place; fix its permissions and run again"})
                continue
            yield path, info


def _unreadable(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
        return False
    except PermissionError:
        return True


def _plan_file(path: Path, info, root: Path, destination: Path, group: str, mode: str, plan: Plan,
               claimed: set) -> Entry | None:
    action = mode
    try:
        existing = safefs.lstat(root, safefs.relative_to_root(root, destination))
        if existing is not None and stat.S_ISLNK(existing.st_mode):
            raise safefs.UnsafePathError(
                f"{destination} is a link; ComfyHub never writes through a link in its storage. Remove it "
                f"(rm '{destination}') and run the migration again.", destination)
        same = existing is not None and stat.S_ISREG(existing.st_mode) and existing.st_size == info.st_size and \
            sha256_at(root, destination) == sha256_of(path)
    except safefs.UnsafePathError as exc:
        plan.conflicts.append({"kind": "link in the destination", "path": str(path), "destination": str(destination),
                               "resolution": f"refused, left in place: {exc}"})
        return None
    except OSError as exc:
        plan.conflicts.append({"kind": "destination unreadable", "path": str(path), "destination": str(destination),
                               "resolution": f"left in place: {exc.strerror} ({exc.filename}); fix that and run "
                                             "again"})
        return None
    if existing is not None:
        if same:
            action = "dedupe"
            plan.conflicts.append({"kind": "same content already there", "path": str(path),
                                   "destination": str(destination), "resolution": "deduplicated: nothing copied"})
        else:
            renamed = _free_name(root, destination, claimed)
            plan.conflicts.append({"kind": "different content already there", "path": str(path),
                                   "destination": str(destination), "renamed_to": str(renamed),
                                   "resolution": "kept both: the incoming file is renamed"})
            destination, action = renamed, "rename"
    elif str(destination) in claimed:
        renamed = _free_name(root, destination, claimed)
        plan.conflicts.append({"kind": "two sources for one destination", "path": str(path),
                               "destination": str(destination), "renamed_to": str(renamed),
                               "resolution": "kept both: the later file is renamed"})
        destination, action = renamed, "rename"
    return Entry(source=str(path), destination=str(destination), size=info.st_size, action=action, group=group)


def _free_name(root: Path, destination: Path, claimed: set) -> Path:
    stem, suffix = destination.stem, destination.suffix
    for number in range(1, 10_000):
        label = "legacy" if number == 1 else f"legacy {number}"
        candidate = destination.with_name(f"{stem} ({label}){suffix}")
        if safefs.lstat(root, safefs.relative_to_root(root, candidate)) is None and str(candidate) not in claimed:
            return candidate
    raise MigrationError(f"No free name for {destination}.")


def sha256_of(path: Path) -> str:
    from .hashing import hash_file

    return hash_file(path).sha256


def sha256_at(root: Path, path: Path) -> str:
    """The SHA-256 of a file in a hostile tree, read without following any link."""
    fd = safefs.open_file(root, safefs.relative_to_root(root, path))
    try:
        return _sha256_fd(fd)
    finally:
        os.close(fd)


def _sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


# --- The journal -----------------------------------------------------------------------------------------------

def journal_dir(source: str) -> Path:
    key = hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:16]
    return settings.DATA_DIR / "migrations" / key


def _records(path: Path):
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                yield json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill


def journal_summary(source: Path) -> dict | None:
    """What earlier runs of this source did, from its journal: files carried, whether the last run finished, and
    the instance and mode it ran with. None when this source was never migrated."""
    path = journal_dir(str(source)) / "journal.jsonl"
    if not os.path.exists(path):  # also when this process may not look into the data folder
        return None
    summary = {"journal": str(path), "files_done": 0, "unfinished": False, "instance_id": "", "mode": "",
               "layout": "", "started_at": "", "finished_at": ""}
    open_intents = set()
    for record in _records(path):
        op = record.get("op")
        if op == "start":
            summary.update(unfinished=True, instance_id=record.get("instance_id", ""), mode=record.get("mode", ""),
                           layout=record.get("layout", ""), started_at=record.get("at", ""))
        elif op == "intent":
            open_intents.add(record.get("source"))
        elif op in ("done", "refused", "recovered"):
            open_intents.discard(record.get("source"))
            if op == "done":
                summary["files_done"] += 1
        elif op == "finished":
            summary.update(unfinished=False, finished_at=record.get("at", ""))
    summary["unfinished"] = summary["unfinished"] or bool(open_intents)
    return summary


class Journal:
    """Append-only JSON lines, fsynced: an 'intent' before touching a file, 'done' after."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "journal.jsonl"
        self.handle = open(self.path, "a", encoding="utf-8")

    def write(self, **record):
        self.handle.write(json.dumps({"at": timezone.now().isoformat(), **record}) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def unfinished(self) -> list[dict]:
        intents, closed = {}, set()
        for record in _records(self.path):
            if record.get("op") == "intent":
                intents[record["source"]] = record
                closed.discard(record["source"])
            elif record.get("op") in ("done", "refused", "recovered"):
                closed.add(record["source"])
        return [record for source, record in intents.items() if source not in closed]

    def close(self):
        self.handle.close()


# --- Carrying it out -------------------------------------------------------------------------------------------

def _same_file(source: Path, root: Path, destination: Path) -> bool:
    """Whether source and destination are one file (one path, or one inode under two names: a bind mount, a hard
    link). Deleting such a "source" would delete its only copy."""
    if os.path.realpath(source) == os.path.realpath(destination):
        return True
    try:
        there = safefs.lstat(root, safefs.relative_to_root(root, destination))
        here = os.lstat(source)
    except (OSError, safefs.UnsafePathError):
        return False
    return there is not None and (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _refuse_self(source: Path, root: Path, destination: Path):
    if _same_file(source, root, destination):
        raise MigrationError(
            f"Refusing to delete {source}: it is the same file as its destination {destination}, so the source "
            "overlaps ComfyHub's storage (the same folder under another name: a link or a bind mount). Nothing was "
            "deleted. Migrate from the old install's own folder.")


def recover(journal: Journal, report=None) -> int:
    """Finish or undo what a killed run left half-done; returns how many files needed it."""
    count = 0
    for record in journal.unfinished():
        source, destination = Path(record["source"]), Path(record["destination"])
        root = Path(record["root"]) if record.get("root") else destination.parent
        try:
            with safefs.parent_of(root, safefs.relative_to_root(root, destination)) as (fd, _name):
                if record.get("partial"):
                    try:
                        os.unlink(Path(record["partial"]).name, dir_fd=fd)  # a copy cut short: the source is whole
                    except FileNotFoundError:
                        pass
            if record["mode"] in ("move", "rename") and source.exists() and \
                    safefs.lstat(root, safefs.relative_to_root(root, destination)) is not None:
                _refuse_self(source, root, destination)
                if sha256_at(root, destination) == sha256_of(source):
                    source.unlink()  # copied and verified, killed before the source was removed
        except FileNotFoundError:
            pass  # the destination's folder is gone: nothing half-done is left there
        except safefs.UnsafePathError as exc:
            if report is not None:
                report.log(f"left {source} in place: {exc}", "WARNING")
        count += 1
        journal.write(op="recovered", source=str(source), destination=str(destination))
        if report is not None:
            report.log(f"recovered {source} after an interrupted run")
    return count


def execute(plan: Plan, report=None) -> dict:
    folder = journal_dir(plan.source)
    journal = Journal(folder)
    try:
        recovered = recover(journal, report)
        journal.write(op="start", instance_id=plan.instance_id, mode=plan.mode, layout=plan.layout,
                      files=len(plan.entries))
        done = {"moved": 0, "copied": 0, "deduplicated": 0, "renamed": 0, "bytes": 0, "recovered": recovered,
                "refused": []}
        total = sum(e.size for e in plan.entries) or 1
        moved_bytes = 0
        move = plan.mode == "move"
        for number, entry in enumerate(plan.entries, 1):
            source, destination = Path(entry.source), Path(entry.destination)
            if not source.exists():
                continue  # finished by recovery
            root = trusted_root(entry.group, plan.instance_id)
            try:
                _refuse_self(source, root, destination)
                if entry.action == "dedupe":
                    journal.write(op="intent", source=entry.source, destination=entry.destination, mode="dedupe",
                                  root=str(root))
                    _check_duplicate(source, root, destination)
                    if move:
                        source.unlink()
                    journal.write(op="done", source=entry.source, destination=entry.destination, mode="dedupe")
                    done["deduplicated"] += 1
                    continue
                _carry(source, root, destination, move=move, chown=entry.group.startswith("instance:"),
                       journal=journal)
            except safefs.UnsafePathError as exc:
                journal.write(op="refused", source=entry.source, destination=entry.destination, reason=str(exc))
                done["refused"].append({"path": entry.source, "destination": entry.destination, "reason": str(exc)})
                if report is not None:
                    report.log(f"left {source} in place: {exc}", "WARNING")
                continue
            journal.write(op="done", source=entry.source, destination=entry.destination, mode=plan.mode)
            done["renamed" if entry.action == "rename" else ("moved" if move else "copied")] += 1
            done["bytes"] += entry.size
            moved_bytes += entry.size
            if report is not None:
                report.progress(100 * moved_bytes / total, f"{number} of {len(plan.entries)} files")
        if move:
            _remove_empty_folders(Path(plan.source))
        summary = {"finished_at": timezone.now().isoformat(), "plan": plan.as_dict(), "done": done}
        summary["plan"].pop("files")
        (folder / "report.json").write_text(json.dumps(summary, indent=2))
        journal.write(op="finished")
        return {**done, "journal": str(journal.path), "report": str(folder / "report.json"),
                "previous": plan.previous}
    finally:
        journal.close()


def _check_duplicate(source: Path, root: Path, destination: Path):
    """The destination is still the twin the plan found: a file of the same size (its content was compared when
    planning, moments ago)."""
    there = safefs.lstat(root, safefs.relative_to_root(root, destination))
    if there is None or not stat.S_ISREG(there.st_mode) or there.st_size != os.stat(source).st_size:
        raise MigrationError(f"{destination} changed since the plan was made; nothing was removed from "
                             f"{source}. Run the migration again.")


def _carry(source: Path, root: Path, destination: Path, *, move: bool, chown: bool, journal: Journal):
    """Into root/<destination>: a rename on one filesystem, else an exclusive temporary copy verified by SHA-256 and
    renamed into place; neither follows a link in the destination, nor replaces anything there."""
    relpath = PurePosixPath(safefs.relative_to_root(root, destination))
    parent = "" if str(relpath.parent) == "." else relpath.parent
    common = {"source": str(source), "destination": str(destination), "root": str(root)}
    with safefs.opened_dir(root, parent, create=True, chown=chown) as dst_fd, \
            _opened(source.parent) as src_fd:
        if move:
            journal.write(op="intent", mode="move", **common)
            try:
                safefs.rename_noreplace(src_fd, source.name, dst_fd, relpath.name)
                _chown_entry(dst_fd, relpath.name, chown)
                return
            except FileExistsError:
                raise _appeared(source, destination) from None
            except OSError as exc:
                if exc.errno != errno.EXDEV:  # another filesystem: copy instead; anything else is a real error
                    raise
        partial = f".comfyhub-{secrets.token_hex(8)}{PARTIAL_SUFFIX}"
        journal.write(op="intent", mode="move" if move else "copy", partial=partial, **common)
        writer = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dst_fd)
        try:
            reader = os.open(source.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
            try:
                digest = hashlib.sha256()
                while chunk := os.read(reader, CHUNK):
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(writer, view):]
                info = os.fstat(reader)
            finally:
                os.close(reader)
            os.fchmod(writer, stat.S_IMODE(info.st_mode))
            os.utime(writer, ns=(info.st_atime_ns, info.st_mtime_ns))
            if chown:
                safefs.chown_fd(writer)
            os.fsync(writer)
            if _sha256_fd(writer) != digest.hexdigest():
                raise MigrationError(f"The copy of {source} did not verify; nothing was removed. Run again.")
            try:
                safefs.rename_noreplace(dst_fd, partial, dst_fd, relpath.name)  # never replaces what appeared
            except FileExistsError:
                raise _appeared(source, destination) from None
            partial = None
        finally:
            os.close(writer)
            if partial is not None:
                os.unlink(partial, dir_fd=dst_fd)
        if move:
            os.unlink(source.name, dir_fd=src_fd)


def _appeared(source: Path, destination: Path) -> MigrationError:
    return MigrationError(f"{destination} appeared while migrating; {source} was left in place. Run the migration "
                          "again: the new plan keeps both.")


@contextmanager
def _opened(folder: Path):
    """The source's own folder (outside ComfyHub's storage, checked when planning), by descriptor."""
    fd = os.open(folder, safefs.DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


def _chown_entry(dir_fd: int, name: str, chown: bool):
    if chown and os.geteuid() == 0:
        os.chown(name, settings.PUID, settings.PGID, dir_fd=dir_fd, follow_symlinks=False)


def _remove_empty_folders(root: Path):
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        path = Path(dirpath)
        if path != root and not os.listdir(path) and not path.is_symlink():
            path.rmdir()
