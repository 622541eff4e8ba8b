"""Reads of another node's instance from the shell (`manage.py instances logs`, `nodes list`, `models inbox`) and the
dashboard's missing-images notice go through its node's agent: a real `manage.py agent` for node B on the second
Docker engine, as in tests/test_remote_reads.py. The commands run as real `manage.py` processes with the hub's
settings, which point at the hub's own engine and roots (where a decoy of the instance's folder lies), so what they
print can only have come from B's agent. With B's agent gone each says so at once and exits 1, without a traceback."""
import time

import pytest

from comfyhub import queues
from instances import images, services
from instances.models import Instance, Node
from storage_app import layout
from tests import testenv
from tests.conftest import wait_for
from tests.support.cli import run_process
from tests.test_remote_reads import (
    heartbeats_every_two_seconds, start_agent_b, start_beta_on_b, write)  # noqa: F401 (a fixture)

pytestmark = pytest.mark.django_db(transaction=True)

# The hub's commands call B offline after the same 6 s of silence as this test's own settings.
HUB_ENV = {"NODE_HEARTBEAT_SECONDS": "2"}
OFFLINE = "Node gpu-b is offline since"


def command(*args):
    """A `manage.py` process as a person runs it on the hub."""
    return run_process(*args, env=HUB_ENV, timeout=120)


@pytest.mark.docker
def test_the_shell_reads_node_bs_instance_through_bs_agent_and_says_when_b_is_offline(
        comfyui_double_image, second_docker_engine, docker_engine, tmp_path, admin_user, storage):
    b_roots = tmp_path / "node-b"
    (b_roots / "shared").mkdir(parents=True)
    node_b = Node.objects.create(name="gpu-b", bind_address=second_docker_engine.publish_address,
                                 port_range_start=testenv.PORT_RANGE[0], port_range_end=testenv.PORT_RANGE[1])
    # An instance on the hub's own node, whose inbox the hub reads itself.
    services.instance_create(instance_id="alpha")
    layout.build_instance_tree("alpha")
    write(storage["instances"] / "alpha", "models/loras/downloaded-on-hub.safetensors", "weights")
    agent = start_agent_b(tmp_path, second_docker_engine, b_roots)
    try:
        beta, container = start_beta_on_b(node_b, comfyui_double_image, second_docker_engine, docker_engine, admin_user)

        on_b = b_roots / "instances" / "beta"
        write(on_b, "custom_nodes/hand-made-on-b/__init__.py", "NODE_CLASS_MAPPINGS = {}\n")
        write(on_b, "models/loras/downloaded-on-b.safetensors", "weights")
        decoy = layout.instance_dir("beta", node_b)  # where the hub would look if it read the folder itself
        assert decoy != on_b
        write(decoy, "custom_nodes/decoy-node/__init__.py", "")
        write(decoy, "models/loras/decoy-on-hub.safetensors", "weights")

        # Logs: B's container's lines, which the hub's own engine does not have.
        lines = [line for line in container.logs(tail=50).decode().splitlines() if line.strip()]
        assert lines
        logs = command("instances", "logs", "beta", "--tail", "50")
        assert logs.code == 0, logs.err
        assert lines[-1] in logs.out

        # Custom nodes and the inbox: from B's folder, never the decoy.
        listed = command("nodes", "list", "beta")
        assert listed.code == 0, listed.err
        assert "hand-made-on-b" in listed.out and "decoy-node" not in listed.out
        inbox = command("models", "inbox", "beta")
        assert inbox.code == 0, inbox.err
        assert "loras/downloaded-on-b.safetensors" in inbox.out and "decoy-on-hub" not in inbox.out
        every = command("models", "inbox", "--json")
        assert every.code == 0, every.err
        assert "downloaded-on-hub.safetensors" in every.out and "downloaded-on-b.safetensors" in every.out

        # The missing-images notice asks B's engine: an image only B has is not missing; one nobody has is.
        second_docker_engine.client.images.get(comfyui_double_image).tag("comfyhub-test-only-on-b", "1")
        assert not docker_engine.images.list(name="comfyhub-test-only-on-b")
        gamma = services.instance_create(instance_id="gamma", image=comfyui_double_image, node=node_b,
                                         gpu_indexes=[])
        Instance.objects.filter(pk=beta.pk).update(image="comfyhub-test-only-on-b:1")
        Instance.objects.filter(pk=gamma.pk).update(image="comfyhub-test-nowhere:1")
        try:
            # What B's agent finds at its next heartbeat (the dashboard never waits for an agent).
            wait_for(lambda: [(m.image, m.instances) for m in images.missing_images() if m.node.name == "gpu-b"]
                     == [("comfyhub-test-nowhere:1", ["gamma"])], timeout=30, interval=0.2,
                     message="B's heartbeat to report the image it lacks")
            assert queues.get_queue("node.gpu-b").count == 0  # asked of no agent
        finally:
            second_docker_engine.client.images.remove("comfyhub-test-only-on-b:1")

        # B's agent dies: once B shows offline each command says so at once and exits 1, without a traceback.
        agent.kill_hard()
        wait_for(lambda: Node.objects.get(name="gpu-b").state().kind == "offline", timeout=20, interval=0.2,
                 message="B to show offline")
        for args in (("instances", "logs", "beta"), ("nodes", "list", "beta"), ("models", "inbox", "beta")):
            result = command(*args)
            assert result.code == 1, (args, result.out, result.err)
            # Refused before anything is queued (not after the read's timeout), in one message.
            assert OFFLINE in result.err and "nothing was queued" in result.err, (args, result.err)
            assert "Traceback" not in result.err, (args, result.err)
        # All instances' inboxes: what the hub could read is shown, then why B's are not.
        every = command("models", "inbox")
        assert every.code == 1 and "Traceback" not in every.err
        assert "downloaded-on-hub.safetensors" in every.out and "downloaded-on-b" not in every.out
        assert f"The inboxes of node gpu-b's instances are not shown: {OFFLINE}" in every.err
        started = time.monotonic()
        assert [m for m in images.missing_images() if m.node.name == "gpu-b"] == []  # B is left out, at once
        assert time.monotonic() - started < 3
        assert queues.get_queue("node.gpu-b").count == 0
    finally:
        agent.stop()
