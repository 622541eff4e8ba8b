"""The rule behind ComfyHub's upload guard, without aiohttp: which shared input link stands where an upload to
ComfyUI's input folder is about to be written, and turning that link (and nothing else) into the instance's own file,
so the upload is written there instead of failing on the read-only /shared mount.

Standard library only, so it can be run and tested on its own (python3 -c "import uploads" with this folder on
sys.path). The paths are worked out exactly as ComfyUI's POST /upload/image does (server.py, image_upload)."""

from __future__ import annotations

import os
import posixpath
import secrets
import shutil
import stat

# Where ComfyHub mounts the shared tree, read-only; its input links point to /shared/input/<name>.
SHARED_ROOT = "/shared"


def overwrite_requested(value) -> bool:
    """ComfyUI writes over an existing name only for the form value "true" or "1"."""
    return value in ("true", "1")


def replace_shared_link_before_upload(input_dir: str, subfolder, filename, *, overwrite: bool,
                                      shared_root: str = SHARED_ROOT) -> str | None:
    """Replace the link into the read-only shared tree that ComfyUI would open for writing for this upload by a copy
    of the shared file (the instance's own, which the upload then overwrites); the path replaced (relative to
    input_dir), or None when the upload is left to ComfyUI as it is.

    ComfyUI writes the upload to input_dir/subfolder/filename when overwrite is asked for, and also when nothing
    exists under that name (a link whose shared file is gone: that link is only removed). Through a link into /shared
    the write fails and ComfyUI answers 500. A copy rather than a bare removal: /upload/mask reads the image it
    masks, often that very name, before writing, and the name is never missing for ComfyHub's link refresh to fill.

    Everything else is ComfyUI's business and untouched here: a regular file of the instance, a link pointing
    anywhere but /shared, a name that escapes input_dir (ComfyUI answers 400), a subfolder that is missing or reached
    through a link. Folders are opened without following links, so nothing outside input_dir is followed or changed;
    the shared file is only read, as ComfyUI reads it."""
    if not isinstance(filename, str) or not filename or not isinstance(subfolder, str):
        return None
    try:  # ComfyUI's own computation and check (a ValueError there is ComfyUI's 500, not ours to handle)
        full_output_folder = os.path.join(input_dir, os.path.normpath(subfolder))
        filepath = os.path.abspath(os.path.join(full_output_folder, filename))
        if os.path.commonpath((input_dir, filepath)) != input_dir:
            return None
        relative = os.path.relpath(filepath, input_dir)
    except ValueError:
        return None
    if relative == ".":
        return None
    *folders, name = relative.split(os.sep)
    try:
        directory = os.open(input_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        for folder in folders:
            try:
                inner = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
            except (OSError, ValueError):  # missing (ComfyUI creates it: no link in it then), a file, a link
                return None
            os.close(directory)
            directory = inner
        try:
            if not stat.S_ISLNK(os.lstat(name, dir_fd=directory).st_mode):
                return None
            target = os.readlink(name, dir_fd=directory)
        except (OSError, ValueError):
            return None
        if not _inside(target, shared_root):
            return None
        shared = _open_shared_file(name, directory)
        if shared is None:  # gone: ComfyUI writes through the link even without overwrite
            return relative if _unlink(name, directory) else None
        with shared:
            if not overwrite:
                return None  # ComfyUI picks another name ("name (1).png") or finds the same bytes: nothing written
            return relative if _replace_with_copy(name, directory, shared) else None
    finally:
        os.close(directory)


def _inside(target: str, root: str) -> bool:
    if not target.startswith("/"):
        return False
    return posixpath.normpath(target).startswith(posixpath.normpath(root).rstrip("/") + "/")


def _open_shared_file(name: str, directory: int):
    """The linked shared file, open for reading (following the link, as ComfyUI's os.path.exists does), or None
    when it is not there or is not a regular file."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=directory)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def _replace_with_copy(name: str, directory: int, shared) -> bool:
    """Copy the shared file to a new hidden file beside the link, then rename it over the link (atomic: the name
    never goes missing). Without room for the copy, the link is removed instead: the upload still lands."""
    temporary = f".comfyhub-upload-{secrets.token_hex(8)}"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666, dir_fd=directory)
    except OSError:
        return _unlink(name, directory)
    try:
        with os.fdopen(fd, "wb") as copy:
            shutil.copyfileobj(shared, copy)
        os.rename(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
        return True
    except OSError:
        _unlink(temporary, directory)
        return _unlink(name, directory)


def _unlink(name: str, directory: int) -> bool:
    try:
        os.unlink(name, dir_fd=directory)
    except OSError:  # gone meanwhile, or a folder this user may not change: ComfyUI answers as it would
        return False
    return True
