"""Snapshots of an instance: archives under COMFY_BACKUPS_PATH, restores that swap in only complete trees, clones.

An instance's folder is written by code ComfyHub does not trust, so both directions treat it as hostile (see
docs/security.md). Creating walks the folder through descriptors (never following a link) and writes the tar stream
itself, leaving out, with a line in the operation's log, what a restore would refuse: links that resolve outside the
instance folder (chains included), devices, fifos, sockets. Restoring never trusts the archive: the hash is checked
first; the folders replaced come from the snapshot's kind, never from the archive; every member is checked (plain
folders, files and links only, inside those folders, every link resolving inside the instance over the whole
archive, a cap on what it unpacks to); it is extracted through descriptors into a staging folder ComfyHub made, with
PUID:PGID and sane modes, and only a complete extraction is swapped in, all or nothing.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import json
import os
import secrets
import shutil
import stat
import subprocess
import tarfile
import time
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from comfyhub.operations import NullReport

from . import layout, safefs
from .models import Snapshot

MANIFEST_NAME = "comfyhub-snapshot.json"
CONFIG_TREES = ("user",)
# Never home/ (HOME and caches: rebuilt by whatever filled them) or temp/; output/ and input/ only when asked.
FULL_TREES = ("user", "custom_nodes", "models", "python-packages")


class SnapshotError(Exception):
    pass


def backups_root() -> Path:
    return settings.COMFY_BACKUPS_PATH


# --- Is the backups folder shared? (moves and clones onto another node read snapshots through it) -----------------

MARKER_FOLDER = ".comfyhub-move-check"
# What travels through the shared backups folder, per user of the check.
_CARRIED = {"move": ("A move carries the instance as a snapshot", "move again"),
            "clone": ("A clone onto another node reads the snapshot", "clone again")}


def backups_marker_write(report) -> dict:
    """On the source: a marker file under the backups root, for the target to find at the same path."""
    name, token = secrets.token_hex(8), secrets.token_hex(16)
    folder = backups_root() / MARKER_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(token)
    report.log(f"wrote {folder / name}")
    return {"name": name, "token": token, "path": str(folder / name)}


def backups_marker_read(*, name, token, path, source_name, report, action="move") -> dict:
    """On the target: the source's marker must be there, at the same path, with its content; removed once read.
    `action` ("move" or "clone") only words the refusal."""
    from comfyhub.operations import OperationError

    carried, again = _CARRIED[action]
    here = backups_root() / MARKER_FOLDER / name
    try:
        found = here.read_text()
    except OSError:
        found = None
    if found != token:
        raise OperationError(
            f"This node does not see the backups folder node {source_name} wrote to: {path} is not here "
            f"(COMFY_BACKUPS_PATH is {backups_root()} on this node). {carried} "
            "through COMFY_BACKUPS_PATH, which must be one shared filesystem (NFS, CephFS, ...) mounted at the same "
            f"path on every node: mount it so, restart the agents, and {again}. Nothing was changed.")
    with contextlib.suppress(OSError):
        here.unlink()
    report.log(f"found the marker at {here}: the backups folder is shared")
    return {"seen": str(here)}


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
        "extra_env": dict(instance.extra_env), "image_arguments": instance.image_arguments,
        "host_port": instance.host_port,
        "gpus": instance.gpu_choice(),
        "template": instance.template.name if instance.template_id else None,
    }


COMFYUI_VERSION_LIMIT = 100


def comfyui_version(instance) -> str:
    """The ComfyUI version the instance reports: asked of the running instance (/system_stats), else the one its
    last health check recorded, else ''. The instance's answer is untrusted: only a short string is kept."""
    from instances import comfyui_api
    from instances.models import Instance

    version = None
    if instance.status not in (Instance.Status.NEW, Instance.Status.STOPPED):
        try:
            system = comfyui_api.ComfyUI.of(instance).system_stats().get("system")
        except comfyui_api.ComfyUIError:
            system = None
        if isinstance(system, dict):
            version = system.get("comfyui_version")
    if not isinstance(version, str) or not version:
        version = (instance.health if isinstance(instance.health, dict) else {}).get("comfyui_version")
    return version[:COMFYUI_VERSION_LIMIT] if isinstance(version, str) else ""


def custom_node_manifest(instance) -> list[dict]:
    """Each entry of custom_nodes/: its origin URL and commit, read as files (instances.gitrepo), never by running
    git, whose configuration the instance's code could have written. `dirty` is None: only git knows it. `record` is
    ComfyHub's record of the node (what a restore or clone brings back with the folder), None for one installed by
    hand."""
    from instances import gitrepo

    from . import safefs

    root = layout.instance_dir(instance.instance_id, instance.node)
    records = {node.name: node for node in instance.custom_nodes.all()}
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
        record = records.get(item["folder"]) if is_dir else None
        item["record"] = record and {"url": record.url, "ref": record.ref, "commit": record.commit,
                                     "requirements": record.requirements}
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


# --- Which folders a snapshot holds ---------------------------------------------------------------------------

def trees_for(kind: str, include_output: bool = False) -> tuple[str, ...]:
    """The instance folders a snapshot of this kind holds: the only paths a restore ever replaces. They come from
    the Snapshot row's kind (written by ComfyHub), never from anything inside the archive."""
    if kind == Snapshot.Kind.CONFIG:
        trees = CONFIG_TREES
    elif kind == Snapshot.Kind.FULL:
        trees = FULL_TREES
    else:
        raise SnapshotError(f"'{kind}' is not a snapshot kind (config or full); nothing was restored.")
    if include_output:
        # What the instance made and what people uploaded to it: both are its own, and in no other copy.
        trees += ("output", "input")
    return tuple(tree for tree in trees if tree in layout.INSTANCE_SUBDIRS)


MAX_DEPTH = 128  # folders nested deeper than this are left out of a snapshot (and logged)
MANIFEST_LIMIT = 1 << 20


def link_problem(path: str, target: str, kinds: dict[str, str], targets: dict[str, str]) -> str | None:
    """Why the link at `path` (relative to the instance folder) would lead outside that folder, or None when it
    stays inside, resolved through a virtual tree: `kinds` maps each relative path to 'dir', 'file' or 'link',
    `targets` each link to its target (safefs.link_problem follows the chains)."""
    return safefs.link_problem(path, target, lambda relpath: (kinds.get(relpath), targets.get(relpath)))


# --- Create ---------------------------------------------------------------------------------------------------

@dataclass
class _Content:
    """What a snapshot will hold, found by walking the instance folder without following any link."""
    trees: list[str] = field(default_factory=list)
    entries: list[tuple[str, str]] = field(default_factory=list)  # ('dir' | 'file', relative path), parents first
    links: list[tuple[str, str]] = field(default_factory=list)  # (relative path, target) that resolve inside
    skipped: list[dict] = field(default_factory=list)  # {'path', 'why'}: left out, each logged


def create(instance, *, kind: str, include_output: bool = False, note: str = "", user=None, automatic: str = "",
           report=None) -> Snapshot:
    report = report or NullReport()
    root = layout.instance_dir(instance.instance_id, instance.node)
    if not root.is_dir():
        raise SnapshotError(f"{root} does not exist: build the instance first.")
    try:
        content = _collect(root, trees_for(kind, include_output))
    except safefs.UnsafePathError as exc:
        raise SnapshotError(f"Cannot take a snapshot: {exc}") from exc
    for item in content.skipped:
        report.log(f"left out of the snapshot: {item['path']} ({item['why']})", "WARNING")
    manifest = {
        "format": 2, "kind": kind, "include_output": include_output, "trees": content.trees,
        "created_at": timezone.now().isoformat(), "instance": registry_config(instance),
        "custom_nodes": custom_node_manifest(instance), "skipped": content.skipped,
        "comfyui_version": comfyui_version(instance),
    }
    folder = backups_root() / instance.instance_id
    folder.mkdir(parents=True, exist_ok=True)
    stamp = timezone.now().strftime("%Y%m%d-%H%M%S")
    name = f"{instance.instance_id}-{kind}-{stamp}-{uuid.uuid4().hex[:6]}.tar.gz"
    final = folder / name
    partial = folder / f".{name}.partial"
    report.log(f"archiving {', '.join(content.trees) or 'nothing'} of {instance}")
    try:
        unpacked = _write_archive(partial, root, content, json.dumps(manifest, indent=2).encode(), report)
        digest, size = _sha256(partial)
        os.replace(partial, final)
    except OSError as exc:
        _cleanup(partial)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SnapshotError(f"The backups disk is full ({backups_root()}); free space and try again. "
                                "Nothing was written.") from exc
        raise
    except BaseException:
        _cleanup(partial)
        raise
    # What the archive unpacks to, measured while ComfyHub wrote it: the restore's size cap allows at least this
    # much for this archive (its hash is checked first, so it is exactly the archive measured).
    manifest["unpacked_bytes"] = unpacked
    snapshot = Snapshot.objects.create(
        instance=instance, instance_label=instance.instance_id, kind=kind, include_output=include_output,
        automatic=automatic, note=note, archive=str(final.relative_to(backups_root())), size=size, sha256=digest,
        manifest=manifest, created_by=user if user is not None and getattr(user, "is_authenticated", False) else None)
    report.log(f"snapshot {final.name}: {size} bytes, sha256 {digest}")
    return snapshot


def _collect(root: Path, trees) -> _Content:
    """Walk each tree through descriptors (O_NOFOLLOW at every level), then keep only the links that resolve inside
    the instance folder over the whole walked tree, chains included, as a restore will judge them."""
    content = _Content()
    kinds: dict[str, str] = {}
    targets: dict[str, str] = {}
    found_links: list[tuple[str, str]] = []
    for tree in trees:
        info = safefs.lstat(root, tree)
        if info is None:
            continue
        if stat.S_ISLNK(info.st_mode):
            with safefs.parent_of(root, tree) as (fd, name):
                target = os.readlink(name, dir_fd=fd)
            kinds[tree], targets[tree] = "link", target
            content.skipped.append({"path": tree, "target": target,
                                    "why": f"the folder is a link to {target}; ComfyHub never follows links in an "
                                           "instance folder"})
            continue
        if not stat.S_ISDIR(info.st_mode):
            content.skipped.append({"path": tree, "why": "not a folder"})
            continue
        content.trees.append(tree)
        content.entries.append(("dir", tree))
        kinds[tree] = "dir"
        _walk_tree(root, tree, content, kinds, targets, found_links)
    for path, target in found_links:
        problem = link_problem(path, target, kinds, targets)
        if problem:
            content.skipped.append({"path": path, "target": target,
                                    "why": f"a link that cannot be restored: {problem}"})
        else:
            content.links.append((path, target))
    return content


def _walk_tree(root: Path, tree: str, content: _Content, kinds, targets, found_links):
    top = safefs.open_dir(root, tree)
    stack = [(top, tree, iter(_listing(top)))]
    try:
        while stack:
            dir_fd, here, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                os.close(dir_fd)
                stack.pop()
                continue
            name, kind = entry
            path = f"{here}/{name}"
            if kind == "link":
                try:
                    target = os.readlink(name, dir_fd=dir_fd)
                except OSError:
                    continue  # removed meanwhile
                kinds[path], targets[path] = "link", target
                found_links.append((path, target))
            elif kind == "dir":
                if len(stack) >= MAX_DEPTH:
                    content.skipped.append({"path": path, "why": f"nested deeper than {MAX_DEPTH} folders"})
                    continue
                try:
                    child = os.open(name, safefs.DIR_FLAGS, dir_fd=dir_fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                        continue  # swapped for a link or removed since it was listed
                    raise
                kinds[path] = "dir"
                content.entries.append(("dir", path))
                stack.append((child, path, iter(_listing(child))))
            elif kind == "file":
                kinds[path] = "file"
                content.entries.append(("file", path))
            else:
                content.skipped.append({"path": path, "why": f"a {kind}, which a snapshot cannot hold"})
    finally:
        for dir_fd, _here, _entries in stack:
            os.close(dir_fd)


def _listing(dir_fd: int) -> list[tuple[str, str]]:
    found = []
    for entry in os.scandir(dir_fd):
        if entry.is_symlink():
            kind = "link"
        elif entry.is_dir(follow_symlinks=False):
            kind = "dir"
        elif entry.is_file(follow_symlinks=False):
            kind = "file"
        else:
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                continue
            kind = ("fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
                    else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
        found.append((entry.name, kind))
    found.sort()
    return found


class _DirCache:
    """Descriptors of folders below a trusted base, each reached through O_NOFOLLOW opens, a few kept open."""

    def __init__(self, open_rel, size: int = 32):
        self.open_rel, self.size, self.fds = open_rel, size, {}

    def get(self, relpath: str) -> int:
        if relpath in self.fds:
            return self.fds[relpath]
        if len(self.fds) >= self.size:
            oldest = next(iter(self.fds))
            os.close(self.fds.pop(oldest))
        self.fds[relpath] = fd = self.open_rel(relpath)
        return fd

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _write_archive(partial: Path, root: Path, content: _Content, manifest: bytes, report) -> int:
    """Write the archive: a tar stream made here, from descriptors, piped through gzip (as `tar -z` does) into
    `partial`, created exclusively. Returns the length of the uncompressed stream."""
    out_fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        gzip_process = subprocess.Popen(["gzip", "-c", "-6", "-n"], stdin=subprocess.PIPE, stdout=out_fd,
                                        stderr=subprocess.PIPE, bufsize=1 << 20)
    finally:
        os.close(out_fd)
    try:  # a bigger pipe lets this process and gzip work side by side instead of in turns
        fcntl.fcntl(gzip_process.stdin.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
    writer = _TarWriter(gzip_process.stdin)
    failure = None
    try:
        _write_members(writer, root, content, manifest, report)
        writer.finish()
    except BrokenPipeError as exc:
        failure = exc
    except BaseException:
        gzip_process.kill()
        gzip_process.wait()
        raise
    finally:
        try:
            gzip_process.stdin.close()
        except BrokenPipeError:
            pass
    errors = gzip_process.stderr.read().decode(errors="replace").strip()
    gzip_process.stderr.close()
    if gzip_process.wait() != 0 or failure is not None:
        message = errors or f"gzip exited with {gzip_process.returncode}"
        if "No space left" in message:
            raise OSError(errno.ENOSPC, message)
        raise SnapshotError(f"Creating the archive failed: {message}")
    return writer.count


def _write_members(writer, root: Path, content: _Content, manifest: bytes, report):
    info = tarfile.TarInfo(MANIFEST_NAME)
    info.size, info.mtime, info.mode = len(manifest), int(time.time()), 0o644
    writer.add(info, data=manifest)
    dirs = _DirCache(lambda relpath: safefs.open_dir(root, relpath))
    lost: list[str] = []  # folders that turned into something else while archived: their content is left out

    def parent_fd(path: str) -> int | None:
        parent = path.rpartition("/")[0]
        if any(parent == gone or parent.startswith(gone + "/") for gone in lost):
            return None
        try:
            return dirs.get(parent)
        except (OSError, safefs.UnsafePathError) as exc:
            lost.append(parent)
            report.log(f"left out of the snapshot: {root / parent} changed while it was archived ({exc})",
                       "WARNING")
            return None

    try:
        for kind, path in content.entries:
            fd = parent_fd(path)
            if fd is None:
                continue
            name = path.rpartition("/")[2]
            if kind == "dir":
                try:
                    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    lost.append(path)
                    continue
                if not stat.S_ISDIR(info.st_mode):
                    lost.append(path)
                    report.log(f"left out of the snapshot: {root / path} is no longer a folder", "WARNING")
                    continue
                writer.add_header(path, tarfile.DIRTYPE, info)
            else:
                _add_file(writer, fd, name, path, root, report)
        for path, target in content.links:
            fd = parent_fd(path)
            if fd is None:
                continue
            name = path.rpartition("/")[2]
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                now = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(info.st_mode) else None
            except OSError:
                continue
            if now != target:
                report.log(f"left out of the snapshot: the link {root / path} changed while it was archived",
                           "WARNING")
                continue
            writer.add_header(path, tarfile.SYMTYPE, info, linkname=target)
    finally:
        dirs.close()


def _add_file(writer, dir_fd: int, name: str, path: str, root: Path, report):
    # An O_PATH descriptor is looked at before anything is opened for reading: a device or fifo swapped in under
    # the name is never opened, and the file read is the very inode checked (reopened through /proc/self/fd).
    try:
        handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            report.log(f"left out of the snapshot: {root / path} became a link while it was archived", "WARNING")
            return
        raise
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            report.log(f"left out of the snapshot: {root / path} is no longer a plain file", "WARNING")
            return
        try:
            fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except FileNotFoundError:  # no /proc: open the name again, and make sure it is still the inode checked
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                         dir_fd=dir_fd)
            again = os.fstat(fd)
            if (again.st_dev, again.st_ino) != (info.st_dev, info.st_ino) or not stat.S_ISREG(again.st_mode):
                os.close(fd)
                report.log(f"left out of the snapshot: {root / path} changed while it was archived", "WARNING")
                return
    finally:
        os.close(handle)
    try:
        writer.add_file(path, info, fd, report=report, root=root)
    finally:
        os.close(fd)


class _TarWriter:
    """A POSIX (pax) tar stream written by hand, so every byte comes from a descriptor ComfyHub opened itself. Plain
    ustar headers are built directly (tarfile's are several times slower); anything they cannot hold (long or
    non-ASCII names, huge numbers) goes through tarfile's pax headers."""

    def __init__(self, out):
        self.out, self.count = out, 0

    def _write(self, data):
        self.out.write(data)
        self.count += len(data)

    def add(self, info: tarfile.TarInfo, *, data: bytes = b""):
        self._write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        self._write(data)
        self._pad(len(data))

    def add_header(self, path: str, kind: bytes, info: os.stat_result, *, size: int = 0, linkname: str = ""):
        mode, mtime = stat.S_IMODE(info.st_mode) & 0o777, max(0, int(info.st_mtime))
        header = _ustar_header(path, kind, mode, info.st_uid, info.st_gid, size, mtime, linkname)
        if header is None:
            slow = tarfile.TarInfo(path)
            slow.type, slow.mode, slow.mtime, slow.size, slow.linkname = kind, mode, mtime, size, linkname
            slow.uid, slow.gid = info.st_uid, info.st_gid
            header = slow.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self._write(header)

    def add_file(self, path: str, info: os.stat_result, fd: int, *, report=None, root=None):
        report = report or NullReport()
        self.add_header(path, tarfile.REGTYPE, info, size=info.st_size)
        remaining = info.st_size
        while remaining:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:  # shrank while read: the header already promised the size, so pad it
                report.log(f"{root / path} shrank while it was archived; its copy is padded with zeros", "WARNING")
                self._write(bytes(remaining))
                break
            self._write(chunk)
            remaining -= len(chunk)
        self._pad(info.st_size)

    def _pad(self, size: int):
        if size % tarfile.BLOCKSIZE:
            self._write(bytes(tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def finish(self):
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        if self.count % tarfile.RECORDSIZE:
            self._write(bytes(tarfile.RECORDSIZE - self.count % tarfile.RECORDSIZE))


def _ustar_header(name: str, kind: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
                  linkname: str) -> bytes | None:
    """A POSIX ustar header (as tarfile writes it), or None when a field does not fit one."""
    if kind == tarfile.DIRTYPE:
        name += "/"
    try:
        name_bytes, link_bytes = name.encode("ascii"), linkname.encode("ascii")
    except UnicodeEncodeError:
        return None
    if len(name_bytes) > 100 or len(link_bytes) > 100 or max(uid, gid) >= 8 ** 7 or max(size, mtime) >= 8 ** 11:
        return None
    header = b"".join((
        name_bytes.ljust(100, b"\0"), b"%07o\0" % mode, b"%07o\0" % uid, b"%07o\0" % gid, b"%011o\0" % size,
        b"%011o\0" % mtime, b" " * 8, kind, link_bytes.ljust(100, b"\0"), tarfile.POSIX_MAGIC, bytes(64 + 16),
        bytes(155 + 12)))
    return header[:148] + b"%06o\0" % sum(header) + header[155:]


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


# --- Check ----------------------------------------------------------------------------------------------------

def verify_archive(snapshot: Snapshot) -> Path:
    path = archive_path(snapshot)
    if not path.is_file():
        raise SnapshotError(f"The archive {snapshot.archive} is missing from {backups_root()}.")
    digest, _ = _sha256(path)
    if digest != snapshot.sha256:
        raise SnapshotError(f"The archive {snapshot.archive} is damaged: its SHA-256 is {digest}, the snapshot "
                            f"recorded {snapshot.sha256}. Nothing was restored.")
    return path


@dataclass
class Limit:
    """How many bytes an archive may unpack to, and why that many."""
    bytes: int
    reason: str
    disk: bool  # True when the free space, not the ratio, sets it


def unpacked_limit(snapshot: Snapshot, archive: Path, parent: Path) -> Limit:
    """RESTORE_MAX_UNPACKED_RATIO × the archive's size (or what ComfyHub measured when it wrote this very archive,
    when that is more), and never more than the free space of `parent`'s filesystem minus
    RESTORE_FREE_SPACE_MARGIN_MB."""
    size = archive.stat().st_size
    ratio = settings.RESTORE_MAX_UNPACKED_RATIO
    by_ratio = int(ratio * size)
    reason = (f"RESTORE_MAX_UNPACKED_RATIO ({ratio:g}) × the archive's {size} bytes; raise "
              "RESTORE_MAX_UNPACKED_RATIO if you trust this archive")
    recorded = snapshot.manifest.get("unpacked_bytes") if isinstance(snapshot.manifest, dict) else None
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > by_ratio:
        by_ratio = recorded
        reason = "the size ComfyHub measured when it wrote this archive"
    margin = settings.RESTORE_FREE_SPACE_MARGIN_MB * (1 << 20)
    disk = os.statvfs(parent)
    free = disk.f_bavail * disk.f_frsize - margin
    if free < by_ratio:
        return Limit(max(free, 0), f"the free space of the disk holding {parent} ({disk.f_bavail * disk.f_frsize} "
                                   f"bytes) minus RESTORE_FREE_SPACE_MARGIN_MB "
                                   f"({settings.RESTORE_FREE_SPACE_MARGIN_MB} MB)", True)
    return Limit(by_ratio, reason, False)


class _TarInfo(tarfile.TarInfo):
    """Keeps the names of the tar header itself when a pax header overrides them, so the two can be compared."""
    header_name = None
    header_linkname = None

    def _apply_pax_info(self, pax_headers, encoding, errors):
        self.header_name, self.header_linkname = self.name, self.linkname
        super()._apply_pax_info(pax_headers, encoding, errors)


class _Counted:
    """The decompressed stream, counted: reading past the limit stops, whatever the headers claim."""

    def __init__(self, raw, limit: Limit, slack: int = 4 * tarfile.RECORDSIZE):
        self.raw, self.limit, self.allowed, self.count = raw, limit, limit.bytes + slack, 0

    def read(self, size=-1):
        if size is None or size < 0:
            size = self.allowed - self.count + 1
        data = self.raw.read(size)
        self.count += len(data)
        if self.count > self.allowed:
            raise SnapshotError(_over_limit("", self.count, self.limit))
        return data


def _over_limit(name: str, total: int, limit: Limit) -> str:
    if limit.disk:
        return (f"The disk is too full to restore: the archive unpacks to at least {total} bytes"
                + (f" (at the entry '{name}')" if name else "")
                + f" but only {limit.bytes} bytes may be used ({limit.reason}). Free space and try again; "
                "nothing was restored.")
    return (f"Refused: the archive unpacks to more than {limit.bytes} bytes"
            + (f" (at the entry '{name}', {total} bytes so far)" if name else "")
            + f", the cap set by {limit.reason}. Nothing was restored.")


@contextmanager
def _open_tar(archive: Path, limit: Limit):
    try:
        with gzip.open(archive, "rb") as raw:
            with tarfile.open(fileobj=_Counted(raw, limit), mode="r|", tarinfo=_TarInfo) as tar:
                yield tar
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise SnapshotError(f"The archive cannot be read as a gzipped tar file ({exc}); nothing was restored.") \
            from exc


ALLOWED_TYPES = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir",
                 tarfile.SYMTYPE: "link", tarfile.LNKTYPE: "hardlink"}
REFUSED_TYPES = {tarfile.CHRTYPE: "a device (character device)", tarfile.BLKTYPE: "a device (block device)",
                 tarfile.FIFOTYPE: "a pipe (fifo)", tarfile.CONTTYPE: "a contiguous file",
                 tarfile.GNUTYPE_SPARSE: "a sparse file"}


@dataclass
class Plan:
    """An archive that passed every check: its members in order, the trees it will replace, what it unpacks to."""
    members: list[tuple[str, bytes, int, str]]  # (path, type, size, link target) exactly as checked
    trees: list[str]
    unpacked: int
    manifest: dict
    limit: Limit


def _member_path(raw_name: str, what: str = "entry") -> tuple[str, ...]:
    if "\0" in raw_name:
        raise SnapshotError(f"Refused: the archive {what} {raw_name!r} holds a NUL byte in its name.")
    path = PurePosixPath(raw_name)
    if raw_name.startswith("/") or ".." in path.parts:
        raise SnapshotError(f"Refused: the archive {what} '{raw_name}' points outside the instance.")
    parts = tuple(part for part in path.parts if part not in ("", "."))
    if not parts:
        raise SnapshotError(f"Refused: the archive {what} '{raw_name}' has no name.")
    return parts


def inspect_archive(archive: Path, allowed_trees, limit: Limit, kind: str = "") -> Plan:
    """Every member checked, or SnapshotError naming the first that is not a plain folder, file or link inside the
    allowed trees, or whose link would lead outside the instance folder, judged over the whole archive."""
    allowed = tuple(allowed_trees)
    kinds: dict[str, str] = {}
    targets: dict[str, str] = {}
    symlinks: list[str] = []
    members = []
    manifest = None
    unpacked = 0
    described = f"a {kind} snapshot" if kind else "this snapshot"
    with _open_tar(archive, limit) as tar:
        for member in tar:
            raw = member.name
            if member.type in REFUSED_TYPES or member.type not in ALLOWED_TYPES:
                what = REFUSED_TYPES.get(member.type, f"an entry of unknown type {member.type!r}")
                raise SnapshotError(f"Refused: the archive entry '{raw}' is {what}; a snapshot holds only folders, "
                                    "files and links.")
            if any(key.startswith("GNU.sparse") for key in member.pax_headers):
                raise SnapshotError(f"Refused: the archive entry '{raw}' is a sparse file (pax sparse headers).")
            parts = _member_path(raw)
            for field_name, header_value, value in (("name", member.header_name, raw),
                                                     ("link target", member.header_linkname, member.linkname)):
                if header_value and header_value != value:
                    shown = tuple(p for p in PurePosixPath(header_value).parts if p not in ("", "."))
                    if header_value.startswith("/") or ".." in shown or "\0" in header_value or (
                            field_name == "name" and shown[:1] != parts[:1]):
                        raise SnapshotError(f"Refused: the archive entry '{raw}' has a pax header naming its "
                                            f"{field_name} '{value}' while its tar header says '{header_value}'.")
            path = "/".join(parts)
            kind_of_member = ALLOWED_TYPES[member.type]
            end = member.offset_data + (tarfile.BLOCKSIZE * -(-member.size // tarfile.BLOCKSIZE)
                                        if kind_of_member == "file" else 0)
            unpacked = max(unpacked, end)
            if unpacked > limit.bytes:
                raise SnapshotError(_over_limit(raw, unpacked, limit))
            if path == MANIFEST_NAME:
                if kind_of_member != "file" or manifest is not None or member.size > MANIFEST_LIMIT:
                    raise SnapshotError(f"Refused: the archive's {MANIFEST_NAME} is not one plain file under "
                                        f"{MANIFEST_LIMIT} bytes.")
                manifest = tar.extractfile(member).read(MANIFEST_LIMIT + 1)
                members.append((path, member.type, member.size, ""))
                continue
            if parts[0] not in allowed:
                raise SnapshotError(f"Refused: the archive entry '{raw}' is not part of {described} (which holds "
                                    f"only {', '.join(allowed)}).")
            if len(parts) == 1 and kind_of_member != "dir":
                raise SnapshotError(f"Refused: the archive entry '{raw}' must be a folder: it is the instance's "
                                    f"{parts[0]}/ folder.")
            if path in kinds:
                raise SnapshotError(f"Refused: the archive entry '{raw}' appears twice in the archive.")
            for depth in range(1, len(parts)):
                above = "/".join(parts[:depth])
                known = kinds.get(above)
                if known is None:
                    kinds[above] = "dir"  # a folder the archive implies without listing it
                elif known != "dir":
                    raise SnapshotError(f"Refused: the archive entry '{raw}' lies under '{above}', which is a "
                                        f"{'link' if known == 'link' else 'file'} in the archive.")
            linkname = ""
            if kind_of_member == "link":
                linkname = member.linkname
                if not linkname or "\0" in linkname or linkname.startswith("/"):
                    raise SnapshotError(f"Refused: the link '{raw}' points to {linkname!r}, outside the instance.")
                targets[path] = linkname
                symlinks.append(path)
                kinds[path] = "link"
            elif kind_of_member == "hardlink":
                source = "/".join(_member_path(member.linkname, "hard link target"))
                if kinds.get(source) != "file" or source == MANIFEST_NAME:
                    raise SnapshotError(f"Refused: the hard link '{raw}' points to '{member.linkname}', which is "
                                        "not a plain file earlier in the archive.")
                linkname = source
                kinds[path] = "file"
            else:
                kinds[path] = kind_of_member
            members.append((path, member.type, member.size if kind_of_member == "file" else 0, linkname))
    if manifest is None:
        raise SnapshotError(f"The archive has no {MANIFEST_NAME}: not a ComfyHub snapshot. Nothing was restored.")
    try:
        manifest = json.loads(manifest)
    except (ValueError, RecursionError) as exc:
        raise SnapshotError(f"The archive's {MANIFEST_NAME} is not valid JSON ({exc}).") from exc
    if not isinstance(manifest, dict):
        raise SnapshotError(f"The archive's {MANIFEST_NAME} is not a JSON object.")
    listed = manifest.get("trees", [])
    if not isinstance(listed, list) or any(not isinstance(t, str) or t not in allowed for t in listed):
        extra = [t for t in listed if t not in allowed] if isinstance(listed, list) else [listed]
        raise SnapshotError(f"Refused: the archive's {MANIFEST_NAME} lists the folder(s) {extra!r}, which "
                            f"{described} never holds (only {', '.join(allowed)}): a forged archive. Nothing was "
                            "restored.")
    for path in symlinks:
        problem = link_problem(path, targets[path], kinds, targets)
        if problem:
            raise SnapshotError(f"Refused: the link '{path}' points to '{targets[path]}', outside the instance: "
                                f"{problem}.")
    trees = [tree for tree in allowed if kinds.get(tree) == "dir"]
    return Plan(members, trees, unpacked, manifest, limit)


def check_members(archive: Path, allowed_trees, limit: Limit | None = None) -> list:
    """The members (path, type, size, link target) of an archive that passes every check, or SnapshotError."""
    limit = limit or Limit(int(settings.RESTORE_MAX_UNPACKED_RATIO * archive.stat().st_size),
                           f"RESTORE_MAX_UNPACKED_RATIO ({settings.RESTORE_MAX_UNPACKED_RATIO:g})", False)
    return inspect_archive(archive, allowed_trees, limit).members


def check_archive(snapshot: Snapshot, parent: Path) -> Plan:
    """Hash, then every member, against the trees of the snapshot's kind and the size cap for `parent`'s disk."""
    archive = verify_archive(snapshot)
    allowed = trees_for(snapshot.kind, snapshot.include_output)
    return inspect_archive(archive, allowed, unpacked_limit(snapshot, archive, parent), snapshot.kind)


def read_manifest(archive: Path) -> dict:
    with tarfile.open(archive, "r:gz") as tar:
        try:
            member = tar.getmember(MANIFEST_NAME)
        except KeyError as exc:
            raise SnapshotError("The archive has no comfyhub-snapshot.json: not a ComfyHub snapshot.") from exc
        if not member.isfile() or member.size > MANIFEST_LIMIT:
            raise SnapshotError(f"The archive's {MANIFEST_NAME} is not a plain file under {MANIFEST_LIMIT} bytes.")
        try:
            return json.loads(tar.extractfile(member).read(MANIFEST_LIMIT))
        except (ValueError, RecursionError) as exc:
            raise SnapshotError(f"The archive's {MANIFEST_NAME} is not valid JSON ({exc}).") from exc


# --- Extract and swap -----------------------------------------------------------------------------------------

@dataclass
class Staging:
    """A folder ComfyHub made for one restore: created exclusively under a random name, used only through its
    descriptor (`fd`), inside `parent_fd`."""
    parent: Path
    parent_fd: int
    name: str
    fd: int

    @property
    def path(self) -> Path:
        return self.parent / self.name

    def open_rel(self, relpath: str) -> int:
        """A descriptor of a folder inside the staging folder, every component opened with O_NOFOLLOW."""
        fd = os.dup(self.fd)
        try:
            for part in safefs.parts_of(relpath):
                next_fd = os.open(part, safefs.DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def remove(self):
        try:
            shutil.rmtree(self.name, dir_fd=self.parent_fd)
        except FileNotFoundError:
            pass

    def close(self):
        for fd in (self.fd, self.parent_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def make_staging(parent: Path, prefix: str = ".restore-") -> Staging:
    parent_fd = safefs.open_root(parent)
    try:
        for _ in range(100):
            name = f"{prefix}{secrets.token_hex(8)}"
            try:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            except FileExistsError:
                continue
            return Staging(parent, parent_fd, name, os.open(name, safefs.DIR_FLAGS, dir_fd=parent_fd))
        raise SnapshotError(f"Could not create a staging folder in {parent}.")
    except BaseException:
        os.close(parent_fd)
        raise


def staging_parent(root: Path) -> Path:
    """Next to the instance (a folder the container cannot write) when that is the same filesystem, so the swap is
    a rename; otherwise inside the instance, where the staging folder is still made exclusively and used by
    descriptor only."""
    try:
        if os.stat(root, follow_symlinks=False).st_dev != os.stat(root.parent).st_dev:
            return root
    except FileNotFoundError:
        pass
    return root.parent


def extract_to_staging(archive: Path, staging: Staging, plan: Plan, report=None) -> None:
    """Extract the checked archive into the staging folder, through descriptors only, reading the archive again
    and comparing every member with what was checked. Files, folders and links get PUID:PGID (when running as
    root) and sane modes: no setuid, setgid or sticky bit, nothing writable by group or others."""
    report = report or NullReport()
    expected = iter(plan.members)
    written = 0
    dirs = _DirCache(staging.open_rel)
    folders: dict[str, tuple[int, int]] = {}  # path -> (mode, mtime), set once everything inside is written
    made: set[str] = set()

    def folder_fd(relpath: str) -> int:
        if relpath and relpath not in made:
            parts = relpath.split("/")
            for depth in range(1, len(parts) + 1):
                above = "/".join(parts[:depth])
                if above in made:
                    continue
                fd = dirs.get("/".join(parts[:depth - 1]))
                os.mkdir(parts[depth - 1], 0o700, dir_fd=fd)
                made.add(above)
                folders.setdefault(above, (0o755, 0))
        return dirs.get(relpath)

    try:
        with _open_tar(archive, plan.limit) as tar:
            for member in tar:
                checked = next(expected, None)
                path = "/".join(p for p in PurePosixPath(member.name).parts if p not in ("", "."))
                if checked is None or checked[0] != path or checked[1] != member.type:
                    raise SnapshotError(f"The archive changed while it was read (at '{member.name}'); nothing was "
                                        "restored.")
                if path == MANIFEST_NAME:
                    continue
                parent, _, name = path.rpartition("/")
                if member.type == tarfile.DIRTYPE:
                    folder_fd(path)
                    folders[path] = (_sane_mode(member.mode, True), _sane_time(member.mtime))
                    continue
                fd = folder_fd(parent)
                if member.type == tarfile.SYMTYPE:
                    os.symlink(checked[3], name, dir_fd=fd)
                    if os.geteuid() == 0:
                        os.chown(name, settings.PUID, settings.PGID, dir_fd=fd, follow_symlinks=False)
                elif member.type == tarfile.LNKTYPE:
                    source_parent, _, source_name = checked[3].rpartition("/")
                    os.link(source_name, name, src_dir_fd=folder_fd(source_parent), dst_dir_fd=fd,
                            follow_symlinks=False)
                else:
                    if member.size != checked[2]:
                        raise SnapshotError(f"The archive changed while it was read (at '{member.name}').")
                    written = _extract_file(tar, member, fd, name, written, plan.limit)
        if next(expected, None) is not None:
            raise SnapshotError("The archive changed while it was read (it ended early); nothing was restored.")
        for path in sorted(folders, key=lambda p: -p.count("/")):
            mode, mtime = folders[path]
            fd = dirs.get(path)
            os.chmod(fd, mode)
            safefs.chown_fd(fd)
            if mtime:
                os.utime(fd, (mtime, mtime))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SnapshotError(f"The disk filled up while extracting into {staging.parent}; the instance was left "
                                "exactly as it was. Free space and try again.") from exc
        raise
    finally:
        dirs.close()
    report.log(f"extracted {written} bytes of files")


def _extract_file(tar, member, dir_fd: int, name: str, written: int, limit: Limit) -> int:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        source = tar.extractfile(member)
        while chunk := source.read(1 << 20):
            written += len(chunk)
            if written > limit.bytes:
                raise SnapshotError(_over_limit(member.name, written, limit))
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fchmod(fd, _sane_mode(member.mode, False))
        safefs.chown_fd(fd)
        mtime = _sane_time(member.mtime)
        os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)
    return written


def _sane_mode(mode: int, folder: bool) -> int:
    """No setuid/setgid/sticky, no write for group or others; the owner may always read and write (and enter)."""
    return (mode & 0o755) | (0o700 if folder else 0o600)


def _sane_time(mtime) -> int:
    try:
        return min(max(int(mtime), 0), 2 ** 33)
    except (TypeError, ValueError, OverflowError):
        return 0


def swap_in(staging: Staging, root: Path, trees) -> None:
    """Replace root/<tree> with the staging folder's <tree>, for each tree; all or nothing. The folders replaced
    are moved into the staging folder (out of the container's reach) and go with it; when any step fails, every
    step done is undone and a SnapshotError raised (the instance exactly as before)."""
    root_fd = safefs.open_root(root)
    done: list[list] = []  # [tree, previous moved aside, incoming moved in]
    try:
        for tree in trees:
            step = [tree, False, False]
            done.append(step)
            if _lexists(root_fd, tree):
                safefs.rename_noreplace(root_fd, tree, staging.fd, f".previous-{tree}")
                step[1] = True
            safefs.rename_noreplace(staging.fd, tree, root_fd, tree)
            step[2] = True
    except BaseException as exc:
        failed_at = done[-1][0] if done else "?"
        problems = _undo_swap(staging, root_fd, done)
        os.close(root_fd)
        if problems:
            raise SnapshotError(f"Swapping '{failed_at}' into {root} failed ({exc}), and putting everything back "
                                f"failed too: {'; '.join(problems)}. The previous folders are kept in "
                                f"{staging.path}.") from exc
        raise SnapshotError(f"Swapping the restored '{failed_at}' into {root} failed ({exc}); the instance was "
                            "left exactly as it was.") from exc
    os.close(root_fd)


def _undo_swap(staging: Staging, root_fd: int, done) -> list[str]:
    problems = []
    for tree, had_previous, moved_in in reversed(done):
        try:
            if moved_in:
                safefs.rename_noreplace(root_fd, tree, staging.fd, tree)
            if had_previous:
                try:
                    safefs.rename_noreplace(staging.fd, f".previous-{tree}", root_fd, tree)
                except FileExistsError:  # something was made meanwhile under the name: the previous folder wins
                    safefs.rename_noreplace(root_fd, tree, staging.fd, f".intruder-{tree}")
                    safefs.rename_noreplace(staging.fd, f".previous-{tree}", root_fd, tree)
        except OSError as exc:
            problems.append(f"{tree}: {exc}")
    return problems


def _lexists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def restore_files(snapshot: Snapshot, instance, report=None) -> list[str]:
    """Put the snapshot's trees back into `instance`'s folder (which must exist). Only the folders of the
    snapshot's kind are replaced; anything that fails leaves the instance as it was and no staging folder."""
    report = report or NullReport()
    root = layout.instance_dir(instance.instance_id, instance.node)
    root.mkdir(parents=True, exist_ok=True)
    parent = staging_parent(root)
    try:
        plan = check_archive(snapshot, parent)
        report.log(f"extracting {', '.join(plan.trees) or 'nothing'} ({plan.unpacked} bytes) into a staging "
                   "folder")
        staging = make_staging(parent)
    except safefs.UnsafePathError as exc:
        raise SnapshotError(str(exc)) from exc
    try:
        extract_to_staging(archive_path(snapshot), staging, plan, report)
        report.log("swapping the restored folders in")
        swap_in(staging, root, plan.trees)
    except safefs.UnsafePathError as exc:
        raise SnapshotError(str(exc)) from exc
    finally:
        staging.remove()
        staging.close()
    return plan.trees


def restore_clone(snapshot: Snapshot, new_root: Path, report=None) -> dict:
    """Extract into a brand-new instance folder (staged next to it, renamed into place when complete)."""
    if os.path.lexists(new_root):
        raise SnapshotError(f"{new_root} already exists; pick another id.")
    new_root.parent.mkdir(parents=True, exist_ok=True)
    try:
        plan = check_archive(snapshot, new_root.parent)
        staging = make_staging(new_root.parent)
    except safefs.UnsafePathError as exc:
        raise SnapshotError(str(exc)) from exc
    try:
        extract_to_staging(archive_path(snapshot), staging, plan, report)
        os.chmod(staging.fd, 0o755)
        safefs.chown_fd(staging.fd)
        try:
            safefs.rename_noreplace(staging.parent_fd, staging.name, staging.parent_fd, new_root.name)
        except FileExistsError as exc:
            raise SnapshotError(f"{new_root} appeared while the clone was extracted; pick another id.") from exc
    except BaseException:
        staging.remove()
        raise
    finally:
        staging.close()
    return snapshot.manifest if isinstance(snapshot.manifest, dict) and snapshot.manifest else plan.manifest


def restore_node_records(instance, manifest, report=None) -> None:
    """Make the instance's custom-node records match the custom_nodes/ a snapshot just put back: a record for each
    node the snapshot recorded whose folder is there now (as recorded then: URL, ref, commit, requirements), none
    for the others. A snapshot taken before the manifest held the records gives a record to each git folder with an
    origin URL. Enabled or disabled is the folder's own name, restored with it. The manifest may come from an
    archive: only well-formed entries are used."""
    from instances import customnodes
    from instances.models import CustomNode

    report = report or NullReport()
    wanted = {}
    entries = manifest.get("custom_nodes") if isinstance(manifest, dict) else None
    for item in entries if isinstance(entries, list) else []:
        if not isinstance(item, dict) or item.get("file"):
            continue
        record = item.get("record") if "record" in item else {
            "url": item.get("git_url"), "ref": "", "commit": item.get("commit"),
            "requirements": "\n".join(line for line in item.get("pip") or [] if isinstance(line, str))}
        if not isinstance(record, dict):
            continue  # installed by hand: no record
        fields = {key: record.get(key) if isinstance(record.get(key), str) else "" for key in
                  ("url", "ref", "commit", "requirements")}
        name = item.get("folder")
        try:
            customnodes.check_name(name if isinstance(name, str) else "")
        except customnodes.CustomNodeError:
            continue
        if (not fields["url"] or len(fields["url"]) > 500 or len(fields["ref"]) > 200 or len(fields["commit"]) > 64
                or customnodes.folder_name(instance, name) is None):
            continue
        wanted[name] = fields
    with transaction.atomic():
        gone = list(instance.custom_nodes.exclude(name__in=list(wanted)).values_list("name", flat=True))
        instance.custom_nodes.filter(name__in=gone).delete()
        for name, fields in wanted.items():
            CustomNode.objects.update_or_create(instance=instance, name=name, defaults=fields)
    report.log(f"custom-node records: {', '.join(sorted(wanted)) or 'none'}"
               + (f"; removed with their folders: {', '.join(sorted(gone))}" if gone else ""))


# --- The restore and clone operations (their jobs: storage_app.jobs) ---------------------------------------------

def restore_into_instance(*, snapshot_pk, user_pk=None, report) -> dict:
    """Check the archive, snapshot what is there now, then, holding the instance's lock from the stop to the start
    (no other operation on the instance runs in between): stop, swap in the archived trees, restore the registry
    settings, start again."""
    from django.contrib.auth import get_user_model
    from django.core.exceptions import ValidationError

    from comfyhub.operations import OperationError
    from instances import containers, services as instance_services
    from instances.models import Instance

    snapshot = Snapshot.objects.select_related("instance__node").get(pk=snapshot_pk)
    instance = snapshot.instance
    if instance is None:
        raise OperationError(f"Instance '{snapshot.instance_label}' no longer exists; clone the snapshot instead.")
    user = get_user_model().objects.filter(pk=user_pk).first() if user_pk else None
    root = layout.instance_dir(instance.instance_id, instance.node)
    try:
        report.progress(2, "checking the archive")
        plan = check_archive(snapshot, staging_parent(root))  # refuse before anything changes
        report.log(f"the archive passed every check: {', '.join(plan.trees) or 'nothing'} to restore, "
                   f"{plan.unpacked} bytes unpacked (at most {plan.limit.bytes})")
        for item in (snapshot.manifest or {}).get("skipped", []) if isinstance(snapshot.manifest, dict) else []:
            report.log(f"not in this snapshot (left out when it was taken): {item.get('path')} ({item.get('why')})",
                       "WARNING")
        report.progress(5, "taking a snapshot of the current state first")
        undo = create(instance, kind=snapshot.kind, include_output=snapshot.include_output,
                      note=f"automatic, before restoring snapshot {snapshot.pk}", user=user, automatic="before-restore",
                      report=report)
    except SnapshotError as exc:
        message = str(exc)
        raise OperationError(message if "Nothing was restored" in message or "nothing was restored" in message
                             else f"{message} Nothing was restored.") from exc
    with containers.instance_lock(instance, report):
        try:
            instance.refresh_from_db()  # a start or stop may have run while the undo snapshot was taken
        except Instance.DoesNotExist:
            raise OperationError(f"Instance '{instance}' was deleted meanwhile; nothing was restored (undo snapshot "
                                 f"{undo.pk} kept).") from None
        was_running = instance.desired_state == Instance.DesiredState.RUNNING
        if was_running:
            report.progress(20, "stopping the instance")
            containers.stop(instance, report)
        try:
            report.progress(30, "restoring files")
            trees = restore_files(snapshot, instance, report)
        except (SnapshotError, OSError) as exc:
            if was_running:
                containers.start(instance, report)
            raise OperationError(f"{exc} The instance was left as it was (undo snapshot {undo.pk} kept).") from exc
        if "custom_nodes" in trees:
            restore_node_records(instance, snapshot.manifest, report)
        config = snapshot.manifest.get("instance", {})
        try:
            instance_services.instance_update(
                instance=instance, display_name=config.get("display_name", instance.display_name),
                description=config.get("description", instance.description),
                image=config.get("image", instance.image), extra_args=config.get("extra_args", []),
                extra_env=config.get("extra_env", {}), host_port=None,
                gpu_indexes=instance.gpu_choice(),
                image_arguments=config.get("image_arguments"), user=user)
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


def clone_into_new_instance(*, snapshot_pk, new_instance_id, gpu_indexes, node_pk=None, marker=None, user_pk=None,
                            report) -> dict:
    """Create the new instance from the snapshot's registry settings, then extract the archive into its folder and
    bring the custom-node records with the folders. On another node (`node_pk`, run by its agent) the hub's
    `marker` must be seen here first: the archive is read through the shared COMFY_BACKUPS_PATH. When it fails,
    nothing is left registered and no folder it made is left on disk."""
    from django.contrib.auth import get_user_model
    from django.core.exceptions import ValidationError
    from django.db import DatabaseError

    from comfyhub.operations import OperationError
    from instances import services as instance_services
    from instances.models import LOCAL_NODE, Node

    snapshot = Snapshot.objects.get(pk=snapshot_pk)
    user = get_user_model().objects.filter(pk=user_pk).first() if user_pk else None
    node = Node.objects.filter(pk=node_pk).first() if node_pk else None
    if node_pk and node is None:
        raise OperationError("The target node no longer exists; nothing was created.")
    if marker:
        backups_marker_read(**marker, source_name=LOCAL_NODE, action="clone", report=report)
    config = snapshot.manifest.get("instance", {})
    try:
        verify_archive(snapshot)
        instance = instance_services.instance_create(
            instance_id=new_instance_id, display_name=config.get("display_name", ""),
            description=config.get("description", ""), image=config.get("image", ""),
            extra_args=config.get("extra_args", []), extra_env=config.get("extra_env", {}),
            image_arguments=config.get("image_arguments", "command"), gpu_indexes=gpu_indexes, node=node, user=user)
    except SnapshotError as exc:
        raise OperationError(f"{exc} Nothing was created.") from exc
    except ValidationError as exc:
        raise OperationError("Cannot create the clone: " + "; ".join(exc.messages)) from exc
    extracted = False
    try:
        report.progress(30, "extracting into the new instance's folder"
                        + (f" on node {instance.node}" if node is not None else ""))
        manifest = restore_clone(snapshot, layout.instance_dir(new_instance_id, instance.node), report)
        extracted = True
        layout.build_shared_tree(instance.node)
        layout.build_instance_tree(new_instance_id, instance.node)
        restore_node_records(instance, manifest, report)
    except (SnapshotError, OSError, DatabaseError, layout.LayoutError) as exc:
        instance.delete()
        if extracted:  # only the folder this clone made; one that was there before is never touched
            with contextlib.suppress(layout.LayoutError, OSError):
                instance_services.purge_instance_data(new_instance_id, instance.node)
        raise OperationError(f"{exc} The clone was not created.") from exc
    report.progress(100, f"cloned into {new_instance_id}" + (f" on node {instance.node}" if node is not None else ""))
    return {"instance": new_instance_id, "node": instance.node.name, "port": instance.host_port,
            "gpus": [g.index for g in instance.assigned_gpus()]}


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
    version = snapshot.manifest.get("comfyui_version")
    return {"comfyui": version if isinstance(version, str) else "", "git_custom_nodes": git_nodes,
            "file_custom_nodes": file_nodes, "pips": pips}


def manager_extras(data) -> tuple[list[str], list[str]]:
    """What a ComfyUI-Manager snapshot holds besides git nodes: single-file nodes and pip packages (its shape was
    checked by parse_manager)."""
    files = [item["filename"] if isinstance(item, dict) else item for item in data.get("file_custom_nodes") or []]
    return files, list(data.get("pips") or {})


def parse_manager(data) -> list[dict]:
    """The git nodes of a ComfyUI-Manager snapshot: [{url, commit, disabled}]. Every part a person's file may get
    wrong is checked here, so the import never stumbles on a list where an object belongs."""
    from comfyhub.jsonlimits import kind_of

    if not isinstance(data, dict):
        raise SnapshotError(f"Not a ComfyUI-Manager snapshot: the JSON is {kind_of(data)}, not an object with "
                            "'git_custom_nodes'.")
    if not data.keys() & {"comfyui", "git_custom_nodes", "file_custom_nodes", "pips"}:
        raise SnapshotError("Not a ComfyUI-Manager snapshot: it has none of 'comfyui', 'git_custom_nodes', "
                            "'file_custom_nodes' and 'pips'. Pick the .json file ComfyUI-Manager saved.")
    git_nodes = data.get("git_custom_nodes")
    if git_nodes is None:
        git_nodes = {}
    if not isinstance(git_nodes, dict):
        raise SnapshotError(f"Not a ComfyUI-Manager snapshot: 'git_custom_nodes' is {kind_of(git_nodes)}; it "
                            'should be an object of git URLs, e.g. {"https://github.com/o/n": {"hash": "...", '
                            '"disabled": false}}.')
    nodes = []
    for url, info in git_nodes.items():
        shown = url[:200]
        if not url.strip():
            raise SnapshotError("'git_custom_nodes' has an empty URL; every key is a custom node's git URL.")
        if info is None:
            info = {}
        if not isinstance(info, dict):
            raise SnapshotError(f"'git_custom_nodes' → '{shown}' is {kind_of(info)}; it should be an object with "
                                "'hash' and 'disabled'.")
        commit = info.get("hash")
        if commit is not None and not isinstance(commit, str):
            raise SnapshotError(f"'git_custom_nodes' → '{shown}' → 'hash' is {kind_of(commit)}; it should be a "
                                "commit (a string).")
        if not isinstance(info.get("disabled", False), (bool, type(None))):
            raise SnapshotError(f"'git_custom_nodes' → '{shown}' → 'disabled' is {kind_of(info['disabled'])}; it "
                                "should be true or false.")
        nodes.append({"url": url, "commit": commit or "", "disabled": bool(info.get("disabled"))})
    files = data.get("file_custom_nodes") or []
    if not isinstance(files, list) or not all(
            isinstance(item, str) or (isinstance(item, dict) and isinstance(item.get("filename"), str))
            for item in files):
        raise SnapshotError("'file_custom_nodes' should be a list of file names or of objects with a 'filename' "
                            "string.")
    pips = data.get("pips") or {}
    if not isinstance(pips, dict):
        raise SnapshotError(f"'pips' is {kind_of(pips)}; it should be an object whose keys are pip requirements.")
    return nodes
