"""A custom node's git repository read as files, without running git: the commit its HEAD names and the URL of its
`origin`. The folder is writable by the instance's code, so git itself (which would act on the repository's own
configuration: fsmonitor, pager, filters, hooks) never runs on the host there.

Every read goes through storage_app.safefs (no link followed at any depth, sizes capped); `.git/config` is parsed as
text and nothing in it is acted on (includes are not followed). A `.git` file (`gitdir: …`) is followed only when it
names a folder inside the node's own folder.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from storage_app import safefs

SMALL_FILE_LIMIT = 4096  # HEAD, a loose ref, a `.git` file
PACKED_REFS_LIMIT = 16 * 1024 * 1024
CONFIG_LIMIT = 256 * 1024
URL_LIMIT = 2048
MAX_SYMREF_DEPTH = 5

COMMIT_RE = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")  # SHA-1, or SHA-256
REF_NAME_RE = re.compile(r"refs/[A-Za-z0-9._+@/-]{1,255}")


class GitRepoError(Exception):
    """The repository cannot be read safely; the message names the path and why."""


@dataclass(frozen=True)
class RepoInfo:
    is_repository: bool
    commit: str = ""  # "" when not known
    origin_url: str = ""
    problem: str = ""  # why it could not be read, "" when it could


def read(root: Path, folder: str) -> RepoInfo:
    """What the repository at root/folder (folder relative to the trusted root) is at. Never raises for what the
    folder holds: a problem is reported in `problem`."""
    try:
        git_dir = find_git_dir(root, folder)
        if git_dir is None:
            return RepoInfo(is_repository=False)
        return RepoInfo(is_repository=True, commit=head_commit(root, git_dir), origin_url=origin_url(root, git_dir))
    except (GitRepoError, safefs.UnsafePathError) as exc:
        return RepoInfo(is_repository=True, problem=str(exc))
    except OSError as exc:
        return RepoInfo(is_repository=True, problem=f"{Path(root, folder)} cannot be read ({exc.strerror}).")


def find_git_dir(root: Path, folder: str) -> str | None:
    """The git folder of root/folder as a path relative to root, or None when the folder is not a repository."""
    dot_git = f"{folder}/.git"
    info = safefs.lstat(root, dot_git)
    if info is None:
        return None
    if stat.S_ISDIR(info.st_mode):
        return dot_git
    if stat.S_ISLNK(info.st_mode):
        raise GitRepoError(f"{Path(root, dot_git)} is a link; ComfyHub does not follow it.")
    if not stat.S_ISREG(info.st_mode):
        raise GitRepoError(f"{Path(root, dot_git)} is neither a folder nor a file.")
    text = _text(root, dot_git, SMALL_FILE_LIMIT).strip()
    if not text.startswith("gitdir:"):
        raise GitRepoError(f"{Path(root, dot_git)} is a file without a 'gitdir:' line.")
    target = text[len("gitdir:"):].strip()
    if not safefs.link_stays_inside(".git", target):
        raise GitRepoError(f"{Path(root, dot_git)} points to {target}, outside the node's folder; not read.")
    return _joined(folder, target)


def head_commit(root: Path, git_dir: str) -> str:
    """The commit HEAD names (through symbolic refs, loose refs and packed-refs); "" for a branch with no commit."""
    name = "HEAD"
    for _ in range(MAX_SYMREF_DEPTH):
        value = _ref_file(root, git_dir, name)
        if value is None:
            return _packed_ref(root, git_dir, name)
        if value.startswith("ref:"):
            name = value[4:].strip()
            if not REF_NAME_RE.fullmatch(name) or ".." in name or "//" in name:
                raise GitRepoError(f"{Path(root, git_dir)} has a ref that is not a plain ref name: {name[:100]!r}.")
            continue
        if COMMIT_RE.fullmatch(value):
            return value
        raise GitRepoError(f"{Path(root, git_dir, name)} holds neither a commit id nor a ref.")
    raise GitRepoError(f"{Path(root, git_dir)}: HEAD goes through more than {MAX_SYMREF_DEPTH} symbolic refs.")


def origin_url(root: Path, git_dir: str) -> str:
    """remote.origin.url from the repository's config file (the first one), as text; "" when not set."""
    try:
        text = _text(root, f"{git_dir}/config", CONFIG_LIMIT)
    except FileNotFoundError:
        return ""
    for section, subsection, key, value in parse_config(text):
        if section == "remote" and subsection == "origin" and key == "url" and value is not None:
            return value[:URL_LIMIT]
    return ""


# --- Reading ----------------------------------------------------------------------------------------------------

def _joined(base: str, relative: str) -> str:
    joined = os.path.normpath(str(PurePosixPath(base) / relative))
    safefs.parts_of(joined)  # refuses anything that climbs out
    return joined


def _text(root: Path, relpath: str, limit: int) -> str:
    return safefs.read_bytes(root, relpath, limit).decode("utf-8", errors="replace")


def _ref_file(root: Path, git_dir: str, name: str) -> str | None:
    try:
        return _text(root, f"{git_dir}/{name}", SMALL_FILE_LIMIT).strip()
    except FileNotFoundError:
        return None


def _packed_ref(root: Path, git_dir: str, name: str) -> str:
    try:
        text = _text(root, f"{git_dir}/packed-refs", PACKED_REFS_LIMIT)
    except FileNotFoundError:
        return ""
    for line in text.splitlines():
        if not line or line[0] in "#^":
            continue
        commit, _, ref = line.partition(" ")
        if ref.strip() == name and COMMIT_RE.fullmatch(commit):
            return commit
    return ""


# --- Git's config format, as text -------------------------------------------------------------------------------

SECTION_RE = re.compile(r'\[\s*([A-Za-z0-9.-]+)(?:\s+"((?:[^"\\\n]|\\.)*)")?\s*\]')
KEY_RE = re.compile(r"([A-Za-z][A-Za-z0-9-]*)\s*(=)?\s*(.*)")


def parse_config(text: str):
    """(section, subsection, key, value) for each variable of a git config file; section and key lower-case, value
    None for a bare key. Enough of git's format for reading a URL; nothing is ever acted on."""
    section, subsection = "", None
    lines = iter(text.splitlines())
    for line in lines:
        line = line.strip()
        while line.startswith("["):
            match = SECTION_RE.match(line)
            if not match:
                section, subsection, line = "", None, ""
                break
            section = match.group(1).lower()
            if match.group(2) is not None:
                subsection = re.sub(r"\\(.)", r"\1", match.group(2))
            elif "." in section:  # the old [section.subsection] spelling
                section, subsection = section.split(".", 1)
            else:
                subsection = None
            line = line[match.end():].strip()
        if not line or line[0] in "#;" or not section:
            continue
        match = KEY_RE.fullmatch(line)
        if not match:
            continue
        key, has_value, raw = match.group(1).lower(), match.group(2), match.group(3)
        if not has_value:
            yield section, subsection, key, None
            continue
        while raw.endswith("\\") and not raw.endswith("\\\\"):  # a continued line
            raw = raw[:-1] + next(lines, "")
        yield section, subsection, key, _config_value(raw)


def _config_value(raw: str) -> str:
    value, quoted, index = [], False, 0
    while index < len(raw):
        char = raw[index]
        if char == "\\" and index + 1 < len(raw):
            value.append({"n": "\n", "t": "\t", "b": "\b"}.get(raw[index + 1], raw[index + 1]))
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char in "#;" and not quoted:
            break
        else:
            value.append(char)
        index += 1
    return "".join(value).strip()
