from django.apps import AppConfig


class ComfyhubConfig(AppConfig):
    name = "comfyhub"
    verbose_name = "ComfyHub core"
    default_auto_field = "django.db.models.BigAutoField"
    operator_permissions = ("comfyhub.cancel_operation", "comfyhub.run_diagnostics")

    def ready(self):
        from . import signals  # noqa: F401  (creates the operators group after migrate)
        from . import jobs  # noqa: F401  (declares its operation kinds, so every process knows their labels)

    def periodic_jobs(self):
        """What comfyhub.cron registers with RQ's cron for this app (keyword arguments of `rq.cron.register`);
        every app may list its own."""
        from django.conf import settings

        from .jobs import sweep_operations

        return [{"func": sweep_operations, "queue_name": "default", "interval": settings.OPERATION_SWEEP_INTERVAL,
                 "job_timeout": 120}]
