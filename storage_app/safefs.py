"""File operations inside a tree that hostile code can write: an instance's folder (custom nodes run there with write
access) and, where ComfyHub writes into it, the shared library.

Every function takes a trusted `root` (a folder ComfyHub made, whose parents the container cannot change) and a
path relative to it, and walks that path one component at a time through directory file descriptors opened with
O_NOFOLLOW. So no link is ever followed, at any depth, and a link swapped in between a check and a use changes
nothing: the check and the use happen on the same descriptor. Files are created exclusively (O_CREAT|O_EXCL) under
random names, ownership is changed on descriptors (never through a name), and renames never replace unless asked.
docs/security.md explains why each of these matters.
"""
from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from django.conf import settings

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)


class UnsafePathError(Exception):
    """A path in a hostile tree that ComfyHub refuses to use: a link, or not what it should be. The message names
    the path and says how to fix it."""

    def __init__(self, message: str, path: Path | str | None = None):
        super().__init__(message)
        self.path = str(path) if path is not None else None


def parts_of(relpath: str | os.PathLike) -> tuple[str, ...]:
    """The components of a relative path; refuses absolute paths, '..' and empty components."""
    text = os.fspath(relpath)
    if text in ("", "."):
        return ()
    path = PurePosixPath(text)
    if path.is_absolute() or any(part in ("..", "") for part in path.parts) or "\0" in text:
        raise UnsafePathError(f"'{text}' is not a relative path inside its folder (no '..', not absolute).", text)
    return tuple(part for part in path.parts if part != ".")


def relative_to_root(root: Path, path: Path) -> str:
    """`path` (absolute, under root by its spelling, nothing resolved) as a path relative to root."""
    try:
        return Path(os.path.normpath(path)).relative_to(os.path.normpath(root)).as_posix()
    except ValueError:
        raise UnsafePathError(f"{path} is not inside {root}.", path) from None


def shell_quote(path: Path | str) -> str:
    """The path in single quotes for a shell command a person copies (rm '<path>'), a quote inside escaped."""
    return "'" + str(path).replace("'", "'\\''") + "'"


def _refusal(root: Path, parts, dir_fd: int, name: str) -> UnsafePathError:
    shown = Path(root, *parts)
    try:
        info = os.lstat(name, dir_fd=dir_fd)
    except OSError:
        return UnsafePathError(f"{shown} cannot be opened; refused.", shown)
    if stat.S_ISLNK(info.st_mode):
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            target = "?"
        return UnsafePathError(
            f"{shown} is a link (to {target}); ComfyHub never follows links in this folder. Remove the link "
            f"(rm {shell_quote(shown)}) and try again.", shown)
    return UnsafePathError(f"{shown} is not a folder; move it away and try again.", shown)


def open_root(root: Path) -> int:
    try:
        return os.open(root, DIR_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError(f"{root} is a link or not a folder; refused.", root) from None
        raise


def open_dir(root: Path, relpath: str | os.PathLike = "", *, create: bool = False, chown: bool = True,
             created: list | None = None) -> int:
    """A descriptor of root/relpath, a real folder reached without following any link. With create, missing folders
    are made (and given to PUID:PGID when running as root; each one made is appended to `created` as a Path). The
    caller closes it (or use `opened_dir`)."""
    parts = parts_of(relpath)
    fd = open_root(root)
    try:
        for index, part in enumerate(parts):
            try:
                try:
                    next_fd = os.open(part, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                        made = True
                    except FileExistsError:
                        made = False  # made meanwhile (by us or by the container): opened like any other
                    next_fd = os.open(part, DIR_FLAGS, dir_fd=fd)
                    if made:
                        if chown:
                            chown_fd(next_fd)
                        if created is not None:
                            created.append(Path(root, *parts[:index + 1]))
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refusal(root, parts[:index + 1], fd, part) from None
                raise
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def opened_dir(root: Path, relpath: str | os.PathLike = "", **kwargs):
    fd = open_dir(root, relpath, **kwargs)
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def parent_of(root: Path, relpath: str | os.PathLike, *, create: bool = False):
    """(descriptor of the parent folder, final name) for root/relpath; the parent reached without links."""
    parts = parts_of(relpath)
    if not parts:
        raise UnsafePathError(f"{root} itself cannot be used here.", root)
    with opened_dir(root, PurePosixPath(*parts[:-1]) if len(parts) > 1 else "", create=create) as fd:
        yield fd, parts[-1]


def open_file(root: Path, relpath: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """A descriptor of the file root/relpath, refusing a link at any level (the last one included)."""
    with parent_of(root, relpath) as (fd, name):
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _refusal(root, parts_of(relpath), fd, name) from None
            raise


def read_bytes(root: Path, relpath: str | os.PathLike, limit: int) -> bytes:
    """The content of a regular file, refusing links, non-files and anything over `limit` bytes. Opened without
    blocking, so a fifo planted under the name cannot hang the reader."""
    fd = open_file(root, relpath, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePathError(f"{Path(root, relpath)} is not a regular file; refused.", Path(root, relpath))
        if info.st_size > limit:
            raise UnsafePathError(f"{Path(root, relpath)} is {info.st_size} bytes, over the limit of {limit}.",
                                  Path(root, relpath))
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise UnsafePathError(f"{Path(root, relpath)} grew over the limit of {limit} bytes.", Path(root, relpath))
        return data
    finally:
        os.close(fd)


def lstat(root: Path, relpath: str | os.PathLike) -> os.stat_result | None:
    """lstat of root/relpath (parents reached without links), or None when it does not exist."""
    try:
        with parent_of(root, relpath) as (fd, name):
            return os.lstat(name, dir_fd=fd)
    except FileNotFoundError:
        return None


def create_temp(dir_fd: int, prefix: str = ".comfyhub-", mode: int = 0o644) -> tuple[int, str]:
    """A new, empty file in the folder: a random name, created exclusively, so no planted name or link is used."""
    for _ in range(100):
        name = f"{prefix}{secrets.token_hex(8)}.tmp"
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                           dir_fd=dir_fd), name
        except FileExistsError:
            continue
    raise UnsafePathError("Could not create a temporary file (every name tried exists).")


def write_bytes(root: Path, relpath: str | os.PathLike, data: bytes, *, replace: bool = True, durable: bool = True,
                create_parents: bool = False, chown: bool = True, mode: int = 0o644) -> None:
    """Write a file atomically: a temporary file created exclusively beside it, then renamed into place. With
    replace=False an existing entry (of any kind) is left alone and FileExistsError raised. A link at the final
    name is replaced as a link (rename never follows it), never written through."""
    with parent_of(root, relpath, create=create_parents) as (fd, name):
        tmp_fd, tmp_name = create_temp(fd, mode=mode)
        try:
            with os.fdopen(tmp_fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                if chown:
                    chown_fd(handle.fileno())
                if durable:
                    os.fsync(handle.fileno())
            if replace:
                os.rename(tmp_name, name, src_dir_fd=fd, dst_dir_fd=fd)
            else:
                rename_noreplace(fd, tmp_name, fd, name)
            tmp_name = None
        finally:
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name, dir_fd=fd)
                except FileNotFoundError:
                    pass


def rename_noreplace(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """renameat2(RENAME_NOREPLACE): atomic, never replaces an entry that exists (FileExistsError)."""
    if _libc.renameat2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), RENAME_NOREPLACE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), dst)


def chown_fd(fd: int) -> None:
    if os.geteuid() == 0:
        os.fchown(fd, settings.PUID, settings.PGID)


def chown_tree(root: Path, relpath: str | os.PathLike = "") -> None:
    """Give root/relpath and everything under it to PUID:PGID (as root), never following a link: folders and files
    through descriptors opened with O_NOFOLLOW, links themselves with lchown."""
    if os.geteuid() != 0:
        return
    with opened_dir(root, relpath) as top:
        chown_fd(top)
        _chown_below(top)


def _chown_below(dir_fd: int) -> None:
    for entry in os.scandir(dir_fd):
        if entry.is_symlink():
            os.chown(entry.name, settings.PUID, settings.PGID, dir_fd=dir_fd, follow_symlinks=False)
        elif entry.is_dir(follow_symlinks=False):
            try:
                child = os.open(entry.name, DIR_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                    continue  # swapped for a link or removed meanwhile: not ours to follow
                raise
            try:
                chown_fd(child)
                _chown_below(child)
            finally:
                os.close(child)
        else:
            try:
                fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY,
                             dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO):
                    if exc.errno == errno.ELOOP:
                        os.chown(entry.name, settings.PUID, settings.PGID, dir_fd=dir_fd, follow_symlinks=False)
                    continue
                raise
            try:
                chown_fd(fd)
            finally:
                os.close(fd)


def walk(root: Path, relpath: str | os.PathLike = "", *, with_fd: bool = False):
    """Like os.walk (top-down) below root/relpath, never entering a link: yields (relative folder, folder names,
    file names, link names) with the folder's descriptor open while the caller handles it (with_fd=True adds that
    descriptor as a fifth item, for *at() calls on the names). Prune by editing the folder names in place."""
    with opened_dir(root, relpath) as fd:
        yield from _walk(fd, PurePosixPath(*parts_of(relpath)) if parts_of(relpath) else PurePosixPath("."), with_fd)


def _walk(dir_fd: int, here: PurePosixPath, with_fd: bool = False):
    dirs, files, links = [], [], []
    for entry in os.scandir(dir_fd):
        if entry.is_symlink():
            links.append(entry.name)
        elif entry.is_dir(follow_symlinks=False):
            dirs.append(entry.name)
        else:
            files.append(entry.name)
    dirs.sort(), files.sort(), links.sort()
    yield (here.as_posix(), dirs, files, links, dir_fd) if with_fd else (here.as_posix(), dirs, files, links)
    for name in dirs:
        try:
            child = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
                continue  # swapped for a link or removed since it was listed
            raise
        try:
            yield from _walk(child, here / name, with_fd)
        finally:
            os.close(child)


def find_links(root: Path, relpath: str | os.PathLike = "") -> list[tuple[str, str]]:
    """Every link below root/relpath as (path relative to root, its target), without following any."""
    found = []
    try:
        for folder, _dirs, _files, links, fd in walk(root, relpath, with_fd=True):
            for name in links:
                try:
                    found.append(((PurePosixPath(folder) / name).as_posix(), os.readlink(name, dir_fd=fd)))
                except OSError:
                    continue
    except FileNotFoundError:
        pass
    return found


def link_stays_inside(link_relpath: str, target: str) -> bool:
    """Whether a relative link at link_relpath (relative to a root) names something inside that root by its
    spelling alone. Absolute targets never do: inside a container they mean something else than on the host."""
    if not target or target.startswith("/"):
        return False
    depth = len(PurePosixPath(link_relpath).parts) - 1
    for part in PurePosixPath(target).parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return False
        elif part != ".":
            depth += 1
    return True


MAX_LINK_HOPS = 40  # the kernel's own limit on links followed while resolving one path


def link_problem(link_relpath: str, target: str, entry_of, max_links: int = MAX_LINK_HOPS) -> str | None:
    """Why the link at link_relpath (relative to a root) would lead outside that root, or None when it stays
    inside. Resolved as the kernel would, chains included (`x -> .` then `y -> x/..` leaves the root although each
    spelling stays inside). `entry_of(relpath)` tells what is at a path: ('dir' | 'file' | 'link' | None, the link's
    target or None); None counts as a plain folder. The real filesystem (link_resolves_inside) and an archive's
    members (snapshots.py) both answer it."""
    if not target or "\0" in target:
        return "its target is empty or holds a NUL byte"
    if target.startswith("/"):
        return f"it points to the absolute path {target}"
    position = list(PurePosixPath(link_relpath).parts[:-1])
    pending = list(PurePosixPath(target).parts)
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not position:
                return (f"'{target}' climbs above the instance folder" if hops == 0 else
                        f"through the links it passes, '{target}' climbs above the instance folder")
            position.pop()
            continue
        candidate = "/".join(position + [part])
        kind, onward = entry_of(candidate)
        if kind == "link":
            hops += 1
            if hops > max_links:
                return f"resolving it follows more than {max_links} links (a loop)"
            if not onward or onward.startswith("/"):
                return f"it passes through the link '{candidate}', which points to {onward or 'nothing'}"
            pending[:0] = list(PurePosixPath(onward).parts)
            continue
        if kind == "file" and pending:
            return None  # the kernel stops at a file in the middle of a path (ENOTDIR): nothing outside is reached
        position.append(part)
    return None


def link_resolves_inside(root: Path, link_relpath: str | os.PathLike, max_links: int = MAX_LINK_HOPS) -> bool:
    """Whether the link at root/link_relpath ends inside root (see link_problem), looked at with lstat and readlink
    only, never an open through a link. A parent that is a link (a swap since it was listed) counts as leaving."""
    parts = parts_of(link_relpath)
    if not parts:
        return True

    def entry_of(relpath):
        info = lstat(root, relpath)
        if info is None:
            return None, None
        if stat.S_ISLNK(info.st_mode):
            with parent_of(root, relpath) as (fd, name):
                return "link", os.readlink(name, dir_fd=fd)
        return ("dir" if stat.S_ISDIR(info.st_mode) else "file"), None

    try:
        kind, target = entry_of("/".join(parts))
        if kind != "link":
            return True
        return link_problem("/".join(parts), target, entry_of, max_links) is None
    except (OSError, UnsafePathError):
        return False


def unlink_link(root: Path, relpath: str | os.PathLike) -> bool:
    """Remove root/relpath if it is a link (the link itself, never its target); False when it is not one (any
    more)."""
    try:
        with parent_of(root, relpath) as (fd, name):
            try:
                info = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                return False
            if not stat.S_ISLNK(info.st_mode):
                return False
            os.unlink(name, dir_fd=fd)
            return True
    except FileNotFoundError:
        return False


def remove_tree(root: Path, relpath: str | os.PathLike) -> None:
    """Delete root/relpath: a folder with everything in it (links removed, never followed), or a file or link."""
    with parent_of(root, relpath) as (fd, name):
        info = os.lstat(name, dir_fd=fd)
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)


def move(src_root: Path, src_relpath: str | os.PathLike, dst_root: Path, dst_relpath: str | os.PathLike, *,
         create_parents: bool = False) -> None:
    """Rename within one filesystem, never following a link on either side and never replacing what exists."""
    with parent_of(src_root, src_relpath) as (src_fd, src_name), \
            parent_of(dst_root, dst_relpath, create=create_parents) as (dst_fd, dst_name):
        rename_noreplace(src_fd, src_name, dst_fd, dst_name)
