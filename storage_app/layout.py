"""The storage layout: the one module that knows where every directory is and what goes in it.

    <shared>/models/<ComfyUI model folder>/    shared library, read-only in containers at /shared/models
    <shared>/input/                            shared input images, read-only at /shared/input
    <instances>/<id>/{custom_nodes,user,temp,output,input,models,python-packages,home}   read-write at /instance
    (home/: HOME and caches of the container's user, PUID:PGID, which owns every folder here)
    <instances>/<id>/extra_model_paths.yaml    every model folder: /instance/models/... first, then the node's model
                                               cache /model-cache/models/... (when it has one), then /shared/models/...
    <MODEL_CACHE_PATH>/models/<folder>/        the node's model cache (storage_app/modelcache.py): copies of library
                                               files on fast disk, read-only at /model-cache/models
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from . import safefs

# ComfyUI's model folders (folder_paths.py): key -> sub-folders of models/ searched for it, first one is the default.
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "configs": ("configs",),
    "loras": ("loras",),
    "vae": ("vae",),
    "text_encoders": ("text_encoders", "clip"),
    "diffusion_models": ("diffusion_models", "unet"),
    "clip_vision": ("clip_vision",),
    "style_models": ("style_models",),
    "embeddings": ("embeddings",),
    "diffusers": ("diffusers",),
    "vae_approx": ("vae_approx",),
    "controlnet": ("controlnet", "t2i_adapter"),
    "gligen": ("gligen",),
    "upscale_models": ("upscale_models",),
    "latent_upscale_models": ("latent_upscale_models",),
    "hypernetworks": ("hypernetworks",),
    "photomaker": ("photomaker",),
    "classifiers": ("classifiers",),
    "model_patches": ("model_patches",),
    "audio_encoders": ("audio_encoders",),
}
# ComfyUI's legacy folder names.
LEGACY_FOLDERS = {"unet": "diffusion_models", "clip": "text_encoders"}

INSTANCE_SUBDIRS = ("custom_nodes", "user", "temp", "output", "input", "models", "python-packages", "home")
# Folders the container (running as PUID:PGID) must be able to write, whatever made them: the build gives them to
# PUID:PGID when root owns them ("" is the instance's folder itself). ComfyUI saves its settings in user/default.
OWNED_FOLDERS = ("", *INSTANCE_SUBDIRS, "user/default", "user/default/workflows")
EXTRA_MODEL_PATHS_FILE = "extra_model_paths.yaml"

# Container side of the contract.
CONTAINER_SHARED = "/shared"
CONTAINER_INSTANCE = "/instance"
CONTAINER_MODEL_CACHE = "/model-cache"

# Instance ids: DNS labels (they name a directory, a container and a host name). `\Z`, not `$`: `$` also accepts a
# trailing newline.
INSTANCE_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
RESERVED_IDS = frozenset({"shared", "instances", "backups", "models", "input", "storage", "tmp", "temp", "new", "all",
                          "comfyhub", "admin", "api", "static"})


class LayoutError(Exception):
    """A path or id that would break the layout (escape a root, reuse a reserved name)."""


def instance_id_problem(instance_id: str) -> str | None:
    """Why `instance_id` cannot name an instance, or None when it can."""
    if not isinstance(instance_id, str) or not instance_id:
        return "An instance id is required."
    if len(instance_id) > 63:
        return "An instance id has at most 63 characters."
    if not INSTANCE_ID_RE.fullmatch(instance_id):
        return ("Use lowercase letters a-z, digits and '-', starting and ending with a letter or digit "
                f"(e.g. '{_suggest_id(instance_id)}').")
    if instance_id in RESERVED_IDS:
        return f"'{instance_id}' is reserved by ComfyHub's storage layout; pick another id."
    return None


def _suggest_id(value: str) -> str:
    suggestion = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")[:63].strip("-")
    return suggestion or "my-instance"


def shared_root(node=None) -> Path:
    return Path(node.shared_path) if node is not None and node.shared_path else settings.COMFY_SHARED_PATH


def instances_root(node=None) -> Path:
    return Path(node.instances_path) if node is not None and node.instances_path else settings.COMFY_INSTANCES_PATH


def shared_models_dir(node=None) -> Path:
    return shared_root(node) / "models"


def shared_input_dir(node=None) -> Path:
    return shared_root(node) / "input"


def model_cache_root(node=None) -> Path | None:
    """The node's model cache folder (MODEL_CACHE_PATH), or None when it has none. The setting is this process's:
    it describes the node ComfyHub runs as here (NODE_NAME), so for another node's instances it says nothing (that
    node's own ComfyHub has its own setting)."""
    path = getattr(settings, "MODEL_CACHE_PATH", None)
    if not path:
        return None
    if node is not None and node.name != getattr(settings, "NODE_NAME", "local"):
        return None
    return Path(path)


def instance_dir(instance_id: str, node=None) -> Path:
    """The instance's own tree; refuses any id that is not a plain, valid instance id."""
    problem = instance_id_problem(instance_id)
    if problem:
        raise LayoutError(f"Invalid instance id {instance_id!r}: {problem}")
    root = instances_root(node)
    path = root / instance_id
    if path.parent != root:
        raise LayoutError(f"Instance id {instance_id!r} escapes {root}.")
    return path


def extra_model_paths_yaml(cache: bool = False) -> str:
    """The YAML that adds the read-only shared library to every model folder, after the instance's own folder, and
    with `cache` the node's model cache between the two (ComfyUI loads a name from the first folder that has it, so
    a cached copy on fast disk wins over the shared one, and the instance's own file over both).

    Nodes save downloads to folder_paths.get_folder_paths(kind)[0], so that first path must be the instance's
    writable /instance/models/<folder>. ComfyUI (utils/extra_config.py, folder_paths.add_model_folder_path) appends a
    section's paths, or puts them first when the section says `is_default: true` (each line in turn, so the last line
    of a multi-line value ends up first). The cache and shared sections are therefore not default (appended in the
    order they are written), and the instance section names each key's default folder alone, marked
    `is_default: true`, so the instance's folder is first whatever --base-directory gives. Without `cache` the text
    is exactly what it was before the cache existed."""
    lines = [
        "# Written by ComfyHub: for every model folder the instance's own /instance/models/<folder> comes first (nodes",
        "# save downloads to the first path), the shared, read-only model library after it."
        if not cache else
        "# save downloads to the first path), then this node's read-only model cache, the shared library last.",
        "comfyhub_instance:",
        f"    base_path: {CONTAINER_INSTANCE}/models",
        "    is_default: true",
    ]
    # No trailing slash: ComfyUI does not normalise, and the path must equal its own default to move, not repeat.
    lines.extend(f"    {key}: {folders[0]}" for key, folders in MODEL_FOLDERS.items())
    if cache:
        lines += _appended_section("comfyhub_cache", f"{CONTAINER_MODEL_CACHE}/models")
    lines += _appended_section("comfyhub_shared", f"{CONTAINER_SHARED}/models")
    return "\n".join(lines) + "\n"


def _appended_section(name: str, base_path: str) -> list[str]:
    """A section that is not default: every sub-folder of every model folder, appended after those before it."""
    lines = [f"{name}:", f"    base_path: {base_path}"]
    for key, folders in MODEL_FOLDERS.items():
        if len(folders) == 1:
            lines.append(f"    {key}: {folders[0]}/")
        else:
            lines.append(f"    {key}: |")
            lines.extend(f"        {folder}/" for folder in folders)
    return lines


@dataclass
class BuildReport:
    created: list[str] = field(default_factory=list)
    existing: int = 0
    links: list[str] = field(default_factory=list)
    skipped_links: list[str] = field(default_factory=list)
    unlinked: list[str] = field(default_factory=list)  # links to shared input files that are gone, dropped
    repaired: list[str] = field(default_factory=list)  # folders root owned, given to PUID:PGID


def build_shared_tree(node=None, report: BuildReport | None = None) -> BuildReport:
    report = report or BuildReport()
    _make_dir(shared_root(node), report)
    _make_dir(shared_models_dir(node), report)
    for key, folders in MODEL_FOLDERS.items():
        for folder in folders:
            _make_dir(shared_models_dir(node) / folder, report)
    _make_dir(shared_input_dir(node), report)
    if (cache := model_cache_root(node)) is not None:
        # Made before a container mounts it (a bind mount of a missing folder fails); ComfyHub's, not PUID's: the
        # containers only read it.
        for path in (cache, cache / "models"):
            if not path.is_dir():
                if path.exists() or path.is_symlink():
                    raise LayoutError(f"{path} exists but is not a directory; move it away or change "
                                      "MODEL_CACHE_PATH, and build again.")
                path.mkdir(parents=True)
                report.created.append(str(path))
            else:
                report.existing += 1
    return report


def build_instance_tree(instance_id: str, node=None, report: BuildReport | None = None) -> BuildReport:
    """Create (never delete or overwrite) the instance's tree and its generated files. Idempotent.

    Everything below the instance's folder is made through descriptors that never follow a link (the container can
    write there): a link planted where a folder belongs stops the build with a LayoutError naming it. Every folder
    it makes belongs to PUID:PGID (when ComfyHub runs as root), and so does each of OWNED_FOLDERS found owned by
    root (made by an older ComfyHub, or by a container that ran as root)."""
    report = report or BuildReport()
    root = instance_dir(instance_id, node)
    _make_dir(instances_root(node), report)
    _make_instance_root(root, report)
    for sub in INSTANCE_SUBDIRS:
        _make_inside(root, sub, report)
    _make_inside(root, "user/default/workflows", report)
    _give_root_owned_folders_to_puid(root, report)
    write_generated_file(root / EXTRA_MODEL_PATHS_FILE,
                         extra_model_paths_yaml(cache=model_cache_root(node) is not None), root=root)
    link_shared_input(instance_id, node, report)
    return report


def link_shared_input(instance_id: str, node=None, report: BuildReport | None = None) -> BuildReport:
    """Make each shared input file appear at the top of the instance's input folder (ComfyUI's LoadImage lists only
    that level) as a link to its read-only container path. Never replaces a file the instance owns, and never
    follows a link in the instance's folder (input/ itself included)."""
    report = report or BuildReport()
    root = instance_dir(instance_id, node)
    shared_input = shared_input_dir(node)
    if not shared_input.is_dir():
        return report
    try:
        input_fd = safefs.open_dir(root, "input")
    except safefs.UnsafePathError as exc:
        raise LayoutError(str(exc)) from None
    try:
        wanted = set()
        for entry in os.scandir(shared_input):
            if not entry.is_file(follow_symlinks=False) or entry.name.startswith("."):
                continue
            wanted.add(entry.name)
            target = f"{CONTAINER_SHARED}/input/{entry.name}"
            try:
                info = os.lstat(entry.name, dir_fd=input_fd)
            except FileNotFoundError:
                info = None
            if info is not None:
                if not (stat.S_ISLNK(info.st_mode) and os.readlink(entry.name, dir_fd=input_fd) == target):
                    report.skipped_links.append(entry.name)  # the instance's own upload of the same name wins
                continue
            try:
                os.symlink(target, entry.name, dir_fd=input_fd)  # never replaces: it appeared meanwhile otherwise
            except FileExistsError:
                report.skipped_links.append(entry.name)
                continue
            if os.geteuid() == 0:
                os.chown(entry.name, settings.PUID, settings.PGID, dir_fd=input_fd, follow_symlinks=False)
            report.links.append(entry.name)
        # Drop links to shared files that are gone (only our own links: they point into /shared/input).
        for entry in os.scandir(input_fd):
            if entry.is_symlink() and entry.name not in wanted:
                try:
                    ours = os.readlink(entry.name, dir_fd=input_fd).startswith(f"{CONTAINER_SHARED}/input/")
                except OSError:
                    continue
                if ours and safefs.unlink_link(root, f"input/{entry.name}"):
                    report.unlinked.append(entry.name)
    finally:
        os.close(input_fd)
    return report


def shared_input_names(node=None) -> frozenset[str] | None:
    """The names `link_shared_input` links (the plain, not hidden files at the top of the shared input folder), or
    None without that folder. One listing of one folder: what the periodic refresh compares with what it saw last."""
    shared_input = shared_input_dir(node)
    if not shared_input.is_dir():
        return None
    return frozenset(entry.name for entry in os.scandir(shared_input)
                     if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."))


def refresh_shared_input(instance_ids, node=None) -> dict:
    """Bring the shared input links of these instances up to date (`link_shared_input`: new shared files linked,
    links to removed ones dropped, the instance's own files untouched). An instance whose folder or input/ does not
    exist yet is skipped (its build links them); one with a planted link is refused, named, and the rest go on."""
    result = {"linked": {}, "unlinked": {}, "refused": {}}
    for instance_id in instance_ids:
        try:
            report = link_shared_input(instance_id, node)
        except FileNotFoundError:
            continue
        except (LayoutError, safefs.UnsafePathError) as exc:
            result["refused"][instance_id] = str(exc)
            continue
        if report.links:
            result["linked"][instance_id] = report.links
        if report.unlinked:
            result["unlinked"][instance_id] = report.unlinked
    return result


def write_generated_file(path: Path, content: str, *, root: Path | None = None):
    """Atomically (re)write a file ComfyHub generates: a temporary file created exclusively under a random name,
    then renamed over `path` (a link there is replaced, never written through). `root` is the trusted folder the
    path lies in (the instance's folder): no link is followed below it. Without it, only the file's own folder is
    trusted."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    try:
        safefs.write_bytes(root, safefs.relative_to_root(root, path), content.encode("utf-8"))
    except safefs.UnsafePathError as exc:
        raise LayoutError(str(exc)) from None


def _give_root_owned_folders_to_puid(root: Path, report: BuildReport):
    """chown to PUID:PGID each of OWNED_FOLDERS that root owns, through a descriptor reached without following any
    link (a link where a folder belongs is refused, named, and nothing is changed through it)."""
    if os.geteuid() != 0:
        return  # only root can give files away; then ComfyHub's own user owns what it made
    for relpath in OWNED_FOLDERS:
        try:
            with safefs.opened_dir(root, relpath) as fd:
                if os.fstat(fd).st_uid == 0:
                    os.fchown(fd, settings.PUID, settings.PGID)
                    report.repaired.append(str(root / relpath) if relpath else str(root))
        except FileNotFoundError:
            continue  # removed meanwhile by the container: the next build makes it
        except safefs.UnsafePathError as exc:
            raise LayoutError(str(exc)) from None


def _make_dir(path: Path, report: BuildReport):
    """A folder outside any instance's reach (a storage root, the shared tree): containers cannot write there, so a
    link in it is the administrator's (a library on another disk) and counts as the folder."""
    if path.is_dir():
        report.existing += 1
        return
    if path.exists() or path.is_symlink():
        raise LayoutError(f"{path} exists but is not a directory; move it away and build again.")
    path.mkdir(parents=True)
    _chown(path)
    report.created.append(str(path))


def _make_instance_root(path: Path, report: BuildReport):
    """The instance's own folder: a real folder (never a link), made if missing."""
    if path.is_symlink():
        raise LayoutError(f"{path} is a link ({os.readlink(path)}); an instance's folder must be a real folder, "
                          "since ComfyHub follows no link into it. Replace the link with the folder it points to.")
    _make_dir(path, report)


def _make_inside(root: Path, relpath: str, report: BuildReport):
    """root/relpath and its missing parents, made without following any link below root."""
    created: list[Path] = []
    try:
        with safefs.opened_dir(root, relpath, create=True, created=created):
            pass
    except safefs.UnsafePathError as exc:
        raise LayoutError(str(exc)) from None
    report.created.extend(str(path) for path in created)
    if not created:
        report.existing += 1


def _chown(path: Path, follow: bool = True):
    if os.geteuid() == 0:
        os.chown(path, settings.PUID, settings.PGID, follow_symlinks=follow)
