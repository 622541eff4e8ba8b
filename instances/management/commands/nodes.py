"""`manage.py nodes`: an instance's custom nodes from a shell, through the same services as the custom nodes page.

Every change runs as an operation and is followed until it ends. The `--json` output and the exit codes are a
contract, documented in docs/cli.md.
"""
from __future__ import annotations

from django.core.management.base import CommandError

from comfyhub import cli
from comfyhub.cli import EXIT_FAILED, find_instance
from instances import customnodes, services

ACTIONS = {
    "update": "Check out another branch, tag or commit (default: the recorded one, fetched again).",
    "disable": "Disable it (ComfyUI's '.disabled' folder name); restart the instance to load the change.",
    "enable": "Enable it again; restart the instance to load the change.",
    "remove": "Delete its folder and ComfyHub's record of it.",
}


class Command(cli.Command):
    help = "List, install, update, disable, enable and remove an instance's custom nodes (see docs/cli.md)."
    handlers = {"list": "list_nodes", "install": "install", **{action: "change" for action in ACTIONS}}

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
        waiting = cli.waiting_options()

        listing = actions.add_parser("list", help="An instance's custom nodes, installed by ComfyHub or by hand.")
        listing.add_argument("instance_id", metavar="ID")
        listing.add_argument("--json", action="store_true", help="A JSON list of objects (see docs/cli.md).")

        install = actions.add_parser("install", parents=[waiting], help="Clone a custom node into an instance.")
        install.add_argument("instance_id", metavar="ID")
        install.add_argument("url", metavar="URL", help="A git URL: https://…, ssh://… or git@host:path (file://… and host paths only with "
                                  "CUSTOM_NODE_LOCAL_SOURCES=true).")
        install.add_argument("--ref", default="", help="A branch, tag or commit (default: the default branch).")

        for action, text in ACTIONS.items():
            change = actions.add_parser(action, parents=[waiting], help=text)
            change.add_argument("instance_id", metavar="ID")
            change.add_argument("name", metavar="NAME", help="The node's folder name under custom_nodes/.")
            if action == "update":
                change.add_argument("--ref", default=None, help="A branch, tag or commit.")

    def install(self, options):
        instance = find_instance(options["instance_id"])
        operation = cli.call_service(services.node_install, instance=instance, url=options["url"], ref=options["ref"])
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None:
            result = done.result or {}
            self.stdout.write(f"Installed {result.get('name')} at {str(result.get('commit', ''))[:12]}; restart "
                              f"{instance} to load it.")

    def change(self, options):
        instance = find_instance(options["instance_id"])
        operation = cli.call_service(services.node_action, instance=instance, name=options["name"],
                                     action=options["action"], ref=options.get("ref"))
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None and options["action"] == "update":
            self.stdout.write(f"{options['name']} is at {str((done.result or {}).get('commit', ''))[:12]}.")

    def list_nodes(self, options):
        instance = find_instance(options["instance_id"])
        try:
            # Read from the folders' files (git never runs here); another node's instance by its node's agent.
            nodes = customnodes.list_nodes(instance)
        except customnodes.CustomNodeError as exc:
            raise CommandError(str(exc), returncode=EXIT_FAILED) from exc
        if options["json"]:
            self.write_json([node_data(node) for node in nodes])
            return
        if not nodes:
            self.stdout.write(f"No custom nodes in {customnodes.nodes_dir(instance)}.")
            return
        rows = [("NAME", "STATE", "COMMIT", "REF", "URL")]
        for node in nodes:
            state = ("enabled" if node["enabled"] else "disabled") if node["present"] else "missing"
            if node["problem"]:
                state += ", unreadable"
            if not node["managed"]:
                state += ", by hand"
            commit = node["commit"][:12] or "-"
            if node["recorded_commit"] and node["commit"] and node["commit"] != node["recorded_commit"]:
                commit += f" (recorded {node['recorded_commit'][:12]})"
            rows.append((node["name"], state, commit, node["ref"] or "-", node["url"] or "-"))
        self.write_table(rows)


def node_data(node: dict) -> dict:
    """The documented JSON of one custom node (docs/cli.md); add keys, never rename or remove them. `dirty` is
    always null: listings never run git (see docs/security.md)."""
    return {key: node[key] for key in ("name", "url", "ref", "commit", "recorded_commit", "dirty", "enabled",
                                       "managed", "present")}
