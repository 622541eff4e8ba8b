"""Storage validation: what is inconsistent between the registry and the folders, and how to fix it.

Only safe fixes are ever applied automatically: creating missing folders and rewriting generated files."""
from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass

from django.conf import settings

from . import layout, library


@dataclass
class Finding:
    code: str
    subject: str
    message: str
    fix: str
    fixable: bool = False
    fixed: bool = False

    def as_dict(self):
        return asdict(self)


def check_storage(*, fix: bool = False) -> list[Finding]:
    from instances.models import Instance
    from instances.services import port_bound_on_host

    findings: list[Finding] = []
    instances = list(Instance.objects.select_related("node"))
    known = {i.instance_id for i in instances}

    root = layout.instances_root()
    if root.is_dir():
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.name.startswith(".") or entry.name in known:
                continue
            findings.append(Finding(
                "orphan-directory", entry.name,
                f"{entry.path} has no instance in the registry.",
                "Register it (manage.py instances create with that id after moving the folder aside, then move it "
                "back), restore it from a snapshot, or move it out of the instances folder."))

    yaml_text = layout.extra_model_paths_yaml()
    real_dirs: dict[str, str] = {}
    for instance in instances:
        folder = layout.instance_dir(instance.instance_id, instance.node)
        if not folder.is_dir():
            finding = Finding("missing-directory", instance.instance_id, f"{folder} does not exist.",
                              "Build the instance's directories (safe).", fixable=True)
            if fix:
                layout.build_instance_tree(instance.instance_id, instance.node)
                finding.fixed = True
            findings.append(finding)
            continue
        missing = [sub for sub in layout.INSTANCE_SUBDIRS if not (folder / sub).is_dir()]
        if missing:
            finding = Finding("missing-folders", instance.instance_id,
                              f"{folder} lacks {', '.join(missing)}.", "Create them (safe).", fixable=True)
            if fix:
                layout.build_instance_tree(instance.instance_id, instance.node)
                finding.fixed = True
            findings.append(finding)
        config = folder / layout.EXTRA_MODEL_PATHS_FILE
        current = config.read_text() if config.is_file() else None
        if current != yaml_text:
            finding = Finding(
                "extra-model-paths", instance.instance_id,
                f"{config} is {'missing' if current is None else 'not what ComfyHub generates'}: the instance may "
                "not see the shared library.", "Rewrite the generated file (safe).", fixable=True)
            if fix:
                layout.write_generated_file(config, yaml_text)
                finding.fixed = True
            findings.append(finding)
        real = os.path.realpath(folder)
        if real in real_dirs:
            findings.append(Finding(
                "shared-read-write", instance.instance_id,
                f"{instance.instance_id} and {real_dirs[real]} use the same read-write folder {real}.",
                "Give one of them its own folder (move the data, remove the link); never let two instances write "
                "the same files."))
        real_dirs.setdefault(real, instance.instance_id)
        inbox = [item for item in library.inbox(instance) if not item["problem"]]
        if inbox:
            findings.append(Finding(
                "inbox", instance.instance_id,
                f"{len(inbox)} model file(s) in {folder / 'models'} (downloaded by nodes): "
                + ", ".join(i["path"] for i in inbox[:5]),
                "Promote them to the shared library from the models page or with manage.py models promote."))

    ports: dict[tuple, str] = {}
    for instance in instances:
        key = (instance.node_id, instance.host_port)
        if key in ports:
            findings.append(Finding("port-conflict", instance.instance_id,
                                    f"Port {instance.host_port} is used by {ports[key]} too.",
                                    "Edit one instance and pick another port."))
        ports[key] = instance.instance_id
        if instance.desired_state == Instance.DesiredState.STOPPED and \
                port_bound_on_host(instance.node.bind_address, instance.host_port):
            findings.append(Finding(
                "port-taken", instance.instance_id,
                f"Port {instance.host_port} of the stopped instance is in use by something else on this host.",
                "Stop that program or edit the instance to use another port before starting it."))

    findings.extend(_writable_shared_files())
    return findings


def _writable_shared_files(limit: int = 20) -> list[Finding]:
    """Shared files an instance's user could change if the read-only mount were ever lost."""
    shared = layout.shared_root()
    found = []
    if not shared.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(shared, followlinks=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISLNK(info.st_mode):
                continue
            by_owner = info.st_uid == settings.PUID and info.st_mode & stat.S_IWUSR
            by_group = info.st_gid == settings.PGID and info.st_mode & stat.S_IWGRP
            if by_owner or by_group or info.st_mode & stat.S_IWOTH:
                found.append(path)
                if len(found) >= limit:
                    break
        if len(found) >= limit:
            break
    if not found:
        return []
    return [Finding(
        "shared-writable", "shared",
        f"{len(found)}{'+' if len(found) >= limit else ''} shared file(s) are writable by the instances' user "
        f"(uid {settings.PUID}) or by everyone, e.g. {found[0]}. Containers mount /shared read-only, but the files "
        "themselves should not depend on that.",
        f"Make the shared tree owned by another user and read-only for uid {settings.PUID}, e.g. "
        f"chown -R root:root {shared} && chmod -R a-w,a+rX {shared}/models")]
