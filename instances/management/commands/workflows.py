"""`manage.py workflows`: instances' workflow files and the shared workflow library, through the same services as the
workflow pages.

copy and install run as operations and are followed until they end. The `--json` output and the exit codes are a
contract, documented in docs/cli.md.
"""
from __future__ import annotations

import datetime
import re
from pathlib import Path

from django.core.management.base import CommandError

from comfyhub import cli
from comfyhub.cli import EXIT_FAILED, find_instance, find_instances, human_size, input_error, iso, local_time
from django.core.exceptions import ValidationError

from instances import services, workflows
from instances.models import WorkflowEntry

INSTANCE_WORKFLOW = re.compile(r"^(?P<instance>[a-z0-9][a-z0-9-]*):(?P<path>.+)$")


class Command(cli.Command):
    help = "List, copy, check, publish and install workflows; the shared workflow library (see docs/cli.md)."
    handlers = {"list": "list_workflows", "copy": "copy", "check": "check_workflow", "publish": "publish",
                "install": "install", "library": "show_library"}

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
        waiting = cli.waiting_options()

        listing = actions.add_parser("list", help="An instance's workflow files.")
        listing.add_argument("instance_id", metavar="ID")
        listing.add_argument("--json", action="store_true", help="A JSON list of objects (see docs/cli.md).")

        copy = actions.add_parser("copy", parents=[waiting], help="Copy workflow files from one instance to others.")
        copy.add_argument("source", metavar="SRC", help="The instance to copy from.")
        copy.add_argument("targets", nargs="+", metavar="DST", help="The instances to copy to.")
        which = copy.add_mutually_exclusive_group()
        which.add_argument("--name", action="append", default=[], dest="paths", metavar="PATH",
                           help="A workflow, relative to the workflows folder (e.g. portraits/a.json); repeat for "
                                "each.")
        which.add_argument("--all", action="store_true", dest="all_workflows",
                           help="Every workflow file of SRC (links are never copied); not with --name.")
        copy.add_argument("--on-conflict", default="skip", metavar="POLICY",
                          help="When the target has the file: skip (the default), overwrite, or rename (a.json "
                               "becomes 'a (2).json').")

        check = actions.add_parser("check", help="What an instance lacks to run a workflow: node types and models.")
        check.add_argument("instance_id", metavar="ID", help="The instance that should run it.")
        check.add_argument("file", metavar="FILE",
                           help="A workflow file on disk, '-' for stdin, or OTHER:PATH for a workflow of instance "
                                "OTHER (e.g. studio:portraits/a.json).")
        check.add_argument("--json", action="store_true", help="A JSON object (see docs/cli.md).")

        publish = actions.add_parser("publish", help="Publish an instance's workflow into the shared library.")
        publish.add_argument("instance_id", metavar="ID")
        publish.add_argument("name", metavar="NAME", help="The library name.")
        publish.add_argument("--path", default="", metavar="PATH",
                             help="The workflow file, relative to the workflows folder (default: NAME.json).")

        install = actions.add_parser("install", parents=[waiting],
                                     help="Write a library workflow into instances (as NAME.json).")
        install.add_argument("spec", metavar="NAME[@VERSION]", help="A library name; @VERSION for an older version.")
        install.add_argument("instance_ids", nargs="+", metavar="ID")

        library = actions.add_parser("library", help="The shared library: entries, versions and who holds them.")
        library.add_argument("--json", action="store_true", help="A JSON list of objects (see docs/cli.md).")

    # --- Operations ---------------------------------------------------------------------------------------

    def copy(self, options):
        source = find_instance(options["source"])
        targets = find_instances(options["targets"])
        operation = cli.call_service(services.workflows_copy, source=source, targets=targets, paths=options["paths"],
                                     all_workflows=options["all_workflows"], on_conflict=options["on_conflict"])
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None:
            result = done.result or {}
            for item in result.get("files", []):
                target = f" -> {item['target']}" if item["target"] else ""
                self.stdout.write(f"  {item['path']}{target}: {item['result']}")
            self.stdout.write(f"{result.get('copied', 0)} copied, {result.get('skipped', 0)} skipped, "
                              f"{result.get('failed', 0)} failed.")

    def install(self, options):
        instances = find_instances(options["instance_ids"])
        operation = cli.call_service(services.workflow_install, spec=options["spec"], instances=instances)
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None:
            for item in (done.result or {}).get("installs", []):
                self.stdout.write(f"  {item['instance']}: {item['result']} ({item['path']})")

    # --- At once ------------------------------------------------------------------------------------------

    def list_workflows(self, options):
        instance = find_instance(options["instance_id"])
        try:
            found = [workflow_data(item) for item in workflows.list_workflows(instance)]
        except workflows.WorkflowError as exc:
            raise CommandError(f"The workflows of {instance} cannot be listed: {exc}") from exc
        if options["json"]:
            self.write_json(found)
            return
        if not found:
            self.stdout.write(f"No workflows in {workflows.workflows_dir(instance)}.")
            return
        rows = [("PATH", "SIZE", "MODIFIED")]
        for item in found:
            modified = local_time(datetime.datetime.fromisoformat(item["modified"]))
            rows.append((item["path"] + (" (link, not followed)" if item["symlink"] else ""),
                         human_size(item["size"]), modified))
        self.write_table(rows)

    def check_workflow(self, options):
        instance = find_instance(options["instance_id"])
        raw = self.read_workflow_argument(options["file"])
        try:
            report = services.workflow_check(instance=instance, raw=raw)
        except ValidationError as exc:
            raise input_error({"file": [f"{options['file']}: {' '.join(exc.messages)}"]}) from exc
        lacking = bool(report["missing_node_types"] or report["missing_models"])
        if options["json"]:
            self.write_json({"instance": instance.instance_id, "file": options["file"], "ready": not lacking,
                             **report})
        else:
            self.write_check(instance, options["file"], report)
        if lacking:
            raise CommandError(f"{instance} lacks what this workflow needs (see above).", returncode=EXIT_FAILED)

    def read_workflow_argument(self, name: str) -> bytes:
        """A path on disk, '-' for stdin, or OTHER:PATH naming a workflow of another instance."""
        match = INSTANCE_WORKFLOW.fullmatch(name)
        if name == cli.STDIO or Path(name).exists() or match is None:
            return cli.read_input(name, binary=True)
        other = find_instance(match["instance"])
        try:
            return workflows.read_workflow(other, match["path"])
        except workflows.WorkflowError as exc:
            raise input_error({"file": [f"{other}: {exc}"]}) from exc

    def write_check(self, instance, name, report):
        write = self.stdout.write
        write(f"{name} ({report['format']} format) on instance '{instance}':")
        types = report["node_types"]
        if not report["node_types_known"]:
            write(f"  node types: {len(types)} used; which {instance} offers is unknown until it has run once.")
        elif report["missing_node_types"]:
            write(f"  node types: {len(types)} used; {instance} lacks {len(report['missing_node_types'])}:")
            for kind in report["missing_node_types"]:
                write(f"    {kind}")
        else:
            write(f"  node types: {len(types)} used, all offered by {instance}.")
        missing = report["missing_models"]
        if missing:
            write(f"  models: {len(report['models'])} named; {len(missing)} missing:")
            for model in missing:
                near = f" (near: {', '.join(model['near'])})" if model["near"] else ""
                write(f"    {model['folder']}/{model['name']}{near}")
        else:
            write(f"  models: {len(report['models'])} named, all present.")
        write(f"  models {report['models_source']}.")

    def publish(self, options):
        instance = find_instance(options["instance_id"])
        path = options["path"] or f"{options['name']}.json"
        version, created = cli.call_service(services.workflow_publish, instance=instance, path=path,
                                            name=options["name"])
        if created:
            self.stdout.write(f"Published {instance}:{path} as {version}.")
        else:
            self.stdout.write(f"The library already has this content as {version}; nothing new was published.")

    def show_library(self, options):
        entries = list(WorkflowEntry.objects.prefetch_related("versions__author"))
        data = [entry_data(entry) for entry in entries]
        if options["json"]:
            self.write_json(data)
            return
        if not data:
            self.stdout.write("The workflow library is empty. Publish with: python manage.py workflows publish ID NAME")
            return
        for entry in data:
            self.stdout.write(f"{entry['name']}  latest {entry['latest']}, {len(entry['versions'])} version(s)")
            for version in entry["versions"]:
                created = local_time(datetime.datetime.fromisoformat(version["created_at"]))
                self.stdout.write(f"  @{version['number']}  {created}  from {version['published_from'] or '-'}")
            for holder in entry["holders"]:
                held = f"@{holder['version']}" if holder["version"] else "-"
                self.stdout.write(f"  held by {holder['instance']}:{holder['path']}  {held} ({holder['state']})")


def workflow_data(item: dict) -> dict:
    """The documented JSON of one workflow file (docs/cli.md); add keys, never rename or remove them."""
    modified = datetime.datetime.fromtimestamp(item["modified"], tz=datetime.timezone.utc)
    return {"path": item["path"], "size": item["size"], "modified": modified.isoformat(), "symlink": item["symlink"]}


def entry_data(entry: WorkflowEntry) -> dict:
    versions = sorted(entry.versions.all(), key=lambda v: -v.number)
    return {
        "name": entry.name,
        "created_at": iso(entry.created_at),
        "latest": versions[0].number if versions else None,
        "versions": [{"number": v.number, "sha256": v.sha256, "published_from": v.published_from,
                      "author": v.author.get_username() if v.author else "", "created_at": iso(v.created_at)}
                     for v in versions],
        "holders": workflows.holders(entry),
    }
