from django.apps import AppConfig


class InstancesConfig(AppConfig):
    name = "instances"
    verbose_name = "Instances"
    default_auto_field = "django.db.models.BigAutoField"
    operator_permissions = (
        "instances.add_instance", "instances.change_instance", "instances.delete_instance",
        "instances.start_instance", "instances.build_instance", "instances.manage_workflows",
        "instances.manage_custom_nodes", "instances.add_instancetemplate", "instances.change_instancetemplate",
    )

    def ready(self):
        from . import jobs, signals  # noqa: F401  (jobs declare the operation kinds the pages filter by)
