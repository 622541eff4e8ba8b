"""Keeps the built-in groups holding the permissions the apps declare for them: "operators" (every operational
permission) and "self-service" (people who make and run their own instances from self-service templates).

Each app config may list `operator_permissions` and `self_service_permissions` ("app_label.codename"); viewing needs
no permission at all.
"""
from django.apps import apps
from django.db.models import Q
from django.db.models.signals import post_migrate
from django.dispatch import Signal, receiver

OPERATORS_GROUP = "operators"
SELF_SERVICE_GROUP = "self-service"
GROUP_PERMISSIONS = {OPERATORS_GROUP: "operator_permissions", SELF_SERVICE_GROUP: "self_service_permissions"}

# Sent by `manage.py serve` once the database is migrated, before the workers start: an app gets ready for work
# (instances looks for the host's GPUs again) and may return a line for serve to print.
serve_starting = Signal()


def operator_permission_names(attribute="operator_permissions"):
    names = []
    for config in apps.get_app_configs():
        names.extend(getattr(config, attribute, ()))
    return names


@receiver(post_migrate)
def ensure_operators_group(sender, using="default", **kwargs):
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for group_name, attribute in GROUP_PERMISSIONS.items():
        group, _ = Group.objects.using(using).get_or_create(name=group_name)
        # One query, not two per permission: this runs after every app's migrations, also at each flush between tests.
        wanted = Q(pk__in=[])
        for name in operator_permission_names(attribute):
            app_label, codename = name.split(".", 1)
            wanted |= Q(content_type__app_label=app_label, codename=codename)
        group.permissions.add(*Permission.objects.using(using).filter(wanted))
