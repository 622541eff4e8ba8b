"""Who may use which instance through the hub (/i/<id>/): its owner, users and groups it is shared with, operators
(instances.use_any_instance) and superusers. Every rule about using an instance lives here; the proxy's endpoint,
the pages and the commands ask these functions."""
from __future__ import annotations

from django.contrib.auth.models import AnonymousUser

from .models import Instance


def can_use(user, instance: Instance) -> bool:
    """Open it through the hub, use its API with a token."""
    if user is None or isinstance(user, AnonymousUser) or not user.is_active:
        return False
    if user.is_superuser or user.has_perm("instances.use_any_instance"):
        return True
    if instance.owner_id == user.pk:
        return True
    return instance.shares.filter(user=user).exists() or instance.shares.filter(
        group__in=user.groups.all()).exists()


def can_operate(user, instance: Instance) -> bool:
    """Start, stop and restart it: operators, and its owner when they may create their own instances."""
    if user is None or not user.is_authenticated or not user.is_active:
        return False
    if user.has_perm("instances.start_instance"):
        return True
    return instance.owner_id == user.pk and user.has_perm("instances.create_own_instance")
