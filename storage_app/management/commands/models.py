"""`manage.py models`: the shared model library from a shell, through the same services as the models page.

scan, verify and promote run as operations and are followed until they end; the rest read or write at once. The
`--json` output and the exit codes are a contract, documented in docs/cli.md.
"""
from __future__ import annotations

import argparse

from django.core.management.base import CommandError

from comfyhub import cli
from comfyhub.cli import EXIT_FAILED, find_instance, human_size, input_error, iso, local_time
from instances.models import Instance
from instances import remote
from storage_app import checks, library, services
from storage_app.models import ModelAsset


class Command(cli.Command):
    help = "Scan, verify and list the shared model library; expected hashes, inboxes, duplicates (see docs/cli.md)."
    handlers = {"scan": "scan", "verify": "verify", "list": "list_models", "import-hashes": "import_hashes",
                "export-hashes": "export_hashes", "inbox": "show_inbox", "promote": "promote",
                "duplicates": "show_duplicates", "cache": "model_cache"}

    def create_parser(self, prog_name, subcommand, **kwargs):
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                action.choices["cache"].__class__ = _IntermixedParser
        return parser

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
        waiting = cli.waiting_options()

        actions.add_parser("scan", parents=[waiting],
                           help="Record new, changed and missing files under shared/models (no hashing).")
        verify = actions.add_parser("verify", parents=[waiting],
                                    help="Scan, then hash the files that changed since they were last hashed; with "
                                         "--node, check that node's copy of the library against these hashes.")
        verify.add_argument("--full", action="store_true", help="Hash every file again, changed or not.")
        verify.add_argument("--node", default=None, metavar="NODE",
                            help="Run on NODE's agent: each library file ok, differs or missing in its shared "
                                 "library.")

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

        # One parser with ACTION as a word (not nested sub-commands): `models cache warm ...`.
        cache = actions.add_parser("cache", parents=[waiting],
                                   help="This node's model cache: warm FILE... | --for-instance ID | --workflow FILE; "
                                        "status; check.")
        cache.add_argument("cache_action", metavar="ACTION", help="warm, status or check.")
        cache.add_argument("files", nargs="*", metavar="FILE",
                           help="warm: library files to copy, e.g. models/checkpoints/sdxl.safetensors.")
        cache.add_argument("--node", default="", metavar="NODE",
                           help="The node whose cache (default: this node, NODE_NAME; with --for-instance, the "
                                "instance's). Another node's warm and check run on its agent; its status is what "
                                "its agent last recorded.")
        cache.add_argument("--for-instance", default=None, metavar="ID",
                           help="warm: the model files the instance's workflows name.")
        cache.add_argument("--workflow", default=None, metavar="FILE",
                           help="warm: the model files this workflow JSON names ('-' for stdin).")
        cache.add_argument("--json", action="store_true", help="status: one JSON object (see docs/cli.md).")

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
        if options["node"] is not None:
            return self.verify_node(options)
        operation = cli.call_service(services.models_verify, full=options["full"])
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None:
            result = done.result or {}
            self.stdout.write(f"{result.get('hashed', 0)} file(s) hashed ({human_size(result.get('bytes', 0))}), "
                              f"{result.get('skipped', 0)} unchanged since last verified.")
            self.write_problems(result.get("problems", []))

    def verify_node(self, options):
        operation = cli.call_service(services.models_verify_node, node_name=options["node"], full=options["full"])
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None:
            self.write_node_check(done.result or {})

    def write_node_check(self, result):
        counts = result.get("counts", {})
        self.stdout.write(f"Node {result.get('node')}: {result.get('checked', 0)} file(s) checked, "
                          f"{result.get('hashed', 0)} hashed ({human_size(result.get('bytes', 0))}), "
                          f"{result.get('skipped', 0)} unchanged since last checked: "
                          + ", ".join(f"{counts.get(status, 0)} {status}" for status in NODE_STATUSES) + ".")

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

    def model_cache(self, options):
        action = options["cache_action"]
        if action not in CACHE_ACTIONS:
            shown = action if len(action) <= 40 and action.isprintable() else f"{action[:40]!r}"
            raise input_error({"action": [f"'{shown}' is not a cache action; use warm, status or check."]})
        if action != "warm":
            given = [name for name, value in (("FILE", options["files"]), ("--for-instance", options["for_instance"]),
                                              ("--workflow", options["workflow"])) if value not in (None, [])]
            if given:
                raise input_error({"action": [f"cache {action} takes no {', '.join(given)}; those are for warm."]})
        getattr(self, CACHE_ACTIONS[action])(options)

    def cache_warm(self, options):
        instance = find_instance(options["for_instance"]) if options["for_instance"] is not None else None
        workflow = cli.read_input(options["workflow"], field="workflow", binary=True) \
            if options["workflow"] is not None else None
        operation = cli.call_service(services.model_cache_warm, node_name=options["node"], paths=options["files"],
                                     instance=instance, workflow=workflow)
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None:
            result = done.result or {}
            self.stdout.write(f"{len(result.get('copied', []))} file(s) copied "
                              f"({human_size(result.get('bytes_copied', 0))}), {len(result.get('hits', []))} already "
                              f"cached, {len(result.get('evicted', []))} evicted.")
            for path in result.get("not_in_library", []):
                self.stdout.write(f"  not in the shared library: {path}")

    def cache_check(self, options):
        operation = cli.call_service(services.model_cache_check, node_name=options["node"])
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None:
            result = done.result or {}
            self.stdout.write(f"{result.get('checked', 0)} cached file(s) hashed, {len(result.get('dropped', []))} "
                              "dropped.")
            for path, reason in result.get("dropped", []):
                self.stdout.write(f"  dropped: {path}: {reason}")

    def cache_status(self, options):
        status = cli.call_service(services.model_cache_status, node_name=options["node"])
        if options["json"]:
            self.write_json(cache_status_data(status))
            return
        if status["configured"] is None:
            self.stdout.write(f"Node '{status['node']}' has not reported its model cache yet: its agent records it "
                              f"after a warm or a check there (models cache check --node {status['node']}).")
            return
        if not status["configured"]:
            self.stdout.write(f"Node '{status['node']}' has no model cache (MODEL_CACHE_PATH is empty).")
            return
        last_warm, last_check = status["last_warm"] or {}, status["last_check"] or {}
        self.stdout.write(f"Model cache of node '{status['node']}' at {status['path']}: {status['files']} file(s), "
                          f"{human_size(status['bytes'])} of {human_size(status['limit_bytes'])} "
                          f"({status['percent']}%).")
        self.stdout.write(f"Last warm: {last_warm.get('at', 'never')}; last check: {last_check.get('at', 'never')}."
                          + (f" As its agent recorded it at {iso(status['reported_at'])}." if status.get("reported_at")
                             else ""))
        if status["entries"]:
            rows = [("PATH", "SIZE", "LAST USED")]
            rows += [(entry["path"], human_size(entry["size"]), entry["last_used_at"]) for entry in status["entries"]]
            self.write_table(rows)
        for dropped in status["dropped"]:
            self.stdout.write(f"  dropped {dropped['at']}: {dropped['path']}: {dropped['reason']}")

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
        # Each inbox is read on its instance's node: another node's by its agent (instances.remote).
        if options["instance_id"]:
            instance = find_instance(options["instance_id"])
            try:
                found, problems = [(instance, checks.instance_inbox(instance))], []
            except remote.NodeReadError as exc:
                raise CommandError(f"The inbox of {instance} (on node {instance.node.name}) could not be read: {exc}",
                                   returncode=EXIT_FAILED) from exc
        else:
            found, problems = checks.inboxes(list(Instance.objects.select_related("node").order_by("instance_id")))
        items = [{"instance": instance.instance_id, **item} for instance, inbox in found for item in inbox]
        if options["json"]:
            self.write_json(items)
        elif not items and not problems:
            self.stdout.write("No files in " + (f"{found[0][0]}'s inbox." if options["instance_id"]
                                                else "any instance's inbox."))
        elif items:
            rows = [("INSTANCE", "PATH", "FOLDER", "SIZE", "PROBLEM")]
            for item in items:
                rows.append((item["instance"], item["path"], item["folder"], human_size(item["size"]),
                             item["problem"] or "-"))
            self.write_table(rows)
        if problems:
            # What could be read is shown; a node that could not be asked fails the command (its inboxes are unknown).
            raise CommandError("\n".join(problems), returncode=EXIT_FAILED)

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


class _IntermixedParser(cli.InputParser):
    """`cache warm --node N FILE...`: argparse ends the positional arguments at the first option; files may follow
    options here."""

    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "_intermixing", False):
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


CACHE_ACTIONS = {"warm": "cache_warm", "status": "cache_status", "check": "cache_check"}
NODE_STATUSES = ("ok", "differs", "missing", "unreadable")


def cache_status_data(status: dict) -> dict:
    """The documented JSON of `models cache status` (docs/cli.md); add keys, never rename or remove them."""
    reported_at = iso(status["reported_at"]) if status.get("reported_at") else None
    if not status["configured"]:
        return {"node": status["node"], "configured": status["configured"], "reported_at": reported_at}
    return {**{key: status[key] for key in ("node", "configured", "path", "files", "bytes", "limit_bytes",
                                            "last_warm", "last_check", "dropped", "entries")},
            "reported_at": reported_at}


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
