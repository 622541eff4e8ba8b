"""The Nodes page (GPU hosts, not custom nodes): every node's state from its heartbeats, GPUs, instances, disk and
versions in a fixed number of queries; one node's page; approving and revoking (with a confirmation)."""
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from instances import nodes, services
from instances.models import GPU, GPUAssignment, Instance, Node

pytestmark = pytest.mark.django_db

HEARTBEAT = {
    "gpus": [{"index": 0, "uuid": "GPU-aaaa", "name": "NVIDIA H200", "memory_total": 150_000_000_000}],
    "gpu_source": "nvml", "docker_version": "27.5.1", "docker_error": "", "comfyhub_version": "v1.4-3-gabc1234",
    "storage": [{"root": "shared", "path": "/srv/shared", "free_bytes": 5 * 2**40, "total_bytes": 8 * 2**40},
                {"root": "instances", "path": "/srv/instances", "free_bytes": 300 * 2**30,
                 "total_bytes": 2**40},
                {"root": "backups", "path": "/srv/backups", "free_bytes": None, "total_bytes": None,
                 "error": "No such file or directory"}],
    "load": [0.52, 0.48, 0.31], "cpu_count": 32, "hostname": "gpu-2.lab", "agent_pid": 4242,
    "queues": ["node.gpu-2", "node.gpu-2.long"],
}


@pytest.fixture(autouse=True)
def heartbeat_every_second(settings):
    settings.NODE_HEARTBEAT_SECONDS = 1


@pytest.fixture
def gpu_2():
    """An approved node that reported a moment ago, with one GPU held by a running instance and one free."""
    node, _ = nodes.node_register(name="gpu-2", address="10.0.0.12")
    nodes.node_approve(node=node)
    nodes.node_heartbeat(node=node, heartbeat=HEARTBEAT, address="10.0.0.12")
    held, _free = GPU.objects.create(node=node, index=0, name="NVIDIA H200"), GPU.objects.create(node=node, index=1)
    instance = Instance.objects.create(instance_id="render", node=node, image="img", host_port=8188,
                                       desired_state=Instance.DesiredState.RUNNING)
    GPUAssignment.objects.create(instance=instance, gpu=held)
    return Node.objects.get(pk=node.pk)


@pytest.fixture
def waiting():
    node, _ = nodes.node_register(name="gpu-new", address="10.0.0.20")
    nodes.node_heartbeat(node=node, heartbeat={"load": [0.1, 0.1, 0.1]}, address="10.0.0.20")
    return node


@pytest.fixture
def silent():
    """An approved node whose agent stopped reporting a minute ago."""
    node, _ = nodes.node_register(name="gpu-old", address="10.0.0.30")
    nodes.node_approve(node=node)
    nodes.node_heartbeat(node=node, heartbeat={}, address="10.0.0.30")
    Node.objects.filter(pk=node.pk).update(last_heartbeat_at=timezone.now() - timedelta(minutes=1))
    return node


@pytest.fixture
def approver():
    """A user who may change nodes, and nothing else."""
    user = User.objects.create_user("nina", password="nina-password-1")
    user.user_permissions.add(Permission.objects.get(codename="change_node"))
    return user


def row_of(content, name):
    return content.split(f'data-node="{name}"')[1].split("</tr>")[0]


def messages_of(response):
    return [str(m) for m in response.context["messages"]]


@pytest.mark.parametrize("name, args, method", [
    ("node-list", [], "get"), ("node-detail", ["gpu-new"], "get"), ("node-approve", ["gpu-new"], "post"),
    ("node-revoke-approval", ["gpu-new"], "post"),
])
def test_someone_not_logged_in_is_sent_to_the_login_page(client, waiting, name, args, method):
    response = getattr(client, method)(reverse(name, args=args))
    assert response.status_code == 302 and response["Location"].startswith("/login/")
    assert Node.objects.get(name="gpu-new").approved is False


def test_the_page_shows_every_node_with_its_state_address_gpus_instances_disk_versions_and_load(
        client, stranger, gpu_2, waiting, silent):
    services.local_node()
    client.force_login(stranger)
    response = client.get(reverse("node-list"))
    content = response.content.decode()
    assert "<h1>Nodes (GPU hosts)</h1>" in content

    row = row_of(content, "gpu-2")
    assert "online</span>" in row and "since " in row
    assert "10.0.0.12" in row
    assert '<td class="gpus">1 / 1 / 2</td>' in row
    assert "<td>1</td>" in row  # its instance
    assert "shared: 5.0\xa0TB" in row and "instances: 300.0\xa0GB" in row
    assert "No such file or directory" in row
    assert "27.5.1" in row and "v1.4-3-gabc1234" in row and "0.52 0.48 0.31" in row

    assert "waiting for approval" in row_of(content, "gpu-new")
    assert "offline</span>" in row_of(content, "gpu-old")
    assert "served by the hub" in row_of(content, "local")


def test_a_stranger_sees_no_approve_button_and_may_not_approve_or_revoke(client, stranger, waiting, gpu_2):
    client.force_login(stranger)
    assert ">Approve<" not in row_of(client.get(reverse("node-list")).content.decode(), "gpu-new")
    assert client.post(reverse("node-approve", args=["gpu-new"])).status_code == 403
    assert client.post(reverse("node-revoke-approval", args=["gpu-2"]), {"confirm": "yes"}).status_code == 403
    assert Node.objects.get(name="gpu-new").approved is False and Node.objects.get(name="gpu-2").approved is True


def test_approving_a_waiting_node_takes_one_press(client, approver, waiting):
    client.force_login(approver)
    assert ">Approve<" in row_of(client.get(reverse("node-list")).content.decode(), "gpu-new")

    response = client.post(reverse("node-approve", args=["gpu-new"]), follow=True)

    assert response.redirect_chain[-1][0] == reverse("node-detail", args=["gpu-new"])
    assert messages_of(response) == ["Node gpu-new is approved: its agent takes jobs from its next heartbeat on "
                                     "(within 1 s)."]
    assert Node.objects.get(name="gpu-new").approved is True


def test_an_operator_may_approve_a_node(client, operator, waiting):
    client.force_login(operator)
    client.post(reverse("node-approve", args=["gpu-new"]))
    assert Node.objects.get(name="gpu-new").approved is True


def test_revoking_approval_asks_first_then_revokes(client, approver, gpu_2):
    client.force_login(approver)
    asked = client.post(reverse("node-revoke-approval", args=["gpu-2"]))
    assert asked.status_code == 200
    assert "Revoke the approval of node gpu-2?" in asked.content.decode()
    assert Node.objects.get(name="gpu-2").approved is True

    response = client.post(reverse("node-revoke-approval", args=["gpu-2"]), {"confirm": "yes"}, follow=True)

    assert messages_of(response) == ["Approval of node gpu-2 revoked: its agent finishes the job it runs and takes "
                                     "no more."]
    assert Node.objects.get(name="gpu-2").approved is False
    assert "waiting for approval" in response.content.decode()


def test_the_local_nodes_approval_cannot_be_revoked_and_the_page_says_why(client, approver):
    services.local_node()
    client.force_login(approver)
    response = client.post(reverse("node-revoke-approval", args=["local"]), {"confirm": "yes"}, follow=True)
    assert messages_of(response) == ["'local' is served by the hub's own workers; its approval cannot be revoked."]
    assert Node.objects.get(name="local").approved is True
    assert "Revoke approval" not in response.content.decode()


@pytest.mark.parametrize("name", ["node-approve", "node-revoke-approval"])
def test_the_actions_only_answer_post(client, approver, waiting, name):
    client.force_login(approver)
    assert client.get(reverse(name, args=["gpu-new"])).status_code == 405


def test_an_unknown_node_is_404(client, approver):
    client.force_login(approver)
    assert client.get(reverse("node-detail", args=["nope"])).status_code == 404
    assert client.post(reverse("node-approve", args=["nope"])).status_code == 404


def test_a_nodes_page_shows_its_heartbeat_and_its_instances(client, stranger, gpu_2):
    client.force_login(stranger)
    content = client.get(reverse("node-detail", args=["gpu-2"])).content.decode()
    assert "<h1>Node gpu-2</h1>" in content
    assert "gpu-2.lab" in content and "agent pid 4242, 32 CPUs" in content
    assert "1 held by running instances, 1 free, 2 in all" in content and "(source: nvml)" in content
    assert "<code>/srv/shared</code>" in content and "<code>node.gpu-2.long</code>" in content
    assert reverse("instance-detail", args=["render"]) in content and "NVIDIA H200" in content


def test_the_page_polls_for_its_table_alone(client, stranger, gpu_2):
    client.force_login(stranger)
    response = client.get(reverse("node-list"), HTTP_HX_REQUEST="true")
    content = response.content.decode()
    assert content.lstrip().startswith('<tbody id="node-rows"') and 'hx-trigger="every 1s"' in content
    assert 'data-node="gpu-2"' in content and "<h1>" not in content


def test_the_nav_links_to_the_nodes_page_marked_current_there(client, stranger):
    client.force_login(stranger)
    content = client.get(reverse("node-list")).content.decode()
    assert f'<a href="{reverse("node-list")}" aria-current="page">Nodes</a>' in content
    other = client.get(reverse("gpu-list")).content.decode()
    assert f'<a href="{reverse("node-list")}" >Nodes</a>' in other


def test_the_page_costs_the_same_queries_for_ten_nodes_with_fifty_instances_as_for_one(client, stranger, gpu_2):
    client.force_login(stranger)
    client.get(reverse("node-list"))  # the session and permissions, cached from here on
    with CaptureQueriesContext(connection) as one:
        client.get(reverse("node-list"))
    for number in range(10):
        node = Node.objects.create(name=f"n{number}")
        gpus = [GPU.objects.create(node=node, index=index) for index in range(4)]
        for count in range(50):
            instance = Instance.objects.create(instance_id=f"n{number}-{count}", node=node, image="img",
                                               host_port=9000 + count, desired_state=Instance.DesiredState.RUNNING)
            if count < 4:
                GPUAssignment.objects.create(instance=instance, gpu=gpus[count])
    with CaptureQueriesContext(connection) as many:
        response = client.get(reverse("node-list"))
    assert 'data-node="n9"' in response.content.decode()
    assert len(many) == len(one)


def test_the_admin_approves_with_an_action_and_shows_the_heartbeat_read_only(client, admin_user, waiting, gpu_2):
    client.force_login(admin_user)
    changelist = reverse("admin:instances_node_changelist")
    assert "waiting for approval" in client.get(changelist).content.decode()

    response = client.post(changelist, {"action": "approve", "_selected_action": [waiting.pk]}, follow=True)

    assert "gpu-new: approved." in [str(m) for m in response.context["messages"]]
    assert Node.objects.get(name="gpu-new").approved is True
    change = client.get(reverse("admin:instances_node_change", args=[gpu_2.pk])).content.decode()
    assert 'name="heartbeat"' not in change and 'name="approved"' not in change
    assert "gpu-2.lab" in change  # shown, not editable
