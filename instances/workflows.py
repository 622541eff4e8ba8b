"""Workflows: the JSON files under an instance's user/default/workflows/, copying them between instances without
following links or leaving half-written files, checking what a workflow needs, and the shared workflow library."""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import heapq
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from django.db import IntegrityError, transaction
from django.db.models import Max

from comfyhub.operations import NullReport
from storage_app import layout, safefs

from . import remote
from .models import Instance, WorkflowEntry, WorkflowInstall, WorkflowVersion

MAX_WORKFLOW_BYTES = 20 << 20
CONFLICT_POLICIES = ("skip", "overwrite", "rename")
WORKFLOWS_FOLDER = "user/default/workflows"  # inside the instance's folder


class WorkflowError(Exception):
    """A workflow path or file that cannot be used; the message says which and why."""


def workflows_dir(instance: Instance) -> Path:
    return layout.instance_dir(instance.instance_id, instance.node) / "user" / "default" / "workflows"


def clean_relpath(relpath: str) -> str:
    """A workflow path relative to the workflows folder: sub-folders allowed, never absolute or with '..'."""
    relpath = (relpath or "").replace("\\", "/").strip()
    path = PurePosixPath(relpath)
    if not relpath or path.is_absolute() or ".." in path.parts or "\0" in relpath:
        raise WorkflowError(f"'{relpath}' is not a workflow path inside the workflows folder (no '..', not absolute).")
    if path.suffix.lower() != ".json":
        raise WorkflowError(f"'{relpath}' is not a .json workflow file.")
    if any(part.startswith(".") for part in path.parts):
        raise WorkflowError(f"'{relpath}' is hidden; workflows are plain .json files.")
    return str(path)


def _instance_root(instance: Instance) -> Path:
    return layout.instance_dir(instance.instance_id, instance.node)


def _refused(exc: safefs.UnsafePathError) -> WorkflowError:
    return WorkflowError(str(exc))


def _on_its_node(instance: Instance, read: str, **kwargs):
    """A read of another node's instance, by that node's agent (instances.remote); its failure as a WorkflowError
    whose cause is the NodeReadError (holders() tells "unreachable" from "removed" by it)."""
    try:
        return remote.call_on_node(instance.node, f"instances.workflows.{read}",
                                   {"instance_id": instance.instance_id, **kwargs})
    except remote.NodeReadError as exc:
        raise WorkflowError(str(exc)) from exc


def list_workflows(instance: Instance) -> list[dict]:
    """Every .json file under the instance's workflows folder. Walked from the instance's own folder through
    descriptors that never follow a link: a link on the way there (user/, default/) is refused with a WorkflowError
    naming it, and a link inside is listed as such, never entered. Another node's instance is listed by its node's
    agent."""
    if not remote.served_here(instance.node):
        return _on_its_node(instance, "list_workflows_of")
    found = []
    try:
        for folder, dirnames, filenames, links, fd in safefs.walk(_instance_root(instance), WORKFLOWS_FOLDER,
                                                                   with_fd=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            here = PurePosixPath(folder).relative_to(WORKFLOWS_FOLDER)
            for name in sorted(filenames + links):
                if not name.lower().endswith(".json") or name.startswith("."):
                    continue
                try:
                    info = os.lstat(name, dir_fd=fd)
                except FileNotFoundError:
                    continue  # removed since it was listed
                found.append({
                    "path": (here / name).as_posix(),
                    "size": info.st_size,
                    "modified": info.st_mtime,
                    "symlink": stat.S_ISLNK(info.st_mode),
                })
    except FileNotFoundError:
        return []
    except safefs.UnsafePathError as exc:
        raise _refused(exc) from None
    return found


@remote.node_read
def list_workflows_of(instance_id: str) -> list[dict]:
    return list_workflows(remote.instance_here(instance_id))


def read_workflow(instance: Instance, relpath: str) -> bytes:
    """The bytes of one workflow file, refusing links (anywhere on the path, from the instance's folder down) and
    oversized files. Another node's instance's file is read by its node's agent."""
    relpath = clean_relpath(relpath)
    if not remote.served_here(instance.node):
        return _on_its_node(instance, "read_workflow_of", relpath=relpath)
    try:
        return safefs.read_bytes(_instance_root(instance), f"{WORKFLOWS_FOLDER}/{relpath}", MAX_WORKFLOW_BYTES)
    except FileNotFoundError:
        raise WorkflowError(f"'{relpath}' does not exist.") from None
    except safefs.UnsafePathError as exc:
        raise _refused(exc) from None
    except OSError as exc:
        raise WorkflowError(f"'{relpath}' cannot be read ({exc.strerror}); refused.") from None


@remote.node_read
def read_workflow_of(instance_id: str, relpath: str) -> bytes:
    return read_workflow(remote.instance_here(instance_id), relpath)


def parse_workflow(raw: bytes) -> dict:
    """A workflow's JSON within UPLOAD_MAX_BYTES and UPLOAD_MAX_DEPTH, checked to have the shape workflow_needs()
    reads (a person's file: any part of it may be the wrong type)."""
    from comfyhub import jsonlimits
    from comfyhub.jsonlimits import kind_of

    try:
        data = jsonlimits.loads(raw, what="The workflow")
    except jsonlimits.JSONInputError as exc:
        raise WorkflowError(str(exc)) from None
    if not isinstance(data, dict):
        raise WorkflowError(f"Not a ComfyUI workflow: the JSON is {kind_of(data)}, not an object.")
    if "nodes" in data:
        _check_ui_shape(data)
    else:
        for key, node in data.items():
            if isinstance(node, dict) and "class_type" in node:
                if not isinstance(node["class_type"], str):
                    raise WorkflowError(f"Node '{key}': 'class_type' is {kind_of(node['class_type'])}; it should be "
                                        "the node's type name (a string).")
                if not isinstance(node.get("inputs") or {}, dict):
                    raise WorkflowError(f"Node '{key}': 'inputs' is {kind_of(node['inputs'])}; it should be an object "
                                        "of input names and values.")
    return data


def _check_ui_shape(data: dict) -> None:
    from comfyhub.jsonlimits import kind_of

    if not isinstance(data["nodes"], list):
        raise WorkflowError(f"'nodes' is {kind_of(data['nodes'])}; a UI-format workflow has a list of nodes there.")
    nodes = list(data["nodes"])
    definitions = data.get("definitions") or {}
    if not isinstance(definitions, dict):
        raise WorkflowError(f"'definitions' is {kind_of(definitions)}; it should be an object (with 'subgraphs').")
    subgraphs = definitions.get("subgraphs") or []
    if not isinstance(subgraphs, list) or not all(isinstance(s, dict) for s in subgraphs):
        raise WorkflowError("'definitions.subgraphs' should be a list of objects.")
    for number, subgraph in enumerate(subgraphs, start=1):
        if not isinstance(subgraph.get("nodes") or [], list):
            raise WorkflowError(f"Subgraph {number}: 'nodes' is {kind_of(subgraph['nodes'])}; it should be a list.")
        if isinstance(subgraph.get("id"), (dict, list)):
            raise WorkflowError(f"Subgraph {number}: 'id' is {kind_of(subgraph['id'])}; it should be a string.")
        nodes.extend(subgraph.get("nodes") or [])
    for node in nodes:
        if isinstance(node, dict) and node.get("type") is not None and not isinstance(node["type"], str):
            raise WorkflowError(f"Node {node.get('id', '?')!s:.40}: 'type' is {kind_of(node['type'])}; it should be "
                                "the node's type name (a string).")


def write_workflow(instance: Instance, relpath: str, raw: bytes, on_conflict: str,
                   durable: bool = True) -> tuple[str, str]:
    """Write atomically under the instance's workflows folder. Returns (what happened, final relpath).

    The folder is reached from the instance's own folder without following any link (missing folders are made);
    the content goes into a temporary file created exclusively under a random name, owned by PUID:PGID through its
    descriptor, then renamed into place: without replacing anything for a new or renamed file, and over the old
    file (never through a link swapped in for it) when overwriting. With `durable=False` the caller flushes to
    disk once for a whole batch (os.sync) instead of once per file; a reader still never sees a half-written
    file."""
    if on_conflict not in CONFLICT_POLICIES:
        raise WorkflowError(f"Unknown conflict policy '{on_conflict}'; use skip, overwrite or rename.")
    relpath = clean_relpath(relpath)
    wanted = PurePosixPath(relpath)
    try:
        with safefs.opened_dir(_instance_root(instance), PurePosixPath(WORKFLOWS_FOLDER, relpath).parent,
                               create=True) as folder_fd:
            name, outcome = wanted.name, "written"
            info = _lstat_at(folder_fd, name)
            if info is not None:
                if not stat.S_ISREG(info.st_mode):
                    raise WorkflowError(f"'{relpath}' exists in {instance} as a link or folder; not touched.")
                if on_conflict == "skip":
                    return "skipped (exists)", relpath
                if on_conflict == "rename":
                    name, outcome = _free_name(folder_fd, name), "renamed"
                    relpath = wanted.with_name(name).as_posix()
                else:
                    outcome = "overwritten"
            tmp_fd, tmp_name = safefs.create_temp(folder_fd)
            try:
                with os.fdopen(tmp_fd, "wb") as handle:
                    handle.write(raw)
                    handle.flush()
                    safefs.chown_fd(handle.fileno())
                    if durable:
                        os.fsync(handle.fileno())
                if outcome == "overwritten":
                    os.rename(tmp_name, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
                else:  # never replaces: a file that appeared meanwhile makes this fail
                    safefs.rename_noreplace(folder_fd, tmp_name, folder_fd, name)
                tmp_name = None
            except FileExistsError:
                raise WorkflowError(f"'{relpath}' appeared in {instance} while copying; not touched.") from None
            finally:
                if tmp_name is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp_name, dir_fd=folder_fd)
    except safefs.UnsafePathError as exc:
        raise _refused(exc) from None
    return outcome, relpath


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _free_name(dir_fd: int, name: str) -> str:
    path = PurePosixPath(name)
    for number in range(2, 10_000):
        candidate = f"{path.stem} ({number}){path.suffix}"
        if _lstat_at(dir_fd, candidate) is None:
            return candidate
    raise WorkflowError(f"No free name for {name}.")


@dataclass
class CopyResult:
    files: list = field(default_factory=list)  # {"source", "target", "path", "result"}

    def count(self, result):
        return sum(1 for f in self.files if f["result"].startswith(result))


def read_for_copy(source: Instance, paths: list[str], report) -> tuple[dict[str, bytes], list[dict]]:
    """Read and check `paths` in `source` once: ({clean relative path: content}, a copy row for each one refused)."""
    contents, refused = {}, []
    for relpath in paths:
        try:
            raw = read_workflow(source, relpath)
            parse_workflow(raw)
            contents[clean_relpath(relpath)] = raw
        except WorkflowError as exc:
            refused.append({"source": source.instance_id, "target": "", "path": relpath, "result": f"refused: {exc}"})
            report.log(f"{relpath}: refused: {exc}", "WARNING")
    return contents, refused


def write_copies(source_id: str, targets: list[Instance], contents: dict[str, bytes], on_conflict: str,
                 report) -> list[dict]:
    """Write `contents` (from read_for_copy, on this node or another) into `targets`: a copy row per file and target,
    one flush to disk per target."""
    files = []
    total, done = max(len(contents) * len(targets), 1), 0
    for target in targets:
        for relpath, raw in contents.items():
            try:
                outcome, written = write_workflow(target, relpath, raw, on_conflict, durable=False)
                if written != relpath:
                    outcome = f"{outcome} to {written}"
            except (WorkflowError, OSError) as exc:
                outcome = f"failed: {exc}"
            files.append({"source": source_id, "target": target.instance_id, "path": relpath, "result": outcome})
            report.log(f"{relpath} -> {target}: {outcome}")
            done += 1
            report.progress(100 * done / total, f"{done} of {total}")
        os.sync()  # one flush per target instead of one per file
    return files


def copy_workflows(source: Instance, targets: list[Instance], paths: list[str], on_conflict: str,
                   report=None) -> CopyResult:
    report = report or NullReport()
    contents, refused = read_for_copy(source, paths, report)
    return CopyResult(refused + write_copies(source.instance_id, targets, contents, on_conflict, report))


# --- What a workflow needs -----------------------------------------------------------------------------------

# Loader node classes and the inputs that name model files, by ComfyUI model folder.
MODEL_INPUTS = {
    "ckpt_name": "checkpoints", "lora_name": "loras", "vae_name": "vae", "unet_name": "diffusion_models",
    "clip_name": "text_encoders", "clip_name1": "text_encoders", "clip_name2": "text_encoders",
    "clip_name3": "text_encoders", "control_net_name": "controlnet", "model_name": "upscale_models",
    "style_model_name": "style_models", "gligen_name": "gligen", "config_name": "configs",
    "hypernetwork_name": "hypernetworks", "embedding": "embeddings",
}
# UI-format widgets_values carry no names: the position of the model name per known loader.
WIDGET_MODEL_SLOTS = {
    "CheckpointLoaderSimple": [(0, "checkpoints")], "CheckpointLoader": [(0, "configs"), (1, "checkpoints")],
    "LoraLoader": [(0, "loras")], "LoraLoaderModelOnly": [(0, "loras")], "VAELoader": [(0, "vae")],
    "UNETLoader": [(0, "diffusion_models")], "CLIPLoader": [(0, "text_encoders")],
    "DualCLIPLoader": [(0, "text_encoders"), (1, "text_encoders")],
    "TripleCLIPLoader": [(0, "text_encoders"), (1, "text_encoders"), (2, "text_encoders")],
    "ControlNetLoader": [(0, "controlnet")], "DiffControlNetLoader": [(0, "controlnet")],
    "UpscaleModelLoader": [(0, "upscale_models")], "CLIPVisionLoader": [(0, "clip_vision")],
    "StyleModelLoader": [(0, "style_models")], "GLIGENLoader": [(0, "gligen")],
    "HypernetworkLoader": [(0, "hypernetworks")], "unCLIPCheckpointLoader": [(0, "checkpoints")],
    "ImageOnlyCheckpointLoader": [(0, "checkpoints")],
}
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".sft", ".gguf", ".pkl")


@dataclass
class Needs:
    format: str
    node_types: set
    models: set  # (folder or "", name)


def workflow_needs(data: dict) -> Needs:
    """Node types and model files a workflow names, from the UI format (`nodes`) or the API format."""
    node_types, models = set(), set()
    if isinstance(data.get("nodes"), list):
        nodes = list(data["nodes"])
        for subgraph in (data.get("definitions") or {}).get("subgraphs") or []:
            nodes.extend(subgraph.get("nodes") or [])
        subgraph_ids = {s.get("id") for s in (data.get("definitions") or {}).get("subgraphs") or []}
        for node in nodes:
            if not isinstance(node, dict):
                continue
            kind = node.get("type")
            if isinstance(kind, str) and kind not in subgraph_ids and kind not in ("Note", "MarkdownNote",
                                                                                   "Reroute", "PrimitiveNode"):
                node_types.add(kind)
            values = node.get("widgets_values")
            if isinstance(values, dict):
                values = list(values.values())
            if not isinstance(values, list):
                continue
            slots = WIDGET_MODEL_SLOTS.get(kind, [])
            for index, folder in slots:
                if index < len(values) and isinstance(values[index], str) and values[index]:
                    models.add((folder, values[index]))
            if not slots:
                for value in values:
                    if isinstance(value, str) and value.lower().endswith(MODEL_SUFFIXES):
                        models.add(("", value))
        return Needs("ui", node_types, models)
    api_nodes = [n for n in data.values() if isinstance(n, dict) and "class_type" in n]
    if not api_nodes:
        raise WorkflowError("Not a ComfyUI workflow: no 'nodes' list (UI format) and no nodes with 'class_type' "
                            "(API format).")
    for node in api_nodes:
        node_types.add(str(node["class_type"]))
        for key, value in (node.get("inputs") or {}).items():
            if not isinstance(value, str):
                continue
            if key in MODEL_INPUTS:
                models.add((MODEL_INPUTS[key], value))
            elif value.lower().endswith(MODEL_SUFFIXES):
                models.add(("", value))
    return Needs("api", node_types, models)


# Where the pre-flight found the model names; said in its result.
MODELS_FROM_INSTANCE = "checked against the running instance's model lists"
MODELS_FROM_FILES = "checked against the files on disk (the instance is stopped)"
MODELS_FROM_FILES_NO_ANSWER = "checked against the files on disk (the instance does not answer)"
# Old folder names ComfyUI still reads into the new ones.
LEGACY_MODEL_FOLDERS = {"unet": "diffusion_models", "clip": "text_encoders"}
_NOT_RUNNING = (Instance.Status.NEW, Instance.Status.STOPPED)


def available_models(instance: Instance) -> dict[str, set[str]]:
    """Model names ComfyUI would list per folder, from the files on disk: the shared library's
    <shared>/models/<folder>/ and the instance's own models/<folder>/, as paths relative to the folder with '/'.
    Both are walked through descriptors that never follow a link (the instance's folder is the container's to
    write); links and files that are not model files are left out. Another node's instance: its node's agent walks
    its node's copy of the library and the instance's folder (a WorkflowError when it cannot be asked)."""
    from storage_app import library

    if not remote.served_here(instance.node):
        return {folder: set(names) for folder, names in _on_its_node(instance, "available_models_of").items()}
    found: dict[str, set[str]] = {}
    for root, relpath in ((layout.shared_models_dir(instance.node), ""), (_instance_root(instance), "models")):
        try:
            for folder, _dirs, files, _links in safefs.walk(root, relpath):
                parts = PurePosixPath(folder).relative_to(relpath or ".").parts
                if not parts:
                    continue  # files at the top of models/ are in no folder
                names = found.setdefault(LEGACY_MODEL_FOLDERS.get(parts[0], parts[0]), set())
                # Strings joined once per folder, not paths built per file: libraries hold thousands of files.
                in_library, in_folder = "/".join(parts) + "/", "".join(f"{part}/" for part in parts[1:])
                names.update(in_folder + name for name in files if library.is_model_file(in_library + name))
        except (FileNotFoundError, NotADirectoryError, safefs.UnsafePathError):
            continue
    return found


@remote.node_read
def available_models_of(instance_id: str) -> dict[str, list[str]]:
    return {folder: sorted(names) for folder, names in available_models(remote.instance_here(instance_id)).items()}


def model_listing(instance: Instance, folders: set[str]) -> tuple[dict[str, set[str]], str]:
    """The model names `instance` offers per folder and where they came from: its own GET /models/<folder> when it
    runs (`folders`, plus every folder it has when "" is among them), else the files on disk."""
    from .comfyui_api import ComfyUI, ComfyUIError

    if instance.status in _NOT_RUNNING:
        return available_models(instance), MODELS_FROM_FILES
    on_disk = None
    if "" in folders:
        on_disk = available_models(instance)
        folders = ({f for f in folders if f} | set(on_disk) | set(MODEL_INPUTS.values())
                   | {folder for slots in WIDGET_MODEL_SLOTS.values() for _, folder in slots})
    client, found = ComfyUI.of(instance), {}
    try:
        for folder in sorted(folders):
            try:
                found[folder] = {name.replace("\\", "/") for name in client.models(folder)}
            except ComfyUIError as exc:
                if exc.status_code != 404:
                    raise
                found[folder] = set()  # ComfyUI has no such folder
    except ComfyUIError:
        return (on_disk if on_disk is not None else available_models(instance)), MODELS_FROM_FILES_NO_ANSWER
    return found, MODELS_FROM_INSTANCE


def preflight(data: dict, target: Instance, node_types: set | None = None) -> dict:
    """What `target` lacks to run this workflow: node types and model files (with near matches)."""
    needs = workflow_needs(data)
    known_types = node_types if node_types is not None else set(target.node_types or [])
    models, models_source = model_listing(target, {folder for folder, _ in needs.models})
    everything = set().union(*models.values()) if models else set()
    indexes: dict[str, _NameIndex] = {}
    missing_models = []
    for folder, name in sorted(needs.models):
        normalized = name.replace("\\", "/")
        pool = models.get(folder, set()) if folder else everything
        if normalized in pool:
            continue
        index = indexes.get(folder) or indexes.setdefault(folder, _NameIndex(pool))
        missing_models.append({"folder": folder or "?", "name": name, "near": index.near(normalized)})
    return {
        "format": needs.format,
        "node_types": sorted(needs.node_types),
        "missing_node_types": sorted(needs.node_types - known_types) if known_types else [],
        "node_types_known": bool(known_types),
        "models": [{"folder": f or "?", "name": n} for f, n in sorted(needs.models)],
        "missing_models": missing_models,
        "models_source": models_source,
    }


class _NameIndex:
    """Near matches for model names in a big pool, fast: names sharing a rare word or number with the wanted
    one are ranked first, and only the best few are compared letter by letter (difflib is slow on thousands)."""

    TOKEN = re.compile(r"[a-z]+|\d+")

    def __init__(self, pool):
        self.stems = {path: os.path.splitext(path.rsplit("/", 1)[-1])[0] for path in sorted(pool)}
        self.by_token: dict[str, set] = {}
        for path, stem in self.stems.items():
            for token in set(self.TOKEN.findall(stem.lower())):
                self.by_token.setdefault(token, set()).add(path)
        self.common = max(10, len(self.stems) // 10)

    def near(self, wanted: str, limit: int = 3) -> list[str]:
        # Names without folders and extensions: ".safetensors" alone would make everything look alike.
        stem = os.path.splitext(wanted.rsplit("/", 1)[-1])[0]
        if len(self.stems) <= 50:
            candidates = list(self.stems)
        else:
            scores: dict[str, int] = {}
            for token in set(self.TOKEN.findall(stem.lower())):
                paths = self.by_token.get(token, ())
                if len(paths) <= self.common:
                    for path in paths:
                        scores[path] = scores.get(path, 0) + 1
            candidates = heapq.nlargest(20, scores, key=lambda path: (scores[path], path))
        by_stem: dict[str, list] = {}
        for path in candidates:
            by_stem.setdefault(self.stems[path], []).append(path)
        close = difflib.get_close_matches(stem, list(by_stem), n=limit, cutoff=0.6)
        return sorted(path for found in close for path in by_stem[found])[:limit]


# --- The shared library --------------------------------------------------------------------------------------

def publish(instance: Instance, relpath: str, name: str, user=None) -> tuple[WorkflowVersion, bool]:
    """Publish a workflow of `instance` as `name`; identical content returns the existing version."""
    raw = read_workflow(instance, relpath)
    parse_workflow(raw)
    digest = hashlib.sha256(raw).hexdigest()
    name = (name or "").strip()
    if not name or "/" in name or len(name) > 200:
        raise WorkflowError("A library name is 1-200 characters without '/'.")
    for _ in range(3):
        try:
            with transaction.atomic():
                entry, _ = WorkflowEntry.objects.get_or_create(name=name)
                existing = entry.versions.filter(sha256=digest).first()
                if existing:
                    return existing, False
                number = (entry.versions.aggregate(top=Max("number"))["top"] or 0) + 1
                version = WorkflowVersion.objects.create(
                    entry=entry, number=number, sha256=digest, content=raw.decode("utf-8"),
                    published_from=f"{instance.instance_id}:{relpath}",
                    author=user if user is not None and user.is_authenticated else None,
                )
                return version, True
        except IntegrityError:
            continue  # someone published at the same moment: look again
    raise WorkflowError("The library changed while publishing; try again.")


def install(version: WorkflowVersion, instance: Instance) -> tuple[str, str]:
    """Write `version` as <name>.json. A file that is some library version of this workflow is replaced (an
    upgrade); one changed in the instance is kept, and the version is written beside it under a new name."""
    relpath = f"{version.entry.name}.json"
    on_conflict = "overwrite"
    try:
        current = hashlib.sha256(read_workflow(instance, relpath)).hexdigest()
    except WorkflowError:
        current = None  # not there (or not a plain file: write_workflow refuses that itself)
    if current and not version.entry.versions.filter(sha256=current).exists():
        on_conflict = "rename"
    outcome, written = write_workflow(instance, relpath, version.content.encode("utf-8"), on_conflict)
    if not outcome.startswith("skipped"):
        WorkflowInstall.objects.update_or_create(instance=instance, path=written, defaults={"version": version})
    return outcome, written


def holders(entry: WorkflowEntry) -> list[dict]:
    """Which instance holds which version of `entry` now (files changed since install show as 'modified')."""
    found = []
    for install_row in WorkflowInstall.objects.filter(version__entry=entry).select_related("version", "instance",
                                                                                           "instance__node"):
        try:
            digest = hashlib.sha256(read_workflow(install_row.instance, install_row.path)).hexdigest()
        except WorkflowError as exc:
            # An instance whose node cannot be asked now is not known to have lost the file.
            unreachable = isinstance(exc.__cause__, remote.NodeReadError)
            found.append({"instance": install_row.instance.instance_id, "path": install_row.path,
                          "version": None, "state": "unknown" if unreachable else "removed"})
            continue
        version = entry.versions.filter(sha256=digest).first()
        found.append({"instance": install_row.instance.instance_id, "path": install_row.path,
                      "version": version.number if version else None,
                      "state": "installed" if version else "modified"})
    return found
