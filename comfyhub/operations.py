"""The Operation lifecycle, in one place: declaring job kinds, enqueueing, running, reporting, cancelling, sweeping.

Every background job is an `@operation_job` function `f(report, **primitive_kwargs)`. `enqueue()` takes it, or its
dotted path (how services name the jobs that call them back), creates its Operation row and pushes it to RQ under the
row's id once the transaction commits; the RQ worker calls the wrapper, which marks the row running, keeps a
heartbeat, captures log lines and progress, and records the result or failure.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
import traceback as traceback_module
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.contrib.contenttypes.models import ContentType
from django.db import close_old_connections, connection, transaction
from django.utils import timezone
from django.utils.module_loading import import_string
from redis.exceptions import RedisError
from rq import Callback, get_current_job
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from . import queues
from .models import Operation

logger = logging.getLogger(__name__)

TRACEBACK_LIMIT = 20_000
ERROR_LIMIT = 4_000
# How long a queued operation may be missing from Redis before the sweep calls it lost.
LOST_GRACE_SECONDS = 60


class OperationError(Exception):
    """An expected failure: its message is shown to the user as the operation's error, without a traceback."""


class NodeUnavailable(queues.QueueUnavailable):
    """The node an operation would run on takes no jobs now (offline, or not approved): refused before anything is
    recorded or queued. A kind of QueueUnavailable, so pages and commands show it as they show Redis being down."""


class OperationCancelled(Exception):
    """Raised inside a job when its operation was cancelled; the runner records the cancellation."""


def kind_label(kind: str) -> str:
    return Operation(kind=kind).get_kind_display()


def kind_choices() -> list[tuple[str, str]]:
    return sorted(Operation.KIND_LABELS.items(), key=lambda item: item[1])


# --- Declaring jobs ------------------------------------------------------------------------------------------

def operation_job(kind: str, *, label: str, queue: str = "default", timeout: int | None = None):
    """Declare a background job. The decorated function receives a `Report` first, then keyword arguments."""

    def decorate(func):
        Operation.KIND_LABELS[kind] = label

        @functools.wraps(func)
        def rq_entry_point(**kwargs):
            return _run(func, kwargs)

        rq_entry_point.kind = kind
        rq_entry_point.queue_name = queue
        rq_entry_point.timeout = timeout
        rq_entry_point.body = func
        return rq_entry_point

    return decorate


# --- Enqueueing ----------------------------------------------------------------------------------------------

def enqueue(job, *, target=None, node=None, user=None, **kwargs) -> Operation:
    """Create the Operation row for `job` and enqueue it when the current transaction commits.

    `job` is an `@operation_job` function or its dotted path ("instances.jobs.start_instance"): a service names the
    job by its path, so the jobs module, which calls the services, is the only one of the two that imports the other.

    The job runs on a node's queue: `node`'s, else the target's own node (`target.node`, or the target when it is a
    node itself); without one on the hub's queue. A node is any object with `job_queue(base)` and `refusal()`
    (instances.models.Node; the core imports no app). The hub's `local` node keeps the queues default and long.

    Raises NodeUnavailable when that node takes no jobs now, and `queues.QueueUnavailable` when Redis does not
    answer; either way nothing is recorded, so no operation is ever left queued that no worker will see.
    """
    if isinstance(job, str):
        job = import_string(job)
    if not hasattr(job, "kind"):
        raise TypeError(f"{job!r} is not declared with @operation_job.")
    if node is not None and not _is_node(node):
        raise TypeError(f"enqueue(node=...) chooses the node a job runs on and takes a node (with job_queue() and "
                        f"refusal()), not {node!r}; pass a node's name to the job under another keyword.")
    node = node if node is not None else node_of(target)
    queue_name = job.queue_name
    if node is not None:
        refusal = node.refusal()
        if refusal:
            raise NodeUnavailable(refusal)
        queue_name = node.job_queue(job.queue_name)
    queues.ensure_available(queue_name)
    operation = Operation.objects.create(
        kind=job.kind,
        queue_name=queue_name,
        target_type=ContentType.objects.get_for_model(target) if target is not None else None,
        target_id=str(target.pk) if target is not None else "",
        target_label=str(target)[:200] if target is not None else "",
        requested_by=user if user is not None and user.is_authenticated else None,
    )
    transaction.on_commit(functools.partial(_push, operation.pk, job, kwargs, queue_name), robust=False)
    return operation


def running_on(kind: str, target) -> Operation | None:
    """The queued or running operation of `kind` on `target`, if any (to refuse starting a second one)."""
    return Operation.objects.filter(kind=kind, target_id=str(target.pk),
                                    status__in=Operation.ACTIVE_STATUSES).first()


def _is_node(candidate) -> bool:
    return callable(getattr(candidate, "job_queue", None)) and callable(getattr(candidate, "refusal", None))


def node_of(target):
    """The node whose queue a job about `target` goes to: the target itself when it is a node, else its `node`
    attribute when that is one; None for targets that belong to no node."""
    if target is None:
        return None
    if _is_node(target):
        return target
    node = getattr(target, "node", None)
    return node if _is_node(node) else None


def _push(operation_id, job, kwargs, queue_name=None):
    try:
        queues.get_queue(queue_name or job.queue_name).enqueue(
            job,
            kwargs=kwargs,
            job_id=str(operation_id),
            job_timeout=job.timeout,
            description=f"{job.kind} {operation_id}",
            result_ttl=24 * 3600,
            failure_ttl=7 * 24 * 3600,
            on_failure=Callback(on_rq_failure),
            on_stopped=Callback(on_rq_stopped),
        )
    except RedisError as exc:
        message = queues.unavailable_message(exc)
        _finish(operation_id, Operation.Status.FAILED, error=message, from_statuses=(Operation.Status.QUEUED,))
        raise queues.QueueUnavailable(message) from exc


# --- Running -------------------------------------------------------------------------------------------------

class Report:
    """What a running job uses to talk about itself: progress, log lines and the cancellation check."""

    WRITE_INTERVAL = 0.5

    def __init__(self, operation_id):
        self.operation_id = operation_id
        self._lines: list[str] = []
        self._dropped = 0
        self._progress = 0
        self._message = ""
        self._dirty = False
        self._last_write = 0.0
        self._lock = threading.Lock()

    def log(self, message: str, level: str = "INFO"):
        stamp = timezone.now().strftime("%Y-%m-%d %H:%M:%S")
        with self._lock:
            for line in str(message).splitlines() or [""]:
                self._lines.append(f"{stamp} {level} {line}")
            overflow = len(self._lines) - settings.OPERATION_LOG_MAX_LINES
            if overflow > 0:
                del self._lines[:overflow]
                self._dropped += overflow
            self._dirty = True
        self._maybe_write(check_cancelled=False)

    def progress(self, percent: float, message: str | None = None):
        """Record progress (0-100) and an optional short message; raises OperationCancelled if cancelled."""
        with self._lock:
            self._progress = max(0, min(100, int(percent)))
            if message is not None:
                self._message = message[:300]
            self._dirty = True
        self._maybe_write(check_cancelled=True)

    def check_cancelled(self):
        status = Operation.objects.filter(pk=self.operation_id).values_list("status", flat=True).first()
        if status == Operation.Status.CANCELLED:
            raise OperationCancelled()

    def _maybe_write(self, *, check_cancelled: bool):
        if time.monotonic() - self._last_write >= self.WRITE_INTERVAL:
            self.flush()
            if check_cancelled:
                self.check_cancelled()

    def flush(self):
        with self._lock:
            if not self._dirty:
                return
            log = self._log_text()
            fields = {"progress": self._progress, "progress_message": self._message, "log": log}
            self._dirty = False
            self._last_write = time.monotonic()
        Operation.objects.filter(pk=self.operation_id).update(**fields)

    def _log_text(self):
        head = [f"... {self._dropped} earlier lines dropped"] if self._dropped else []
        return "\n".join(head + self._lines)

    def final_fields(self):
        with self._lock:
            return {"log": self._log_text(), "progress_message": self._message}


class NullReport:
    """A Report for work that no operation runs (a test, a shell): it drops what it is told, so code that may run
    either way takes `report or NullReport()` and never asks whether it has one."""

    def log(self, message: str, level: str = "INFO"):
        pass

    def progress(self, percent: float, message: str | None = None):
        pass

    def check_cancelled(self):
        pass


class _LogCapture(logging.Handler):
    """Copies log records from the job's code into its operation's log."""

    def __init__(self, report: Report):
        super().__init__(level=logging.INFO)
        self.report = report
        self.thread_id = threading.get_ident()

    def emit(self, record):
        if record.thread != self.thread_id or record.name.startswith(("rq.", "django.db")):
            return
        self.report.log(record.getMessage(), record.levelname)


class _Heartbeat(threading.Thread):
    def __init__(self, operation_id):
        super().__init__(daemon=True, name=f"heartbeat-{operation_id}")
        self.operation_id = operation_id
        self.stopped = threading.Event()

    def run(self):
        try:
            while not self.stopped.wait(settings.OPERATION_HEARTBEAT_SECONDS):
                Operation.objects.filter(pk=self.operation_id, status=Operation.Status.RUNNING).update(
                    heartbeat_at=timezone.now()
                )
        finally:
            connection.close()


def _run(func, kwargs):
    rq_job = get_current_job()
    operation_id = rq_job.id
    now = timezone.now()
    claimed = Operation.objects.filter(pk=operation_id, status=Operation.Status.QUEUED).update(
        status=Operation.Status.RUNNING,
        started_at=now,
        heartbeat_at=now,
        worker_name=(rq_job.worker_name or "")[:200],
    )
    if not claimed:
        logger.info("Operation %s is no longer queued (cancelled or already run); skipping it.", operation_id)
        return None

    report = Report(operation_id)
    heartbeat = _Heartbeat(operation_id)
    capture = _LogCapture(report)
    logging.getLogger().addHandler(capture)
    heartbeat.start()
    try:
        result = func(report, **kwargs)
    except OperationCancelled:
        report.log("Stopped: the operation was cancelled.")
        if not _finish(operation_id, Operation.Status.CANCELLED, **report.final_fields()):
            Operation.objects.filter(pk=operation_id).update(**report.final_fields())  # cancelled by a person
        return None
    except OperationError as exc:
        report.log(str(exc), "ERROR")
        _finish(operation_id, Operation.Status.FAILED, error=str(exc)[:ERROR_LIMIT], **report.final_fields())
        raise
    except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised for RQ's failed registry
        report.log(f"{type(exc).__name__}: {exc}", "ERROR")
        _finish(
            operation_id,
            Operation.Status.FAILED,
            error=f"{type(exc).__name__}: {exc}"[:ERROR_LIMIT],
            traceback=traceback_module.format_exc()[-TRACEBACK_LIMIT:],
            **report.final_fields(),
        )
        raise
    else:
        _finish(operation_id, Operation.Status.SUCCEEDED, progress=100, result=result, **report.final_fields())
        return result
    finally:
        heartbeat.stopped.set()  # a daemon thread; its write only touches rows still running
        logging.getLogger().removeHandler(capture)


def _finish(operation_id, status, *, from_statuses=(Operation.Status.RUNNING,), **fields) -> bool:
    """Move an operation to a terminal status, unless someone else already did (e.g. a cancel)."""
    updated = Operation.objects.filter(pk=operation_id, status__in=from_statuses).update(
        status=status, finished_at=timezone.now(), **fields
    )
    return bool(updated)


# RQ callbacks: they cover what the runner itself cannot record (a killed work horse, a stop command).
# RQ calls them in the worker, which may have idled for days, or in a horse after a failed job, never inside a
# transaction: each starts as Django starts a request, with close_old_connections(). With the default CONN_MAX_AGE=0
# that closes every connection, so one the server dropped meanwhile is never used; a longer CONN_MAX_AGE wants
# CONN_HEALTH_CHECKS, as for the web server. (The copy it replaced pinged each connection instead, for a work horse
# that kept its connection from job to job; horses now live for one job.)

def on_rq_failure(job, connection, exc_type, exc_value, tb):
    close_old_connections()
    reason = f"{getattr(exc_type, '__name__', exc_type)}: {exc_value}"
    if exc_type is not None and exc_type.__name__ == "AbandonedJobError":
        reason = "The worker running this operation died before it finished (RQ found the job abandoned)."
    _finish(
        job.id,
        Operation.Status.FAILED,
        from_statuses=Operation.ACTIVE_STATUSES,
        error=reason[:ERROR_LIMIT],
    )


def on_work_horse_killed(job_id: str, how: str):
    """The worker saw the process running this job die (`how`: "killed by SIGKILL ..."): say so at once, rather
    than leave the operation running until the sweep notices its silent heartbeat."""
    try:
        operation_id = uuid.UUID(job_id)
    except ValueError:
        return  # not an operation's job
    close_old_connections()
    _finish(
        operation_id,
        Operation.Status.FAILED,
        from_statuses=Operation.ACTIVE_STATUSES,
        error=(
            f"The worker process running this operation died before it finished ({how}). "
            "Check the worker's log and the host's memory, then run it again."
        )[:ERROR_LIMIT],
    )


def on_rq_stopped(job, connection):
    close_old_connections()
    _finish(job.id, Operation.Status.CANCELLED, from_statuses=Operation.ACTIVE_STATUSES)


# --- Cancelling ----------------------------------------------------------------------------------------------

def operation_cancel(*, operation: Operation, user=None) -> Operation:
    """Cancel a queued or running operation: remove it from the queue, or stop the job that runs it."""
    who = getattr(user, "username", None) or "the system"
    fields = {"error": f"Cancelled by {who}."}
    # Try each active status in turn: the row may have moved on since the caller loaded it.
    if _finish(operation.pk, Operation.Status.CANCELLED, from_statuses=(Operation.Status.QUEUED,), **fields):
        was_running = False
    elif _finish(operation.pk, Operation.Status.CANCELLED, from_statuses=(Operation.Status.RUNNING,), **fields):
        was_running = True
    else:
        operation.refresh_from_db()
        raise OperationError(
            f"The operation has already {operation.status}; only queued or running ones can be cancelled."
        )
    try:
        conn = queues.get_connection(operation.queue_name)
        if was_running:
            send_stop_job_command(conn, str(operation.pk))
        else:
            Job.fetch(str(operation.pk), connection=conn).cancel()
    except (NoSuchJobError, InvalidJobOperation):
        pass  # already gone from the queue, or finishing right now: the runner sees the cancelled status
    except RedisError as exc:
        logger.warning("Operation %s marked cancelled, but the queue could not be told: %s", operation.pk, exc)
    operation.refresh_from_db()
    return operation


# --- Sweeping ------------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    dead: int = 0
    lost: int = 0


def _why_queued_job_will_never_run(job_id: str, conn) -> str:
    """Why the RQ job of a long-queued operation will never run, or "" while it still may."""
    try:
        job = Job.fetch(job_id, connection=conn)
    except NoSuchJobError:
        return ("The job disappeared from the queue before any worker ran it (was Redis flushed or restarted "
                "without persistence?). Run it again.")
    if job.get_status() in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
        latest = job.latest_result()
        detail = (latest.exc_string or "").strip().splitlines()[-1:] if latest is not None else []
        return (f"RQ gave up on the job before any worker ran it ({detail[0] if detail else job.get_status().value}); "
                "a worker probably died while taking it from the queue. Run it again.")[:ERROR_LIMIT]
    return ""


def operations_sweep() -> SweepResult:
    """Fail operations whose worker died (no heartbeat) and queued ones that vanished from Redis."""
    now = timezone.now()
    result = SweepResult()
    cutoff = now - timezone.timedelta(seconds=settings.OPERATION_HEARTBEAT_TIMEOUT)
    for operation in Operation.objects.filter(status=Operation.Status.RUNNING, heartbeat_at__lt=cutoff):
        since = timezone.localtime(operation.heartbeat_at).strftime("%Y-%m-%d %H:%M:%S")
        worker = f" ({operation.worker_name})" if operation.worker_name else ""
        if _finish(
            operation.pk,
            Operation.Status.FAILED,
            error=(
                f"The worker running this operation died{worker}: no heartbeat since {since}. It was probably "
                "killed (SIGKILL, out of memory, or a host restart). Check the worker's logs, then run it again."
            ),
        ):
            result.dead += 1
    grace = now - timezone.timedelta(seconds=LOST_GRACE_SECONDS)
    queued = list(Operation.objects.filter(status=Operation.Status.QUEUED, created_at__lt=grace))
    if queued:
        try:
            conn = queues.get_connection("default")
            for operation in queued:
                reason = _why_queued_job_will_never_run(str(operation.pk), conn)
                if reason and _finish(
                    operation.pk, Operation.Status.FAILED, from_statuses=(Operation.Status.QUEUED,), error=reason
                ):
                    result.lost += 1
        except RedisError:
            pass  # cannot tell while Redis is down; the next sweep decides
    return result
