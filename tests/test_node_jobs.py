"""Jobs that were the hub's alone, now per node: the idle check asks each online node's agent to stop its own idle
instances; copying workflows to instances on other nodes, installing a library workflow into instances on several
nodes and updating the image of instances on several nodes run each node's part on that node's queue.

The end-to-end test runs a real `manage.py agent` for node B on the second Docker engine (its own roots, ports on
127.0.0.2) beside the hub's workers, as tests/test_node_routing.py does."""
import json
from datetime import timedelta

import docker
import pytest
from django.utils import timezone

from comfyhub import operations, queues
from comfyhub.models import Operation
from instances import idle, services, updates, workflows
from instances.models import LOCAL_NODE, Instance, Node
from storage_app import layout
from tests import testenv
from tests.conftest import wait_for
from tests.test_agent import AgentProcess, listening_on
from tests.test_node_routing import beating, containers_named, silent_since, workers_on

pytestmark = pytest.mark.django_db(transaction=True)

WORKFLOW = {"last_node_id": 1, "links": [], "nodes": [{"id": 1, "type": "Note", "widgets_values": ["hello"]}]}


@pytest.fixture(autouse=True)
def heartbeat_every_second(settings):
    settings.NODE_HEARTBEAT_SECONDS = 1


def idle_running(instance_id, node=None, minutes=5) -> Instance:
    """Registered as running and seen healthy, idle stop after 1 min, last used `minutes` ago (no container)."""
    instance = services.instance_create(instance_id=instance_id, image="img:1", node=node, gpu_indexes=[],
                                        idle_stop_after=1)
    moment = timezone.now() - timedelta(minutes=minutes)
    Instance.objects.filter(pk=instance.pk).update(desired_state=Instance.DesiredState.RUNNING,
                                                   status=Instance.Status.HEALTHY, started_at=moment,
                                                   last_activity_at=moment)
    return Instance.objects.select_related("node").get(pk=instance.pk)


def ended(operation, timeout=120) -> Operation:
    return wait_for(lambda: Operation.objects.filter(pk=operation.pk).exclude(
        status__in=Operation.ACTIVE_STATUSES).first(), timeout=timeout, message=f"operation {operation.kind} to end")


# --- Idle check per node ---------------------------------------------------------------------------------------------

def test_the_idle_check_queues_each_online_nodes_idle_stop_on_its_own_queue_and_no_other():
    Node.objects.get_or_create(name=LOCAL_NODE)
    gpu2 = beating("gpu-2", port_range_start=9000, port_range_end=9100)
    gpu3 = beating("gpu-3", port_range_start=9000, port_range_end=9100)
    idle_running("here")
    idle_running("there", node=gpu2)
    idle_running("away", node=gpu3)
    beating("gpu-4", port_range_start=9000, port_range_end=9100)  # online, but nothing of it is idle
    silent_since(gpu3, 10)

    local_operation = idle.idle_check()

    ops = {op.queue_name: op for op in Operation.objects.filter(kind=idle.KIND)}
    assert set(ops) == {"default", "node.gpu-2"}
    assert str(ops["default"].pk) == local_operation
    [job] = queues.get_queue("node.gpu-2").jobs
    assert job.func_name == "instances.jobs_nodes.stop_idle_instances_on_node"
    assert job.kwargs == {"node_name": "gpu-2"}
    assert queues.get_queue("node.gpu-3").count == queues.get_queue("node.gpu-4").count == 0
    # Each node's own due instances only: local's pass does not touch gpu-2's.
    assert [i.instance_id for i in idle.idle_due()] == ["here"]
    assert [i.instance_id for i in idle.idle_due(node="gpu-2")] == ["there"]
    # While a node's last one waits for its agent, the next check queues no second one there.
    assert idle.idle_check() is None
    assert Operation.objects.filter(kind=idle.KIND).count() == 2


# --- Refused at once when a node of the request is away -----------------------------------------------------------

def test_work_over_several_nodes_is_refused_at_once_when_one_of_them_is_offline(storage):
    gpu2 = beating("gpu-2", port_range_start=9000, port_range_end=9100)
    here = services.instance_create(instance_id="here", image="img:1", gpu_indexes=[])
    there = services.instance_create(instance_id="there", image="img:1", node=gpu2, gpu_indexes=[])
    layout.build_instance_tree("here")
    path = workflows.workflows_dir(here) / "a.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(WORKFLOW))
    services.workflow_publish(instance=here, path="a.json", name="greeting")
    silent_since(gpu2, 10)
    there.refresh_from_db()

    for attempt in (lambda: services.workflows_copy(source=here, targets=[there], paths=["a.json"]),
                    lambda: services.workflow_install(spec="greeting", instances=[here, there]),
                    lambda: updates.image_update(instances=[here, there])):
        with pytest.raises(operations.NodeUnavailable, match="Node gpu-2 is offline since .*nothing was queued"):
            attempt()
    assert not Operation.objects.exists()


def test_work_on_one_node_goes_to_its_queue_and_on_several_to_the_hub_which_splits_it():
    gpu2 = beating("gpu-2", port_range_start=9000, port_range_end=9100)
    here = services.instance_create(instance_id="here", image="img:1", gpu_indexes=[])
    there = services.instance_create(instance_id="there", image="img:1", node=gpu2, gpu_indexes=[])
    other = services.instance_create(instance_id="other", image="img:1", node=gpu2, gpu_indexes=[])

    assert updates.image_update(instances=[here]).queue_name == "long"
    assert updates.image_update(instances=[there, other]).queue_name == "node.gpu-2.long"
    both = updates.image_update(instances=[here, there])
    assert (both.queue_name, both.kind) == ("long", "update_image")
    assert queues.get_queue("long").jobs[-1].func_name == "instances.jobs_nodes.update_image_on_nodes"


# --- A real agent for node B on the second engine ----------------------------------------------------------------------

@pytest.fixture
def node_b(second_docker_engine, tmp_path):
    """Node gpu-b on the second engine with its own roots, its agent running and taking jobs."""
    roots = tmp_path / "node-b"
    (roots / "shared").mkdir(parents=True)
    node = Node.objects.create(
        name="gpu-b", docker_host=second_docker_engine.docker_host, shared_path=str(roots / "shared"),
        instances_path=str(roots / "instances"), bind_address=second_docker_engine.publish_address,
        port_range_start=testenv.PORT_RANGE[0], port_range_end=testenv.PORT_RANGE[1])
    agent = AgentProcess("gpu-b", log_path=tmp_path / "agent-b.log",
                         env={"NODE_ADDRESS": second_docker_engine.publish_address, "COMFY_GPUS": "0,1"})
    try:
        wait_for(lambda: listening_on("node.gpu-b"), timeout=60, message="B's agent to take jobs")
        node.refresh_from_db()
        yield node, roots, agent
    finally:
        agent.stop()


def put_workflow(instance, relpath, data):
    path = workflows.workflows_dir(instance) / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.mark.docker
def test_workflows_reach_instances_on_node_b_through_bs_agent_and_its_idle_instance_is_stopped_there(
        node_b, comfyui_double_image, second_docker_engine, docker_engine, run_worker, storage, admin_user):
    node, roots, agent = node_b
    alpha = services.instance_create(instance_id="alpha", image=comfyui_double_image, gpu_indexes=[])
    gamma = services.instance_create(instance_id="gamma", image=comfyui_double_image, gpu_indexes=[])
    beta = services.instance_create(instance_id="beta", image=comfyui_double_image, node=node, gpu_indexes=[1],
                                    idle_stop_after=1, user=admin_user)
    for instance in (alpha, gamma):
        layout.build_instance_tree(instance.instance_id)
    started = services.instance_start(instance=beta, user=admin_user)
    assert started.queue_name == "node.gpu-b"
    started = ended(started)
    assert started.status == Operation.Status.SUCCEEDED, started.error + started.log
    put_workflow(alpha, "portraits/a.json", WORKFLOW)

    # Copy from local's alpha to local's gamma and B's beta: alpha's node reads once and writes gamma's; B's agent
    # writes beta's, in beta's folder on B's instances root.
    copy = services.workflows_copy(source=alpha, targets=[gamma, beta], paths=["portraits/a.json"], user=admin_user)
    assert copy.queue_name == "default"
    run_worker()
    copy = ended(copy)
    assert copy.status == Operation.Status.SUCCEEDED, copy.error + copy.log
    assert copy.result["copied"] == 2 and copy.result["failed"] == 0
    beta_copy = json.loads((roots / "instances" / "beta" / "user" / "default" / "workflows" / "portraits" /
                            "a.json").read_text())
    assert beta_copy == WORKFLOW
    assert json.loads((workflows.workflows_dir(gamma) / "portraits" / "a.json").read_text()) == WORKFLOW
    written_on_b = Operation.objects.get(pk=copy.result["nodes"]["gpu-b"]["operation"])
    assert written_on_b.queue_name == "node.gpu-b" and written_on_b.worker_name in workers_on("node.gpu-b")
    assert written_on_b.requested_by == admin_user

    # Install a library version into alpha (local) and beta (B): the hub installs alpha's, B's agent beta's.
    services.workflow_publish(instance=alpha, path="portraits/a.json", name="greeting")
    install = services.workflow_install(spec="greeting@1", instances=[alpha, beta], user=admin_user)
    assert install.queue_name == "default"
    run_worker()
    install = ended(install)
    assert install.status == Operation.Status.SUCCEEDED, install.error + install.log
    assert sorted(i["instance"] for i in install.result["installs"]) == ["alpha", "beta"]
    assert (roots / "instances" / "beta" / "user" / "default" / "workflows" / "greeting.json").is_file()
    assert (workflows.workflows_dir(alpha) / "greeting.json").is_file()
    assert not (layout.instances_root() / "beta").exists()

    # beta is idle: the hub's check queues B's idle stop on B's queue; B's agent asks beta's queue on B's address,
    # finds it empty and stops it on B's engine.
    health_checked = wait_for(lambda: _reconciled_healthy(beta), timeout=60, message="beta to be seen healthy")
    moment = timezone.now() - timedelta(minutes=2)
    Instance.objects.filter(pk=health_checked.pk).update(started_at=moment, last_activity_at=moment)
    assert idle.idle_check() is None  # nothing of local's is idle
    stop_pass = Operation.objects.get(kind=idle.KIND)
    assert stop_pass.queue_name == "node.gpu-b"
    stop_pass = ended(stop_pass)
    assert stop_pass.status == Operation.Status.SUCCEEDED, stop_pass.error + stop_pass.log
    assert [s["instance"] for s in stop_pass.result["stopped"]] == ["beta"]
    stop = ended(Operation.objects.get(pk=stop_pass.result["stopped"][0]["operation"]))
    assert stop.status == Operation.Status.SUCCEEDED and stop.queue_name == "node.gpu-b"
    beta.refresh_from_db()
    assert beta.desired_state == Instance.DesiredState.STOPPED and beta.stop_reason == idle.idle_reason(1)
    b_socket = docker.DockerClient(base_url=second_docker_engine.docker_host)
    try:
        assert [c.status for c in containers_named(b_socket, beta.container_name)] in ([], ["exited"])
    finally:
        b_socket.close()
    assert containers_named(docker_engine, beta.container_name) == []


def _reconciled_healthy(instance):
    from instances import jobs

    jobs.queue_node_reconcile(instance.node)
    found = Instance.objects.select_related("node").get(pk=instance.pk)
    return found if found.status == Instance.Status.HEALTHY else None


@pytest.mark.docker
def test_a_node_whose_agent_dies_before_taking_its_part_fails_that_part_and_the_rest_is_done(
        node_b, comfyui_double_image, run_worker, storage):
    node, roots, agent = node_b
    alpha = services.instance_create(instance_id="alpha", image=comfyui_double_image, gpu_indexes=[])
    gamma = services.instance_create(instance_id="gamma", image=comfyui_double_image, gpu_indexes=[])
    beta = services.instance_create(instance_id="beta", image=comfyui_double_image, node=node, gpu_indexes=[])
    for instance in (alpha, gamma):
        layout.build_instance_tree(instance.instance_id)
    put_workflow(alpha, "a.json", WORKFLOW)
    agent.kill_hard()  # still online for up to three heartbeats: the copy is accepted, B's part waits for nobody

    copy = services.workflows_copy(source=alpha, targets=[gamma, beta], paths=["a.json"])
    run_worker()
    copy = ended(copy, timeout=30)
    assert copy.status == Operation.Status.SUCCEEDED, copy.error + copy.log  # gamma got it
    part = copy.result["nodes"]["gpu-b"]
    assert part["status"] == "cancelled" and "Node gpu-b is offline since" in part["error"]
    assert Operation.objects.get(pk=part["operation"]).status == Operation.Status.CANCELLED
    assert part["operation"] not in queues.get_queue("node.gpu-b").job_ids  # nothing left for an agent not there
    assert (copy.result["copied"], copy.result["failed"]) == (1, 1)
    assert (workflows.workflows_dir(gamma) / "a.json").is_file()
    assert not (roots / "instances" / "beta").exists()
