"""instances/access.py: who may use, operate and share an instance, and whom a refused person should ask."""
import pytest
from django.contrib.auth.models import AnonymousUser, Group, Permission, User
from django.db import connection
from django.test.utils import CaptureQueriesContext

from instances import access, services
from instances.models import InstanceOpen

pytestmark = pytest.mark.django_db


def perm(codename):
    return Permission.objects.get(content_type__app_label="instances", codename=codename)


@pytest.fixture
def owner(db):
    user = User.objects.create_user("olive", password="olive-password-1")
    user.user_permissions.add(perm("create_own_instance"))
    return user


@pytest.fixture
def instance(owner):
    return services.instance_create(instance_id="shared-one", image="example/comfyui:1", owner=owner)


def fresh(user):
    """The user as the next request sees them (permissions are cached on the object)."""
    return User.objects.get(pk=user.pk)


def test_the_owner_may_use_operate_and_share_it(owner, instance):
    assert access.can_use(owner, instance)
    assert access.can_operate(owner, instance)
    assert access.can_share(owner, instance)


def test_an_owner_without_create_own_instances_may_use_and_share_it_but_not_start_it(instance, owner):
    owner.user_permissions.clear()
    owner = fresh(owner)
    assert access.can_use(owner, instance) and access.can_share(owner, instance)
    assert not access.can_operate(owner, instance)


def test_a_stranger_may_neither_use_nor_operate_nor_share_it(stranger, instance):
    assert not access.can_use(stranger, instance)
    assert not access.can_operate(stranger, instance)
    assert not access.can_share(stranger, instance)


def test_no_one_logged_out_may_use_it(instance):
    assert not access.can_use(AnonymousUser(), instance)
    assert not access.can_use(None, instance)
    assert not access.can_operate(AnonymousUser(), instance)
    assert not access.can_share(AnonymousUser(), instance)


def test_a_user_share_lets_that_user_use_it_but_not_start_or_share_it(stranger, instance, owner):
    access.share_add(instance=instance, username="sam", user=owner)
    assert access.can_use(stranger, instance)
    assert not access.can_operate(stranger, instance)
    assert not access.can_share(stranger, instance)


def test_a_group_share_lets_its_members_use_it_and_no_one_else(stranger, instance, owner):
    team = Group.objects.create(name="render-team")
    access.share_add(instance=instance, group="render-team", user=owner)
    assert not access.can_use(stranger, instance)
    stranger.groups.add(team)
    assert access.can_use(stranger, instance)


def test_deciding_about_a_share_takes_one_query(stranger, instance, owner):
    Group.objects.create(name="render-team")
    access.share_add(instance=instance, group="render-team", user=owner)
    stranger.user_permissions.clear()
    stranger.has_perm("instances.use_any_instance")  # permissions are read once per request, not per decision
    with CaptureQueriesContext(connection) as queries:
        assert not access.can_use(stranger, instance)
    assert len(queries) == 1


def test_use_any_instance_lets_someone_use_every_instance(stranger, instance):
    stranger.user_permissions.add(perm("use_any_instance"))
    assert access.can_use(fresh(stranger), instance)
    assert not access.can_operate(fresh(stranger), instance)


def test_an_operator_may_operate_and_share_any_instance(operator, instance):
    assert access.can_operate(operator, instance)
    assert access.can_share(operator, instance)


def test_a_superuser_may_do_everything(admin_user, instance):
    assert access.can_use(admin_user, instance)
    assert access.can_operate(admin_user, instance)
    assert access.can_share(admin_user, instance)


def test_a_deactivated_user_may_do_nothing_even_as_owner_or_superuser(owner, admin_user, instance):
    access.share_add(instance=instance, username="alice", user=owner)
    for user in (owner, admin_user):
        user.is_active = False
        user.save()
        assert not access.can_use(user, instance)
        assert not access.can_operate(user, instance)
        assert not access.can_share(user, instance)


def test_self_service_users_may_operate_their_own_instances_only(owner, instance):
    other = services.instance_create(instance_id="someone-else", image="example/comfyui:1")
    assert access.can_operate(owner, instance)
    assert not access.can_operate(owner, other)
    assert not access.can_use(owner, other)


# --- Whom to ask ------------------------------------------------------------------------------------------------

def test_the_grantors_are_the_owner_and_a_few_active_operators_and_superusers(owner, operator, admin_user, stranger,
                                                                           instance):
    retired = User.objects.create_user("rita")
    retired.groups.add(Group.objects.get(name="operators"))
    retired.is_active = False
    retired.save()
    found = access.grantors(instance)
    assert found.owner == owner
    assert [u.username for u in found.operators] == ["alice", "oscar"]


def test_an_operator_who_owns_it_is_named_once(operator):
    instance = services.instance_create(instance_id="oscars", image="example/comfyui:1", owner=operator)
    found = access.grantors(instance)
    assert found.owner == operator and operator not in found.operators


def test_an_instance_without_an_owner_names_only_operators(operator):
    instance = services.instance_create(instance_id="nobodys", image="example/comfyui:1")
    assert access.grantors(instance) == (None, [operator])


def test_grantors_are_limited_to_a_few(instance):
    for number in range(8):
        User.objects.create_superuser(f"admin-{number}")
    assert len(access.grantors(instance).operators) == access.GRANTORS_SHOWN


# --- Adding and removing shares ---------------------------------------------------------------------------------

def test_a_share_records_who_made_it(owner, stranger, instance):
    share = access.share_add(instance=instance, username="sam", user=owner)
    assert (share.user, share.group, share.created_by) == (stranger, None, owner)
    assert access.share_label(share) == "sam"


@pytest.mark.parametrize("username, group, field, message", [
    ("", "", "username", "Give either a user name or a group name to share it with."),
    ("sam", "render-team", "username", "Give a user name or a group name, not both."),
    ("nobody", "", "username", "There is no user 'nobody'; check the spelling (user names are case-sensitive)."),
    ("Sam", "", "username", "There is no user 'Sam'"),
    ("sam\x00", "", "username", "There is no user"),
    ("olive", "", "username", "'olive' owns 'shared-one' already; owners need no share."),
    ("", "no-such-team", "group", "There is no group 'no-such-team' (groups: operators, render-team, self-service)."),
])
def test_sharing_says_what_is_wrong(owner, stranger, instance, username, group, field, message):
    Group.objects.create(name="render-team")
    with pytest.raises(Exception) as refused:
        access.share_add(instance=instance, username=username, group=group, user=owner)
    assert message in refused.value.message_dict[field][0]
    assert not instance.shares.exists()


def test_sharing_twice_is_refused(owner, stranger, instance):
    Group.objects.create(name="render-team")
    access.share_add(instance=instance, username="sam", user=owner)
    access.share_add(instance=instance, group="render-team", user=owner)
    with pytest.raises(Exception) as twice:
        access.share_add(instance=instance, username=" sam ", user=owner)
    assert twice.value.message_dict == {"username": ["'shared-one' is already shared with 'sam'."]}
    with pytest.raises(Exception) as twice:
        access.share_add(instance=instance, group="render-team", user=owner)
    assert twice.value.message_dict == {"group": ["'shared-one' is already shared with the group 'render-team'."]}
    assert instance.shares.count() == 2


def test_sharing_with_a_deactivated_user_is_refused(owner, stranger, instance):
    stranger.is_active = False
    stranger.save()
    with pytest.raises(Exception) as refused:
        access.share_add(instance=instance, username="sam", user=owner)
    assert "deactivated" in refused.value.message_dict["username"][0]


def test_only_those_who_may_share_add_or_remove_shares(owner, stranger, instance):
    from django.core.exceptions import PermissionDenied

    with pytest.raises(PermissionDenied):
        access.share_add(instance=instance, username="sam", user=stranger)
    share = access.share_add(instance=instance, username="sam", user=owner)
    with pytest.raises(PermissionDenied):
        access.share_remove(share=share, user=stranger)
    assert instance.shares.count() == 1
    access.share_remove(share=share, user=owner)
    assert not instance.shares.exists()
    assert not access.can_use(stranger, instance)


def test_a_share_is_found_by_name_or_the_error_says_whom_it_is_shared_with(owner, stranger, instance):
    access.share_add(instance=instance, username="sam", user=owner)
    assert access.share_find(instance=instance, username="sam").user == stranger
    with pytest.raises(Exception) as missing:
        access.share_find(instance=instance, group="render-team")
    assert missing.value.message_dict == {"group": ["'shared-one' is not shared with the group 'render-team' (shared "
                                                    "with: sam)."]}


# --- Opens --------------------------------------------------------------------------------------------------------

def test_recent_opens_are_newest_first_and_limited(owner, stranger, instance):
    from datetime import timedelta

    from django.utils import timezone

    now = timezone.now()
    for minutes in range(15):
        InstanceOpen.objects.create(instance=instance, user=owner, at=now - timedelta(minutes=minutes))
    InstanceOpen.objects.create(instance=instance, user=stranger, via="token", at=now + timedelta(seconds=1))
    opens = access.recent_opens(instance)
    assert len(opens) == 10
    assert (opens[0].user, opens[0].via) == (stranger, "token")
    assert [o.at for o in opens] == sorted((o.at for o in opens), reverse=True)


# --- The hub's login cookie and instances' own ports (plain HTTP) ----------------------------------------------------

def local_publishing_at(address):
    from instances.models import Node

    node = services.local_node()
    Node.objects.filter(pk=node.pk).update(bind_address=address)


def test_a_plain_http_hub_served_where_a_node_publishes_instance_ports_is_warned_of(settings):
    settings.SESSION_COOKIE_SECURE = False
    settings.HUB_ORIGIN = "http://10.1.2.3:8000"
    settings.ALLOWED_HOSTS = ["localhost", "10.1.2.3"]
    local_publishing_at("10.1.2.3")
    [problem] = access.session_cookie_exposure()
    assert problem.startswith("Node local publishes instance ports at 10.1.2.3, where the hub is served over plain HTTP")
    assert "HTTPS=true" in problem
    local_publishing_at("0.0.0.0")  # every address of the host, the hub's among them
    assert len(access.session_cookie_exposure()) == 1


def test_an_https_only_cookie_another_address_or_loopback_is_not_warned_of(settings):
    settings.HUB_ORIGIN = "http://10.1.2.3:8000"
    settings.ALLOWED_HOSTS = ["localhost", "127.0.0.1", "10.1.2.3"]
    settings.SESSION_COOKIE_SECURE = True
    local_publishing_at("10.1.2.3")
    assert access.session_cookie_exposure() == []
    settings.SESSION_COOKIE_SECURE = False
    local_publishing_at("10.1.2.4")
    assert access.session_cookie_exposure() == []
    # A container does not reach its host's loopback: the hub and its instances both there is what make run does.
    settings.SERVE_BIND = "127.0.0.1:8000"
    settings.HUB_ORIGIN = "http://127.0.0.1:8000"
    settings.ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
    local_publishing_at("127.0.0.1")
    assert access.session_cookie_exposure() == []


def test_loopback_counts_when_the_hub_listens_beyond_it(settings):
    # A container reaches the hub at its bridge gateway then, with the cookie a browser sent to localhost:<port>.
    settings.SESSION_COOKIE_SECURE = False
    settings.SERVE_BIND = "0.0.0.0:8000"
    settings.HUB_ORIGIN = "http://localhost:8000"
    settings.ALLOWED_HOSTS = ["localhost"]
    local_publishing_at("127.0.0.1")
    [problem] = access.session_cookie_exposure()
    assert problem.startswith("Node local publishes instance ports at 127.0.0.1, where the hub is served over plain")
