"""The ComfyUI images instances run: building ComfyHub's own (docker/comfyui) through a node's Docker engine, pulling
others, and saying what an image holds (ComfyUI, torch and Python versions), read from the image, never guessed.

An image `images build` made carries its build arguments as labels (comfyhub.image.build.*, so `refresh_image` can
build it again) and the versions its /etc/comfyhub/image.json records (comfyhub.image.comfyui-version, ...), so
listing images needs only inspects.
"""
from __future__ import annotations

import io
import json
import os
import re
import stat
import struct
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction

from comfyhub import operations
from comfyhub.operations import NullReport
from storage_app import safefs

from . import docker_engine, remote, runtime
from .models import Instance, Node

IMAGE_DIR = Path(settings.BASE_DIR) / "docker" / "comfyui"
IMAGE_FILES = ("Dockerfile", "build.sh", "entrypoint.sh")
# What a host may keep beside the Dockerfile for `docker build docker/comfyui`; `images build` takes them from its
# options instead.
IMAGE_DIR_LOCAL_EXTRAS = ("comfyui", "wheels", "extra-ca.pem")
INFO_PATH = "/etc/comfyhub/image.json"
# The build arguments docker/comfyui/Dockerfile declares; any other name is refused.
BUILD_ARGS = ("BASE_IMAGE", "COMFYUI_REF", "COMFYUI_URL", "TORCH_INDEX_URL", "TORCH_PACKAGES", "PIP_INDEX_URL",
              "EXTRA_PACKAGES")
LABEL_IMAGE = "comfyhub.image"  # "comfyui" on every image built from docker/comfyui
LABEL_INFO = "comfyhub.image.info"
LABEL_BUILD_ARGS = "comfyhub.image.build.args"  # JSON {NAME: value}: the build arguments given
LABEL_BUILD_SOURCE = "comfyhub.image.build.comfyui-source"  # host paths, "" when not used
LABEL_BUILD_CA = "comfyhub.image.build.ca-bundle"
LABEL_BUILD_WHEELS = "comfyhub.image.build.wheels"
# image.json key -> the label that carries it on an image `images build` made.
VERSION_LABELS = {
    "comfyui_version": "comfyhub.image.comfyui-version",
    "frontend_version": "comfyhub.image.frontend-version",
    "python_version": "comfyhub.image.python-version",
    "torch_version": "comfyhub.image.torch-version",
    "torchvision_version": "comfyhub.image.torchvision-version",
    "torchaudio_version": "comfyhub.image.torchaudio-version",
}
INFO_MAX_BYTES = 65536
VERSION_MAX = 100
BUILD_PROGRESS = 95  # the rest is the labelling build
STEP_LINE = re.compile(r"^Step (\d+)/(\d+) : (.*)")
PIP_LINE = re.compile(r"^\s*(Collecting|Downloading|Installing collected packages|Successfully installed|Processing"
                      r"|Looking in|ERROR:)")
REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]{0,199}")


class ImageError(Exception):
    """A build that cannot go ahead, in words a person can act on."""


# --- What an image holds ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageInfo:
    image: str  # the reference asked about
    id: str
    tags: list
    size: int  # bytes
    created: str
    comfyui_version: str | None
    torch_version: str | None
    python_version: str | None
    frontend_version: str | None
    built_by_comfyhub: bool  # made by `images build`: refresh_image builds it again
    comfyhub_image: bool  # built from docker/comfyui (by `images build` or `docker build`)
    # Where the versions were read: "labels", "image.json", or "" (not a ComfyHub image: unknown).
    versions_from: str = ""
    build_arguments: dict = field(default_factory=dict)

    @property
    def versions_known(self) -> bool:
        return bool(self.versions_from)


def describe(engine, image: str) -> ImageInfo | None:
    """What `image` is on this engine, or None when it is not here. Versions come from the labels `images build`
    adds; for an image without them, from its /etc/comfyhub/image.json if it has one; else they are unknown."""
    details = docker_engine.image_details(engine, image)
    if details is None:
        return None
    labels = details.labels
    versions, source = {}, ""
    if any(label in labels for label in VERSION_LABELS.values()):
        versions, source = {key: labels.get(label) or None for key, label in VERSION_LABELS.items()}, "labels"
    else:
        try:
            info = read_image_info(engine, details.id, labels.get(LABEL_INFO) or INFO_PATH)
        except docker_engine.EngineUnavailable:
            raise
        except docker_engine.EngineError:
            info = None  # an image the engine cannot make a container of (another platform...): versions unknown
        if info is not None:
            versions, source = info, "image.json"
    return ImageInfo(
        image=image, id=details.id, tags=details.tags, size=details.size, created=details.created,
        comfyui_version=versions.get("comfyui_version"), torch_version=versions.get("torch_version"),
        python_version=versions.get("python_version"), frontend_version=versions.get("frontend_version"),
        built_by_comfyhub=LABEL_BUILD_ARGS in labels, comfyhub_image=labels.get(LABEL_IMAGE) == "comfyui",
        versions_from=source, build_arguments=_build_arguments(labels),
    )


def read_image_info(engine, image: str, path: str = INFO_PATH) -> dict | None:
    """The versions an image's image.json records ({key: text or None} for VERSION_LABELS' keys), or None when it
    has no such file or the file is not a JSON object. Read from a container that is created, never started."""
    if not path.startswith("/"):
        path = INFO_PATH
    data = docker_engine.read_image_file(engine, image, path, labels=_helper_labels(), max_bytes=INFO_MAX_BYTES)
    if data is None:
        return None
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    return {key: _version(info.get(key)) for key in VERSION_LABELS}


def _version(value) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    return "".join(c for c in value.strip() if c.isprintable())[:VERSION_MAX] or None


def _helper_labels() -> dict:
    return {"comfyhub.managed": "false", **settings.CONTAINER_EXTRA_LABELS}


def _build_arguments(labels: dict) -> dict:
    try:
        arguments = json.loads(labels.get(LABEL_BUILD_ARGS) or "{}")
    except ValueError:
        return {}
    return {k: v for k, v in arguments.items() if k in BUILD_ARGS and isinstance(v, str)} \
        if isinstance(arguments, dict) else {}


# --- Building ----------------------------------------------------------------------------------------------------

def build_image(engine, *, tag: str, comfyui_ref=None, comfyui_source=None, torch_index_url=None, base_image=None,
                ca_bundle=None, wheels=None, build_args=None, report=None) -> str:
    """Build ComfyHub's image (docker/comfyui) on `engine` and tag it `tag`; returns the new image's id.

    `comfyui_source`: a local ComfyUI checkout (its tracked files, or every file when it is not a git checkout) used
    instead of downloading `comfyui_ref`; `ca_bundle`: a PEM file of extra certificate authorities for the build
    (a TLS-inspecting proxy); `wheels`: a folder of wheels pip may install from (offline hosts); `build_args`: other
    build arguments of the Dockerfile by name. The tag moves only when the whole build succeeded."""
    report = report or NullReport()
    arguments = {name: value for name, value in (("COMFYUI_REF", comfyui_ref), ("TORCH_INDEX_URL", torch_index_url),
                                                 ("BASE_IMAGE", base_image)) if value is not None}
    arguments.update(build_args or {})
    unknown = sorted(set(arguments) - set(BUILD_ARGS))
    if unknown:
        raise ImageError(f"Unknown build argument(s) {', '.join(unknown)}; the Dockerfile takes "
                         f"{', '.join(BUILD_ARGS)}.")
    labels = {
        **settings.CONTAINER_EXTRA_LABELS,
        LABEL_BUILD_ARGS: json.dumps(arguments, sort_keys=True),
        LABEL_BUILD_SOURCE: str(comfyui_source or ""),
        LABEL_BUILD_CA: str(ca_bundle or ""),
        LABEL_BUILD_WHEELS: str(wheels or ""),
    }
    report.progress(0, f"Packing the build context for {tag}")
    with tempfile.TemporaryFile(prefix="comfyhub-build-") as context:
        files = write_build_context(context, comfyui_source=comfyui_source, ca_bundle=ca_bundle, wheels=wheels)
        report.log(f"Build context: {files} files ({context.tell() // 1024} KiB)"
                   + (f", ComfyUI from {comfyui_source}" if comfyui_source else
                      f", ComfyUI {arguments.get('COMFYUI_REF', 'at the Dockerfile default')} downloaded"))
        context.seek(0)
        built = docker_engine.build_image(engine, context=context, build_args=arguments, labels=labels, name=tag,
                                          on_line=_BuildLog(report, tag), timeout=settings.IMAGE_BUILD_TIMEOUT)
    report.progress(BUILD_PROGRESS, "Reading the versions the image holds")
    info = read_image_info(engine, built)
    if info is None:
        raise ImageError(f"The build of {tag} made no readable {INFO_PATH}; is docker/comfyui/build.sh complete? "
                         f"The tag {tag} was not changed.")
    report.log("The image holds: " + ", ".join(f"{key.replace('_version', '')} {value or 'none'}"
                                               for key, value in info.items()))
    # A second, trivial build on top carries the versions as labels (a label cannot be added to an image in place).
    with tempfile.TemporaryFile(prefix="comfyhub-label-") as context:
        with tarfile.open(fileobj=context, mode="w") as archive:
            _add_bytes(archive, "Dockerfile", f"FROM {built}\n".encode())
        context.seek(0)
        labelled = docker_engine.build_image(
            engine, context=context, tag=tag, labels={label: info.get(key) or "" for key, label in
                                                      VERSION_LABELS.items()},
            timeout=settings.IMAGE_BUILD_TIMEOUT)
    report.progress(100, f"Built {tag}")
    report.log(f"Tagged {labelled[:19]} as {tag}")
    return labelled


class _BuildLog:
    """Turns the build's log into operation log lines and progress: Dockerfile steps, ComfyHub's own build lines
    and pip's (what it collects, downloads and installs); every line counts toward the failure message."""

    def __init__(self, report, tag):
        self.report = report
        self.tag = tag
        self.percent = 0.0

    def __call__(self, line: str):
        text = line.strip()
        if not text:
            return
        if match := STEP_LINE.match(text):
            step, steps = int(match[1]), int(match[2])
            message = f"Step {step}/{steps}: {match[3][:120]}"
            self.report.log(message)
            self.percent = BUILD_PROGRESS * (step - 1) / max(steps, 1)
            self.report.progress(self.percent, f"Building {self.tag}: {message}")
        elif text.startswith("comfyhub-build:") or PIP_LINE.match(text):
            self.report.log(text[:500])
            if PIP_LINE.match(text):
                self.report.progress(self.percent, f"Building {self.tag}: {text[:200]}")


def write_build_context(output, *, comfyui_source=None, ca_bundle=None, wheels=None) -> int:
    """Write the build context as a tar into the open file `output`: docker/comfyui as it is in the repository (a
    host's own comfyui/, wheels/ and extra-ca.pem there left out), plus comfyui/ (a local checkout), extra-ca.pem
    and wheels/ from the options. Returns the number of entries. A link in a copied folder that leads outside it is
    refused (ImageError naming it); nothing is followed."""
    for name in IMAGE_FILES:
        if not (IMAGE_DIR / name).is_file():
            raise ImageError(f"{IMAGE_DIR / name} is missing: the ComfyHub checkout is incomplete.")
    with tarfile.open(fileobj=output, mode="w", format=tarfile.PAX_FORMAT) as archive:
        count = _add_tree(archive, IMAGE_DIR, ".", what=str(IMAGE_DIR), leave_out=IMAGE_DIR_LOCAL_EXTRAS)
        if comfyui_source:
            source = Path(comfyui_source)
            count += _add_tree(archive, source, "comfyui", what=f"the ComfyUI checkout {source}",
                               only=tracked_files(source))
        if ca_bundle:
            _add_bytes(archive, "extra-ca.pem", _read_small_file(Path(ca_bundle), "--ca-bundle", 4 * 1024 * 1024))
            count += 1
        if wheels:
            count += _add_tree(archive, Path(wheels), "wheels", what=f"the wheels folder {wheels}")
    return count


def _add_bytes(archive, name, data: bytes, *, mode=0o644):
    member = tarfile.TarInfo(name)
    member.size, member.mode = len(data), mode
    archive.addfile(member, io.BytesIO(data))


def _read_small_file(path: Path, option: str, limit: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"{option}: cannot read {path}: {exc.strerror or exc}.") from exc
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise ImageError(f"{option}: {path} is not a file.")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise ImageError(f"{option}: {path} is larger than {limit // (1024 * 1024)} MB; is it a certificate file?")
    return data


SKIPPED_DIRS = {".git", "__pycache__"}


def _add_tree(archive, root: Path, prefix: str, *, what: str, only: set | None = None, leave_out=()) -> int:
    """Add the files below `root` under `prefix`/ (only those in `only`, paths relative to root, when given; none
    whose top-level name is in `leave_out`). Links that stay inside root are kept as links; one that leads outside
    is refused. Nothing is followed; __pycache__ and .git are left out."""
    folders = _folders_of(only)
    count = 0
    try:
        for folder, dirs, files, links, fd in safefs.walk(root, with_fd=True):
            here = PurePosixPath(folder)
            if folder == ".":
                for names in (dirs, files, links):
                    names[:] = [name for name in names if name not in leave_out]
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS
                       and (folders is None or (here / d).as_posix() in folders)]
            for name in links:
                relpath = (here / name).as_posix()
                if only is None or relpath in only:
                    _add_link(archive, root, prefix, relpath, os.readlink(name, dir_fd=fd), what)
                    count += 1
            for name in files:
                relpath = (here / name).as_posix()
                if name != ".git" and not name.endswith(".pyc") and (only is None or relpath in only):
                    count += _add_file(archive, fd, name, _member_name(prefix, relpath))
    except (OSError, safefs.UnsafePathError) as exc:
        raise ImageError(f"Cannot read {what}: {exc}.") from exc
    return count


def _folders_of(paths: set | None) -> set | None:
    """Every folder that holds one of `paths` (relative, "a/b/c.py" -> "a/b", "a", "."); None for None."""
    return {str(parent) for path in paths for parent in PurePosixPath(path).parents} if paths is not None else None


def _member_name(prefix: str, relpath: str) -> str:
    return relpath if prefix == "." else f"{prefix}/{relpath}"


def _add_link(archive, root, prefix, relpath, target, what):
    if not safefs.link_resolves_inside(root, relpath):
        raise ImageError(f"{what}: the link {relpath} -> {target} leads outside it. Replace the link by the file "
                         "it stands for, or remove it, and build again.")
    member = tarfile.TarInfo(_member_name(prefix, relpath))
    member.type, member.linkname = tarfile.SYMTYPE, target
    archive.addfile(member)


def _add_file(archive, dir_fd, name, member_name) -> int:
    """Add one regular file, opened without following a link; a socket or pipe is skipped (0)."""
    with os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd),
                   "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            return 0
        member = tarfile.TarInfo(member_name)
        member.size, member.mode, member.mtime = info.st_size, info.st_mode & 0o755, int(info.st_mtime)
        archive.addfile(member, handle)
    return 1


def checkout_problem(checkout: Path) -> str | None:
    """Why the ComfyUI checkout cannot go into a build (a link among its files that leads outside it, an unreadable
    git index), or None. Only links are looked at: it is quick enough to run before queueing the build, which looks
    again as it packs the files."""
    try:
        only = tracked_files(checkout)
        folders = _folders_of(only)
        for folder, dirs, _files, links in safefs.walk(checkout):
            here = PurePosixPath(folder)
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS
                       and (folders is None or (here / d).as_posix() in folders)]
            for name in links:
                relpath = (here / name).as_posix()
                if (only is None or relpath in only) and not safefs.link_resolves_inside(checkout, relpath):
                    return (f"the link {relpath} in {checkout} leads outside it; replace the link by the file it "
                            "stands for, or remove it, and build again.")
    except ImageError as exc:
        return str(exc)
    except (OSError, safefs.UnsafePathError) as exc:
        return f"cannot read {checkout}: {exc}."
    return None


# --- A git checkout's tracked files, read from its index (git never runs) -------------------------------------

def tracked_files(checkout: Path) -> set | None:
    """The paths git tracks in `checkout` (its index, read as a file), or None when it is not a git checkout (then
    every file is taken). Files ignored by git (models, outputs, a virtual environment) stay out of the build."""
    index = _index_path(checkout)
    if index is None:
        return None
    try:
        data = index.read_bytes()
    except OSError as exc:
        raise ImageError(f"Cannot read the git index {index}: {exc.strerror or exc}.") from exc
    hash_size = 32 if _sha256_repository(index.parent) else 20
    try:
        return parse_git_index(data, hash_size)
    except (ValueError, struct.error, IndexError) as exc:
        raise ImageError(f"Cannot read the git index {index} ({exc}); is {checkout} a git checkout?") from exc


def _index_path(checkout: Path) -> Path | None:
    dot_git = checkout / ".git"
    if dot_git.is_dir() and not dot_git.is_symlink():
        return dot_git / "index"
    if dot_git.is_file() and not dot_git.is_symlink():  # a worktree or submodule: "gitdir: PATH"
        text = dot_git.read_text(errors="replace").strip()
        if text.startswith("gitdir:"):
            return (checkout / text[len("gitdir:"):].strip()) / "index"
    return None


def _sha256_repository(git_dir: Path) -> bool:
    for candidate in (git_dir / "config", git_dir / "commondir"):
        try:
            text = candidate.read_text(errors="replace")
        except OSError:
            continue
        if candidate.name == "commondir":
            return _sha256_repository((git_dir / text.strip()).resolve())
        if re.search(r"objectformat\s*=\s*sha256", text, re.I):
            return True
    return False


def parse_git_index(data: bytes, hash_size: int = 20) -> set:
    """The paths of a git index (versions 2 to 4): regular files and links at stage 0; submodules left out."""
    if data[:4] != b"DIRC":
        raise ValueError("not a git index")
    version, count = struct.unpack(">II", data[4:12])
    if version not in (2, 3, 4):
        raise ValueError(f"index version {version} is not known")
    offset, previous, paths = 12, b"", set()
    for _ in range(count):
        start = offset
        mode = struct.unpack(">I", data[offset + 24:offset + 28])[0]
        offset += 40 + hash_size
        flags = struct.unpack(">H", data[offset:offset + 2])[0]
        offset += 2
        if version >= 3 and flags & 0x4000:
            offset += 2
        if version == 4:
            strip, shift = 0, 0
            while True:  # git's offset varint
                byte = data[offset]
                offset += 1
                strip = (strip << 7) | (byte & 0x7F) if shift else byte & 0x7F
                if not byte & 0x80:
                    break
                strip += 1
                shift += 7
            end = data.index(b"\0", offset)
            path = previous[:len(previous) - strip] + data[offset:end]
            offset = end + 1
        else:
            end = data.index(b"\0", offset)
            path = data[offset:end]
            offset = start + ((end - start) // 8 + 1) * 8
        previous = path
        kind = mode >> 12
        if (flags >> 12) & 3 == 0 and kind in (0o10, 0o12):  # regular file, link
            paths.add(path.decode("utf-8", errors="surrogateescape"))
    return paths


# --- Pulling, refreshing -----------------------------------------------------------------------------------------

def pull_image(engine, image: str, report=None) -> str:
    """Pull `image` with progress; returns its id."""
    report = report or NullReport()
    report.log(f"Pulling {image}")
    docker_engine.pull_image(engine, image, on_progress=lambda percent, message: report.progress(percent, message))
    pulled = docker_engine.image_id(engine, image)
    if pulled is None:
        raise ImageError(f"The pull of {image} finished but the engine has no image by that name.")
    report.progress(100, f"Pulled {image}")
    report.log(f"{image} is {pulled[:19]}")
    return pulled


def refresh_image(engine, image: str, report=None, *, no_cache: bool = False) -> tuple[str | None, str]:
    """Make `image` new again: build it with the build arguments it was built with when `images build` made it,
    else pull it. Returns (the id it had, or None, the id it has now)."""
    details = docker_engine.image_details(engine, image)
    old = details.id if details else None
    if details is None or LABEL_BUILD_ARGS not in details.labels:
        return old, pull_image(engine, image, report)
    labels = details.labels
    arguments = _build_arguments(labels)
    paths = {option: labels.get(label) or None for option, label in
             (("comfyui_source", LABEL_BUILD_SOURCE), ("ca_bundle", LABEL_BUILD_CA), ("wheels", LABEL_BUILD_WHEELS))}
    for option, path in paths.items():
        if path and not Path(path).exists():
            raise ImageError(f"{image} was built with --{option.replace('_', '-')} {path}, which is gone; build it "
                             "again by hand (manage.py images build) with what it should use now.")
    (report or NullReport()).log(f"Building {image} again with the arguments it was built with: "
                                 + (", ".join(f"{k}={v}" for k, v in arguments.items()) or "the defaults"))
    return old, build_image(engine, tag=image, build_args=arguments, report=report, **paths)


# --- Services: what the command line and the pages call --------------------------------------------------------

def build_problems(*, tag, comfyui_ref=None, comfyui_source=None, torch_index_url=None, base_image=None,
                   ca_bundle=None, wheels=None, build_args=None) -> dict:
    """{field: [message]} for every refused build input (empty when it may go ahead)."""
    errors: dict[str, list[str]] = {}

    def refuse(name, message):
        errors.setdefault(name, []).append(message)

    if problem := _image_problem(tag):
        refuse("tag", problem)
    elif "@" in tag:
        refuse("tag", f"'{tag}' names a digest; a build makes a tag: give NAME:TAG (--tag).")
    if comfyui_ref is not None and not REF_RE.fullmatch(comfyui_ref):
        refuse("comfyui_ref", f"'{comfyui_ref}' is not a ComfyUI release tag, branch or commit (letters, digits, "
                              "'.', '_', '/', '+' and '-', not starting with one of them), e.g. v0.8.0.")
    if torch_index_url is not None and torch_index_url != "none" \
            and not re.fullmatch(r"https?://\S+", torch_index_url):
        refuse("torch_index_url", f"'{torch_index_url}' is not an index URL; give https://… (e.g. "
                                  "https://download.pytorch.org/whl/cu128) or 'none' (only --wheels).")
    if base_image is not None and (problem := runtime.image_reference_problem(base_image)):
        refuse("base_image", problem)
    for name, value, kind in (("comfyui_source", comfyui_source, "folder"), ("ca_bundle", ca_bundle, "file"),
                              ("wheels", wheels, "folder")):
        if value is None:
            continue
        path = Path(value)
        if not value or "\x00" in value:
            refuse(name, f"Give the path of a {kind} on this host.")
        elif not path.exists():
            refuse(name, f"{path} does not exist; give the path of a {kind} on this host.")
        elif kind == "folder" and not path.is_dir():
            refuse(name, f"{path} is not a folder.")
        elif kind == "file" and not path.is_file():
            refuse(name, f"{path} is not a file.")
    if comfyui_source is not None and "comfyui_source" not in errors:
        if not (Path(comfyui_source) / "main.py").is_file():
            refuse("comfyui_source", f"{comfyui_source} has no main.py: it is not a ComfyUI checkout.")
        elif problem := checkout_problem(Path(comfyui_source)):
            refuse("comfyui_source", problem)
    for name, value in (build_args or {}).items():
        if name not in BUILD_ARGS:
            refuse("build_args", f"'{name}' is not a build argument of docker/comfyui/Dockerfile; it takes "
                                 f"{', '.join(BUILD_ARGS)}.")
        elif not isinstance(value, str) or "\0" in value or "\n" in value:
            refuse("build_args", f"The value of {name} must be one line of text.")
    return errors


def image_build(*, node: Node, tag: str | None = None, comfyui_ref=None, comfyui_source=None, torch_index_url=None,
                base_image=None, ca_bundle=None, wheels=None, build_args=None, user=None):
    """Queue a build of ComfyHub's image on `node` (default tag: COMFY_IMAGE); ValidationError for bad input."""
    tag = settings.COMFY_IMAGE if tag is None else tag
    paths = {name: str(Path(value).expanduser().resolve()) if value else value for name, value in
             (("comfyui_source", comfyui_source), ("ca_bundle", ca_bundle), ("wheels", wheels))}
    arguments = dict(tag=tag, comfyui_ref=comfyui_ref, torch_index_url=torch_index_url, base_image=base_image,
                     build_args=dict(build_args or {}), **paths)
    if errors := build_problems(**arguments):
        raise ValidationError(errors)
    return _enqueue("instances.jobs.build_image", node, f"{tag} on {node}", user, node_pk=node.pk, **arguments)


def image_pull(*, node: Node, image: str, user=None):
    """Queue a pull of `image` on `node`; ValidationError when it is not an image instances may run."""
    if problem := _image_problem(image):
        raise ValidationError({"image": [problem]})
    return _enqueue("instances.jobs.pull_image", node, f"{image} on {node}", user, node_pk=node.pk, image=image)


IMAGE_MAX = 512  # longer than any reference Docker takes (a 255-character name, a tag, a digest)


def _image_problem(image) -> str | None:
    """Why an image to build or pull is refused: not a reference, or one instances may not run (so nothing
    builds or pulls what no instance could use)."""
    if isinstance(image, str) and len(image) > IMAGE_MAX:
        return f"An image reference is at most {IMAGE_MAX} characters; this one has {len(image)}."
    return runtime.image_problem(image)


def _enqueue(job, node, label, user, **kwargs):
    with transaction.atomic():
        operation = operations.enqueue(job, target=node, user=user, **kwargs)
        operation.target_label = label[:200]
        operation.save(update_fields=["target_label"])
    return operation


def engine_for(node: Node):
    return docker_engine.require_engine(node.docker_host or None)


def images_in_use(node: Node, *, with_default: bool = True) -> dict[str, list[str]]:
    """{image: [instance ids]} of the instances on `node` (and COMFY_IMAGE, used by new instances), by image."""
    used: dict[str, list[str]] = {settings.COMFY_IMAGE: []} if with_default else {}
    for instance_id, image in Instance.objects.filter(node=node).order_by("instance_id").values_list(
            "instance_id", "image"):
        used.setdefault(image, []).append(instance_id)
    return used


def buildable(image: str) -> bool:
    """Whether `images build` makes this image: a tag (not a digest) of COMFY_IMAGE's repository or of ComfyHub's
    own (comfyhub/comfyui)."""
    return "@" not in image and _repository(image) in {_repository(settings.COMFY_IMAGE), _repository(DEFAULT_TAG)}


DEFAULT_TAG = "comfyhub/comfyui:latest"


def _repository(image: str) -> str:
    return re.sub(r"(@.*|:[^/:]*)$", "", image)


@dataclass(frozen=True)
class MissingImage:
    NAMED = 5  # instances the notice names; the rest are counted

    node: Node
    image: str
    instances: list  # ids of the instances that use it
    buildable: bool
    size_hint_gb: int

    @property
    def named_instances(self) -> list:
        return self.instances[:self.NAMED]

    @property
    def unnamed_instances(self) -> int:
        return max(0, len(self.instances) - self.NAMED)


def missing_images() -> list[MissingImage]:
    """The images instances use that are not on their node's engine, one per node and image; each image is looked
    up once. Another node's engine is reported on by its agent's heartbeats. A node whose engine does not answer,
    or that is offline, is left out (the engine's own card, the node's row say so)."""
    by_node: dict[int, dict[str, list[str]]] = {}
    for node_id, instance_id, image in Instance.objects.order_by("instance_id").values_list(
            "node_id", "instance_id", "image"):
        by_node.setdefault(node_id, {}).setdefault(image, []).append(instance_id)
    missing = []
    for node in Node.objects.filter(pk__in=by_node):
        absent = _absent_images(node, list(by_node[node.pk]))
        if absent is None:
            continue
        missing += [MissingImage(node=node, image=image, instances=by_node[node.pk][image],
                                 buildable=buildable(image), size_hint_gb=settings.IMAGE_BUILD_SIZE_HINT_GB)
                    for image in absent]
    return missing


def _absent_images(node: Node, images: list[str]) -> list[str] | None:
    """Which of `images` `node`'s engine lacks; None when that cannot be known. This process's own engine is asked
    (unless known to be down); another node's is what its agent found at its last heartbeat (`images_absent`, at
    most one heartbeat old): the dashboard never waits for an agent."""
    if remote.served_here(node):
        if not docker_engine.cached_engine_status(node.docker_host or None).available:
            return None
        return remote.absent_images_of(images)
    reported = (node.heartbeat or {}).get("images_absent") if node.state().online else None
    if not isinstance(reported, list):
        return None
    return [image for image in images if image in reported]


def info_data(info: ImageInfo | None) -> dict:
    """The documented JSON of what an image holds (docs/cli.md, `images list --json`); versions are null when
    unknown or not installed (`versions_from` says which)."""
    if info is None:
        return {"present": False, "id": None, "tags": [], "size": None, "created": None, "comfyui_version": None,
                "torch_version": None, "python_version": None, "frontend_version": None, "built_by_comfyhub": False,
                "comfyhub_image": False, "versions_from": ""}
    return {"present": True, "id": info.id, "tags": list(info.tags), "size": info.size, "created": info.created,
            "comfyui_version": info.comfyui_version, "torch_version": info.torch_version,
            "python_version": info.python_version, "frontend_version": info.frontend_version,
            "built_by_comfyhub": info.built_by_comfyhub, "comfyhub_image": info.comfyhub_image,
            "versions_from": info.versions_from}


def image_listing(node: Node) -> list[dict]:
    """The images on `node` that instances use (and COMFY_IMAGE), each described once: {image, node, instances,
    default, **info_data}. Raises EngineError when the node's engine does not answer."""
    used = images_in_use(node)
    engine = engine_for(node)
    try:
        return [{"image": image, "node": node.name, "instances": instances, "default": image == settings.COMFY_IMAGE,
                 **info_data(describe(engine, image))} for image, instances in used.items()]
    finally:
        engine.close()
