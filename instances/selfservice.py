"""Self-service: a user with 'create own instances' (and not the operators' 'add instance') makes instances for
themselves from the templates an operator marked self-service, within SELF_SERVICE_MAX_INSTANCES and
SELF_SERVICE_MAX_GPUS. The quotas and the choice of templates live here; the instance itself is made by
services.instance_create_from_template."""
from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction

from . import services
from .models import GPUAssignment, Instance, InstanceTemplate


def is_operator(user) -> bool:
    """Operators create instances on the instance form, without quotas."""
    return user.has_perm("instances.add_instance")


def may_self_serve(user) -> bool:
    return user.is_active and user.has_perm("instances.create_own_instance")


def self_service_templates():
    return InstanceTemplate.objects.filter(self_service=True).order_by("name")


@dataclass
class Usage:
    """What a user's own instances hold, against the quotas."""

    instances: int
    gpus: int
    max_instances: int
    max_gpus: int


def usage(user) -> Usage:
    return Usage(instances=Instance.objects.filter(owner=user).count(),
                 # GPUs idle stop gave back count: their instance takes them again when it starts.
                 gpus=GPUAssignment.objects.filter(instance__owner=user).count() + sum(
                     len(released) for released in Instance.objects.filter(owner=user).values_list(
                         "gpus_released", flat=True)),
                 max_instances=settings.SELF_SERVICE_MAX_INSTANCES, max_gpus=settings.SELF_SERVICE_MAX_GPUS)


def quota_problems(user, template: InstanceTemplate) -> dict[str, list[str]]:
    """Why `user` may not make one more instance from `template`: {field: [message]}, empty when they may."""
    held = usage(user)
    problems = {}
    if held.instances >= held.max_instances:
        problems["instance_id"] = [
            f"You own {held.instances} instance{'s' if held.instances != 1 else ''} and SELF_SERVICE_MAX_INSTANCES "
            f"allows {held.max_instances}. Ask an operator to delete one you no longer need, or to raise "
            "SELF_SERVICE_MAX_INSTANCES."]
    if held.gpus + template.gpu_count > held.max_gpus:
        problems["template"] = [
            f"Template '{template}' gives each instance {template.gpu_count} GPU(s); your instances hold "
            f"{held.gpus} already and SELF_SERVICE_MAX_GPUS allows {held.max_gpus} in all. Pick a template with "
            "fewer GPUs, ask an operator to free a GPU one of your instances holds, or to raise "
            "SELF_SERVICE_MAX_GPUS."]
    return problems


def instance_create_own(*, user, template: InstanceTemplate | None, instance_id: str, display_name: str = ""):
    """Make an instance `user` owns from a self-service template, within the quotas (operators have none).
    Returns (instance, the operation applying the template)."""
    if not may_self_serve(user) and not is_operator(user):
        raise PermissionDenied("Creating your own instances needs the 'create own instances' permission; ask an "
                               "operator for it.")
    if template is None:
        raise ValidationError({"template": ["Choose a template."]})
    if not template.self_service and not is_operator(user):
        offered = ", ".join(t.name for t in self_service_templates()) or "none yet; ask an operator to mark one"
        raise ValidationError({"template": [f"Template '{template}' is not offered for self-service (offered: "
                                            f"{offered})."]})
    if refusal := services.template_gpus_refusal(template, template.gpu_count):
        # A template whose GPU count is below its own minimum (made before minimums were checked): no instance of it
        # may be made, and the field to say so on is the template's.
        raise ValidationError({"template": [refusal]})
    with transaction.atomic():
        if not is_operator(user):
            # One self-service create per user at a time: two at once would both fit a quota only one fits.
            get_user_model().objects.select_for_update().filter(pk=user.pk).first()
            if problems := quota_problems(user, template):
                raise ValidationError(problems)
        return services.instance_create_from_template(template=template, instance_id=instance_id,
                                                      display_name=display_name, user=user, owner=user)
