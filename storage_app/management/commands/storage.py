"""`manage.py storage check [--fix] [--json]`: storage validation."""
import json

from django.core.management.base import BaseCommand

from storage_app.checks import check_storage


class Command(BaseCommand):
    help = "Check the storage folders against the registry; --fix applies only the safe fixes."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        check = sub.add_parser("check", help="list findings, each with how to fix it")
        check.add_argument("--fix", action="store_true", help="create missing folders, rewrite generated files")
        check.add_argument("--json", action="store_true")

    def handle(self, *args, **options):
        findings = check_storage(fix=options["fix"])
        if options["json"]:
            self.stdout.write(json.dumps([f.as_dict() for f in findings], indent=2))
        elif not findings:
            self.stdout.write(self.style.SUCCESS("Storage is consistent: no findings."))
        else:
            for finding in findings:
                state = " [fixed]" if finding.fixed else (" [fixable with --fix]" if finding.fixable else "")
                self.stdout.write(f"{finding.code} ({finding.subject}){state}: {finding.message}\n  fix: {finding.fix}")
        remaining = [f for f in findings if not f.fixed]
        if remaining:
            raise SystemExit(1)
