"""Reads of an instance's container or folders, served where they are: in this process for its own node, else by its
node's agent. A page or command on the hub that shows an instance's logs, workflows, custom nodes, drift or storage
findings asks its node through `call_on_node`, since only there are its Docker engine and folders.

These reads are not Operations: they change nothing, nobody follows them, and a person waits for them on a page.
So no Operation row is written: a plain RQ job goes on the node's quick queue, the caller waits a few seconds for
its result, and a job nobody waits for any more is cancelled so it never runs later. (The one exception is the
storage check's --fix, whose safe, repeatable fixes of a node's folders are made there the same way.)"""
from __future__ import annotations

import logging
import time

from django.conf import settings
from django.utils.module_loading import import_string
from redis.exceptions import RedisError
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import JobStatus
from rq.results import Result

from comfyhub import queues

from .models import Instance

logger = logging.getLogger(__name__)

# How long a page waits for a node's agent to answer a read (seconds).
READ_TIMEOUT = 15
# How long the agent keeps a read's answer for the waiting caller, and may run one at most (seconds).
RESULT_TTL = 60
READ_JOB_TIMEOUT = 120


class NodeReadError(Exception):
    """The node's agent could not be asked, did not answer in time, or its read failed: the message says which."""


def node_read(func):
    """Mark a function as one an agent may run for `call_on_node`: it takes JSON-able keyword arguments (ids, never
    rows), returns plain data and changes nothing."""
    func.node_read = True
    return func


def served_here(node) -> bool:
    """Whether this process is `node` (the hub and its workers are `local`; an agent is the node it was started
    as, NODE_NAME): then its engine and folders are this host's."""
    return node.name == settings.NODE_NAME


def call_on_node(node, func: str, kwargs: dict, *, timeout: float | None = None):
    """Run the read `func` (the dotted path of a @node_read function) with `kwargs` where `node`'s instances are,
    and return what it returns. In this process when it is that node (`local` for the hub); else on the node's
    quick queue, taken by its agent, waiting at most `timeout` seconds (READ_TIMEOUT).

    Raises NodeReadError at once, queueing nothing, when the node takes no jobs (offline, waiting for approval,
    never reported: Node.refusal() says so, as for operations) or Redis does not answer; after `timeout` when the
    agent did not answer (the job is cancelled, so it does not run later); and with the read's own error message
    when it failed there. Errors of a read run in this process are its own (a WorkflowError, an EngineError...)."""
    if served_here(node):
        return import_string(func)(**kwargs)
    timeout = READ_TIMEOUT if timeout is None else timeout
    refusal = node.refusal()
    if refusal:
        raise NodeReadError(refusal)
    queue_name = node.job_queue("default")
    try:
        job = queues.get_queue(queue_name).enqueue(
            run_read, kwargs={"func": func, "kwargs": kwargs}, description=f"read {func} on {node.name}",
            # Never taken once nobody waits for it: the job's key expires with the wait.
            ttl=max(1, int(timeout) + 1), result_ttl=RESULT_TTL, failure_ttl=RESULT_TTL,
            job_timeout=READ_JOB_TIMEOUT)
        result = _wait_for_result(job, timeout)
    except RedisError as exc:
        raise NodeReadError(queues.unavailable_message(exc)) from exc
    if result is None:
        _abandon(job)
        raise NodeReadError(
            f"Node {node.name}'s agent did not answer within {timeout:g} s; it may be busy (a long job) or offline. "
            "Nothing was left queued; try again in a moment.")
    if result.type == Result.Type.SUCCESSFUL:
        answer = result.return_value
        if isinstance(answer, dict) and "error" in answer:
            raise NodeReadError(answer["error"])
        return answer["value"]
    # The job itself died on the agent (killed, timed out): the last line of RQ's record, never a traceback.
    lines = (result.exc_string or "").strip().splitlines()
    raise NodeReadError(f"The read failed on node {node.name}: {lines[-1] if lines else result.type.name.lower()}")


def _wait_for_result(job, timeout: float):
    """The job's result, or None when none came within `timeout` seconds (Redis streams: no polling)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        # Blocks until the agent writes the result stream (whole milliseconds: rq's own wait takes whole seconds).
        if job.connection.xread({Result.get_key(job.id): "0-0"}, count=1, block=max(1, int(min(left, 5.0) * 1000))):
            return job.latest_result()


def _abandon(job):
    """Make sure a read nobody waits for any more never runs later (or stops, if it runs now)."""
    try:
        status = job.get_status(refresh=True)
        if status == JobStatus.STARTED:
            send_stop_job_command(job.connection, job.id)
        else:
            job.cancel()
            job.delete()
    except (NoSuchJobError, InvalidJobOperation):
        pass  # already gone (its key expired) or finishing right now
    except RedisError as exc:
        logger.warning("A read on %s nobody waits for could not be cancelled: %s", job.origin, exc)


READ_MODULES = ("instances.", "storage_app.")


def run_read(*, func: str, kwargs: dict):
    """The RQ job on the agent: run the read and return {"value": ...}, or {"error": message} when it failed (its
    message is what the page shows; the traceback stays in the agent's log)."""
    try:
        # Only ComfyHub's own modules are imported at all (importing is running code), then only marked reads run.
        if not func.startswith(READ_MODULES) or func.count(".") < 2:
            raise NodeReadError(f"{func} is not a read an agent serves.")
        target = import_string(func)
        if not getattr(target, "node_read", False):
            raise NodeReadError(f"{func} is not a read an agent serves.")
        return {"value": target(**kwargs)}
    except Exception as exc:  # noqa: BLE001 - any failure is the caller's to show
        logger.warning("Read %s failed on node %s", func, settings.NODE_NAME, exc_info=True)
        return {"error": str(exc).strip() or type(exc).__name__}


def instance_here(instance_id: str) -> Instance:
    """The instance a read on this node is about, with what reads use; refused when it is not (or no longer) on
    this node."""
    instance = Instance.objects.select_related("node", "template").filter(instance_id=instance_id).first()
    if instance is None:
        raise NodeReadError(f"There is no instance '{instance_id}' any more.")
    if not served_here(instance.node):
        raise NodeReadError(f"Instance {instance_id} is on node {instance.node.name} now, not on "
                            f"{settings.NODE_NAME}; reload the page.")
    return instance


# --- An instance's container logs ----------------------------------------------------------------------------------

def instance_logs(instance: Instance, tail: int) -> str:
    """The last `tail` lines of the instance's container, from its node's engine. EngineError here, NodeReadError
    from another node."""
    from . import services

    if served_here(instance.node):
        return services.instance_logs(instance=instance, tail=tail)
    return call_on_node(instance.node, "instances.remote.instance_logs_of",
                        {"instance_id": instance.instance_id, "tail": int(tail)})


@node_read
def instance_logs_of(instance_id: str, tail: int) -> str:
    from . import services

    return services.instance_logs(instance=instance_here(instance_id), tail=tail)


# --- What a restart would change (the instance page, polled) --------------------------------------------------------

# The instance page polls; a node that does not answer soon is shown as "nothing known", as an unreachable engine is.
PAGE_READ_TIMEOUT = 3


def pending_change_kinds(instance: Instance) -> set[str]:
    """services.instance_pending_change_kinds, asked of the instance's node: its container and image are inspected
    on its engine. Empty when that node cannot be asked (nothing is known, as with its engine down)."""
    from . import services

    if served_here(instance.node):
        return services.instance_pending_change_kinds(instance)
    try:
        return set(call_on_node(instance.node, "instances.remote.pending_change_kinds_of",
                                {"instance_id": instance.instance_id}, timeout=PAGE_READ_TIMEOUT))
    except NodeReadError:
        return set()


@node_read
def pending_change_kinds_of(instance_id: str) -> list[str]:
    from . import services

    return sorted(services.instance_pending_change_kinds(instance_here(instance_id)))


# --- Images a node's engine lacks (the dashboard's notice) ----------------------------------------------------------

def absent_images_on(docker_host: str | None, images: list[str]) -> list[str] | None:
    """Which of `images` the engine at `docker_host` (None: this host's default) does not have; None when it does
    not answer. Docker only, no database (an agent's heartbeat thread calls it)."""
    from django.conf import settings as current

    from . import docker_engine

    try:
        engine = docker_engine.client(docker_host, timeout=current.DOCKER_PING_TIMEOUT)
        try:
            return [image for image in images if not docker_engine.image_present(engine, image)]
        finally:
            engine.close()
    except docker_engine.EngineError:
        return None


@node_read
def absent_images_of(images: list[str]) -> list[str] | None:
    """Which of `images` this node's engine does not have; None when the engine does not answer."""
    from django.conf import settings as current

    from .models import Node

    node = Node.objects.filter(name=current.NODE_NAME).first()
    return absent_images_on((node.docker_host if node is not None else "") or None, images)
