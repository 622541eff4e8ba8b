"""The shared model library: scanning it, verifying its checksums, and what instances see of it.

Walks never follow a symbolic link out of the library; every file that cannot be handled is recorded with a reason
and the walk goes on.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from stat import S_ISLNK, S_ISREG
import threading
import time
from concurrent.futures import ALL_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from comfyhub.cli import human_size
from comfyhub.operations import NullReport

from . import hashing, layout, safefs
from .models import ModelAsset

# ComfyUI's model file extensions (folder_paths.supported_pt_extensions) and GGUF, which popular nodes load.
MODEL_EXTENSIONS = frozenset({".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft", ".gguf"})
CONFIG_EXTENSIONS = frozenset({".yaml", ".yml", ".json"})
# Sub-folders of models/ that ComfyUI searches for a folder key other than their own name.
FOLDER_ALIASES = {**layout.LEGACY_FOLDERS, "t2i_adapter": "controlnet"}
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def folder_of(relpath: str) -> str:
    top = relpath.split("/", 1)[0] if "/" in relpath else ""
    return FOLDER_ALIASES.get(top, top) or "(top level)"


def is_model_file(relpath: str) -> bool:
    suffix = os.path.splitext(relpath)[1].lower()
    if suffix in MODEL_EXTENSIONS:
        return True
    return relpath.startswith("configs/") and suffix in CONFIG_EXTENSIONS


@dataclass
class Found:
    relpath: str
    path: str
    stat: os.stat_result | None = None
    problem: str = ""


def walk(root: Path):
    """Model files under `root`: (relpath, path, stat) or a problem. Links may point anywhere inside the library;
    links out of it, broken links and loops are problems; linked folders are not descended (loops, escapes)."""
    root = Path(root)
    if not root.is_dir():
        return
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=None):
        dirnames.sort()
        for name in sorted(filenames) + sorted(d for d in dirnames if os.path.islink(os.path.join(dirpath, d))):
            path = os.path.join(dirpath, name)
            relpath = os.path.relpath(path, root).replace(os.sep, "/")
            try:
                relpath.encode("utf-8")
            except UnicodeEncodeError:
                shown = os.fsencode(relpath).decode("utf-8", errors="backslashreplace")
                yield Found(shown, path, problem="the file name is not valid UTF-8; rename it so ComfyUI and "
                                                 "ComfyHub can show it")
                continue
            if not is_model_file(relpath) and not os.path.isdir(path):
                continue
            if os.path.islink(path):
                try:
                    target = os.path.realpath(path, strict=True)
                except OSError as exc:
                    reason = "a symbolic link loop" if "loop" in str(exc).lower() or exc.errno == 40 else \
                        "a broken symbolic link"
                    yield Found(relpath, path, problem=reason)
                    continue
                if os.path.commonpath([target, real_root]) != real_root:
                    yield Found(relpath, path, problem=f"a symbolic link pointing outside the library ({target}); "
                                                       "not followed")
                    continue
                if os.path.isdir(target):
                    continue  # a linked folder inside the library: its files are found where they really are
            try:
                stat = os.stat(path)
            except PermissionError:
                yield Found(relpath, path, problem="permission denied")
                continue
            except FileNotFoundError:
                continue  # vanished between listing and stat
            yield Found(relpath, path, stat=stat)


@dataclass
class ScanResult:
    new: int = 0
    changed: int = 0
    missing: int = 0
    unchanged: int = 0
    problems: list = field(default_factory=list)


def scan(report=None, root: Path | None = None) -> ScanResult:
    """Record new, changed (size or mtime differ) and missing files; read safetensors headers of new/changed ones."""
    report = report or NullReport()
    root = Path(root or layout.shared_models_dir())
    now = timezone.now()
    result = ScanResult()
    known = {asset.path: asset for asset in ModelAsset.objects.all()}
    seen = set()
    unchanged = []
    for found in walk(root):
        seen.add(found.relpath)
        asset = known.get(found.relpath)
        if found.problem:
            result.problems.append((found.relpath, found.problem))
            report.log(f"{found.relpath}: {found.problem}", "WARNING")
            if asset is None:
                asset = ModelAsset(path=found.relpath, folder=folder_of(found.relpath))
            asset.status, asset.status_reason, asset.last_seen_at = ModelAsset.Status.UNREADABLE, found.problem, now
            asset.save()
            continue
        st = found.stat
        if asset is None:
            asset = ModelAsset(path=found.relpath, folder=folder_of(found.relpath), size=st.st_size,
                               mtime_ns=st.st_mtime_ns, inode=st.st_ino, status=ModelAsset.Status.NEW,
                               first_seen_at=now, last_seen_at=now)
            _read_header(asset, found.path, report)
            asset.save()
            result.new += 1
            report.log(f"new: {found.relpath} ({st.st_size} bytes)")
            continue
        same = (asset.size, asset.mtime_ns, asset.inode) == (st.st_size, st.st_mtime_ns, st.st_ino)
        if same and asset.status not in (ModelAsset.Status.MISSING, ModelAsset.Status.UNREADABLE):
            result.unchanged += 1
            unchanged.append(asset.pk)
            continue
        asset.size, asset.mtime_ns, asset.inode, asset.last_seen_at = st.st_size, st.st_mtime_ns, st.st_ino, now
        asset.status = ModelAsset.Status.CHANGED if asset.sha256 else ModelAsset.Status.NEW
        asset.status_reason = "size or modification time changed since it was hashed" if asset.sha256 else ""
        _read_header(asset, found.path, report)
        asset.save()
        result.changed += 1
        report.log(f"changed: {found.relpath}")
    with transaction.atomic():
        for start in range(0, len(unchanged), 900):
            ModelAsset.objects.filter(pk__in=unchanged[start:start + 900]).update(last_seen_at=now)
    gone = [path for path in known if path not in seen and known[path].status != ModelAsset.Status.MISSING]
    ModelAsset.objects.filter(path__in=gone).update(status=ModelAsset.Status.MISSING,
                                                    status_reason="not found in the library by the last scan")
    result.missing = len(gone)
    for path in gone:
        report.log(f"missing: {path}", "WARNING")
    return result


def _read_header(asset: ModelAsset, path: str, report):
    if not asset.path.lower().endswith((".safetensors", ".sft")):
        return
    try:
        header = hashing.read_safetensors_header(path)
    except (OSError, hashing.HeaderError) as exc:
        asset.metadata, asset.architecture = {}, "unknown"
        report.log(f"{asset.path}: cannot read the safetensors header: {exc}", "WARNING")
        return
    asset.metadata = header.metadata
    asset.architecture = hashing.guess_architecture(header)


# --- Verification --------------------------------------------------------------------------------------------

@dataclass
class VerifyResult:
    hashed: int = 0
    skipped: int = 0
    bytes: int = 0
    mismatches: list = field(default_factory=list)
    problems: list = field(default_factory=list)


def verify(report=None, *, full: bool = False, root: Path | None = None, workers: int | None = None,
           with_blake3: bool | None = None) -> VerifyResult:
    """Hash what needs hashing (everything with `full`), spread over the cores, and record the outcome."""
    report = report or NullReport()
    root = Path(root or layout.shared_models_dir())
    with_blake3 = settings.MODEL_HASH_BLAKE3 if with_blake3 is None else with_blake3
    result = VerifyResult()
    todo = []
    real_root = os.path.realpath(root)
    folders_inside: dict[str, bool] = {}
    fields = ("id", "path", "sha256", "hashed_size", "hashed_mtime_ns", "hashed_inode")
    for row in ModelAsset.objects.exclude(status=ModelAsset.Status.MISSING).values_list(*fields):
        pk, relpath, sha256, hashed_size, hashed_mtime_ns, hashed_inode = row
        path = os.path.join(root, relpath)
        try:
            stat = os.lstat(path)
            if S_ISLNK(stat.st_mode):  # a link is read only if it stays inside the library
                if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
                    continue  # the scan recorded why: never read what it points at
                stat = os.stat(path)
        except OSError:
            continue  # the next scan records it as missing/unreadable; hashing it would say the same
        folder = os.path.dirname(path)
        if folder not in folders_inside:  # a folder swapped for a link since the scan
            folders_inside[folder] = os.path.commonpath([os.path.realpath(folder), real_root]) == real_root
        if not folders_inside[folder]:
            continue
        unchanged = sha256 and (hashed_size, hashed_mtime_ns, hashed_inode) == (stat.st_size, stat.st_mtime_ns,
                                                                             stat.st_ino)
        if full or not unchanged:
            todo.append((pk, path, stat))
        else:
            result.skipped += 1
    todo.sort(key=lambda item: -item[2].st_size)  # big files first: the cores stay busy to the end
    assets = ModelAsset.objects.in_bulk([pk for pk, _, _ in todo])
    total = sum(stat.st_size for _, _, stat in todo)
    report.log(f"{len(todo)} file(s) to hash ({human_size(total)}), {result.skipped} unchanged since last verified")

    progress = _Progress(total)
    cancelled = threading.Event()
    workers = workers or settings.MODEL_HASH_WORKERS or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hash") as pool:
        futures = {
            pool.submit(hashing.hash_file, path, with_blake3=with_blake3, on_bytes=progress.add,
                        cancelled=cancelled): assets[pk]
            for pk, path, _ in todo
        }
        pending = set(futures)
        try:
            while pending:
                # Whatever finished within half a second is recorded together.
                done, pending = wait(pending, timeout=0.5, return_when=ALL_COMPLETED)
                # One transaction per batch, not one commit per file.
                with transaction.atomic():
                    for future in done:
                        _record(futures[future], future, result, report)
                report.progress(progress.percent, progress.describe())
        except BaseException:
            cancelled.set()
            raise
    result.bytes = progress.done
    return result


def _record(asset: ModelAsset, future, result: VerifyResult, report):
    now = timezone.now()
    try:
        digest = future.result()
    except FileNotFoundError:
        asset.status, asset.status_reason = ModelAsset.Status.MISSING, "vanished while it was being verified"
    except PermissionError:
        asset.status, asset.status_reason = ModelAsset.Status.UNREADABLE, "permission denied"
    except hashing.FileChangedWhileReading as exc:
        asset.status, asset.status_reason = ModelAsset.Status.UNREADABLE, str(exc)
    except OSError as exc:
        asset.status, asset.status_reason = ModelAsset.Status.UNREADABLE, f"read error: {exc.strerror or exc}"
    else:
        result.hashed += 1
        previous = asset.sha256
        unchanged_outside = (asset.hashed_size, asset.hashed_mtime_ns) == (digest.size, digest.mtime_ns)
        asset.sha256 = digest.sha256
        asset.blake3 = digest.blake3 or asset.blake3
        asset.size, asset.mtime_ns, asset.inode = digest.size, digest.mtime_ns, digest.inode
        asset.hashed_size, asset.hashed_mtime_ns, asset.hashed_inode = digest.size, digest.mtime_ns, digest.inode
        asset.last_verified_at = now
        if previous and previous != digest.sha256 and unchanged_outside:
            asset.status = ModelAsset.Status.MISMATCH
            asset.status_reason = ("its content changed although its size and modification time did not: "
                                   "silent corruption, or a tool that hides its writes")
            asset.evidence = [*asset.evidence, {"at": now.isoformat(), "kind": "silent change",
                                                "old_sha256": previous, "new_sha256": digest.sha256}]
        elif asset.expected_sha256 and asset.expected_sha256 != digest.sha256:
            asset.status = ModelAsset.Status.MISMATCH
            asset.status_reason = f"differs from the expected hash ({asset.get_expected_source_display()})"
            asset.evidence = [*asset.evidence, {"at": now.isoformat(), "kind": "expected hash",
                                                "expected_sha256": asset.expected_sha256,
                                                "new_sha256": digest.sha256}]
        elif asset.expected_sha256:
            asset.status, asset.status_reason = ModelAsset.Status.VERIFIED, ""
        else:
            asset.status, asset.status_reason = ModelAsset.Status.UNVERIFIED, "no expected hash to compare with"
        if asset.status == ModelAsset.Status.MISMATCH:
            result.mismatches.append(asset.path)
            report.log(f"MISMATCH {asset.path}: {asset.status_reason}", "ERROR")
    if asset.status in (ModelAsset.Status.MISSING, ModelAsset.Status.UNREADABLE):
        result.problems.append((asset.path, asset.status_reason))
        report.log(f"{asset.path}: {asset.status_reason}", "WARNING")
    asset.save()


class _Progress:
    def __init__(self, total):
        self.total, self.done, self.started = total, 0, time.monotonic()
        self.lock = threading.Lock()

    def add(self, count):
        with self.lock:
            self.done += count

    @property
    def percent(self):
        return 100 * self.done / self.total if self.total else 100

    def describe(self):
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate else 0
        return f"{human_size(self.done)} of {human_size(self.total)}, {human_size(rate)}/s, ETA {int(eta)} s"


# --- One node's copy of the library ----------------------------------------------------------------------------

class NodeVerifyError(Exception):
    """The node's library cannot be checked at all; the message says why and what to do."""


@dataclass
class NodeVerifyResult:
    checked: int = 0
    hashed: int = 0
    skipped: int = 0  # unchanged since its last check, against the same library hash
    bytes: int = 0
    unhashed: int = 0  # library files with no SHA-256 yet: nothing to compare a node's copy with
    counts: dict = field(default_factory=dict)  # status -> files
    problems: list = field(default_factory=list)  # [path, status, detail], problems only

    def as_dict(self, limit: int = 500) -> dict:
        return {"checked": self.checked, "hashed": self.hashed, "skipped": self.skipped, "bytes": self.bytes,
                "unhashed": self.unhashed, "counts": self.counts,
                "problems": [{"path": p, "status": s, "detail": d} for p, s, d in self.problems[:limit]]}


def verify_node(node, report=None, *, full: bool = False, root: Path | None = None,
                workers: int | None = None) -> NodeVerifyResult:
    """Compare the node's copy of the shared library (its shared/models, read here: run on the node's agent) with
    the library's SHA-256s, and record per file whether the node has it (ok), has other bytes (differs) or has none
    (missing). A file unchanged since its last check against the same library hash is not read again unless `full`.
    Links are read only when they stay inside the node's library."""
    from .models import ModelNodeCheck

    report = report or NullReport()
    root = Path(root or layout.shared_models_dir(node))
    if not root.is_dir():
        raise NodeVerifyError(
            f"Node {node.name} has no shared model library at {root}: mount the shared storage there (or set the "
            f"node's shared path to where it is mounted), then verify again. Nothing was recorded.")
    real_root = os.path.realpath(root)
    previous = {check.asset_id: check for check in ModelNodeCheck.objects.filter(node=node)}
    result = NodeVerifyResult()
    now = timezone.now()
    outcomes: list[tuple[ModelAsset, dict]] = []
    skipped_ids: list[int] = []
    todo = []
    assets = list(ModelAsset.objects.exclude(status=ModelAsset.Status.MISSING).only(
        "id", "path", "sha256", "hashed_size", "size"))
    for asset in assets:
        if not SHA256_RE.match(asset.sha256 or ""):
            result.unhashed += 1
            continue
        path = os.path.join(root, asset.path)
        try:
            info = os.lstat(path)
            if S_ISLNK(info.st_mode):
                target = os.path.realpath(path)
                if os.path.commonpath([target, real_root]) != real_root:
                    outcomes.append((asset, {"status": ModelNodeCheck.Status.UNREADABLE,
                                             "detail": f"a link pointing outside the node's library ({target}); "
                                                       "not followed"}))
                    continue
                info = os.stat(path)
        except FileNotFoundError:
            outcomes.append((asset, {"status": ModelNodeCheck.Status.MISSING,
                                     "detail": f"not in {root} on node {node.name}"}))
            continue
        except OSError as exc:
            outcomes.append((asset, {"status": ModelNodeCheck.Status.UNREADABLE,
                                     "detail": f"cannot be read ({exc.strerror or exc})"}))
            continue
        if not S_ISREG(info.st_mode):
            outcomes.append((asset, {"status": ModelNodeCheck.Status.UNREADABLE, "detail": "not a regular file"}))
            continue
        if os.path.commonpath([os.path.realpath(os.path.dirname(path)), real_root]) != real_root:
            outcomes.append((asset, {"status": ModelNodeCheck.Status.UNREADABLE,
                                     "detail": "a folder on its way is a link out of the node's library; not read"}))
            continue
        stamp = {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "inode": info.st_ino}
        expected_size = asset.hashed_size if asset.hashed_size is not None else asset.size
        if info.st_size != expected_size:
            outcomes.append((asset, {"status": ModelNodeCheck.Status.DIFFERS, "sha256": "", **stamp,
                                     "detail": f"{info.st_size} bytes on the node, {expected_size} in the library"}))
            continue
        last = previous.get(asset.pk)
        if (not full and last is not None and last.library_sha256 == asset.sha256 and last.sha256
                and (last.size, last.mtime_ns, last.inode) == (info.st_size, info.st_mtime_ns, info.st_ino)):
            result.skipped += 1
            skipped_ids.append(asset.pk)
            result.checked += 1
            result.counts[last.status] = result.counts.get(last.status, 0) + 1
            if last.is_problem:
                result.problems.append([asset.path, last.status, last.detail])
            continue
        todo.append((asset, path, info))
    todo.sort(key=lambda item: -item[2].st_size)
    total = sum(info.st_size for _, _, info in todo)
    report.log(f"Node {node.name}: {len(todo)} file(s) to hash ({human_size(total)}) in {root}, {result.skipped} "
               f"unchanged since last checked, {len(outcomes)} settled without reading"
               + (f"; {result.unhashed} library file(s) not hashed yet (run models verify)" if result.unhashed else ""))
    progress = _Progress(total)
    cancelled = threading.Event()
    workers = workers or settings.MODEL_HASH_WORKERS or os.cpu_count() or 1

    def digest(item):
        asset, path, _info = item
        try:
            found = hashing.hash_file(path, on_bytes=progress.add, cancelled=cancelled)
        except FileNotFoundError:
            return asset, {"status": ModelNodeCheck.Status.MISSING, "detail": "vanished while it was being read"}
        except hashing.FileChangedWhileReading as exc:
            return asset, {"status": ModelNodeCheck.Status.UNREADABLE, "detail": str(exc)}
        except OSError as exc:
            return asset, {"status": ModelNodeCheck.Status.UNREADABLE,
                           "detail": f"cannot be read ({exc.strerror or exc})"}
        stamp = {"sha256": found.sha256, "size": found.size, "mtime_ns": found.mtime_ns, "inode": found.inode}
        if found.sha256 != asset.sha256:
            return asset, {"status": ModelNodeCheck.Status.DIFFERS, **stamp,
                           "detail": f"SHA-256 {found.sha256[:12]}… on the node, {asset.sha256[:12]}… in the library"}
        return asset, {"status": ModelNodeCheck.Status.OK, "detail": "", **stamp}

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="node-hash") as pool:
        futures = [pool.submit(digest, item) for item in todo]
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=ALL_COMPLETED)
                report.progress(progress.percent, progress.describe())
        except BaseException:
            cancelled.set()
            raise
        outcomes += [future.result() for future in futures]
    result.hashed, result.bytes = len(todo), progress.done
    rows = []
    for asset, outcome in outcomes:
        status = outcome["status"]
        result.checked += 1
        result.counts[status] = result.counts.get(status, 0) + 1
        if status != ModelNodeCheck.Status.OK:
            result.problems.append([asset.path, status, outcome["detail"]])
            report.log(f"{node.name}: {status}: {asset.path}: {outcome['detail']}", "WARNING")
        rows.append(ModelNodeCheck(
            asset_id=asset.pk, node=node, status=status, detail=outcome["detail"][:500],
            sha256=outcome.get("sha256", ""), library_sha256=asset.sha256, size=outcome.get("size"),
            mtime_ns=outcome.get("mtime_ns"), inode=outcome.get("inode"), checked_at=now))
    fields = ["status", "detail", "sha256", "library_sha256", "size", "mtime_ns", "inode", "checked_at"]
    with transaction.atomic():
        for start in range(0, len(rows), 500):
            ModelNodeCheck.objects.bulk_create(rows[start:start + 500], update_conflicts=True,
                                               unique_fields=["asset", "node"], update_fields=fields)
        # Files skipped as unchanged were checked now all the same; files the library lost or never hashed have
        # nothing to be compared with any more.
        for start in range(0, len(skipped_ids), 500):
            ModelNodeCheck.objects.filter(node=node, asset_id__in=skipped_ids[start:start + 500]).update(
                checked_at=now)
        ModelNodeCheck.objects.filter(node=node).filter(
            Q(asset__status=ModelAsset.Status.MISSING) | Q(asset__sha256="")).delete()
    result.problems.sort()
    return result


# --- Expected hashes (sha256sum format) ----------------------------------------------------------------------

def import_hashes(text: str, source=ModelAsset.ExpectedSource.MANIFEST) -> dict:
    """Lines of `<sha256>  <path>` (sha256sum format; '*' binary marker allowed) → expected hashes."""
    matched, unknown, bad = 0, [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(None, 1)
        digest = parts[0].lower()
        if len(parts) != 2 or not SHA256_RE.match(digest):
            bad.append(f"line {number}: not '<64 hex digits>  <path>'")
            continue
        path = parts[1].lstrip("*").strip()
        path = path[2:] if path.startswith("./") else path
        updated = ModelAsset.objects.filter(path=path).update(expected_sha256=digest, expected_source=source)
        if updated:
            matched += 1
        else:
            unknown.append(path)
    return {"matched": matched, "unknown": unknown, "bad": bad}


def export_hashes() -> str:
    lines = [f"{asset.sha256}  {asset.path}" for asset in ModelAsset.objects.exclude(sha256="").order_by("path")]
    return "\n".join(lines) + ("\n" if lines else "")


# --- Duplicates and totals -----------------------------------------------------------------------------------

def duplicates() -> list[dict]:
    groups = (ModelAsset.objects.exclude(sha256="").exclude(status=ModelAsset.Status.MISSING)
              .values("sha256").annotate(copies=Count("id"), bytes=Sum("size")).filter(copies__gt=1))
    found = []
    for group in groups:
        rows = list(ModelAsset.objects.filter(sha256=group["sha256"]).exclude(status=ModelAsset.Status.MISSING)
                    .values_list("path", "inode"))
        # Hard links (promote makes them) share their bytes: only distinct files waste space, and names that are all
        # one file are no duplicate to clean up (deleting one would only take a name from the instances using it).
        files = len({inode or path for path, inode in rows})
        if files < 2:
            continue
        size = group["bytes"] // group["copies"]
        found.append({"sha256": group["sha256"], "paths": [path for path, _inode in rows], "size": size,
                      "wasted": size * (files - 1)})
    return sorted(found, key=lambda g: -g["wasted"])


def library_summary() -> dict:
    """Files, bytes and problems of the library, in one query (the dashboard shows it)."""
    from django.db.models import Q

    summary = ModelAsset.objects.aggregate(
        files=Count("id", filter=~Q(status=ModelAsset.Status.MISSING)),
        bytes=Sum("size", filter=~Q(status=ModelAsset.Status.MISSING)),
        mismatch=Count("id", filter=Q(status=ModelAsset.Status.MISMATCH)),
        missing=Count("id", filter=Q(status=ModelAsset.Status.MISSING)),
        unreadable=Count("id", filter=Q(status=ModelAsset.Status.UNREADABLE)),
        verified=Count("id", filter=Q(status=ModelAsset.Status.VERIFIED)),
    )
    summary["bytes"] = summary["bytes"] or 0
    summary["problems"] = summary["mismatch"] + summary["missing"] + summary["unreadable"]
    return summary


def folder_totals() -> list[dict]:
    return list(ModelAsset.objects.exclude(status=ModelAsset.Status.MISSING).values("folder")
                .annotate(files=Count("id"), bytes=Sum("size")).order_by("folder"))


# --- Instances: inbox and what they see -----------------------------------------------------------------------

def inbox(instance) -> list[dict]:
    """Model files that nodes downloaded into the instance's own models/ folder. The container writes there, so it is
    walked from the instance's folder through descriptors that never follow a link: links are listed as problems
    (never read), and a models/ folder that is itself a link is one problem naming it."""
    root = layout.instance_dir(instance.instance_id, instance.node)
    found = []
    try:
        for folder, _dirs, files, links, fd in safefs.walk(root, "models", with_fd=True):
            here = PurePosixPath(folder).relative_to("models")
            for name in sorted(files + links):
                relpath = (here / name).as_posix()
                try:
                    relpath.encode("utf-8")
                except UnicodeEncodeError:
                    shown = os.fsencode(relpath).decode("utf-8", errors="backslashreplace")
                    found.append(_inbox_item(shown, problem="the file name is not valid UTF-8; rename it so ComfyUI "
                                                            "and ComfyHub can show it"))
                    continue
                is_link = name in links
                if not is_model_file(relpath) and not (is_link and not os.path.splitext(name)[1]):
                    continue
                try:
                    info = os.lstat(name, dir_fd=fd)
                except FileNotFoundError:
                    continue  # removed since it was listed
                if S_ISLNK(info.st_mode):
                    try:
                        target = os.readlink(name, dir_fd=fd)
                    except OSError:
                        target = "?"
                    found.append(_inbox_item(relpath, problem=f"a link (to {target}); ComfyHub never follows links in "
                                                              f"an instance's folder. Remove it: rm "
                                                              f"'{root / folder / name}'"))
                elif not S_ISREG(info.st_mode):
                    found.append(_inbox_item(relpath, problem="not a regular file"))
                else:
                    found.append(_inbox_item(relpath, size=info.st_size))
    except FileNotFoundError:
        return []
    except safefs.UnsafePathError as exc:
        return [_inbox_item("models", problem=str(exc))]
    return found


def _inbox_item(relpath: str, *, size: int = 0, problem: str = "") -> dict:
    return {"path": relpath, "folder": folder_of(relpath), "size": size, "problem": problem}


class PromoteError(Exception):
    pass


def promote(instance, relpath: str, report=None) -> dict:
    """Copy an inbox file into shared/models/<folder>/ without overwriting, then drop the inbox copy; drop it as well
    if the library already has the same content at that name; never replace a different file.

    The promoted file always keeps the folder and name the instance used, because the node that downloaded it loads
    it by that name. When the library has the same bytes under another name, the new name becomes a hard link to
    that library file (no second copy of gigabytes, an ordinary file for scans, verifies and the read-only mount, and
    it survives the other name being deleted or renamed, which a symlink would not); where a hard link cannot be made
    (another file system, a file the service may not link, the other name is itself a link), it is a copy.

    The instance's folder is hostile: the source is opened from it without following a link at any level, checked to
    be a regular file, and read only through that descriptor (so nothing the container swaps in, and no host file,
    can reach the library). It is copied, never moved or hard-linked, so the container keeps no way to write the
    library's copy. The copy is written under a temporary name created exclusively and renamed into place without
    replacing anything; no link is followed in the shared tree either."""
    report = report or NullReport()
    source_rel = _inbox_relpath(instance, relpath)
    if not is_model_file(relpath) or "/" not in relpath:
        raise PromoteError(f"'{relpath}' is not a model file in a model folder (e.g. checkpoints/x.safetensors).")
    folder = relpath.split("/", 1)[0]
    if folder not in layout.MODEL_FOLDERS and folder not in FOLDER_ALIASES:
        raise PromoteError(f"'{folder}' is not a ComfyUI model folder.")
    root = layout.instance_dir(instance.instance_id, instance.node)
    try:
        source_fd = safefs.open_file(root, source_rel, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise PromoteError(f"'{relpath}' is not a file inside {instance}'s models/ folder.") from None
    except safefs.UnsafePathError as exc:
        raise PromoteError(f"'{relpath}' cannot be promoted: {exc}") from None
    try:
        if not S_ISREG(os.fstat(source_fd).st_mode):
            raise PromoteError(f"'{relpath}' is not a regular file inside {instance}'s models/ folder.")
        return _promote_from(instance, root, source_rel, source_fd, relpath, folder, report)
    finally:
        os.close(source_fd)


def _inbox_relpath(instance, relpath: str) -> str:
    """models/<relpath>, refusing anything that is not a plain relative path."""
    try:
        parts = safefs.parts_of(relpath or "")
    except safefs.UnsafePathError:
        parts = ()
    if not parts or "\\" in relpath:
        raise PromoteError(f"'{relpath}' is not a file inside {instance}'s models/ folder.")
    return PurePosixPath("models", *parts).as_posix()


def _promote_from(instance, root: Path, source_rel: str, source_fd: int, relpath: str, folder: str, report) -> dict:
    digest = _hash_fd(source_fd, with_blake3=settings.MODEL_HASH_BLAKE3, what=relpath)
    report.log(f"{relpath}: sha256 {digest.sha256}")
    shared = layout.shared_root(instance.node)
    target_rel = relpath
    shared_rel = f"models/{target_rel}"
    try:
        existing = safefs.lstat(shared, shared_rel)
    except safefs.UnsafePathError as exc:
        raise PromoteError(f"The library cannot receive {target_rel}: {exc} Nothing was moved.") from None
    if existing is not None:
        if not S_ISREG(existing.st_mode):
            raise PromoteError(f"The library already has something else than a plain file at {target_rel} (a link "
                               "or a folder); rename one of them (nothing was moved).")
        try:
            existing_fd = safefs.open_file(shared, shared_rel, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except (OSError, safefs.UnsafePathError) as exc:
            raise PromoteError(f"The library's {target_rel} cannot be read ({exc}); nothing was moved.") from None
        try:
            same = _hash_fd(existing_fd, what=target_rel).sha256 == digest.sha256
        finally:
            os.close(existing_fd)
        if same:
            _drop_source(root, source_rel, source_fd)
            report.log(f"the library already has {target_rel} with the same content: dropped the inbox copy")
            return {"result": "deduplicated", "path": target_rel, "sha256": digest.sha256}
        raise PromoteError(f"The library already has a different file at {target_rel}; rename one of them "
                           "(nothing was moved).")
    size = os.fstat(source_fd).st_size
    for same in (ModelAsset.objects.filter(sha256=digest.sha256, size=size).exclude(path=target_rel)
                 .exclude(status=ModelAsset.Status.MISSING).order_by("path")):
        stat = _link_in_library(shared, f"models/{same.path}", shared_rel, digest.sha256, target_rel)
        if stat is not None:
            _drop_source(root, source_rel, source_fd)
            _record_promoted(target_rel, stat, digest, f"promoted from an instance inbox: a hard link to {same.path}",
                             architecture=same.architecture, metadata=same.metadata)
            report.log(f"the library already has this content as {same.path}: {target_rel} is a hard link to it; "
                       "dropped the inbox copy")
            return {"result": "linked", "path": target_rel, "same_as": same.path, "sha256": digest.sha256}
    stat = _copy_into_library(shared, shared_rel, source_fd, digest.sha256, target_rel)
    _drop_source(root, source_rel, source_fd)
    _record_promoted(target_rel, stat, digest, "promoted from an instance inbox")
    report.log(f"moved into the shared library as {target_rel}")
    return {"result": "moved", "path": target_rel, "sha256": digest.sha256}


def _record_promoted(target_rel: str, stat: os.stat_result, digest: hashing.FileHash, reason: str, **extra) -> None:
    ModelAsset.objects.update_or_create(path=target_rel, defaults=dict(
        folder=folder_of(target_rel), size=stat.st_size, mtime_ns=stat.st_mtime_ns, inode=stat.st_ino,
        sha256=digest.sha256, blake3=digest.blake3, hashed_size=stat.st_size, hashed_mtime_ns=stat.st_mtime_ns,
        hashed_inode=stat.st_ino, last_verified_at=timezone.now(), status=ModelAsset.Status.UNVERIFIED,
        status_reason=reason, **extra))


def _link_in_library(shared: Path, existing_rel: str, shared_rel: str, sha256: str,
                     target_rel: str) -> os.stat_result | None:
    """Make `shared_rel` a hard link to the library file at `existing_rel` if that file (opened without following a
    link) still holds these bytes; None where it cannot (gone, a link, changed, another file system, a file the
    service may not link), and the caller copies instead. Both names are inside the shared tree; the inbox file is
    never linked. Returns the stat of the linked file."""
    try:
        existing_fd = safefs.open_file(shared, existing_rel, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except (OSError, safefs.UnsafePathError):
        return None
    try:
        held = os.fstat(existing_fd)
        if not S_ISREG(held.st_mode):
            return None
        try:
            if _hash_fd(existing_fd, what=existing_rel).sha256 != sha256:
                return None
        except PromoteError:
            return None
        parent, name = PurePosixPath(shared_rel).parent, PurePosixPath(shared_rel).name
        with contextlib.ExitStack() as folders:
            try:
                src_fd, src_name = folders.enter_context(safefs.parent_of(shared, existing_rel))
            except (OSError, safefs.UnsafePathError):
                return None
            try:
                dst_fd = folders.enter_context(safefs.opened_dir(shared, parent, create=True, chown=False))
            except safefs.UnsafePathError as exc:
                raise PromoteError(f"The library cannot receive {target_rel}: {exc} Nothing was moved.") from None
            try:
                # By name under folders reached without links, never following one (a link under that name would
                # be linked itself, not its target); link() never replaces an existing name.
                os.link(src_name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
            except FileExistsError:
                raise PromoteError(f"{shared / shared_rel} appeared meanwhile; nothing was moved.") from None
            except OSError:  # EXDEV, EPERM (fs.protected_hardlinks), EMLINK: a copy will do
                return None
            linked = os.stat(name, dir_fd=dst_fd, follow_symlinks=False)
            if (linked.st_dev, linked.st_ino) != (held.st_dev, held.st_ino):
                # The name no longer held the file that was hashed: take the new name back, and copy instead.
                os.unlink(name, dir_fd=dst_fd)
                return None
        return os.fstat(existing_fd)
    finally:
        os.close(existing_fd)


def _hash_fd(fd: int, *, with_blake3: bool = False, what: str) -> hashing.FileHash:
    """Hash the file open at `fd` (its /proc/self/fd entry reopens that very file, never a name)."""
    try:
        return hashing.hash_file(f"/proc/self/fd/{fd}", with_blake3=with_blake3)
    except hashing.FileChangedWhileReading as exc:
        raise PromoteError(f"'{what}' {exc}.") from None
    except OSError as exc:
        raise PromoteError(f"'{what}' cannot be read ({exc.strerror or exc}).") from None


def _copy_into_library(shared: Path, shared_rel: str, source_fd: int, sha256: str, target_rel: str) -> os.stat_result:
    """Copy from the descriptor into a temporary file created exclusively beside the target, check its SHA-256 on the
    way, then rename it into place without replacing anything. Returns the stat of the new file."""
    parent = PurePosixPath(shared_rel).parent
    name = PurePosixPath(shared_rel).name
    Path(shared).mkdir(parents=True, exist_ok=True)  # the storage root (trusted): below it, no link is followed
    try:
        with safefs.opened_dir(shared, parent, create=True, chown=False) as dst_fd:
            tmp_fd, tmp_name = safefs.create_temp(dst_fd, prefix=".comfyhub-promoting-")
            try:
                hasher = hashlib.sha256()
                offset = 0
                with os.fdopen(tmp_fd, "wb", closefd=False) as out:
                    while chunk := os.pread(source_fd, hashing.CHUNK_SIZE, offset):
                        hasher.update(chunk)
                        out.write(chunk)
                        offset += len(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                if hasher.hexdigest() != sha256:
                    raise PromoteError(f"'{target_rel}' changed while it was copied into the library; nothing was "
                                       "moved. Try again once it is complete.")
                try:
                    safefs.rename_noreplace(dst_fd, tmp_name, dst_fd, name)
                except FileExistsError:
                    raise PromoteError(f"{shared / shared_rel} appeared meanwhile; nothing was moved.") from None
                tmp_name = None
                return os.fstat(tmp_fd)
            finally:
                os.close(tmp_fd)
                if tmp_name is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp_name, dir_fd=dst_fd)
    except safefs.UnsafePathError as exc:
        raise PromoteError(f"The library cannot receive {target_rel}: {exc} Nothing was moved.") from None


def _drop_source(root: Path, source_rel: str, source_fd: int) -> None:
    """Remove the inbox name, if it still names the file that was read (never a link, never something swapped in)."""
    opened = os.fstat(source_fd)
    try:
        with safefs.parent_of(root, source_rel) as (fd, name):
            current = os.lstat(name, dir_fd=fd)
            if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                os.unlink(name, dir_fd=fd)
    except (FileNotFoundError, safefs.UnsafePathError):
        pass  # moved or swapped meanwhile: the library has its copy, the instance keeps what it put there
