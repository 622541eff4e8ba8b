"""Rolling an image update out to instances: refresh the image (rebuild or pull), then restart the instances that
run it one at a time, each healthy before the next, and put one that does not come up back on its old image."""
from __future__ import annotations

from dataclasses import dataclass, field

from django.core.exceptions import ValidationError
from django.utils import timezone

from comfyhub import operations
from comfyhub.models import Operation
from comfyhub.operations import OperationError

from . import containers, docker_engine, fanout, health, runtime
from .models import LOCAL_NODE, Instance, Node


def image_update(*, instances: list[Instance], refresh: bool = True, user=None):
    """Enqueue one rollout over `instances`: per node and image, refresh the image (unless not `refresh`: then what
    the tag names now is used, e.g. after `docker load`), then restart those meant to run, one at a time."""
    if not instances:
        raise ValidationError({"instances": ["Name the instances whose image to update, or choose all of them."]})
    problems = [f"{instance}: {problem}" for instance in instances
                if (problem := runtime.image_problem(instance.image))]
    if problems:
        raise ValidationError({"image": problems})
    nodes = fanout.nodes_taking_jobs(instances)
    # One instance: its operation, listed on its page. Several: the rollout's own, its log names each one. On one
    # node it runs on that node's queue; on several, the hub rolls out local's and each other node's agent its own.
    target = instances[0] if len(instances) == 1 else None
    job, node = ("instances.jobs.update_image", nodes[0]) if len(nodes) == 1 \
        else ("instances.jobs_nodes.update_image_on_nodes", None)
    return operations.enqueue(job, target=target, node=node, user=user,
                              instance_pks=[instance.pk for instance in instances], refresh=refresh)


@dataclass
class _Group:
    """The chosen instances on one node that run one image reference."""

    node: Node
    image: str
    instances: list[Instance] = field(default_factory=list)


def roll_out(instances: list[Instance], *, refresh: bool, report) -> dict:
    """Refresh each (node, image) the instances use, then move the instances meant to run onto the image the tag
    names now, one at a time; the first that does not come up is put back on its old image and ends the rollout
    (OperationError), the instances after it untouched."""
    groups: dict[tuple[int, str], _Group] = {}
    for instance in instances:
        groups.setdefault((instance.node_id, instance.image), _Group(instance.node, instance.image))
        groups[(instance.node_id, instance.image)].instances.append(instance)
    order = [instance for group in groups.values() for instance in group.instances]
    result = {"images": [], "instances": [], "restarted": 0}
    moved: list[str] = []
    for group in groups.values():
        engine = containers.engine_for(group.instances[0], "Nothing was restarted on that node.")
        try:
            report.progress(5 + 90 * order.index(group.instances[0]) / len(order),
                            f"refreshing {group.image} on {group.node}")
            before, new_id = _refresh(engine, group, refresh=refresh, report=report)
            result["images"].append({"node": group.node.name, "image": group.image, "before": before,
                                     "now": new_id, "refreshed": refresh})
            outcomes = []
            for instance in group.instances:
                position = order.index(instance)
                share = _Share(report, 5 + 90 * position / len(order), 5 + 90 * (position + 1) / len(order),
                               instance.instance_id)
                outcome = _move(engine, instance, new_id, share, moved=moved,
                                untouched=[later.instance_id for later in order[position + 1:]])
                outcomes.append(outcome["outcome"])
                result["instances"].append({"instance": instance.instance_id, **outcome})
                if outcome["outcome"] == "updated":
                    moved.append(instance.instance_id)
            if all(outcome == "up to date" for outcome in outcomes):
                report.log(f"{group.image} on node {group.node}: already up to date (every instance on it runs "
                           f"{_short(new_id)}); nothing restarted.")
        finally:
            engine.close()
    result["restarted"] = len(moved)
    report.progress(100, f"{len(moved)} instance(s) restarted on the new image")
    return result


def _refresh(engine, group: _Group, *, refresh: bool, report) -> tuple[str | None, str]:
    """(the id the tag named before, the id it names now): rebuilt or pulled with `refresh`, else as it is."""
    before = docker_engine.image_id(engine, group.image)
    if not refresh:
        if before is None:
            raise OperationError(
                f"The image {group.image} is not on node {group.node}, and --no-pull fetches nothing: load it there "
                "(docker load) or update without --no-pull. Nothing was restarted on that node.")
        report.log(f"{group.image} names {_short(before)} on node {group.node} (used as it is: not pulled or "
                   "rebuilt).")
        return before, before
    from . import images

    try:
        _, now = images.refresh_image(engine, group.image, report)
    except (docker_engine.EngineError, images.ImageError) as exc:
        raise OperationError(f"{exc} Nothing was restarted on node {group.node} for {group.image}.") from exc
    if now == before:
        report.log(f"{group.image} on node {group.node}: already up to date (still {_short(now)}).")
    else:
        report.log(f"{group.image} on node {group.node}: {_short(before) if before else 'not here'} -> "
                   f"{_short(now)}.")
    return before, now


def _move(engine, instance: Instance, new_id: str, report: "_Share", *, untouched: list[str],
          moved: list[str]) -> dict:
    """Restart `instance` on `new_id` if it runs another image and is meant to run; roll it back if it does not
    come up. Returns {"outcome": ..., ...}."""
    made_from = docker_engine.container_image_id(engine, instance.container_name)
    if made_from is None:
        report.log("has no container: it will use the new image at its next start.")
        return {"outcome": "next start"}
    if made_from == new_id:
        report.log(f"already runs {_short(new_id)}.")
        return {"outcome": "up to date"}
    with containers.instance_lock(instance, report):
        instance.refresh_from_db()
        # Looked at again under the lock: another operation may have recreated it meanwhile.
        made_from = docker_engine.container_image_id(engine, instance.container_name)
        if made_from in (None, new_id):
            report.log(f"already runs {_short(new_id)}." if made_from else
                       "has no container any more: it will use the new image at its next start.")
            return {"outcome": "up to date" if made_from else "next start"}
        if instance.desired_state != Instance.DesiredState.RUNNING:
            report.log(f"is stopped: it will use the new image ({_short(new_id)}) at its next start.")
            return {"outcome": "next start"}
        failed_before = {c.get("check") for c in (instance.health or {}).get("checks", []) if not c.get("ok")}
        report.log(f"restarting on {_short(new_id)} (its container ran {_short(made_from)}).")
        try:
            containers.restart(instance, report)
            if problem := _health_problem(engine, instance, failed_before):
                raise OperationError(problem)
        except (OperationError, docker_engine.EngineError) as exc:
            _roll_back(engine, instance, made_from, new_id, str(exc), report, untouched=untouched, moved=moved)
        report.log(f"healthy on {_short(new_id)}.")
        return {"outcome": "updated", "image_id": new_id, "healthy_at": timezone.now().isoformat()}


def _health_problem(engine, instance: Instance, failed_before: set) -> str:
    """The health checks that fail now and did not before the restart, as a sentence ("" when none does)."""
    state = docker_engine.container_state(engine, instance.container_name)
    checks = health.isolation_checks(instance, state, health.system_stats(instance),
                                     docker_engine.list_containers(engine))
    failing = [c for c in checks if not c["ok"] and c["check"] not in failed_before]
    return "; ".join(f"health check '{c['check']}' fails: {c['detail']}" for c in failing)


def _roll_back(engine, instance: Instance, old_id: str, new_id: str, why: str, report, *, untouched: list[str],
               moved: list[str]):
    """Put `instance` back on `old_id` (re-tag it, recreate the container, wait until healthy), then end the rollout
    with an OperationError that says why and what was left where."""
    report.log(f"did not come up on {_short(new_id)}: {why}", "ERROR")
    report.log(f"putting it back on the old image {old_id} (re-tagging it as {instance.image}).", "WARNING")
    reason = _reason(why, _last_log_line(engine, instance))
    not_touched = f"the instances after it ({', '.join(untouched)}) were not touched" if untouched else \
        "no instance after it was touched"
    try:
        docker_engine.tag_image(engine, old_id, instance.image)
        if moved:
            report.log(f"{', '.join(moved)} keep running the new image {_short(new_id)}; with the tag back on the "
                       "old one, their pages say 'image updated' (a restart would put them on the old image).",
                       "WARNING")
        containers.start(instance, report)
    except (OperationError, docker_engine.EngineError) as exc:
        raise OperationError(
            f"{instance} did not come up on the new image ({reason}), and putting it back on the old image {old_id} "
            f"failed too: {_reason(str(exc), '')}. Check its logs (instances logs {instance}); {not_touched}; the "
            f"new image is {new_id}.") from exc
    report.log(f"back on the old image {_short(old_id)}, healthy.")
    raise OperationError(
        f"{instance} did not come up on the new image ({reason}): put back on the old image {old_id}; "
        f"{not_touched}; the new image is {new_id} (tag it as {instance.image} to retry).")


def _reason(message: str, last_log_line: str) -> str:
    """Why a start failed, in one line: the first line of its error (the whole error is in the operation's log) and
    the container's last log line."""
    first = message.partition("\n")[0].rstrip(". ").removesuffix(" Last log lines:").rstrip(". ")
    return f"{first}; last log line: {last_log_line}" if last_log_line else first


def _last_log_line(engine, instance: Instance) -> str:
    """The container's last line of output ("" when it has none or the engine does not answer): read before the
    rollback recreates the container, which takes its log with it."""
    try:
        logs = docker_engine.container_logs(engine, instance.container_name, tail=5)
    except docker_engine.EngineError:
        return ""
    return next((line.strip() for line in reversed(logs.splitlines()) if line.strip()), "")[:300]


def _short(image_id: str | None) -> str:
    return (image_id or "an unknown image")[:19]


class _Share:
    """The report of one instance's step: its progress fills the instance's share of the rollout's bar, and its
    log lines and messages are prefixed with the instance's id."""

    def __init__(self, report, low: float, high: float, name: str):
        self.report, self.low, self.high, self.name = report, low, high, name

    def log(self, message: str, level: str = "INFO"):
        self.report.log(f"{self.name}: {message}", level)

    def progress(self, percent: float, message: str | None = None):
        self.report.progress(self.low + (self.high - self.low) * percent / 100,
                             f"{self.name}: {message}" if message is not None else None)

    def check_cancelled(self):
        self.report.check_cancelled()


def roll_out_over_nodes(instance_pks, refresh: bool, report) -> dict:
    """On the hub: roll the update out over local's instances here and over each other node's by its agent; a
    node's rollout stopping at an instance that did not come up leaves the other nodes' rollouts alone."""
    here, others = fanout.local_and_others(instance_pks)
    if not here and not others:
        raise OperationError("None of the instances exists any more (deleted while this operation waited).")
    parts = [fanout.Part(node, "instances.jobs.update_image",
                         {"instance_pks": [i.pk for i in node_instances], "refresh": refresh})
             for node, node_instances in others.values()]
    local_error = None

    def local_part():
        nonlocal local_error
        try:
            return roll_out(here, refresh=refresh, report=report) if here else None
        except OperationError as exc:  # the other nodes' rollouts go on; said at the end
            local_error = str(exc)
            return None

    mine, outcomes = fanout.run_parts(report, parts, here=local_part)
    if here:
        status = Operation.Status.FAILED if local_error else Operation.Status.SUCCEEDED
        outcomes = {LOCAL_NODE: {"operation": str(report.operation_id), "status": status, "result": mine,
                                 "error": local_error or ""}, **outcomes}
    result = {"images": [], "instances": [], "restarted": 0, "nodes": outcomes}
    for outcome in outcomes.values():
        part = outcome["result"] or {}
        result["images"] += part.get("images", [])
        result["instances"] += part.get("instances", [])
        result["restarted"] += part.get("restarted", 0)
    if fanout.failed_nodes(outcomes):
        raise fanout.node_failure("The image update", outcomes, result)
    return result
