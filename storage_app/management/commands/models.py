"""`manage.py models`: the shared model library from a shell, through the same services as the models page.

scan, verify and promote run as operations and are followed until they end; the rest read or write at once. The
`--json` output and the exit codes are a contract, documented in docs/cli.md.
"""
from __future__ import annotations

from comfyhub import cli
from comfyhub.cli import find_instance, human_size, input_error, iso, local_time
from instances.models import Instance
from storage_app import library, services
from storage_app.models import ModelAsset


class Command(cli.Command):
    help = "Scan, verify and list the shared model library; expected hashes, inboxes, duplicates (see docs/cli.md)."
    handlers = {"scan": "scan", "verify": "verify", "list": "list_models", "import-hashes": "import_hashes",
                "export-hashes": "export_hashes", "inbox": "show_inbox", "promote": "promote",
                "duplicates": "show_duplicates"}

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
        waiting = cli.waiting_options()

        actions.add_parser("scan", parents=[waiting],
                           help="Record new, changed and missing files under shared/models (no hashing).")
        verify = actions.add_parser("verify", parents=[waiting],
                                    help="Scan, then hash the files that changed since they were last hashed.")
        verify.add_argument("--full", action="store_true", help="Hash every file again, changed or not.")

        listing = actions.add_parser("list", help="The library's files, one line each.")
        listing.add_argument("--json", action="store_true", help="A JSON list of objects (see docs/cli.md).")
        listing.add_argument("--folder", default="", metavar="FOLDER",
                             help="Only this ComfyUI model folder (checkpoints, loras, ...).")
        listing.add_argument("--status", default="", metavar="STATUS",
                             help=f"Only files with this status ({', '.join(ModelAsset.Status.values)}).")

        importing = actions.add_parser("import-hashes",
                                       help="Expected SHA-256s from a file in sha256sum format ('-' for stdin).")
        importing.add_argument("file", metavar="FILE")
        exporting = actions.add_parser("export-hashes",
                                       help="The library's SHA-256s in sha256sum format into FILE ('-' for stdout).")
        exporting.add_argument("file", metavar="FILE")

        inbox = actions.add_parser("inbox", help="Model files nodes downloaded into instances' own models/ folders.")
        inbox.add_argument("instance_id", nargs="?", metavar="ID", help="Only this instance (default: all).")
        inbox.add_argument("--json", action="store_true", help="A JSON list of objects (see docs/cli.md).")

        promote = actions.add_parser("promote", parents=[waiting],
                                     help="Move an inbox file into the shared library (never overwriting).")
        promote.add_argument("instance_id", metavar="ID")
        promote.add_argument("path", metavar="PATH", help="Relative to the instance's models/ folder, e.g. "
                                                          "loras/new.safetensors.")

        duplicates = actions.add_parser("duplicates", help="Files with the same content, and the space they waste.")
        duplicates.add_argument("--json", action="store_true", help="A JSON list of objects (see docs/cli.md).")

    # --- Operations ---------------------------------------------------------------------------------------

    def scan(self, options):
        operation = cli.call_service(services.models_scan)
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None:
            result = done.result or {}
            self.stdout.write(f"{result.get('new', 0)} new, {result.get('changed', 0)} changed, "
                              f"{result.get('missing', 0)} missing, {result.get('unchanged', 0)} unchanged.")
            self.write_problems(result.get("problems", []))

    def verify(self, options):
        operation = cli.call_service(services.models_verify, full=options["full"])
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None:
            result = done.result or {}
            self.stdout.write(f"{result.get('hashed', 0)} file(s) hashed ({human_size(result.get('bytes', 0))}), "
                              f"{result.get('skipped', 0)} unchanged since last verified.")
            self.write_problems(result.get("problems", []))

    def write_problems(self, problems):
        for problem in problems:
            self.stdout.write(f"  problem: {problem['path']}: {problem['reason']}")

    def promote(self, options):
        instance = find_instance(options["instance_id"])
        operation = cli.call_service(services.models_promote, instance=instance, path=options["path"])
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None:
            result = done.result or {}
            if result.get("result") == "moved":
                self.stdout.write(f"Moved into the shared library as {result.get('path')}.")
            elif result.get("result") == "linked":
                self.stdout.write(f"The library already had this content as {result.get('same_as')}; "
                                  f"{result.get('path')} is now a hard link to it and the inbox copy was dropped.")
            else:
                self.stdout.write(f"The library already had this content as {result.get('path')}; the inbox copy "
                                  "was dropped.")

    # --- Reading and writing at once ----------------------------------------------------------------------

    def list_models(self, options):
        assets = ModelAsset.objects.all()
        if options["status"]:
            if options["status"] not in ModelAsset.Status.values:
                raise input_error({"status": [f"'{options['status']}' is not a status; use one of "
                                              f"{', '.join(ModelAsset.Status.values)}."]})
            assets = assets.filter(status=options["status"])
        if options["folder"]:
            assets = assets.filter(folder=options["folder"])
        assets = list(assets)
        if options["json"]:
            self.write_json([asset_data(asset) for asset in assets])
            return
        if not assets:
            self.stdout.write("No model files recorded" + (" that match." if options["status"] or options["folder"]
                                                           else ". Record them with: python manage.py models scan"))
            return
        rows = [("PATH", "FOLDER", "SIZE", "STATUS", "HASH", "ARCHITECTURE", "VERIFIED")]
        for asset in assets:
            rows.append((asset.path, asset.folder, human_size(asset.size), asset.status, asset.short_hash or "-",
                         asset.architecture or "-", local_time(asset.last_verified_at)))
        self.write_table(rows)

    def import_hashes(self, options):
        text = cli.read_input(options["file"])
        result = cli.call_service(services.models_import_hashes, text=text)
        self.stdout.write(f"matched {result['matched']}: expected hashes recorded (the next verify compares).")
        self.stdout.write(f"unknown {len(result['unknown'])}" + (": no such file in the library" if result["unknown"]
                                                                  else ""))
        for path in result["unknown"]:
            self.stdout.write(f"  {path}")
        self.stdout.write(f"bad {len(result['bad'])}" + (": not in sha256sum format" if result["bad"] else ""))
        for line in result["bad"]:
            self.stdout.write(f"  {line}")

    def export_hashes(self, options):
        text = services.models_export_hashes()
        if cli.write_output(self, options["file"], text):
            self.stdout.write(f"Wrote {len(text.splitlines())} hash(es) to {options['file']}.")

    def show_inbox(self, options):
        if options["instance_id"]:
            instances = [find_instance(options["instance_id"])]
        else:
            instances = list(Instance.objects.select_related("node"))
        items = [{"instance": instance.instance_id, **item} for instance in instances
                 for item in library.inbox(instance)]
        if options["json"]:
            self.write_json(items)
            return
        if not items:
            self.stdout.write("No files in " + (f"{instances[0]}'s inbox." if options["instance_id"]
                                                else "any instance's inbox."))
            return
        rows = [("INSTANCE", "PATH", "FOLDER", "SIZE", "PROBLEM")]
        for item in items:
            rows.append((item["instance"], item["path"], item["folder"], human_size(item["size"]),
                         item["problem"] or "-"))
        self.write_table(rows)

    def show_duplicates(self, options):
        groups = library.duplicates()
        if options["json"]:
            self.write_json(groups)
            return
        if not groups:
            self.stdout.write("No duplicates: every hashed file has content of its own.")
            return
        for group in groups:
            self.stdout.write(f"{group['sha256'][:10].upper()}  {len(group['paths'])} copies of "
                              f"{human_size(group['size'])}, {human_size(group['wasted'])} wasted")
            for path in group["paths"]:
                self.stdout.write(f"  {path}")
        self.stdout.write(f"In all {human_size(sum(g['wasted'] for g in groups))} wasted in {len(groups)} group(s).")


def asset_data(asset: ModelAsset) -> dict:
    """The documented JSON of one library file (docs/cli.md); add keys, never rename or remove them."""
    return {
        "path": asset.path,
        "folder": asset.folder,
        "size": asset.size,
        "status": asset.status,
        "status_reason": asset.status_reason,
        "sha256": asset.sha256,
        "short_hash": asset.short_hash,
        "blake3": asset.blake3,
        "expected_sha256": asset.expected_sha256,
        "expected_source": asset.expected_source,
        "architecture": asset.architecture,
        "last_verified_at": iso(asset.last_verified_at),
        "evidence": list(asset.evidence),
    }
