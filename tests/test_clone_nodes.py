"""Cloning a snapshot onto another node (storage_app.services.snapshot_clone with node=...): the clone job runs on
that node's agent (a real one for node B on the second Docker engine with its own roots), which reads the archive
through the shared COMFY_BACKUPS_PATH; refusals come at once and a failed clone leaves nothing on B."""
import io
import json

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from comfyhub.models import Operation
from instances import services as instance_services
from instances.models import GPU, Instance, Node
from storage_app import layout, services, snapshots
from tests.test_moves import fill, finished, node_b, start_agent
from tests.test_node_routing import beating, silent_since

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def agents_online_through_a_busy_machine(settings):
    # The agents beat every second (AGENT_ENV); the hub calls a node offline after three of its own intervals: 9 s
    # here, so a move or clone that runs for a while on a loaded machine never sees its agent as gone.
    settings.NODE_HEARTBEAT_SECONDS = 3


@pytest.fixture
def snapshot(storage):
    alpha = instance_services.instance_create(instance_id="alpha", image="img:1", gpu_indexes=[], extra_args=["--cpu"])
    layout.build_instance_tree("alpha")
    fill(alpha)
    return snapshots.create(alpha, kind="full", include_output=True)


@pytest.mark.docker
def test_a_clone_onto_node_b_is_made_by_bs_agent_and_one_b_cannot_read_leaves_nothing_there(
        snapshot, second_docker_engine, tmp_path, admin_user):
    b_roots = tmp_path / "node-b"
    target = node_b(second_docker_engine, b_roots)

    # B's agent has its own backups folder: the archive cannot be read there, so nothing is created.
    agent = start_agent(tmp_path, second_docker_engine, COMFY_BACKUPS_PATH=str(tmp_path / "b-backups"))
    try:
        target.refresh_from_db()
        clone = services.snapshot_clone(snapshot=snapshot, new_instance_id="beta", gpu_indexes=[1], node=target,
                                        user=admin_user)
        assert clone.queue_name == "node.gpu-b.long"
        clone = finished(clone)
        assert clone.status == Operation.Status.FAILED
        assert "This node does not see the backups folder node local wrote to" in clone.error
        assert f"(COMFY_BACKUPS_PATH is {tmp_path / 'b-backups'} on this node)" in clone.error
        assert "A clone onto another node reads the snapshot" in clone.error and "clone again" in clone.error
        assert not Instance.objects.filter(instance_id="beta").exists()
        assert not (b_roots / "instances" / "beta").exists()
    finally:
        agent.stop()

    # With the backups folder shared, B's agent makes beta on B: its files in B's instances root, its GPU B's.
    agent = start_agent(tmp_path, second_docker_engine, number=1)
    try:
        out = io.StringIO()
        call_command("snapshots", "restore", str(snapshot.pk), "--as", "beta", "--node", "gpu-b", "--gpus", "1",
                     stdout=out)
        assert "Created instance 'beta' on node gpu-b on port" in out.getvalue()
        clone = Operation.objects.get(kind="snapshot_clone", status=Operation.Status.SUCCEEDED)
        assert clone.queue_name == "node.gpu-b.long"
        beta = Instance.objects.select_related("node").get(instance_id="beta")
        assert beta.node == target and beta.extra_args == ["--cpu"] and beta.image == "img:1"
        assert [(g.node.name, g.index) for g in beta.assigned_gpus()] == [("gpu-b", 1)]
        assert target.port_range_start <= beta.host_port <= target.port_range_end
        made = b_roots / "instances" / "beta"
        assert json.loads((made / "user" / "default" / "workflows" / "mine.json").read_text()) == {"nodes": []}
        assert (made / "custom_nodes" / "my-node" / "__init__.py").read_text() == "NODE_CLASS_MAPPINGS = {}\n"
        assert (made / "output" / "render_00001.png").read_bytes() == b"\x89PNG result"
        assert not layout.instance_dir("beta").exists()
    finally:
        agent.stop()


def test_a_clone_onto_another_node_is_refused_at_once_when_that_node_cannot_take_it(snapshot):
    silent = silent_since(beating("gpu-2", port_range_start=9000, port_range_end=9100), 30)
    with pytest.raises(ValidationError, match="Cannot clone onto node gpu-2: Node gpu-2 is offline since"):
        services.snapshot_clone(snapshot=snapshot, new_instance_id="beta", node=silent)

    waiting = beating("gpu-3", approved=False)
    with pytest.raises(ValidationError, match="Node gpu-3 is waiting for approval"):
        services.snapshot_clone(snapshot=snapshot, new_instance_id="beta", node=waiting)

    busy = beating("gpu-4", port_range_start=9000, port_range_end=9100)
    held = GPU.objects.create(node=busy, index=0)
    other = instance_services.instance_create(instance_id="holder", image="img:1", node=busy, gpu_indexes=[0])
    assert [g.pk for g in other.assigned_gpus()] == [held.pk]
    with pytest.raises(ValidationError, match="GPU 0"):
        services.snapshot_clone(snapshot=snapshot, new_instance_id="beta", gpu_indexes=[0], node=busy)
    with pytest.raises(ValidationError, match="GPU 1"):
        services.snapshot_clone(snapshot=snapshot, new_instance_id="beta", gpu_indexes=[1], node=busy)
    assert not Operation.objects.exists()

    with pytest.raises(CommandError, match="node: There is no node 'nowhere'") as refused:
        call_command("snapshots", "restore", str(snapshot.pk), "--as", "beta", "--node", "nowhere")
    assert refused.value.returncode == 2
    with pytest.raises(CommandError, match="--node applies to a clone only") as refused:
        call_command("snapshots", "restore", str(snapshot.pk), "--node", "gpu-4")
    assert refused.value.returncode == 2
    assert not Operation.objects.exists() and not Instance.objects.filter(instance_id="beta").exists()


def test_the_clone_page_offers_a_node_only_with_several_and_queues_the_clone_on_the_chosen_nodes_agent(
        snapshot, client, admin_user):
    url = reverse("snapshot-clone", args=[snapshot.pk])
    client.force_login(admin_user)
    assert 'name="node"' not in client.get(url).content.decode()  # one node: the page is as before

    gpu2 = beating("gpu-2", port_range_start=9000, port_range_end=9100)
    GPU.objects.create(node=gpu2, index=5)
    page = client.get(url).content.decode()
    assert '<select name="node"' in page and '<option value="gpu-2">' in page
    assert 'value="5"' not in page  # the local node's GPUs are shown first
    page = client.get(url, {"node": "gpu-2", "new_instance_id": "beta"}).content.decode()
    assert 'value="5"' in page and 'value="beta"' in page

    silent_since(Node.objects.get(name="gpu-2"), 30)
    refused = client.post(url, {"new_instance_id": "beta", "node": "gpu-2"})
    assert refused.status_code == 400 and "Cannot clone onto node gpu-2" in refused.content.decode()
    refused = client.post(url, {"new_instance_id": "beta", "node": "nowhere"})
    assert refused.status_code == 400 and "There is no node &#x27;nowhere&#x27;" in refused.content.decode()
    assert not Operation.objects.exists()

    beating_again = Node.objects.get(name="gpu-2")
    from instances import nodes

    nodes.node_heartbeat(node=beating_again, heartbeat={}, address="127.0.0.1")
    response = client.post(url, {"new_instance_id": "beta", "node": "gpu-2", "gpus": ["5"]})
    clone = Operation.objects.get(kind="snapshot_clone")
    assert response.status_code == 302 and response.url == clone.get_absolute_url()
    assert clone.queue_name == "node.gpu-2.long" and clone.requested_by == admin_user
