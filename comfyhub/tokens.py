"""Personal access tokens: made, checked and revoked here. A token is shown once; only its SHA-256 is stored."""
from __future__ import annotations

import hashlib
import secrets

from django.utils import timezone

from .models import AccessToken

TOKEN_PREFIX = "chub_"


def digest_of(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def token_create(*, user, name: str, expires_at=None) -> tuple[AccessToken, str]:
    """A new token for `user`: the row and the token itself, which is never shown again."""
    raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = AccessToken.objects.create(user=user, name=name.strip()[:100] or "token", prefix=raw[:12],
                                       digest=digest_of(raw), expires_at=expires_at)
    return token, raw


def token_authenticate(raw: str) -> AccessToken | None:
    """The active token `raw` is, with its user loaded; None for an unknown, revoked or expired one, or one whose user
    is inactive."""
    if not raw or not raw.startswith(TOKEN_PREFIX) or len(raw) > 200:
        return None
    token = (AccessToken.objects.select_related("user")
             .filter(digest=digest_of(raw), revoked_at__isnull=True).first())
    if token is None or not token.active or not token.user.is_active:
        return None
    return token


LAST_USED_RESOLUTION_SECONDS = 60


def token_touch(token: AccessToken) -> None:
    """Record that the token was used now (written at most once a minute)."""
    now = timezone.now()
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() >= LAST_USED_RESOLUTION_SECONDS:
        AccessToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
