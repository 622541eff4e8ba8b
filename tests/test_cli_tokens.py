"""`manage.py tokens`: personal access tokens for operators' scripts. `create` prints the token and nothing else on
stdout; bad input is exit code 2 with a message that says what to give.

Most commands run in-process through call_command; the ones whose exact stdout or exit code on the command line
matters run as real `manage.py` processes on the test database."""
import json
import re
from datetime import timedelta
from functools import partial

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from comfyhub import tokens
from comfyhub.models import AccessToken
from tests.support.cli import run, run_process

pytestmark = pytest.mark.django_db(transaction=True)

cli = partial(run, "tokens")
cli_process = partial(run_process, "tokens")

JSON_KEYS = {"id", "user", "name", "prefix", "state", "created_at", "expires_at", "last_used_at", "revoked_at"}


@pytest.fixture
def bob(transactional_db):
    return User.objects.create_user("bob", password="bob-password-1")


def test_create_prints_only_the_token_on_stdout_so_a_script_can_capture_it(bob):
    result = cli_process("create", "--user", "bob", "--name", "render farm", "--expires-days", "30", timeout=60)
    assert result.code == 0, result.err
    assert re.fullmatch(r"chub_[A-Za-z0-9_-]{43}\n", result.out)
    raw = result.out.strip()
    token = tokens.token_authenticate(raw)
    assert token is not None and token.user == bob and token.name == "render farm"
    assert abs(token.expires_at - (timezone.now() + timedelta(days=30))) < timedelta(minutes=5)
    assert f"Created token {token.pk} 'render farm' ({token.prefix}…) for bob" in result.err
    assert "It is not shown again." in result.err and raw not in result.err


def test_create_without_an_expiry_makes_a_token_that_never_expires(bob):
    result = cli("create", "--user", "bob", "--name", "forever")
    assert result.code == 0
    assert tokens.token_authenticate(result.out.strip()).expires_at is None
    assert "never expires" in result.err


@pytest.mark.parametrize("args, message", [
    (["--user", "nobody", "--name", "x"], "No user 'nobody'. Known: bob"),
    (["--user", "bob", "--name", "  "], "name: Give the token a name"),
    (["--user", "bob", "--name", "x" * 101], "name: The name is 101 characters long; keep it to 100."),
    (["--user", "bob", "--name", "x", "--expires-days", "0"],
     "expires: '0' is not a number of days: give one from 1 to 3650, or 'never'."),
    (["--user", "bob", "--name", "x", "--expires-days", "99999"], "give one from 1 to 3650"),
    (["--user", "bob", "--name", "x", "--expires-days", "a week"], "give one from 1 to 3650"),
    (["--user", "bob"], "the following arguments are required: --name"),
    (["--user", "bob\x00", "--name", "x"], "contains a NUL character"),
])
def test_create_refuses_bad_input_with_exit_code_2_and_makes_nothing(bob, args, message):
    result = cli("create", *args)
    assert result.code == 2
    assert message in result.err
    assert result.out == ""
    assert not AccessToken.objects.exists()


def test_create_refuses_an_inactive_user(bob):
    bob.is_active = False
    bob.save()
    result = cli("create", "--user", "bob", "--name", "x")
    assert result.code == 2 and "user: User 'bob' is inactive" in result.err
    assert not AccessToken.objects.exists()


def test_the_command_line_exits_2_on_bad_input_with_the_message_alone(bob):
    result = cli_process("create", "--user", "nobody", "--name", "x", timeout=60)
    assert result.code == 2
    assert result.out == "" and result.err.strip() == "No user 'nobody'. Known: bob"


def test_list_shows_every_token_with_its_state_and_never_the_token(bob, stranger):
    live, live_raw = tokens.token_create(user=bob, name="live one")
    dead, dead_raw = tokens.token_create(user=bob, name="dead one")
    tokens.token_revoke(token=dead, user=None)
    sams, _ = tokens.token_create(user=stranger, name="sams script",
                                  expires_at=timezone.now() + timedelta(days=2))
    AccessToken.objects.filter(pk=sams.pk).update(expires_at=timezone.now() - timedelta(days=1))
    result = cli("list")
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == ["ID", "PREFIX", "USER", "STATE", "CREATED", "EXPIRES", "LAST", "USED", "NAME"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {str(live.pk), str(dead.pk), str(sams.pk)}
    assert rows[str(live.pk)].split()[1:4] == [live.prefix, "bob", "active"]
    assert rows[str(dead.pk)].split()[3] == "revoked" and rows[str(dead.pk)].endswith("dead one")
    assert rows[str(sams.pk)].split()[2:4] == ["sam", "expired"]
    assert live_raw not in result.out and dead_raw not in result.out and live.digest not in result.out


def test_list_for_one_user_and_as_json(bob, stranger):
    token, _ = tokens.token_create(user=bob, name="bobs")
    tokens.token_create(user=stranger, name="sams")
    result = cli("list", "--user", "bob", "--json")
    assert result.code == 0
    data = json.loads(result.out)
    assert [entry["name"] for entry in data] == ["bobs"]
    assert set(data[0]) == JSON_KEYS
    assert data[0]["id"] == token.pk and data[0]["state"] == "active" and data[0]["expires_at"] is None
    assert cli("list", "--user", "nobody").code == 2


def test_list_without_tokens_says_how_to_make_one(bob):
    result = cli("list")
    assert result.code == 0 and "tokens create --user USERNAME --name NAME" in result.out
    assert json.loads(cli("list", "--json").out) == []


def test_revoke_by_id_prefix_or_the_whole_token(bob):
    by_id, raw_id = tokens.token_create(user=bob, name="by id")
    by_prefix, raw_prefix = tokens.token_create(user=bob, name="by prefix")
    by_token, raw_token = tokens.token_create(user=bob, name="by token")
    for token, argument in ((by_id, str(by_id.pk)), (by_prefix, f"{by_prefix.prefix}…"), (by_token, raw_token)):
        result = cli("revoke", argument)
        assert result.code == 0
        assert result.out.strip() == f"Revoked token {token.pk} '{token.name}' ({token.prefix}…) of bob."
    assert all(tokens.token_authenticate(raw) is None for raw in (raw_id, raw_prefix, raw_token))


def test_revoking_twice_says_so_and_succeeds(bob):
    token, _ = tokens.token_create(user=bob, name="twice")
    assert cli("revoke", str(token.pk)).code == 0
    result = cli("revoke", str(token.pk))
    assert result.code == 0 and "was already revoked" in result.out


@pytest.mark.parametrize("argument, message", [
    ("999999", "No token '999999'. See the tokens with: python manage.py tokens list"),
    ("chub_zzzzzzz", "No token 'chub_zzzzzzz'."),
    ("chub_" + "z" * 43, "No token"),
    ("chub_abc", "neither a token id nor a token prefix"),
    ("render farm", "neither a token id nor a token prefix"),
    ("", "neither a token id nor a token prefix"),
    ("9" * 40, "neither a token id nor a token prefix"),
])
def test_revoke_of_an_unknown_token_is_exit_code_2(bob, argument, message):
    token, raw = tokens.token_create(user=bob, name="kept")
    result = cli("revoke", argument)
    assert result.code == 2 and message in result.err
    assert tokens.token_authenticate(raw) == token


def test_a_prefix_shared_by_two_tokens_asks_for_the_id(bob):
    first, first_raw = tokens.token_create(user=bob, name="one")
    second, _ = tokens.token_create(user=bob, name="two")
    AccessToken.objects.filter(pk=second.pk).update(prefix=first.prefix)
    result = cli("revoke", first.prefix)
    assert result.code == 2
    assert f"Several tokens start with '{first.prefix}' (ids " in result.err and "give the id instead" in result.err
    assert tokens.token_authenticate(first_raw) == first
