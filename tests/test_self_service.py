"""Self-service: users with 'create own instances' make instances of their own from the templates an operator marked
self-service, within SELF_SERVICE_MAX_INSTANCES and SELF_SERVICE_MAX_GPUS; everything else stays with operators."""
import pytest
from django.contrib.auth.models import Permission, User
from django.core.exceptions import PermissionDenied, ValidationError
from django.urls import reverse

from comfyhub.models import Operation
from instances import selfservice, services
from instances.models import GPU, Instance, InstanceTemplate

pytestmark = pytest.mark.django_db

NEW = reverse("instance-create-own")


@pytest.fixture
def olive(db):
    user = User.objects.create_user("olive", password="olive-password-1")
    user.user_permissions.add(Permission.objects.get(codename="create_own_instance"))
    return user


@pytest.fixture
def cpu_template(db):
    return services.template_create(name="cpu-sketch", image="example/comfyui:1", gpu_count=0, self_service=True)


@pytest.fixture
def gpu_template(db):
    return services.template_create(name="one-gpu", image="example/comfyui:1", gpu_count=1, self_service=True)


@pytest.fixture
def operators_template(db):
    return services.template_create(name="big-iron", image="example/comfyui:1", gpu_count=2)


def create(client, template, instance_id, display_name=""):
    return client.post(NEW, {"template": template, "instance_id": instance_id, "display_name": display_name})


# --- Who gets the page ---------------------------------------------------------------------------------------

def test_a_self_service_user_is_offered_new_instance_and_led_to_the_self_service_form(client, olive, cpu_template):
    client.force_login(olive)
    dashboard = client.get(reverse("dashboard")).content.decode()
    assert f'<a href="{NEW}"' in dashboard and ">New instance</a>" in dashboard
    response = client.get(reverse("instance-create"))
    assert response.status_code == 302 and response["Location"] == NEW
    form = client.get(NEW).content.decode()
    assert "You own 0 of at most 2 instances (SELF_SERVICE_MAX_INSTANCES)" in form
    assert "0 of at most 1 GPU (SELF_SERVICE_MAX_GPUS)" in form
    assert '<option value="cpu-sketch">' in form


def test_operators_keep_their_own_form_and_strangers_get_neither(client, operator, stranger):
    client.force_login(operator)
    assert f'<a href="{NEW}"' not in client.get(reverse("dashboard")).content.decode()
    assert client.get(reverse("instance-create")).status_code == 200
    client.force_login(stranger)
    assert client.get(reverse("instance-create")).status_code == 403
    assert client.get(NEW).status_code == 403
    assert create(client, "cpu-sketch", "sneaky").status_code == 403
    assert not Instance.objects.exists()


def test_the_form_offers_only_self_service_templates(client, olive, cpu_template, operators_template):
    client.force_login(olive)
    form = client.get(NEW).content.decode()
    assert "cpu-sketch" in form and "big-iron" not in form
    response = create(client, "big-iron", "mine")
    assert response.status_code == 400
    assert "That template is not offered for self-service" in response.content.decode()
    assert not Instance.objects.exists()


def test_with_no_self_service_template_the_page_says_whom_to_ask(client, olive):
    client.force_login(olive)
    assert "ask an operator to mark one as self-service" in client.get(NEW).content.decode()


# --- Creating one's own ----------------------------------------------------------------------------------------

def test_a_self_service_user_creates_an_instance_they_own(client, olive, gpu_template):
    client.force_login(olive)
    response = create(client, "one-gpu", "olives", "Olive's")
    instance = Instance.objects.get(instance_id="olives")
    assert response.status_code == 302 and response["Location"] == instance.get_absolute_url()
    assert (instance.owner, instance.created_by, instance.template, instance.display_name) == (
        olive, olive, gpu_template, "Olive's")
    assert len(instance.assigned_gpus()) == 1
    assert Operation.objects.get().kind == "template_apply"


def test_then_they_start_stop_and_restart_it_but_change_nothing_else(client, olive, cpu_template):
    client.force_login(olive)
    create(client, "cpu-sketch", "olives")
    content = client.get(reverse("instance-detail", args=["olives"])).content.decode()
    assert ">Start<" in content and ">Edit<" not in content and "Delete…" not in content
    assert client.post(reverse("instance-start", args=["olives"])).status_code == 302
    for name in ("instance-edit", "instance-delete", "instance-build", "instance-node-install",
                 "instance-workflows-copy"):
        assert client.post(reverse(name, args=["olives"]), {"confirm": "olives", "image": "evil:1"}).status_code \
            == 403, name
    assert client.post(reverse("template-apply", args=["cpu-sketch"]), {"instance": "olives"}).status_code == 403
    assert client.post(reverse("template-new-instance", args=["cpu-sketch"]),
                       {"instance_id": "around-quota"}).status_code == 403
    assert Instance.objects.get(instance_id="olives").image == "example/comfyui:1"
    assert not Instance.objects.filter(instance_id="around-quota").exists()


def test_a_bad_id_is_refused_on_the_form(client, olive, cpu_template):
    client.force_login(olive)
    response = create(client, "cpu-sketch", "Not An Id")
    assert response.status_code == 400 and "lowercase letters" in response.content.decode()
    assert not Instance.objects.exists()


# --- Quotas --------------------------------------------------------------------------------------------------------

def test_the_instance_quota_says_the_numbers_the_setting_and_what_to_do(client, olive, cpu_template, settings):
    settings.SELF_SERVICE_MAX_INSTANCES = 2
    client.force_login(olive)
    create(client, "cpu-sketch", "first")
    create(client, "cpu-sketch", "second")
    response = create(client, "cpu-sketch", "third")
    assert response.status_code == 400
    error = response.content.decode().split('data-testid="error-instance_id"')[1].split("</ul>")[0]
    assert ("You own 2 instances and SELF_SERVICE_MAX_INSTANCES allows 2. Ask an operator to delete one you no "
            "longer need, or to raise SELF_SERVICE_MAX_INSTANCES.") in error
    assert set(Instance.objects.values_list("instance_id", flat=True)) == {"first", "second"}


def test_the_gpu_quota_counts_the_templates_gpus(client, olive, gpu_template, cpu_template, settings):
    settings.SELF_SERVICE_MAX_GPUS = 1
    client.force_login(olive)
    assert create(client, "one-gpu", "first").status_code == 302
    response = create(client, "one-gpu", "second")
    assert response.status_code == 400
    error = response.content.decode().split('data-testid="error-template"')[1].split("</ul>")[0]
    assert ("Template &#x27;one-gpu&#x27; gives each instance 1 GPU(s); your instances hold 1 already and "
            "SELF_SERVICE_MAX_GPUS allows 1 in all.") in error
    assert "Pick a template with fewer GPUs" in error
    # A CPU template still fits.
    assert create(client, "cpu-sketch", "cpu-one").status_code == 302


def test_gpus_idle_stop_gave_back_still_count_against_the_gpu_quota(client, olive, gpu_template, settings):
    # Its next start takes them again: a second instance on that quota would leave it without.
    settings.SELF_SERVICE_MAX_GPUS = 1
    client.force_login(olive)
    assert create(client, "one-gpu", "first").status_code == 302
    services.gpus_give_back(Instance.objects.get(instance_id="first"))
    assert selfservice.usage(olive).gpus == 1
    assert create(client, "one-gpu", "second").status_code == 400
    row = client.get(reverse("dashboard")).content.decode().split('data-instance="first"')[1].split("</tr>")[0]
    assert 'data-testid="gpus-released">given back (0)</span>' in row


def test_quotas_count_only_the_users_own_instances(olive, cpu_template, operator, settings):
    settings.SELF_SERVICE_MAX_INSTANCES = 1
    services.instance_create(instance_id="operators", image="example/comfyui:1", gpu_indexes=[0], user=operator)
    instance, _ = selfservice.instance_create_own(user=olive, template=cpu_template, instance_id="olives")
    assert instance.owner == olive
    with pytest.raises(ValidationError) as refused:
        selfservice.instance_create_own(user=olive, template=cpu_template, instance_id="another")
    assert "You own 1 instance and SELF_SERVICE_MAX_INSTANCES allows 1." in refused.value.message_dict["instance_id"][0]


def test_a_quota_of_zero_refuses_every_self_service_instance(client, olive, cpu_template, settings):
    settings.SELF_SERVICE_MAX_INSTANCES = 0
    client.force_login(olive)
    assert "You own 0 instances and SELF_SERVICE_MAX_INSTANCES allows 0." in \
        create(client, "cpu-sketch", "none").content.decode()


def test_operators_are_not_limited_by_quotas(operator, gpu_template, operators_template, settings):
    settings.SELF_SERVICE_MAX_INSTANCES = 0
    settings.SELF_SERVICE_MAX_GPUS = 0
    instance, _ = selfservice.instance_create_own(user=operator, template=operators_template, instance_id="big")
    assert instance.owner == operator and len(instance.assigned_gpus()) == 2


def test_a_user_without_the_permission_is_refused_by_the_service(stranger, cpu_template):
    with pytest.raises(PermissionDenied):
        selfservice.instance_create_own(user=stranger, template=cpu_template, instance_id="nope")
    assert not Instance.objects.exists()


def test_no_free_gpu_says_so_and_makes_nothing(client, olive, gpu_template, settings):
    GPU.objects.update(present=False)
    client.force_login(olive)
    response = create(client, "one-gpu", "starved")
    assert response.status_code == 400 and "only 0 are free" in response.content.decode()
    assert not Instance.objects.exists()


# --- Templates marked self-service ----------------------------------------------------------------------------------

def test_an_operator_marks_a_template_self_service_on_its_form_and_sees_it_on_its_pages(client, operator):
    client.force_login(operator)
    assert 'name="self_service"' in client.get(reverse("template-create")).content.decode()
    response = client.post(reverse("template-create"), {"name": "offered", "gpu_count": "0", "self_service": "on"})
    assert response.status_code == 302
    assert InstanceTemplate.objects.get(name="offered").self_service
    client.post(reverse("template-create"), {"name": "kept", "gpu_count": "0"})
    assert not InstanceTemplate.objects.get(name="kept").self_service
    detail = client.get(reverse("template-detail", args=["offered"])).content.decode()
    assert "yes: users with 'create own instances' may make instances from it" in detail
    listing = client.get(reverse("template-list")).content.decode()
    assert "<td>yes</td>" in listing.split('data-template="offered"')[1].split("</tr>")[0]
    assert "no" in listing.split('data-template="kept"')[1].split("</tr>")[0]


def test_updating_a_template_keeps_or_changes_self_service(cpu_template):
    services.template_update(template=cpu_template, image="example/comfyui:2")
    cpu_template.refresh_from_db()
    assert cpu_template.self_service and cpu_template.image == "example/comfyui:2"
    services.template_update(template=cpu_template, image="example/comfyui:2", self_service=False)
    cpu_template.refresh_from_db()
    assert not cpu_template.self_service


def test_the_admin_marks_a_template_self_service(client, admin_user):
    client.force_login(admin_user)
    data = {"name": "admin-made", "description": "", "image": "", "extra_args": "[]", "extra_env": "{}",
            "gpu_count": "0", "custom_nodes": "[]", "settings": "{}", "self_service": "on"}
    response = client.post(reverse("admin:instances_instancetemplate_add"), data, follow=True)
    assert "was added successfully" in response.content.decode()
    assert InstanceTemplate.objects.get(name="admin-made").self_service
    listing = client.get(reverse("admin:instances_instancetemplate_changelist")).content.decode()
    assert "Self service" in listing or "self service" in listing.lower()


def test_a_self_service_templates_page_leads_to_the_form_with_it_chosen(client, olive, cpu_template,
                                                                        operators_template):
    client.force_login(olive)
    detail = client.get(reverse("template-detail", args=["cpu-sketch"])).content.decode()
    assert f'href="{NEW}?template=cpu-sketch"' in detail and "New instance from this template" not in detail
    assert NEW not in client.get(reverse("template-detail", args=["big-iron"])).content.decode().split(
        "</nav>")[1]
    form = client.get(f"{NEW}?template=cpu-sketch").content.decode()
    assert '<option value="cpu-sketch" selected>' in form


def test_the_dashboard_offers_start_only_on_the_rows_of_instances_a_self_service_user_owns(client, olive, stranger):
    own = services.instance_create(instance_id="olives", image="example/comfyui:1", owner=olive)
    services.instance_create(instance_id="someone-elses", image="example/comfyui:1", owner=stranger)
    client.force_login(olive)
    content = client.get(reverse("dashboard")).content.decode()
    own_row = content.split('data-instance="olives"')[1].split("</tr>")[0]
    other_row = content.split('data-instance="someone-elses"')[1].split("</tr>")[0]
    assert reverse("instance-start", args=[own.instance_id]) in own_row
    assert ">Start<" in own_row and ">Start<" not in other_row


def test_the_built_in_self_service_group_carries_the_permission(client):
    from django.contrib.auth.models import Group

    sam = User.objects.create_user("sam-self", password="sam-password-1")
    sam.groups.add(Group.objects.get(name="self-service"))
    assert User.objects.get(pk=sam.pk).has_perm("instances.create_own_instance")
