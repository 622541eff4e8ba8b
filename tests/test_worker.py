"""ComfyHub's RQ worker keeps its work horse from job to job: real `manage.py rqworker` processes, real Redis."""
import os
import signal
import time
from pathlib import Path

import pytest
from rq.job import Job

from comfyhub import operations, queues, worker
from comfyhub.models import Operation
from tests import jobs_for_tests
from tests.conftest import wait_for

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


def test_jobs_run_one_after_another_in_the_work_horse_the_worker_keeps(worker_process):
    rqworker = worker_process("default")

    first, second = where(run(jobs_for_tests.whereami)), where(run(jobs_for_tests.whereami))

    assert first["pid"] == second["pid"], "each job got a work horse of its own"
    assert first["pid"] != rqworker.process.pid, "the job ran in the worker itself, not in a work horse"
    assert first["parent"] == rqworker.process.pid
    assert (first["jobs_on_connection"], second["jobs_on_connection"]) == (1, 2), "the horse reconnected"


def test_a_work_horse_is_retired_after_its_quota_of_jobs(worker_process):
    worker_process("default", env={"WORKER_HORSE_MAX_JOBS": "2"})

    pids = [where(run(jobs_for_tests.whereami))["pid"] for _ in range(3)]

    assert pids[0] == pids[1] != pids[2]
    wait_for(lambda: not running(pids[0]), timeout=10, message="the retired horse to exit")


def test_a_work_horse_holding_more_memory_than_allowed_is_retired_after_its_job(worker_process):
    worker_process("default", env={"WORKER_HORSE_MAX_MEMORY_MB": "1"})  # every horse holds more than that

    pids = [where(run(jobs_for_tests.whereami))["pid"] for _ in range(2)]

    assert pids[0] != pids[1]


def test_one_job_per_horse_is_rqs_classic_fork_per_job(worker_process):
    worker_process("default", env={"WORKER_HORSE_MAX_JOBS": "1"})

    pids = [where(run(jobs_for_tests.whereami))["pid"] for _ in range(3)]

    assert len(set(pids)) == 3


def test_after_a_failed_job_the_next_job_gets_a_fresh_horse(worker_process):
    worker_process("default")
    before = where(run(jobs_for_tests.whereami))["pid"]

    failed = run(jobs_for_tests.fail)
    after = where(run(jobs_for_tests.whereami))["pid"]

    assert failed.status == Operation.Status.FAILED
    assert "ValueError: unexpected breakage" in failed.error
    assert after != before
    wait_for(lambda: not running(before), timeout=10, message="the horse that ran the failed job to exit")


def test_a_job_over_its_timeout_is_stopped_and_the_next_job_still_runs(worker_process):
    worker_process("default")

    overran = run(jobs_for_tests.overrun, seconds=30)
    next_job = run(jobs_for_tests.whereami)

    assert overran.status == Operation.Status.FAILED
    assert "JobTimeoutException" in overran.error
    assert next_job.status == Operation.Status.SUCCEEDED, next_job.error


def test_a_horse_killed_mid_job_fails_its_operation_at_once_and_the_worker_goes_on(worker_process, tmp_path):
    rqworker = worker_process("default")
    operation, horse = started_horse(tmp_path)

    os.kill(horse, signal.SIGKILL)

    wait_for(lambda: Operation.objects.get(pk=operation.pk).status == Operation.Status.FAILED,
             timeout=15, message="the operation to fail")  # the heartbeat sweep would need 45 s or more
    operation.refresh_from_db()
    assert "The worker process running this operation died before it finished (killed by SIGKILL:" in operation.error
    assert rqworker.process.poll() is None
    assert where(run(jobs_for_tests.whereami))["pid"] != horse


def test_a_horse_that_died_while_idle_is_replaced_when_the_next_job_comes(worker_process):
    worker_process("default")
    idle = where(run(jobs_for_tests.whereami))["pid"]
    os.kill(idle, signal.SIGKILL)
    wait_for(lambda: not running(idle), message="the idle horse to die")

    replacement = where(run(jobs_for_tests.whereami))["pid"]

    assert replacement != idle


def test_stopping_a_running_job_kills_its_horse_and_nothing_else(worker_process, operator, tmp_path):
    rqworker = worker_process("default")
    operation, horse = started_horse(tmp_path, seconds=120)

    operations.operation_cancel(operation=operation, user=operator)

    job = Job.fetch(str(operation.pk), connection=queues.get_connection())
    wait_for(lambda: job.get_status(refresh=True) == "stopped", message="RQ to stop the job")
    wait_for(lambda: not running(horse), timeout=10, message="the horse to be killed")
    assert Operation.objects.get(pk=operation.pk).status == Operation.Status.CANCELLED
    assert rqworker.process.poll() is None
    assert where(run(jobs_for_tests.whereami))["pid"] != horse


def test_a_worker_that_stops_takes_its_idle_horse_with_it(worker_process):
    rqworker = worker_process("default")
    horse = where(run(jobs_for_tests.whereami))["pid"]

    rqworker.stop()

    assert rqworker.process.returncode == 0
    # Sooner than an orphan notices (PARENT_CHECK_SECONDS): the worker itself told it to go.
    wait_for(lambda: not running(horse), timeout=worker.PARENT_CHECK_SECONDS - 2,
             message="the idle horse to exit with its worker")


def test_a_horse_whose_worker_was_killed_does_not_linger(worker_process):
    rqworker = worker_process("default")
    horse = where(run(jobs_for_tests.whereami))["pid"]

    os.kill(rqworker.process.pid, signal.SIGKILL)  # the worker alone; its horse is in a process group of its own

    wait_for(lambda: not running(horse), timeout=worker.PARENT_CHECK_SECONDS + 10,
             message="the orphaned idle horse to exit")


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
    """Its children (the kept horse, RQ's scheduler process) hold no copy of its Redis sockets, so Redis drops
    the dead worker's blocking dequeue at once instead of handing it the next job."""
    victim = worker_process("default")
    where(run(jobs_for_tests.whereami))  # the horse has served a job; the worker waits for the next one
    os.kill(victim.process.pid, signal.SIGKILL)
    victim.process.wait(timeout=10)

    survivor = worker_process("default")
    operation = run(jobs_for_tests.whereami)

    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert operation.result["parent"] == survivor.process.pid
