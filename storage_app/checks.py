"""Storage validation: what is inconsistent between the registry and the folders, and how to fix it.

Only safe fixes are ever applied automatically: creating missing folders, rewriting generated files and removing
links that lead out of an instance's folder (the links, never what they point to). An instance's folder is read
through descriptors that never follow a link (storage_app.safefs).

Folders, ports and shared files are checked where they are: the hub checks its own node (`local`), and asks each other
node's agent to check its node's (instances.remote); only the registry's own rules (one port per node) are checked
on the hub for every node."""
from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass

from django.conf import settings

from . import layout, library, safefs


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
    """Every finding: this node's (the hub's: `local`), the registry's, then each other node's, from its agent. A
    node whose agent cannot be asked is one finding that says why."""
    from instances import remote
    from instances.models import LOCAL_NODE, Instance, Node

    instances = list(Instance.objects.select_related("node"))
    findings = _node_findings([i for i in instances if remote.served_here(i.node)], fix=fix,
                              known={i.instance_id for i in instances})
    ports: dict[tuple, str] = {}
    for instance in instances:
        key = (instance.node_id, instance.host_port)
        if key in ports:
            findings.append(Finding("port-conflict", instance.instance_id,
                                    f"Port {instance.host_port} is used by {ports[key]} too.",
                                    "Edit one instance and pick another port."))
        ports[key] = instance.instance_id
    others = {i.node for i in instances if not remote.served_here(i.node)}
    others |= {node for node in Node.objects.exclude(name=LOCAL_NODE).filter(approved=True)
               if not remote.served_here(node) and node.state().online}
    for node in sorted(others, key=lambda n: n.name):
        try:
            found = remote.call_on_node(node, "storage_app.checks.node_findings_of", {"fix": fix})
        except remote.NodeReadError as exc:
            findings.append(Finding("node-not-checked", node.name,
                                    f"The folders of node {node.name}'s instances were not checked: {exc}",
                                    f"Check again once node {node.name}'s agent answers."))
            continue
        findings.extend(Finding(**{**item, "message": f"On node {node.name}: {item['message']}"}) for item in found)
    return findings


def node_findings_of(fix: bool = False) -> list[dict]:
    """On a node's agent: the findings of this node's instances, roots and shared files (check_storage's part).
    With `fix`, the same safe fixes as on the hub, there."""
    from instances.models import Instance
    from instances.remote import served_here

    instances = [i for i in Instance.objects.select_related("node") if served_here(i.node)]
    node = instances[0].node if instances else _this_node()
    return [finding.as_dict() for finding in
            _node_findings(instances, fix=fix, known={i.instance_id for i in instances}, node=node)]


node_findings_of.node_read = True  # instances.remote.node_read, without importing instances at module level


def _this_node():
    from django.conf import settings

    from instances.models import Node

    return Node.objects.filter(name=settings.NODE_NAME).first()


def _node_findings(instances, *, fix: bool, known: set, node=None) -> list[Finding]:
    """The findings of this node: `instances` (those on it), its instances root, its ports, its shared files."""
    from instances.models import Instance
    from instances.services import port_bound_on_host

    findings: list[Finding] = []
    root = layout.instances_root(node)
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
        real = os.path.realpath(folder)
        if real in real_dirs:
            findings.append(Finding(
                "shared-read-write", instance.instance_id,
                f"{instance.instance_id} and {real_dirs[real]} use the same read-write folder {real}.",
                "Give one of them its own folder (move the data, remove the link); never let two instances write "
                "the same files."))
        real_dirs.setdefault(real, instance.instance_id)
        if folder.is_symlink():
            findings.append(Finding(
                "instance-folder-link", instance.instance_id,
                f"{folder} is a link (to {os.readlink(folder)}); ComfyHub follows no link into an instance's folder, "
                "so it refuses to build, read or write it.",
                f"Replace the link with the folder it points to (rm {safefs.shell_quote(folder)}, then move that "
                "folder here)."))
            continue
        if not folder.is_dir():
            finding = Finding("missing-directory", instance.instance_id, f"{folder} does not exist.",
                              "Build the instance's directories (safe).", fixable=True)
            if fix:
                _build(instance, finding)
            findings.append(finding)
            continue
        # Links first: --fix removes them before it builds what they stood in for.
        findings.extend(_links_out_of(instance, folder, fix=fix))
        missing = [sub for sub in layout.INSTANCE_SUBDIRS if safefs.lstat(folder, sub) is None]
        if missing:
            finding = Finding("missing-folders", instance.instance_id,
                              f"{folder} lacks {', '.join(missing)}.", "Create them (safe).", fixable=True)
            if fix:
                _build(instance, finding)
            findings.append(finding)
        config = folder / layout.EXTRA_MODEL_PATHS_FILE
        try:
            current = safefs.read_bytes(folder, layout.EXTRA_MODEL_PATHS_FILE, 1 << 20).decode("utf-8", "replace")
            state = "not what ComfyHub generates"
        except FileNotFoundError:
            current, state = None, "missing"
        except (OSError, safefs.UnsafePathError) as exc:
            current, state = None, f"unusable ({exc})"
        if current != yaml_text:
            finding = Finding(
                "extra-model-paths", instance.instance_id,
                f"{config} is {state}: the instance may not see the shared library.",
                "Rewrite the generated file (safe).", fixable=True)
            if fix:
                try:
                    layout.write_generated_file(config, yaml_text, root=folder)
                    finding.fixed = True
                except layout.LayoutError as exc:
                    finding.message += f" The fix stopped: {exc}"
            findings.append(finding)
        inbox = [item for item in library.inbox(instance) if not item["problem"]]
        if inbox:
            findings.append(Finding(
                "inbox", instance.instance_id,
                f"{len(inbox)} model file(s) in {folder / 'models'} (downloaded by nodes): "
                + ", ".join(i["path"] for i in inbox[:5]),
                "Promote them to the shared library from the models page or with manage.py models promote."))

    for instance in instances:
        if instance.desired_state == Instance.DesiredState.STOPPED and \
                port_bound_on_host(instance.node.bind_address, instance.host_port):
            findings.append(Finding(
                "port-taken", instance.instance_id,
                f"Port {instance.host_port} of the stopped instance is in use by something else on this host.",
                "Stop that program or edit the instance to use another port before starting it."))

    findings.extend(_writable_shared_files(node))
    return findings


def _build(instance, finding: Finding) -> None:
    try:
        layout.build_instance_tree(instance.instance_id, instance.node)
        finding.fixed = True
    except layout.LayoutError as exc:
        finding.message += f" The fix stopped: {exc}"


def _links_out_of(instance, folder, *, fix: bool) -> list[Finding]:
    """Every link in the instance's folder whose target, resolved as the kernel would (chains included), leaves the
    folder: inside the container it may mean nothing, but on the host it names a host path. ComfyHub follows none of
    them; they are listed so a person sees the trap, and --fix removes the links themselves (never their targets).
    ComfyHub's own input/<name> -> /shared/input/<name> links are expected."""
    findings = []
    for relpath, target in safefs.find_links(folder):
        parts = relpath.split("/")
        if len(parts) == 2 and parts[0] == "input" and target == f"{layout.CONTAINER_SHARED}/input/{parts[1]}":
            continue
        if safefs.link_resolves_inside(folder, relpath):
            continue
        path = folder / relpath
        finding = Finding(
            "unsafe-link", instance.instance_id,
            f"{path} is a link to {target}, which leads out of the instance's folder. ComfyHub never follows it; "
            "code in the container may have planted it to reach the host.",
            f"rm {safefs.shell_quote(path)} (removes the link only; safe)", fixable=True)
        if fix:
            try:
                safefs.unlink_link(folder, relpath)
                finding.fixed = True
            except (OSError, safefs.UnsafePathError) as exc:
                finding.message += f" Removing it failed: {exc}"
        findings.append(finding)
    return findings


def _writable_shared_files(node=None, limit: int = 20) -> list[Finding]:
    """Shared files an instance's user could change if the read-only mount were ever lost."""
    shared = layout.shared_root(node)
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


# --- Inboxes (the models page) ----------------------------------------------------------------------------------

INBOX_TIMEOUT = 5  # seconds a node's agent has to list its instances' inboxes before the models page goes on


def inboxes(instances) -> tuple[list[tuple], list[str]]:
    """[(instance, its inbox files)] for the instances whose inbox holds something, each read on its node (this
    process's own instances here, another node's by its agent, one call per node), and why a node's were not
    read."""
    from instances import remote

    found, problems, elsewhere = {}, [], {}
    for instance in instances:
        if remote.served_here(instance.node):
            found[instance.instance_id] = library.inbox(instance)
        else:
            elsewhere.setdefault(instance.node.name, (instance.node, []))[1].append(instance.instance_id)
    for name, (node, ids) in sorted(elsewhere.items()):
        try:
            found.update(remote.call_on_node(node, "storage_app.checks.inboxes_of", {"instance_ids": ids},
                                             timeout=INBOX_TIMEOUT))
        except remote.NodeReadError as exc:
            problems.append(f"The inboxes of node {name}'s instances are not shown: {exc}")
    return [(i, found[i.instance_id]) for i in instances if found.get(i.instance_id)], problems


def instance_inbox(instance, timeout: float | None = None) -> list[dict]:
    """library.inbox(instance), read on the instance's node (another node's by its agent: instances.remote raises
    NodeReadError when it cannot be asked)."""
    from instances import remote

    if remote.served_here(instance.node):
        return library.inbox(instance)
    return remote.call_on_node(instance.node, "storage_app.checks.inboxes_of",
                               {"instance_ids": [instance.instance_id]}, timeout=timeout).get(instance.instance_id, [])


def inboxes_of(instance_ids: list[str]) -> dict[str, list[dict]]:
    """On a node's agent: the inboxes of those of `instance_ids` that are on this node."""
    from instances.models import Instance
    from instances.remote import served_here

    return {instance.instance_id: library.inbox(instance)
            for instance in Instance.objects.select_related("node").filter(instance_id__in=list(instance_ids)[:10000])
            if served_here(instance.node)}


inboxes_of.node_read = True
