"""Custom nodes per instance: git clones under the instance's custom_nodes/, their Python requirements installed
into the instance's own python-packages/ (so a recreated container keeps them), ComfyUI's `.disabled` convention.

The instance's folder is writable by the code it runs, so git never runs on the host there: clone, fetch and checkout
run in a throw-away container (as PUID:PGID, only the instance's folder mounted, a network only to clone or fetch),
and listings read the repository as files (gitrepo.py). Host-side file operations go through storage_app.safefs.
"""
from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

from django.conf import settings
from django.db import transaction

from comfyhub.operations import NullReport
from storage_app import layout, safefs

from . import gitrepo
from .models import CustomNode, Instance

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
URL_RE = re.compile(r"^(https?|git|ssh)://[^\s]+$|^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+:[^\s]+$")
LOCAL_URL_RE = re.compile(r"^(file://|/|\./|\.\./|~)")
GIT_TIMEOUT = 600
PACKAGES_DIR = "python-packages"
CONTAINER_PACKAGES = f"{layout.CONTAINER_INSTANCE}/{PACKAGES_DIR}"
NODES = "custom_nodes"
CONTAINER_NODES = f"{layout.CONTAINER_INSTANCE}/{NODES}"
CONTAINER_SOURCE = "/comfyhub-source"  # where a local source is mounted, read-only, for a clone or fetch
REQUIREMENTS_LIMIT = 1024 * 1024

# git inside the container. The container is the sandbox, but the repository's own settings that run commands are
# switched off anyway; command-line settings win over the repository's config. safe.directory names exactly the one
# repository each command works in (g() adds the folder it runs in) and, in the global file below, the mounted local
# source: never '*', so git's ownership guard stays on for every other folder.
GIT_OPTIONS = ("-c core.fsmonitor=false -c core.hooksPath=/dev/null -c core.pager=cat "
               "-c credential.helper= -c protocol.ext.allow=never -c advice.detachedHead=false "
               "-c submodule.recurse=false")
GIT_ENV = {"HOME": "/tmp", "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/true", "LC_ALL": "C",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/tmp/comfyhub-gitconfig"}
NO_GIT = 127
SCRIPT_PRELUDE = f"""set -u
command -v git >/dev/null 2>&1 || {{ echo "comfyhub: no git in this image" >&2; exit {NO_GIT}; }}
# A local clone's upload-pack drops command-line settings, and the mounted source belongs to another user.
printf '[safe]\\n\\tdirectory = %s\\n\\tdirectory = %s/.git\\n' {CONTAINER_SOURCE} {CONTAINER_SOURCE} > "$GIT_CONFIG_GLOBAL" || exit 3
g() {{ git -c "safe.directory=$PWD" {GIT_OPTIONS} -c "protocol.file.allow=$COMFYHUB_FILE_PROTOCOL" "$@"; }}
"""
# $1 the URL, $2 the new folder (in custom_nodes/), $3 the URL to record as origin
CLONE_SCRIPT = """cd "$COMFYHUB_NODES" || exit 3
g clone --quiet --no-checkout --no-recurse-submodules -- "$1" "$2" || exit 10
cd "$2" && g remote set-url origin "$3" || exit 10
"""
# $1 the folder, $2 the URL
FETCH_SCRIPT = """cd "$COMFYHUB_NODES/$1" || exit 3
g fetch --quiet --tags --force --no-recurse-submodules -- "$2" "+refs/heads/*:refs/remotes/origin/*" || exit 13
"""
# What Python writes when ComfyUI imports a node (`__pycache__/`, *.pyc, *.pyo): never a local change, even where the
# repository tracks it (a first run rewrites it). Untracked and ignored files never count either.
GENERATED = "':(glob)**/__pycache__/**' ':(glob)**/*.py[co]'"
GENERATED_EXCLUDED = "':(exclude,glob)**/__pycache__/**' ':(exclude,glob)**/*.py[co]'"
# $1 the folder, $2 a branch, tag or commit ("" for the default branch), $3 "1" to refuse local changes
CHECKOUT_SCRIPT = f"""cd "$COMFYHUB_NODES/$1" || exit 3
if [ "$3" = 1 ]; then
  changes=$(g status --porcelain --untracked-files=no -- . {GENERATED_EXCLUDED}) || exit 15
  [ -z "$changes" ] || exit 14
  # the tracked generated files a run rewrote go back to HEAD's, so that the checkout does not stop at them
  if [ -n "$(g ls-files --modified -- {GENERATED})" ]; then
    g ls-files -z --modified -- {GENERATED} \\
      | g --literal-pathspecs checkout --quiet HEAD --pathspec-from-file=- --pathspec-file-nul || exit 15
  fi
fi
""" + """ref=$2
if [ -z "$ref" ]; then
  ref=$(g rev-parse --abbrev-ref origin/HEAD) || exit 11
  ref=${ref#origin/}
fi
target=""
for candidate in "refs/remotes/origin/$ref" "refs/tags/$ref^{commit}" "$ref^{commit}"; do
  target=$(g rev-parse --verify --quiet "$candidate" 2>/dev/null) && break
  target=""
done
[ -n "$target" ] || exit 11
g checkout --quiet --detach "$target" || exit 12
echo "comfyhub-commit $(g rev-parse HEAD)"
"""


class CustomNodeError(Exception):
    pass


def nodes_dir(instance: Instance) -> Path:
    return instance_root(instance) / NODES


def instance_root(instance: Instance) -> Path:
    return layout.instance_dir(instance.instance_id, instance.node)


def name_from_url(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return name[:-4] if name.endswith(".git") else name


def is_local_source(url: str) -> bool:
    """file:// URLs and paths on the host (what git would clone from the worker's own disk)."""
    return bool(LOCAL_URL_RE.match((url or "").strip()))


def check_url(url: str) -> str:
    url = (url or "").strip()
    if is_local_source(url):
        return _check_local_url(url)
    if not URL_RE.fullmatch(url) or url.startswith("-") or "::" in url.split("://", 1)[0]:
        raise CustomNodeError(f"'{url}' is not a git URL (https://…, ssh://…, git@host:path, or file://… where "
                              "CUSTOM_NODE_LOCAL_SOURCES allows it).")
    return url


def _check_local_url(url: str) -> str:
    if not settings.CUSTOM_NODE_LOCAL_SOURCES:
        raise CustomNodeError(
            f"'{url}' is a local source (file:// or a path on this host); ComfyHub refuses those, as they read host "
            "folders into an instance. Use an https://, ssh:// or git@host: URL, or set "
            "CUSTOM_NODE_LOCAL_SOURCES=true for the web server and the workers to allow them.")
    path = url[len("file://"):] if url.startswith("file://") else url
    if not path.startswith("/") or any(c.isspace() for c in path) or "\0" in path:
        raise CustomNodeError(f"'{url}' is not a local source ComfyHub can use: give an absolute path (file:///path "
                              "or /path) to a repository on this host.")
    return url


def local_source_folder(url: str, step: str = "clone") -> Path:
    """The host folder a local source names, resolved; never one inside the instances' folders (their content is
    the instances', links included)."""
    path = url[len("file://"):] if url.startswith("file://") else url
    resolved = Path(os.path.realpath(path))
    if not resolved.is_dir():
        raise CustomNodeError(f"git {step} failed: {path} is not a folder on this host.")
    instances = Path(os.path.realpath(settings.COMFY_INSTANCES_PATH))
    if resolved == instances or resolved.is_relative_to(instances):
        raise CustomNodeError(f"{path} is inside the instances' folders ({instances}); ComfyHub does not clone "
                              "from there.")
    return resolved


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or "") or name.endswith(".disabled") or name == "__pycache__":
        raise CustomNodeError(f"'{name}' cannot name a custom node folder (letters, digits, '.', '_', '-').")
    return name


def check_ref(ref: str) -> str:
    if ref.startswith("-") or any(c.isspace() or c in "\0\\" for c in ref) or len(ref) > 255:
        raise CustomNodeError(f"'{ref}' is not a branch, tag or commit.")
    return ref


def folder_name(instance: Instance, name: str) -> str | None:
    """The node's entry in custom_nodes/ (enabled or disabled, whatever it is: a link is not followed), or None."""
    for candidate in (name, f"{name}.disabled"):
        if safefs.lstat(instance_root(instance), f"{NODES}/{candidate}") is not None:
            return candidate
    return None


def folder_of(instance: Instance, name: str) -> Path | None:
    """The node's folder, enabled or disabled, or None."""
    found = folder_name(instance, name)
    return nodes_dir(instance) / found if found else None


def _real_folder(instance: Instance, name: str) -> str:
    """The node's entry in custom_nodes/, which must be a real folder (never a link)."""
    found = folder_name(instance, name)
    if found is None:
        raise CustomNodeError(f"custom_nodes/{name} is gone from {instance}; reinstall it.")
    info = safefs.lstat(instance_root(instance), f"{NODES}/{found}")
    if not stat.S_ISDIR(info.st_mode):
        kind = "a link" if stat.S_ISLNK(info.st_mode) else "not a folder"
        raise CustomNodeError(f"{nodes_dir(instance) / found} is {kind}; ComfyHub does not touch it. Remove it "
                              f"(rm '{nodes_dir(instance) / found}') and reinstall the node.")
    return found


# --- git, in a throw-away container ---------------------------------------------------------------------------

def git_image(instance: Instance) -> str:
    return settings.CUSTOM_NODE_GIT_IMAGE or instance.image


def _run_git(instance: Instance, step: str, script: str, args: list[str], *, network: bool, source=None,
             timeout: int = GIT_TIMEOUT):
    """Run `script` (sh, with the `g` git function) in a container of the git image that sees only the instance's
    folder (and, read-only, a local source), as PUID:PGID; returns the engine's RunResult."""
    from . import docker_engine

    image = git_image(instance)
    try:
        engine = docker_engine.require_engine(instance.node.docker_host or None)
    except docker_engine.EngineError as exc:
        raise CustomNodeError(f"Cannot run git {step}: {exc}") from exc
    try:
        result = docker_engine.run_container(
            engine, image=image, command=["sh", "-c", SCRIPT_PRELUDE + script, "sh", *args],
            workdir=CONTAINER_NODES, mounts=[(str(instance_root(instance)), layout.CONTAINER_INSTANCE)],
            read_only_mounts=[(str(source), CONTAINER_SOURCE)] if source else [],
            labels={"comfyhub.managed": "false", "comfyhub.instance": instance.instance_id,
                    **settings.CONTAINER_EXTRA_LABELS},
            environment={**GIT_ENV, "COMFYHUB_NODES": CONTAINER_NODES,
                         "COMFYHUB_FILE_PROTOCOL": "always" if source else "never"},
            user=f"{settings.PUID}:{settings.PGID}", network=network, drop_capabilities=True, timeout=timeout,
        )
    except docker_engine.EngineError as exc:
        if "executable file not found" in str(exc) or "no such file or directory" in str(exc).lower():
            raise CustomNodeError(_no_git(image)) from exc
        raise CustomNodeError(f"Could not run git {step} for {instance}: {exc}") from exc
    finally:
        engine.close()
    if result.exit_code == NO_GIT and "comfyhub: no git" in result.output:
        raise CustomNodeError(_no_git(image))
    return result


def _no_git(image: str) -> str:
    return (f"The image {image} has no git; set CUSTOM_NODE_GIT_IMAGE to an image with git (and sh), e.g. one "
            "with `apt-get install git`.")


def _failure(step: str, result) -> CustomNodeError:
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("comfyhub-commit ")]
    return CustomNodeError(f"git {step} failed: {' '.join(lines[-3:]) or f'exit {result.exit_code}'}")


def _source(url: str, step: str) -> tuple[str, Path | None]:
    """The URL git uses inside the container, and the host folder to mount for a local source."""
    url = check_url(url)
    if not is_local_source(url):
        return url, None
    return f"file://{CONTAINER_SOURCE}", local_source_folder(url, step)


def _clone(instance: Instance, url: str, folder: str):
    inner_url, source = _source(url, "clone")
    result = _run_git(instance, "clone", CLONE_SCRIPT, [inner_url, folder, url], network=source is None,
                      source=source)
    if result.exit_code != 0:
        raise _failure("clone", result)


def _fetch(instance: Instance, url: str, folder: str):
    inner_url, source = _source(url, "fetch")
    result = _run_git(instance, "fetch", FETCH_SCRIPT, [folder, inner_url], network=source is None, source=source)
    if result.exit_code != 0:
        raise _failure("fetch", result)


def _checkout(instance: Instance, folder: str, ref: str, *, refuse_changes: bool) -> str:
    """Check out `ref` (detached) without a network; returns the commit."""
    result = _run_git(instance, "checkout", CHECKOUT_SCRIPT, [folder, ref, "1" if refuse_changes else "0"],
                      network=False)
    if result.exit_code == 14:
        raise CustomNodeError(f"custom_nodes/{folder} has local changes; commit or discard them before updating.")
    if result.exit_code == 11:
        raise CustomNodeError(f"'{ref}' is not a branch, tag or commit of that repository." if ref else
                              f"custom_nodes/{folder} has no default branch (origin/HEAD); name a branch, tag or "
                              "commit.")
    if result.exit_code != 0:
        raise _failure("status" if result.exit_code == 15 else "checkout", result)
    for line in result.stdout.splitlines():
        if line.startswith("comfyhub-commit ") and gitrepo.COMMIT_RE.fullmatch(line.split(" ", 1)[1].strip()):
            return line.split(" ", 1)[1].strip()
    raise CustomNodeError(f"git checkout in custom_nodes/{folder} did not report a commit.")


def _requirements(instance: Instance, folder: str) -> str:
    try:
        data = safefs.read_bytes(instance_root(instance), f"{NODES}/{folder}/requirements.txt", REQUIREMENTS_LIMIT)
    except FileNotFoundError:
        return ""
    except safefs.UnsafePathError as exc:
        raise CustomNodeError(f"Its requirements.txt cannot be read: {exc}") from exc
    return data.decode("utf-8", errors="replace")


# --- Install, update, enable, disable, remove ------------------------------------------------------------------

def install(instance: Instance, url: str, ref: str = "", name: str = "", report=None) -> CustomNode:
    report = report or NullReport()
    url = check_url(url)
    check_ref(ref)
    name = check_name(name or name_from_url(url))
    root = instance_root(instance)
    try:
        with safefs.opened_dir(root, NODES, create=True):  # made (PUID:PGID) if missing, never through a link
            pass
    except FileNotFoundError:
        raise CustomNodeError(f"{root} does not exist: build the instance first.") from None
    except safefs.UnsafePathError as exc:
        raise CustomNodeError(str(exc)) from exc
    if folder_of(instance, name) is not None:
        raise CustomNodeError(f"custom_nodes/{name} already exists in {instance}; update or remove it first.")
    staging = f".comfyhub-clone-{name}-{secrets.token_hex(8)}"
    try:
        report.log(f"cloning {url}")
        _clone(instance, url, staging)
        info = safefs.lstat(root, f"{NODES}/{staging}")
        if info is None or not stat.S_ISDIR(info.st_mode):
            raise CustomNodeError(f"git clone did not leave a folder at {nodes_dir(instance) / staging}.")
        commit = _checkout(instance, staging, ref, refuse_changes=False)
        requirements = _requirements(instance, staging)
        safefs.chown_tree(root, f"{NODES}/{staging}")
        try:
            safefs.move(root, f"{NODES}/{staging}", root, f"{NODES}/{name}")  # whole, or not at all
        except FileExistsError:
            raise CustomNodeError(f"custom_nodes/{name} appeared in {instance} meanwhile; nothing was replaced.")
    except safefs.UnsafePathError as exc:
        raise CustomNodeError(str(exc)) from exc
    finally:
        _remove_quietly(root, f"{NODES}/{staging}")
    try:
        if _has_requirements(requirements):
            report.log("installing its Python requirements for this instance")
            install_requirements(instance, name, report)
        with transaction.atomic():
            node, _ = CustomNode.objects.update_or_create(
                instance=instance, name=name,
                defaults={"url": url, "ref": ref, "commit": commit, "requirements": requirements})
    except BaseException:
        _remove_quietly(root, f"{NODES}/{name}")  # nothing half-installed
        raise
    report.log(f"installed {name} at {commit[:12]}")
    return node


def _remove_quietly(root: Path, relpath: str):
    try:
        if safefs.lstat(root, relpath) is not None:
            safefs.remove_tree(root, relpath)
    except (OSError, safefs.UnsafePathError):
        pass


def update(node: CustomNode, ref: str | None = None, report=None) -> CustomNode:
    report = report or NullReport()
    instance = node.instance
    folder = _real_folder(instance, node.name)
    ref = check_ref(node.ref if ref is None else ref)
    report.log(f"fetching {node.url}")
    _fetch(instance, node.url, folder)
    commit = _checkout(instance, folder, ref, refuse_changes=True)
    node.commit, node.ref = commit, ref
    node.requirements = _requirements(instance, folder)
    try:
        safefs.chown_tree(instance_root(instance), f"{NODES}/{folder}")
    except safefs.UnsafePathError as exc:
        raise CustomNodeError(str(exc)) from exc
    if _has_requirements(node.requirements):
        install_requirements(instance, folder, report)
    node.save()
    report.log(f"{node.name} now at {node.commit[:12]}")
    return node


def set_enabled(node: CustomNode, enabled: bool) -> CustomNode:
    folder = _real_folder(node.instance, node.name)
    wanted = node.name if enabled else f"{node.name}.disabled"
    if folder != wanted:
        root = instance_root(node.instance)
        try:
            safefs.move(root, f"{NODES}/{folder}", root, f"{NODES}/{wanted}")
        except FileExistsError:
            raise CustomNodeError(f"{wanted} already exists; move it away first.") from None
        except safefs.UnsafePathError as exc:
            raise CustomNodeError(str(exc)) from exc
    return node


def remove(node: CustomNode, report=None):
    report = report or NullReport()
    if folder_name(node.instance, node.name) is not None:
        folder = _real_folder(node.instance, node.name)
        try:
            safefs.remove_tree(instance_root(node.instance), f"{NODES}/{folder}")
        except safefs.UnsafePathError as exc:
            raise CustomNodeError(str(exc)) from exc
    node.delete()
    report.log(f"removed {node.name}")


# --- Listing: the repository read as files, git never runs -----------------------------------------------------

def status(node: CustomNode) -> dict:
    """Where the node's folder is, read without running git. `dirty` is None: whether the checkout has local
    changes is only known to git (run by an update, which refuses them)."""
    instance = node.instance
    found = folder_name(instance, node.name)
    if found is None:
        return {"present": False, "enabled": False, "commit": "", "dirty": None, "problem": ""}
    state = {"present": True, "enabled": not found.endswith(".disabled"), "commit": "", "dirty": None,
             "problem": ""}
    info = safefs.lstat(instance_root(instance), f"{NODES}/{found}")
    if info is not None and stat.S_ISLNK(info.st_mode):
        state["problem"] = f"custom_nodes/{found} is a link; ComfyHub does not follow it."
    elif info is not None and stat.S_ISDIR(info.st_mode):
        repo = gitrepo.read(instance_root(instance), f"{NODES}/{found}")
        state["commit"], state["problem"] = repo.commit, repo.problem
    return state


def list_nodes(instance: Instance) -> list[dict]:
    """Installed packages: ComfyHub's records plus any folder found in custom_nodes/ (installed by hand)."""
    recorded = {node.name: node for node in instance.custom_nodes.all()}
    names = set(recorded)
    try:
        with safefs.opened_dir(instance_root(instance), NODES) as fd:
            for entry in os.scandir(fd):
                if entry.name.startswith(".") or entry.name == "__pycache__":
                    continue
                if entry.is_dir(follow_symlinks=False) or entry.is_symlink():
                    names.add(entry.name[:-9] if entry.name.endswith(".disabled") else entry.name)
    except FileNotFoundError:
        pass
    except safefs.UnsafePathError:
        pass  # custom_nodes itself is a link: only the records are listed, each without a folder
    found = []
    for name in sorted(names):
        node = recorded.get(name) or CustomNode(instance=instance, name=name)
        found.append({"name": name, "url": node.url, "ref": node.ref, "recorded_commit": node.commit,
                      "managed": name in recorded, **status(node)})
    return found


# --- Python requirements, per instance ------------------------------------------------------------------------

def _has_requirements(text: str) -> bool:
    return any(line.strip() and not line.strip().startswith("#") for line in text.splitlines())


def install_requirements(instance: Instance, name: str, report=None):
    """pip-install the node's requirements.txt into <instance>/python-packages using the instance's own image
    (its Python), in a one-off container that sees only the instance's folder."""
    from . import docker_engine

    report = report or NullReport()

    try:
        engine = docker_engine.require_engine(instance.node.docker_host or None)
    except docker_engine.EngineError as exc:
        raise CustomNodeError(f"Cannot install the requirements: {exc}") from exc
    try:
        output = docker_engine.run_once(
            engine, image=instance.image,
            command=["python3", "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
                     "--target", CONTAINER_PACKAGES, "-r", "requirements.txt"],
            workdir=f"{layout.CONTAINER_INSTANCE}/custom_nodes/{name}",
            mounts=[(str(instance_root(instance)), layout.CONTAINER_INSTANCE)],
            labels={"comfyhub.managed": "false", "comfyhub.instance": instance.instance_id,
                    **settings.CONTAINER_EXTRA_LABELS},
            environment={"HOME": "/tmp"}, user=f"{settings.PUID}:{settings.PGID}", timeout=GIT_TIMEOUT,
        )
    except docker_engine.EngineError as exc:
        raise CustomNodeError(f"Installing the requirements of {name} failed: {exc}") from exc
    finally:
        engine.close()
    for line in output.splitlines()[-5:]:
        report.log(line)
