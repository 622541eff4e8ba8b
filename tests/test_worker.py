"""ComfyHub's RQ worker: RQ's forking worker, a work horse per job, in real `manage.py rqworker` processes, real Redis."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rq.job import Job

from comfyhub import operations, queues, worker
from comfyhub.models import Operation
from tests import jobs_for_tests
from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def run(job, **kwargs):
    """Enqueue `job` and wait until its operation has ended; the operation, fresh from the database."""
    operation = operations.enqueue(job, **kwargs)
    wait_for(
        lambda: Operation.objects.get(pk=operation.pk).status not in Operation.ACTIVE_STATUSES,
        timeout=60, interval=0.05, message=f"the {job.kind} operation to end",
    )
    operation.refresh_from_db()
    return operation


def where(operation):
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    return operation.result


def running(pid):
    """Alive and not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def started_horse(tmp_path, **kwargs):
    """Start a job that tells its process id and sleeps; (operation, the pid of the horse running it)."""
    pid_file = tmp_path / f"horse-{time.monotonic_ns()}.pid"
    operation = operations.enqueue(jobs_for_tests.tell_pid_and_sleep, path=str(pid_file), **kwargs)
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), message="the job to tell its pid")
    return operation, int(pid_file.read_text())


def test_every_job_runs_in_a_work_horse_of_its_own_on_connections_of_its_own(production_worker):
    rqworker = production_worker.start("default")

    first, second = where(run(jobs_for_tests.whereami)), where(run(jobs_for_tests.whereami))

    assert first["pid"] != second["pid"]
    assert rqworker.process.pid not in (first["pid"], second["pid"]), "a job ran in the worker itself"
    assert first["parent"] == second["parent"] == rqworker.process.pid
    # No connection crosses a fork: each horse opened its own, and holds no copy of one of its worker's.
    assert (first["jobs_on_connection"], second["jobs_on_connection"]) == (1, 1)
    assert first["shared"] == second["shared"] == []


def test_a_job_over_its_timeout_is_stopped_and_the_next_job_still_runs(production_worker):
    production_worker.start("default")

    overran = run(jobs_for_tests.overrun, seconds=30)
    next_job = run(jobs_for_tests.whereami)

    assert overran.status == Operation.Status.FAILED
    assert "JobTimeoutException" in overran.error
    assert next_job.status == Operation.Status.SUCCEEDED, next_job.error


def test_a_horse_killed_mid_job_fails_its_operation_at_once_and_the_worker_goes_on(production_worker, tmp_path):
    rqworker = production_worker.start("default")
    operation, horse = started_horse(tmp_path)

    os.kill(horse, signal.SIGKILL)

    wait_for(lambda: Operation.objects.get(pk=operation.pk).status == Operation.Status.FAILED,
             timeout=15, message="the operation to fail")  # the heartbeat sweep would need 45 s or more
    operation.refresh_from_db()
    assert "The worker process running this operation died before it finished (killed by SIGKILL:" in operation.error
    assert rqworker.process.poll() is None
    assert where(run(jobs_for_tests.whereami))["pid"] != horse


def test_stopping_a_running_job_kills_its_horse_and_nothing_else(production_worker, operator, tmp_path):
    rqworker = production_worker.start("default")
    operation, horse = started_horse(tmp_path, seconds=120)

    operations.operation_cancel(operation=operation, user=operator)

    job = Job.fetch(str(operation.pk), connection=queues.get_connection())
    wait_for(lambda: job.get_status(refresh=True) == "stopped", message="RQ to stop the job")
    wait_for(lambda: not running(horse), timeout=10, message="the horse to be killed")
    assert Operation.objects.get(pk=operation.pk).status == Operation.Status.CANCELLED
    assert rqworker.process.poll() is None
    assert where(run(jobs_for_tests.whereami))["pid"] != horse


KILL_HORSE = """
import os, signal, subprocess, sys, time
import django
django.setup()
from comfyhub import queues
from comfyhub.worker import ComfyHubWorker

worker = ComfyHubWorker([queues.get_queue("default")], connection=queues.get_connection("default"))
worker.kill_horse()  # no job runs: RQ's own would signal getpgid(0), this process's group
horse = subprocess.Popen(["sleep", "60"])  # a horse forked a moment ago: still in this process's group
worker._horse_pid = horse.pid
worker.kill_horse(signal.SIGKILL)
print("horse", horse.wait(timeout=10), flush=True)
"""


def test_stopping_a_horse_never_signals_the_workers_own_process_group(tmp_path):
    """A stop command that races the end of its job finds no horse; one that comes right after the fork finds a
    horse without a process group of its own yet. RQ's own kill_horse() would kill the worker in both cases."""
    done = subprocess.run([sys.executable, "-c", KILL_HORSE], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DJANGO_SETTINGS_MODULE": "comfyhub.settings"},
                          start_new_session=True, timeout=60)

    assert done.returncode == 0, f"the worker's process got signal {-done.returncode}: {done.stderr}"
    assert done.stdout.strip() == f"horse {-signal.SIGKILL}"


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (signal.SIGKILL, "killed by SIGKILL: the out-of-memory killer, a person, or its worker after a timeout"),
        (signal.SIGSEGV, "killed by SIGSEGV"),
        (3 << 8, "exited with status 3"),
        (None, "exit status unknown"),
    ],
)
def test_it_says_how_a_work_horse_ended(status, words):
    assert worker.describe_exit(status) == words


def test_a_worker_killed_alone_leaves_no_dequeue_behind_to_swallow_the_next_job(worker_process):
    """Its children (RQ's scheduler process, its work horses) hold no copy of its Redis sockets, so Redis drops
    the dead worker's blocking dequeue at once instead of handing it the next job."""
    victim = worker_process("default")
    where(run(jobs_for_tests.whereami))  # it has forked a horse; it waits for the next job
    os.kill(victim.process.pid, signal.SIGKILL)
    victim.process.wait(timeout=10)

    survivor = worker_process("default")
    operation = run(jobs_for_tests.whereami)

    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert operation.result["parent"] == survivor.process.pid
