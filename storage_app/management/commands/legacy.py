"""`manage.py legacy plan|migrate --from PATH`: bring a single-instance install into the multi-instance layout.
Exit codes: 0 done (also a rerun that finishes an interrupted migration), 1 the migration stopped partway (run it
again: it resumes), 2 refused before anything moved (a bad source, id or mode)."""
import json

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from comfyhub.cli import human_size
from comfyhub.operations import OperationError
from storage_app import services


class Command(BaseCommand):
    help = "Plan or run the migration of a single-instance ComfyUI install (./data or a ComfyUI folder)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        for name, text in (("plan", "show what would move where, and every conflict; moves nothing"),
                           ("migrate", "carry it out (resumable: run it again after an interruption)")):
            command = sub.add_parser(name, help=text)
            command.add_argument("--from", dest="source", required=True, help="the legacy folder")
            command.add_argument("--instance-id", default="", help="the instance to create (default COMFY_INSTANCE_ID)")
            command.add_argument("--mode", choices=("move", "copy"), default="move",
                                 help="move (default; renames on one filesystem) or copy (keeps the source)")
            if name == "plan":
                command.add_argument("--json", action="store_true", help="machine-readable plan")

    def handle(self, *args, **options):
        try:
            if options["action"] == "plan":
                return self.plan(options)
            return self.migrate(options)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages), returncode=2) from exc
        except OperationError as exc:
            raise CommandError(f"{exc} Run the same command again to resume.", returncode=1) from exc

    def plan(self, options):
        plan = services.legacy_plan(source=options["source"], instance_id=options["instance_id"],
                                    mode=options["mode"])
        if options["json"]:
            self.stdout.write(json.dumps(plan.as_dict(), indent=2))
            return
        self.stdout.write(f"Source: {plan.source} ({plan.layout}); instance '{plan.instance_id}'; mode {plan.mode}")
        for group, totals in plan.totals().items():
            self.stdout.write(f"  {group:24} {totals['files']:7} file(s) {human_size(totals['bytes']):>12}"
                              f"  ({totals['deduplicated']} deduplicated, {totals['renamed']} renamed)")
        for folder in plan.not_carried:
            self.stdout.write(f"  not carried: {folder} (temporary files)")
        for conflict in plan.conflicts:
            where = conflict.get("renamed_to") or conflict.get("destination") or conflict.get("target", "")
            self.stdout.write(f"  {conflict['kind']}: {conflict['path']} -> {where} ({conflict['resolution']})")
        for item in plan.reports:
            self.stdout.write(f"  {item['kind']}: {item['path']} ({item['note']})")
        if plan.previous:
            self.stdout.write(_previous_line(plan.previous))
        if not plan.entries:
            self.stdout.write("Nothing to carry.")

    def migrate(self, options):
        report = _Printer(self.stdout)
        result = services.legacy_migrate_now(source=options["source"], instance_id=options["instance_id"],
                                             mode=options["mode"], report=report)
        if result["previous"]:
            self.stdout.write(_previous_line(result["previous"]))
        for refused in result["refused"]:
            self.stdout.write(self.style.WARNING(f"  left in place: {refused['path']}: {refused['reason']}"))
        self.stdout.write(self.style.SUCCESS(
            f"Done: {result['moved']} moved, {result['copied']} copied, {result['deduplicated']} deduplicated, "
            f"{result['renamed']} renamed ({human_size(result['bytes'])}); "
            f"{result['recovered']} recovered from an interrupted run."))
        self.stdout.write(f"Instance '{result['instance']}' is registered on port {result['port']}: "
                          f"python manage.py instances start {result['instance']}")
        self.stdout.write(f"Journal: {result['journal']}\nReport: {result['report']}")


def _previous_line(previous: dict) -> str:
    if previous["unfinished"]:
        return (f"Resuming an interrupted migration (started {previous['started_at'][:19]}): "
                f"{previous['files_done']} file(s) were already carried by it.")
    return (f"Migrated before (finished {previous['finished_at'][:19]}): {previous['files_done']} file(s) already "
            "carried.")


class _Printer:
    """The `report` a job would get, printing instead of recording."""

    def __init__(self, out):
        self.out = out
        self.last = -10

    def log(self, message, level="INFO"):
        self.out.write(f"  {message}")

    def progress(self, percent, message=None):
        if percent - self.last >= 10 or percent >= 100:
            self.last = percent
            self.out.write(f"[{int(percent):3d}%] {message or ''}")
