"""The RQ worker ComfyHub runs: RQ's forking worker, except that the work horse it forks is kept for the jobs that
follow (as Celery's prefork pool and gunicorn's workers keep theirs) instead of forked anew for each one.

Why: a Django-sized process pays for every fork() twice, once in the fork and again in the copy-on-write faults of
the first database work after it (a fresh SQLite connection in a forked child costs ~800 page faults; measured in
bench/roundtrip.py). A kept horse pays that once. What forking is for stays as it was: a job runs in a process of
its own, so a stopped or timed-out job is killed (SIGKILL to the horse) without killing the worker, and a horse
that dies is noticed and replaced. A horse is retired, and a fresh one forked, after `WORKER_HORSE_MAX_JOBS` jobs,
after a job that failed, and when it holds more than `WORKER_HORSE_MAX_MEMORY_MB`; `WORKER_HORSE_MAX_JOBS=1` is
RQ's classic fork per job.

Parent and horse talk over a socket pair, one message each way per job: the job to run, then "done" (and whether
the horse retires); the parent watches the horse's pid as well, so a horse that dies is seen even when something
it forked still holds its end of the socket. Everything else is RQ's own code: the parent dequeues, prepares the
execution and monitors; the horse runs `perform_job` exactly as RQ's horse does.
"""
from __future__ import annotations

import json
import logging
import os
import random
import select
import signal
import socket
import time

from django.conf import settings
from django.db import connections
from rq import Worker
from rq.executions import Execution
from rq.worker import SHUTDOWN_SIGNAL

logger = logging.getLogger("rq.worker")

# An idle horse checks this often that the worker that forked it is still there (its end of the socket may be held
# open by another child of the worker, such as RQ's scheduler process, so end-of-file alone is not enough).
PARENT_CHECK_SECONDS = 5.0
RETIRE_TIMEOUT = 10.0
MESSAGE_LIMIT = 65536


class ComfyHubWorker(Worker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.horse_max_jobs = settings.WORKER_HORSE_MAX_JOBS
        self.horse_max_memory = settings.WORKER_HORSE_MAX_MEMORY_MB * 1024 * 1024
        self._kept: KeptHorse | None = None
        self._fork_hooks_registered = False

    # --- The parent's side -----------------------------------------------------------------------------------

    def work(self, *args, **kwargs):
        if not self._fork_hooks_registered:
            os.register_at_fork(before=self._before_fork, after_in_child=self._after_fork_in_child)
            self._fork_hooks_registered = True
        warm_up()
        self._kept = self._fork_kept_horse()  # before RQ starts its threads: a fork of one thread only
        try:
            return super().work(*args, **kwargs)
        finally:
            if self._kept is not None:  # teardown() did not run (RQ's bootstrap failed)
                self._kept.retire()
                self._kept = None

    def fork_work_horse(self, job, queue):
        """Hand the job to the kept horse (forking one if there is none, or if the one there died while idle)."""
        if self._kept is not None and self._kept.has_exited():
            self._forget_dead_horse("while it waited for work")
        message = {"job": job.id, "queue": queue.name, "execution": self.execution.id if self.execution else None}
        for attempt in (1, 2):
            if self._kept is None:
                self._kept = self._fork_kept_horse()
            try:
                self._kept.send(message)
                break
            except OSError:  # it died just now, between the check above and the send
                self._forget_dead_horse(f"before it got job {job.id}")
                if attempt == 2:
                    raise
        self._horse_pid = self._kept.pid
        self.procline(f"Job {job.id} handed to work horse {self._kept.pid}")

    def wait_for_horse(self):
        """Until the horse says the job is done (it stays: exit status 0 as far as RQ is concerned) or it dies.

        RQ's monitoring alarm interrupts this by raising HorseMonitorTimeoutException, and RQ then calls it again:
        KeptHorse keeps whatever it had got so far, so a second call goes on where the first was cut short.
        """
        kept = self._kept
        if kept is None or kept.pid != self._horse_pid:
            return super().wait_for_horse()
        reply = kept.receive()
        if reply.get("died"):
            ended = kept.reap()
            self._kept = None
            return ended
        if reply.get("retiring"):
            kept.reap()
            self._kept = None
        return kept.pid, os.EX_OK, None

    def _forget_dead_horse(self, when: str):
        pid, status, _rusage = self._kept.reap()
        self._kept = None
        self.log.warning("Worker %s: work horse %s died %s (%s); forking a new one",
                         self.name, pid, when, describe_exit(status))

    def kill_horse(self, sig=SHUTDOWN_SIGNAL):
        # Called from RQ's command thread too: read the pid once, and never killpg(getpgid(0)), which would be
        # this worker's own group, when no job runs. The horse leads a process group of its own.
        pid = self._horse_pid
        if not pid:
            return
        try:
            os.killpg(pid, sig)
            self.log.info("Worker %s: killed horse pid %s", self.name, pid)
        except ProcessLookupError:
            pass  # already gone

    def execute_job(self, job, queue):
        super().execute_job(job, queue)
        if self._kept is None and not self._stop_requested:
            self._kept = self._fork_kept_horse()  # now, while idle, rather than when the next job waits for it

    def handle_work_horse_killed(self, job, retpid, ret_val, rusage):
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        from . import operations

        try:
            operations.on_work_horse_killed(job.id, describe_exit(ret_val))
        except Exception:  # noqa: BLE001 - the sweep records it later; the worker must go on
            self.log.exception("Worker %s: could not record the death of job %s's horse", self.name, job.id)

    def teardown(self):
        if self._kept is not None:
            self._kept.retire()
            self._kept = None
        super().teardown()

    def _before_fork(self):
        # Whatever this process forks (its horse, RQ's scheduler process) must not hold copies of its Redis
        # sockets: if this worker died, such a copy would keep its blocking dequeue open in Redis, and Redis would
        # hand the next job to that dead dequeue, to nobody. Idle connections are closed (the next command opens
        # one again); the one RQ's command thread holds is closed in the child (below).
        try:
            self.connection.connection_pool.disconnect(inuse_connections=False)
        except Exception:  # noqa: BLE001 - never let a fork fail over this
            logger.warning("Could not close idle Redis connections before fork", exc_info=True)

    def _after_fork_in_child(self):
        try:
            if self.pubsub is not None:
                self.pubsub.reset()  # in the child this only closes its copy of the socket
        except Exception:  # noqa: BLE001
            logger.warning("Could not close the inherited Redis command socket", exc_info=True)
        if self._kept is not None:  # RQ's scheduler process: the horse's socket is none of its business
            self._kept.close()
            self._kept = None

    def _fork_kept_horse(self) -> KeptHorse:
        connections.close_all()  # never carry an open database connection across fork()
        parent_end, horse_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            parent_end.close()
            code = 1
            try:
                code = self._horse_main(horse_end, parent_pid)
            finally:
                os._exit(code)
        horse_end.close()
        try:
            os.setpgid(pid, pid)  # as the horse does itself: so a kill right after the fork finds its group
        except OSError:
            pass  # it got there first
        self.log.debug("Worker %s: forked work horse %s", self.name, pid)
        return KeptHorse(pid, parent_end)

    # --- The horse's side ------------------------------------------------------------------------------------

    def _horse_main(self, sock, parent_pid) -> int:
        # What RQ's main_work_horse() does first, once.
        os.setpgrp()
        random.seed()
        self.setup_work_horse_signals()
        self._is_horse = True
        self.log = logger
        os.environ["RQ_WORKER_ID"] = self.name
        try:
            warm_up()  # the copy-on-write faults of a first connection and query, paid while no job waits
        except Exception:  # noqa: BLE001 - a database hiccup now is the first job's to report, not a reason to die
            logger.warning("Work horse %s: warm-up failed", os.getpid(), exc_info=True)
        served = 0
        while True:
            self.procline(f"Work horse of {parent_pid}: waiting for a job")
            message = self._next_message(sock, parent_pid)
            if message is None or message.get("exit"):
                return 0
            ok = self._perform(message)
            served += 1
            retiring = not ok or served >= self.horse_max_jobs or resident_bytes() > self.horse_max_memory
            sock.send(json.dumps({"done": message["job"], "retiring": retiring}).encode())
            if retiring:
                return 0

    @staticmethod
    def _next_message(sock, parent_pid):
        while True:
            if select.select([sock], [], [], PARENT_CHECK_SECONDS)[0]:
                data = sock.recv(MESSAGE_LIMIT)
                return json.loads(data) if data else None  # nothing: the worker closed its end
            if os.getppid() != parent_pid:
                return None  # the worker died while we waited: nothing will come

    def _perform(self, message) -> bool:
        """Run one job as RQ's horse runs it; False when it failed."""
        from .operations import drop_unusable_connections

        job_id = message["job"]
        os.environ["RQ_JOB_ID"] = job_id
        try:
            drop_unusable_connections()  # before every job, also those that are no operation (the cron's)
            job = self.job_class.fetch(job_id, connection=self.connection, serializer=self.serializer)
            queue = next((q for q in self.queues if q.name == message["queue"]), None) or self.queue_class(
                message["queue"], connection=self.connection, job_class=self.job_class, serializer=self.serializer
            )
            self.execution = (
                Execution.fetch(message["execution"], job_id, connection=self.connection)
                if message["execution"] else None
            )
            return self.perform_job(job, queue)
        except BaseException:  # noqa: BLE001 - as RQ's horse: exit non-zero, the worker records the failure
            logger.exception("Work horse %s: could not run job %s", os.getpid(), job_id)
            os._exit(1)


class KeptHorse:
    """The parent's handle on a kept work horse: its pid, a pidfd to watch it by, its end of the socket pair, and
    what it has said about the job at hand.

    `receive()` may be cut short by an exception raised from a signal handler (RQ's monitoring alarm) at any
    bytecode. It never loses a reply to that: it looks at the reply without taking it off the socket, keeps it,
    and only then takes it, in a way that a second call can repeat harmlessly.
    """

    DIED = {"died": True}

    def __init__(self, pid, sock):
        self.pid = pid
        self.sock = sock
        try:
            self.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfds (Linux < 5.3): end-of-file on the socket tells instead
            self.pidfd = None
        self.reply = None
        self.busy = False  # sent a job whose reply is not taken off the socket yet
        self.ended = None

    def send(self, message: dict):
        self.reply, self.busy = None, True
        self.sock.send(json.dumps(message).encode())

    def has_exited(self) -> bool:
        watched = [self.pidfd] if self.pidfd is not None else [self.sock]
        if not select.select(watched, [], [], 0)[0]:
            return False
        return self.pidfd is not None or self._peek() == b""

    def receive(self) -> dict:
        """The horse's reply to the job it was sent: {"done": ..., "retiring": ...}, or DIED."""
        while self.reply is None:
            ready = select.select([self.sock] + ([self.pidfd] if self.pidfd is not None else []), [], [])[0]
            data = self._peek()
            if data:
                self.reply = json.loads(data)
            elif data == b"" or self.pidfd in ready:
                self.reply = self.DIED
        if self.busy:
            try:
                self.sock.recv(MESSAGE_LIMIT, socket.MSG_DONTWAIT)
            except (BlockingIOError, ConnectionError):
                pass  # taken already by a call that was cut short, or nothing to take (it died)
            self.busy = False
        return self.reply

    def _peek(self):
        """The next message without taking it; b"" at end of file; None when there is none yet."""
        try:
            return self.sock.recv(MESSAGE_LIMIT, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except ConnectionError:
            return b""

    def reap(self):
        """Wait for the horse to exit: (pid, status, rusage) as os.wait4() gives them."""
        self.close()
        if self.ended is None:
            try:
                self.ended = os.wait4(self.pid, 0)
            except ChildProcessError:  # reaped by a call that was cut short
                self.ended = (self.pid, None, None)
        return self.ended

    def retire(self):
        """Ask an idle horse to exit and wait for it (kill it if it does not go). A busy one (the worker is going
        down mid-job after an error of its own) is left to finish its job, as RQ leaves its horse; it exits then."""
        if not self.busy:
            try:
                self.sock.send(json.dumps({"exit": True}).encode())
            except OSError:
                pass  # gone already
        self.close()
        if self.busy:
            return
        deadline = time.monotonic() + RETIRE_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.02)
        logger.warning("Work horse %s did not exit when asked; killing it", self.pid)
        try:
            os.killpg(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (OSError, ChildProcessError):
            pass

    def close(self):
        self.sock.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def describe_exit(status) -> str:
    if status is None:
        return "exit status unknown"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if number == signal.SIGKILL:
            return f"killed by {name}: the out-of-memory killer, a person, or its worker after a timeout"
        return f"killed by {name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def warm_up():
    """Run the ORM's first query (the apps import their jobs when Django starts), so what forks from here, or runs
    here, starts warm. The connection stays open: the worker closes its connections before every fork."""
    import uuid

    from .models import Operation

    Operation.objects.filter(pk=uuid.UUID(int=0)).exists()
