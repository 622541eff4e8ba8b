from django.apps import AppConfig


class ComfyhubConfig(AppConfig):
    name = "comfyhub"
    verbose_name = "ComfyHub core"
    default_auto_field = "django.db.models.BigAutoField"
    operator_permissions = ("comfyhub.cancel_operation", "comfyhub.run_diagnostics")

    def ready(self):
        from . import signals  # noqa: F401  (creates the operators group after migrate)
        from . import jobs  # noqa: F401  (declares its operation kinds, so every process knows their labels)
