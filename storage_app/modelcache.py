"""A node's model cache: copies of shared-library files on the node's fast disk (MODEL_CACHE_PATH), each verified by
SHA-256 against the library's record, the least recently used evicted past the limit (MODEL_CACHE_MAX_GB).

    <cache>/models/<library path>   a copy of shared/models/<library path>; read-only at /model-cache/models in
                                    every instance on the node, listed between the instance's folder and /shared
    <cache>/.comfyhub-cache.json    the index: per file its sha256, size, when it was cached and last used (LRU), the
                                    files dropped and why, the last warm and check (written atomically)
    <cache>/.comfyhub-cache.lock    held (flock) while a warm or a check changes the cache

The cache folder is the node's own disk (no container writes it), but no link is followed in it: every folder is
opened from the cache root with O_NOFOLLOW, and nothing is written outside it. A copy is written under a temporary
name, hashed while it is written (one read of the library file), fsynced, and renamed into place only when its
SHA-256 is the one the library recorded; `check` hashes the cached files again and drops any that no longer match,
so a damaged copy is never served (ComfyUI then finds the library's).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from django.conf import settings

from comfyhub.cli import human_size
from comfyhub.operations import NullReport

from . import hashing, layout, library, safefs
from .models import ModelAsset

INDEX_FILE = ".comfyhub-cache.json"
LOCK_FILE = ".comfyhub-cache.lock"
TEMP_PREFIX = ".comfyhub-caching-"
MODELS = "models"
DROPPED_KEPT = 50  # dropped files remembered in the index, newest last
# The library's hash of these is current: a copy that matches it is the library's file. Others (never hashed, changed
# since, a mismatch, gone, unreadable) are refused: there is nothing trustworthy to compare a copy with.
CACHEABLE = (ModelAsset.Status.VERIFIED, ModelAsset.Status.UNVERIFIED)
COPY_BUFFERS = 3  # read and hash one buffer while the one before it is written


class CacheError(Exception):
    """The cache cannot be used as asked; the message says why and what to do."""


class Refused(Exception):
    """One file is not cached; the message is the reason, shown next to its path."""


def root_of(node=None) -> Path:
    root = layout.model_cache_root(node)
    if root is None:
        raise CacheError("This node has no model cache: set MODEL_CACHE_PATH (a folder on its fast disk) and "
                         "MODEL_CACHE_MAX_GB in its environment, then restart ComfyHub there.")
    return root


def limit_bytes() -> int:
    return settings.MODEL_CACHE_MAX_GB << 30


def _now() -> str:
    # UTC, fixed width: the strings sort in time order (least recently used first).
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# --- Paths ---------------------------------------------------------------------------------------------------

def library_path(text: str) -> str:
    """A library file as people name it (`models/checkpoints/x.safetensors` or `checkpoints/x.safetensors`) → the
    library's own path (`checkpoints/x.safetensors`). Refuses anything that could leave the library or the cache."""
    shown = text if isinstance(text, str) and len(text) <= 200 else f"{str(text)[:200]}…"
    problem = CacheError(f"'{shown}' is not a file of the shared library: give models/<folder>/<file> (no '..', not "
                         "absolute, no hidden names).")
    if not isinstance(text, str) or "\\" in text or any(ord(char) < 32 for char in text):
        raise problem
    try:
        parts = safefs.parts_of(text.strip())
    except safefs.UnsafePathError:
        raise problem from None
    if parts[:1] == (MODELS,):
        parts = parts[1:]
    if len(parts) < 2 or any(part.startswith(".") for part in parts):
        raise problem
    relpath = PurePosixPath(*parts).as_posix()
    if not library.is_model_file(relpath):
        raise CacheError(f"'{shown}' is not a model file (ComfyUI loads {', '.join(sorted(library.MODEL_EXTENSIONS))}"
                         " files).")
    return relpath


def resolve(references) -> tuple[list[str], list[str]]:
    """Library paths of the model files a workflow names ((ComfyUI folder or "", name) pairs, as
    instances.workflows.workflow_needs gives them), and the names the library does not have (an instance's own file,
    or missing) as `folder/name`. A name is looked for in each sub-folder ComfyUI searches for its folder, in
    ComfyUI's order; a name without a folder in all of them."""
    every_folder = [sub for subs in layout.MODEL_FOLDERS.values() for sub in subs]
    wanted: list[tuple[str, list[str]]] = []
    for folder, name in references:
        if not isinstance(name, str) or not name:
            continue
        name = name.replace("\\", "/")  # workflows saved on Windows
        subfolders = layout.MODEL_FOLDERS.get(folder, (folder,)) if folder else every_folder
        wanted.append((f"{folder or '?'}/{name}", [f"{sub}/{name}" for sub in subfolders]))
    candidates = {path for _, paths in wanted for path in paths}
    known = set()
    for start in range(0, len(candidates), 900):
        chunk = sorted(candidates)[start:start + 900]
        known.update(ModelAsset.objects.filter(path__in=chunk).exclude(status=ModelAsset.Status.MISSING)
                     .values_list("path", flat=True))
    found, unknown = [], []
    for shown, paths in wanted:
        hit = next((path for path in paths if path in known), None)
        if hit is None:
            unknown.append(shown)
        elif hit not in found:
            found.append(hit)
    return found, sorted(set(unknown))


# --- The index -----------------------------------------------------------------------------------------------

def _empty_index() -> dict:
    return {"version": 1, "files": {}, "dropped": [], "last_warm": None, "last_check": None}


def read_index(root: Path) -> dict:
    """The cache's index; an empty one when there is none or it cannot be read (then `check` records the files it
    finds again, each hashed and compared with the library)."""
    try:
        raw = safefs.read_bytes(root, INDEX_FILE, 256 << 20)
        index = json.loads(raw)
    except (FileNotFoundError, NotADirectoryError, safefs.UnsafePathError, OSError, ValueError):
        return _empty_index()
    if not isinstance(index, dict) or not isinstance(index.get("files"), dict):
        return _empty_index()
    index = {**_empty_index(), **index}
    index["files"] = {path: entry for path, entry in index["files"].items()
                      if isinstance(entry, dict) and isinstance(entry.get("size"), int)
                      and isinstance(entry.get("sha256"), str) and isinstance(entry.get("last_used_at"), str)}
    if not isinstance(index["dropped"], list):
        index["dropped"] = []
    return index


def _write_index(root: Path, index: dict) -> None:
    index["dropped"] = index["dropped"][-DROPPED_KEPT:]
    safefs.write_bytes(root, INDEX_FILE, json.dumps(index, indent=1, sort_keys=True).encode(), chown=False)


@contextlib.contextmanager
def _locked(root: Path):
    """The cache folder made if missing, and held by this process alone (a second warm or check waits)."""
    if not root.is_dir():
        if root.is_symlink() or root.exists():
            raise CacheError(f"{root} (MODEL_CACHE_PATH) exists but is not a folder; move it away or change the "
                             "setting.")
        root.mkdir(parents=True)
    try:
        with safefs.opened_dir(root, MODELS, create=True, chown=False):
            pass
        root_fd = safefs.open_root(root)
    except safefs.UnsafePathError as exc:
        raise CacheError(str(exc)) from None
    try:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=root_fd)
    finally:
        os.close(root_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove(root: Path, relpath: str) -> bool:
    """Remove models/<relpath> from the cache (a file, or a link itself: never what it points at)."""
    try:
        with safefs.parent_of(root, f"{MODELS}/{relpath}") as (fd, name):
            os.unlink(name, dir_fd=fd)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except safefs.UnsafePathError:
        return False  # a folder on the way is a link: nothing of ours is there, and nothing is followed
    except IsADirectoryError:
        return False


def _cached_stat(root: Path, relpath: str) -> os.stat_result | None:
    try:
        info = safefs.lstat(root, f"{MODELS}/{relpath}")
    except (safefs.UnsafePathError, NotADirectoryError):
        return None
    return info if info is not None and stat.S_ISREG(info.st_mode) else None


def _drop(root: Path, index: dict, relpath: str, reason: str, report) -> None:
    _remove(root, relpath)
    index["files"].pop(relpath, None)
    index["dropped"].append({"path": relpath, "reason": reason, "at": _now()})
    report.log(f"dropped {relpath} from the cache: {reason}", "WARNING")


# --- Warming -------------------------------------------------------------------------------------------------

@dataclass
class WarmResult:
    copied: list = field(default_factory=list)  # library paths copied into the cache now
    hits: list = field(default_factory=list)  # already cached with the library's hash
    evicted: list = field(default_factory=list)  # least recently used files removed to make room
    refused: list = field(default_factory=list)  # [path, reason]
    bytes_copied: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def refusal(asset: ModelAsset | None, relpath: str) -> str | None:
    """Why a library file cannot be cached, or None."""
    if asset is None:
        return "not in the shared library (scan it first: models scan)"
    if asset.status in CACHEABLE and library.SHA256_RE.match(asset.sha256 or ""):
        return None
    reasons = {
        ModelAsset.Status.NEW: "the library has not hashed it yet, so a copy cannot be verified: run models verify "
                               "first",
        ModelAsset.Status.CHANGED: "it changed in the library since it was hashed: run models verify first",
        ModelAsset.Status.MISMATCH: "the library marks it as a mismatch (it differs from its expected hash): fix the "
                                    "library's file first",
        ModelAsset.Status.MISSING: "it is missing from the library",
        ModelAsset.Status.UNREADABLE: f"the library cannot read it ({asset.status_reason or 'unreadable'})",
    }
    return reasons.get(asset.status, "the library has no SHA-256 for it: run models verify first")


def warm(paths, *, report=None, root: Path | None = None, library_root: Path | None = None,
         limit: int | None = None, workers: int | None = None) -> WarmResult:
    """Copy each library file in `paths` into the cache unless it is there already with the library's hash; evict
    the least recently used other files first where the limit (bytes) needs room. A file the library has not
    hashed, one that does not fit, and one whose copy does not match the library's hash are refused, each with its
    reason; the others are cached all the same."""
    report = report or NullReport()
    root = Path(root) if root is not None else root_of()
    library_root = Path(library_root) if library_root is not None else layout.shared_models_dir()
    limit = limit_bytes() if limit is None else limit
    wanted = list(dict.fromkeys(library_path(path) for path in paths))
    assets = {asset.path: asset for asset in ModelAsset.objects.filter(path__in=wanted)}
    result = WarmResult()
    with _locked(root):
        index = read_index(root)
        now = _now()
        todo = []
        for relpath in wanted:
            asset = assets.get(relpath)
            if reason := refusal(asset, relpath):
                result.refused.append([relpath, reason])
                report.log(f"{relpath}: not cached: {reason}", "WARNING")
                continue
            entry = index["files"].get(relpath)
            info = _cached_stat(root, relpath)
            if entry and entry["sha256"] == asset.sha256 and info is not None and info.st_size == entry["size"]:
                entry["last_used_at"] = now
                result.hits.append(relpath)
                continue
            if entry or info is not None:
                reason = ("the cached copy is not the library's current file" if entry and info is not None
                          else "recorded but gone from the cache folder" if entry else "not recorded in the index")
                _drop(root, index, relpath, f"{reason}; copied again", report)
            todo.append(asset)
        used = sum(entry["size"] for entry in index["files"].values())
        fitting = []
        for asset in todo:
            if asset.size > limit:
                result.refused.append([asset.path, f"{human_size(asset.size)} is more than the cache may hold "
                                                   f"({human_size(limit)}, MODEL_CACHE_MAX_GB)"])
                continue
            while used + asset.size > limit:
                victim = _least_recently_used(index, keep=set(wanted))
                if victim is None:
                    break
                used -= index["files"][victim]["size"]
                _remove(root, victim)
                del index["files"][victim]
                result.evicted.append(victim)
                report.log(f"evicted {victim} (least recently used) to make room")
            if used + asset.size > limit:
                result.refused.append([asset.path, f"does not fit: the other files this warm needs take "
                                                   f"{human_size(used)} of the {human_size(limit)} the cache may "
                                                   "hold (MODEL_CACHE_MAX_GB)"])
                report.log(f"{asset.path}: not cached: it does not fit beside the other files this warm needs",
                           "WARNING")
                continue
            used += asset.size
            fitting.append(asset)
        _write_index(root, index)  # evictions are on record before anything is copied

        total = sum(asset.size for asset in fitting)
        report.log(f"{len(result.hits)} file(s) already cached, {len(fitting)} to copy ({human_size(total)})"
                   + (f", {len(result.evicted)} evicted" if result.evicted else ""))
        progress = _Progress(total, report)
        index_lock = threading.Lock()

        def copy(asset):
            try:
                _copy_into_cache(root, library_root, asset, progress.add)
            except Refused as exc:
                with index_lock:
                    result.refused.append([asset.path, str(exc)])
                report.log(f"{asset.path}: not cached: {exc}", "WARNING")
                return
            with index_lock:
                stamp = _now()
                index["files"][asset.path] = {"sha256": asset.sha256, "size": asset.size, "cached_at": stamp,
                                              "last_used_at": stamp}
                result.copied.append(asset.path)
                result.bytes_copied += asset.size
                _write_index(root, index)
            report.log(f"cached {asset.path} ({human_size(asset.size)}), SHA-256 matches the library")

        fitting.sort(key=lambda asset: -asset.size)  # big files first: the cores stay busy to the end
        workers = max(1, min(workers or settings.MODEL_HASH_WORKERS or os.cpu_count() or 1, len(fitting) or 1))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cache") as pool:
            list(pool.map(copy, fitting))
        index["last_warm"] = {"at": _now(), "copied": len(result.copied), "hits": len(result.hits),
                              "evicted": len(result.evicted), "refused": len(result.refused),
                              "bytes_copied": result.bytes_copied}
        _write_index(root, index)
    return result


def _least_recently_used(index: dict, keep: set) -> str | None:
    candidates = [(entry["last_used_at"], path) for path, entry in index["files"].items() if path not in keep]
    return min(candidates)[1] if candidates else None


def _open_library_file(library_root: Path, relpath: str) -> int:
    """The library file, read-only. Links may point anywhere inside the library (as the scan allows), never out of
    it; the file must be a regular file."""
    path = library_root / relpath
    real_root = os.path.realpath(library_root)
    real = os.path.realpath(path)
    if os.path.commonpath([real, real_root]) != real_root:
        raise Refused(f"it is a link pointing outside the library ({real}); not followed")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Refused("it is no longer in the library folder (scan the library)") from None
    except OSError as exc:
        raise Refused(f"the library's file cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused("the library's entry is not a regular file")
    return fd


def _copy_into_cache(root: Path, library_root: Path, asset: ModelAsset, on_bytes) -> None:
    source_fd = _open_library_file(library_root, asset.path)
    try:
        size = os.fstat(source_fd).st_size
        if size != asset.size:
            raise Refused(f"its size changed in the library since it was hashed ({asset.size} bytes then, {size} "
                          "now): run models verify first")
        target = f"{MODELS}/{asset.path}"
        try:
            parent_fd = safefs.open_dir(root, PurePosixPath(target).parent, create=True, chown=False)
        except safefs.UnsafePathError as exc:
            raise Refused(f"the cache folder cannot receive it: {exc}") from None
        except OSError as exc:
            raise Refused(f"the cache folder cannot receive it ({exc.strerror or exc})") from None
        try:
            tmp_fd, tmp_name = safefs.create_temp(parent_fd, prefix=TEMP_PREFIX)
            try:
                try:
                    digest = copy_hashing(source_fd, tmp_fd, on_bytes)
                    os.fsync(tmp_fd)
                except OSError as exc:
                    raise Refused(f"copying failed: {exc.strerror or exc}"
                                  + (" (the cache's disk is full)" if exc.errno == errno.ENOSPC else "")) from None
                if digest != asset.sha256:
                    raise Refused(f"its copy's SHA-256 {digest[:12]}… is not the library's {asset.sha256[:12]}…: "
                                  "the library's file changed or is damaged since it was verified; run models "
                                  "verify")
                os.rename(tmp_name, PurePosixPath(target).name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
                tmp_name = None
                os.fsync(parent_fd)  # the new name survives a crash too
            finally:
                os.close(tmp_fd)
                if tmp_name is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp_name, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
    finally:
        os.close(source_fd)


def copy_hashing(source_fd: int, target_fd: int, on_bytes=None, chunk_size: int = hashing.CHUNK_SIZE) -> str:
    """Copy source to target, reading it once, and return its SHA-256. Each buffer is handed to a writer thread and
    hashed here at the same time (both release the GIL), so a copy takes about as long as the slower of the two."""
    sha = hashlib.sha256()
    buffers = [memoryview(bytearray(chunk_size)) for _ in range(COPY_BUFFERS)]
    writes = [None] * COPY_BUFFERS
    offset = 0
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(source_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-write") as writer:
        try:
            turn = 0
            while True:
                if writes[turn] is not None:
                    writes[turn].result()  # that buffer's bytes are written: it may be filled again
                    writes[turn] = None
                count = os.preadv(source_fd, [buffers[turn]], offset)
                if not count:
                    break
                piece = buffers[turn][:count]
                writes[turn] = writer.submit(_write_all, target_fd, piece, offset)
                sha.update(piece)
                offset += count
                if on_bytes is not None:
                    on_bytes(count)
                turn = (turn + 1) % COPY_BUFFERS
        finally:
            for pending in writes:
                if pending is not None:
                    pending.result()
    return sha.hexdigest()


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    start, length = offset, len(data)
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written
    # Start writing these pages to disk now (not waiting for them): the fsync at the end then has little left to do,
    # and the disk works while the next buffers are hashed.
    _start_writeback(fd, start, length)


_SYNC_FILE_RANGE_WRITE = 2
try:
    import ctypes

    _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
except (OSError, AttributeError):  # not Linux: the fsync does it all
    _sync_file_range = None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class _Progress:
    def __init__(self, total: int, report):
        self.total, self.done, self.report = total, 0, report
        self.started = self.shown = time.monotonic()
        self.lock = threading.Lock()

    def add(self, count: int):
        with self.lock:
            self.done += count
            now = time.monotonic()
            if now - self.shown < 0.5 and self.done < self.total:
                return
            self.shown = now
            rate = self.done / max(now - self.started, 1e-6)
        self.report.progress(100 * self.done / self.total if self.total else 100,
                             f"{human_size(self.done)} of {human_size(self.total)}, {human_size(rate)}/s")


# --- Checking ------------------------------------------------------------------------------------------------

@dataclass
class CheckResult:
    checked: int = 0
    bytes: int = 0
    dropped: list = field(default_factory=list)  # [path, reason]
    adopted: list = field(default_factory=list)  # found in the folder, not in the index, and matching the library

    def as_dict(self) -> dict:
        return asdict(self)


def check(*, report=None, root: Path | None = None, workers: int | None = None) -> CheckResult:
    """Hash every cached file again and drop each one that no longer matches the library's hash (damaged, or the
    library's file changed), or whose library file is gone or no longer trusted; drop links, leftovers of an
    interrupted copy and index entries whose file is gone. A file found in the folder that the index does not know
    is kept when it matches the library (an index lost), dropped otherwise."""
    report = report or NullReport()
    root = Path(root) if root is not None else root_of()
    result = CheckResult()
    with _locked(root):
        index = read_index(root)
        on_disk = []
        try:
            for folder, _dirs, files, links in safefs.walk(root, MODELS):
                here = PurePosixPath(folder).relative_to(MODELS)
                for name in links:
                    relpath = (here / name).as_posix()
                    _drop(root, index, relpath, "a link in the cache folder (never followed)", report)
                    result.dropped.append([relpath, "a link"])
                for name in files:
                    relpath = (here / name).as_posix()
                    if name.startswith(TEMP_PREFIX):
                        _remove(root, relpath)
                        report.log(f"removed {relpath}, left by an interrupted copy")
                        continue
                    on_disk.append(relpath)
        except safefs.UnsafePathError as exc:
            raise CacheError(str(exc)) from None
        present = set(on_disk)
        for relpath in [path for path in index["files"] if path not in present]:
            _drop(root, index, relpath, "gone from the cache folder", report)
            result.dropped.append([relpath, "gone from the cache folder"])
        assets = {}
        for start in range(0, len(on_disk), 900):
            chunk = on_disk[start:start + 900]
            assets.update((asset.path, asset) for asset in ModelAsset.objects.filter(path__in=chunk))
        todo = []
        for relpath in on_disk:
            asset = assets.get(relpath)
            untrusted = refusal(asset, relpath) if asset is not None else None
            if asset is None or untrusted:
                reason = ("no longer in the library" if asset is None
                          else f"the library no longer vouches for it: {untrusted}")
                _drop(root, index, relpath, reason, report)
                result.dropped.append([relpath, reason])
                continue
            todo.append((relpath, asset))
        total = sum(asset.size for _, asset in todo)
        report.log(f"{len(todo)} cached file(s) to hash ({human_size(total)})")
        progress = _Progress(total, report)
        workers = max(1, min(workers or settings.MODEL_HASH_WORKERS or os.cpu_count() or 1, len(todo) or 1))

        def digest_of(item):
            relpath, _asset = item
            try:
                fd = safefs.open_file(root, f"{MODELS}/{relpath}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
            except (OSError, safefs.UnsafePathError) as exc:
                return None, f"cannot be read ({exc})"
            try:
                sha = hashlib.sha256()
                buffer = memoryview(bytearray(hashing.CHUNK_SIZE))
                offset = 0
                while count := os.preadv(fd, [buffer], offset):
                    sha.update(buffer[:count])
                    offset += count
                    progress.add(count)
                return sha.hexdigest(), offset
            except OSError as exc:
                return None, f"cannot be read ({exc.strerror or exc})"
            finally:
                os.close(fd)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cache-check") as pool:
            digests = list(pool.map(digest_of, todo))
        for (relpath, asset), (digest, detail) in zip(todo, digests):
            result.checked += 1
            if digest is None:
                reason = detail
            elif digest != asset.sha256:
                reason = (f"its SHA-256 {digest[:12]}… no longer matches the library's {asset.sha256[:12]}… "
                          "(damaged, or the library's file changed)")
            else:
                result.bytes += detail
                if relpath not in index["files"]:
                    stamp = _now()
                    index["files"][relpath] = {"sha256": digest, "size": detail, "cached_at": stamp,
                                               "last_used_at": stamp}
                    result.adopted.append(relpath)
                    report.log(f"{relpath}: in the cache folder but not in its index; matches the library, kept")
                continue
            _drop(root, index, relpath, reason, report)
            result.dropped.append([relpath, reason])
        index["last_check"] = {"at": _now(), "checked": result.checked, "dropped": len(result.dropped)}
        _write_index(root, index)
    return result


# --- What the page and the CLI show ----------------------------------------------------------------------------

def status(*, root: Path | None = None, limit: int | None = None) -> dict:
    """The cache as its index records it (no hashing): files, bytes, limit, the last warm and check, and the files
    dropped lately (newest first)."""
    root = Path(root) if root is not None else root_of()
    limit = limit_bytes() if limit is None else limit
    index = read_index(root)
    files = sorted(({"path": path, **entry} for path, entry in index["files"].items()),
                   key=lambda entry: entry["last_used_at"], reverse=True)
    used = sum(entry["size"] for entry in files)
    return {
        "configured": True,
        "path": str(root),
        "files": len(files),
        "bytes": used,
        "limit_bytes": limit,
        "percent": round(100 * used / limit, 1) if limit else 0,
        "last_warm": index["last_warm"],
        "last_check": index["last_check"],
        "dropped": list(reversed(index["dropped"])),
        "entries": files,
    }
