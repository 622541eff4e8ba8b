"""Instance jobs: thin wrappers that load the row and call the service that does the work."""
from comfyhub.operations import OperationError, operation_job

from . import containers, health, idle, jobs_clusters  # noqa: F401  (jobs_clusters declares the cluster kinds)
from .models import LOCAL_NODE, Instance


def _load(instance_pk) -> Instance:
    instance = Instance.objects.select_related("node").filter(pk=instance_pk).first()
    if instance is None:
        raise OperationError("The instance no longer exists (deleted while this operation waited).")
    return instance


@operation_job("instance_build", label="Build directories")
def build_instance(report, *, instance_pk):
    return containers.build_directories(_load(instance_pk), report)


@operation_job("instance_start", label="Start instance")
def start_instance(report, *, instance_pk):
    return containers.start(_load(instance_pk), report)


@operation_job("instance_stop", label="Stop instance")
def stop_instance(report, *, instance_pk, give_back_gpus=False):
    return containers.stop(_load(instance_pk), report, give_back_gpus=give_back_gpus)


@operation_job("instance_restart", label="Restart instance")
def restart_instance(report, *, instance_pk):
    return containers.restart(_load(instance_pk), report)


@operation_job("instance_delete", label="Delete instance")
def delete_instance(report, *, instance_pk, purge_data=False):
    return containers.delete(_load(instance_pk), report, purge_data=purge_data)


def reconcile_instances(node=None):
    """Periodic (rq cron, on the hub): record the observed status and health of local's instances, and ask each
    other node whose agent takes jobs to do the same for its own, on its queue. With `node` (a node's name, on that
    node's agent, where its engine and ports are): that node's instances only."""
    if node is not None:
        return health.reconcile_node_named(node)
    from . import nodes

    counts = health.reconcile_node_named(LOCAL_NODE)
    asked = [n.name for n in nodes.nodes_taking_jobs() if queue_node_reconcile(n)]
    return {**counts, "nodes_asked": asked} if asked else counts


def queue_node_reconcile(node, replace_abandoned=False) -> bool:
    """Ask `node`'s agent for a reconcile pass of its instances (one at a time); whether it was queued."""
    from . import nodes

    return nodes.node_queue_housekeeping(node, reconcile_instances, "reconcile", {"node": node.name},
                                         replace_abandoned=replace_abandoned)


def check_idle_instances():
    """Periodic (rq cron, every IDLE_CHECK_INTERVAL): queue the idle-stop operation when an instance's idle time is
    over; its Operation id, or None."""
    return idle.idle_check()


@operation_job(idle.KIND, label="Stop idle instances")
def stop_idle_instances(report):
    return idle.stop_idle(report)


@operation_job("workflows_copy", label="Copy workflows")
def copy_workflows(report, *, source_pk, target_pks, paths, on_conflict):
    from . import workflows

    source = _load(source_pk)
    targets = list(Instance.objects.select_related("node").filter(pk__in=target_pks))
    result = workflows.copy_workflows(source, targets, paths, on_conflict, report)
    failed = [f for f in result.files if f["result"].startswith(("failed", "refused"))]
    summary = {"files": result.files, "copied": len(result.files) - len(failed) - result.count("skipped"),
               "skipped": result.count("skipped"), "failed": len(failed)}
    if failed and len(failed) == len(result.files):
        raise OperationError("Nothing was copied: " + "; ".join(f"{f['path']}: {f['result']}" for f in failed[:5]))
    return summary


@operation_job("workflow_install", label="Install library workflow")
def install_workflow(report, *, version_pk, instance_pks):
    from . import fanout

    return fanout.install_here(version_pk, instance_pks, report)


@operation_job("template_apply", label="Apply template")
def apply_template(report, *, template_pk, instance_pk):
    from . import templating
    from .models import InstanceTemplate

    template = InstanceTemplate.objects.prefetch_related("starter_workflows").get(pk=template_pk)
    result = templating.apply(template, _load(instance_pk), report)
    if result["failed_nodes"]:
        raise OperationError("Template applied, but these custom nodes failed to install: "
                             + "; ".join(f"{n['url']}: {n['error']}" for n in result["failed_nodes"]))
    return result


@operation_job("custom_node_install", label="Install custom node")
def install_node(report, *, instance_pk, url, ref=""):
    from . import customnodes

    try:
        node = customnodes.install(_load(instance_pk), url, ref, report=report)
    except customnodes.CustomNodeError as exc:
        raise OperationError(f"{exc} Nothing was installed.") from exc
    return {"name": node.name, "commit": node.commit, "url": node.url, "ref": node.ref}


@operation_job("custom_node_action", label="Change custom node")
def custom_node_action(report, *, instance_pk, name, action, ref=None):
    from . import customnodes
    from .models import CustomNode

    node = CustomNode.objects.select_related("instance__node").filter(instance_id=instance_pk, name=name).first()
    if node is None:
        raise OperationError(f"Custom node '{name}' is no longer installed.")
    try:
        if action == "update":
            node = customnodes.update(node, ref, report)
            return {"name": name, "commit": node.commit}
        if action in ("enable", "disable"):
            customnodes.set_enabled(node, action == "enable")
            report.log(f"{name} {action}d (restart the instance to load the change)")
            return {"name": name, "enabled": action == "enable"}
        customnodes.remove(node, report)
        return {"name": name, "removed": True}
    except customnodes.CustomNodeError as exc:
        raise OperationError(str(exc)) from exc


@operation_job("update_image", label="Update image", queue="long")
def update_image(report, *, instance_pks, refresh=True):
    from . import updates

    found = {i.pk: i for i in Instance.objects.select_related("node").filter(pk__in=instance_pks)}
    if not found:
        raise OperationError("None of the instances exists any more (deleted while this operation waited).")
    gone = len(instance_pks) - len(found)
    if gone:
        report.log(f"{gone} of the chosen instances were deleted while this operation waited; updating the others.")
    return updates.roll_out([found[pk] for pk in instance_pks if pk in found], refresh=refresh, report=report)


def _load_node(node_pk):
    from .models import Node

    node = Node.objects.filter(pk=node_pk).first()
    if node is None:
        raise OperationError("The node no longer exists (deleted while this operation waited).")
    return node


@operation_job("image_build", label="Build image", queue="long")
def build_image(report, *, node_pk, tag, **arguments):
    from . import docker_engine, images

    node = _load_node(node_pk)
    try:
        engine = images.engine_for(node)
        try:
            image_id = images.build_image(engine, tag=tag, report=report, **arguments)
            info = images.describe(engine, tag)
        finally:
            engine.close()
    except (images.ImageError, docker_engine.EngineError) as exc:
        raise OperationError(f"{exc}\nThe tag {tag} was not changed on {node}.") from exc
    return {"image": tag, "node": node.name, "id": image_id, **images.info_data(info)}


@operation_job("image_pull", label="Pull image", queue="long")
def pull_image(report, *, node_pk, image):
    from . import docker_engine, images

    node = _load_node(node_pk)
    try:
        engine = images.engine_for(node)
        try:
            image_id = images.pull_image(engine, image, report)
            info = images.describe(engine, image)
        finally:
            engine.close()
    except (images.ImageError, docker_engine.EngineError) as exc:
        raise OperationError(str(exc)) from exc
    return {"image": image, "node": node.name, "id": image_id, **images.info_data(info)}


# --- Moving an instance to another node (instances/moves.py): the move on the hub, each step on its node ----------

@operation_job("instance_move", label="Move instance", queue="long", timeout=48 * 3600)
def move_instance(report, *, instance_pk, target_pk, host_port, gpu_indexes, user_pk=None):
    from . import moves

    return moves.move_instance(instance_pk=instance_pk, target_pk=target_pk, host_port=host_port,
                               gpu_indexes=gpu_indexes, user_pk=user_pk, report=report)


@operation_job("instance_move_marker_write", label="Move: mark the backups folder")
def move_marker_write(report):
    from . import moves

    return moves.marker_write(report)


@operation_job("instance_move_marker_read", label="Move: find the mark in the backups folder")
def move_marker_read(report, *, name, token, path, source_name):
    from . import moves

    return moves.marker_read(name=name, token=token, path=path, source_name=source_name, report=report)


@operation_job("instance_move_freeze", label="Move: stop and snapshot", queue="long", timeout=48 * 3600)
def move_freeze(report, *, instance_pk, target_name, user_pk=None):
    from django.contrib.auth import get_user_model

    from . import moves

    user = get_user_model().objects.filter(pk=user_pk).first() if user_pk else None
    return moves.freeze(instance=_load(instance_pk), target_name=target_name, user=user, report=report)


@operation_job("instance_move_restore", label="Move: restore on the target", queue="long", timeout=48 * 3600)
def move_restore(report, *, instance_pk, target_pk, snapshot_pk):
    from . import moves

    return moves.restore(instance=_load(instance_pk), target=_load_node(target_pk), snapshot_pk=snapshot_pk,
                         report=report)


@operation_job("instance_move_start", label="Move: start on the target", queue="long")
def move_start(report, *, instance_pk, target_pk, host_port, gpu_indexes):
    from . import moves

    return moves.start_copy(instance=_load(instance_pk), target=_load_node(target_pk), host_port=host_port,
                            gpu_indexes=gpu_indexes, report=report)


@operation_job("instance_move_remove", label="Move: remove a copy", queue="long")
def move_remove(report, *, instance_id, node_pk):
    from . import moves

    return moves.remove_from(instance_id=instance_id, node=_load_node(node_pk), report=report)
