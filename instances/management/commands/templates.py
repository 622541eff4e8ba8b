"""`manage.py templates`: instance templates (shared configuration) from a shell, through the same services as the
template pages.

apply and new run the template's apply operation and follow it until it ends. The `--json` output and the exit codes
are a contract, documented in docs/cli.md.
"""
from __future__ import annotations

import json

from django.core.exceptions import ValidationError

from comfyhub import cli, jsonlimits
from comfyhub.cli import ARG_HELP, find_instance, input_error, iso
from instances import services, templating
from instances.models import InstanceTemplate, WorkflowEntry

MAX_TEMPLATE_GPUS = 32767  # the form's bound too (a small integer column)


class Command(cli.Command):
    help = "List, create and apply instance templates; new instances from them; drift (see docs/cli.md)."
    handlers = {"list": "list_templates", "create": "create", "apply": "apply", "new": "new", "drift": "drift"}

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
        waiting = cli.waiting_options()

        listing = actions.add_parser("list", help="All templates.")
        listing.add_argument("--json", action="store_true", help="A JSON list of objects (see docs/cli.md).")

        create = actions.add_parser("create", help="Save a template.")
        create.add_argument("name", metavar="NAME", help="Lowercase letters, digits and '-'.")
        create.add_argument("--description", default="")
        create.add_argument("--image", default="", help="Container image (default: COMFY_IMAGE when applied).")
        create.add_argument("--arg", action="append", default=[], dest="extra_args", metavar="ARG", help=ARG_HELP)
        create.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                            help="An extra environment variable; repeat for each.")
        create.add_argument("--gpus", default="0", metavar="N", help="How many GPUs to assign (default 0: CPU mode).")
        create.add_argument("--node", action="append", default=[], dest="nodes", metavar="URL[@REF]",
                            help="A custom node's git URL, optionally @branch, tag or commit; repeat for each.")
        create.add_argument("--setting", action="append", default=[], dest="settings_values", metavar="KEY=JSON",
                            help="A comfy.settings.json value, the value in JSON (Comfy.LinkRenderMode=2, "
                                 "'Comfy.Locale=\"en\"'); repeat for each.")
        create.add_argument("--self-service", action="store_true",
                            help="Users with 'create own instances' may make instances from it for themselves.")
        create.add_argument("--workflow", action="append", default=[], dest="workflows", metavar="NAME[@VERSION]",
                            help="A starter workflow from the library (default: its latest version); repeat for each.")

        apply = actions.add_parser("apply", parents=[waiting],
                                   help="Write a template's settings, workflows and custom nodes into an instance.")
        apply.add_argument("template", metavar="TEMPLATE")
        apply.add_argument("instance_id", metavar="ID")

        new = actions.add_parser("new", parents=[waiting],
                                 help="Create an instance from a template, then apply the template to it.")
        new.add_argument("template", metavar="TEMPLATE")
        new.add_argument("instance_id", metavar="ID")
        new.add_argument("--name", default="", help="Display name (default: the id).")
        new.add_argument("--port", default="", help="Host port (default: the first free one in the range).")

        drift = actions.add_parser("drift", help="Where an instance differs from the template it was made from.")
        drift.add_argument("instance_id", metavar="ID")
        drift.add_argument("--json", action="store_true", help="A JSON object (see docs/cli.md).")

    # --- Operations ---------------------------------------------------------------------------------------

    def apply(self, options):
        template = find_template(options["template"])
        instance = find_instance(options["instance_id"])
        operation = cli.call_service(services.template_apply, template=template, instance=instance)
        self.follow_apply(operation, options)

    def new(self, options):
        template = find_template(options["template"])
        port = options["port"].strip().lower()
        digits = port.isascii() and port.isdigit()
        if port not in ("", "auto") and not digits:
            raise input_error({"host_port": [f"'{options['port']}' is not a port number; give one from 1024 to "
                                             "65535, or leave --port out to choose one automatically."]})
        instance, operation = cli.call_service(
            services.instance_create_from_template, template=template, instance_id=options["instance_id"],
            host_port=int(port) if digits else None, display_name=options["name"])
        gpus = ", ".join(str(gpu.index) for gpu in instance.assigned_gpus()) or "none (CPU mode)"
        self.stdout.write(f"Created instance '{instance}' from template '{template}': port {instance.host_port}, "
                          f"GPUs {gpus}, image {instance.image}.")
        self.follow_apply(operation, options)

    def follow_apply(self, operation, options):
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is None:
            return
        result = done.result or {}
        self.stdout.write(f"  settings: {result.get('settings', 0)} written")
        for item in result.get("workflows", []):
            self.stdout.write(f"  workflow {item['workflow']}: {item['result']} ({item['path']})")
        for item in result.get("nodes", []):
            self.stdout.write(f"  custom node {item['name']}: {item['result']}")

    # --- At once ------------------------------------------------------------------------------------------

    def list_templates(self, options):
        templates = list(InstanceTemplate.objects.prefetch_related("starter_workflows__entry", "instances"))
        if options["json"]:
            self.write_json([template_data(t) for t in templates])
            return
        if not templates:
            self.stdout.write("No templates yet. Save one with: python manage.py templates create NAME")
            return
        rows = [("NAME", "GPUS", "NODES", "WORKFLOWS", "INSTANCES", "IMAGE")]
        for template in templates:
            data = template_data(template)
            rows.append((template.name, template.gpu_count, len(template.custom_nodes),
                         len(data["starter_workflows"]), ",".join(data["instances"]) or "-",
                         template.image or "(default)"))
        self.write_table(rows)

    def create(self, options):
        errors, env, gpu_count = {}, {}, 0
        try:
            env = services.parse_env(options["env"])
        except ValidationError as exc:
            errors.update(exc.message_dict)
        gpu_count = cli.whole_number(options["gpus"], low=0, high=MAX_TEMPLATE_GPUS)
        if gpu_count is None:
            errors["gpu_count"] = [f"'{options['gpus'][:100]}' is not a number of GPUs; give 0 for CPU mode, or 1, "
                                   f"2, ... up to {MAX_TEMPLATE_GPUS}."]
        custom_nodes = [parse_node(spec) for spec in options["nodes"]]
        settings_values = {}
        for pair in options["settings_values"]:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                errors.setdefault("settings", []).append(
                    f"'{pair[:200]}' is not KEY=JSON; give the value in JSON, e.g. Comfy.LinkRenderMode=2 or "
                    "'Comfy.Locale=\"en\"'.")
                continue
            try:
                settings_values[key.strip()] = jsonlimits.loads(value, what=f"The value of setting {key.strip()[:200]}")
            except jsonlimits.JSONInputError as exc:
                errors.setdefault("settings", []).append(
                    f"{exc} Give the value in JSON, e.g. Comfy.LinkRenderMode=2 or 'Comfy.Locale=\"en\"'.")
        starters = []
        for spec in options["workflows"]:
            version, problem = library_version(spec)
            if problem:
                errors.setdefault("starter_workflows", []).append(problem)
            else:
                starters.append(version)
        if errors:
            raise input_error(errors)
        template = cli.call_service(
            services.template_create, name=options["name"], description=options["description"],
            image=options["image"], extra_args=options["extra_args"], extra_env=env, gpu_count=gpu_count,
            custom_nodes=custom_nodes, settings_values=settings_values, starter_workflows=starters,
            self_service=options["self_service"])
        self.stdout.write(f"Created {'self-service ' if template.self_service else ''}template '{template}': "
                          f"{template.gpu_count} GPU(s), "
                          f"{len(template.custom_nodes)} custom node(s), {len(template.settings)} setting(s), "
                          f"{len(starters)} starter workflow(s).")
        self.stdout.write(f"Make an instance from it with: python manage.py templates new {template} ID")

    def drift(self, options):
        instance = find_instance(options["instance_id"])
        template = instance.template
        differences = templating.drift(instance)
        if options["json"]:
            self.write_json({"instance": instance.instance_id, "template": template.name if template else None,
                             "differences": differences})
            return
        if template is None:
            self.stdout.write(f"{instance} was not made from a template; there is nothing to compare.")
        elif not differences:
            self.stdout.write(f"{instance} matches template '{template}'.")
        else:
            self.stdout.write(f"{instance} differs from template '{template}' in {len(differences)} place(s):")
            for item in differences:
                self.stdout.write(f"  {item['what']}: template {shown(item['template'])}, "
                                  f"instance {shown(item['instance'])}")


def find_template(name: str) -> InstanceTemplate:
    template = InstanceTemplate.objects.prefetch_related("starter_workflows").filter(name=name).first()
    if template is None:
        raise cli.unknown("template", name, InstanceTemplate.objects.values_list("name", flat=True))
    return template


def parse_node(spec: str) -> dict:
    """URL[@REF]: the part after the last '@' is a ref unless it holds ':' or '/' (git@host:path has no ref)."""
    url, sep, ref = spec.strip().rpartition("@")
    if sep and url and ref and ":" not in ref and "/" not in ref:
        return {"url": url, "ref": ref}
    return {"url": spec.strip(), "ref": ""}


def library_version(spec: str):
    """NAME[@VERSION] -> (WorkflowVersion, "") or (None, the problem), by the library's own rule."""
    try:
        return services.workflow_version_resolve(spec=spec), ""
    except ValidationError as exc:
        return None, " ".join(exc.messages)


def shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def template_data(template: InstanceTemplate) -> dict:
    """The documented JSON of one template (docs/cli.md); add keys, never rename or remove them."""
    return {
        "name": template.name,
        "description": template.description,
        "image": template.image,
        "extra_args": list(template.extra_args),
        "extra_env": dict(template.extra_env),
        "gpu_count": template.gpu_count,
        "self_service": template.self_service,
        "custom_nodes": [{"url": n.get("url", ""), "ref": n.get("ref", "")} for n in template.custom_nodes],
        "settings": dict(template.settings),
        "starter_workflows": sorted(str(v) for v in template.starter_workflows.all()),
        "instances": sorted(i.instance_id for i in template.instances.all()),
        "created_at": iso(template.created_at),
    }
