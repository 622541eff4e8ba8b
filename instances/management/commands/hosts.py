"""`manage.py hosts`: the nodes (GPU hosts) ComfyHub runs instances on, their state from their agents' heartbeats,
and approving the nodes agents registered (instances/nodes.py, the same services as the Nodes page). Custom nodes
are `manage.py nodes`. The `--json` output and the exit codes are a contract, documented in docs/cli.md.
"""
from __future__ import annotations

from django.core.management.base import CommandError

from comfyhub import cli
from comfyhub.cli import EXIT_INPUT, human_size, local_time
from instances import nodes
from instances.models import Node


class Command(cli.Command):
    help = "List the nodes (GPU hosts), show one, approve a node its agent registered or revoke that (docs/cli.md)."
    handlers = {"list": "list_nodes", "show": "show", "approve": "approve", "revoke-approval": "revoke"}

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
        listing = actions.add_parser("list", help="Every node with its state, GPUs, instances, disk and versions.")
        listing.add_argument("--json", action="store_true", help="A JSON list of objects (see docs/cli.md).")
        show = actions.add_parser("show", help="One node and its last heartbeat.")
        show.add_argument("name", metavar="NAME")
        show.add_argument("--json", action="store_true", help="A JSON object (see docs/cli.md).")
        approve = actions.add_parser("approve", help="Let the node's agent take jobs.")
        approve.add_argument("name", metavar="NAME")
        revoke = actions.add_parser("revoke-approval",
                                    help="Stop the node's agent taking jobs (it finishes the current one).")
        revoke.add_argument("name", metavar="NAME")
        revoke.add_argument("--yes", action="store_true", help="Confirm it (it stands for a person saying yes).")

    def list_nodes(self, options):
        rows = nodes.node_rows()
        if options["json"]:
            self.write_json([nodes.node_as_json(row) for row in rows])
            return
        table = [("NODE", "STATE", "ADDRESS", "GPUS HELD/FREE/TOTAL", "INSTANCES", "DOCKER", "COMFYHUB", "LOAD",
                  "FREE DISK")]
        for row in rows:
            table.append((row.node.name, row.state.label, row.node.bind_address,
                          f"{row.gpus_held}/{row.gpus_free}/{row.gpus_total}", row.instance_count,
                          row.docker_version or ("unreachable" if row.docker_error else "-"),
                          row.comfyhub_version or "-", " ".join(str(value) for value in row.load) or "-",
                          free_disk(row.storage)))
        self.write_table(table)
        waiting = [row.node.name for row in rows if not row.node.approved]
        if waiting:
            self.stdout.write(f"Waiting for approval: {', '.join(waiting)}. Approve with `manage.py hosts approve "
                              "NAME`.")

    def show(self, options):
        row = nodes.node_row(find_node(options["name"]))
        if options["json"]:
            self.write_json(nodes.node_as_json(row))
            return
        node, beat = row.node, row.node.heartbeat
        lines = [
            ("Node", node.name),
            ("State", row.state.label),
            ("Approved", "yes" if node.approved else f"no (`manage.py hosts approve {node.name}`)"),
            ("Address", node.bind_address),
            ("Registered", local_time(node.registered_at) if node.registered_at else "made by an operator"),
            ("Last heartbeat", local_time(node.last_heartbeat_at)),
            ("Host", f"{beat.get('hostname', '-')} (agent pid {beat.get('agent_pid', '-')}, "
                     f"{beat.get('cpu_count', '-')} CPUs)"),
            ("Load", " ".join(str(value) for value in row.load) or "-"),
            ("GPUs", f"{row.gpus_held} held by running instances, {row.gpus_free} free, {row.gpus_total} in all "
                     f"(source: {beat.get('gpu_source') or node.gpu_source or '-'})"),
            ("Instances", row.instance_count),
            ("Docker", row.docker_version or row.docker_error or "-"),
            ("ComfyHub", row.comfyhub_version or "-"),
            ("Queues", ", ".join(beat.get("queues") or nodes.node_queue_names(node.name))),
        ]
        for entry in row.storage:
            lines.append((f"Disk {entry.get('root')}", disk(entry)))
        self.write_table([(f"{label}:", value) for label, value in lines])

    def approve(self, options):
        node = find_node(options["name"])
        if cli.call_service(nodes.node_approve, node=node):
            self.stdout.write(f"Approved node {node.name}: its agent takes jobs from its next heartbeat on.")
        else:
            self.stdout.write(f"Node {node.name} was already approved.")

    def revoke(self, options):
        node = find_node(options["name"])
        if not options["yes"]:
            raise CommandError(f"Revoking approval stops node {node.name}'s agent taking jobs (it finishes the one it "
                               "runs); add --yes to confirm.", returncode=EXIT_INPUT)
        if cli.call_service(nodes.node_revoke_approval, node=node):
            self.stdout.write(f"Revoked approval of node {node.name}: its agent takes no more jobs.")
        else:
            self.stdout.write(f"Node {node.name} was not approved.")


def find_node(name: str) -> Node:
    node = nodes.node_named(name)
    if node is None:
        raise cli.unknown("node", name, Node.objects.values_list("name", flat=True))
    return node


def disk(entry: dict) -> str:
    if entry.get("free_bytes") is None:
        return f"{entry.get('path')}: {entry.get('error') or 'unknown'}"
    return (f"{human_size(entry['free_bytes'])} free of {human_size(entry['total_bytes'])} "
            f"({entry.get('path')})")


def free_disk(storage: list) -> str:
    return ", ".join(f"{entry.get('root')} {human_size(entry['free_bytes'])}" for entry in storage
                     if entry.get("free_bytes") is not None) or "-"
