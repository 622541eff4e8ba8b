from django.apps import AppConfig


class StorageAppConfig(AppConfig):
    name = "storage_app"
    label = "storage_app"
    verbose_name = "Storage"
    default_auto_field = "django.db.models.BigAutoField"
    operator_permissions = ("storage_app.verify_modelasset", "storage_app.restore_snapshot")

    def ready(self):
        from . import jobs  # noqa: F401  (declares its operation kinds, so every process knows their labels)
