"""Personal access tokens: made, checked and revoked here. A token is shown once; only its SHA-256 is stored.

A token is "chub_" and 43 URL-safe characters (256 random bits): a lookup by its digest needs no constant-time
comparison, since nobody can guess a digest's preimage by timing the lookup."""
from __future__ import annotations

import hashlib
import re
import secrets
import unicodedata
from datetime import timedelta

from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from .models import AccessToken

TOKEN_PREFIX = "chub_"
TOKEN_FORMAT = re.compile(r"chub_[A-Za-z0-9_-]{43}")
PREFIX_LENGTH = 12  # "chub_" and 7 random characters: enough to tell one's tokens apart, useless to guess the rest
NAME_MAX_LENGTH = 100
EXPIRY_DAYS_MAX = 3650
EXPIRY_HELP = f"Days from now (1 to {EXPIRY_DAYS_MAX}), or 'never'."


class State:
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


def digest_of(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def parse_expiry(value, *, now=None):
    """When a token asked to expire `value` days from now runs out: None for '' or 'never'. Whole days from 1 to
    EXPIRY_DAYS_MAX, as typed in the form or on the command line; anything else is refused."""
    text = str(value if value is not None else "").strip().lower()
    if text in ("", "never"):
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 6 and 1 <= int(text) <= EXPIRY_DAYS_MAX):
        raise ValidationError({"expires": [f"'{value}' is not a number of days: give one from 1 to "
                                           f"{EXPIRY_DAYS_MAX}, or 'never'."]})
    return (now or timezone.now()) + timedelta(days=int(text))


def clean_name(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise ValidationError({"name": ["Give the token a name that says what it is for, e.g. 'render script'."]})
    if len(name) > NAME_MAX_LENGTH:
        raise ValidationError({"name": [f"The name is {len(name)} characters long; keep it to {NAME_MAX_LENGTH}."]})
    if any(unicodedata.category(char).startswith("C") for char in name):
        raise ValidationError({"name": ["The name may not contain control characters (line breaks, tabs)."]})
    return name


def token_create(*, user, name: str, expires_at=None) -> tuple[AccessToken, str]:
    """A new token for `user`: the row and the token itself, which is never shown again."""
    name = clean_name(name)
    if not user.is_active:
        raise ValidationError({"user": [f"User '{user.get_username()}' is inactive; its tokens would not work. "
                                        "Activate the user first."]})
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationError({"expires": ["The expiry is in the past; give a number of days from now."]})
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = AccessToken.objects.create(user=user, name=name, prefix=raw[:PREFIX_LENGTH], digest=digest_of(raw),
                                       expires_at=expires_at)
    return token, raw


def token_authenticate(raw) -> AccessToken | None:
    """The active token `raw` is, with its user loaded; None for anything else: not a token at all, an unknown,
    revoked or expired one, or one whose user is inactive."""
    if not isinstance(raw, str) or not TOKEN_FORMAT.fullmatch(raw):
        return None
    token = (AccessToken.objects.select_related("user")
             .filter(digest=digest_of(raw), revoked_at__isnull=True).first())
    if token is None or not token.active or not token.user.is_active:
        return None
    return token


def token_revoke(*, token: AccessToken, user=None) -> bool:
    """Revoke `token` for good. Its owner or a superuser may; `user` None is the server's command line. True when it
    was revoked now, False when it was already (revoking twice is not an error). Requests already answered from the
    proxy's cache (ACCESS_CACHE_SECONDS) may still pass for that long."""
    if user is not None and not (user.is_active and (user.is_superuser or user.pk == token.user_id)):
        raise PermissionDenied("Only the token's owner or a superuser may revoke it.")
    now = timezone.now()
    revoked = AccessToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=now) == 1
    token.refresh_from_db(fields=["revoked_at"])
    return revoked


def tokens_of(user):
    """The user's own tokens, newest first (revoked and expired ones too: they are the record of what was used)."""
    return AccessToken.objects.filter(user=user).order_by("-created_at", "-pk")


def token_state(token: AccessToken, *, now=None) -> str:
    if token.revoked_at is not None:
        return State.REVOKED
    if token.expires_at is not None and token.expires_at <= (now or timezone.now()):
        return State.EXPIRED
    return State.ACTIVE


LAST_USED_RESOLUTION_SECONDS = 60


def token_touch(token: AccessToken) -> None:
    """Record that the token was used now (written at most once a minute)."""
    now = timezone.now()
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() >= LAST_USED_RESOLUTION_SECONDS:
        AccessToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
