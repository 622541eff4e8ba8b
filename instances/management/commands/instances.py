"""`manage.py instances`: the command line for instances, calling the same services as the browser UI.

Each sub-command parses its arguments, calls one service and prints. Commands that enqueue follow the Operation row
until it ends. The `--json` output and the exit codes are a contract, documented in docs/cli.md.
"""
from __future__ import annotations

import argparse
import json

from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from comfyhub import cli
from comfyhub.cli import ARG_HELP, EXIT_FAILED, EXIT_INPUT, find_instance, input_error, iso, local_time
from comfyhub.models import Operation
from instances import docker_engine, placement, remote, services
from instances.models import Instance
from storage_app import layout

LATEST_OPERATIONS = 10

CREATE_EPILOG = """\
Arguments for ComfyUI start with '-', so give each with '=' (otherwise they are read as options of this command):
  manage.py instances create studio --gpus 0 --arg=--preview-method --arg=auto --env HF_HOME=/instance/hf
"""


class Command(cli.Command):
    help = "Create, list, inspect, start, stop, build and delete ComfyUI instances (see docs/cli.md)."
    handlers = {"create": "create_instance", "edit": "edit_instance", "list": "list_instances",
                "status": "show_status", "share": "share_instance", "unshare": "unshare_instance",
                "logs": "show_logs", "update-image": "update_image", "move": "move_instance", **{action: "run_operation"
                                        for action in ("start", "stop", "restart", "build", "delete")}}

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

        waiting = cli.waiting_options()

        create = actions.add_parser("create", help="Register a new instance (nothing is started).",
                                    epilog=CREATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        create.add_argument("instance_id", metavar="ID", help="Lowercase letters, digits and '-'.")
        create.add_argument("--name", default="", help="Display name (default: the id).")
        create.add_argument("--description", default="")
        create.add_argument("--gpus", default="none",
                            help="GPU indexes, e.g. '0,1', or 'none' for CPU mode (default none).")
        create.add_argument("--port", default="", help="Host port (default: the first free one in the range).")
        create.add_argument("--node", default="", metavar="NAME",
                            help="The approved node (GPU host) it runs on; --gpus are that node's (default: local).")
        create.add_argument("--image", default="", help="Container image (default: COMFY_IMAGE).")
        create.add_argument("--arg", action="append", default=[], dest="extra_args", metavar="ARG", help=ARG_HELP)
        create.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                            help="An extra environment variable; repeat for each.")
        create.add_argument("--adopt", action="store_true",
                            help="Take the folder kept from a deleted instance with this id as it is (nothing in it "
                                 "is overwritten or deleted; building adds only what is missing).")
        create.add_argument("--arguments-env", default=None, metavar="NAME", dest="image_arguments",
                            type=lambda name: f"env:{name}",
                            help="The image reads ComfyUI's arguments from the environment variable NAME (e.g. "
                                 "CLI_ARGS), not from its command (default: as the container's command).")
        create.add_argument("--owner", default="", metavar="USERNAME",
                            help="Who may open it through the hub and share it (default: none, operators only).")
        create.add_argument("--idle-stop", default="", metavar="MINUTES", dest="idle_stop",
                            help="Stop it after this many idle minutes (no traffic through the hub, an empty queue); "
                                 "0 = never (default).")

        edit = actions.add_parser("edit", help="Change an instance's name, description, owner or idle stop (the rest "
                                               "of its configuration: the instance page or the admin).")
        edit.add_argument("instance_id", metavar="ID")
        edit.add_argument("--name", default=None, help="Display name ('' clears it).")
        edit.add_argument("--description", default=None)
        owner = edit.add_mutually_exclusive_group()
        owner.add_argument("--owner", default=None, metavar="USERNAME",
                           help="Who may open it through the hub and share it.")
        owner.add_argument("--no-owner", action="store_true", help="Leave it without an owner (operators only).")
        edit.add_argument("--idle-stop", default=None, metavar="MINUTES", dest="idle_stop",
                          help="Stop it after this many idle minutes; 0 = never.")

        for name, text in (("share", "Let a user or a group open it through the hub."),
                           ("unshare", "Take a user's or a group's share away (access ends within "
                                       "ACCESS_CACHE_SECONDS).")):
            sharing = actions.add_parser(name, help=text)
            sharing.add_argument("instance_id", metavar="ID")
            whom = sharing.add_mutually_exclusive_group(required=True)
            whom.add_argument("--user", default="", metavar="USERNAME")
            whom.add_argument("--group", default="", metavar="GROUP")

        listing = actions.add_parser("list", help="All instances, one line each.")
        listing.add_argument("--json", action="store_true", help="A JSON list of objects (see docs/cli.md).")

        status = actions.add_parser("status", help="One instance in detail: health checks and latest operations.")
        status.add_argument("instance_id", metavar="ID")
        status.add_argument("--json", action="store_true", help="A JSON object (see docs/cli.md).")

        for name, text in (("start", "Start the container (building directories and creating it if needed)."),
                           ("stop", "Stop the container."),
                           ("restart", "Stop, then start (applies configuration changes)."),
                           ("build", "Create the instance's directories.")):
            action = actions.add_parser(name, help=text, parents=[waiting])
            action.add_argument("instance_id", metavar="ID")

        delete = actions.add_parser("delete", help="Remove the container and the registry entry; data stays.",
                                    parents=[waiting])
        delete.add_argument("instance_id", metavar="ID")
        delete.add_argument("--purge-data", action="store_true",
                            help="Also delete the instance's own folder (never shared data). Needs --yes.")
        delete.add_argument("--yes", action="store_true",
                            help="Confirm --purge-data (stands for typing the instance id in the browser).")

        move = actions.add_parser(
            "move", parents=[waiting],
            help="Move it to another node: stopped and snapshotted there, restored and started on the target, then "
                 "removed from the source (the snapshot stays); any failure before the switch leaves it on the "
                 "source as it was. Needs COMFY_BACKUPS_PATH shared by both nodes (docs/nodes.md).")
        move.add_argument("instance_id", metavar="ID")
        move.add_argument("--to", required=True, metavar="NODE", dest="to", help="The approved, online node.")

        logs = actions.add_parser("logs", help="The container's log output.")
        logs.add_argument("instance_id", metavar="ID")
        logs.add_argument("--tail", type=int, default=100, metavar="N", help="Last N lines (default 100).")

        update = actions.add_parser(
            "update-image", parents=[waiting],
            help="Pull or rebuild the instances' images, then restart the running ones on it one at a time, each "
                 "healthy before the next; one that does not come up goes back to its old image and ends the update.")
        update.add_argument("instance_ids", nargs="*", metavar="ID", help="The instances to update.")
        update.add_argument("--all", action="store_true", help="Every instance (instead of naming them).")
        update.add_argument("--no-pull", action="store_true",
                            help="Neither pull nor rebuild: use the image the tag names now (after `docker load` on "
                                 "an offline host).")

    # --- Sub-commands ----------------------------------------------------------------------------------------

    def create_instance(self, options):
        errors = {}
        gpu_indexes = env = host_port = None
        try:
            gpu_indexes = services.parse_gpu_selection(options["gpus"])
        except ValidationError as exc:
            errors.update(exc.message_dict)
        try:
            env = services.parse_env(options["env"])
        except ValidationError as exc:
            errors.update(exc.message_dict)
        port = options["port"].strip().lower()
        if port.isascii() and port.isdigit():
            host_port = int(port)
        elif port not in ("", "auto"):
            errors["host_port"] = [f"'{options['port']}' is not a port number; give one from 1024 to 65535, or "
                                   "leave --port out to choose one automatically."]
        owner = self.owner_option(options["owner"], errors) if options["owner"] else None
        idle_stop = self.idle_stop_option(options["idle_stop"], errors) if options["idle_stop"] else 0
        node = None
        try:
            node = placement.node_for_new_instance(options["node"])
        except ValidationError as exc:
            errors.update(exc.message_dict)
        if errors:
            raise input_error(errors)
        try:
            instance = services.instance_create(
                instance_id=options["instance_id"], display_name=options["name"], description=options["description"],
                image=options["image"], extra_args=options["extra_args"], extra_env=env, host_port=host_port,
                gpu_indexes=gpu_indexes, node=node, adopt=options["adopt"],
                image_arguments=options["image_arguments"] or "command", owner=owner, idle_stop_after=idle_stop,
            )
        except ValidationError as exc:
            raise input_error(exc) from exc
        instance = find_instance(instance.instance_id)
        self.stdout.write(f"Created instance '{instance}' on node {instance.node}."
                          + (f" It adopted {layout.instance_dir(instance.instance_id, instance.node)} as it is."
                             if options["adopt"] else ""))
        self.stdout.write(f"  port   {instance.host_port} ({instance.url})")
        self.stdout.write(f"  hub    {hub_text(instance)}")
        self.stdout.write(f"  owner  {owner_text(instance)}")
        self.stdout.write(f"  GPUs   {gpus_text(instance)}")
        self.stdout.write(f"  image  {instance.image}")
        self.stdout.write(f"Start it with: python manage.py instances start {instance}")

    @staticmethod
    def owner_option(name: str, errors: dict):
        from instances import access

        try:
            return access.user_named(name.strip())
        except ValidationError as exc:
            errors["owner"] = exc.messages
            return None

    @staticmethod
    def idle_stop_option(value: str, errors: dict):
        minutes = cli.whole_number(value, low=0, high=services.IDLE_STOP_MAX_MINUTES)
        if minutes is None:
            errors["idle_stop_after"] = [f"'{value}' is not a number of minutes; give a whole number from 0 (never) "
                                         f"to {services.IDLE_STOP_MAX_MINUTES}, e.g. "
                                         f"{settings.IDLE_STOP_AFTER_DEFAULT}."]
        return minutes

    def edit_instance(self, options):
        instance = find_instance(options["instance_id"])
        errors = {}
        owner = services.KEEP
        if options["no_owner"]:
            owner = None
        elif options["owner"] is not None:
            owner = self.owner_option(options["owner"], errors)
        idle_stop = None if options["idle_stop"] is None else self.idle_stop_option(options["idle_stop"], errors)
        if errors:
            raise input_error(errors)
        if owner is services.KEEP and idle_stop is None and options["name"] is None and options["description"] is None:
            raise CommandError("Nothing to change: give --name, --description, --owner, --no-owner or --idle-stop.",
                               returncode=EXIT_INPUT)
        instance = cli.call_service(
            services.instance_update, instance=instance,
            display_name=instance.display_name if options["name"] is None else options["name"],
            description=instance.description if options["description"] is None else options["description"],
            image=instance.image, extra_args=instance.extra_args, extra_env=instance.extra_env, host_port=None,
            gpu_indexes=instance.gpu_choice(), image_arguments=instance.image_arguments,
            idle_stop_after=idle_stop, owner=owner)
        self.stdout.write(f"Saved instance '{instance}'.")
        self.stdout.write(f"  owner      {owner_text(instance)}")
        self.stdout.write(f"  idle stop  {idle_text(instance)}")

    def share_instance(self, options):
        from instances import access

        instance = find_instance(options["instance_id"])
        share = cli.call_service(access.share_add, instance=instance, username=options["user"],
                                 group=options["group"])
        self.stdout.write(f"Shared '{instance}' with {access.share_label(share)}; they open it at "
                          f"{instance.hub_path} on ComfyHub's address.")

    def unshare_instance(self, options):
        from instances import access

        instance = find_instance(options["instance_id"])
        share = cli.call_service(access.share_find, instance=instance, username=options["user"],
                                 group=options["group"])
        access.share_remove(share=share)
        self.stdout.write(f"'{instance}' is no longer shared with {access.share_label(share)}; access ends within "
                          f"{settings.ACCESS_CACHE_SECONDS} s.")

    def list_instances(self, options):
        instances = list(services.instances_with_relations())
        if options["json"]:
            self.stdout.write(json.dumps([instance_data(i) for i in instances], indent=2))
            return
        if not instances:
            self.stdout.write("No instances yet. Create one with: python manage.py instances create ID")
            return
        rows = [("ID", "STATUS", "DESIRED", "GPUS", "PORT", "IMAGE")]
        for instance in instances:
            gpus = ",".join(str(gpu.index) for gpu in instance.assigned_gpus()) or "cpu"
            rows.append((instance.instance_id, status_text(instance), instance.desired_state, gpus,
                         str(instance.host_port), instance.image))
        self.write_table(rows)

    def show_status(self, options):
        from instances import access

        instance = find_instance(options["instance_id"])
        operations = list(latest_operations(instance))
        shares = list(access.shares_of(instance))
        pending_kinds = services.instance_pending_change_kinds(instance)
        data = {
            **instance_data(instance, pending_kinds=pending_kinds),
            "restart_count": instance.restart_count,
            "started_at": iso(instance.started_at),
            "health": {
                "checks": [{"check": c.get("check", ""), "ok": bool(c.get("ok")), "detail": c.get("detail", "")}
                           for c in (instance.health or {}).get("checks", [])],
                "devices": list((instance.health or {}).get("devices", [])),
                "comfyui_version": (instance.health or {}).get("comfyui_version", ""),
            },
            "extra_args": list(instance.extra_args),
            "extra_env": dict(instance.extra_env),
            "shares": [{"user": s.user.get_username() if s.user_id else None,
                        "group": s.group.name if s.group_id else None} for s in shares],
            "operations": [operation_data(o) for o in operations],
        }
        if options["json"]:
            self.stdout.write(json.dumps(data, indent=2))
            return
        write = self.stdout.write
        write(f"{instance}" + (f" ({instance.display_name})" if instance.display_name else ""))
        if instance.description:
            write(f"  {instance.description}")
        detail = f" - {instance.status_detail}" if instance.status_detail else ""
        if instance.node.offline_note():
            detail = f"; last recorded: {instance.status}"
        write(f"  status     {status_text(instance)} (desired: {instance.desired_state}){detail}")
        write(f"  hub        {hub_text(instance)}")
        write(f"  url        {instance.url} (on the node, for ComfyHub itself)")
        write(f"  owner      {owner_text(instance)}")
        write(f"  shared     {', '.join(access.share_label(s) for s in shares) or 'with nobody'}")
        write(f"  idle stop  {idle_text(instance)}")
        write(f"  node       {instance.node}")
        write(f"  GPUs       {gpus_text(instance, names=True)}")
        write(f"  image      {instance.image}")
        write(f"  args       {' '.join(instance.extra_args) or '-'}")
        write(f"  env        {' '.join(f'{k}={v}' for k, v in instance.extra_env.items()) or '-'}")
        container = instance.container_id[:12] or "-"
        if pending_kinds:
            what = " and ".join(w for k, w in (("configuration", "configuration changed"),
                                               ("image", "image updated")) if k in pending_kinds)
            container += f" ({what}: restart to apply)"
        write(f"  container  {container}")
        write(f"  restarts   {instance.restart_count}")
        write(f"  checked    {local_time(instance.checked_at)}")
        write(f"  created    {local_time(instance.created_at)}")
        checks = data["health"]["checks"]
        write("Health checks:" if checks else "Health checks: none yet (they run while the container exists).")
        for check in checks:
            write(f"  {'ok  ' if check['ok'] else 'FAIL'}  {check['check']}: {check['detail']}")
        write("Latest operations:" if operations else "Latest operations: none.")
        for operation in operations:
            write(f"  {local_time(operation.created_at)}  {operation.get_kind_display():<18} {operation.status:<9} "
                  f"{operation.progress:>3}%  {operation.pk}")
            if operation.error:
                write(f"      error: {operation.error.splitlines()[0]}")

    def run_operation(self, options):
        """start, stop, restart, build and delete: enqueue through the service, then follow the operation."""
        instance = find_instance(options["instance_id"])
        action = options["action"]
        if action == "delete":
            if options["purge_data"] and not options["yes"]:
                raise CommandError(
                    f"--purge-data deletes {layout.instance_dir(instance.instance_id, instance.node)} for good; add "
                    "--yes to confirm (it stands for typing the instance id).", returncode=EXIT_INPUT)
            operation = cli.call_service(services.instance_delete, instance=instance,
                                         purge_data=options["purge_data"],
                                         confirm=instance.instance_id if options["yes"] else "")
        else:
            service = {"start": services.instance_start, "stop": services.instance_stop,
                       "restart": services.instance_restart, "build": services.instance_build}[action]
            operation = cli.call_service(service, instance=instance)
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None and isinstance(done.result, dict) and done.result.get("url"):
            self.stdout.write(f"Open it at {settings.HUB_ORIGIN}{instance.hub_path} (through the hub, with a login); "
                              f"ComfyUI answers at {done.result['url']} on its node (no login there)")

    def move_instance(self, options):
        from instances import moves

        instance = find_instance(options["instance_id"])
        try:
            target = moves.move_target(options["to"])
        except ValidationError as exc:
            raise input_error(exc) from exc
        operation = cli.call_service(moves.instance_move, instance=instance, target=target)
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None and isinstance(done.result, dict):
            self.stdout.write(f"{instance} is on node {done.result['to']}, port {done.result['port']}.")

    def show_logs(self, options):
        instance = find_instance(options["instance_id"])
        if options["tail"] < 1:
            raise input_error({"tail": ["Give a number of lines of 1 or more."]})
        try:
            text = remote.instance_logs(instance, options["tail"])  # another node's through its agent
        except (docker_engine.EngineError, remote.NodeReadError) as exc:
            raise CommandError(str(exc), returncode=EXIT_FAILED) from exc
        if not text:
            self.stderr.write(f"No log output from container {instance.container_name} (has '{instance}' been "
                              "started?).")
            return
        self.stdout.write(text, ending="" if text.endswith("\n") else "\n")

    def update_image(self, options):
        from instances import updates

        ids = options["instance_ids"]
        if bool(ids) == options["all"]:
            raise CommandError("Name the instances to update (update-image ID [ID ...]) or give --all, not both."
                               if ids else "Name the instances to update (update-image ID [ID ...]) or give --all.",
                               returncode=EXIT_INPUT)
        instances = list(services.instances_with_relations()) if options["all"] else cli.find_instances(ids)
        if not instances:
            raise CommandError("There are no instances to update; create one first.", returncode=EXIT_INPUT)
        operation = cli.call_service(updates.image_update, instances=instances, refresh=not options["no_pull"])
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None and isinstance(done.result, dict):
            for entry in done.result.get("instances", []):
                self.stdout.write(f"{entry['instance']}: {entry['outcome']}")


# --- Helpers ------------------------------------------------------------------------------------------------------

def latest_operations(instance: Instance):
    return Operation.objects.filter(
        target_type=ContentType.objects.get_for_model(Instance), target_id=str(instance.pk)
    )[:LATEST_OPERATIONS]


# --- Output ------------------------------------------------------------------------------------------------------

def gpus_text(instance: Instance, *, names: bool = False) -> str:
    gpus = instance.assigned_gpus()
    if not gpus:
        return "none (CPU mode)"
    if names:
        return "; ".join(f"{gpu.index}: {gpu.name}" if gpu.name else str(gpu.index) for gpu in gpus)
    return ", ".join(str(gpu.index) for gpu in gpus)


def status_text(instance: Instance) -> str:
    """Its recorded status, or "unknown (node offline since …)" while its node's agent is away: what was recorded is
    from before."""
    offline = instance.node.offline_note()
    return f"unknown ({offline})" if offline else instance.status


def hub_text(instance: Instance) -> str:
    return f"{instance.hub_path} on ComfyHub's address (e.g. http://{settings.SERVE_BIND}{instance.hub_path})"


def owner_text(instance: Instance) -> str:
    return instance.owner.get_username() if instance.owner_id else "none (operators only)"


def idle_text(instance: Instance) -> str:
    return f"after {instance.idle_stop_after} min" if instance.idle_stop_after else "never"


def instance_data(instance: Instance, pending_kinds: set[str] | None = None) -> dict:
    """The documented JSON of one instance (docs/cli.md); add keys, never rename or remove them. `pending_kinds`:
    services.instance_pending_change_kinds(instance) where the caller has it already (it costs two inspects)."""
    if pending_kinds is None:
        pending_kinds = services.instance_pending_change_kinds(instance)
    return {
        "instance_id": instance.instance_id,
        "name": instance.name,
        "description": instance.description,
        "node": instance.node.name,
        "image": instance.image,
        "host_port": instance.host_port,
        "url": instance.url,
        "hub_path": instance.hub_path,
        "owner": instance.owner.get_username() if instance.owner_id else None,
        "idle_stop_after": instance.idle_stop_after,
        "gpus": [{"index": gpu.index, "uuid": gpu.uuid, "name": gpu.name} for gpu in instance.assigned_gpus()],
        "cpu_only": instance.cpu_only,
        "desired_state": instance.desired_state,
        "status": instance.status,
        "status_detail": instance.status_detail,
        "container_id": instance.container_id,
        "pending_changes": bool(pending_kinds),
        "checked_at": iso(instance.checked_at),
        "created_at": iso(instance.created_at),
    }


def operation_data(operation: Operation) -> dict:
    return {
        "id": str(operation.pk),
        "kind": operation.kind,
        "status": operation.status,
        "progress": operation.progress,
        "progress_message": operation.progress_message,
        "created_at": iso(operation.created_at),
        "finished_at": iso(operation.finished_at),
        "error": operation.error,
    }
