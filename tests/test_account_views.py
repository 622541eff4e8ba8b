"""The account page: one's own tokens, a new token shown once, revoking with a confirmation, and the instances one
may use. Another user's token is not found (404), whoever asks. And the admin's read-only token list with its revoke
action: staff see their own tokens, superusers everyone's."""
import re

import pytest
from django.contrib.sessions.models import Session
from django.contrib.auth.models import Group, Permission, User
from django.urls import reverse

from comfyhub import tokens
from comfyhub.models import AccessToken
from instances import services
from instances.models import InstanceShare

pytestmark = pytest.mark.django_db

TOKEN = re.compile(r"chub_[A-Za-z0-9_-]{43}")


@pytest.fixture
def bob(db):
    return User.objects.create_user("bob", password="bob-password-1")


@pytest.fixture
def bob_client(client, bob):
    client.force_login(bob)
    return client


def test_the_account_page_needs_a_login(client):
    for url in (reverse("account"), reverse("account-token-create"), reverse("account-token-revoke", args=[1])):
        response = client.get(url) if "revoke" in url or url == reverse("account") else client.post(url)
        assert response.status_code == 302 and response["Location"].startswith(reverse("login")), url
    assert not AccessToken.objects.exists()


def test_the_header_links_the_user_name_to_the_account_page(bob_client):
    page = bob_client.get(reverse("dashboard")).content.decode()
    assert f'href="{reverse("account")}"' in page


def test_a_new_token_is_shown_once_in_the_answer_to_its_post_and_kept_nowhere(bob_client, bob):
    response = bob_client.post(reverse("account-token-create"),
                               {"name": "render farm", "expires": "30", "password": "bob-password-1"})
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    token = AccessToken.objects.get(user=bob)
    assert token.name == "render farm" and token.expires_at is not None
    page = response.content.decode()
    raws = set(TOKEN.findall(page))
    assert len(raws) == 1
    raw = raws.pop()
    assert tokens.token_authenticate(raw) == token
    assert "Copy it now: it is not shown again" in page
    assert f'curl -H "Authorization: Bearer {raw}" http://testserver/i/&lt;instance-id&gt;/system_stats' in page
    # The form below is empty again: no password left in the page.
    assert 'value="bob-password-1"' not in page
    # Not in any session (a page of an instance could read it back from the next GET).
    assert all(raw not in str(session.get_decoded()) for session in Session.objects.all())

    again = bob_client.get(reverse("account")).content.decode()
    assert raw not in again and not TOKEN.search(again)
    assert token.prefix + "…" in again and "render farm" in again


def test_making_a_token_asks_for_the_password_again(bob_client, bob):
    """A page of an instance on the hub's origin can post the form with the session and CSRF token; not the password."""
    for password in ("", "wrong-password", " bob-password-1"):
        response = bob_client.post(reverse("account-token-create"),
                                   {"name": "stolen", "expires": "never", "password": password})
        assert response.status_code == 400
        page = response.content.decode()
        errors = re.search(r'data-testid="error-password">(.*?)</ul>', page, re.S)
        assert errors, password
        assert ("This field is required." if not password else "That is not your password.") in errors[1]
        assert not TOKEN.search(page)
    assert not AccessToken.objects.exists()
    form = bob_client.get(reverse("account")).content.decode()
    assert 'type="password" name="password"' in form and 'autocomplete="current-password"' in form


def test_the_example_names_an_instance_the_user_may_use(bob_client, bob):
    services.instance_create(instance_id="bobs", owner=bob)
    page = bob_client.post(reverse("account-token-create"),
                           {"name": "script", "expires": "never", "password": "bob-password-1"}).content.decode()
    assert re.search(r'curl -H "Authorization: Bearer chub_[^"]+" http://testserver/i/bobs/system_stats', page)
    assert AccessToken.objects.get(user=bob).expires_at is None


@pytest.mark.parametrize("data, field, message", [
    ({"name": "", "expires": "30"}, "name", "This field is required."),
    ({"name": "x" * 101, "expires": "30"}, "name", "at most 100 characters"),
    ({"name": "tabs\tare\tout", "expires": "30"}, "name", "control characters"),
    ({"name": "ok", "expires": "0"}, "expires", "give one from 1 to 3650, or &#x27;never&#x27;"),
    ({"name": "ok", "expires": "forever"}, "expires", "give one from 1 to 3650"),
])
def test_a_bad_token_form_says_what_is_wrong_and_makes_nothing(bob_client, data, field, message):
    response = bob_client.post(reverse("account-token-create"), {**data, "password": "bob-password-1"})
    assert response.status_code == 400
    page = response.content.decode()
    errors = re.search(rf'data-testid="error-{field}">(.*?)</ul>', page, re.S)
    assert errors and message in errors[1]
    assert not AccessToken.objects.exists() and not TOKEN.search(page)


def test_creating_needs_a_post(bob_client):
    assert bob_client.get(reverse("account-token-create")).status_code == 405
    assert not AccessToken.objects.exists()


def test_the_page_lists_only_ones_own_tokens_with_their_state(bob_client, bob, stranger):
    active, _ = tokens.token_create(user=bob, name="live one")
    revoked, _ = tokens.token_create(user=bob, name="dead one")
    tokens.token_revoke(token=revoked, user=bob)
    expired, _ = tokens.token_create(user=bob, name="old one")
    AccessToken.objects.filter(pk=expired.pk).update(expires_at="2020-01-01T00:00:00Z")
    theirs, _ = tokens.token_create(user=stranger, name="sams secret")
    page = bob_client.get(reverse("account")).content.decode()
    states = dict(re.findall(r'<tr data-token="(\d+)">.*?data-testid="token-state">(\w+)<', page, re.S))
    assert states == {str(active.pk): "active", str(revoked.pk): "revoked", str(expired.pk): "expired"}
    assert "sams secret" not in page and theirs.prefix not in page


def test_revoking_asks_first_then_revokes_on_post(bob_client, bob):
    token, raw = tokens.token_create(user=bob, name="script")
    url = reverse("account-token-revoke", args=[token.pk])
    confirm = bob_client.get(url)
    assert confirm.status_code == 200
    assert "Revoke the token 'script'" in confirm.content.decode()
    assert tokens.token_authenticate(raw) == token  # asking changed nothing

    response = bob_client.post(url, follow=True)
    assert response.redirect_chain[-1][0] == reverse("account")
    assert "Revoked the token &#x27;script&#x27;" in response.content.decode()
    assert tokens.token_authenticate(raw) is None

    again = bob_client.post(url, follow=True)
    assert "was already revoked" in again.content.decode()
    assert bob_client.get(url, follow=True).redirect_chain[-1][0] == reverse("account")


def test_another_users_token_is_not_found_even_by_a_superuser(client, bob, stranger, admin_user):
    token, raw = tokens.token_create(user=bob, name="bobs")
    url = reverse("account-token-revoke", args=[token.pk])
    for someone in (stranger, admin_user):
        client.force_login(someone)
        assert client.get(url).status_code == 404
        assert client.post(url).status_code == 404
    assert client.post(reverse("account-token-revoke", args=[999999])).status_code == 404
    assert tokens.token_authenticate(raw) == token


def test_the_page_lists_the_instances_the_user_may_use_and_no_others(bob_client, bob, admin_user):
    services.instance_create(instance_id="owned", owner=bob)
    shared = services.instance_create(instance_id="shared-to-bob", owner=admin_user)
    InstanceShare.objects.create(instance=shared, user=bob, created_by=admin_user)
    team = Group.objects.create(name="team")
    bob.groups.add(team)
    by_group = services.instance_create(instance_id="shared-to-team", owner=admin_user)
    InstanceShare.objects.create(instance=by_group, group=team, created_by=admin_user)
    services.instance_create(instance_id="not-bobs", owner=admin_user)
    page = bob_client.get(reverse("account")).content.decode()
    section = page[page.index('id="usable-instances"'):]
    assert re.findall(r'<a href="(/i/[^"]+)"', section) == ["/i/owned/", "/i/shared-to-bob/", "/i/shared-to-team/"]


def test_listing_the_instances_takes_one_query_however_many_there_are(bob, admin_user, django_assert_num_queries):
    from comfyhub.views_account import usable_instances
    from instances import access
    from instances.models import Instance

    team = Group.objects.create(name="team")
    bob.groups.add(team)
    for number in range(6):
        instance = services.instance_create(instance_id=f"i{number}", owner=bob if number == 0 else admin_user)
        if number in (1, 2):
            InstanceShare.objects.create(instance=instance, user=bob, created_by=admin_user)
        if number in (2, 3):
            InstanceShare.objects.create(instance=instance, group=team, created_by=admin_user)
    bob.get_all_permissions()  # loaded once per request anyway (the menu asks them)
    with django_assert_num_queries(1):
        listed = usable_instances(bob)
    assert [i.instance_id for i in listed] == ["i0", "i1", "i2", "i3"]
    assert listed == [i for i in Instance.objects.order_by("instance_id") if access.can_use(bob, i)]
    with django_assert_num_queries(1):
        assert len(usable_instances(admin_user)) == 6
    bob.is_active = False
    assert usable_instances(bob) == []


def test_with_nothing_to_use_the_page_says_whom_to_ask(bob_client):
    page = bob_client.get(reverse("account")).content.decode()
    assert "ask an instance's owner or an operator to share one with you" in page


# --- The admin -----------------------------------------------------------------------------------------------------

def test_the_admin_lists_tokens_without_their_digest_and_cannot_add_or_edit_them(client, admin_user, bob):
    token, raw = tokens.token_create(user=bob, name="bobs script")
    client.force_login(admin_user)
    listing = client.get(reverse("admin:comfyhub_accesstoken_changelist")).content.decode()
    assert "bobs script" in listing and f"{token.prefix}…" in listing
    detail = client.get(reverse("admin:comfyhub_accesstoken_change", args=[token.pk]))
    assert detail.status_code == 200
    for page in (listing, detail.content.decode()):
        assert token.digest not in page and raw not in page
    assert client.get(reverse("admin:comfyhub_accesstoken_add")).status_code == 403
    client.post(reverse("admin:comfyhub_accesstoken_change", args=[token.pk]), {"name": "renamed"})
    client.post(reverse("admin:comfyhub_accesstoken_delete", args=[token.pk]), {"post": "yes"})
    token.refresh_from_db()
    assert token.name == "bobs script"


def test_the_admin_revoke_action_revokes_the_selected_tokens(client, admin_user, bob):
    first, first_raw = tokens.token_create(user=bob, name="one")
    second, second_raw = tokens.token_create(user=bob, name="two")
    kept, kept_raw = tokens.token_create(user=bob, name="kept")
    tokens.token_revoke(token=second, user=bob)
    client.force_login(admin_user)
    response = client.post(reverse("admin:comfyhub_accesstoken_changelist"),
                           {"action": "revoke", "_selected_action": [first.pk, second.pk]}, follow=True)
    assert "Revoked 1 token(s). 1 were revoked already." in response.content.decode()
    assert tokens.token_authenticate(first_raw) is None and tokens.token_authenticate(second_raw) is None
    assert tokens.token_authenticate(kept_raw) == kept


def test_staff_see_and_revoke_only_their_own_tokens_in_the_admin(client, bob, stranger):
    bob.is_staff = True
    bob.save()
    bob.user_permissions.add(Permission.objects.get(codename="view_accesstoken"))
    own, own_raw = tokens.token_create(user=bob, name="bobs own")
    theirs, theirs_raw = tokens.token_create(user=stranger, name="sams secret")
    client.force_login(bob)
    listing = client.get(reverse("admin:comfyhub_accesstoken_changelist")).content.decode()
    assert "bobs own" in listing and "sams secret" not in listing
    assert client.get(reverse("admin:comfyhub_accesstoken_change", args=[theirs.pk])).status_code in (302, 404)
    client.post(reverse("admin:comfyhub_accesstoken_changelist"),
                {"action": "revoke", "_selected_action": [own.pk, theirs.pk]})
    assert tokens.token_authenticate(own_raw) is None
    assert tokens.token_authenticate(theirs_raw) == theirs
