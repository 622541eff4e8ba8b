"""The RQ worker ComfyHub runs (`RQ["WORKER_CLASS"]`): RQ's stock forking `Worker`, a fresh work horse per job,
plus three things RQ lacks: no Redis or database socket crosses a fork, a horse killed mid-job fails its operation
at once, and stopping a job never kills the worker itself.
"""
from __future__ import annotations

import logging
import os
import signal
import uuid

from django.db import DatabaseError, connections
from django.utils import timezone
from rq import Worker
from rq.worker import SHUTDOWN_SIGNAL

logger = logging.getLogger("rq.worker")


class ComfyHubWorker(Worker):
    _fork_hooks_registered = False

    def work(self, *args, **kwargs):
        if not self._fork_hooks_registered:
            # At-fork hooks rather than an override of fork_work_horse(): RQ's scheduler process is forked too.
            os.register_at_fork(before=self._before_fork, after_in_child=self._after_fork_in_child)
            self._fork_hooks_registered = True
        self._warm_up()
        return super().work(*args, **kwargs)

    def _warm_up(self):
        """Run the runner's first statement once here, before any fork: the ORM's lazy imports and caches are then
        made in this process and every horse inherits them, instead of each horse making them again under
        copy-on-write (a third to a half of its bookkeeping on a busy host; bench/roundtrip.py). The connection
        closes before the fork."""
        from .models import Operation

        try:
            Operation.objects.filter(pk=uuid.UUID(int=0), status=Operation.Status.QUEUED).update(
                status=Operation.Status.RUNNING, heartbeat_at=timezone.now()
            )
        except DatabaseError:  # the first job will say what is wrong with the database
            logger.warning("Worker %s: could not warm up the ORM", self.name, exc_info=True)

    def kill_horse(self, sig=SHUTDOWN_SIGNAL):
        # RQ's own kill_horse() signals os.getpgid(horse_pid): with no horse (a stop command that races the end of
        # its job, from RQ's command thread) that is getpgid(0), the worker's own group, and so it is for a horse
        # forked a moment ago that has not made a group of its own yet. Read the pid once, and signal the horse
        # alone until its group exists.
        pid = self._horse_pid
        if not pid:
            return
        try:
            os.killpg(pid, sig)  # the horse leads a group of its own (os.setpgrp() right after the fork)
        except ProcessLookupError:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return  # already gone
        self.log.info("Worker %s: killed horse pid %s", self.name, pid)

    def handle_work_horse_killed(self, job, retpid, ret_val, rusage):
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        from . import operations

        try:
            operations.on_work_horse_killed(job.id, describe_exit(ret_val))
        except Exception:  # noqa: BLE001 - the sweep records it later; the worker must go on
            self.log.exception("Worker %s: could not record the death of job %s's horse", self.name, job.id)

    def _before_fork(self):
        # Whatever this process forks (a work horse, RQ's scheduler process) must not hold copies of its sockets.
        # Redis: if this worker died, such a copy would keep its blocking dequeue open in Redis, and Redis would
        # hand the next job to that dead dequeue, to nobody. Idle connections are closed (the next command opens
        # one again); the one RQ's command thread holds is closed in the child (below). The database: parent and
        # child would talk over one connection; the horse opens its own.
        try:
            connections.close_all()
        except Exception:  # noqa: BLE001 - never let a fork fail over this
            logger.warning("Could not close the database connections before fork", exc_info=True)
        try:
            self.connection.connection_pool.disconnect(inuse_connections=False)
        except Exception:  # noqa: BLE001
            logger.warning("Could not close idle Redis connections before fork", exc_info=True)

    def _after_fork_in_child(self):
        try:
            if self.pubsub is not None:
                self.pubsub.reset()  # in the child this only closes its copy of the socket
        except Exception:  # noqa: BLE001
            logger.warning("Could not close the inherited Redis command socket", exc_info=True)


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
