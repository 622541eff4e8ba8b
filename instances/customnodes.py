"""Custom nodes per instance: git clones under the instance's custom_nodes/, their Python requirements installed
into the instance's own python-packages/ (so a recreated container keeps them), ComfyUI's `.disabled` convention."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

from django.conf import settings
from django.db import transaction

from storage_app import layout

from .models import CustomNode, Instance

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
URL_RE = re.compile(r"^(https?|git|ssh|file)://[^\s]+$|^[A-Za-z0-9._-]+@[A-Za-z0-9._-]+:[^\s]+$")
GIT_TIMEOUT = 600
PACKAGES_DIR = "python-packages"
CONTAINER_PACKAGES = f"{layout.CONTAINER_INSTANCE}/{PACKAGES_DIR}"


class CustomNodeError(Exception):
    pass


def nodes_dir(instance: Instance) -> Path:
    return layout.instance_dir(instance.instance_id, instance.node) / "custom_nodes"


def name_from_url(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return name[:-4] if name.endswith(".git") else name


def check_url(url: str) -> str:
    url = (url or "").strip()
    if not URL_RE.match(url) or url.startswith("-") or "::" in url.split("://", 1)[0]:
        raise CustomNodeError(f"'{url}' is not a git URL (https://…, ssh://…, git@host:path or file://…).")
    return url


def check_name(name: str) -> str:
    if not NAME_RE.match(name or "") or name.endswith(".disabled") or name == "__pycache__":
        raise CustomNodeError(f"'{name}' cannot name a custom node folder (letters, digits, '.', '_', '-').")
    return name


def git(*args, cwd=None, timeout=GIT_TIMEOUT) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "LC_ALL": "C"}
    try:
        # The clones belong to PUID:PGID, not to the worker's user: git must not refuse them as "unsafe".
        done = subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise CustomNodeError(f"git {args[0]} took longer than {timeout} s and was stopped.") from exc
    except FileNotFoundError as exc:
        raise CustomNodeError("git is not installed on the worker's host (apt-get install git).") from exc
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise CustomNodeError(f"git {args[0]} failed: {' '.join(message[-3:]) or f'exit {done.returncode}'}")
    return done.stdout.strip()


def folder_of(instance: Instance, name: str) -> Path | None:
    """The node's folder, enabled or disabled, or None."""
    for candidate in (nodes_dir(instance) / name, nodes_dir(instance) / f"{name}.disabled"):
        if os.path.lexists(candidate):
            return candidate
    return None


def install(instance: Instance, url: str, ref: str = "", name: str = "", report=None) -> CustomNode:
    url = check_url(url)
    name = check_name(name or name_from_url(url))
    if folder_of(instance, name) is not None:
        raise CustomNodeError(f"custom_nodes/{name} already exists in {instance}; update or remove it first.")
    root = nodes_dir(instance)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".comfyhub-clone-{name}-{uuid.uuid4().hex[:8]}"
    try:
        _log(report, f"cloning {url}")
        git("clone", "--quiet", "--", url, str(staging))
        if ref:
            git("-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", _resolve(staging, ref),
                cwd=staging)
        commit = git("rev-parse", "HEAD", cwd=staging)
        requirements_file = staging / "requirements.txt"
        requirements = requirements_file.read_text(errors="replace") if requirements_file.is_file() else ""
        _chown_tree(staging)
        os.rename(staging, root / name)  # the node appears whole, or not at all
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    try:
        if _has_requirements(requirements):
            _log(report, "installing its Python requirements for this instance")
            install_requirements(instance, name, report)
        with transaction.atomic():
            node, _ = CustomNode.objects.update_or_create(
                instance=instance, name=name,
                defaults={"url": url, "ref": ref, "commit": commit, "requirements": requirements})
    except BaseException:
        shutil.rmtree(root / name, ignore_errors=True)  # nothing half-installed
        raise
    _log(report, f"installed {name} at {commit[:12]}")
    return node


def _resolve(repo: Path, ref: str) -> str:
    """A branch, tag or commit, as a commit id; a clear error when it does not exist."""
    if ref.startswith("-"):
        raise CustomNodeError(f"'{ref}' is not a branch, tag or commit.")
    for candidate in (f"refs/remotes/origin/{ref}", f"refs/tags/{ref}^{{commit}}", f"{ref}^{{commit}}"):
        try:
            return git("rev-parse", "--verify", "--quiet", candidate, cwd=repo)
        except CustomNodeError:
            continue
    raise CustomNodeError(f"'{ref}' is not a branch, tag or commit of that repository.")


def update(node: CustomNode, ref: str | None = None, report=None) -> CustomNode:
    folder = folder_of(node.instance, node.name)
    if folder is None:
        raise CustomNodeError(f"custom_nodes/{node.name} is gone from {node.instance}; reinstall it.")
    if status(node)["dirty"]:
        raise CustomNodeError(f"custom_nodes/{node.name} has local changes; commit or discard them before updating.")
    ref = node.ref if ref is None else ref
    git("fetch", "--quiet", "--tags", "origin", cwd=folder)
    target = _resolve(folder, ref) if ref else _resolve(folder, git("rev-parse", "--abbrev-ref", "origin/HEAD",
                                                                    cwd=folder).split("/", 1)[-1])
    git("-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", target, cwd=folder)
    node.commit, node.ref = git("rev-parse", "HEAD", cwd=folder), ref
    requirements_file = folder / "requirements.txt"
    node.requirements = requirements_file.read_text(errors="replace") if requirements_file.is_file() else ""
    if _has_requirements(node.requirements):
        install_requirements(node.instance, folder.name, report)
    node.save()
    _log(report, f"{node.name} now at {node.commit[:12]}")
    return node


def set_enabled(node: CustomNode, enabled: bool) -> CustomNode:
    folder = folder_of(node.instance, node.name)
    if folder is None:
        raise CustomNodeError(f"custom_nodes/{node.name} is gone from {node.instance}.")
    wanted = nodes_dir(node.instance) / (node.name if enabled else f"{node.name}.disabled")
    if folder != wanted:
        if os.path.lexists(wanted):
            raise CustomNodeError(f"{wanted.name} already exists; move it away first.")
        os.rename(folder, wanted)
    return node


def remove(node: CustomNode, report=None):
    folder = folder_of(node.instance, node.name)
    if folder is not None:
        if folder.is_symlink() or folder.resolve().parent != nodes_dir(node.instance).resolve():
            raise CustomNodeError(f"custom_nodes/{node.name} is not a folder of this instance; not removed.")
        shutil.rmtree(folder)
    node.delete()
    _log(report, f"removed {node.name}")


def status(node: CustomNode) -> dict:
    folder = folder_of(node.instance, node.name)
    if folder is None:
        return {"present": False, "enabled": False, "commit": "", "dirty": False}
    try:
        commit = git("rev-parse", "HEAD", cwd=folder, timeout=30)
        dirty = bool(git("status", "--porcelain", cwd=folder, timeout=30))
    except CustomNodeError:
        commit, dirty = "", False
    return {"present": True, "enabled": not folder.name.endswith(".disabled"), "commit": commit, "dirty": dirty}


def list_nodes(instance: Instance) -> list[dict]:
    """Installed packages: ComfyHub's records plus any folder found in custom_nodes/ (installed by hand)."""
    recorded = {node.name: node for node in instance.custom_nodes.all()}
    found = []
    root = nodes_dir(instance)
    names = set(recorded)
    if root.is_dir():
        for entry in os.scandir(root):
            if entry.name.startswith(".") or entry.name == "__pycache__" or not entry.is_dir():
                continue
            names.add(entry.name[:-9] if entry.name.endswith(".disabled") else entry.name)
    for name in sorted(names):
        node = recorded.get(name) or CustomNode(instance=instance, name=name)
        state = status(node)
        found.append({"name": name, "url": node.url, "ref": node.ref, "recorded_commit": node.commit,
                      "managed": name in recorded, **state})
    return found


# --- Python requirements, per instance ------------------------------------------------------------------------

def _has_requirements(text: str) -> bool:
    return any(line.strip() and not line.strip().startswith("#") for line in text.splitlines())


def install_requirements(instance: Instance, name: str, report=None):
    """pip-install the node's requirements.txt into <instance>/python-packages using the instance's own image
    (its Python), in a one-off container that sees only the instance's folder."""
    from . import docker_engine

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
            mounts=[(str(layout.instance_dir(instance.instance_id, instance.node)), layout.CONTAINER_INSTANCE)],
            labels={"comfyhub.managed": "false", "comfyhub.instance": instance.instance_id,
                    **settings.CONTAINER_EXTRA_LABELS},
            timeout=GIT_TIMEOUT,
        )
    except docker_engine.EngineError as exc:
        raise CustomNodeError(f"Installing the requirements of {name} failed: {exc}") from exc
    finally:
        engine.close()
    for line in output.splitlines()[-5:]:
        _log(report, line)


def _chown_tree(path: Path):
    if os.geteuid() != 0:
        return
    for dirpath, dirnames, filenames in os.walk(path):
        for entry in (dirpath, *[os.path.join(dirpath, n) for n in dirnames + filenames]):
            os.chown(entry, settings.PUID, settings.PGID, follow_symlinks=False)


def _log(report, message, level="INFO"):
    if report is not None:
        report.log(message, level)
