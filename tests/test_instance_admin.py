"""The admin for nodes, GPUs and instances: its actions enqueue the same operations as the UI and the CLI."""
import html

import pytest
from django.urls import reverse

from comfyhub.models import Operation
from instances import services
from instances.models import GPU, Instance

pytestmark = pytest.mark.django_db(transaction=True)


def test_admin_actions_enqueue_operations(client, admin_user):
    instance = services.instance_create(instance_id="adminned")
    client.force_login(admin_user)
    changelist = reverse("admin:instances_instance_changelist")
    for action, kind in (("build", "instance_build"), ("start", "instance_start"), ("stop", "instance_stop"),
                         ("restart", "instance_restart")):
        response = client.post(changelist, {"action": action, "_selected_action": [instance.pk]}, follow=True)
        assert response.status_code == 200
        assert Operation.objects.filter(kind=kind, target_id=str(instance.pk), requested_by=admin_user).exists()


def test_admin_delete_leads_to_the_delete_page_that_asks_for_the_id(client, admin_user, run_worker):
    instance = services.instance_create(instance_id="doomed")
    client.force_login(admin_user)
    changelist = reverse("admin:instances_instance_changelist")
    response = client.post(changelist, {"action": "delete_keeping_data", "_selected_action": [instance.pk]})
    assert response.status_code == 302 and response["Location"] == reverse("instance-delete", args=["doomed"])
    assert not Operation.objects.filter(kind="instance_delete").exists()
    client.post(response["Location"], {"confirm": "doomed"})
    assert Operation.objects.filter(kind="instance_delete").exists()
    assert Instance.objects.filter(pk=instance.pk).exists()
    response = client.post(changelist, {"action": "delete_selected", "_selected_action": [instance.pk]}, follow=True)
    assert "No action selected" in response.content.decode()
    assert Instance.objects.filter(pk=instance.pk).exists()  # the plain admin delete is not offered


# The instance form's access fields and inlines (shares, last opens) since issue #13: no owner, no idle stop, none added.
ACCESS_FIELDS = {"idle_stop_after": "0", "shares-TOTAL_FORMS": "0", "shares-INITIAL_FORMS": "0",
                 "opens-TOTAL_FORMS": "0", "opens-INITIAL_FORMS": "0"}


def test_admin_edits_obey_the_same_rules_as_the_form(client, admin_user):
    instance = services.instance_create(instance_id="edited")
    client.force_login(admin_user)
    url = reverse("admin:instances_instance_change", args=[instance.pk])
    response = client.post(url, {"display_name": "Edited", "description": "", "image": "img:1",
                                 "extra_args": '["--port=1"]', "extra_env": "{}", "assignments-TOTAL_FORMS": "0",
                                 "assignments-INITIAL_FORMS": "0", **ACCESS_FIELDS}, follow=True)
    assert "set by ComfyHub to keep instances isolated" in response.content.decode()
    instance.refresh_from_db()
    assert instance.extra_args == [] and instance.display_name == ""
    client.post(url, {"display_name": "Edited", "description": "", "image": "img:1", "extra_args": "[]",
                      "extra_env": "{}", "assignments-TOTAL_FORMS": "0", "assignments-INITIAL_FORMS": "0",
                      **ACCESS_FIELDS})
    instance.refresh_from_db()
    assert (instance.display_name, instance.image) == ("Edited", "img:1")


def test_operators_may_run_actions_but_not_the_admin_itself(client, operator):
    instance = services.instance_create(instance_id="guarded")
    client.force_login(operator)
    response = client.post(reverse("admin:instances_instance_changelist"),
                           {"action": "start", "_selected_action": [instance.pk]})
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert not Operation.objects.exists()


def test_gpus_show_their_holders_and_can_be_marked_shareable(client, admin_user):
    services.instance_create(instance_id="holder", gpu_indexes=[3])
    client.force_login(admin_user)
    response = client.get(reverse("admin:instances_gpu_changelist"))
    assert "holder" in response.content.decode()
    gpu = GPU.objects.get(index=3)
    client.post(reverse("admin:instances_gpu_changelist"), {"action": "make_shareable", "_selected_action": [gpu.pk]})
    gpu.refresh_from_db()
    assert gpu.shareable
    assert not gpu.assignments.get().exclusive  # the holder follows


def test_a_template_that_would_break_isolation_is_not_saved_from_the_admin(client, admin_user):
    from instances.models import InstanceTemplate

    client.force_login(admin_user)
    response = client.post(reverse("admin:instances_instancetemplate_add"), {
        "name": "risky", "description": "", "image": "", "extra_args": '["--listen"]', "extra_env": "{}",
        "gpu_count": "0", "custom_nodes": "[]", "settings": "{}", "created_at_0": "2026-01-01",
        "created_at_1": "00:00:00"}, follow=True)
    assert "set by ComfyHub to keep instances isolated" in response.content.decode()
    assert not InstanceTemplate.objects.exclude(name="multi-gpu").exists()


# --- The admin saves through the services (issue #10) ----------------------------------------------------------

def admin_instance_data(**fields):
    data = {"display_name": "Edited", "description": "", "image": "example/comfyui:1", "extra_args": "[]",
            "extra_env": "{}", "assignments-TOTAL_FORMS": "0", "assignments-INITIAL_FORMS": "0", **ACCESS_FIELDS}
    data.update(fields)
    return data


@pytest.mark.parametrize("fields, message", [
    ({"image": "evil.example/x:latest"}, "INSTANCE_IMAGES_ALLOWED permits"),
    ({"image": "UPPER/case"}, "is not a Docker image reference"),
    ({"image": "a b"}, "no spaces"),
    ({"extra_args": '["--i", "/x"]'}, "ComfyUI takes it for --input-directory"),
    ({"extra_args": '["--liste"]'}, "ComfyUI takes it for --listen"),
    ({"extra_args": '"--lowvram"'}, "Extra arguments are a list of strings"),
    ({"extra_args": '[["--lowvram"]]'}, "is not an argument"),
    ({"extra_env": '{"LD_PRELOAD": "/x.so"}'}, "'LD_PRELOAD' is refused"),
    ({"extra_env": '{"comfy_instance_id": "other"}'}, "'comfy_instance_id' is reserved"),
    ({"extra_env": '{"NVIDIA_VISIBLE_DEVICES": "all"}'}, "assign GPUs instead"),
    ({"extra_env": '["TEAM=a"]'}, "The extra environment is an object"),
    ({"extra_env": '{"1ST": "x"}'}, "is not a variable name"),
])
def test_an_admin_edit_the_pages_would_refuse_is_refused_on_the_form_and_saves_nothing(client, admin_user, fields,
                                                                                       message):
    instance = services.instance_create(instance_id="admined", image="example/comfyui:1")
    before = Instance.objects.values().get(pk=instance.pk)
    client.force_login(admin_user)
    url = reverse("admin:instances_instance_change", args=[instance.pk])
    response = client.post(url, admin_instance_data(**fields), follow=True)
    page = html.unescape(response.content.decode())
    assert response.status_code == 200
    assert message in page and "Please correct the error below." in page
    assert "was changed successfully" not in page
    assert Instance.objects.values().get(pk=instance.pk) == before


def test_an_admin_edit_the_pages_would_accept_is_saved_by_the_service(client, admin_user):
    instance = services.instance_create(instance_id="admined", image="example/comfyui:1")
    client.force_login(admin_user)
    url = reverse("admin:instances_instance_change", args=[instance.pk])
    response = client.post(url, admin_instance_data(image="comfy:other", extra_args='["--preview-size", 512]',
                                                    extra_env='{"TEAM": "art"}'), follow=True)
    assert "was changed successfully" in response.content.decode()
    instance.refresh_from_db()
    assert (instance.display_name, instance.image, instance.extra_args, instance.extra_env) == (
        "Edited", "comfy:other", ["--preview-size", "512"], {"TEAM": "art"})


def admin_template_data(**fields):
    data = {"name": "fresh", "description": "", "image": "", "extra_args": "[]", "extra_env": "{}", "gpu_count": "0",
            "custom_nodes": "[]", "settings": "{}"}
    data.update(fields)
    return data


@pytest.mark.parametrize("fields, message", [
    ({"name": "Bad_Name"}, "Use lowercase letters, digits and '-' for a template name"),
    ({"name": "fresh\n"}, "Use lowercase letters, digits and '-' for a template name"),
    ({"name": "new"}, "'new' is taken"),
    ({"image": "evil.example/x:latest"}, "INSTANCE_IMAGES_ALLOWED permits"),
    ({"image": "repo:tag:tag"}, "is not a Docker image reference"),
    ({"extra_args": '["--outp", "/x"]'}, "ComfyUI takes it for --output-directory"),
    ({"extra_args": '["--port=1"]'}, "'--port' is set by ComfyHub"),
    ({"extra_env": '{"Comfy_Shared_Path": "/x"}'}, "'Comfy_Shared_Path' is reserved"),
    ({"extra_env": '{"CUDA_VISIBLE_DEVICES": "0"}'}, "assign GPUs instead"),
    ({"custom_nodes": '{"url": "https://example.org/x.git"}'}, "Custom nodes are a list"),
    ({"settings": "[1]"}, "Settings are a JSON object"),
])
def test_a_template_the_pages_would_refuse_is_refused_by_the_admin_and_not_saved(client, admin_user, fields, message):
    from instances.models import InstanceTemplate

    client.force_login(admin_user)
    response = client.post(reverse("admin:instances_instancetemplate_add"), admin_template_data(**fields), follow=True)
    page = html.unescape(response.content.decode())
    assert message in page and "Please correct the error below." in page
    assert "was added successfully" not in page
    assert not InstanceTemplate.objects.exclude(name="multi-gpu").exists()


def test_a_template_added_and_changed_in_the_admin_goes_through_the_services(client, admin_user):
    from instances.models import InstanceTemplate

    client.force_login(admin_user)
    response = client.post(reverse("admin:instances_instancetemplate_add"),
                           admin_template_data(image="comfy:sdxl", extra_env='{"TEAM": "art"}'), follow=True)
    assert "was added successfully" in response.content.decode()
    template = InstanceTemplate.objects.get(name="fresh")
    assert (template.image, template.extra_env) == ("comfy:sdxl", {"TEAM": "art"})
    change = reverse("admin:instances_instancetemplate_change", args=[template.pk])
    refused = client.post(change, admin_template_data(name="renamed", image="evil.example/x:1"), follow=True)
    assert "INSTANCE_IMAGES_ALLOWED permits" in html.unescape(refused.content.decode())
    template.refresh_from_db()
    assert template.image == "comfy:sdxl"
    saved = client.post(change, admin_template_data(name="renamed", image="comfy:other", gpu_count="1"), follow=True)
    assert "was changed successfully" in saved.content.decode()
    template.refresh_from_db()
    # The name is set once (instances and commands refer to it); the rest changed.
    assert (template.name, template.image, template.gpu_count) == ("fresh", "comfy:other", 1)


def test_a_library_entry_cannot_be_renamed_in_the_admin(client, admin_user):
    from instances.models import WorkflowEntry

    entry = WorkflowEntry.objects.create(name="hello")
    client.force_login(admin_user)
    url = reverse("admin:instances_workflowentry_change", args=[entry.pk])
    client.post(url, {"name": "../../escape", "versions-TOTAL_FORMS": "0", "versions-INITIAL_FORMS": "0"})
    entry.refresh_from_db()
    assert entry.name == "hello"  # the name becomes a file name on install; only publishing (which checks it) sets it
