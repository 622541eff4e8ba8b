"""Personal access tokens (comfyhub/tokens.py): made with a name and an expiry, stored only as a hash, found again by
the token itself while it is active, revoked by its owner or a superuser."""
import hashlib
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from comfyhub import tokens
from comfyhub.models import AccessToken

pytestmark = pytest.mark.django_db


@pytest.fixture
def bob(db):
    return User.objects.create_user("bob", password="bob-password-1")


def test_a_new_token_is_chub_and_43_urlsafe_characters_and_only_its_hash_is_stored(bob):
    token, raw = tokens.token_create(user=bob, name=" render script ")
    assert tokens.TOKEN_FORMAT.fullmatch(raw) and len(raw) == 48
    assert token.name == "render script" and token.prefix == raw[:12] and token.expires_at is None
    stored = AccessToken.objects.get(pk=token.pk)
    assert stored.digest == hashlib.sha256(raw.encode()).hexdigest()
    assert raw not in str([getattr(stored, field.attname) for field in AccessToken._meta.fields])


def test_two_tokens_are_never_the_same(bob):
    raws = {tokens.token_create(user=bob, name=f"t{n}")[1] for n in range(20)}
    assert len(raws) == 20


def test_the_token_authenticates_as_its_user(bob):
    token, raw = tokens.token_create(user=bob, name="script")
    found = tokens.token_authenticate(raw)
    assert found == token and found.user == bob


def test_an_expired_token_does_not_authenticate(bob):
    token, raw = tokens.token_create(user=bob, name="script", expires_at=timezone.now() + timedelta(days=1))
    assert tokens.token_authenticate(raw) == token
    AccessToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert tokens.token_authenticate(raw) is None
    assert tokens.token_state(AccessToken.objects.get(pk=token.pk)) == tokens.State.EXPIRED


def test_a_revoked_token_does_not_authenticate(bob):
    token, raw = tokens.token_create(user=bob, name="script")
    assert tokens.token_revoke(token=token, user=bob) is True
    assert tokens.token_authenticate(raw) is None
    assert tokens.token_state(token) == tokens.State.REVOKED


def test_the_token_of_an_inactive_user_does_not_authenticate(bob):
    token, raw = tokens.token_create(user=bob, name="script")
    bob.is_active = False
    bob.save()
    assert tokens.token_authenticate(raw) is None
    bob.is_active = True
    bob.save()
    assert tokens.token_authenticate(raw) == token


def test_an_unknown_token_does_not_authenticate(bob):
    _, raw = tokens.token_create(user=bob, name="script")
    other = raw[:-1] + ("A" if raw[-1] != "A" else "B")
    assert tokens.token_authenticate(other) is None


@pytest.mark.parametrize("garbage", [
    None, "", "chub_", "Bearer chub_x", "chub_" + "a" * 42, "chub_" + "a" * 44, "CHUB_" + "a" * 43,
    "chub_" + "a" * 42 + "=", "chub_" + "a" * 42 + "\x00", "chub_" + "a" * 42 + "é", " chub_" + "a" * 43,
    "chub_" + "a" * 10_000_000, "\ud800" * 100, b"chub_" + b"a" * 43, 12345,
])
def test_garbage_and_very_long_input_is_no_token(bob, garbage, django_assert_num_queries):
    tokens.token_create(user=bob, name="script")
    with django_assert_num_queries(0):  # refused before the database is asked
        assert tokens.token_authenticate(garbage) is None


def test_the_token_is_found_by_its_whole_value_not_its_prefix(bob):
    _, raw = tokens.token_create(user=bob, name="script")
    assert tokens.token_authenticate(raw[:12] + "a" * 36) is None


@pytest.mark.parametrize("value, days", [("1", 1), (" 30 ", 30), ("3650", 3650), (7, 7)])
def test_expiry_is_whole_days_from_now(value, days):
    now = timezone.now()
    assert tokens.parse_expiry(value, now=now) == now + timedelta(days=days)


@pytest.mark.parametrize("value", ["", "never", "Never", None])
def test_expiry_never_is_no_expiry(value):
    assert tokens.parse_expiry(value) is None


@pytest.mark.parametrize("value", ["0", "3651", "-1", "1.5", "ten", "²", "9" * 30, "1e3", "30d"])
def test_expiry_out_of_range_or_not_a_number_is_refused_with_what_to_give(value):
    with pytest.raises(ValidationError) as refused:
        tokens.parse_expiry(value)
    assert refused.value.message_dict["expires"] == [
        f"'{value}' is not a number of days: give one from 1 to 3650, or 'never'."]


@pytest.mark.parametrize("name, message", [
    ("", "Give the token a name"), ("   ", "Give the token a name"), ("x" * 101, "keep it to 100"),
    ("two\nlines", "control characters"), ("tab\there", "control characters"),
])
def test_a_token_needs_a_sensible_name(bob, name, message):
    with pytest.raises(ValidationError) as refused:
        tokens.token_create(user=bob, name=name)
    assert message in refused.value.message_dict["name"][0]
    assert not AccessToken.objects.exists()


def test_a_token_cannot_expire_in_the_past(bob):
    with pytest.raises(ValidationError) as refused:
        tokens.token_create(user=bob, name="old", expires_at=timezone.now() - timedelta(minutes=1))
    assert "in the past" in refused.value.message_dict["expires"][0]


def test_an_inactive_user_gets_no_token(bob):
    bob.is_active = False
    bob.save()
    with pytest.raises(ValidationError) as refused:
        tokens.token_create(user=bob, name="script")
    assert "inactive" in refused.value.message_dict["user"][0]


def test_revoking_twice_is_not_an_error_and_keeps_the_first_time(bob):
    token, _ = tokens.token_create(user=bob, name="script")
    assert tokens.token_revoke(token=token, user=bob) is True
    first = token.revoked_at
    assert first is not None
    assert tokens.token_revoke(token=token, user=bob) is False
    assert AccessToken.objects.get(pk=token.pk).revoked_at == first


def test_only_the_owner_or_a_superuser_may_revoke(bob, stranger, admin_user):
    token, raw = tokens.token_create(user=bob, name="script")
    with pytest.raises(PermissionDenied):
        tokens.token_revoke(token=token, user=stranger)
    assert tokens.token_authenticate(raw) == token
    assert tokens.token_revoke(token=token, user=admin_user) is True
    assert tokens.token_authenticate(raw) is None


def test_the_command_line_may_revoke_any_token(bob):
    token, raw = tokens.token_create(user=bob, name="script")
    assert tokens.token_revoke(token=token, user=None) is True
    assert tokens.token_authenticate(raw) is None


def test_tokens_of_a_user_are_theirs_alone_newest_first(bob, stranger):
    first, _ = tokens.token_create(user=bob, name="first")
    second, _ = tokens.token_create(user=bob, name="second")
    tokens.token_create(user=stranger, name="sams")
    assert list(tokens.tokens_of(bob)) == [second, first]


def test_touch_records_the_last_use_at_most_once_a_minute(bob):
    token, raw = tokens.token_create(user=bob, name="script")
    tokens.token_touch(tokens.token_authenticate(raw))
    first = AccessToken.objects.get(pk=token.pk).last_used_at
    assert first is not None
    tokens.token_touch(tokens.token_authenticate(raw))
    assert AccessToken.objects.get(pk=token.pk).last_used_at == first
    AccessToken.objects.filter(pk=token.pk).update(last_used_at=first - timedelta(minutes=2))
    tokens.token_touch(tokens.token_authenticate(raw))
    assert AccessToken.objects.get(pk=token.pk).last_used_at > first
