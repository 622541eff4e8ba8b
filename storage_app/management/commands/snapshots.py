"""`manage.py snapshots`: instance snapshots from a shell, through the same services as the snapshots page.

create, restore (or clone) and import-manager run as operations and are followed until they end. The `--json` output
and the exit codes are a contract, documented in docs/cli.md.
"""
from __future__ import annotations

import json

from django.core.management.base import CommandError

from comfyhub import cli, jsonlimits
from comfyhub.cli import EXIT_INPUT, find_instance, human_size, input_error, iso, local_time
from instances import placement
from instances import services as instance_services
from instances.models import Instance
from storage_app import services
from storage_app.models import Snapshot

KNOWN_SHOWN = 10  # snapshot ids named when one is unknown


class Command(cli.Command):
    help = "Create, list, restore, clone and delete instance snapshots; ComfyUI-Manager snapshots (see docs/cli.md)."
    handlers = {"create": "create", "list": "list_snapshots", "restore": "restore", "delete": "delete",
                "export-manager": "export_manager", "import-manager": "import_manager"}

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
        waiting = cli.waiting_options()

        create = actions.add_parser("create", parents=[waiting], help="Archive an instance's data now.")
        create.add_argument("instance_id", metavar="ID")
        create.add_argument("--kind", default="config",
                            help="config (user data and registry settings, the default) or full (also custom nodes, "
                                 "own models and python packages).")
        create.add_argument("--output", action="store_true", help="Also archive the instance's output/ folder.")
        create.add_argument("--note", default="", metavar="TEXT", help="Why it was taken (up to 300 characters).")

        listing = actions.add_parser("list", help="Snapshots, newest first.")
        listing.add_argument("instance_id", nargs="?", metavar="ID",
                             help="Only this instance's (also of an instance deleted since).")
        listing.add_argument("--json", action="store_true", help="A JSON list of objects (see docs/cli.md).")

        restore = actions.add_parser("restore", parents=[waiting],
                                     help="Restore into its instance (a snapshot of the current state is taken "
                                          "first), or clone into a new instance with --as.")
        restore.add_argument("snapshot", metavar="SNAPSHOT", help="The snapshot's number (see list).")
        restore.add_argument("--as", dest="new_instance_id", default="", metavar="NEW_ID",
                             help="Create a new instance from the snapshot instead.")
        restore.add_argument("--gpus", default=None,
                             help="With --as: GPU indexes for the new instance, e.g. '0,1', or 'none' (default).")
        restore.add_argument("--node", default=None, metavar="NAME",
                             help="With --as: the node the new instance is made on (default local); its agent reads "
                                  "the snapshot through the shared COMFY_BACKUPS_PATH.")

        delete = actions.add_parser("delete", help="Delete a snapshot and its archive.")
        delete.add_argument("snapshot", metavar="SNAPSHOT")
        delete.add_argument("--yes", action="store_true", help="Confirm; without it nothing is deleted.")

        export = actions.add_parser("export-manager",
                                    help="The snapshot's custom nodes as a ComfyUI-Manager snapshot (JSON).")
        export.add_argument("snapshot", metavar="SNAPSHOT")
        export.add_argument("file", metavar="FILE", help="Where to write it; '-' for stdout.")

        importing = actions.add_parser("import-manager", parents=[waiting],
                                       help="Install the custom nodes of a ComfyUI-Manager snapshot into an instance.")
        importing.add_argument("instance_id", metavar="ID")
        importing.add_argument("file", metavar="FILE", help="The ComfyUI-Manager snapshot (JSON); '-' for stdin.")

    # --- Operations ---------------------------------------------------------------------------------------

    def create(self, options):
        instance = find_instance(options["instance_id"])
        operation = cli.call_service(services.snapshot_create, instance=instance, kind=options["kind"],
                                     include_output=options["output"], note=options["note"])
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None:
            result = done.result or {}
            self.stdout.write(f"Snapshot {result.get('snapshot')}: {result.get('archive')} "
                              f"({human_size(result.get('size', 0))}, sha256 {result.get('sha256')})")

    def restore(self, options):
        snapshot = find_snapshot(options["snapshot"])
        if options["new_instance_id"]:
            gpu_indexes = cli.call_service(instance_services.parse_gpu_selection, value=options["gpus"] or "none")
            node = cli.call_service(placement.node_for_new_instance, name=options["node"])
            operation = cli.call_service(services.snapshot_clone, snapshot=snapshot,
                                         new_instance_id=options["new_instance_id"], gpu_indexes=gpu_indexes,
                                         node=node)
        else:
            if options["gpus"] is not None:
                raise input_error({"gpus": ["--gpus applies to a clone only (--as NEW_ID); a restore keeps the "
                                            "instance's GPUs."]})
            if options["node"] is not None:
                raise input_error({"node": ["--node applies to a clone only (--as NEW_ID); a restore stays on the "
                                            "instance's node (move it with `instances move`)."]})
            operation = cli.call_service(services.snapshot_restore, snapshot=snapshot)
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is None:
            return
        result = done.result or {}
        if options["new_instance_id"]:
            gpus = ", ".join(str(g) for g in result.get("gpus", [])) or "none (CPU mode)"
            where = f" on node {result['node']}" if result.get("node", "local") != "local" else ""
            self.stdout.write(f"Created instance '{result.get('instance')}'{where} on port {result.get('port')}, GPUs "
                              f"{gpus}. Start it with: python manage.py instances start {result.get('instance')}")
        else:
            self.stdout.write(f"Restored {', '.join(result.get('restored', [])) or 'nothing'}; to undo, restore "
                              f"snapshot {result.get('undo_snapshot')}.")
            for note in result.get("notes", []):
                self.stdout.write(f"  {note}")

    def import_manager(self, options):
        instance = find_instance(options["instance_id"])
        raw = cli.read_input(options["file"], binary=True)
        try:
            data = jsonlimits.loads(raw, what=f"The snapshot file {options['file']}")
        except jsonlimits.JSONInputError as exc:
            raise input_error({"file": [str(exc)]}) from exc
        operation = cli.call_service(services.snapshot_import_manager, instance=instance, data=data)
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None:
            for item in (done.result or {}).get("installed", []):
                self.stdout.write(f"  {item['url']}: {item['result']}")

    # --- At once ------------------------------------------------------------------------------------------

    def list_snapshots(self, options):
        snapshots = Snapshot.objects.select_related("instance")
        if options["instance_id"]:
            instance_id = options["instance_id"]
            if not (Instance.objects.filter(instance_id=instance_id).exists()
                    or Snapshot.objects.filter(instance_label=instance_id).exists()):
                find_instance(instance_id)  # names the known ones
            snapshots = snapshots.filter(instance_label=instance_id)
        snapshots = list(snapshots)
        if options["json"]:
            self.write_json([snapshot_data(s) for s in snapshots])
            return
        if not snapshots:
            self.stdout.write("No snapshots yet. Take one with: python manage.py snapshots create ID")
            return
        rows = [("SNAPSHOT", "INSTANCE", "KIND", "SIZE", "CREATED", "NOTE")]
        for snapshot in snapshots:
            instance = snapshot.instance_label + ("" if snapshot.instance_id else " (deleted)")
            kind = snapshot.kind + ("+output" if snapshot.include_output else "")
            note = snapshot.note or (f"({snapshot.automatic})" if snapshot.automatic else "-")
            rows.append((snapshot.pk, instance, kind, human_size(snapshot.size), local_time(snapshot.created_at),
                         note))
        self.write_table(rows)

    def delete(self, options):
        snapshot = find_snapshot(options["snapshot"])
        if not options["yes"]:
            raise CommandError(f"This deletes snapshot {snapshot.pk} and its archive {snapshot.archive} for good; add "
                               "--yes to confirm.", returncode=EXIT_INPUT)
        archive = snapshot.archive
        services.snapshot_delete(snapshot=snapshot)
        self.stdout.write(f"Deleted snapshot {options['snapshot']} and its archive {archive}.")

    def export_manager(self, options):
        snapshot = find_snapshot(options["snapshot"])
        data = services.snapshot_export_manager(snapshot=snapshot)
        if cli.write_output(self, options["file"], json.dumps(data, indent=2) + "\n"):
            self.stdout.write(f"Wrote {len(data['git_custom_nodes']) + len(data['file_custom_nodes'])} custom "
                              f"node(s) to {options['file']}.")


def find_snapshot(number: str) -> Snapshot:
    number = number.strip()
    snapshot = Snapshot.objects.select_related("instance__node").filter(pk=int(number)).first() \
        if number.isascii() and number.isdigit() and len(number) <= 18 else None
    if snapshot is None:
        known = list(Snapshot.objects.values_list("pk", flat=True)[:KNOWN_SHOWN + 1])
        raise cli.unknown("snapshot", number, known[:KNOWN_SHOWN] + (["..."] if len(known) > KNOWN_SHOWN else []))
    return snapshot


def snapshot_data(snapshot: Snapshot) -> dict:
    """The documented JSON of one snapshot (docs/cli.md); add keys, never rename or remove them."""
    return {
        "id": snapshot.pk,
        "instance": snapshot.instance_label,
        "instance_exists": snapshot.instance_id is not None,
        "kind": snapshot.kind,
        "include_output": snapshot.include_output,
        "size": snapshot.size,
        "sha256": snapshot.sha256,
        "created_at": iso(snapshot.created_at),
        "note": snapshot.note,
        "automatic": snapshot.automatic,
        "archive": snapshot.archive,
    }
