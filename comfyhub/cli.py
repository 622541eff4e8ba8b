"""What every `manage.py` command of ComfyHub shares: exit codes, errors a person reads, finding rows by the names
people type, and following an Operation until it ends (docs/cli.md describes the behaviour; it is a contract).

A command subclasses `Command`, whose `handle` dispatches to a method per sub-command; the methods call one service
through `call_service` and, for an operation, `follow` it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.template.defaultfilters import filesizeformat
from django.utils import timezone

from comfyhub import queues
from comfyhub.models import Operation

EXIT_FAILED = 1  # the operation failed or was cancelled, Redis or the Docker engine does not answer
EXIT_INPUT = 2  # bad input: unknown instance, a field the services refuse, a refused confirmation
EXIT_NO_WORKER = 3  # the operation stays queued: no RQ worker listens on its queue
EXIT_WAIT_TIMEOUT = 4  # gave up waiting (--timeout); the operation goes on
EXIT_INTERRUPTED = 130  # Ctrl-C while waiting; the operation goes on

POLL_SECONDS = 0.5
WORKER_CHECK_SECONDS = 2.0
DEFAULT_TIMEOUT = 900
DROPPED_LINES = re.compile(r"^\.\.\. (\d+) earlier lines dropped$")
STDIO = "-"
ARG_HELP = (
    "An extra ComfyUI argument; repeat for each. Values starting with '-' must be joined with '=': "
    "--arg=--preview-method --arg=auto."
)


def waiting_options() -> argparse.ArgumentParser:
    """--no-wait and --timeout, as a parent parser for every sub-command that runs an operation."""
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--no-wait", action="store_true",
                         help="Print the operation id and return at once instead of following the operation.")
    waiting.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                         help=f"Give up waiting after this many seconds (default {DEFAULT_TIMEOUT}; the operation "
                              "goes on).")
    return waiting


class InputParser(CommandParser):
    """Argument errors are bad input, exit code 2, also through call_command() (Django's parser says 1 there; on the
    command line argparse itself exits 2)."""

    def error(self, message):
        if self.called_from_command_line:
            super().error(message)
        raise CommandError(f"Error: {message}", returncode=EXIT_INPUT)

    def parse_known_args(self, args=None, namespace=None):
        # Only call_command() can pass a NUL byte (a shell cannot), and PostgreSQL refuses one in any text it is
        # asked to compare: looking up "bad\x00" would be a DataError there, not "no such instance".
        for arg in args or ():
            if isinstance(arg, str) and "\x00" in arg:
                self.error(f"argument {arg!r} contains a NUL character; remove it.")
        return super().parse_known_args(args, namespace)


def input_errors(parser: CommandParser) -> CommandParser:
    """Make argument errors of `parser` and of its sub-command parsers exit code 2 (BaseCommand builds plain
    CommandParsers before a command can choose the class)."""
    parser.__class__ = InputParser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                input_errors(sub)
    return parser


class Command(BaseCommand):
    """A command with sub-commands: `handlers` maps each action to the name of the method that runs it."""

    def create_parser(self, prog_name, subcommand, **kwargs):
        return input_errors(super().create_parser(prog_name, subcommand, **kwargs))

    handlers: dict[str, str] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A handler named like a BaseCommand method (`check`, `execute`...) breaks the command line but not
        # call_command(), which skips the system checks: refuse it when the class is made.
        shadowing = sorted(name for name in cls.handlers.values() if hasattr(BaseCommand, name))
        if shadowing:
            raise TypeError(f"{cls.__module__}: handler method(s) {', '.join(shadowing)} shadow BaseCommand's.")

    def execute(self, *args, **options):
        # Django prefixes command-line errors with "CommandError: "; people and scripts read the message itself.
        # call_command() still raises the CommandError, with its returncode.
        try:
            return super().execute(*args, **options)
        except CommandError as exc:
            if not getattr(self, "_called_from_command_line", False) or options.get("traceback"):
                raise
            self.stderr.write(str(exc))
            sys.exit(exc.returncode)
        except BrokenPipeError:
            if not getattr(self, "_called_from_command_line", False):
                raise
            # Output piped into `head` or a pager that quit: stop quietly, as Unix tools do (and keep Python from
            # complaining again when it flushes stdout at exit).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)

    def handle(self, *args, **options):
        getattr(self, self.handlers[options["action"]])(options)

    # --- Output -------------------------------------------------------------------------------------------

    def write_json(self, data):
        self.stdout.write(json.dumps(data, indent=2, ensure_ascii=False))

    def write_table(self, rows: list[tuple]):
        """Columns padded to their widest cell; the last column is not padded."""
        rows = [tuple(str(cell) for cell in row) for row in rows]
        widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
        for row in rows:
            self.stdout.write(("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
                              .rstrip())

    # --- Following an operation -----------------------------------------------------------------------------

    def follow(self, operation: Operation, *, no_wait: bool, timeout: float) -> Operation | None:
        """Print progress and new log lines until the operation ends. Returns the succeeded operation (None with
        --no-wait); raises CommandError with the documented exit code otherwise."""
        if no_wait:
            self.stdout.write(str(operation.pk))
            if queues.workers_listening(operation.queue_name) == 0:
                self.stderr.write(no_worker_message(operation))
            return None
        label = operation_label(operation)
        deadline = time.monotonic() + timeout
        next_worker_check = time.monotonic()
        shown_lines, shown_progress = 0, None
        try:
            # Inside the try: with unbuffered output a person (or a test) may press Ctrl-C as soon as this shows.
            self.stdout.write(f"{label}: operation {operation.pk}")
            while True:
                operation.refresh_from_db()
                shown_lines = self.print_new_lines(operation, shown_lines)
                progress = (operation.progress, operation.progress_message)
                if operation.status != Operation.Status.QUEUED and progress != shown_progress:
                    self.stdout.write(f"[{operation.progress:3d}%] {operation.progress_message}".rstrip())
                    shown_progress = progress
                self.stdout.flush()
                if operation.is_terminal:
                    break
                if operation.status == Operation.Status.QUEUED and time.monotonic() >= next_worker_check:
                    if queues.workers_listening(operation.queue_name) == 0:
                        raise CommandError(no_worker_message(operation), returncode=EXIT_NO_WORKER)
                    next_worker_check = time.monotonic() + WORKER_CHECK_SECONDS
                if time.monotonic() >= deadline:
                    raise CommandError(
                        f"Gave up waiting after {timeout:g} s; operation {operation.pk} is still {operation.status} "
                        f"and goes on. {follow_hint(operation)}", returncode=EXIT_WAIT_TIMEOUT)
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            raise CommandError(f"Stopped waiting; operation {operation.pk} goes on.",
                               returncode=EXIT_INTERRUPTED) from None
        if operation.status == Operation.Status.SUCCEEDED:
            self.stdout.write(f"{label} succeeded.")
            return operation
        outcome = "was cancelled" if operation.status == Operation.Status.CANCELLED else "failed"
        reason = f": {operation.error}" if operation.error else "."
        raise CommandError(f"{label} {outcome} (operation {operation.pk}){reason}", returncode=EXIT_FAILED)

    def print_new_lines(self, operation: Operation, shown: int) -> int:
        """Print the log lines not shown yet; returns how many lines the log has had in all."""
        lines = operation.log_lines
        dropped = 0
        if lines and (match := DROPPED_LINES.match(lines[0])):
            dropped, lines = int(match.group(1)), lines[1:]
        for line in lines[max(0, shown - dropped):]:
            self.stdout.write(f"  {line}")
        return dropped + len(lines)


def operation_label(operation: Operation) -> str:
    kind = operation.get_kind_display()
    return f"{kind} '{operation.target_label}'" if operation.target_label else kind


def follow_hint(operation: Operation) -> str:
    from instances.models import Instance

    if operation.target_type_id == ContentType.objects.get_for_model(Instance).pk and operation.target_label:
        return f"Follow it with: python manage.py instances status {operation.target_label}"
    return f"Follow it on the operations page: {operation.get_absolute_url()}"


def no_worker_message(operation: Operation) -> str:
    queue = operation.queue_name
    if queue.startswith(queues.NODE_QUEUE_PREFIX):
        node = queue[len(queues.NODE_QUEUE_PREFIX):].removesuffix(queues.LONG_SUFFIX)
        return (f"No agent of node '{node}' is listening on queue '{queue}'; start it on that host with "
                f"`python manage.py agent --node {node}`. The operation {operation.pk} stays queued.")
    return (f"No RQ worker is listening on queue '{queue}'; start one with `python manage.py rqworker {queue} "
            f"--with-scheduler` or use `make run`. The operation {operation.pk} stays queued.")


# --- Calling services, errors -----------------------------------------------------------------------------------

def call_service(service, **kwargs):
    """Call one service; its refusals become exit code 2 (`field: message` lines), a silent Redis exit code 1."""
    try:
        return service(**kwargs)
    except queues.QueueUnavailable as exc:
        raise CommandError(str(exc), returncode=EXIT_FAILED) from exc
    except ValidationError as exc:
        raise input_error(exc) from exc


def input_error(errors) -> CommandError:
    """One "field: message" line per problem, exit code 2."""
    if isinstance(errors, ValidationError):
        errors = errors.message_dict if hasattr(errors, "error_dict") else {"error": errors.messages}
    lines = [f"{field}: {message}" for field, messages in errors.items() for message in messages]
    return CommandError("\n".join(lines), returncode=EXIT_INPUT)


def whole_number(value: str, *, low: int, high: int) -> int | None:
    """An integer typed on the command line, from `low` to `high`; None for anything else (the caller says what
    it wanted). Only ASCII digits: '²'.isdigit() is true but int('²') fails."""
    text = (value or "").strip()
    if text.isascii() and text.isdigit() and len(text) <= 18 and low <= int(text) <= high:
        return int(text)
    return None


def unknown(what: str, name, known) -> CommandError:
    """`No instance 'x'. Known: a, b` (exit code 2)."""
    known = ", ".join(str(k) for k in known) or "none"
    return CommandError(f"No {what} '{name}'. Known: {known}", returncode=EXIT_INPUT)


def find_instance(instance_id: str):
    from instances import services
    from instances.models import Instance

    instance = services.instances_with_relations().filter(instance_id=instance_id).first()
    if instance is None:
        raise unknown("instance", instance_id, Instance.objects.values_list("instance_id", flat=True))
    return instance


def find_instances(instance_ids) -> list:
    """Instances in the order given; every unknown id is named (one line each)."""
    from instances import services
    from instances.models import Instance

    found = {i.instance_id: i for i in services.instances_with_relations().filter(instance_id__in=instance_ids)}
    missing = [i for i in dict.fromkeys(instance_ids) if i not in found]
    if missing:
        known = ", ".join(Instance.objects.values_list("instance_id", flat=True)) or "none"
        raise CommandError("\n".join(f"No instance '{i}'. Known: {known}" for i in missing), returncode=EXIT_INPUT)
    return [found[i] for i in dict.fromkeys(instance_ids)]


# --- Files ------------------------------------------------------------------------------------------------------

def read_input(name: str, *, field: str = "file", binary: bool = False):
    """The contents of FILE, or of stdin for '-'; a file that cannot be read, is not UTF-8 text (unless `binary`)
    or is over UPLOAD_MAX_BYTES (refused by its size before it is read) is exit code 2."""
    from comfyhub import jsonlimits

    shown = "stdin" if name == STDIO else name
    try:
        if name == STDIO:
            raw = jsonlimits.read_stream(sys.stdin.buffer, what=shown)
        else:
            with open(name, "rb") as handle:
                jsonlimits.check_size(os.fstat(handle.fileno()).st_size, what=shown)
                raw = jsonlimits.read_stream(handle, what=shown)
        return raw if binary else raw.decode("utf-8")
    except jsonlimits.JSONInputError as exc:
        raise input_error({field: [str(exc)]}) from exc
    except UnicodeDecodeError as exc:
        raise input_error({field: [f"Cannot read {shown}: it is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                                   f"at offset {exc.start})."]}) from exc
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise input_error({field: [f"Cannot read {shown}: {reason}."]}) from exc


def write_output(command: BaseCommand, name: str, text: str, *, field: str = "file") -> bool:
    """Write text to FILE, or to stdout for '-'. Returns True when it went to a file."""
    if name == STDIO:
        command.stdout.write(text, ending="" if text.endswith("\n") else "\n")
        return False
    try:
        Path(name).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise input_error({field: [f"Cannot write {name}: {exc.strerror or exc}."]}) from exc
    return True


# --- Formatting -------------------------------------------------------------------------------------------------

def iso(value) -> str | None:
    return value.isoformat() if value else None


def local_time(value) -> str:
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S") if value else "never"


def human_size(count: float) -> str:
    """Django's filesizeformat ("1.5 MB") for plain text: a plain space instead of the no-break space it puts in
    HTML, so a line of output can be split and searched."""
    return filesizeformat(count).replace("\xa0", " ")
