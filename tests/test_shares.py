"""Owners and shares on the instance page, in the admin and on the command line; who is shown which buttons and who
may start, stop and restart an instance."""
import pytest
from django.contrib.auth.models import Group, Permission, User
from django.urls import reverse

from comfyhub.models import Operation
from instances import access, services
from instances.models import Instance, InstanceOpen, InstanceShare
from tests.support.cli import run

pytestmark = pytest.mark.django_db


@pytest.fixture
def olive(db):
    """Makes her own instances (self-service) and owns one."""
    user = User.objects.create_user("olive", password="olive-password-1")
    user.user_permissions.add(Permission.objects.get(codename="create_own_instance"))
    return user


@pytest.fixture
def studio(olive):
    return services.instance_create(instance_id="studio", image="example/comfyui:1", owner=olive)


def page(client, user, instance):
    client.force_login(user)
    return client.get(instance.get_absolute_url()).content.decode()


def add_url(instance):
    return reverse("instance-share-add", args=[instance.instance_id])


def remove_url(share):
    return reverse("instance-share-remove", args=[share.instance.instance_id, share.pk])


# --- Buttons and addresses ------------------------------------------------------------------------------------

def test_open_comfyui_goes_through_the_hub_in_a_new_tab(client, stranger, studio):
    content = page(client, stranger, studio)
    assert f'href="/i/studio/" target="_blank" rel="noopener" data-testid="open-comfyui"' in content
    url_row = content.split('data-testid="instance-url">')[1].split("</dd>")[0]
    assert "http://testserver/i/studio/" in url_row
    assert f"127.0.0.1:{studio.host_port}" not in content


def test_operators_also_see_the_nodes_direct_address(client, operator, studio):
    url_row = page(client, operator, studio).split('data-testid="instance-url">')[1].split("</dd>")[0]
    assert "http://testserver/i/studio/" in url_row and f"http://127.0.0.1:{studio.host_port}/" in url_row


@pytest.mark.parametrize("who, shown", [("olive", True), ("oscar", True), ("alice", True), ("sam", False)])
def test_start_stop_and_restart_are_shown_to_those_who_may_operate_it(client, olive, operator, admin_user, stranger,
                                                                      studio, who, shown):
    content = page(client, User.objects.get(username=who), studio)
    for button in (">Start<", ">Stop<", ">Restart<"):
        assert (button in content) is shown, f"{button} for {who}"


def test_the_owner_making_their_own_sees_no_edit_delete_or_build(client, olive, studio):
    content = page(client, olive, studio)
    for button in (">Build<", ">Edit<", "Delete…"):
        assert button not in content


def test_someone_a_share_lets_use_it_may_not_start_it(client, stranger, studio, olive):
    access.share_add(instance=studio, username="sam", user=olive)
    content = page(client, stranger, studio)
    assert ">Start<" not in content
    assert client.post(reverse("instance-start", args=["studio"])).status_code == 403


@pytest.mark.parametrize("name, kind", [("instance-start", "instance_start"), ("instance-stop", "instance_stop"),
                                        ("instance-restart", "instance_restart")])
def test_the_owner_starts_stops_and_restarts_their_own_instance(client, olive, studio, name, kind):
    client.force_login(olive)
    response = client.post(reverse(name, args=["studio"]))
    assert response.status_code == 302 and response["Location"] == studio.get_absolute_url()
    operation = Operation.objects.get()
    assert (operation.kind, operation.requested_by) == (kind, olive)


@pytest.mark.parametrize("name", ["instance-start", "instance-stop", "instance-restart", "instance-build",
                                  "instance-edit", "instance-delete"])
def test_the_owner_may_not_act_on_someone_elses_instance(client, olive, name):
    other = services.instance_create(instance_id="other", image="example/comfyui:1")
    client.force_login(olive)
    assert client.post(reverse(name, args=["other"]), {"confirm": "other"}).status_code == 403
    assert not Operation.objects.exists() and Instance.objects.filter(pk=other.pk).exists()


def test_stopping_records_who_stopped_it(client, olive, studio):
    client.force_login(olive)
    client.post(reverse("instance-stop", args=["studio"]))
    studio.refresh_from_db()
    assert studio.stop_reason == "Stopped by olive." and studio.stopped_at is not None


# --- The access panel -------------------------------------------------------------------------------------------

def test_the_panel_shows_owner_shares_and_last_opens(client, stranger, olive, studio):
    Group.objects.create(name="render-team")
    access.share_add(instance=studio, group="render-team", user=olive)
    access.share_add(instance=studio, username="sam", user=olive)
    InstanceOpen.objects.create(instance=studio, user=olive, via="browser")
    InstanceOpen.objects.create(instance=studio, user=stranger, via="token")
    content = page(client, stranger, studio)
    assert 'data-testid="instance-owner">olive</dd>' in content
    shares = content.split('data-testid="instance-shares">')[1].split("</dd>")[0]
    assert "sam" in shares and "group <strong>render-team</strong>" in shares and "by olive" in shares
    opens = content.split('data-testid="instance-opens">')[1].split("</table>")[0]
    assert "<td>sam</td>" in opens and "<td>olive</td>" in opens
    assert "token" in opens and "browser" in opens


def test_an_instance_without_owner_shares_or_opens_says_so(client, stranger):
    services.instance_create(instance_id="lonely", image="example/comfyui:1")
    content = page(client, stranger, Instance.objects.get(instance_id="lonely"))
    assert "none: operators only" in content and "nobody" in content
    assert "Nobody has opened it through the hub yet." in content


@pytest.mark.parametrize("who, shown", [("olive", True), ("oscar", True), ("alice", True), ("sam", False)])
def test_only_those_who_may_share_see_the_share_forms(client, olive, operator, admin_user, stranger, studio, who,
                                                      shown):
    access.share_add(instance=studio, username="sam" if who != "sam" else "oscar", user=olive)
    content = page(client, User.objects.get(username=who), studio)
    assert ('data-testid="share-form"' in content) is shown
    assert ("Remove…" in content) is shown


def test_the_owner_shares_with_a_user_by_name(client, olive, stranger, studio):
    client.force_login(olive)
    response = client.post(add_url(studio), {"username": "sam"}, follow=True)
    assert response.redirect_chain[-1][0] == "/instances/studio/#access"
    assert "&#x27;studio&#x27; is now shared with sam." in response.content.decode()
    share = InstanceShare.objects.get()
    assert (share.user, share.created_by) == (stranger, olive)
    assert access.can_use(stranger, studio)


def test_an_operator_shares_with_a_group_by_name(client, operator, studio):
    Group.objects.create(name="render-team")
    client.force_login(operator)
    response = client.post(add_url(studio), {"group": "render-team"}, follow=True)
    assert "is now shared with group render-team." in response.content.decode()
    assert InstanceShare.objects.get().group.name == "render-team"


@pytest.mark.parametrize("data, message", [
    ({"username": "nobody"}, "Not shared: There is no user &#x27;nobody&#x27;; check the spelling"),
    ({"group": "nobody"}, "Not shared: There is no group &#x27;nobody&#x27;"),
    ({}, "Not shared: Give either a user name or a group name to share it with."),
    ({"username": "olive"}, "&#x27;olive&#x27; owns &#x27;studio&#x27; already"),
])
def test_a_share_that_cannot_be_made_says_why(client, olive, studio, data, message):
    client.force_login(olive)
    response = client.post(add_url(studio), data, follow=True)
    assert message in response.content.decode()
    assert not InstanceShare.objects.exists()


def test_a_stranger_posting_a_share_is_refused(client, stranger, studio):
    client.force_login(stranger)
    assert client.post(add_url(studio), {"username": "sam"}).status_code == 403
    assert not InstanceShare.objects.exists()


def test_sharing_needs_a_login_and_a_post(client, olive, studio):
    response = client.post(add_url(studio), {"username": "sam"})
    assert response.status_code == 302 and response["Location"].startswith("/login/")
    client.force_login(olive)
    assert client.get(add_url(studio)).status_code == 405


def test_removing_a_share_asks_first_then_removes_it(client, olive, stranger, studio):
    share = access.share_add(instance=studio, username="sam", user=olive)
    client.force_login(olive)
    assert client.get(remove_url(share)).status_code == 405
    asked = client.post(remove_url(share))
    assert asked.status_code == 200 and "Stop sharing studio with sam?" in asked.content.decode()
    assert 'name="confirm" value="yes"' in asked.content.decode()
    assert InstanceShare.objects.filter(pk=share.pk).exists()
    done = client.post(remove_url(share), {"confirm": "yes"}, follow=True)
    assert "is no longer shared with sam; access ends within 5 s." in done.content.decode()
    assert not InstanceShare.objects.exists()
    assert not access.can_use(stranger, studio)


def test_a_stranger_may_not_remove_a_share(client, olive, stranger, studio):
    share = access.share_add(instance=studio, username="sam", user=olive)
    client.force_login(stranger)
    assert client.post(remove_url(share)).status_code == 403
    assert client.post(remove_url(share), {"confirm": "yes"}).status_code == 403
    assert InstanceShare.objects.filter(pk=share.pk).exists()


def test_a_share_is_removed_only_through_its_own_instance(client, olive, operator, studio):
    share = access.share_add(instance=studio, username="oscar", user=olive)
    services.instance_create(instance_id="other", image="example/comfyui:1", owner=olive)
    client.force_login(olive)
    response = client.post(reverse("instance-share-remove", args=["other", share.pk]), {"confirm": "yes"})
    assert response.status_code == 404 and InstanceShare.objects.filter(pk=share.pk).exists()


# --- The instance form: owner and idle stop ------------------------------------------------------------------

def form_data(**fields):
    return {"display_name": "", "description": "", "image": "example/comfyui:1", "image_arguments": "command",
            "extra_args": "", "extra_env": "", "host_port": "", **fields}


def test_an_operator_changes_the_owner_and_the_idle_stop(client, operator, stranger, studio, settings):
    client.force_login(operator)
    form = client.get(reverse("instance-edit", args=["studio"])).content.decode()
    assert 'name="owner" value="olive"' in form
    assert f"{settings.IDLE_STOP_AFTER_DEFAULT} is a good start (IDLE_STOP_AFTER_DEFAULT)" in form
    response = client.post(reverse("instance-edit", args=["studio"]), form_data(owner="sam", idle_stop_after="45"))
    assert response.status_code == 302
    studio.refresh_from_db()
    assert (studio.owner, studio.idle_stop_after) == (stranger, 45)
    client.post(reverse("instance-edit", args=["studio"]), form_data(owner="", idle_stop_after=""))
    studio.refresh_from_db()
    assert (studio.owner, studio.idle_stop_after) == (None, 0)


@pytest.mark.parametrize("fields, field, message", [
    ({"owner": "nobody"}, "owner", "There is no user &#x27;nobody&#x27;"),
    ({"idle_stop_after": "-5"}, "idle_stop_after", "greater than or equal to 0"),
    ({"idle_stop_after": "soon"}, "idle_stop_after", "Enter a whole number."),
])
def test_the_instance_form_refuses_a_bad_owner_or_idle_stop(client, operator, studio, fields, field, message):
    client.force_login(operator)
    response = client.post(reverse("instance-edit", args=["studio"]), form_data(**fields))
    assert response.status_code == 200
    assert message in response.content.decode().split(f'data-testid="error-{field}"')[1].split("</ul>")[0]
    studio.refresh_from_db()
    assert (studio.owner.username, studio.idle_stop_after) == ("olive", 0)


def test_a_new_instance_belongs_to_its_creator_unless_another_owner_is_named(client, operator, stranger):
    client.force_login(operator)
    client.post(reverse("instance-create"), form_data(instance_id="mine"))
    client.post(reverse("instance-create"), form_data(instance_id="sams", owner="sam", idle_stop_after="30"))
    assert Instance.objects.get(instance_id="mine").owner == operator
    theirs = Instance.objects.get(instance_id="sams")
    assert (theirs.owner, theirs.idle_stop_after, theirs.created_by) == (stranger, 30, operator)


def test_the_service_refuses_an_idle_stop_that_is_not_whole_minutes(studio):
    from django.core.exceptions import ValidationError

    for bad in (-1, 1.5, "10", True, services.IDLE_STOP_MAX_MINUTES + 1):
        with pytest.raises(ValidationError) as refused:
            services.instance_update(instance=studio, display_name="", description="", image=studio.image,
                                     extra_args=[], extra_env={}, host_port=None, gpu_indexes=[],
                                     idle_stop_after=bad)
        assert "whole minutes from 0 (never)" in refused.value.message_dict["idle_stop_after"][0]
    studio.refresh_from_db()
    assert studio.idle_stop_after == 0


# --- The admin ----------------------------------------------------------------------------------------------------

ADMIN_DATA = {"display_name": "", "description": "", "image": "example/comfyui:1", "extra_args": "[]",
              "extra_env": "{}", "idle_stop_after": "0", "assignments-TOTAL_FORMS": "0",
              "assignments-INITIAL_FORMS": "0", "opens-TOTAL_FORMS": "0", "opens-INITIAL_FORMS": "0"}


def test_the_admin_shows_owner_shares_and_opens(client, admin_user, olive, stranger, studio):
    access.share_add(instance=studio, username="sam", user=olive)
    InstanceOpen.objects.create(instance=studio, user=stranger, via="token")
    client.force_login(admin_user)
    content = client.get(reverse("admin:instances_instance_change", args=[studio.pk])).content.decode()
    assert 'name="owner"' in content and 'name="idle_stop_after"' in content
    assert 'id="shares-group"' in content and 'id="opens-group"' in content
    assert "Last opened through the hub" in content


def test_the_admin_adds_and_removes_shares_through_the_same_rules(client, admin_user, olive, stranger, studio):
    client.force_login(admin_user)
    url = reverse("admin:instances_instance_change", args=[studio.pk])
    data = {**ADMIN_DATA, "owner": str(olive.pk), "shares-TOTAL_FORMS": "1", "shares-INITIAL_FORMS": "0",
            "shares-0-user": str(stranger.pk), "shares-0-group": ""}
    response = client.post(url, data, follow=True)
    assert "was changed successfully" in response.content.decode()
    share = InstanceShare.objects.get()
    assert (share.user, share.created_by) == (stranger, admin_user)
    owner_share = {**data, "shares-0-user": str(olive.pk)}
    share.delete()
    refused = client.post(url, owner_share, follow=True).content.decode()
    assert "owns" in refused and not InstanceShare.objects.exists()
    share = access.share_add(instance=studio, username="sam", user=olive)
    removing = {**ADMIN_DATA, "owner": str(olive.pk), "shares-TOTAL_FORMS": "1", "shares-INITIAL_FORMS": "1",
                "shares-0-id": str(share.pk), "shares-0-instance": str(studio.pk), "shares-0-DELETE": "on"}
    assert "was changed successfully" in client.post(url, removing, follow=True).content.decode()
    assert not InstanceShare.objects.exists()


def test_the_admin_changes_the_owner_and_idle_stop_through_the_service(client, admin_user, stranger, studio):
    client.force_login(admin_user)
    url = reverse("admin:instances_instance_change", args=[studio.pk])
    data = {**ADMIN_DATA, "owner": str(stranger.pk), "idle_stop_after": "20", "shares-TOTAL_FORMS": "0",
            "shares-INITIAL_FORMS": "0"}
    assert "was changed successfully" in client.post(url, data, follow=True).content.decode()
    studio.refresh_from_db()
    assert (studio.owner, studio.idle_stop_after) == (stranger, 20)


# --- The command line ---------------------------------------------------------------------------------------------

def test_the_cli_shares_and_unshares_by_user_and_group(olive, stranger, studio):
    Group.objects.create(name="render-team")
    result = run("instances", "share", "studio", "--user", "sam")
    assert result.code == 0, result.err
    assert "Shared 'studio' with sam; they open it at /i/studio/" in result.out
    assert run("instances", "share", "studio", "--group", "render-team").code == 0
    status = run("instances", "status", "studio")
    assert "owner      olive" in status.out and "shared     sam, group render-team" in status.out
    assert "hub        /i/studio/ on ComfyHub's address" in status.out
    result = run("instances", "unshare", "studio", "--user", "sam")
    assert result.code == 0 and "no longer shared with sam" in result.out
    assert [access.share_label(s) for s in access.shares_of(studio)] == ["group render-team"]


@pytest.mark.parametrize("args, code, message", [
    (("share", "studio", "--user", "nobody"), 2, "username: There is no user 'nobody'"),
    (("share", "studio", "--group", "nobody"), 2, "group: There is no group 'nobody'"),
    (("share", "studio", "--user", "olive"), 2, "username: 'olive' owns 'studio' already"),
    (("share", "nowhere", "--user", "sam"), 2, "No instance 'nowhere'. Known: studio"),
    (("share", "studio"), 2, "one of the arguments --user --group is required"),
    (("share", "studio", "--user", "sam", "--group", "x"), 2, "not allowed with argument"),
    (("unshare", "studio", "--user", "sam"), 2, "username: 'studio' is not shared with 'sam' (shared with: nobody)."),
])
def test_the_cli_says_what_is_wrong_with_a_share(olive, stranger, studio, args, code, message):
    result = run("instances", *args)
    assert result.code == code and message in result.err


def test_the_cli_sets_the_owner_and_idle_stop_on_create_and_edit(olive, stranger):
    result = run("instances", "create", "cli-made", "--owner", "sam", "--idle-stop", "30")
    assert result.code == 0, result.err
    assert "owner  sam" in result.out and "hub    /i/cli-made/" in result.out
    made = Instance.objects.get(instance_id="cli-made")
    assert (made.owner, made.idle_stop_after) == (stranger, 30)
    result = run("instances", "edit", "cli-made", "--owner", "olive", "--idle-stop", "0", "--name", "Made")
    assert result.code == 0, result.err
    assert "owner      olive" in result.out and "idle stop  never" in result.out
    made.refresh_from_db()
    assert (made.owner, made.idle_stop_after, made.display_name) == (olive, 0, "Made")
    assert run("instances", "edit", "cli-made", "--no-owner").code == 0
    made.refresh_from_db()
    assert made.owner is None and made.display_name == "Made"


def test_an_instance_made_on_the_command_line_has_no_owner_unless_named(db):
    assert run("instances", "create", "ownerless").code == 0
    assert Instance.objects.get(instance_id="ownerless").owner is None


@pytest.mark.parametrize("args, message", [
    (("create", "bad-owner", "--owner", "nobody"), "owner: There is no user 'nobody'"),
    (("create", "bad-idle", "--idle-stop", "-5"), "idle_stop_after: '-5' is not a number of minutes"),
    (("create", "bad-idle", "--idle-stop", "soon"), "idle_stop_after: 'soon' is not a number of minutes"),
    (("edit", "studio", "--owner", "nobody"), "owner: There is no user 'nobody'"),
    (("edit", "studio", "--idle-stop", "1.5"), "idle_stop_after: '1.5' is not a number of minutes"),
    (("edit", "studio"), "Nothing to change: give --name, --description, --owner, --no-owner or --idle-stop."),
    (("edit", "studio", "--owner", "sam", "--no-owner"), "not allowed with argument"),
])
def test_the_cli_refuses_a_bad_owner_or_idle_stop(olive, stranger, studio, args, message):
    result = run("instances", *args)
    assert result.code == 2 and message in result.err
    studio.refresh_from_db()
    assert (studio.owner, studio.idle_stop_after) == (olive, 0)
    assert not Instance.objects.filter(instance_id__startswith="bad-").exists()


def test_the_cli_json_names_owner_shares_hub_path_and_idle_stop(olive, stranger, studio):
    import json

    access.share_add(instance=studio, username="sam", user=olive)
    data = json.loads(run("instances", "status", "studio", "--json").out)
    assert (data["owner"], data["hub_path"], data["idle_stop_after"]) == ("olive", "/i/studio/", 0)
    assert data["shares"] == [{"user": "sam", "group": None}]
    listed = json.loads(run("instances", "list", "--json").out)
    assert listed[0]["owner"] == "olive"
