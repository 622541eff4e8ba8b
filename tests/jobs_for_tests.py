"""Jobs that exist only for tests of the operation machinery (imported by workers in other processes too)."""
import logging
import os
import time
from pathlib import Path

from django.db import connection

from comfyhub.operations import OperationError, operation_job

logger = logging.getLogger(__name__)


@operation_job("test_steps", label="Test steps")
def steps(report, *, count=3, pause=0.0):
    for number in range(1, count + 1):
        logger.info("step %s of %s", number, count)
        report.progress(100 * number / count, f"step {number}")
        time.sleep(pause)
    return {"steps": count}


@operation_job("test_fail", label="Test failure")
def fail(report, *, expected=False):
    report.log("about to fail")
    if expected:
        raise OperationError("The thing could not be done; fix the input and try again.")
    raise ValueError("unexpected breakage")


@operation_job("test_sleep", label="Test sleep")
def sleep(report, *, seconds=60.0, cooperative=True):
    """Sleeps in small slices; with `cooperative` it checks for cancellation between them."""
    report.log("sleeping")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cooperative:
            report.progress(0, "sleeping")
        time.sleep(0.1)
    return {"slept": seconds}


@operation_job("test_whereami", label="Test where am I")
def whereami(report):
    """Where it ran: its process, that process's parent, how many jobs have used its database connection (a TEMP
    table lives as long as the connection), and the sockets and database files it holds open that its parent holds
    too (a copy inherited across the fork)."""
    with connection.cursor() as cursor:
        cursor.execute("CREATE TEMP TABLE IF NOT EXISTS jobs_on_this_connection (n INTEGER)")
        cursor.execute("INSERT INTO jobs_on_this_connection VALUES (1)")
        cursor.execute("SELECT COUNT(*) FROM jobs_on_this_connection")
        (count,) = cursor.fetchone()
    shared = open_sockets_and_databases(os.getpid()) & open_sockets_and_databases(os.getppid())
    return {"pid": os.getpid(), "parent": os.getppid(), "jobs_on_connection": count, "shared": sorted(shared)}


def open_sockets_and_databases(pid):
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:") or target == str(connection.settings_dict["NAME"]):
            found.add(target)
    return found


@operation_job("test_tell_pid_and_sleep", label="Test tell pid and sleep")
def tell_pid_and_sleep(report, *, path, seconds=60.0):
    """Writes its process id to `path`, then sleeps without checking for cancellation."""
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return {"slept": seconds}


@operation_job("test_overrun", label="Test overrun", timeout=1)
def overrun(report, *, seconds=30.0):
    """Runs longer than its one-second RQ timeout allows."""
    time.sleep(seconds)
