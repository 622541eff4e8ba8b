from django.apps import AppConfig


class InstancesConfig(AppConfig):
    name = "instances"
    verbose_name = "Instances"
    default_auto_field = "django.db.models.BigAutoField"
    operator_permissions = (
        "instances.add_instance", "instances.change_instance", "instances.delete_instance",
        "instances.start_instance", "instances.build_instance", "instances.manage_workflows",
        "instances.manage_custom_nodes", "instances.add_instancetemplate", "instances.change_instancetemplate",
        "instances.use_any_instance", "instances.change_node",
    )
    # The "self-service" group: make instances from self-service templates within the quotas, run their own.
    self_service_permissions = ("instances.create_own_instance",)

    def ready(self):
        # Jobs declare the operation kinds the pages filter by (distribution: the NetDist check).
        from . import distribution, jobs, jobs_nodes, signals  # noqa: F401

    def periodic_jobs(self):
        """Run by comfyhub.cron on the hub: local's instances' observed status and health recorded, and each other
        online node's by its agent, asked on its queue (jobs.reconcile_instances); idle instances stopped, each node's
        by an operation on its own queue (idle.idle_check)."""
        from django.conf import settings

        from .jobs import check_idle_instances, reconcile_instances

        return [{"func": reconcile_instances, "queue_name": "default", "interval": settings.INSTANCE_HEALTH_INTERVAL,
                 "job_timeout": 300},
                {"func": check_idle_instances, "queue_name": "default", "interval": settings.IDLE_CHECK_INTERVAL,
                 "job_timeout": 60}]

    def diagnostics(self):
        """The parts of the diagnostics operation (comfyhub.jobs) this app knows: (name, check() -> (ok, detail))."""
        from .docker_engine import engine_status

        def docker():
            engine = engine_status()
            return engine.available, engine.error or f"{engine.address}, Docker {engine.version}"

        return [("docker engine", docker)]
