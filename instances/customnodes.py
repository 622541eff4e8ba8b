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
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from comfyhub.operations import NullReport
from storage_app import layout, safefs

from . import gitrepo, remote
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
    requirements = _requirements(instance, folder)
    try:
        safefs.chown_tree(instance_root(instance), f"{NODES}/{folder}")
        if _has_requirements(requirements):
            install_requirements(instance, folder, report)
    except (CustomNodeError, safefs.UnsafePathError) as exc:
        _back_to(instance, folder, node.commit, report)
        if isinstance(exc, safefs.UnsafePathError):
            raise CustomNodeError(str(exc)) from exc
        raise
    node.commit, node.ref, node.requirements = commit, ref, requirements
    node.save()
    report.log(f"{node.name} now at {node.commit[:12]}")
    return node


def _back_to(instance: Instance, folder: str, commit: str, report):
    """After a refused update: the checkout goes back to the commit ComfyHub recorded, as it was before."""
    if not commit:
        return
    try:
        _checkout(instance, folder, commit, refuse_changes=False)
        report.log(f"custom_nodes/{folder} is back at {commit[:12]}")
    except CustomNodeError as exc:
        report.log(f"custom_nodes/{folder} could not go back to {commit[:12]}: {exc}", "WARNING")


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
    """Installed packages: ComfyHub's records plus any folder found in custom_nodes/ (installed by hand). Another
    node's instance is listed by its node's agent (a CustomNodeError when it cannot be asked)."""
    if not remote.served_here(instance.node):
        try:
            return remote.call_on_node(instance.node, "instances.customnodes.list_nodes_of",
                                       {"instance_id": instance.instance_id})
        except remote.NodeReadError as exc:
            raise CustomNodeError(str(exc)) from exc
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


@remote.node_read
def list_nodes_of(instance_id: str) -> list[dict]:
    return list_nodes(remote.instance_here(instance_id))


# --- Python requirements, per instance ------------------------------------------------------------------------
# pip runs in a throw-away container of the instance's own image (its Python), as PUID:PGID, seeing only the
# instance's folder (and, read-only, NODE_PIP_FIND_LINKS and NODE_PIP_CA_BUNDLE). In a ComfyHub image (the label
# below names its constraints file) it installs with --user into /instance/python-packages, constrained to the image's
# pins: pip sees the image's packages as installed and adds only what is missing, and cannot replace the torch stack.
# Other images keep `pip install --target /instance/python-packages`.

CONSTRAINTS_LABEL = "comfyhub.image.constraints"
CONSTRAINTS_LIMIT = 256 * 1024
CONTAINER_WHEELS = "/comfyhub-wheels"
CONTAINER_CA_BUNDLE = "/comfyhub-pip-ca.pem"
# pip reads its per-user configuration from $HOME/.config/pip and $XDG_CONFIG_HOME: the instance's home is written by
# the instance's own code, so pip's home is the container's /tmp (the image's /etc/pip.conf still applies).
PIP_ENV = {"HOME": "/tmp", "XDG_CONFIG_HOME": "/tmp/.config", "XDG_CACHE_HOME": "/tmp/.cache",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
CONFLICT_CAUSES = "The conflict is caused by:"


def _has_requirements(text: str) -> bool:
    return any(line.strip() and not line.strip().startswith("#") for line in text.splitlines())


def install_requirements(instance: Instance, name: str, report=None):
    """pip-install the node's requirements.txt (custom_nodes/<name>) into <instance>/python-packages with the
    instance's own image. A requirement that would replace a package the image pins is refused before pip runs,
    and pip's own refusal (a dependency that asks for another torch) is named; either way nothing is installed."""
    from . import docker_engine

    report = report or NullReport()
    node = name.removesuffix(".disabled")
    requirements = _requirements(instance, name)
    try:
        engine = docker_engine.require_engine(instance.node.docker_host or None)
    except docker_engine.EngineError as exc:
        raise CustomNodeError(f"Cannot install the requirements of {node}: {exc}") from exc
    try:
        constraints, pins = _image_pins(engine, instance)
        if pins:
            _refuse_replacing_pins(node, requirements, pins)
        mounts = [(str(settings.NODE_PIP_FIND_LINKS), CONTAINER_WHEELS)] if settings.NODE_PIP_FIND_LINKS else []
        environment = dict(PIP_ENV)
        if settings.NODE_PIP_CA_BUNDLE:
            mounts.append((str(settings.NODE_PIP_CA_BUNDLE), CONTAINER_CA_BUNDLE))
            environment["PIP_CERT"] = CONTAINER_CA_BUNDLE
        if constraints:
            # pip sees what the container will load: the user site, and the older --target installs on PYTHONPATH
            environment.update(PYTHONUSERBASE=CONTAINER_PACKAGES, PYTHONPATH=CONTAINER_PACKAGES, PIP_USER="1")
        report.log("pip " + ("adds what the image lacks, its pinned packages kept" if constraints else
                             f"installs into {PACKAGES_DIR}/ (the image pins nothing)"))
        result = docker_engine.run_container(
            engine, image=instance.image, command=_pip_command(constraints),
            workdir=f"{CONTAINER_NODES}/{name}",
            mounts=[(str(instance_root(instance)), layout.CONTAINER_INSTANCE)], read_only_mounts=mounts,
            labels={"comfyhub.managed": "false", "comfyhub.instance": instance.instance_id,
                    **settings.CONTAINER_EXTRA_LABELS},
            environment=environment, user=f"{settings.PUID}:{settings.PGID}",
            network=settings.NODE_PIP_INDEX_URL != "none", drop_capabilities=True, timeout=GIT_TIMEOUT,
        )
    except docker_engine.EngineError as exc:
        raise CustomNodeError(f"Installing the requirements of {node} failed: {exc}") from exc
    finally:
        engine.close()
    if result.exit_code != 0:
        raise CustomNodeError(_pip_failure(node, result.output, pins))
    installed = [line for line in result.output.splitlines() if line.startswith("Successfully installed")]
    report.log(installed[-1] if installed else "pip installed nothing: every requirement is already there (in the "
               f"image, or in this instance's {PACKAGES_DIR}/)")


def _pip_command(constraints: str) -> list[str]:
    command = ["python3", "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check", "--no-input",
               "--progress-bar", "off"]
    if constraints:
        command += ["--user", "--constraint", constraints, "--no-warn-script-location"]
    else:
        command += ["--target", CONTAINER_PACKAGES]
    if settings.NODE_PIP_INDEX_URL == "none":
        command.append("--no-index")
    elif settings.NODE_PIP_INDEX_URL:
        command += ["--index-url", settings.NODE_PIP_INDEX_URL]
    if settings.NODE_PIP_FIND_LINKS:
        command += ["--find-links", CONTAINER_WHEELS]
    return command + ["-r", "requirements.txt"]


def _image_pins(engine, instance: Instance) -> tuple[str, dict[str, str]]:
    """The constraints file the instance's image names (label comfyhub.image.constraints; "" for an image without
    one) and what it pins: {canonical name: "name==version"}."""
    from . import docker_engine

    details = docker_engine.image_details(engine, instance.image)
    if details is None:
        raise CustomNodeError(f"The image {instance.image} is not on this host; start the instance once (which "
                              "pulls it), or build or pull it with `manage.py images`.")
    path = (details.labels.get(CONSTRAINTS_LABEL) or "").strip()
    if not path:
        return "", {}
    if not path.startswith("/") or any(c.isspace() for c in path):
        raise CustomNodeError(f"The image {instance.image} names '{path}' as its constraints file (label "
                              f"{CONSTRAINTS_LABEL}); that is not an absolute path. Rebuild the image.")
    data = docker_engine.read_image_file(engine, instance.image, path, max_bytes=CONSTRAINTS_LIMIT,
                                         labels={"comfyhub.managed": "false", **settings.CONTAINER_EXTRA_LABELS})
    if data is None:
        raise CustomNodeError(f"The image {instance.image} names {path} as its constraints file (label "
                              f"{CONSTRAINTS_LABEL}) but has no such file (or one over {CONSTRAINTS_LIMIT} bytes); "
                              "rebuild the image with `manage.py images build`.")
    return path, pinned_versions(data.decode("utf-8", errors="replace"))


def requirement_lines(text: str) -> list[str]:
    """The requirements of a requirements.txt as pip reads them: continuation lines joined, comments, option lines
    (-r, -c, --index-url, ...) and per-requirement options (--hash=...) dropped."""
    found = []
    for line in re.sub(r"\\\r?\n", "", text).splitlines():
        line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]
        line = re.split(r"\s--?[A-Za-z]", f" {line}", maxsplit=1)[0].strip()
        if line:
            found.append(line)
    return found


def pinned_versions(text: str) -> dict[str, str]:
    """{canonical name: "name==version"} for each exact pin in a constraints file."""
    pins = {}
    for line in requirement_lines(text):
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        exact = [spec for spec in requirement.specifier if spec.operator in ("==", "===") and "*" not in spec.version]
        if len(exact) == 1 and not requirement.marker and not requirement.url:
            pins[canonicalize_name(requirement.name)] = f"{requirement.name}=={exact[0].version}"
    return pins


def pin_conflicts(requirements: str, pins: dict[str, str]) -> list[tuple[str, str]]:
    """(requirement as written, the image's pin) for each requirement the pinned version does not satisfy. A
    requirement with an environment marker or a URL is left to pip, which enforces the pins anyway."""
    conflicts = []
    for line in requirement_lines(requirements):
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue  # pip says what is wrong with it
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None or requirement.marker or requirement.url:
            continue
        if not requirement.specifier.contains(pin.split("==", 1)[1], prereleases=True):
            conflicts.append((line, pin))
    return conflicts


def _refuse_replacing_pins(node: str, requirements: str, pins: dict[str, str]):
    conflicts = pin_conflicts(requirements, pins)
    if not conflicts:
        return
    asked = _and([line for line, _ in conflicts])
    pinned = _and(sorted({pin for _, pin in conflicts}))
    names = _and(sorted({pin.split("==", 1)[0] for _, pin in conflicts}))
    raise CustomNodeError(
        f"{node} asks for {asked}, but this image pins {pinned} (its CUDA build); installing "
        f"{'it' if len(conflicts) == 1 else 'them'} would replace the image's {names}. Ask the node's author, or use "
        f"an image with that {names}.")


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _pip_failure(node: str, output: str, pins: dict[str, str]) -> str:
    """What went wrong, from pip's output: the conflict its resolver names, else its error lines."""
    lines = [line.strip() for line in output.splitlines()]
    if CONFLICT_CAUSES in lines:
        causes, replaced = [], []
        for line in lines[lines.index(CONFLICT_CAUSES) + 1:]:
            if not line:
                break
            text, pin = _cause(node, line, pins)
            causes.append(text)
            replaced += [pin.split("==", 1)[0]] if pin else []
        advice = (f" Installing them would replace the image's {_and(replaced)}. Ask the node's author, or use an "
                  f"image with that {_and(replaced)}." if replaced else " Ask the node's author.")
        return f"{node}'s requirements cannot be installed beside this image's packages: {'; '.join(causes)}.{advice}"
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR:")]
    said = " ".join(errors[-3:]) or " ".join(line for line in lines[-3:] if line) or "no output"
    hint = ""
    if "No matching distribution" in output and settings.NODE_PIP_INDEX_URL == "none":
        hint = (" NODE_PIP_INDEX_URL is none: pip installs only from NODE_PIP_FIND_LINKS"
                f"{f' ({settings.NODE_PIP_FIND_LINKS})' if settings.NODE_PIP_FIND_LINKS else ', which is not set'}; "
                "add the wheel there.")
    return f"Installing the requirements of {node} failed: pip said: {said}{hint}"


def _cause(node: str, cause: str, pins: dict[str, str]) -> tuple[str, str | None]:
    """One line of pip's "The conflict is caused by:" in ComfyHub's words, and the image's pin it names (or None)."""
    if cause.startswith("The user requested (constraint) "):
        wanted = cause.removeprefix("The user requested (constraint) ")
        try:
            pin = pins.get(canonicalize_name(Requirement(wanted).name))
        except InvalidRequirement:
            pin = None
        return (f"this image pins {pin}", pin) if pin else (f"a constraint asks for {wanted}", None)
    if cause.startswith("The user requested "):
        return f"{node} asks for {cause.removeprefix('The user requested ')}", None
    return cause, None
