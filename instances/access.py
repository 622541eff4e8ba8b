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


def record_open(*, user, instance: Instance, via: str = "browser", token=None) -> None:
    """Remember that `user` opened `instance` through the hub: one row per person, instance and way in per
    ACCESS_OPEN_RECORD_MINUTES (the proxy asks on every uncached request, which is not every open)."""
    from datetime import timedelta

    from django.conf import settings
    from django.utils import timezone

    from .models import InstanceOpen

    now = timezone.now()
    recent = now - timedelta(minutes=settings.ACCESS_OPEN_RECORD_MINUTES)
    if not InstanceOpen.objects.filter(instance=instance, user=user, via=via, at__gte=recent).exists():
        InstanceOpen.objects.create(instance=instance, user=user, via=via, token=token, at=now)


ACTIVITY_RESOLUTION_SECONDS = 30


def note_activity(instance: Instance) -> None:
    """Traffic through the hub: the instance is in use now (written at most every ACTIVITY_RESOLUTION_SECONDS)."""
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now()
    last = instance.last_activity_at
    if last is None or now - last >= timedelta(seconds=ACTIVITY_RESOLUTION_SECONDS):
        Instance.objects.filter(pk=instance.pk).update(last_activity_at=now)
        instance.last_activity_at = now
