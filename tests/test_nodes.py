"""Nodes as GPU hosts (instances/nodes.py): registration by an agent, heartbeats, online and offline from their
times, approval, and the rows the Nodes page and `hosts list` show."""
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from instances import nodes, services
from instances.models import GPU, GPUAssignment, Instance, Node

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def heartbeat_every_second(settings):
    settings.NODE_HEARTBEAT_SECONDS = 1


def test_an_agent_registers_its_node_unapproved_at_its_address():
    node, created = nodes.node_register(name="gpu-2", address="10.0.0.12")
    assert created
    assert node.approved is False
    assert node.registered_at is not None
    assert Node.objects.get(name="gpu-2").bind_address == "10.0.0.12"


def test_registering_again_keeps_the_node_and_its_approval_and_takes_the_new_address():
    node, _ = nodes.node_register(name="gpu-2", address="10.0.0.12")
    nodes.node_approve(node=node)
    again, created = nodes.node_register(name="gpu-2", address="10.0.0.13")
    assert not created and again.pk == node.pk
    assert Node.objects.get(name="gpu-2").approved is True
    assert Node.objects.get(name="gpu-2").bind_address == "10.0.0.13"


@pytest.mark.parametrize("name", ["local", "", "Gpu-2", "gpu_2", "-gpu", "x" * 64, "gpu\n"])
def test_an_agent_may_not_register_local_or_a_name_that_is_not_a_lowercase_slug(name):
    with pytest.raises(ValidationError) as refused:
        nodes.node_register(name=name, address="127.0.0.1")
    assert refused.value.message_dict["node"]
    assert not Node.objects.filter(name=name).exclude(name="local").exists()


def test_the_local_node_and_nodes_an_operator_makes_are_approved():
    assert services.local_node().approved is True
    assert Node.objects.create(name="made-by-hand").approved is True


def test_a_first_heartbeat_brings_the_node_online_since_then():
    node, _ = nodes.node_register(name="gpu-2", address="127.0.0.1")
    assert nodes.node_state(node).kind == "never"
    assert nodes.node_state(node).label == "waiting for approval (no heartbeat yet)"
    before = timezone.now()
    approved = nodes.node_heartbeat(node=node, heartbeat={"load": [0.5, 0.4, 0.3]}, address="127.0.0.1")
    node.refresh_from_db()
    assert approved is False
    assert node.online_since >= before and node.last_heartbeat_at >= node.online_since
    assert node.heartbeat == {"load": [0.5, 0.4, 0.3]}
    state = nodes.node_state(node)
    assert state.kind == "online" and state.since == node.online_since
    assert state.label.startswith("waiting for approval (online since ")


def test_heartbeats_in_a_row_keep_online_since_and_one_after_an_absence_moves_it():
    node, _ = nodes.node_register(name="gpu-2", address="127.0.0.1")
    nodes.node_heartbeat(node=node, heartbeat={}, address="127.0.0.1")
    first = Node.objects.get(pk=node.pk).online_since
    nodes.node_heartbeat(node=node, heartbeat={}, address="127.0.0.1")
    assert Node.objects.get(pk=node.pk).online_since == first
    Node.objects.filter(pk=node.pk).update(last_heartbeat_at=timezone.now() - timedelta(seconds=10))
    nodes.node_heartbeat(node=node, heartbeat={}, address="127.0.0.1")
    assert Node.objects.get(pk=node.pk).online_since > first


def test_a_node_is_offline_after_three_missed_heartbeats_since_one_interval_after_the_last():
    node, _ = nodes.node_register(name="gpu-2", address="127.0.0.1")
    nodes.node_approve(node=node)
    nodes.node_heartbeat(node=node, heartbeat={}, address="127.0.0.1")
    node.refresh_from_db()
    last = node.last_heartbeat_at
    assert nodes.node_state(node, now=last + timedelta(seconds=3)).kind == "online"
    state = nodes.node_state(node, now=last + timedelta(seconds=3.5))
    assert state.kind == "offline"
    assert state.since == last + timedelta(seconds=1)
    assert state.label.startswith("offline since ")


def test_the_local_node_is_served_by_the_hub():
    state = nodes.node_state(services.local_node())
    assert state.kind == "hub" and state.online and state.label == "served by the hub"


def test_approving_twice_says_it_already_was_and_revoking_takes_it_back():
    node, _ = nodes.node_register(name="gpu-2", address="127.0.0.1")
    assert nodes.node_approve(node=node) is True
    assert nodes.node_approve(node=node) is False
    assert nodes.node_heartbeat(node=node, heartbeat={}, address="127.0.0.1") is True
    assert nodes.node_revoke_approval(node=node) is True
    assert nodes.node_revoke_approval(node=node) is False
    assert nodes.node_heartbeat(node=node, heartbeat={}, address="127.0.0.1") is False


def test_the_local_nodes_approval_cannot_be_revoked():
    with pytest.raises(ValidationError, match="served by the hub's own workers"):
        nodes.node_revoke_approval(node=services.local_node())
    assert services.local_node().approved is True


def test_a_heartbeat_for_a_node_deleted_meanwhile_says_so():
    node, _ = nodes.node_register(name="gpu-2", address="127.0.0.1")
    Node.objects.filter(pk=node.pk).delete()
    with pytest.raises(nodes.NodeGone, match="Node gpu-2 is not in the registry any more"):
        nodes.node_heartbeat(node=node, heartbeat={}, address="127.0.0.1")


def make_node(name, *, gpus=2, running=1, stopped=0, port=9000):
    node = Node.objects.create(name=name)
    rows = [GPU.objects.create(node=node, index=index) for index in range(gpus)]
    for number in range(running + stopped):
        instance = Instance.objects.create(
            instance_id=f"{name}-{number}", node=node, image="img", host_port=port + number,
            desired_state=Instance.DesiredState.RUNNING if number < running else Instance.DesiredState.STOPPED)
        if number < len(rows):
            GPUAssignment.objects.create(instance=instance, gpu=rows[number])
    return node


def test_a_row_counts_gpus_held_by_running_instances_free_ones_and_all_present_ones():
    node = make_node("gpu-2", gpus=4, running=1, stopped=1)
    GPU.objects.create(node=node, index=7, present=False)
    GPU.objects.filter(node=node, index=3).update(shareable=True)
    row = next(row for row in nodes.node_rows() if row.node.name == "gpu-2")
    assert (row.gpus_held, row.gpus_free, row.gpus_total, row.instance_count) == (1, 2, 4, 2)


def test_the_rows_cost_the_same_queries_for_one_node_as_for_ten_with_fifty_instances_each():
    make_node("one", gpus=2, running=2)
    with CaptureQueriesContext(connection) as one:
        rows = nodes.node_rows()
        assert [row.gpus_held for row in rows if row.node.name == "one"] == [2]
    for number in range(10):
        make_node(f"n{number}", gpus=4, running=30, stopped=20, port=10000 + 100 * number)
    with CaptureQueriesContext(connection) as many:
        rows = nodes.node_rows()
        assert sum(row.instance_count for row in rows) == 2 + 10 * 50
    assert len(many) == len(one)
