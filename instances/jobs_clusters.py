"""Cluster jobs (instances/clusters.py): thin. A cluster's operation runs on its master's node; a member on another
node has its part done by that node's agent (instances.fanout), since only there are its folder and engine."""
from __future__ import annotations

from django.conf import settings
from django.utils import timezone

from comfyhub.operations import OperationError, operation_job

from . import clusters, containers, customnodes, fanout, probes
from .models import Cluster, CustomNode, Instance, Node


def _cluster(cluster_pk) -> Cluster:
    cluster = Cluster.objects.select_related("master__node").filter(pk=cluster_pk).first()
    if cluster is None:
        raise OperationError("The cluster no longer exists (deleted while this operation waited).")
    return cluster


def _instance(instance_pk) -> Instance:
    instance = Instance.objects.select_related("node").filter(pk=instance_pk).first()
    if instance is None:
        raise OperationError("The instance no longer exists (deleted while this operation waited).")
    return instance


def _here(report) -> str:
    """The node this operation runs on (its queue's node)."""
    from comfyhub.models import Operation

    queue = Operation.objects.filter(pk=report.operation_id).values_list("queue_name", flat=True).first() or ""
    parts = queue.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "node" else "local"


# --- One member ----------------------------------------------------------------------------------------------

@operation_job("cluster_member_prepare", label="Prepare cluster member", queue="long")
def prepare_member(report, *, instance_pk, template_pk=None):
    """On the member's node: its template applied (a new member), ComfyUI-Distributed at DISTRIBUTED_NODE_REF, its
    gpu_config.json written."""
    from . import templating
    from .models import InstanceTemplate

    instance = _instance(instance_pk)
    with containers.instance_lock(instance, report):
        if template_pk is not None:
            template = InstanceTemplate.objects.prefetch_related("starter_workflows").get(pk=template_pk)
            result = templating.apply(template, instance, report)
            for failed in result["failed_nodes"]:
                report.log(f"template node {failed['url']}: {failed['error']}", "WARNING")
        else:
            containers.build_directories(instance, report)
        node = ensure_distributed(instance, report)
        synced = clusters.sync_member(instance, report)
        if synced["failed"]:
            raise OperationError(synced["note"])
    if instance.status in (Instance.Status.HEALTHY, Instance.Status.STARTING):
        report.log(f"{instance} runs: restart it to load {clusters.DISTRIBUTED_FOLDER} and the CORS flag it needs.",
                   "WARNING")
    return {"instance": instance.instance_id, "distributed": node.commit, "config": synced}


def ensure_distributed(instance: Instance, report) -> CustomNode:
    """ComfyUI-Distributed installed at DISTRIBUTED_NODE_REF through the custom-node machinery (git in a throw-away
    container): cloned when missing, moved to the pinned ref when it is at another commit (also a copy put there by
    hand, which ComfyHub then takes over)."""
    url, ref = settings.DISTRIBUTED_NODE_URL, settings.DISTRIBUTED_NODE_REF
    name = clusters.DISTRIBUTED_FOLDER
    try:
        node = CustomNode.objects.filter(instance=instance, name=name).first()
        if node is None and customnodes.folder_of(instance, name) is None:
            return customnodes.install(instance, url, ref, name=name, report=report)
        if node is None:
            report.log(f"custom_nodes/{name} was not installed by ComfyHub: moving it to {ref} from {url}")
            node = CustomNode.objects.create(instance=instance, name=name, url=url, ref=ref, commit="")
        if node.ref == ref and node.url == url and node.commit and \
                (node.commit == ref or not _looks_like_commit(ref)) and customnodes.folder_of(instance, name) == name:
            report.log(f"{name} is at {node.commit[:12]} ({ref}) already")
            return node
        if node.url != url:
            CustomNode.objects.filter(pk=node.pk).update(url=url)
            node.url = url
        if customnodes.folder_of(instance, name) != name:
            customnodes.set_enabled(node, True)
        return customnodes.update(node, ref, report)
    except customnodes.CustomNodeError as exc:
        raise OperationError(f"{name} could not be installed at {ref} into {instance}: {exc}") from exc


def _looks_like_commit(ref: str) -> bool:
    return len(ref) == 40 and all(c in "0123456789abcdef" for c in ref)


# --- Sync ----------------------------------------------------------------------------------------------------

def _sync_here(cluster: Cluster | None, node: Node, released, report) -> list[dict]:
    results = clusters.sync_node(node, report, cluster=cluster) if cluster is not None else []
    gone = list(Instance.objects.select_related("node").filter(pk__in=released, node=node))
    results += [clusters.sync_member(instance, report) for instance in gone]
    try:
        clusters.sync_networks(node, cluster, gone, report)
    except clusters.docker_engine.EngineError as exc:
        raise OperationError(f"The cluster's network on node {node} could not be set up: {exc}") from exc
    return results


def _record_sync(cluster: Cluster, failed: list[dict]) -> str:
    """When the members' files were last written, and what failed (the cluster page shows both)."""
    detail = "; ".join(f"{f['instance']}: {f['note']}" for f in failed)[:500]
    Cluster.objects.filter(pk=cluster.pk).update(synced_at=timezone.now(), sync_detail=detail)
    return detail


@operation_job(clusters.KIND_SYNC, label="Sync cluster")
def sync_cluster(report, *, cluster_pk, released=()):
    """Every member's gpu_config.json written (this node's here, each other node's by its agent), each on the
    cluster's network where it has one; released former workers emptied and taken off it."""
    cluster = _cluster(cluster_pk)
    here = cluster.master.node
    others = {}
    for member in [*clusters.members_of(cluster), *Instance.objects.select_related("node").filter(pk__in=released)]:
        if member.node_id != here.pk:
            others[member.node_id] = member.node
    parts = [fanout.Part(node, "instances.jobs_clusters.sync_cluster_on_node",
                         {"cluster_pk": cluster.pk, "node_name": node.name, "released": list(released)})
             for node in others.values()]
    mine, outcomes = fanout.run_parts(report, parts, here=lambda: _sync_here(cluster, here, released, report))
    failed = [r for r in mine if r["failed"]] + \
        [{"instance": name, "note": o["error"]} for name, o in outcomes.items() if o["status"] != "succeeded"]
    detail = _record_sync(cluster, failed)
    if failed:
        raise OperationError(f"Not every member's {clusters.CONFIG_NAME} was written: {detail}")
    return {"members": mine, "nodes": {name: o["result"] for name, o in outcomes.items()}}


@operation_job("cluster_sync_node", label="Sync cluster on a node")
def sync_cluster_on_node(report, *, cluster_pk, node_name, released=()):
    cluster = Cluster.objects.select_related("master__node").filter(pk=cluster_pk).first()
    node = Node.objects.get(name=node_name)
    results = _sync_here(cluster, node, released, report)
    if failed := [r for r in results if r["failed"]]:
        raise OperationError("; ".join(f"{f['instance']}: {f['note']}" for f in failed))
    return results


@operation_job("cluster_release", label="Release cluster members")
def release_members(report, *, instance_pks, cluster_name):
    """After a cluster is deleted: each former member's file emptied of workers and its container off the network
    (this node's here, each other node's by its agent)."""
    instances = list(Instance.objects.select_related("node").filter(pk__in=instance_pks))
    here = Node.objects.get(name=_here(report))
    parts = [fanout.Part(node, "instances.jobs_clusters.release_members_on_node",
                         {"instance_pks": [i.pk for i in group], "cluster_name": cluster_name})
             for node, group in fanout.by_node(instances).values() if node.pk != here.pk]
    mine, outcomes = fanout.run_parts(
        report, parts, here=lambda: _release_here([i for i in instances if i.node_id == here.pk], cluster_name,
                                                  report))
    return {"members": mine, "nodes": {name: o["status"] for name, o in outcomes.items()}}


@operation_job("cluster_release_node", label="Release cluster members on a node")
def release_members_on_node(report, *, instance_pks, cluster_name):
    instances = list(Instance.objects.select_related("node").filter(pk__in=instance_pks))
    return _release_here(instances, cluster_name, report)


def _release_here(instances, cluster_name, report) -> list[dict]:
    results = []
    for instance in instances:
        results.append(clusters.sync_member(instance, report))
        engine = containers.engine_for(instance)
        try:
            clusters.leave_network(engine, instance, cluster_name, report)
        except clusters.docker_engine.EngineError as exc:
            report.log(f"{instance} could not leave the cluster's network: {exc}", "WARNING")
        finally:
            engine.close()
    return results


# --- Start, stop, probe --------------------------------------------------------------------------------------

def _on_its_node(report, instance: Instance, job: str, here: Node, action):
    """Run `action(instance)` here when the member is on this node, else its node's job (its agent), waited for."""
    if instance.node_id == here.pk:
        return action(instance)
    _, outcomes = fanout.run_parts(report, [fanout.Part(instance.node, job, {"instance_pk": instance.pk})])
    outcome = outcomes[instance.node.name]
    if outcome["status"] != "succeeded":
        raise OperationError(outcome["error"] or outcome["status"])
    return outcome["result"]


@operation_job(clusters.KIND_START, label="Start cluster", queue="long")
def start_cluster(report, *, cluster_pk):
    """Workers first, each waited for until ComfyUI answers, then the master. A member that fails stops the start
    there, named; the members already started keep running."""
    cluster = _cluster(cluster_pk)
    here = cluster.master.node
    started = []
    for role, member in [*(("worker", w) for w in clusters.workers_of(cluster)), ("master", cluster.master)]:
        report.log(f"starting {role} {member} on node {member.node}")
        try:
            _on_its_node(report, member, "instances.jobs.start_instance", here,
                         lambda instance: containers.start(instance, report))
        except OperationError as exc:
            raise OperationError(f"The {role} {member} did not start: {exc}\nStarted before it: "
                                 f"{', '.join(started) or 'none'}; the rest was not started.") from exc
        started.append(member.instance_id)
        report.log(f"{role} {member} is healthy")
    # Each member's file was written before it started (on its node); the master's node's files say who runs now.
    _record_sync(cluster, [r for r in clusters.sync_node(here, report, cluster=cluster) if r["failed"]])
    return {"started": started}


@operation_job(clusters.KIND_STOP, label="Stop cluster")
def stop_cluster(report, *, cluster_pk):
    """Workers first, then the master; every member is asked even when one fails."""
    cluster = _cluster(cluster_pk)
    here = cluster.master.node
    stopped, failed = [], []
    for role, member in [*(("worker", w) for w in clusters.workers_of(cluster)), ("master", cluster.master)]:
        report.log(f"stopping {role} {member} on node {member.node}")
        try:
            _on_its_node(report, member, "instances.jobs.stop_instance", here,
                         lambda instance: containers.stop(instance, report))
            stopped.append(member.instance_id)
        except OperationError as exc:
            failed.append(f"{member}: {exc}")
            report.log(f"{role} {member} did not stop: {exc}", "ERROR")
    _record_sync(cluster, [r for r in clusters.sync_node(here, report, cluster=cluster) if r["failed"]])
    if failed:
        raise OperationError("Not every member stopped: " + "; ".join(failed))
    return {"stopped": stopped}


@operation_job(clusters.KIND_PROBE, label="Probe cluster", timeout=120)
def probe_cluster(report, *, cluster_pk):
    """From inside the master's container: does each worker answer /system_stats at the address the master's file
    gives it? Result: {worker id: {"url", "ok", "detail"}}."""
    cluster = _cluster(cluster_pk)
    master = cluster.master
    urls = clusters.probe_urls(cluster)
    answers = probes.reach_from_inside(master, list(urls.values()))
    by_url = {answer.url: answer for answer in answers}
    result = {}
    for worker_id, url in urls.items():
        answer = by_url.get(url)
        result[worker_id] = answer.as_dict() if answer else {"url": url, "ok": False, "detail": "not asked"}
        report.log(f"{worker_id}: {url} {'answers' if result[worker_id]['ok'] else 'does not answer'}"
                   f" ({result[worker_id]['detail']})", "INFO" if result[worker_id]["ok"] else "WARNING")
    return result
