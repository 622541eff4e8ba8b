"""Work over instances on several nodes: split per node, each node's part on that node's queue. The operation a person
sees runs its own node's part itself (a part queued for its own worker could wait behind it forever) and waits for
the other nodes' operations, cancel-aware, then reports every node's outcome as one result."""
from __future__ import annotations

from dataclasses import dataclass

from comfyhub import operations, queues
from comfyhub.models import Operation
from comfyhub.operations import OperationCancelled, OperationError

from . import suboperations
from .models import LOCAL_NODE, Instance, Node

POLL_SECONDS = 0.25


def by_node(instances) -> dict[int, tuple[Node, list]]:
    """{node id: (node, its instances in the order given)}, nodes in the order they first appear."""
    groups: dict[int, tuple[Node, list]] = {}
    for instance in instances:
        groups.setdefault(instance.node_id, (instance.node, []))[1].append(instance)
    return groups


def local_and_others(instance_pks) -> tuple[list[Instance], dict]:
    """(the instances on `local`, by_node() of the others): what the hub does itself and what it asks agents for."""
    found = {i.pk: i for i in Instance.objects.select_related("node").filter(pk__in=instance_pks)}
    groups = by_node([found[pk] for pk in instance_pks if pk in found])
    local = next((pk for pk, (node, _) in groups.items() if node.name == LOCAL_NODE), None)
    return (groups.pop(local)[1] if local is not None else []), groups


def nodes_taking_jobs(instances) -> list[Node]:
    """The nodes of `instances` in the order they first appear, or NodeUnavailable (refuse_unavailable) before
    anything is queued."""
    nodes = [node for node, _ in by_node(instances).values()]
    refuse_unavailable(nodes)
    return nodes


def refuse_unavailable(nodes) -> None:
    """Raise NodeUnavailable for the first node whose agent takes no jobs now: the whole request is refused before
    anything is queued, rather than done on some nodes and left waiting on another."""
    for node in nodes:
        if refusal := node.refusal():
            raise operations.NodeUnavailable(refusal)


@dataclass
class Part:
    node: Node
    job: str  # dotted path of an @operation_job
    kwargs: dict


def run_parts(report, parts: list[Part], here=None) -> tuple[dict, dict]:
    """Queue each part on its node, run `here()` (this node's own part) meanwhile, then wait for the parts.
    Returns (here's result, {node name: {"operation", "status", "result", "error"}})."""
    asked_by = Operation.objects.filter(pk=report.operation_id).values_list("requested_by", flat=True).first()
    user = None
    if asked_by is not None:
        from django.contrib.auth import get_user_model

        user = get_user_model().objects.filter(pk=asked_by).first()
    queued: dict[str, tuple[Node, Operation]] = {}
    outcomes: dict[str, dict] = {}
    for part in parts:
        try:
            operation = operations.enqueue(part.job, node=part.node, user=user, **part.kwargs)
        except queues.QueueUnavailable as exc:
            outcomes[part.node.name] = {"operation": None, "status": "not queued", "result": None, "error": str(exc)}
            report.log(f"node {part.node.name}: not queued: {exc}", "ERROR")
            continue
        queued[part.node.name] = (part.node, operation)
        report.log(f"node {part.node.name}: its part is operation {operation.pk} on {operation.queue_name}")
    try:
        mine = here() if here is not None else None
        outcomes.update(_wait(report, queued))
    except OperationCancelled:
        for _, operation in queued.values():
            try:
                operations.operation_cancel(operation=operation)
            except OperationError:
                pass  # it ended meanwhile
        raise
    return mine, outcomes


def _wait(report, queued: dict[str, tuple[Node, Operation]]) -> dict:
    outcomes = {}
    for name, ended in suboperations.wait(report, queued, poll_seconds=POLL_SECONDS, cancel_running=False).items():
        row = ended.row
        if not ended.refusal:
            outcomes[name] = _outcome(row, ended.operation)
        elif ended.cancelled:
            # Its agent went away before taking it: nothing is left queued for an agent that is not there.
            outcomes[name] = {"operation": str(row.pk), "status": "cancelled", "result": None,
                              "error": f"{ended.refusal} Its part was not started and was cancelled."}
        else:
            outcomes[name] = {"operation": str(row.pk), "status": row.status, "result": None,
                              "error": f"{ended.refusal} Its part (operation {row.pk}) was running when its agent "
                                       "went silent; see that operation for how it ends."}
    for name, outcome in outcomes.items():
        report.log(f"node {name}: {outcome['status']}" + (f": {outcome['error']}" if outcome["error"] else ""),
                   "INFO" if outcome["status"] == Operation.Status.SUCCEEDED else "ERROR")
    return outcomes


def _outcome(row: Operation | None, operation: Operation) -> dict:
    if row is None:
        return {"operation": str(operation.pk), "status": "deleted", "result": None,
                "error": "its operation was deleted while it ran"}
    return {"operation": str(row.pk), "status": row.status, "result": row.result, "error": row.error}


def failed_nodes(outcomes: dict) -> list[str]:
    return [name for name, outcome in outcomes.items() if outcome["status"] != Operation.Status.SUCCEEDED]


def node_failure(what: str, outcomes: dict, result: dict) -> OperationError:
    names = failed_nodes(outcomes)
    detail = "; ".join(f"{name}: {outcomes[name]['error'] or outcomes[name]['status']}" for name in names)
    error = OperationError(f"{what} failed on node(s) {', '.join(names)}: {detail}")
    error.result = result
    return error


# --- Copying workflows to instances on other nodes ------------------------------------------------------------------

def copy_workflows(source: Instance, targets: list[Instance], paths: list[str], on_conflict: str, report) -> dict:
    """On the source's node: read `paths` once, write them into the targets on this node, and have each other
    node's agent write them into its own targets."""
    from . import workflows

    contents, files = workflows.read_for_copy(source, paths, report)
    groups = by_node(targets)
    here = groups.pop(source.node_id, (source.node, []))[1]
    parts = [Part(node, "instances.jobs_nodes.write_workflows",
                  {"source_id": source.instance_id, "target_pks": [t.pk for t in node_targets], "contents": contents,
                   "on_conflict": on_conflict})
             for node, node_targets in groups.values()] if contents else []
    written, outcomes = run_parts(
        report, parts, here=lambda: workflows.write_copies(source.instance_id, here, contents, on_conflict, report))
    files += written
    for name, outcome in outcomes.items():
        if outcome["status"] == Operation.Status.SUCCEEDED:
            files += (outcome["result"] or {}).get("files", [])
        else:
            node_targets = next(t for node, t in groups.values() if node.name == name)
            files += [{"source": source.instance_id, "target": target.instance_id, "path": relpath,
                       "result": f"failed: node {name}: {outcome['error'] or outcome['status']}"}
                      for target in node_targets for relpath in contents]
    summary = {**copy_summary(files), "nodes": outcomes}
    if summary["failed"] and summary["failed"] == len(files):
        raise OperationError("Nothing was copied: " + "; ".join(f"{f['path']}: {f['result']}"
                                                                 for f in files if f["result"])[:2000])
    return summary


def copy_summary(files: list[dict]) -> dict:
    """As instances.jobs.copy_workflows sums up a copy."""
    failed = [f for f in files if f["result"].startswith(("failed", "refused"))]
    skipped = sum(1 for f in files if f["result"].startswith("skipped"))
    return {"files": files, "copied": len(files) - len(failed) - skipped, "skipped": skipped, "failed": len(failed)}


# --- Installing a library workflow on several nodes -----------------------------------------------------------------

def install_here(version_pk, instance_pks, report) -> dict:
    """Write the library version into these instances, all on this node."""
    from . import workflows
    from .models import WorkflowVersion

    version = WorkflowVersion.objects.select_related("entry").get(pk=version_pk)
    done = []
    for instance in Instance.objects.select_related("node").filter(pk__in=instance_pks):
        outcome, path = workflows.install(version, instance)
        report.log(f"{version} -> {instance}: {outcome} ({path})")
        done.append({"instance": instance.instance_id, "result": outcome, "path": path})
    return {"version": str(version), "installs": done}


def install_workflow(version_pk, instance_pks, report) -> dict:
    """On the hub: install the version into local's instances here and ask each other node's agent for its own."""
    here, others = local_and_others(instance_pks)
    parts = [Part(node, "instances.jobs.install_workflow",
                  {"version_pk": version_pk, "instance_pks": [i.pk for i in node_instances]})
             for node, node_instances in others.values()]
    mine, outcomes = run_parts(report, parts, here=lambda: install_here(version_pk, [i.pk for i in here], report) if here else None)
    installs = list((mine or {}).get("installs", []))
    version = (mine or {}).get("version")
    for outcome in outcomes.values():
        installs += (outcome["result"] or {}).get("installs", [])
        version = version or (outcome["result"] or {}).get("version")
    result = {"version": version, "installs": installs, "nodes": outcomes}
    if failed_nodes(outcomes):
        raise node_failure("Installing the workflow", outcomes, result)
    return result
