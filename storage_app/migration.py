"""Migrating a single-instance install (the seed's ./data tree, or a plain ComfyUI folder) into the layout.

models -> shared/models/<folder>/, input -> shared/input/, custom_nodes, user, output -> instances/<id>/;
temp is not carried. The plan is computed before anything moves. Files are moved by rename on one filesystem;
across filesystems they are copied to a temporary name, verified by SHA-256, renamed into place, and only then
removed from the source. A journal (intent before, done after each file) makes a migration killed at any point
resumable: running it again finishes the job, and every file exists whole in the source or the destination.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from . import layout

CARRIED = {
    "models": "shared-models", "input": "shared-input",
    "custom_nodes": "instance", "user": "instance", "output": "instance",
}
PARTIAL_SUFFIX = ".comfyhub-partial"
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".sft", ".gguf", ".pkl")


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

    def as_dict(self) -> dict:
        return {"source": self.source, "layout": self.layout, "instance_id": self.instance_id, "mode": self.mode,
                "totals": self.totals(), "conflicts": self.conflicts, "reports": self.reports,
                "not_carried": self.not_carried, "files": [asdict(e) for e in self.entries]}


def source_folders(source: Path) -> tuple[str, dict[str, list[Path]]]:
    """Which folders of `source` hold what: {'models': [..], 'user': [..], ...}."""
    source = Path(source)
    if not source.is_dir():
        raise MigrationError(f"{source} is not a folder.")
    found: dict[str, list[Path]] = {}
    kind = "comfyui"
    candidates = [source]
    if (source / "comfy").is_dir() and any((source / "comfy" / name).is_dir() for name in (*CARRIED, "temp")):
        candidates = [source / "comfy", source]
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


def make_plan(source: Path, *, instance_id: str, mode: str = "move") -> Plan:
    if mode not in ("move", "copy"):
        raise MigrationError(f"Unknown mode '{mode}'; use move or copy.")
    problem = layout.instance_id_problem(instance_id)
    if problem:
        raise MigrationError(f"Invalid instance id '{instance_id}': {problem}")
    source = Path(source).resolve()
    kind, folders = source_folders(source)
    plan = Plan(source=str(source), layout=kind, instance_id=instance_id, mode=mode)
    if "temp" in folders:
        plan.not_carried += [str(f) for f in folders["temp"]]
    claimed: set[str] = set()
    for name in CARRIED:
        group, dest_root = destination_root(name, instance_id)
        for folder in folders.get(name, []):
            for path, info in _walk(folder, plan):
                relative = path.relative_to(folder)
                if name == "custom_nodes" and path.suffix.lower() in MODEL_SUFFIXES:
                    plan.reports.append({"kind": "model inside custom_nodes", "path": str(path),
                                         "note": "carried with its node; move it to the shared library by hand if "
                                                 "other instances should see it"})
                destination = dest_root / relative
                entry = _plan_file(path, info, destination, group, mode, plan, claimed)
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


def _plan_file(path: Path, info, destination: Path, group: str, mode: str, plan: Plan, claimed: set) -> Entry | None:
    action = mode
    if os.path.lexists(destination):
        if destination.is_file() and not destination.is_symlink() and \
                destination.stat().st_size == info.st_size and sha256_of(destination) == sha256_of(path):
            action = "dedupe"
            plan.conflicts.append({"kind": "same content already there", "path": str(path),
                                   "destination": str(destination), "resolution": "deduplicated: nothing copied"})
        else:
            renamed = _free_name(destination, claimed)
            plan.conflicts.append({"kind": "different content already there", "path": str(path),
                                   "destination": str(destination), "renamed_to": str(renamed),
                                   "resolution": "kept both: the incoming file is renamed"})
            destination, action = renamed, "rename"
    elif str(destination) in claimed:
        renamed = _free_name(destination, claimed)
        plan.conflicts.append({"kind": "two sources for one destination", "path": str(path),
                               "destination": str(destination), "renamed_to": str(renamed),
                               "resolution": "kept both: the later file is renamed"})
        destination, action = renamed, "rename"
    return Entry(source=str(path), destination=str(destination), size=info.st_size, action=action, group=group)


def _free_name(destination: Path, claimed: set) -> Path:
    stem, suffix = destination.stem, destination.suffix
    for number in range(1, 10_000):
        label = "legacy" if number == 1 else f"legacy {number}"
        candidate = destination.with_name(f"{stem} ({label}){suffix}")
        if not os.path.lexists(candidate) and str(candidate) not in claimed:
            return candidate
    raise MigrationError(f"No free name for {destination}.")


def sha256_of(path: Path) -> str:
    from .hashing import hash_file

    return hash_file(path).sha256


# --- Carrying it out -------------------------------------------------------------------------------------------

def journal_dir(source: str) -> Path:
    key = hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:16]
    return settings.DATA_DIR / "migrations" / key


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
        intents, done = {}, set()
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if record.get("op") == "intent":
                    intents[record["source"]] = record
                elif record.get("op") == "done":
                    done.add(record["source"])
        return [record for source, record in intents.items() if source not in done]

    def close(self):
        self.handle.close()


def recover(journal: Journal, report=None) -> int:
    """Finish or undo what a killed run left half-done; returns how many files needed it."""
    count = 0
    for record in journal.unfinished():
        source, destination = Path(record["source"]), Path(record["destination"])
        partial = Path(record.get("partial") or f"{destination}{PARTIAL_SUFFIX}")
        if partial.exists():
            partial.unlink()  # a copy cut short: the source is still whole
        if destination.exists() and source.exists() and record["mode"] in ("move", "rename") and \
                sha256_of(destination) == sha256_of(source):
            source.unlink()  # copied and verified, killed before the source was removed
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
        done = {"moved": 0, "copied": 0, "deduplicated": 0, "renamed": 0, "bytes": 0, "recovered": recovered}
        total = sum(e.size for e in plan.entries) or 1
        moved_bytes = 0
        for number, entry in enumerate(plan.entries, 1):
            source, destination = Path(entry.source), Path(entry.destination)
            if not source.exists():
                continue  # finished by recovery
            move = plan.mode == "move"
            if entry.action == "dedupe":
                journal.write(op="intent", source=entry.source, destination=entry.destination, mode="dedupe")
                if move:
                    source.unlink()
                journal.write(op="done", source=entry.source)
                done["deduplicated"] += 1
                continue
            partial = destination.with_name(destination.name + PARTIAL_SUFFIX)
            journal.write(op="intent", source=entry.source, destination=entry.destination,
                          mode="move" if move else "copy", partial=str(partial))
            _carry(source, destination, partial, move=move)
            journal.write(op="done", source=entry.source)
            done["renamed" if entry.action == "rename" else ("moved" if move else "copied")] += 1
            done["bytes"] += entry.size
            moved_bytes += entry.size
            if report is not None:
                report.progress(100 * moved_bytes / total, f"{number} of {len(plan.entries)} files")
        if plan.mode == "move":
            _remove_empty_folders(Path(plan.source))
        summary = {"finished_at": timezone.now().isoformat(), "plan": plan.as_dict(), "done": done}
        summary["plan"].pop("files")
        (folder / "report.json").write_text(json.dumps(summary, indent=2))
        journal.write(op="finished")
        return {**done, "journal": str(journal.path), "report": str(folder / "report.json")}
    finally:
        journal.close()


def _carry(source: Path, destination: Path, partial: Path, *, move: bool):
    destination.parent.mkdir(parents=True, exist_ok=True)
    if move:
        try:
            os.link(source, destination)  # same filesystem: never overwrites, instant whatever the size
            os.unlink(source)
            return
        except OSError as exc:
            if exc.errno != 18:  # EXDEV: another filesystem; anything else is a real error
                raise
    with open(source, "rb") as reader, open(partial, "wb") as writer:
        shutil.copyfileobj(reader, writer, 4 << 20)
        writer.flush()
        os.fsync(writer.fileno())
    shutil.copystat(source, partial)
    if sha256_of(partial) != sha256_of(source):
        partial.unlink()
        raise MigrationError(f"The copy of {source} did not verify; nothing was removed. Run again.")
    os.link(partial, destination)  # never replaces a file that appeared meanwhile
    partial.unlink()
    if move:
        source.unlink()


def _remove_empty_folders(root: Path):
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        path = Path(dirpath)
        if path != root and not os.listdir(path) and not path.is_symlink():
            path.rmdir()


def chown_destinations(plan: Plan):
    if os.geteuid() != 0:
        return
    for entry in plan.entries:
        path = Path(entry.destination)
        if path.exists():
            os.chown(path, settings.PUID, settings.PGID, follow_symlinks=False)
