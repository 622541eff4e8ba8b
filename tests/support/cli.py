"""Running ComfyHub's management commands the way a person does, for the CLI tests: in this process through
call_command, or as a real `manage.py` process on the test database; either way the exit code and both outputs."""
import os
import subprocess
import sys
from dataclasses import dataclass
from io import StringIO

from django.core.management import call_command
from django.core.management.base import CommandError

from tests.conftest import REPO, worker_database_url


@dataclass
class Result:
    code: int
    out: str
    err: str


def run(command, *args) -> Result:
    """Run a command in this process; a CommandError's message goes to stderr, as on the command line."""
    out, err = StringIO(), StringIO()
    try:
        call_command(command, *args, stdout=out, stderr=err)
        code = 0
    except CommandError as exc:
        code = exc.returncode
        err.write(str(exc))
    return Result(code, out.getvalue(), err.getvalue())


def run_process(command, *args, timeout=120, env=None) -> Result:
    """Run `python manage.py COMMAND ...` as a separate process on the test database, until it exits."""
    completed = subprocess.run(_argv(command, args), cwd=REPO, capture_output=True, text=True, env=_env(env),
                               timeout=timeout)
    return Result(completed.returncode, completed.stdout, completed.stderr)


def start_process(command, *args) -> subprocess.Popen:
    """Start `python manage.py COMMAND ...` on the test database and return at once (to signal or cancel it)."""
    return subprocess.Popen(_argv(command, args), cwd=REPO, env=_env(None), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _argv(command, args) -> list[str]:
    return [sys.executable, str(REPO / "manage.py"), command, *args]


def _env(extra) -> dict:
    return {**os.environ, "DATABASE_URL": worker_database_url(), **(extra or {})}
