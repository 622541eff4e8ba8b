"""Jobs for work that spans nodes: each node's part runs on that node's queue (the hub's workers for `local`, a node's
agent for its own), since only there are its folders, engine and ports. The operation a person sees does its own
node's part itself and waits for the others' operations (instances.fanout); these functions stay thin."""
from comfyhub.operations import OperationError, operation_job

from . import fanout, idle
from .models import Instance


@operation_job(idle.KIND, label="Stop idle instances")
def stop_idle_instances_on_node(report, *, node_name):
    """The idle stop of one node other than `local`, on its agent (local's is instances.jobs.stop_idle_instances)."""
    return idle.stop_idle(report, node=node_name)


@operation_job("workflows_copy", label="Copy workflows")
def copy_workflows_across_nodes(report, *, source_pk, target_pks, paths, on_conflict):
    """On the source's node: read the workflows there, write them into its own node's targets, and send them to
    each other node's agent to write into the targets there."""
    source = Instance.objects.select_related("node").filter(pk=source_pk).first()
    if source is None:
        raise OperationError("The source instance no longer exists (deleted while this operation waited).")
    targets = list(Instance.objects.select_related("node").filter(pk__in=target_pks))
    return fanout.copy_workflows(source, targets, paths, on_conflict, report)


@operation_job("workflows_write", label="Write copied workflows")
def write_workflows(report, *, source_id, target_pks, contents, on_conflict):
    """On a target node: write the workflows another node read (`contents`: relative path -> bytes)."""
    from . import workflows

    targets = list(Instance.objects.select_related("node").filter(pk__in=target_pks))
    files = workflows.write_copies(source_id, targets, contents, on_conflict, report)
    return fanout.copy_summary(files)


@operation_job("workflow_install", label="Install library workflow")
def install_workflow_on_nodes(report, *, version_pk, instance_pks):
    """On the hub: install into local's instances here and ask each other node's agent for its own."""
    return fanout.install_workflow(version_pk, instance_pks, report)


@operation_job("update_image", label="Update image", queue="long")
def update_image_on_nodes(report, *, instance_pks, refresh=True):
    """On the hub: roll the update out on local here and on each other node by its agent, each node on its own."""
    from . import updates

    return updates.roll_out_over_nodes(instance_pks, refresh, report)
