"""Who may use which instance through the hub (/i/<id>/): its owner, users and groups it is shared with, operators
(instances.use_any_instance) and superusers. Every rule about using, operating and sharing an instance lives here;
the proxy's endpoint, the pages, the admin and the commands ask these functions."""
from __future__ import annotations

import ipaddress
import socket
from datetime import timedelta
from typing import NamedTuple
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from .models import Instance, InstanceOpen, InstanceShare, Node, note_in_use

GRANTORS_SHOWN = 5


def _active(user) -> bool:
    return user is not None and user.is_authenticated and user.is_active


def can_use(user, instance: Instance) -> bool:
    """Open it through the hub, use its API with a token."""
    if not _active(user):
        return False
    if user.is_superuser or instance.owner_id == user.pk or user.has_perm("instances.use_any_instance"):
        return True
    # One query for both kinds of share: this one, or one of the user's groups.
    return InstanceShare.objects.filter(Q(user=user) | Q(group__user=user), instance=instance).exists()


def usable_by(user):
    """The instances `user` may use: can_use's rule as one query (plus the user's permissions, loaded once)."""
    if not _active(user):
        return Instance.objects.none()
    if user.is_superuser or user.has_perm("instances.use_any_instance"):
        return Instance.objects.all()
    shared = InstanceShare.objects.filter(Q(user=user) | Q(group__user=user)).values("instance_id")
    return Instance.objects.filter(Q(owner=user) | Q(pk__in=shared))


def can_operate(user, instance: Instance) -> bool:
    """Start, stop and restart it: operators, and its owner when they may create their own instances."""
    if not _active(user):
        return False
    if user.has_perm("instances.start_instance"):
        return True
    return instance.owner_id == user.pk and user.has_perm("instances.create_own_instance")


def can_share(user, instance: Instance) -> bool:
    """Add and remove its shares: its owner, operators who may change instances, superusers."""
    if not _active(user):
        return False
    return instance.owner_id == user.pk or user.has_perm("instances.change_instance")


class Grantors(NamedTuple):
    """Who can give someone access to an instance: its owner (None when it has none or they are deactivated) and
    a few of the operators who may share any instance."""

    owner: object
    operators: list


def grantors(instance: Instance, limit: int = GRANTORS_SHOWN) -> Grantors:
    """The people a refused user should ask (the proxy's 403 page names them)."""
    User = get_user_model()
    owner = instance.owner if instance.owner_id and instance.owner.is_active else None
    try:
        change = Permission.objects.get(content_type__app_label="instances", codename="change_instance")
    except Permission.DoesNotExist:  # before migrations: only superusers
        holders = Q(is_superuser=True)
    else:
        holders = Q(is_superuser=True) | Q(user_permissions=change) | Q(groups__permissions=change)
    operators = list(User.objects.filter(holders, is_active=True).exclude(pk=instance.owner_id).distinct()
                     .order_by("username")[:limit])
    return Grantors(owner=owner, operators=operators)


# --- Shares ----------------------------------------------------------------------------------------------------

def shares_of(instance: Instance):
    """Its shares, users first then groups, with what the access panel shows."""
    return instance.shares.select_related("user", "group", "created_by").order_by("group__name", "user__username")


def _check_may_share(user, instance: Instance):
    # user None: a management command, run by whoever administers the host.
    if user is not None and not can_share(user, instance):
        raise PermissionDenied(f"Only the owner of '{instance}' or an operator may change whom it is shared with.")


def share_add(*, instance: Instance, username: str = "", group: str = "", user=None) -> InstanceShare:
    """Share `instance` with the user named `username` or the group named `group` (one of them)."""
    _check_may_share(user, instance)
    username, group = (username or "").strip(), (group or "").strip()
    if bool(username) == bool(group):
        raise ValidationError({"username": ["Give either a user name or a group name to share it with."
                                            if not username else "Give a user name or a group name, not both."]})
    by = user if _active(user) else None
    if username:
        person = user_named(username)
        if person.pk == instance.owner_id:
            raise ValidationError({"username": [f"'{person.get_username()}' owns '{instance}' already; owners need "
                                                "no share."]})
        if instance.shares.filter(user=person).exists():
            raise ValidationError({"username": [f"'{instance}' is already shared with '{person.get_username()}'."]})
        values = {"user": person}
    else:
        team = _group_named(group)
        if instance.shares.filter(group=team).exists():
            raise ValidationError({"group": [f"'{instance}' is already shared with the group '{team.name}'."]})
        values = {"group": team}
    try:
        with transaction.atomic():
            return InstanceShare.objects.create(instance=instance, created_by=by, **values)
    except IntegrityError:  # the same share added at the same moment by someone else
        field, name = ("username", username) if username else ("group", group)
        raise ValidationError({field: [f"'{instance}' is already shared with '{name}'."]}) from None


def share_remove(*, share: InstanceShare, user=None) -> InstanceShare:
    """Take a share away; the one it named loses access within ACCESS_CACHE_SECONDS."""
    _check_may_share(user, share.instance)
    share.delete()
    return share


def share_find(*, instance: Instance, username: str = "", group: str = "") -> InstanceShare:
    """The share of `instance` with that user or group, or ValidationError saying whom it is shared with."""
    username, group = (username or "").strip(), (group or "").strip()
    if bool(username) == bool(group):
        raise ValidationError({"username": ["Give either a user name or a group name."
                                            if not username else "Give a user name or a group name, not both."]})
    shares = shares_of(instance)
    share = shares.filter(user__username=username).first() if username else shares.filter(group__name=group).first()
    if share is None:
        field, what = ("username", f"'{username}'") if username else ("group", f"the group '{group}'")
        have = ", ".join(share_label(s) for s in shares) or "nobody"
        raise ValidationError({field: [f"'{instance}' is not shared with {what} (shared with: {have})."]})
    return share


def share_label(share: InstanceShare) -> str:
    return share.user.get_username() if share.user_id else f"group {share.group.name}"


def user_named(name: str):
    """The active user with this user name, or ValidationError({'username': ...}) saying what is wrong."""
    User = get_user_model()
    person = User.objects.filter(**{User.USERNAME_FIELD: name}).first() if "\x00" not in name else None
    if person is None:
        raise ValidationError({"username": [f"There is no user '{name}'; check the spelling (user names are "
                                            "case-sensitive)."]})
    if not person.is_active:
        raise ValidationError({"username": [f"The user '{name}' is deactivated; an administrator must reactivate "
                                            "them first."]})
    return person


def _group_named(name: str) -> Group:
    team = Group.objects.filter(name=name).first() if "\x00" not in name else None
    if team is None:
        known = ", ".join(Group.objects.order_by("name").values_list("name", flat=True)[:20]) or "none"
        raise ValidationError({"group": [f"There is no group '{name}' (groups: {known})."]})
    return team


# --- Opens and activity -----------------------------------------------------------------------------------------

def recent_opens(instance: Instance, limit: int = 10):
    """Who opened it through the hub lately, newest first (one row per person and way in per
    ACCESS_OPEN_RECORD_MINUTES)."""
    return list(InstanceOpen.objects.filter(instance=instance).select_related("user", "token").order_by("-at")[:limit])


def record_open(*, user, instance: Instance, via: str = "browser", token=None) -> None:
    """Remember that `user` opened `instance` through the hub: one row per person, instance and way in per
    ACCESS_OPEN_RECORD_MINUTES (the proxy asks on every uncached request, which is not every open)."""
    now = timezone.now()
    recent = now - timedelta(minutes=settings.ACCESS_OPEN_RECORD_MINUTES)
    if not InstanceOpen.objects.filter(instance=instance, user=user, via=via, at__gte=recent).exists():
        InstanceOpen.objects.create(instance=instance, user=user, via=via, token=token, at=now)


ACTIVITY_RESOLUTION_SECONDS = 30


def note_activity(instance: Instance) -> None:
    """Traffic through the hub: the instance is in use now (written at most every ACTIVITY_RESOLUTION_SECONDS)."""
    now = timezone.now()
    last = instance.last_activity_at
    if last is None or now - last >= timedelta(seconds=ACTIVITY_RESOLUTION_SECONDS):
        note_in_use([instance.pk], now)
        instance.last_activity_at = now


# --- The session cookie and instances' own ports ---------------------------------------------------------------------

def _addresses_of(host: str) -> set:
    host = host.strip("[]")
    try:
        return {ipaddress.ip_address(host)}
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return set()
    return {ipaddress.ip_address(entry[4][0].split("%")[0]) for entry in found}


def _listens_on_loopback_only() -> bool:
    """The hub's own listen address (COMFYHUB_BIND) is loopback, or a unix socket: no container reaches it."""
    bind = settings.SERVE_BIND
    if bind.startswith("unix:"):
        return True
    host = bind.rsplit(":", 1)[0].strip("[]")
    addresses = _addresses_of(host)
    return bool(addresses) and all(address.is_loopback for address in addresses)


def session_cookie_exposure() -> list[str]:
    """What is wrong when a browser would send the hub's session cookie to an instance's own server: over plain HTTP
    (the cookie is not HTTPS-only), a page of the instance asks http://<the hub's host>:<its port>/ and the browser
    adds the hub's cookie (cookies belong to a host, not a port). That happens where a node publishes instance ports
    at an address the hub is served at. Loopback counts only when the hub listens beyond it: a container does not
    reach its host's loopback, so a cookie for a hub there only is of no use to it. One line per such node; none
    when the cookie is HTTPS-only."""
    if settings.SESSION_COOKIE_SECURE:
        return []
    hosts = {urlsplit(settings.HUB_ORIGIN).hostname or ""} | {
        host for host in settings.ALLOWED_HOSTS if host and host != "*" and not host.startswith(".")}
    served = {address for host in hosts if host for address in _addresses_of(host)
              if not (address.is_loopback and _listens_on_loopback_only())}
    problems = []
    for node in Node.objects.order_by("name"):
        bind = ipaddress.ip_address(node.bind_address)
        exposed = sorted(str(address) for address in served if bind.is_unspecified or address == bind)
        if exposed:
            problems.append(
                f"Node {node.name} publishes instance ports at {', '.join(exposed)}, where the hub is served over "
                "plain HTTP: a browser sends the hub's login cookie to an instance's own port there, so custom-node "
                "code could keep it. Serve the hub over HTTPS (HTTPS=true: the cookie is then HTTPS-only), or publish "
                "the node's instances at an address the hub is not served at (docs/access.md).")
    return problems
