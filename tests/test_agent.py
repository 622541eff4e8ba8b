"""The node agent as a real `manage.py agent` process on the test database and Redis: it registers its node,
heartbeats every second, takes no job until an operator approves the node, then takes jobs from the node's queue;
killed, its node shows offline after three missed heartbeats; SIGTERM lets the current job finish."""
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from rq import Callback, Queue, Worker

from comfyhub import operations, queues
from comfyhub.models import Operation
from instances import nodes
from instances.models import GPU, Node
from tests import jobs_for_tests
from tests.conftest import REPO, WorkerProcess, wait_for, worker_database_url

pytestmark = pytest.mark.django_db(transaction=True)

AGENT_ENV = {"NODE_HEARTBEAT_SECONDS": "1", "COMFY_GPU_DISCOVERY": "settings", "COMFY_GPUS": "0,1",
             "NODE_ADDRESS": "127.0.0.2"}


class AgentProcess(WorkerProcess):
    """A real `manage.py agent --node NAME`, in its own process group like the worker processes."""

    def __init__(self, node, *, log_path, env=None):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "manage.py"), "agent", "--node", node], cwd=REPO,
            env={**os.environ, "DATABASE_URL": worker_database_url(), **AGENT_ENV, **(env or {})},
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self):
        return self.log_path.read_text(errors="replace")


@pytest.fixture(autouse=True)
def heartbeat_every_second(settings):
    settings.NODE_HEARTBEAT_SECONDS = 1


@pytest.fixture
def agent(tmp_path):
    started = []

    def start(node="gpu-2", env=None):
        process = AgentProcess(node, log_path=tmp_path / f"agent-{len(started)}.log", env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def enqueue_on_node(node_name, job, **kwargs) -> Operation:
    """An operation pushed straight onto the node's quick queue (routing jobs to nodes comes later)."""
    operation = Operation.objects.create(kind=job.kind, queue_name=f"node.{node_name}")
    Queue(f"node.{node_name}", connection=queues.get_connection()).enqueue(
        job, kwargs=kwargs, job_id=str(operation.pk), on_failure=Callback(operations.on_rq_failure))
    return operation


def listening_on(queue_name) -> int:
    return sum(1 for worker in Worker.all(connection=queues.get_connection()) if queue_name in worker.queue_names())


def heartbeat_of(name):
    node = Node.objects.filter(name=name, last_heartbeat_at__isnull=False).first()
    return node.heartbeat if node and node.heartbeat.get("agent_pid") else None


def test_the_agent_registers_heartbeats_waits_for_approval_then_takes_jobs_from_its_node_queue(agent):
    process = agent("gpu-2")
    beat = wait_for(lambda: heartbeat_of("gpu-2"), timeout=30, message="the agent's first heartbeat")

    node = Node.objects.get(name="gpu-2")
    assert node.approved is False and node.registered_at is not None
    assert node.bind_address == "127.0.0.2"
    assert beat["agent_pid"] == process.process.pid
    assert beat["gpu_source"] == "settings" and [gpu["index"] for gpu in beat["gpus"]] == [0, 1]
    assert list(GPU.objects.filter(node=node, present=True).values_list("index", flat=True)) == [0, 1]
    assert [entry["root"] for entry in beat["storage"]] == ["shared", "instances", "backups"]
    assert all(entry["free_bytes"] > 0 and entry["total_bytes"] >= entry["free_bytes"] for entry in beat["storage"]
               if "error" not in entry)
    assert len(beat["load"]) == 3 and beat["cpu_count"] == os.cpu_count()
    assert beat["comfyhub_version"] and beat["queues"] == ["node.gpu-2", "node.gpu-2.long"]
    assert "docker_version" in beat and "docker_error" in beat
    # An agent on the hub's machine reaches the same 127.0.0.x as the hub: the proxy may open its instances there.
    assert beat["network_identity"] and beat["network_identity"] == nodes.network_identity()
    assert nodes.shares_hubs_loopback(node)
    assert nodes.node_state(node).label.startswith("waiting for approval (online since ")

    operation = enqueue_on_node("gpu-2", jobs_for_tests.steps, count=2)
    beats = Node.objects.get(name="gpu-2").last_heartbeat_at
    wait_for(lambda: Node.objects.get(name="gpu-2").last_heartbeat_at > beats, timeout=10,
             message="another heartbeat")
    time.sleep(1.5)
    assert Operation.objects.get(pk=operation.pk).status == Operation.Status.QUEUED
    assert listening_on("node.gpu-2") == 0
    assert "waiting for approval" in process.text()
    assert "manage.py hosts approve gpu-2" in process.text()

    nodes.node_approve(node=node)

    done = wait_for(lambda: Operation.objects.filter(pk=operation.pk, status=Operation.Status.SUCCEEDED).first(),
                    timeout=30, message="the approved agent to run the job")
    assert done.result == {"steps": 2}
    assert listening_on("node.gpu-2") == 1 and listening_on("node.gpu-2.long") == 1
    assert listening_on("default") == 0  # it takes its node's jobs only
    assert "Node gpu-2 is approved: taking jobs from node.gpu-2, node.gpu-2.long." in process.text()
    assert nodes.node_state(Node.objects.get(name="gpu-2")).label.startswith("online since ")


def test_a_killed_agents_node_shows_offline_after_three_missed_heartbeats(agent):
    process = agent("gpu-3")
    wait_for(lambda: heartbeat_of("gpu-3"), timeout=30, message="the agent's first heartbeat")
    assert nodes.node_state(Node.objects.get(name="gpu-3")).kind == "online"

    process.kill_hard()
    killed = time.monotonic()
    last = Node.objects.get(name="gpu-3").last_heartbeat_at

    wait_for(lambda: nodes.node_state(Node.objects.get(name="gpu-3")).kind == "offline", timeout=10, interval=0.1,
             message="the node to show offline")
    assert time.monotonic() - killed <= 4.5
    node = Node.objects.get(name="gpu-3")
    assert node.last_heartbeat_at == last  # nothing beat after the kill
    state = nodes.node_state(node)
    assert state.since == last + timedelta(seconds=1)
    assert "offline since" in state.label


def test_sigterm_lets_the_running_job_finish_then_the_agent_exits(agent):
    process = agent("gpu-4")
    wait_for(lambda: heartbeat_of("gpu-4"), timeout=30, message="the agent's first heartbeat")
    nodes.node_approve(node=Node.objects.get(name="gpu-4"))
    wait_for(lambda: listening_on("node.gpu-4"), timeout=30, message="the agent to take jobs")
    operation = enqueue_on_node("gpu-4", jobs_for_tests.steps, count=4, pause=0.5)
    wait_for(lambda: Operation.objects.filter(pk=operation.pk, status=Operation.Status.RUNNING).exists(),
             timeout=30, message="the job to start")

    os.kill(process.process.pid, signal.SIGTERM)

    assert process.process.wait(timeout=30) == 0
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED and operation.result == {"steps": 4}
    assert listening_on("node.gpu-4") == 0


def test_an_agent_whose_approval_is_revoked_takes_no_more_jobs_but_keeps_reporting(agent):
    process = agent("gpu-5")
    wait_for(lambda: heartbeat_of("gpu-5"), timeout=30, message="the agent's first heartbeat")
    node = Node.objects.get(name="gpu-5")
    nodes.node_approve(node=node)
    wait_for(lambda: listening_on("node.gpu-5"), timeout=30, message="the agent to take jobs")

    nodes.node_revoke_approval(node=node)

    wait_for(lambda: listening_on("node.gpu-5") == 0, timeout=15, message="the agent to stop taking jobs")
    operation = enqueue_on_node("gpu-5", jobs_for_tests.steps, count=1)
    beats = Node.objects.get(name="gpu-5").last_heartbeat_at
    wait_for(lambda: Node.objects.get(name="gpu-5").last_heartbeat_at > beats, timeout=10,
             message="heartbeats to go on")
    assert process.process.poll() is None
    assert Operation.objects.get(pk=operation.pk).status == Operation.Status.QUEUED
    assert "approval was revoked" in process.text()

    nodes.node_approve(node=node)
    wait_for(lambda: Operation.objects.filter(pk=operation.pk, status=Operation.Status.SUCCEEDED).exists(),
             timeout=30, message="the approved-again agent to run the job")


def test_a_failed_heartbeat_is_one_log_line_and_the_agent_goes_on(agent):
    process = agent("gpu-6")
    wait_for(lambda: heartbeat_of("gpu-6"), timeout=30, message="the agent's first heartbeat")

    Node.objects.filter(name="gpu-6").delete()  # an operator deletes the node under its running agent

    wait_for(lambda: process.text().count("heartbeat failed") >= 2, timeout=15, message="two failed heartbeats")
    assert process.process.poll() is None
    line = next(line for line in process.text().splitlines() if "heartbeat failed" in line)
    assert "Node gpu-6 is not in the registry any more" in line and "restart its agent" in line
    assert "Traceback" not in process.text()


@pytest.mark.parametrize("name, message", [
    ("local", "'local' is served by the hub's own workers"),
    ("GPU 2", "Use lowercase letters a-z, digits and '-'"),
])
def test_the_agent_refuses_local_and_a_bad_name_with_exit_code_2(name, message):
    done = subprocess.run([sys.executable, str(REPO / "manage.py"), "agent", "--node", name], cwd=REPO,
                          env={**os.environ, "DATABASE_URL": worker_database_url(), **AGENT_ENV},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"node: {message}" in done.stderr and "Traceback" not in done.stderr
    assert not Node.objects.filter(name=name).exclude(name="local").exists()
