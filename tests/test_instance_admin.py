"""The admin for nodes, GPUs and instances: its actions enqueue the same operations as the UI and the CLI."""
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


def test_admin_delete_goes_through_an_operation_and_keeps_the_row_until_it_runs(client, admin_user, run_worker):
    instance = services.instance_create(instance_id="doomed")
    client.force_login(admin_user)
    changelist = reverse("admin:instances_instance_changelist")
    client.post(changelist, {"action": "delete_keeping_data", "_selected_action": [instance.pk]})
    assert Operation.objects.filter(kind="instance_delete").exists()
    assert Instance.objects.filter(pk=instance.pk).exists()
    response = client.post(changelist, {"action": "delete_selected", "_selected_action": [instance.pk]}, follow=True)
    assert "No action selected" in response.content.decode()
    assert Instance.objects.filter(pk=instance.pk).exists()  # the plain admin delete is not offered


def test_admin_edits_obey_the_same_rules_as_the_form(client, admin_user):
    instance = services.instance_create(instance_id="edited")
    client.force_login(admin_user)
    url = reverse("admin:instances_instance_change", args=[instance.pk])
    response = client.post(url, {"display_name": "Edited", "description": "", "image": "img:1",
                                 "extra_args": '["--port=1"]', "extra_env": "{}", "assignments-TOTAL_FORMS": "0",
                                 "assignments-INITIAL_FORMS": "0"}, follow=True)
    assert "set by ComfyHub to keep instances isolated" in response.content.decode()
    instance.refresh_from_db()
    assert instance.extra_args == [] and instance.display_name == ""
    client.post(url, {"display_name": "Edited", "description": "", "image": "img:1", "extra_args": "[]",
                      "extra_env": "{}", "assignments-TOTAL_FORMS": "0", "assignments-INITIAL_FORMS": "0"})
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
    assert not InstanceTemplate.objects.exists()
