"""Placement (instances/placement.py): a new instance that asks for a number of GPUs goes to the approved online node
with the most free GPUs, then the fewest instances; a node named on the form or the command line is taken as
named. The local node has GPUs 0-3 (COMFY_GPUS in tests/testenv.py); other nodes get GPU rows made here and are
made online by the heartbeat service their agent calls."""
from datetime import timedelta
from io import StringIO

import pytest
from django.contrib.auth.models import Permission, User
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from comfyhub.models import Operation
from instances import nodes, placement, services
from instances.models import GPU, Instance, Node

pytestmark = pytest.mark.django_db


def gpu_node(name, gpus, *, online=True, approved=True, address="10.0.0.2"):
    """A node with `gpus` GPUs whose agent reported (online) or reported long ago (offline)."""
    node, _ = nodes.node_register(name=name, address=address)
    if approved:
        nodes.node_approve(node=node)
    nodes.node_heartbeat(node=node, heartbeat={}, address=address)
    if not online:
        Node.objects.filter(pk=node.pk).update(last_heartbeat_at=timezone.now() - timedelta(hours=1))
    for index in range(gpus):
        GPU.objects.create(node=node, index=index, name="NVIDIA H200")
    node.refresh_from_db()
    return node


def hold_local_gpus(*indexes):
    """An instance on local holding `indexes` exclusively."""
    return services.instance_create(instance_id=f"hog-{'-'.join(map(str, indexes))}", gpu_indexes=list(indexes))


def cpu_instance(instance_id, node):
    return services.instance_create(instance_id=instance_id, node=node)


@pytest.fixture
def template(db):
    return services.template_create(name="two-gpus", image="example/comfyui:1", gpu_count=2, self_service=True)


@pytest.fixture
def cpu_template(db):
    return services.template_create(name="cpu-sketch", image="example/comfyui:1", gpu_count=0)


# --- Choosing a node -------------------------------------------------------------------------------------------------

def test_the_node_with_the_most_free_gpus_gets_the_instance():
    hold_local_gpus(0, 1, 2)
    gpu_node("gpu-2", 2)
    gpu_node("gpu-3", 3)
    placed = placement.place(gpu_count=2)
    assert (placed.node.name, placed.gpu_indexes) == ("gpu-3", [0, 1])


def test_with_as_many_free_gpus_the_node_with_fewer_instances_wins():
    hold_local_gpus(0, 1, 2, 3)
    busy, quiet = gpu_node("gpu-2", 2), gpu_node("gpu-3", 2)
    cpu_instance("sketch", busy)
    assert placement.place(gpu_count=1).node == quiet
    cpu_instance("sketch-2", quiet)
    cpu_instance("sketch-3", quiet)
    assert placement.place(gpu_count=1).node == busy


def test_local_wins_a_full_tie():
    gpu_node("gpu-2", 4)
    assert placement.place(gpu_count=2).node.name == "local"


def test_shareable_gpus_count_as_free_and_exclusively_held_ones_do_not():
    hold_local_gpus(0, 1, 2, 3)
    node = gpu_node("gpu-2", 2)
    shared = GPU.objects.get(node=node, index=0)
    services.gpu_set_shareable(gpu=shared, shareable=True)
    services.instance_create(instance_id="sharer", node=node, gpu_indexes=[0])
    services.instance_create(instance_id="owner-of-1", node=node, gpu_indexes=[1])
    placed = placement.place(gpu_count=1)
    assert (placed.node, placed.gpu_indexes) == (node, [0])


def test_offline_and_unapproved_nodes_are_passed_over_however_many_gpus_they_have():
    hold_local_gpus(0, 1)
    gpu_node("gpu-2", 8, online=False)
    gpu_node("gpu-3", 8, approved=False)
    gpu_node("gpu-4", 8, online=False)
    Node.objects.filter(name="gpu-4").update(last_heartbeat_at=None, online_since=None)  # never reported
    assert placement.place(gpu_count=2).node.name == "local"


def test_a_cpu_instance_goes_to_the_node_with_the_fewest_instances_local_first_on_a_tie():
    other = gpu_node("gpu-2", 0)
    assert placement.place(gpu_count=0).node.name == "local"
    cpu_instance("on-local", services.local_node())
    placed = placement.place(gpu_count=0)
    assert (placed.node, placed.gpu_indexes) == (other, [])


def test_when_no_node_has_the_gpus_the_refusal_names_each_node_and_what_to_do():
    hold_local_gpus(0, 1, 2)
    gpu_node("gpu-2", 4, online=False)
    full = gpu_node("gpu-3", 2)
    services.instance_create(instance_id="big", node=full, gpu_indexes=[0, 1])
    gpu_node("gpu-4", 2, approved=False)
    with pytest.raises(ValidationError) as refused:
        placement.place(gpu_count=2)
    assert refused.value.message_dict == {"node": [
        "No node has 2 free GPUs: local 1 free of 4, gpu-2 offline, gpu-3 0 free of 2, gpu-4 waiting for approval. "
        "Free GPUs or add a node."]}


def test_on_one_host_the_refusal_is_the_one_it_always_was(template):
    hold_local_gpus(0, 1, 2)
    with pytest.raises(ValidationError) as refused:
        services.instance_create_from_template(template=template, instance_id="late")
    assert refused.value.message_dict == {"gpus": [
        "The template asks for 2 GPU(s) but only 1 are free on node local; free some or create without the "
        "template."]}


def test_a_named_node_is_taken_as_named_and_must_have_the_gpus():
    busy = gpu_node("gpu-2", 2)
    gpu_node("gpu-3", 4)
    assert placement.place(gpu_count=2, node=busy).node == busy
    with pytest.raises(ValidationError, match="asks for 3 GPU|3 GPU.s. are wanted but only 2 are free on node gpu-2"):
        placement.place(gpu_count=3, node=busy)


def test_an_unapproved_node_takes_no_instance_even_when_named():
    waiting = gpu_node("gpu-2", 2, approved=False)
    with pytest.raises(ValidationError, match="Node gpu-2 is waiting for approval; approve it"):
        services.instance_create(instance_id="early", node=waiting)
    with pytest.raises(ValidationError, match="waiting for approval"):
        placement.place(gpu_count=1, node=waiting)
    assert not Instance.objects.exists()


def test_gpu_indexes_and_a_gpu_count_together_are_refused():
    with pytest.raises(ValidationError, match="not both"):
        services.instance_create(instance_id="both", gpu_indexes=[0], gpu_count=1)


def test_choosing_takes_a_fixed_number_of_queries_whatever_the_number_of_nodes():
    for number in range(3):
        gpu_node(f"gpu-{number}", 2)
    with CaptureQueriesContext(connection) as few:
        placement.place(gpu_count=1)
    for number in range(3, 12):
        node = gpu_node(f"gpu-{number}", 2)
        cpu_instance(f"on-{number}", node)
    with CaptureQueriesContext(connection) as many:
        placement.place(gpu_count=1)
    assert len(many) == len(few)


# --- Templates and self-service are placed the same way ----------------------------------------------------------

def test_an_instance_from_a_template_goes_where_its_gpus_are_free(template):
    hold_local_gpus(0, 1, 2)
    gpu_node("gpu-2", 2)
    instance, operation = services.instance_create_from_template(template=template, instance_id="placed")
    assert instance.node.name == "gpu-2"
    assert [gpu.index for gpu in instance.assigned_gpus()] == [0, 1]
    assert {gpu.node.name for gpu in instance.assigned_gpus()} == {"gpu-2"}
    assert Operation.objects.get(pk=operation.pk).queue_name == "node.gpu-2"  # its agent applies the template


def test_a_cpu_template_goes_to_the_least_busy_node(cpu_template):
    other = gpu_node("gpu-2", 0)
    cpu_instance("first", services.local_node())
    instance, _ = services.instance_create_from_template(template=cpu_template, instance_id="sketch")
    assert instance.node == other and instance.cpu_only


def test_a_template_that_fits_nowhere_makes_nothing_and_says_why(template):
    hold_local_gpus(0, 1, 2)
    gpu_node("gpu-2", 1)
    with pytest.raises(ValidationError, match="No node has 2 free GPUs: local 1 free of 4, gpu-2 1 free of 1"):
        services.instance_create_from_template(template=template, instance_id="late")
    assert not Instance.objects.filter(instance_id="late").exists() and not Operation.objects.exists()


def test_a_self_service_instance_is_placed_like_any_other(client, template, settings):
    settings.SELF_SERVICE_MAX_GPUS = 2
    olive = User.objects.create_user("olive", password="olive-password-1")
    olive.user_permissions.add(Permission.objects.get(codename="create_own_instance"))
    hold_local_gpus(0, 1, 2)
    gpu_node("gpu-2", 3)
    client.force_login(olive)
    response = client.post(reverse("instance-create-own"), {"template": "two-gpus", "instance_id": "olives"})
    assert response.status_code == 302
    instance = Instance.objects.get(instance_id="olives")
    assert (instance.owner, instance.node.name, [g.index for g in instance.assigned_gpus()]) == (olive, "gpu-2",
                                                                                                 [0, 1])


def test_a_self_service_user_told_no_node_fits_sees_it_on_the_form(client, template, settings):
    settings.SELF_SERVICE_MAX_GPUS = 2
    olive = User.objects.create_user("olive", password="olive-password-1")
    olive.user_permissions.add(Permission.objects.get(codename="create_own_instance"))
    hold_local_gpus(0, 1, 2, 3)
    gpu_node("gpu-2", 2, online=False)
    client.force_login(olive)
    response = client.post(reverse("instance-create-own"), {"template": "two-gpus", "instance_id": "olives"})
    assert response.status_code == 400
    assert "No node has 2 free GPUs: local 0 free of 4, gpu-2 offline. Free GPUs or add a node." in \
        response.content.decode()
    assert not Instance.objects.filter(instance_id="olives").exists()


# --- Naming a node: the instance form and `instances create --node` --------------------------------------------------

def test_on_one_host_the_form_has_no_node_field(client, operator):
    client.force_login(operator)
    page = client.get(reverse("instance-create")).content.decode()
    assert 'name="node"' not in page and "<legend>GPUs</legend>" in page


def test_the_form_offers_approved_nodes_and_lists_the_chosen_nodes_gpus(client, operator):
    gpu_node("gpu-2", 2)
    gpu_node("gpu-3", 2, approved=False)
    client.force_login(operator)
    page = client.get(reverse("instance-create")).content.decode()
    assert '<option value="local" selected>local (served by the hub; 4 of 4 GPUs free)</option>' in page
    assert '<option value="gpu-2">gpu-2 (online; 2 of 2 GPUs free)</option>' in page
    assert "gpu-3" not in page
    assert "GPUs on node local" in page
    assert 'hx-get="/instances/new/" hx-trigger="change" hx-select="#field-gpus"' in page  # choosing one refetches
    other = client.get(reverse("instance-create"), {"node": "gpu-2"}).content.decode()
    assert "GPUs on node gpu-2" in other and 'value="3"' not in other  # gpu-2 has GPUs 0 and 1 only


def test_an_operator_creates_an_instance_on_the_node_they_choose(client, operator):
    node = gpu_node("gpu-2", 2)
    client.force_login(operator)
    response = client.post(reverse("instance-create"), {"instance_id": "remote", "node": "gpu-2", "gpus": ["1"]})
    assert response.status_code == 302
    instance = Instance.objects.get(instance_id="remote")
    assert instance.node == node and [(g.node.name, g.index) for g in instance.assigned_gpus()] == [("gpu-2", 1)]
    assert "created on node gpu-2 on port" in client.get(response["Location"]).content.decode()


def test_the_form_refuses_a_node_that_is_not_approved_or_does_not_exist(client, operator):
    gpu_node("gpu-2", 2, approved=False)
    client.force_login(operator)
    for name, message in (("gpu-2", "Node gpu-2 is waiting for approval"),
                          ("gpu-9", "There is no node &#x27;gpu-9&#x27;. Known: local.")):
        response = client.post(reverse("instance-create"), {"instance_id": "remote", "node": name})
        assert response.status_code == 200 and message in response.content.decode()
    assert not Instance.objects.exists()


def test_a_gpu_of_another_node_is_refused_naming_the_nodes_gpus(client, operator):
    gpu_node("gpu-2", 2)
    client.force_login(operator)
    response = client.post(reverse("instance-create"), {"instance_id": "remote", "node": "gpu-2", "gpus": ["3"]})
    assert "GPU 3 does not exist on node gpu-2 (GPUs: 0, 1)." in response.content.decode()
    assert not Instance.objects.exists()


def test_the_command_line_creates_on_the_node_named():
    gpu_node("gpu-2", 2)
    out = StringIO()
    call_command("instances", "create", "remote", "--node", "gpu-2", "--gpus", "0,1", stdout=out)
    assert "Created instance 'remote' on node gpu-2." in out.getvalue()
    instance = Instance.objects.get(instance_id="remote")
    assert [(g.node.name, g.index) for g in instance.assigned_gpus()] == [("gpu-2", 0), ("gpu-2", 1)]


def test_the_command_line_refuses_an_unknown_or_unapproved_node_with_exit_code_2():
    gpu_node("gpu-3", 2, approved=False)
    for name, message in (("gpu-9", "node: There is no node 'gpu-9'. Known: local."),
                          ("gpu-3", "node: Node gpu-3 is waiting for approval; approve it")):
        with pytest.raises(CommandError) as refused:
            call_command("instances", "create", "remote", "--node", name, stdout=StringIO())
        assert refused.value.returncode == 2 and message in str(refused.value)
    assert not Instance.objects.exists()


def test_an_offline_node_may_be_named_and_its_build_waits_for_its_agent(client, operator):
    gpu_node("gpu-2", 2, online=False)
    client.force_login(operator)
    response = client.post(reverse("instance-create"), {"instance_id": "remote", "node": "gpu-2"}, follow=True)
    page = response.content.decode()
    assert Instance.objects.get(instance_id="remote").node.name == "gpu-2"
    assert "Node gpu-2 is offline since" in page and "Its directories will be built when it first starts." in page
    assert not Operation.objects.exists()
