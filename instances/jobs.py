"""Instance jobs: thin wrappers that load the row and call the service that does the work."""
from comfyhub.operations import OperationError, operation_job

from . import containers, health
from .models import Instance


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
def stop_instance(report, *, instance_pk):
    return containers.stop(_load(instance_pk), report)


@operation_job("instance_restart", label="Restart instance")
def restart_instance(report, *, instance_pk):
    instance = _load(instance_pk)
    containers.stop(instance, report)
    return containers.start(instance, report)


@operation_job("instance_delete", label="Delete instance")
def delete_instance(report, *, instance_pk, purge_data=False):
    return containers.delete(_load(instance_pk), report, purge_data=purge_data)


def reconcile_instances():
    """Periodic (rq cron): record every instance's observed status and health."""
    return health.reconcile_all()
