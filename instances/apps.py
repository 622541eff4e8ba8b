from django.apps import AppConfig


class InstancesConfig(AppConfig):
    name = "instances"
    verbose_name = "Instances"
    default_auto_field = "django.db.models.BigAutoField"
    operator_permissions = ()
