"""Reads of another node's instance through its agent (instances/remote.py): a real `manage.py agent` for node B on
the second Docker engine, given B's engine and storage roots in its own environment only. The hub's settings point at
its own engine and roots (where a decoy of the instance's folder lies), so what the pages show can only have come
from B's agent. With B's agent gone the pages say so at once; an agent that does not answer in time, after the
timeout, leaving nothing queued."""
import html
import json
import os
import sys
import time

import pytest
from django.urls import reverse

from comfyhub import queues
from comfyhub.models import Operation
from instances import customnodes, remote, services, templating, workflows
from instances.models import GPU, Instance, InstanceTemplate, Node
from storage_app import checks, layout
from storage_app.checks import check_storage
from tests import testenv
from tests.conftest import wait_for
from tests.test_agent import AgentProcess, listening_on
from tests.test_node_routing import beating, containers_named

pytestmark = pytest.mark.django_db(transaction=True)

WORKFLOWS = ("user", "default", "workflows")


@pytest.fixture(autouse=True)
def heartbeats_every_two_seconds(settings):
    # The agent beats every second (AGENT_ENV); the hub calls B offline after 6 s of silence.
    settings.NODE_HEARTBEAT_SECONDS = 2


def start_agent_b(tmp_path, second_docker_engine, b_roots):
    """B's agent, the only process told where B's engine and roots are."""
    process = AgentProcess("gpu-b", log_path=tmp_path / "agent-b.log", env={
        "NODE_ADDRESS": second_docker_engine.publish_address, "COMFY_GPUS": "0,1",
        "DOCKER_HOST": second_docker_engine.docker_host,
        "COMFY_INSTANCES_PATH": str(b_roots / "instances"), "COMFY_SHARED_PATH": str(b_roots / "shared")})
    wait_for(lambda: listening_on("node.gpu-b") and GPU.objects.filter(node__name="gpu-b").count() == 2,
             timeout=60, message="B's agent to take jobs")
    return process


def start_beta_on_b(node_b, image, second_docker_engine, hub_engine, user):
    """Instance "beta" made on B and started by B's agent: its container is on B's engine, not the hub's."""
    node_b.refresh_from_db()
    beta = services.instance_create(instance_id="beta", image=image, node=node_b, gpu_indexes=[], user=user)
    started = services.instance_start(instance=beta, user=user)
    done = wait_for(lambda: Operation.objects.filter(pk=started.pk).exclude(
        status__in=Operation.ACTIVE_STATUSES).first(), timeout=120, message="B's agent to start beta")
    assert done.status == Operation.Status.SUCCEEDED, done.error + done.log
    [container] = containers_named(second_docker_engine.client, beta.container_name)
    assert containers_named(hub_engine, beta.container_name) == []
    return beta, container


def write(root, relpath, text):
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def page(client, name, instance_id) -> tuple[str, float]:
    started = time.monotonic()
    response = client.get(reverse(name, args=[instance_id]))
    assert response.status_code == 200, response.status_code
    return html.unescape(response.content.decode()), time.monotonic() - started


@pytest.mark.docker
def test_node_bs_instance_is_read_by_bs_agent_and_its_pages_say_when_b_is_offline(
        comfyui_double_image, second_docker_engine, docker_engine, tmp_path, admin_user, client, canary):
    b_roots = tmp_path / "node-b"
    (b_roots / "shared").mkdir(parents=True)
    # No docker_host, shared_path or instances_path: the hub resolves B's instance to its own engine and roots.
    node_b = Node.objects.create(name="gpu-b", bind_address=second_docker_engine.publish_address,
                                 port_range_start=testenv.PORT_RANGE[0], port_range_end=testenv.PORT_RANGE[1])
    agent = start_agent_b(tmp_path, second_docker_engine, b_roots)
    try:
        beta, container = start_beta_on_b(node_b, comfyui_double_image, second_docker_engine, docker_engine, admin_user)

        on_b = b_roots / "instances" / "beta"
        assert on_b.is_dir() and layout.instance_dir("beta", node_b) != on_b
        write(on_b, "user/default/workflows/only-on-b.json", json.dumps({"nodes": []}))
        write(on_b, "user/default/comfy.settings.json", json.dumps({"Comfy.Theme": "dark"}))
        write(on_b, "custom_nodes/hand-made-on-b/__init__.py", "NODE_CLASS_MAPPINGS = {}\n")
        write(on_b, "models/loras/downloaded-on-b.safetensors", "weights")
        os.symlink(canary, on_b / "custom_nodes" / "hand-made-on-b" / "escape")
        # A decoy where the hub would look if it read the folder itself.
        decoy = layout.instance_dir("beta", node_b)
        write(decoy, "user/default/workflows/decoy-on-hub.json", json.dumps({"nodes": []}))
        write(decoy, "user/default/comfy.settings.json", json.dumps({"Comfy.Theme": "light"}))
        write(decoy, "custom_nodes/decoy-node/__init__.py", "")
        write(decoy, "models/loras/decoy-on-hub.safetensors", "weights")
        template = InstanceTemplate.objects.create(
            name="house", image=beta.image, settings={"Comfy.Theme": "dark"},
            custom_nodes=[{"url": "https://example.org/x/needed-node.git", "ref": ""}])
        Instance.objects.filter(pk=beta.pk).update(template=template)
        client.force_login(admin_user)

        # Logs: B's container's lines, which the hub's own engine does not have.
        lines = [line for line in container.logs(tail=50).decode().splitlines() if line.strip()]
        assert lines
        text, _ = page(client, "instance-detail", "beta")
        assert 'data-testid="pending-changes"' not in text  # asked of B: its container is as it was made
        beta = Instance.objects.select_related("node", "template").get(pk=beta.pk)
        assert beta.config_hash and remote.pending_change_kinds(beta) == set()
        text, _ = page(client, "instance-logs", "beta")
        assert lines[-1] in text and 'data-testid="logs-error"' not in text
        download = client.get(reverse("instance-logs-download", args=["beta"]) + "?tail=50")
        assert download.status_code == 200 and lines[-1] in download.content.decode()

        # Workflows, custom nodes, drift: from B's folder, never the decoy.
        text, _ = page(client, "instance-workflows", "beta")
        assert "only-on-b.json" in text and "decoy-on-hub" not in text
        text, _ = page(client, "instance-nodes", "beta")
        assert "hand-made-on-b" in text and "decoy-node" not in text
        beta = Instance.objects.select_related("node", "template").get(pk=beta.pk)
        assert templating.drift(beta) == [{"what": "custom node needed-node", "template": "installed",
                                           "instance": "missing"}]
        text, _ = page(client, "instance-drift", "beta")
        assert "custom node needed-node" in text and "setting Comfy.Theme" not in text

        # Images B's engine lacks, for the dashboard's notice: asked of B (the hub's engine has no only-on-b).
        second_docker_engine.client.images.get(comfyui_double_image).tag("comfyhub-test-only-on-b", "1")
        assert not docker_engine.images.list(name="comfyhub-test-only-on-b")
        assert remote.call_on_node(Node.objects.get(name="gpu-b"), "instances.remote.absent_images_of", {
            "images": ["comfyhub-test-only-on-b:1", "comfyhub-test-nowhere:1"]}) == ["comfyhub-test-nowhere:1"]
        second_docker_engine.client.images.remove("comfyhub-test-only-on-b:1")

        # A read that fails on B: its message, no traceback.
        with pytest.raises(workflows.WorkflowError) as failed:
            workflows.read_workflow(beta, "nope.json")
        assert str(failed.value) == "'nope.json' does not exist."
        assert workflows.read_workflow(beta, "only-on-b.json") == b'{"nodes": []}'

        # The storage check: B's link out of beta's folder, found by B's agent at B's path.
        findings = {(f.code, f.subject): f for f in check_storage()}
        unsafe = findings[("unsafe-link", "beta")]
        assert unsafe.message.startswith("On node gpu-b: ")
        assert str(on_b / "custom_nodes" / "hand-made-on-b" / "escape") in unsafe.message
        assert "On node gpu-b:" in html.unescape(client.get(reverse("storage-check")).content.decode())

        # The models page's inboxes: what nodes downloaded into beta's models/ on B.
        text = client.get(reverse("model-list")).content.decode()
        assert "loras/downloaded-on-b.safetensors" in text and "decoy-on-hub" not in text
        assert [item["path"] for item in checks.instance_inbox(beta)] == ["loras/downloaded-on-b.safetensors"]

        # B's agent dies: once B shows offline every page says so at once, and no read is queued for it.
        agent.kill_hard()
        wait_for(lambda: Node.objects.get(name="gpu-b").state().kind == "offline", timeout=20, interval=0.2,
                 message="B to show offline")
        for name in ("instance-logs", "instance-workflows", "instance-nodes", "instance-drift"):
            text, took = page(client, name, "beta")
            assert "Node gpu-b is offline since" in text, name
            assert took < 3, (name, took)
        text, took = page(client, "instance-detail", "beta")  # what a restart would change: nothing known
        assert "node offline since" in text and 'data-testid="pending-changes"' not in text and took < 3
        with pytest.raises(customnodes.CustomNodeError, match="Node gpu-b is offline since"):
            customnodes.list_nodes(beta)
        assert ("node-not-checked", "gpu-b") in {(f.code, f.subject) for f in check_storage()}
        text = html.unescape(client.get(reverse("model-list")).content.decode())
        assert "The inboxes of node gpu-b's instances are not shown: Node gpu-b is offline since" in text
        assert queues.get_queue("node.gpu-b").count == 0
    finally:
        agent.stop()


def test_an_agent_that_does_not_answer_in_time_gets_the_timeout_message_and_its_read_never_runs_later(
        monkeypatch, admin_user, client):
    node = beating("gpu-c")  # its heartbeat just came, but no agent takes its jobs
    gamma = services.instance_create(instance_id="gamma", image="img:1", node=node, gpu_indexes=[])
    monkeypatch.setattr(remote, "READ_TIMEOUT", 1.5)
    client.force_login(admin_user)

    text, took = page(client, "instance-logs", "gamma")
    assert "Node gpu-c's agent did not answer within 1.5 s; it may be busy (a long job) or offline." in text
    assert 1.5 <= took < 5
    queue = queues.get_queue("node.gpu-c")
    assert queue.count == 0  # cancelled: an agent that comes later does not run it
    assert not [job_id for job_id in queue.get_job_ids()]

    with pytest.raises(workflows.WorkflowError, match="did not answer within 1.5 s"):
        workflows.list_workflows(gamma)
    assert queue.count == 0


def test_a_read_nobody_answers_leaves_no_job_behind():
    node = beating("gpu-d")
    started = time.monotonic()
    with pytest.raises(remote.NodeReadError, match="did not answer within 0.5 s"):
        remote.call_on_node(node, "instances.workflows.list_workflows_of", {"instance_id": "nobody"}, timeout=0.5)
    assert time.monotonic() - started < 2
    assert queues.get_queue("node.gpu-d").count == 0
    assert queues.get_connection().keys("rq:job:*") == []


def test_an_unapproved_or_silent_nodes_reads_are_refused_at_once_with_what_to_do():
    waiting = beating("gpu-e", approved=False)
    with pytest.raises(remote.NodeReadError, match="Node gpu-e is waiting for approval"):
        remote.call_on_node(waiting, "instances.workflows.list_workflows_of", {"instance_id": "x"})
    never = Node.objects.create(name="gpu-f")
    with pytest.raises(remote.NodeReadError, match="Node gpu-f has no agent yet"):
        remote.call_on_node(never, "instances.workflows.list_workflows_of", {"instance_id": "x"})
    assert queues.get_queue("node.gpu-e").count == 0 and queues.get_queue("node.gpu-f").count == 0


def test_local_reads_run_in_this_process_and_an_agent_serves_only_functions_marked_as_reads():
    alpha = services.instance_create(instance_id="alpha", image="img:1", gpu_indexes=[])
    write(layout.instance_dir("alpha"), "user/default/workflows/mine.json", "{}")
    assert [w["path"] for w in remote.call_on_node(alpha.node, "instances.workflows.list_workflows_of",
                                                   {"instance_id": "alpha"})] == ["mine.json"]
    assert queues.get_queue("default").count == 0

    assert remote.run_read(func="os.getcwd", kwargs={}) == {"error": "os.getcwd is not a read an agent serves."}
    # Outside ComfyHub's modules nothing is even imported (importing runs a module's code).
    assert remote.run_read(func="this.s", kwargs={}) == {"error": "this.s is not a read an agent serves."}
    assert "this" not in sys.modules
    assert remote.run_read(func="instances.services.instance_delete", kwargs={}) == {
        "error": "instances.services.instance_delete is not a read an agent serves."}
    assert remote.run_read(func="instances.workflows.read_workflow_of",
                           kwargs={"instance_id": "alpha", "relpath": "mine.json"}) == {"value": b"{}"}
    assert remote.run_read(func="instances.workflows.read_workflow_of",
                           kwargs={"instance_id": "nobody", "relpath": "mine.json"}) == {
        "error": "There is no instance 'nobody' any more."}
