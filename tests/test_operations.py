"""The Operation lifecycle against a real Redis and the worker production runs, in a process of its own."""
import os
import subprocess
import sys

import pytest
from django.db import transaction
from django.test import override_settings
from rq import SimpleWorker
from rq.job import Job

from comfyhub import operations, queues
from comfyhub.jobs import diagnostics, noop
from comfyhub.models import Operation
from tests import jobs_for_tests
from tests.conftest import REPO, worker_database_url, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

DEAD_REDIS = {
    name: {"URL": "unix:///nonexistent/comfyhub-redis.sock?db=0", "DEFAULT_TIMEOUT": 60} for name in ("default", "long")
}


def test_it_records_a_successful_job_with_progress_log_and_result(admin_user, production_worker):
    operation = operations.enqueue(jobs_for_tests.steps, user=admin_user, count=4)
    assert operation.status == Operation.Status.QUEUED
    assert Job.exists(str(operation.pk), connection=queues.get_connection())

    production_worker()

    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED
    assert operation.progress == 100
    assert operation.result == {"steps": 4}
    assert "step 4 of 4" in operation.log
    assert operation.requested_by == admin_user
    assert operation.started_at <= operation.finished_at
    assert operation.error == ""


def test_a_running_operation_shows_its_progress_and_log_before_it_ends(production_worker):
    production_worker.start()
    operation = operations.enqueue(jobs_for_tests.steps, count=4, pause=1.0)

    midway = wait_for(
        lambda: Operation.objects.filter(pk=operation.pk, status=Operation.Status.RUNNING, progress__gt=0).first(),
        message="progress while it runs",
    )

    assert midway.progress < 100
    assert "step 1 of 4" in midway.log
    assert midway.heartbeat_at is not None


def test_it_records_an_unexpected_failure_with_its_traceback(production_worker):
    operation = operations.enqueue(jobs_for_tests.fail)
    production_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.FAILED
    assert operation.error == "ValueError: unexpected breakage"
    assert "Traceback" in operation.traceback and "unexpected breakage" in operation.traceback
    assert "about to fail" in operation.log


def test_it_records_an_expected_failure_as_a_plain_message(production_worker):
    operation = operations.enqueue(jobs_for_tests.fail, expected=True)
    production_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.FAILED
    assert operation.error == "The thing could not be done; fix the input and try again."
    assert operation.traceback == ""


def test_it_enqueues_only_when_the_transaction_commits():
    with transaction.atomic():
        operation = operations.enqueue(noop)
        assert not Job.exists(str(operation.pk), connection=queues.get_connection())
    assert Job.exists(str(operation.pk), connection=queues.get_connection())


def test_a_rolled_back_transaction_enqueues_nothing():
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            operation = operations.enqueue(noop)
            raise RuntimeError("roll back")
    assert not Operation.objects.filter(pk=operation.pk).exists()
    assert queues.get_queue("default").count == 0


def test_it_refuses_to_enqueue_when_redis_is_down_and_leaves_nothing_queued():
    with override_settings(RQ_QUEUES=DEAD_REDIS, REDIS_URL=DEAD_REDIS["default"]["URL"]):
        with pytest.raises(queues.QueueUnavailable, match="The job queue is unavailable"):
            operations.enqueue(noop)
    assert not Operation.objects.exists()


def test_it_cancels_a_queued_operation_so_no_worker_runs_it(operator, production_worker):
    operation = operations.enqueue(jobs_for_tests.steps)
    operations.operation_cancel(operation=operation, user=operator)
    production_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.CANCELLED
    assert operation.error == "Cancelled by oscar."
    assert operation.started_at is None


def test_it_refuses_to_cancel_a_finished_operation(production_worker):
    operation = operations.enqueue(noop)
    production_worker()
    operation.refresh_from_db()
    with pytest.raises(operations.OperationError, match="already succeeded"):
        operations.operation_cancel(operation=operation)


def test_it_stops_a_running_operation_in_a_real_worker(production_worker, operator):
    production_worker.start()
    operation = operations.enqueue(jobs_for_tests.sleep, seconds=120, cooperative=False)
    wait_for(lambda: Operation.objects.get(pk=operation.pk).status == Operation.Status.RUNNING, message="running")

    operations.operation_cancel(operation=operation, user=operator)

    job = Job.fetch(str(operation.pk), connection=queues.get_connection())
    wait_for(lambda: job.get_status(refresh=True) == "stopped", message="RQ to stop the job")
    operation.refresh_from_db()
    assert operation.status == Operation.Status.CANCELLED
    assert operation.finished_at is not None


def test_a_cooperative_job_stops_itself_when_cancelled(production_worker):
    production_worker.start()
    operation = operations.enqueue(jobs_for_tests.sleep, seconds=120, cooperative=True)
    wait_for(lambda: Operation.objects.get(pk=operation.pk).status == Operation.Status.RUNNING, message="running")
    # Mark it cancelled without the stop command: the job must notice by itself.
    Operation.objects.filter(pk=operation.pk).update(status=Operation.Status.CANCELLED)
    job = Job.fetch(str(operation.pk), connection=queues.get_connection())
    wait_for(lambda: job.get_status(refresh=True) == "finished", message="the job to return")
    assert "Stopped: the operation was cancelled." in Operation.objects.get(pk=operation.pk).log


def test_an_operation_whose_worker_is_killed_ends_failed_with_the_reason(worker_process, settings):
    settings.OPERATION_HEARTBEAT_TIMEOUT = 3
    victim = worker_process(env={"OPERATION_HEARTBEAT_SECONDS": "0.5"})
    operation = operations.enqueue(jobs_for_tests.sleep, seconds=300)
    wait_for(lambda: Operation.objects.get(pk=operation.pk).status == Operation.Status.RUNNING, message="running")

    victim.kill_hard()
    assert operations.operations_sweep().dead == 0  # the heartbeat is still fresh

    wait_for(lambda: operations.operations_sweep().dead == 1, timeout=20, message="the sweep to notice")
    operation.refresh_from_db()
    assert operation.status == Operation.Status.FAILED
    assert "The worker running this operation died" in operation.error
    assert "no heartbeat since" in operation.error


def queued_five_minutes_ago(operation):
    """As if the operation had waited long enough for the sweep to judge it."""
    Operation.objects.filter(pk=operation.pk).update(
        created_at=operation.created_at - operations.timezone.timedelta(minutes=5)
    )


def test_the_sweep_fails_a_queued_operation_that_vanished_from_redis(settings):
    operation = operations.enqueue(noop)
    queues.get_connection().flushdb()
    queued_five_minutes_ago(operation)
    assert operations.operations_sweep().lost == 1
    operation.refresh_from_db()
    assert operation.status == Operation.Status.FAILED
    assert "disappeared from the queue" in operation.error


def test_the_sweep_fails_a_queued_operation_whose_job_rq_gave_up_on():
    """RQ fails a job stuck in its intermediate queue (a worker died while taking it) without running it."""
    operation = operations.enqueue(noop)
    connection = queues.get_connection()
    job = Job.fetch(str(operation.pk), connection=connection)
    SimpleWorker([queues.get_queue()], connection=connection).handle_job_failure(
        job, queues.get_queue(), exc_string="Job was stuck in intermediate queue."
    )
    assert operations.operations_sweep().lost == 0  # not queued long enough to tell
    queued_five_minutes_ago(operation)

    assert operations.operations_sweep().lost == 1
    operation.refresh_from_db()
    assert operation.status == Operation.Status.FAILED
    assert "RQ gave up on the job before any worker ran it (Job was stuck in intermediate queue.)" in operation.error


def test_the_sweep_leaves_alone_a_queued_operation_still_waiting_for_a_worker():
    operation = operations.enqueue(noop)
    queued_five_minutes_ago(operation)

    assert operations.operations_sweep().lost == 0
    assert Operation.objects.get(pk=operation.pk).status == Operation.Status.QUEUED


def test_diagnostics_checks_each_part_and_succeeds_on_a_healthy_system(run_worker, docker_engine):
    operation = operations.enqueue(diagnostics)
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    checks = {c["check"]: c["ok"] for c in operation.result["checks"]}
    assert checks == {
        "database": True, "job queue": True, "docker engine": True, "model library": True,
        "shared storage": True, "instance storage": True, "backup storage": True,
    }


def test_a_job_that_needs_docker_fails_naming_the_engine_address(run_worker, settings):
    settings.DOCKER_HOST = "unix:///nonexistent/docker.sock"
    operation = operations.enqueue(diagnostics)
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.FAILED
    assert "docker engine: The Docker engine at unix:///nonexistent/docker.sock is unreachable" in operation.error


def test_a_killed_worker_is_noticed_by_the_periodic_sweep_of_the_next_worker(worker_process, tmp_path):
    """The production path: the cron process enqueues the sweep, a surviving worker runs it."""
    fast = {"OPERATION_HEARTBEAT_SECONDS": "0.5", "OPERATION_HEARTBEAT_TIMEOUT": "3", "OPERATION_SWEEP_INTERVAL": "2"}
    victim = worker_process(env=fast)
    operation = operations.enqueue(jobs_for_tests.sleep, seconds=300)
    wait_for(lambda: Operation.objects.get(pk=operation.pk).status == Operation.Status.RUNNING, message="running")
    victim.kill_hard()

    worker_process(env=fast)
    cron = subprocess.Popen(
        [sys.executable, "manage.py", "rqcron", "comfyhub.cron"],
        cwd=REPO, env={**os.environ, "DATABASE_URL": worker_database_url(), **fast},
        stdout=open(tmp_path / "cron.log", "wb"), stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: Operation.objects.get(pk=operation.pk).status == Operation.Status.FAILED,
            timeout=60, message="the operation to be marked failed",
        )
    finally:
        cron.terminate()
        cron.wait(timeout=10)
    # Either the heartbeat sweep or RQ's own abandoned-job check may win; both say the worker died.
    assert "The worker running this operation died" in Operation.objects.get(pk=operation.pk).error
