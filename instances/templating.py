"""Instance templates (shared configuration): creating instances from them, applying them, and measuring drift."""
from __future__ import annotations

import json

from django.core.exceptions import ValidationError

from comfyhub.operations import NullReport
from storage_app import layout, safefs

from . import customnodes, remote, workflows
from .models import Instance, InstanceTemplate

SETTINGS_FILE = ("user", "default", "comfy.settings.json")
SETTINGS_MAX_BYTES = 16 << 20


def settings_path(instance: Instance):
    return layout.instance_dir(instance.instance_id, instance.node).joinpath(*SETTINGS_FILE)


def read_settings(instance: Instance) -> dict:
    """The instance's comfy.settings.json, read without following any link from the instance's folder down (a
    LayoutError names a planted one); {} when it is missing or not a JSON object."""
    try:
        raw = safefs.read_bytes(layout.instance_dir(instance.instance_id, instance.node), "/".join(SETTINGS_FILE),
                                SETTINGS_MAX_BYTES)
    except safefs.UnsafePathError as exc:
        raise layout.LayoutError(str(exc)) from None
    except OSError:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # the container writes this file: it may be anything
        return {}
    return data if isinstance(data, dict) else {}


def validate_template(*, image: str, extra_args, extra_env, custom_nodes, settings) -> None:
    """The rules a template's configuration obeys: those of an instance's (image, arguments, environment), since
    instances are made from it, plus well-formed custom nodes and settings."""
    from . import runtime

    errors = {}
    if image and (problem := runtime.image_problem(image)):
        errors.setdefault("image", []).append(problem)
    try:
        extra_args, extra_env = runtime.checked_config(extra_args, extra_env)
    except ValidationError as exc:
        errors.update(exc.message_dict)
        extra_args, extra_env = [], {}
    for arg in extra_args:
        if problem := runtime.argument_problem(arg):
            errors.setdefault("extra_args", []).append(problem)
    for key, value in extra_env.items():
        if problem := runtime.environment_problem(key, value):
            errors.setdefault("extra_env", []).append(problem)
    if not isinstance(custom_nodes or [], list):
        errors.setdefault("custom_nodes", []).append(
            'Custom nodes are a list of {"url": "...", "ref": "..."} objects.')
        custom_nodes = []
    for node in custom_nodes or []:
        node = node if isinstance(node, dict) else {}
        try:
            if not isinstance(node.get("url", ""), str) or not isinstance(node.get("ref", ""), str):
                raise customnodes.CustomNodeError(f"{json.dumps(node)}: a custom node's url and ref are text.")
            customnodes.check_name(customnodes.name_from_url(customnodes.check_url(node.get("url", ""))))
            if str(node.get("ref", "")).startswith("-"):
                raise customnodes.CustomNodeError(f"'{node['ref']}' is not a branch, tag or commit.")
        except customnodes.CustomNodeError as exc:
            errors.setdefault("custom_nodes", []).append(str(exc))
    if not isinstance(settings or {}, dict):
        errors.setdefault("settings", []).append("Settings are a JSON object of comfy.settings.json values.")
    if errors:
        raise ValidationError(errors)


def apply(template: InstanceTemplate, instance: Instance, report=None) -> dict:
    """Write the template's settings, install its starter workflows and custom nodes. Existing files are kept
    (settings are merged, workflows renamed on conflict); a node that fails to install is reported, not fatal."""
    report = report or NullReport()
    layout.build_instance_tree(instance.instance_id, instance.node)
    result = {"settings": 0, "workflows": [], "nodes": [], "failed_nodes": []}
    if template.settings:
        current = read_settings(instance)
        current.update(template.settings)
        layout.write_generated_file(settings_path(instance), json.dumps(current, indent=4) + "\n",
                                    root=layout.instance_dir(instance.instance_id, instance.node))
        result["settings"] = len(template.settings)
        report.log(f"wrote {len(template.settings)} setting(s) into comfy.settings.json")
    for version in template.starter_workflows.select_related("entry"):
        outcome, path = workflows.install(version, instance)
        result["workflows"].append({"workflow": str(version), "result": outcome, "path": path})
        report.log(f"workflow {version}: {outcome} ({path})")
    for spec in template.custom_nodes:
        url, ref = spec.get("url", ""), spec.get("ref", "")
        name = customnodes.name_from_url(url)
        if customnodes.folder_of(instance, name) is not None:
            result["nodes"].append({"name": name, "result": "already there"})
            continue
        try:
            node = customnodes.install(instance, url, ref, report=report)
            result["nodes"].append({"name": node.name, "result": f"installed at {node.commit[:12]}"})
        except customnodes.CustomNodeError as exc:
            result["failed_nodes"].append({"url": url, "error": str(exc)})
            report.log(f"{url}: {exc}", "ERROR")
    Instance.objects.filter(pk=instance.pk).update(template=template)
    return result


# The row that stands for what only the instance's folder tells, when its node cannot be asked.
FOLDER_PARTS = "custom nodes, settings and starter workflows"


def drift(instance: Instance) -> list[dict]:
    """Where the instance differs from its template: [{what, template, instance}]. What its folder holds (custom
    nodes, settings, starter workflows) is read on its node: for another node by its agent, and when that cannot
    be asked one row says so in their place."""
    template = instance.template
    if template is None:
        return []
    found = []

    def differs(what, wanted, actual):
        if wanted != actual:
            found.append({"what": what, "template": wanted, "instance": actual})

    differs("image", template.image or instance.image, instance.image)
    differs("extra arguments", list(template.extra_args), list(instance.extra_args))
    differs("environment", dict(template.extra_env), dict(instance.extra_env))
    differs("GPU count", template.gpu_count, len(instance.gpu_choice()))
    if remote.served_here(instance.node):
        found.extend(_folder_drift(instance))
        return found
    try:
        found.extend(remote.call_on_node(instance.node, "instances.templating.folder_drift_of",
                                         {"instance_id": instance.instance_id}))
    except remote.NodeReadError as exc:
        found.append({"what": FOLDER_PARTS, "template": f"as in template {template.name}",
                      "instance": f"unknown: {exc}"})
    return found


@remote.node_read
def folder_drift_of(instance_id: str) -> list[dict]:
    instance = remote.instance_here(instance_id)
    return _folder_drift(instance) if instance.template is not None else []


def _folder_drift(instance: Instance) -> list[dict]:
    """The drift only the instance's folder tells, read here."""
    template = instance.template
    found = []

    def differs(what, wanted, actual):
        if wanted != actual:
            found.append({"what": what, "template": wanted, "instance": actual})

    installed = {node.name: node for node in instance.custom_nodes.all()}
    for spec in template.custom_nodes:
        name = customnodes.name_from_url(spec.get("url", ""))
        node = installed.get(name)
        if node is None or customnodes.folder_of(instance, name) is None:
            found.append({"what": f"custom node {name}", "template": spec.get("ref") or "installed",
                          "instance": "missing"})
        elif spec.get("ref") and spec["ref"] != node.ref:
            found.append({"what": f"custom node {name}", "template": spec["ref"], "instance": node.ref or "default"})
    try:
        current = read_settings(instance)
    except layout.LayoutError as exc:
        found.append({"what": "settings", "template": "comfy.settings.json", "instance": f"refused: {exc}"})
        current = {}
    for key, value in template.settings.items():
        differs(f"setting {key}", value, current.get(key, "(unset)"))
    for version in template.starter_workflows.select_related("entry"):
        path = f"{version.entry.name}.json"
        try:
            there = safefs.lstat(layout.instance_dir(instance.instance_id, instance.node),
                                 f"{workflows.WORKFLOWS_FOLDER}/{path}") is not None
        except safefs.UnsafePathError:
            there = False  # behind a planted link: not the instance's workflow
        if not there:
            found.append({"what": f"workflow {version.entry.name}", "template": f"version {version.number}",
                          "instance": "missing"})
    return found
