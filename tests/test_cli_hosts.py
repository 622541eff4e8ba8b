"""`manage.py hosts`: the nodes (GPU hosts) with their state, one node's heartbeat, approving and revoking, through
the same services as the Nodes page; JSON as docs/cli.md describes it."""
import json
from datetime import timedelta

import pytest
from django.utils import timezone

from instances import nodes, services
from instances.models import Node
from tests.support.cli import run, run_process

pytestmark = pytest.mark.django_db

HEARTBEAT = {
    "gpus": [], "gpu_source": "none", "docker_version": "27.5.1", "docker_error": "", "comfyhub_version": "v1.4",
    "storage": [{"root": "shared", "path": "/srv/shared", "free_bytes": 5 * 2**30, "total_bytes": 8 * 2**30}],
    "load": [1.5, 1.0, 0.5], "cpu_count": 8, "hostname": "gpu-2.lab", "agent_pid": 77,
    "queues": ["node.gpu-2", "node.gpu-2.long"],
}


@pytest.fixture(autouse=True)
def heartbeat_every_second(settings):
    settings.NODE_HEARTBEAT_SECONDS = 1


@pytest.fixture
def waiting():
    node, _ = nodes.node_register(name="gpu-2", address="10.0.0.12")
    nodes.node_heartbeat(node=node, heartbeat=HEARTBEAT, address="10.0.0.12")
    return node


def test_list_shows_every_node_with_its_state_and_who_waits_for_approval(waiting):
    services.local_node()
    silent, _ = nodes.node_register(name="gpu-old", address="10.0.0.30")
    nodes.node_approve(node=silent)
    nodes.node_heartbeat(node=silent, heartbeat={}, address="10.0.0.30")
    Node.objects.filter(pk=silent.pk).update(last_heartbeat_at=timezone.now() - timedelta(minutes=1))

    result = run("hosts", "list")

    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].split()[:3] == ["NODE", "STATE", "ADDRESS"]
    gpu_2 = next(line for line in lines if line.startswith("gpu-2 "))
    assert "waiting for approval (online since " in gpu_2 and "10.0.0.12" in gpu_2
    assert "27.5.1" in gpu_2 and "v1.4" in gpu_2 and "1.5 1.0 0.5" in gpu_2 and "shared 5.0 GB" in gpu_2
    assert "offline since " in next(line for line in lines if line.startswith("gpu-old "))
    assert "served by the hub" in next(line for line in lines if line.startswith("local "))
    assert lines[-1] == "Waiting for approval: gpu-2. Approve with `manage.py hosts approve NAME`."


def test_list_json_holds_each_nodes_state_gpus_and_heartbeat(waiting):
    result = run("hosts", "list", "--json")
    assert result.code == 0, result.err
    by_name = {entry["name"]: entry for entry in json.loads(result.out)}
    assert by_name["local"]["state"] == "hub" and by_name["local"]["approved"] is True
    entry = by_name["gpu-2"]
    assert entry["name"] == "gpu-2" and entry["state"] == "online" and entry["approved"] is False
    assert entry["address"] == "10.0.0.12" and entry["since"] and entry["last_heartbeat_at"]
    assert entry["gpus"] == {"total": 0, "held": 0, "free": 0} and entry["instances"] == 0
    assert entry["heartbeat"] == HEARTBEAT


def test_show_prints_one_nodes_heartbeat(waiting):
    result = run("hosts", "show", "gpu-2")
    assert result.code == 0, result.err
    assert "Approved:        no (`manage.py hosts approve gpu-2`)" in result.out
    assert "gpu-2.lab (agent pid 77, 8 CPUs)" in result.out
    assert "Disk shared:     5.0 GB free of 8.0 GB (/srv/shared)" in result.out
    assert "Queues:          node.gpu-2, node.gpu-2.long" in result.out
    assert json.loads(run("hosts", "show", "gpu-2", "--json").out)["heartbeat"]["hostname"] == "gpu-2.lab"


def test_approve_then_revoke_with_yes(waiting):
    assert run("hosts", "approve", "gpu-2").out.strip() == ("Approved node gpu-2: its agent takes jobs from its "
                                                            "next heartbeat on.")
    assert Node.objects.get(name="gpu-2").approved is True
    assert run("hosts", "approve", "gpu-2").out.strip() == "Node gpu-2 was already approved."

    refused = run("hosts", "revoke-approval", "gpu-2")
    assert refused.code == 2 and "add --yes to confirm" in refused.err
    assert Node.objects.get(name="gpu-2").approved is True

    done = run("hosts", "revoke-approval", "gpu-2", "--yes")
    assert done.code == 0 and done.out.strip() == "Revoked approval of node gpu-2: its agent takes no more jobs."
    assert Node.objects.get(name="gpu-2").approved is False


def test_an_unknown_node_is_exit_2_naming_the_known_ones(waiting):
    result = run("hosts", "approve", "nope")
    assert result.code == 2 and result.err.strip() == "No node 'nope'. Known: gpu-2, local"


def test_revoking_local_is_exit_2_saying_why():
    services.local_node()
    result = run("hosts", "revoke-approval", "local", "--yes")
    assert result.code == 2
    assert result.err.strip() == "node: 'local' is served by the hub's own workers; its approval cannot be revoked."


def test_on_the_command_line_approve_works_on_the_shared_database(transactional_db):
    nodes.node_register(name="gpu-9", address="127.0.0.1")
    result = run_process("hosts", "approve", "gpu-9")
    assert result.code == 0, result.err
    assert Node.objects.get(name="gpu-9").approved is True
