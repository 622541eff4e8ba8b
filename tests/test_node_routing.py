"""Operations routed to the node their instance is on: the hub's `local` keeps the queues default and long, any other
node's jobs go to node.<name> and node.<name>.long for its agent; an offline or unapproved node refuses at once.

The end-to-end test runs a real `manage.py agent` for node B on the second Docker engine (its own socket, storage roots
and address 127.0.0.2) beside the hub's workers on the first."""
import io
import time

import docker
import pytest
from rq import Worker
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from comfyhub import operations, queues
from comfyhub.models import Operation
from instances import jobs, nodes, services
from instances.models import LOCAL_NODE, Instance, Node
from storage_app import layout
from tests import jobs_for_tests, testenv
from tests.conftest import wait_for
from tests.test_agent import AgentProcess, listening_on

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def heartbeat_every_second(settings):
    settings.NODE_HEARTBEAT_SECONDS = 1


def beating(name, *, approved=True, **fields) -> Node:
    """A node whose agent's heartbeat just came (no agent runs: nothing takes its jobs)."""
    node = Node.objects.create(name=name, approved=approved, **fields)
    nodes.node_heartbeat(node=node, heartbeat={}, address="127.0.0.1")
    node.refresh_from_db()
    return node


def silent_since(node: Node, seconds: float) -> Node:
    Node.objects.filter(pk=node.pk).update(last_heartbeat_at=timezone.now() - timezone.timedelta(seconds=seconds))
    node.refresh_from_db()
    return node


# --- Queues ------------------------------------------------------------------------------------------------------

def test_local_keeps_the_hub_queues_and_another_node_gets_its_own():
    local = Node.objects.get_or_create(name=LOCAL_NODE)[0]
    assert (local.job_queue("default"), local.job_queue("long")) == ("default", "long")
    gpu = Node(name="gpu-2")
    assert (gpu.job_queue("default"), gpu.job_queue("long")) == ("node.gpu-2", "node.gpu-2.long")
    assert nodes.node_queue_names("gpu-2") == ["node.gpu-2", "node.gpu-2.long"]


@pytest.mark.parametrize("name, base", [
    ("default", "default"), ("long", "long"), ("node.gpu-2", "default"), ("node.gpu-2.long", "long"),
    ("node.long", "default"),  # a node named "long": its quick queue
    ("node.long.long", "long"),
])
def test_node_queue_names_use_their_base_queues_settings(name, base):
    assert queues.base_queue(name) == base
    queue = queues.get_queue(name)
    assert queue.name == name
    assert queue.connection is queues.get_connection("default")  # one Redis for the hub and every agent


@pytest.mark.parametrize("name", ["node.", "node.a.b", "nodes.gpu-2", "high", ""])
def test_a_queue_that_is_neither_the_hubs_nor_a_nodes_is_refused(name):
    with pytest.raises(KeyError, match="node.<name>"):
        queues.base_queue(name)


# --- Enqueueing ------------------------------------------------------------------------------------------------

def test_an_operation_for_an_online_nodes_instance_is_queued_on_that_nodes_queue(run_worker):
    node = beating("gpu-2", port_range_start=9000, port_range_end=9100)
    instance = services.instance_create(instance_id="remote", image="img:1", node=node, gpu_indexes=[])

    operation = services.instance_start(instance=instance)

    assert operation.queue_name == "node.gpu-2"
    assert queues.get_queue("node.gpu-2").job_ids == [str(operation.pk)]
    run_worker()  # the hub's workers drain default and long only: the job waits for the node's agent
    assert Operation.objects.get(pk=operation.pk).status == Operation.Status.QUEUED


def test_a_long_job_for_a_node_goes_to_its_long_queue_and_a_long_node_name_fits():
    name = "n" * 63
    node = beating(name)
    operation = operations.enqueue("instances.jobs.pull_image", target=node, node_pk=node.pk, image="img:1")
    assert Operation.objects.get(pk=operation.pk).queue_name == f"node.{name}.long"
    assert queues.get_queue(f"node.{name}.long").job_ids == [str(operation.pk)]


def test_node_chooses_the_queue_whatever_the_target():
    node = beating("gpu-2")
    operation = operations.enqueue(jobs_for_tests.steps, node=node, count=1)
    assert operation.queue_name == "node.gpu-2" and operation.target_id == ""


def test_jobs_about_no_node_or_about_local_stay_on_the_hub_queues():
    local = Node.objects.get_or_create(name=LOCAL_NODE)[0]
    assert operations.enqueue(jobs_for_tests.steps, count=1).queue_name == "default"
    assert operations.enqueue(jobs_for_tests.steps, node=local, count=1).queue_name == "default"
    assert operations.enqueue("instances.jobs.pull_image", target=local, node_pk=local.pk,
                              image="img:1").queue_name == "long"


def test_a_node_given_by_name_is_a_programming_error_that_says_so():
    with pytest.raises(TypeError, match="takes a node"):
        operations.enqueue(jobs_for_tests.steps, node="gpu-2", count=1)
    assert not Operation.objects.exists()


def test_an_offline_nodes_instance_refuses_operations_at_once_and_records_nothing():
    node = beating("gpu-2", port_range_start=9000, port_range_end=9100)
    instance = services.instance_create(instance_id="remote", image="img:1", node=node, gpu_indexes=[])
    silent_since(node, 10)
    instance.refresh_from_db()

    for service in (services.instance_start, services.instance_stop, services.instance_restart):
        with pytest.raises(operations.NodeUnavailable) as refused:
            service(instance=instance)
        message = str(refused.value)
        assert message.startswith("Node gpu-2 is offline since ")
        assert "(no heartbeat from its agent); nothing was queued" in message
        assert "manage.py agent --node gpu-2" in message
    assert isinstance(refused.value, queues.QueueUnavailable)  # pages and commands show it as they show Redis down
    assert not Operation.objects.exists()
    assert queues.get_queue("node.gpu-2").count == 0


def test_an_offline_node_costs_the_other_instances_nothing_in_the_scheduled_snapshot_pass():
    from storage_app import jobs as storage_jobs

    node = beating("gpu-2", port_range_start=9000, port_range_end=9100)
    remote = services.instance_create(instance_id="remote", image="img:1", node=node, gpu_indexes=[])
    here = services.instance_create(instance_id="here", image="img:1", gpu_indexes=[])
    Instance.objects.filter(pk__in=[remote.pk, here.pk]).update(snapshot_every_hours=1)
    silent_since(node, 10)

    assert storage_jobs.scheduled_snapshots() == ["here"]
    assert list(Operation.objects.values_list("target_label", flat=True)) == ["here"]


def test_an_unapproved_node_and_one_that_never_reported_refuse_with_what_to_do():
    waiting = beating("gpu-3", approved=False)
    with pytest.raises(operations.NodeUnavailable, match="Node gpu-3 is waiting for approval.*manage.py hosts "
                                                         "approve gpu-3"):
        operations.enqueue(jobs_for_tests.steps, node=waiting, count=1)
    never = Node.objects.create(name="gpu-4")
    with pytest.raises(operations.NodeUnavailable, match="Node gpu-4 has no agent yet.*manage.py agent --node gpu-4"):
        operations.enqueue(jobs_for_tests.steps, node=never, count=1)
    assert not Operation.objects.exists()


def test_the_cli_says_why_a_start_on_an_offline_node_was_refused(capsys):
    from django.core.management.base import CommandError

    node = beating("gpu-2", port_range_start=9000, port_range_end=9100)
    services.instance_create(instance_id="remote", image="img:1", node=node, gpu_indexes=[])
    silent_since(node, 10)
    with pytest.raises(CommandError, match="Node gpu-2 is offline since") as failed:
        call_command("instances", "start", "remote", "--no-wait")
    assert failed.value.returncode == 1
    assert not Operation.objects.exists()


# --- Periodic jobs per node -----------------------------------------------------------------------------------

def test_the_hubs_reconcile_asks_each_online_approved_node_once_and_no_other():
    beating("gpu-2")
    beating("gpu-3", approved=False)
    silent_since(beating("gpu-4"), 10)
    Node.objects.create(name="gpu-5")

    result = jobs.reconcile_instances()

    assert result["nodes_asked"] == ["gpu-2"]
    [job] = queues.get_queue("node.gpu-2").jobs
    assert job.func_name == "instances.jobs.reconcile_instances" and job.kwargs == {"node": "gpu-2"}
    for name in ("gpu-3", "gpu-4", "gpu-5"):
        assert queues.get_queue(f"node.{name}").count == 0
    # While the last one waits, the next pass queues no other: an agent away gets one, not a pile.
    assert "nodes_asked" not in jobs.reconcile_instances()
    assert queues.get_queue("node.gpu-2").count == 1
    assert not Operation.objects.exists()  # housekeeping, like the hub's own periodic jobs


def test_an_offline_nodes_instances_show_unknown_with_since_when_on_the_dashboard_page_and_cli(client, admin_user):
    node = beating("gpu-2", port_range_start=9000, port_range_end=9100)
    instance = services.instance_create(instance_id="remote", image="img:1", node=node, gpu_indexes=[])
    Instance.objects.filter(pk=instance.pk).update(status=Instance.Status.HEALTHY)
    client.force_login(admin_user)
    assert "node offline since" not in client.get(reverse("dashboard")).content.decode()

    silent_since(node, 10)
    since = f"{timezone.localtime(nodes.node_state(node).since):%Y-%m-%d %H:%M:%S}"

    dashboard = client.get(reverse("dashboard")).content.decode()
    assert f"(node offline since {since})" in dashboard
    page = client.get(reverse("instance-detail", args=["remote"])).content.decode()
    assert f"(node offline since {since}; last recorded: Healthy)" in page
    out = io.StringIO()
    call_command("instances", "status", "remote", stdout=out)
    assert f"status     unknown (node offline since {since}) (desired: stopped); last recorded: healthy" \
        in out.getvalue()
    out = io.StringIO()
    call_command("instances", "list", stdout=out)
    assert f"unknown (node offline since {since})" in out.getvalue()


# --- A real agent on the second engine ---------------------------------------------------------------------------

def workers_on(queue_name) -> list[str]:
    return [w.name for w in Worker.all(connection=queues.get_connection()) if queue_name in w.queue_names()]


def containers_named(client: docker.DockerClient, name: str) -> list:
    return client.containers.list(all=True, filters={"name": f"^/{name}$"})


@pytest.mark.docker
def test_an_instance_on_node_b_runs_on_bs_engine_is_checked_by_bs_agent_and_waits_out_its_absence(
        comfyui_double_image, second_docker_engine, docker_engine, run_worker, tmp_path, admin_user, client):
    b_roots = tmp_path / "node-b"
    node_b = Node.objects.create(
        name="gpu-b", docker_host=second_docker_engine.docker_host, shared_path=str(b_roots / "shared"),
        instances_path=str(b_roots / "instances"), bind_address=second_docker_engine.publish_address,
        port_range_start=testenv.PORT_RANGE[0], port_range_end=testenv.PORT_RANGE[1])
    (b_roots / "shared").mkdir(parents=True)
    agent_env = {"NODE_ADDRESS": second_docker_engine.publish_address, "COMFY_GPUS": "0,1"}

    def start_agent(number):
        process = AgentProcess("gpu-b", log_path=tmp_path / f"agent-{number}.log", env=agent_env)
        wait_for(lambda: listening_on("node.gpu-b"), timeout=60, message="B's agent to take jobs")
        return process

    agent = start_agent(0)
    try:
        node_b.refresh_from_db()
        beta = services.instance_create(instance_id="beta", image=comfyui_double_image, node=node_b,
                                        gpu_indexes=[1], user=admin_user)
        alpha = services.instance_create(instance_id="alpha", image=comfyui_double_image, gpu_indexes=[0],
                                         user=admin_user)

        started = services.instance_start(instance=beta, user=admin_user)
        assert started.queue_name == "node.gpu-b"
        done = wait_for(lambda: Operation.objects.filter(pk=started.pk).exclude(
            status__in=Operation.ACTIVE_STATUSES).first(), timeout=120, message="B's agent to start beta")
        assert done.status == Operation.Status.SUCCEEDED, done.error + done.log
        assert done.worker_name in workers_on("node.gpu-b")
        alpha_start = services.instance_start(instance=alpha, user=admin_user)
        assert alpha_start.queue_name == "default"
        run_worker()
        alpha_start.refresh_from_db()
        assert alpha_start.status == Operation.Status.SUCCEEDED, alpha_start.error + alpha_start.log

        # On B's engine, seen through B's socket and absent from A's; its folders on B's roots; its port on B's
        # address.
        beta.refresh_from_db()
        b_socket = docker.DockerClient(base_url=second_docker_engine.docker_host)
        try:
            [container] = containers_named(b_socket, beta.container_name)
            assert container.status == "running"
            ports = container.attrs["NetworkSettings"]["Ports"]["8188/tcp"]
            assert ports == [{"HostIp": "127.0.0.2", "HostPort": str(beta.host_port)}]
        finally:
            b_socket.close()
        assert containers_named(docker_engine, beta.container_name) == []
        assert containers_named(second_docker_engine.client, alpha.container_name) == []
        assert layout.instance_dir("beta", node_b).parent == b_roots / "instances"
        assert (b_roots / "instances" / "beta").is_dir()
        assert not (layout.instances_root() / "beta").exists()

        # Its health comes from B's agent: the hub's pass checks local and asks B, which records beta's state.
        Instance.objects.filter(pk=beta.pk).update(status=Instance.Status.UNKNOWN, status_detail="", health={},
                                                   checked_at=None)
        asked = jobs.reconcile_instances()
        assert asked["nodes_asked"] == ["gpu-b"]
        beta = wait_for(lambda: Instance.objects.filter(pk=beta.pk, checked_at__isnull=False).first(),
                        timeout=60, message="B's agent to reconcile beta")
        assert beta.status == Instance.Status.HEALTHY, beta.status_detail
        own = {c["check"]: c for c in beta.health["checks"]}["instance storage is its own"]
        assert own["ok"] and str(b_roots / "instances" / "beta") in own["detail"]

        # B's agent dies: B is offline within three heartbeats, beta's operations are refused at once, A works on.
        agent.kill_hard()
        killed = time.monotonic()
        wait_for(lambda: Node.objects.get(name="gpu-b").state().kind == "offline", timeout=10, interval=0.1,
                 message="B to show offline")
        assert time.monotonic() - killed <= 4.5
        beta.refresh_from_db()
        before = Operation.objects.count()
        for service in (services.instance_stop, services.instance_start, services.instance_restart):
            with pytest.raises(operations.NodeUnavailable, match="Node gpu-b is offline since .*`manage.py "
                                                                 "agent --node gpu-b`"):
                service(instance=beta, user=admin_user)
        assert Operation.objects.count() == before
        client.force_login(admin_user)
        assert "(node offline since " in client.get(reverse("dashboard")).content.decode()

        stopped = services.instance_stop(instance=alpha, user=admin_user)
        run_worker()
        stopped.refresh_from_db()
        assert stopped.status == Operation.Status.SUCCEEDED, stopped.error + stopped.log

        # While nobody watches B, beta's container stops. The agent comes back and reconciles: the real state.
        second_docker_engine.client.containers.get(beta.container_name).stop(timeout=5)
        agent.stop()
        agent = start_agent(1)
        beta = wait_for(lambda: Instance.objects.filter(pk=beta.pk).exclude(
            status=Instance.Status.HEALTHY).first(), timeout=60, message="B's agent to reconcile beta on its return")
        assert beta.status == Instance.Status.ERROR and beta.status_detail.startswith("exited with code")
        assert Node.objects.get(name="gpu-b").offline_note() == ""
        assert "(node offline since " not in client.get(reverse("dashboard")).content.decode()
    finally:
        agent.stop()


def test_a_command_waiting_for_a_nodes_agent_says_to_start_that_agent():
    from comfyhub.cli import no_worker_message

    message = no_worker_message(Operation(queue_name="node.gpu-2.long"))
    assert message.startswith("No agent of node 'gpu-2' is listening on queue 'node.gpu-2.long'")
    assert "`python manage.py agent --node gpu-2`" in message
    assert "rqworker default" in no_worker_message(Operation(queue_name="default"))


def test_an_agent_starting_replaces_the_reconcile_a_killed_predecessor_left_started():
    from rq.job import Job, JobStatus

    from instances import jobs

    node = beating("gpu-2")
    assert jobs.queue_node_reconcile(node) is True
    connection = queues.get_connection("node.gpu-2")
    Job.fetch("reconcile-gpu-2", connection=connection).set_status(JobStatus.STARTED)

    assert jobs.queue_node_reconcile(node) is False  # the hub's pass: one at a time
    assert jobs.queue_node_reconcile(node, replace_abandoned=True) is True  # an agent starting: its predecessor's
    assert Job.fetch("reconcile-gpu-2", connection=connection).get_status() == JobStatus.QUEUED
