"""Moving an instance between nodes (instances/moves.py): a real agent for node B on the second Docker engine with its
own roots, the hub's worker for `local` on the first, the snapshot through the shared COMFY_BACKUPS_PATH."""
import io
import json
import re

import docker
import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError

from comfyhub.models import Operation
from instances import moves, services
from instances.models import GPU, Instance, Node
from storage_app import layout
from storage_app.models import Snapshot
from tests import testenv
from tests.conftest import wait_for
from tests.test_agent import AgentProcess, listening_on
from tests.test_node_routing import beating, containers_named, silent_since

pytestmark = pytest.mark.django_db(transaction=True)

IMAGE = "comfyhub-test-move:1"


@pytest.fixture(autouse=True)
def agents_online_through_a_busy_machine(settings):
    # The agents beat every second (AGENT_ENV); the hub calls a node offline after three of its own intervals: 9 s
    # here, so a move or clone that runs for a while on a loaded machine never sees its agent as gone.
    settings.NODE_HEARTBEAT_SECONDS = 3


def node_b(second_docker_engine, roots) -> Node:
    (roots / "shared").mkdir(parents=True, exist_ok=True)
    return Node.objects.create(
        name="gpu-b", docker_host=second_docker_engine.docker_host, shared_path=str(roots / "shared"),
        instances_path=str(roots / "instances"), bind_address=second_docker_engine.publish_address,
        port_range_start=testenv.PORT_RANGE[0], port_range_end=testenv.PORT_RANGE[1])


def start_agent(tmp_path, second_docker_engine, number=0, **env):
    process = AgentProcess("gpu-b", log_path=tmp_path / f"agent-{number}.log",
                           env={"NODE_ADDRESS": second_docker_engine.publish_address, "COMFY_GPUS": "0,1", **env})
    wait_for(lambda: listening_on("node.gpu-b") and GPU.objects.filter(node__name="gpu-b").count() == 2,
             timeout=60, message="B's agent to take jobs")
    return process


def build_failing_image_on(client: docker.DockerClient, base: str, tag: str):
    """On one engine only: the tag names an image whose ComfyUI exits at once."""
    dockerfile = io.BytesIO(f'FROM {base}\nENTRYPOINT ["sh", "-c", "echo no CUDA here >&2; exit 3"]\n'.encode())
    client.images.build(fileobj=dockerfile, tag=tag, rm=True, pull=False)


def finished(operation) -> Operation:
    return wait_for(lambda: Operation.objects.filter(pk=operation.pk).exclude(
        status__in=Operation.ACTIVE_STATUSES).first(), timeout=180, message="the move to end")


def fill(instance):
    root = layout.instance_dir(instance.instance_id, instance.node)
    (root / "user" / "default" / "workflows").mkdir(parents=True, exist_ok=True)
    (root / "user" / "default" / "workflows" / "mine.json").write_text('{"nodes": []}')
    (root / "custom_nodes" / "my-node").mkdir(parents=True, exist_ok=True)
    (root / "custom_nodes" / "my-node" / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    (root / "output").mkdir(exist_ok=True)
    (root / "output" / "render_00001.png").write_bytes(b"\x89PNG result")
    (root / "input").mkdir(exist_ok=True)
    (root / "input" / "uploaded.png").write_bytes(b"\x89PNG upload")


@pytest.mark.docker
def test_an_instance_moves_from_local_to_node_b_with_its_data_and_a_failed_start_on_b_leaves_it_on_local(
        comfyui_double_image, second_docker_engine, docker_engine, run_worker, tmp_path, admin_user):
    docker_engine.images.get(comfyui_double_image).tag(IMAGE)
    build_failing_image_on(second_docker_engine.client, comfyui_double_image, IMAGE)
    b_roots = tmp_path / "node-b"
    target = node_b(second_docker_engine, b_roots)
    agent = start_agent(tmp_path, second_docker_engine)
    try:
        alpha = services.instance_create(instance_id="alpha", image=IMAGE, gpu_indexes=[2], user=admin_user)
        started = services.instance_start(instance=alpha, user=admin_user)
        run_worker()
        started.refresh_from_db()
        assert started.status == Operation.Status.SUCCEEDED, started.error + started.log
        fill(alpha)
        alpha.refresh_from_db()
        before = (alpha.node.name, alpha.host_port, [g.index for g in alpha.assigned_gpus()])

        # B's image exits at once: the move fails at B's start, B's copy is removed, alpha runs on local as before.
        target.refresh_from_db()
        move = moves.instance_move(instance=alpha, target=target, user=admin_user)
        assert move.queue_name == "long"
        run_worker()
        move = finished(move)
        assert move.status == Operation.Status.FAILED
        # Docker may have restarted it before the agent looked: then the exit code is gone, and the message says so.
        assert re.match(r"The move failed at step 'start on the target': ComfyUI did not start on node gpu-b "
                        r"\((exited with code 3|crashed \(Docker restarted it (once|\d+ times)\))\)\. Last log lines:",
                        move.error), move.error
        assert "no CUDA here" in move.error
        assert "the copy on gpu-b was removed; alpha runs on local again." in move.error
        alpha = Instance.objects.select_related("node").get(pk=alpha.pk)
        assert (alpha.node.name, alpha.host_port, [g.index for g in alpha.assigned_gpus()]) == before
        assert alpha.status == Instance.Status.HEALTHY
        assert docker_engine.containers.get(alpha.container_name).status == "running"
        assert containers_named(second_docker_engine.client, alpha.container_name) == []
        assert not (b_roots / "instances" / "alpha").exists()
        assert (layout.instance_dir("alpha") / "output" / "render_00001.png").is_file()
        steps = Operation.objects.filter(kind__startswith="instance_move_", queue_name__startswith="node.gpu-b")
        assert set(steps.values_list("kind", flat=True)) == {
            "instance_move_marker_read", "instance_move_restore", "instance_move_start", "instance_move_remove"}

        # With B's image fixed, the move goes through: alpha runs on B's engine with its files, gone from local.
        second_docker_engine.client.images.remove(IMAGE, force=True)
        second_docker_engine.client.images.get(comfyui_double_image).tag(IMAGE)
        out = io.StringIO()
        call_command("instances", "move", "alpha", "--to", "gpu-b", "--no-wait", stdout=out)
        run_worker()
        move = finished(Operation.objects.get(pk=out.getvalue().strip()))
        assert move.status == Operation.Status.SUCCEEDED, move.error + move.log
        alpha = Instance.objects.select_related("node").get(pk=alpha.pk)
        assert alpha.node == target and alpha.desired_state == Instance.DesiredState.RUNNING
        assert move.result["to"] == "gpu-b" and alpha.host_port == move.result["port"]
        assert [g.index for g in alpha.assigned_gpus()] == move.result["gpus"] == [0]
        assert all(g.node_id == target.pk for g in alpha.assigned_gpus())
        moved = b_roots / "instances" / "alpha"
        assert json.loads((moved / "user" / "default" / "workflows" / "mine.json").read_text()) == {"nodes": []}
        assert (moved / "custom_nodes" / "my-node" / "__init__.py").read_text() == "NODE_CLASS_MAPPINGS = {}\n"
        assert (moved / "output" / "render_00001.png").read_bytes() == b"\x89PNG result"
        assert (moved / "input" / "uploaded.png").read_bytes() == b"\x89PNG upload"  # its own uploads travel too
        [container] = containers_named(second_docker_engine.client, alpha.container_name)
        assert container.status == "running"
        assert container.attrs["NetworkSettings"]["Ports"]["8188/tcp"] == [
            {"HostIp": "127.0.0.2", "HostPort": str(alpha.host_port)}]
        assert containers_named(docker_engine, alpha.container_name) == []
        assert not layout.instance_dir("alpha").exists()
        snapshot = Snapshot.objects.get(pk=move.result["snapshot"])
        assert snapshot.automatic == "move" and snapshot.include_output
        assert (snapshot_root() / snapshot.archive).is_file()  # the snapshot is kept
    finally:
        agent.stop()


def snapshot_root():
    from storage_app import snapshots

    return snapshots.backups_root()


@pytest.mark.docker
def test_a_move_to_a_node_that_does_not_share_the_backups_folder_is_refused_and_changes_nothing(
        comfyui_double_image, second_docker_engine, docker_engine, run_worker, tmp_path, admin_user):
    target = node_b(second_docker_engine, tmp_path / "node-b")
    agent = start_agent(tmp_path, second_docker_engine, COMFY_BACKUPS_PATH=str(tmp_path / "b-backups"))
    try:
        alpha = services.instance_create(instance_id="alpha", image=comfyui_double_image, gpu_indexes=[],
                                         user=admin_user)
        services.instance_build(instance=alpha)
        run_worker()
        target.refresh_from_db()
        move = moves.instance_move(instance=alpha, target=target, user=admin_user)
        run_worker()
        move = finished(move)
        assert move.status == Operation.Status.FAILED
        assert "at step 'check shared backups (read)': This node does not see the backups folder node local " \
               "wrote to" in move.error
        assert f"(COMFY_BACKUPS_PATH is {tmp_path / 'b-backups'} on this node)" in move.error
        assert "mounted at the same path on every node" in move.error and "Nothing was changed." in move.error
        alpha = Instance.objects.select_related("node").get(pk=alpha.pk)
        assert alpha.node.name == "local" and alpha.desired_state == Instance.DesiredState.STOPPED
        assert not Snapshot.objects.exists()
        assert layout.instance_dir("alpha").is_dir()
        assert not (tmp_path / "node-b" / "instances" / "alpha").exists()
    finally:
        agent.stop()


def test_a_move_is_refused_at_once_to_the_same_node_an_offline_or_unapproved_one_or_one_without_free_gpus():
    alpha = services.instance_create(instance_id="alpha", image="img:1", gpu_indexes=[0])
    local = alpha.node
    with pytest.raises(ValidationError, match="alpha is already on node local; pick another node"):
        moves.instance_move(instance=alpha, target=local)

    silent = silent_since(beating("gpu-2", port_range_start=9000, port_range_end=9100), 30)
    GPU.objects.create(node=silent, index=0)
    with pytest.raises(ValidationError, match=r"Cannot move alpha \(target node\): Node gpu-2 is offline since"):
        moves.instance_move(instance=alpha, target=silent)

    waiting = beating("gpu-3", approved=False)
    with pytest.raises(ValidationError, match="Node gpu-3 is waiting for approval"):
        moves.instance_move(instance=alpha, target=waiting)

    busy = beating("gpu-4", port_range_start=9000, port_range_end=9100)  # online, but no GPU
    with pytest.raises(ValidationError, match="1 GPU\\(s\\) are wanted but only 0 are free on node gpu-4"):
        moves.instance_move(instance=alpha, target=busy)
    assert not Operation.objects.exists()

    with pytest.raises(CommandError, match="node: There is no node 'nowhere'") as refused:
        call_command("instances", "move", "alpha", "--to", "nowhere")
    assert refused.value.returncode == 2


def test_the_move_page_names_what_happens_and_queues_the_move_for_those_who_may_change_instances(client, admin_user,
                                                                                                 django_user_model):
    from django.urls import reverse

    alpha = services.instance_create(instance_id="alpha", image="img:1", gpu_indexes=[])
    beating("gpu-2", port_range_start=9000, port_range_end=9100)
    url = reverse("instance-move", args=["alpha"])
    stranger = django_user_model.objects.create_user("stranger", password="x")
    client.force_login(stranger)
    assert client.get(url).status_code == 403
    assert client.post(url, {"node": "gpu-2"}).status_code == 403

    client.force_login(admin_user)
    assert "Move to node…" in client.get(reverse("instance-detail", args=["alpha"])).content.decode()
    page = client.get(url).content.decode()
    assert "takes a full snapshot" in page and "COMFY_BACKUPS_PATH" in page
    assert '<option value="gpu-2">' in page and '<option value="local"' not in page

    refused = client.post(url, {"node": "local"}, follow=True)
    assert "Not moved: alpha is already on node local" in refused.content.decode()
    assert not Operation.objects.exists()

    response = client.post(url, {"node": "gpu-2"})
    move = Operation.objects.get(kind="instance_move")
    assert response.status_code == 302 and response.url == move.get_absolute_url()
    assert move.queue_name == "long" and move.target_label == "alpha"
    assert move.requested_by == admin_user
    with pytest.raises(ValidationError, match="alpha is being moved already"):
        moves.instance_move(instance=alpha, target=Node.objects.get(name="gpu-2"))
