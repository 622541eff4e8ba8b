"""ComfyUI-Distributed clusters (instances/clusters.py, instances/jobs_clusters.py): the refusals, the gpu_config.json
files ComfyHub writes and keeps in sync, the cluster's network, the start and stop order and the probe from inside the
master. Real Docker with the ComfyUI test double (it serves /distributed/config and /distributed/reach), real git for
ComfyUI-Distributed's stand-in (tests/support/distributed.py), real RQ workers, and a real agent for node B on the
second engine."""
import json
import os
import re
import urllib.request

import pytest
from django.core.exceptions import ValidationError

from comfyhub.models import Operation
from instances import clusters, docker_engine, health, runtime, services
from instances.models import GPU, Cluster, CustomNode, Instance, InstanceTemplate, Node
from storage_app import layout
from tests.support.distributed import make_distributed_source

pytestmark = pytest.mark.django_db(transaction=True)

# The shape of gpu_config.json (issue #15, ComfyUI-Distributed's utils/config.py).
MASTER_KEYS = {"name", "host", "port", "cuda_device", "extra_args"}
WORKER_KEYS = {"id", "name", "host", "port", "cuda_device", "enabled", "extra_args", "type"}


def check_shape(config: dict):
    """Fail unless `config` has the shape ComfyUI-Distributed reads."""
    assert isinstance(config, dict)
    assert MASTER_KEYS <= set(config["master"]), config["master"]
    assert isinstance(config["master"]["host"], str) and config["master"]["host"]
    assert isinstance(config["master"]["port"], int)
    assert isinstance(config["workers"], list)
    for worker in config["workers"]:
        assert WORKER_KEYS <= set(worker), worker
        assert worker["type"] in ("local", "remote", "cloud")
        assert isinstance(worker["enabled"], bool) and isinstance(worker["port"], int)
        assert isinstance(worker["host"], str) and worker["host"]
    settings = config["settings"]
    assert settings["has_auto_populated_workers"] is True
    assert settings["auto_launch_workers"] is False
    for key in ("debug", "stop_workers_on_master_exit", "master_delegate_only", "websocket_orchestration"):
        assert isinstance(settings[key], bool)


def config_file(instance: Instance):
    return layout.instance_dir(instance.instance_id, instance.node) / clusters.CONFIG_RELPATH


def written(instance: Instance) -> dict:
    return json.loads(config_file(instance).read_text())


def succeeded(operation, run_worker) -> Operation:
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error + "\n" + operation.log
    return operation


def plain(instance_id, gpus=(), image="img:1", node=None) -> Instance:
    return services.instance_create(instance_id=instance_id, image=image, gpu_indexes=list(gpus), node=node)


def messages(excinfo, field) -> str:
    return " ".join(excinfo.value.message_dict.get(field, []))


# --- Refusals --------------------------------------------------------------------------------------------------

def test_a_new_member_on_a_gpu_another_instance_holds_is_refused(operator):
    plain("holder", gpus=[1])
    template = InstanceTemplate.objects.create(name="cl", image="img:1")

    with pytest.raises(ValidationError) as refused:
        clusters.cluster_create(name="render", user=operator, template=template,
                                new_members=[(services.local_node(), [0]), (services.local_node(), [1])])

    assert "GPU 1 is held exclusively by instance 'holder'" in messages(refused, "new_members")
    assert not Cluster.objects.exists() and not Instance.objects.filter(instance_id__startswith="render").exists()


def test_an_adopted_member_on_a_gpu_it_shares_with_another_instance_is_refused(operator):
    GPU.objects.filter(node__name="local", index=2).update(shareable=True)
    master, worker = plain("m", gpus=[0]), plain("w", gpus=[2])
    plain("neighbour", gpus=[2])

    with pytest.raises(ValidationError) as refused:
        clusters.cluster_create(name="render", user=operator, master=master, workers=[worker])

    assert "'w' is on GPU 2 of node local, which instance 'neighbour' holds too" in messages(refused, "workers")


def test_two_new_members_on_one_gpu_are_refused(operator):
    template = InstanceTemplate.objects.create(name="cl", image="img:1")
    with pytest.raises(ValidationError) as refused:
        clusters.cluster_create(name="render", template=template,
                                new_members=[(services.local_node(), [0]), (services.local_node(), [0])])
    assert "GPU 0 of node local is given to two new members" in messages(refused, "new_members")


def test_a_worker_already_in_another_cluster_is_refused():
    first = clusters.cluster_create(name="first", master=plain("m1", gpus=[0]), workers=[plain("w", gpus=[1])])
    worker = Instance.objects.get(instance_id="w")

    with pytest.raises(ValidationError) as refused:
        clusters.cluster_create(name="second", master=plain("m2", gpus=[2]), workers=[worker])
    assert "'w' is already the worker of cluster 'first'" in messages(refused, "workers")

    with pytest.raises(ValidationError) as refused:
        clusters.cluster_add_worker(cluster=first, instance=first.master)
    assert "is the master of cluster 'first'" in messages(refused, "workers")


def test_a_master_that_is_also_a_worker_is_refused():
    master = plain("m", gpus=[0])
    with pytest.raises(ValidationError) as refused:
        clusters.cluster_create(name="render", master=master, workers=[master, plain("w", gpus=[1])])
    assert "'m' cannot be the master and a worker of the same cluster" in messages(refused, "master")
    assert not Cluster.objects.exists()


def test_the_master_of_one_cluster_cannot_be_a_worker_of_another():
    clusters.cluster_create(name="first", master=plain("m1", gpus=[0]))
    with pytest.raises(ValidationError) as refused:
        clusters.cluster_create(name="second", master=plain("m2", gpus=[1]),
                                workers=[Instance.objects.get(instance_id="m1")])
    assert "'m1' is already the master of cluster 'first'" in messages(refused, "workers")


@pytest.mark.parametrize("address", ["127.0.0.1", "0.0.0.0", "::1"])
def test_a_cluster_across_nodes_where_a_node_has_no_reachable_address_is_refused(address):
    node = Node.objects.create(name="gpu-b", bind_address=address, port_range_start=9000, port_range_end=9100)
    far = plain("far", node=node)

    with pytest.raises(ValidationError) as refused:
        clusters.cluster_create(name="render", master=plain("m", gpus=[0]), workers=[far])

    text = messages(refused, "workers")
    assert f"node gpu-b has no address other nodes can reach (NODE_ADDRESS is {address}): set NODE_ADDRESS on its " \
           "agent" in text
    assert "node local has no address other nodes can reach (NODE_ADDRESS is 127.0.0.1)" in text


def test_only_an_operator_may_open_the_members_cors_header_to_another_origin_or_to_everyone(operator, stranger):
    for origin in ("*", "https://studio.example.org"):
        with pytest.raises(ValidationError) as refused:
            clusters.cluster_create(name="render", user=stranger, master=plain(f"m{len(origin)}"), cors_origin=origin)
        assert "Only an operator may set the members' CORS origin" in messages(refused, "cors_origin")
    with pytest.raises(ValidationError) as refused:
        clusters.cluster_create(name="render", user=operator, master=plain("m"), cors_origin="https://a/b")
    assert "is not an origin" in messages(refused, "cors_origin")

    cluster = clusters.cluster_create(name="render", user=operator, master=Instance.objects.get(instance_id="m"),
                                      cors_origin="*")
    assert runtime.comfyui_arguments(cluster.master, [])[-2:] == ["--enable-cors-header", "*"]


@pytest.mark.parametrize("name", ["Render", "render_1", "-render", "r" * 41, ""])
def test_a_name_that_cannot_name_the_members_is_refused(name):
    with pytest.raises(ValidationError) as refused:
        clusters.cluster_create(name=name, master=plain("m"))
    assert "lowercase letters, digits and '-'" in messages(refused, "name")


def test_a_taken_name_and_new_member_ids_that_exist_are_refused():
    clusters.cluster_create(name="render", master=plain("m"))
    template = InstanceTemplate.objects.create(name="cl", image="img:1")
    with pytest.raises(ValidationError) as refused:
        clusters.cluster_create(name="render", master=plain("m2"))
    assert "A cluster 'render' already exists" in messages(refused, "name")
    plain("paint-master")
    with pytest.raises(ValidationError) as refused:
        clusters.cluster_create(name="paint", template=template, new_members=[(services.local_node(), [0])])
    assert "paint-master exist already" in messages(refused, "name")
    with pytest.raises(ValidationError) as refused:  # /clusters/new/ is the new-cluster page
        clusters.cluster_create(name="new", master=plain("m3"))
    assert "'new' is reserved" in messages(refused, "name")


def test_a_member_that_sets_its_own_cors_header_is_refused_and_comfyhubs_comes_last(settings):
    sneaky = services.instance_create(instance_id="sneaky", image="img:1", extra_args=["--enable-cors", "*"])
    with pytest.raises(ValidationError) as refused:
        clusters.cluster_create(name="render", master=sneaky)
    assert "sets --enable-cors-header itself" in messages(refused, "master")

    master = plain("m", gpus=[0])
    clusters.cluster_create(name="render", master=master)
    args = runtime.comfyui_arguments(master, master.assigned_gpus())
    assert args[-2:] == ["--enable-cors-header", settings.HUB_ORIGIN]
    # Set on the instance later, past the cluster's check: ComfyHub's flag still comes after it, so argparse keeps it.
    Instance.objects.filter(pk=master.pk).update(extra_args=["--enable-cors-header", "*"])
    master.refresh_from_db()
    assert runtime.comfyui_arguments(master, [])[-2:] == ["--enable-cors-header", settings.HUB_ORIGIN]
    assert "--enable-cors-header" not in runtime.comfyui_arguments(plain("alone"), [])
    # Nor can a member's own arguments be edited to set it later.
    with pytest.raises(ValidationError) as refused:
        services.instance_update(instance=master, display_name="", description="", image=master.image,
                                 extra_args=["--enable-cors=*"], extra_env={}, host_port=None, gpu_indexes=[0])
    assert "ComfyHub sets --enable-cors-header on a cluster's members" in messages(refused, "extra_args")


def test_an_instance_in_a_cluster_cannot_be_deleted_until_it_leaves():
    cluster = clusters.cluster_create(name="render", master=plain("m"), workers=[plain("w")])
    assert "is the master of cluster 'render'" in clusters.deletion_problem(cluster.master)
    assert "clusters remove-worker render w" in clusters.deletion_problem(Instance.objects.get(instance_id="w"))
    assert clusters.deletion_problem(plain("alone")) is None
    # Refused when asked, before anything is queued (the page and `instances delete` call this service).
    for member in (cluster.master, Instance.objects.get(instance_id="w")):
        with pytest.raises(ValidationError, match="cluster 'render'"):
            services.instance_delete(instance=member)
    assert not Operation.objects.filter(kind="instance_delete").exists()


def test_gpu_instances_number_their_gpus_in_bus_order():
    spec = runtime.container_spec(plain("g", gpus=[3, 1]))
    assert spec.environment["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert spec.gpu_ids == [g.device_id for g in GPU.objects.filter(node__name="local", index__in=[1, 3])
                            .order_by("index")]
    assert "CUDA_DEVICE_ORDER" not in runtime.container_spec(plain("c")).environment


# --- What ComfyHub writes --------------------------------------------------------------------------------------

def test_a_merge_keeps_what_a_person_set_and_replaces_what_comfyhub_decides():
    existing = {"master": {"host": "old", "name": "x", "note": "mine"},
                "workers": [{"id": "w1", "host": "old", "colour": "red"}, {"id": "gone", "host": "h"},
                            {"id": {"planted": 1}}, {"id": ["w1"]}, "not a worker"],  # the container's to shape
                "settings": {"debug": True, "worker_timeout_seconds": 99, "auto_launch_workers": True},
                "tunnel": {"status": "running"}, "future_key": [1]}
    sections = {"master": {"name": "m", "host": "h", "port": 8188, "cuda_device": 0, "extra_args": ""},
                "workers": [{"id": "w1", "name": "w1", "host": "c", "port": 8188, "cuda_device": 0, "enabled": True,
                             "extra_args": "", "type": "remote"}]}

    merged = clusters.merged_config(existing, sections)

    check_shape(merged)
    assert merged["master"]["note"] == "mine" and merged["master"]["host"] == "h"
    assert merged["workers"] == [{**sections["workers"][0], "colour": "red"}]
    assert merged["settings"]["debug"] is True and merged["settings"]["worker_timeout_seconds"] == 99
    assert merged["settings"]["auto_launch_workers"] is False
    assert merged["future_key"] == [1]
    assert "tunnel" not in merged  # a public URL any peer may set, shown unescaped by the node: never kept


# --- A cluster of a master and two workers on one node ------------------------------------------------------------

@pytest.fixture
def distributed(tmp_path, settings, monkeypatch, node_git):
    return make_distributed_source(tmp_path / "sources", settings, monkeypatch)


@pytest.fixture
def template(comfyui_double_image):
    return InstanceTemplate.objects.create(name="cluster-member", image=comfyui_double_image)


def container(instance: Instance) -> dict:
    engine = docker_engine.require_engine(instance.node.docker_host or None)
    try:
        return engine.api.inspect_container(instance.container_name)
    finally:
        engine.close()


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def made_cluster(template, operator, run_worker) -> Cluster:
    local = services.local_node()
    cluster = clusters.cluster_create(name="render", user=operator, template=template,
                                      new_members=[(local, [0]), (local, [1]), (local, [2])])
    run_worker()
    for operation in Operation.objects.filter(kind="cluster_member_prepare"):
        assert operation.status == Operation.Status.SUCCEEDED, operation.error + operation.log
    return cluster


def made_cluster_and_members(template, operator, run_worker) -> tuple[Cluster, Instance, Instance, Instance]:
    """made_cluster, with its master and its two workers."""
    cluster = made_cluster(template, operator, run_worker)
    return (cluster, cluster.master, *clusters.workers_of(cluster))


@pytest.mark.docker
def test_a_cluster_from_a_template_gets_the_pinned_node_and_a_file_per_member_before_it_starts(
        distributed, template, operator, run_worker, settings):
    cluster = made_cluster(template, operator, run_worker)

    master = Instance.objects.get(instance_id="render-master")
    w1, w2 = Instance.objects.get(instance_id="render-w1"), Instance.objects.get(instance_id="render-w2")
    assert cluster.master == master and clusters.workers_of(cluster) == [w1, w2]
    assert [[g.index for g in i.assigned_gpus()] for i in (master, w1, w2)] == [[0], [1], [2]]
    for member in (master, w1, w2):
        node = CustomNode.objects.get(instance=member, name="ComfyUI-Distributed")
        assert (node.url, node.commit) == (distributed.url, distributed.pinned)
        check_shape(written(member))
        assert config_file(member).stat().st_uid == settings.PUID  # the node rewrites it from inside

    master_file = written(master)
    assert (master_file["master"]["host"], master_file["master"]["port"]) == (master.container_name, 8188)
    assert master_file["master"]["name"] == "render-master" and master_file["master"]["cuda_device"] == 0
    assert [(w["id"], w["host"], w["port"], w["type"], w["enabled"]) for w in master_file["workers"]] == [
        ("render-w1", w1.container_name, 8188, "remote", False),
        ("render-w2", w2.container_name, 8188, "remote", False)]
    for worker in (w1, w2):
        assert written(worker)["workers"] == []
        assert written(worker)["master"]["host"] == master.container_name


@pytest.mark.docker
def test_a_cluster_starts_workers_then_master_and_the_master_reaches_each_worker_by_its_files_address(
        distributed, template, operator, run_worker, settings):
    cluster, master, w1, w2 = made_cluster_and_members(template, operator, run_worker)

    start = succeeded(clusters.cluster_start(cluster=cluster, user=operator), run_worker)

    started_at = {i.instance_id: container(i)["State"]["StartedAt"] for i in (master, w1, w2)}
    assert started_at["render-w1"] < started_at["render-w2"] < started_at["render-master"]
    log = start.log
    assert log.index("render-w1 is healthy") < log.index("starting worker render-w2") \
        < log.index("render-w2 is healthy") < log.index("starting master render-master")
    # Every member runs with ComfyHub's CORS flag, on the cluster's own network, found by its name.
    network = runtime.cluster_network_name("render")
    for member in (master, w1, w2):
        info = container(member)
        assert info["Config"]["Cmd"][-2:] == ["--enable-cors-header", settings.HUB_ORIGIN]
        assert member.container_name in info["NetworkSettings"]["Networks"][network]["Aliases"]
    engine = docker_engine.require_engine()
    try:
        labels = engine.api.inspect_network(network)["Labels"]
    finally:
        engine.close()
    assert labels[runtime.LABEL_CLUSTER] == "render" and labels["comfyhub.test"] == settings.CONTAINER_EXTRA_LABELS[
        "comfyhub.test"]

    # The master's file, as its ComfyUI-Distributed serves it: both workers enabled now that they run.
    served = get_json(f"{master.url}distributed/config")
    check_shape(served)
    assert [(w["id"], w["enabled"]) for w in served["workers"]] == [("render-w1", True), ("render-w2", True)]
    # From inside the master's container, at the addresses in its file.
    probe = succeeded(clusters.cluster_probe(cluster=cluster, user=operator), run_worker)
    assert probe.result == {
        w.instance_id: {"url": f"http://{w.container_name}:8188/system_stats", "ok": True, "detail": "HTTP 200"}
        for w in (w1, w2)}
    assert clusters.last_probe(cluster).pk == probe.pk
    assert {k: v["ok"] for k, v in get_json(f"{master.url}distributed/reach").items()} == {
        "render-w1": True, "render-w2": True}

    stop = succeeded(clusters.cluster_stop(cluster=cluster, user=operator), run_worker)
    finished_at = {i.instance_id: container(i)["State"]["FinishedAt"] for i in (master, w1, w2)}
    assert finished_at["render-w1"] < finished_at["render-w2"] < finished_at["render-master"]
    assert stop.log.index("stopping worker render-w2") < stop.log.index("stopping master render-master")
    assert [w["enabled"] for w in written(master)["workers"]] == [False, False]


@pytest.mark.docker
def test_a_stopped_worker_is_disabled_within_one_reconcile_and_a_setting_from_the_nodes_ui_survives_a_sync(
        distributed, template, operator, run_worker):
    cluster, master, w1, w2 = made_cluster_and_members(template, operator, run_worker)
    succeeded(clusters.cluster_start(cluster=cluster, user=operator), run_worker)

    # Stopped behind ComfyHub's back: the next reconcile of its node sees it and rewrites the master's file.
    engine = docker_engine.require_engine()
    try:
        docker_engine.stop_container(engine, w2.container_name, timeout=5)
    finally:
        engine.close()
    health.reconcile_node(master.node)
    assert [(w["id"], w["enabled"]) for w in written(master)["workers"]] == [("render-w1", True),
                                                                             ("render-w2", False)]
    assert get_json(f"{master.url}distributed/config")["workers"][1]["enabled"] is False

    # What the node's UI writes: a setting changed, a key ComfyHub does not know, a tunnel (not kept).
    edited = written(master)
    edited["settings"].update({"debug": True, "worker_timeout_seconds": 123, "auto_launch_workers": True})
    edited["tunnel"] = {"status": "stopped", "public_url": ""}
    edited["ui_only"] = {"kept": 1}
    config_file(master).write_text(json.dumps(edited))

    succeeded(clusters.cluster_sync(cluster=cluster, user=operator), run_worker)

    after = written(master)
    check_shape(after)
    assert after["settings"]["debug"] is True and after["settings"]["worker_timeout_seconds"] == 123
    assert after["settings"]["auto_launch_workers"] is False  # ComfyHub runs the workers
    assert "tunnel" not in after and after["ui_only"] == {"kept": 1}
    cluster.refresh_from_db()
    assert cluster.synced_at is not None and cluster.sync_detail == ""

    # Unchanged on a reconcile when nothing changed: the file is not rewritten.
    before = os.stat(config_file(master)).st_ino
    health.reconcile_node(master.node)
    assert os.stat(config_file(master)).st_ino == before


@pytest.mark.docker
def test_removing_a_worker_and_deleting_the_cluster_leave_plain_instances_with_empty_worker_lists(
        distributed, template, operator, run_worker):
    cluster, master, w1, w2 = made_cluster_and_members(template, operator, run_worker)

    succeeded(clusters.cluster_remove_worker(cluster=cluster, instance=w2, user=operator), run_worker)
    assert [w["id"] for w in written(master)["workers"]] == ["render-w1"]
    assert clusters.membership(w2) is None and clusters.deletion_problem(w2) is None

    succeeded(clusters.cluster_delete(cluster=cluster, user=operator), run_worker)
    assert not Cluster.objects.exists()
    assert written(master)["workers"] == [] and written(w1)["workers"] == []
    check_shape(written(master))


@pytest.mark.docker
def test_an_adopted_instance_with_another_commit_of_the_node_is_moved_to_the_pinned_one(
        distributed, comfyui_double_image, operator, run_worker):
    from instances import customnodes

    master = plain("adopted", gpus=[0], image=comfyui_double_image)
    succeeded(services.instance_build(instance=master), run_worker)
    customnodes.install(master, distributed.url, distributed.other, name="ComfyUI-Distributed")

    clusters.cluster_create(name="render", user=operator, master=master)
    prepare = Operation.objects.get(kind="cluster_member_prepare")
    succeeded(prepare, run_worker)

    assert CustomNode.objects.get(instance=master, name="ComfyUI-Distributed").commit == distributed.pinned
    check_shape(written(master))


# --- A hostile member's folder ----------------------------------------------------------------------------------

@pytest.mark.docker
def test_a_link_or_fifo_planted_at_gpu_config_json_from_inside_the_container_is_replaced_never_followed(
        distributed, template, operator, run_worker, canary):
    cluster = made_cluster(template, operator, run_worker)
    succeeded(clusters.cluster_start(cluster=cluster, user=operator), run_worker)
    master = cluster.master
    target = canary / "secret.txt"
    before = target.read_bytes()
    inside = f"/instance/{clusters.CONFIG_RELPATH}"

    engine = docker_engine.require_engine()
    try:
        planted = docker_engine.exec_in(engine, master.container_name, ["sh", "-c", f"rm -f {inside} && ln -s "
                                                                                    f"{target} {inside}"])
        assert planted.exit_code == 0, planted.output
        assert config_file(master).is_symlink()
        succeeded(clusters.cluster_sync(cluster=cluster, user=operator), run_worker)
        assert not config_file(master).is_symlink() and target.read_bytes() == before
        check_shape(written(master))

        planted = docker_engine.exec_in(engine, master.container_name, ["sh", "-c", f"rm -f {inside} && mkfifo "
                                                                                    f"{inside}"])
        assert planted.exit_code == 0, planted.output
        health.reconcile_node(master.node)  # would hang on a fifo opened for reading
        check_shape(written(master))

        folder = f"/instance/custom_nodes/{clusters.DISTRIBUTED_FOLDER}"
        planted = docker_engine.exec_in(engine, master.container_name, [
            "sh", "-c", f"mv {folder} {folder}.real && ln -s {canary} {folder}"])
        assert planted.exit_code == 0, planted.output
        sync = clusters.cluster_sync(cluster=cluster, user=operator)
        run_worker()
        sync.refresh_from_db()
        assert sync.status == Operation.Status.FAILED and "link" in sync.error
    finally:
        engine.close()
    assert target.read_bytes() == before and not (canary / clusters.CONFIG_NAME).exists()


# --- A worker on a second node ----------------------------------------------------------------------------------

@pytest.mark.docker
def test_a_worker_on_node_b_gets_node_addresses_both_ways_and_the_master_reaches_it(
        distributed, template, operator, run_worker, tmp_path, docker_engine, second_docker_engine, settings):
    from tests.support.engine import SECOND_BRIDGE_ADDRESS
    from tests.test_moves import node_b, start_agent

    settings.NODE_HEARTBEAT_SECONDS = 3
    # Addresses each node's containers can reach the other's published ports at: local's on its engine's bridge
    # gateway, B's on its own bridge's address (both are this machine's, as two hosts' LAN addresses would be).
    gateway = docker_engine.api.inspect_network("bridge")["IPAM"]["Config"][0]["Gateway"]
    b_address = str(SECOND_BRIDGE_ADDRESS.ip)
    local = services.local_node()
    Node.objects.filter(pk=local.pk).update(bind_address=gateway)
    local.refresh_from_db()
    node = node_b(second_docker_engine, tmp_path / "node-b")
    agent = start_agent(tmp_path, second_docker_engine, NODE_ADDRESS=b_address)
    try:
        node.refresh_from_db()
        assert node.bind_address == b_address
        cluster = clusters.cluster_create(name="far", user=operator, template=template,
                                          new_members=[(local, [0]), (local, [1]), (node, [0])])
        run_worker()
        from tests.conftest import wait_for

        wait_for(lambda: not Operation.objects.filter(kind="cluster_member_prepare",
                                                      status__in=Operation.ACTIVE_STATUSES).exists(),
                 timeout=120, message="every member prepared")
        for operation in Operation.objects.filter(kind="cluster_member_prepare"):
            assert operation.status == Operation.Status.SUCCEEDED, operation.error + operation.log
        master = Instance.objects.get(instance_id="far-master")
        near, remote = Instance.objects.get(instance_id="far-w1"), Instance.objects.get(instance_id="far-w2")
        assert remote.node == node

        master_file = written(master)
        check_shape(master_file)
        assert (master_file["master"]["host"], master_file["master"]["port"]) == (gateway, master.host_port)
        assert [(w["id"], w["host"], w["port"]) for w in master_file["workers"]] == [
            ("far-w1", near.container_name, 8188), ("far-w2", b_address, remote.host_port)]
        remote_file = written(remote)
        check_shape(remote_file)
        assert (remote_file["master"]["host"], remote_file["master"]["port"]) == (gateway, master.host_port)
        assert written(near)["master"]["host"] == master.container_name

        start = clusters.cluster_start(cluster=cluster, user=operator)
        succeeded(start, run_worker)
        assert start.log.index("far-w2 is healthy") < start.log.index("starting master far-master")
        b_started = second_docker_engine.client.api.inspect_container(remote.container_name)["State"]["StartedAt"]
        assert b_started < container(master)["State"]["StartedAt"]

        probe = succeeded(clusters.cluster_probe(cluster=cluster, user=operator), run_worker)
        assert {k: (v["url"], v["ok"]) for k, v in probe.result.items()} == {
            "far-w1": (f"http://{near.container_name}:8188/system_stats", True),
            "far-w2": (f"http://{b_address}:{remote.host_port}/system_stats", True)}, probe.result
        # And the worker on B reaches the master back at the address its own file gives.
        from instances import probes

        [back] = probes.reach_from_inside(remote, [f"http://{gateway}:{master.host_port}/system_stats"])
        assert back.ok, back.detail

        # B's worker stopped behind ComfyHub's back: B's reconcile records it, the master's node's next one writes
        # it into the master's file.
        second_docker_engine.client.api.stop(remote.container_name, timeout=5)
        health.reconcile_node(node)
        health.reconcile_node(local)
        assert [(w["id"], w["enabled"]) for w in written(master)["workers"]] == [("far-w1", True), ("far-w2", False)]

        succeeded(clusters.cluster_stop(cluster=cluster, user=operator), run_worker)
        b_finished = second_docker_engine.client.api.inspect_container(remote.container_name)["State"]["FinishedAt"]
        assert b_finished < container(master)["State"]["FinishedAt"]
    finally:
        agent.stop()


# --- manage.py clusters -----------------------------------------------------------------------------------------

def test_the_command_makes_a_cluster_of_existing_instances_lists_and_shows_it(settings):
    from tests.support.cli import run

    plain("m", gpus=[0]), plain("w", gpus=[1])
    made = run("clusters", "create", "render", "--master", "m", "--worker", "w", "--cors-origin", "*")
    assert made.code == 0, made.err
    assert "Cluster render: master m, workers w." in made.out

    listed = run("clusters", "list")
    assert listed.out.splitlines()[1].split() == ["render", "m", "w", "*", "never"]
    shown = json.loads(run("clusters", "show", "render", "--json").out)
    assert shown["members"] == [
        {"instance": "m", "role": "master", "node": "local", "status": "new", "enabled": False,
         "url_from_master": None},
        {"instance": "w", "role": "worker", "node": "local", "status": "new", "enabled": False,
         "url_from_master": f"http://{settings.CONTAINER_NAME_PREFIX}w:8188"}]
    assert shown["cors_origin"] == "*" and shown["last_probe"] is None


def test_the_command_refuses_bad_input_with_exit_2_and_the_services_words():
    from tests.support.cli import run

    plain("m", gpus=[0])
    InstanceTemplate.objects.create(name="cl", image="img:1")
    assert run("clusters", "show", "nope").err == "No cluster 'nope'. Known: none"
    taken = run("clusters", "create", "render", "--template", "cl", "--gpus", "local:0")
    assert taken.code == 2
    assert "new_members: Node local: GPU 0 is held exclusively by instance 'm'" in taken.err
    no_gpus = run("clusters", "create", "render", "--template", "cl", "--gpus", "local:")
    assert no_gpus.code == 2 and "gpus: 'local:': give the GPU indexes of the new member" in no_gpus.err
    both = run("clusters", "create", "render", "--master", "m", "--worker", "m")
    assert both.code == 2 and "master: 'm' cannot be the master and a worker of the same cluster" in both.err
    clusters.cluster_create(name="render", master=Instance.objects.get(instance_id="m"))
    unconfirmed = run("clusters", "delete", "render")
    assert unconfirmed.code == 2 and "add --yes to confirm" in unconfirmed.err
    assert Cluster.objects.filter(name="render").exists()


def test_a_member_without_the_node_yet_gets_no_folder_made_for_it_by_a_sync():
    master = plain("m")
    layout.build_instance_tree("m")
    clusters.cluster_create(name="render", master=master)

    result = clusters.sync_member(master)

    assert result["written"] is False and result["failed"] is False and "not installed" in result["note"]
    assert not (layout.instance_dir("m") / "custom_nodes" / clusters.DISTRIBUTED_FOLDER).exists()


@pytest.mark.docker
def test_a_worker_that_does_not_start_ends_the_cluster_start_naming_it_before_the_master_starts(
        comfyui_double_image, docker_cleanup, operator, run_worker):
    master = plain("m", gpus=[0], image=comfyui_double_image)
    fine = plain("w1", gpus=[1], image=comfyui_double_image)
    broken = services.instance_create(instance_id="w2", image=comfyui_double_image, gpu_indexes=[2],
                                      extra_args=["--not-a-flag"])
    cluster = clusters.cluster_create(name="render", user=operator, master=master, workers=[fine, broken])
    Operation.objects.filter(kind="cluster_member_prepare").delete()  # no ComfyUI-Distributed needed here

    start = clusters.cluster_start(cluster=cluster, user=operator)
    run_worker()
    start.refresh_from_db()

    assert start.status == Operation.Status.FAILED
    # Docker may have restarted it before the start looked: then the exit code is gone, and the message says so.
    assert re.match(r"The worker w2 did not start: ComfyUI (exited with code 2|crashed \(Docker restarted it)",
                    start.error), start.error
    assert start.error.endswith("Started before it: w1; the rest was not started.")
    engine = docker_engine.require_engine()
    try:
        assert docker_engine.container_state(engine, master.container_name) is None
        assert docker_engine.container_state(engine, fine.container_name).running
    finally:
        engine.close()


def test_joining_a_cluster_is_a_configuration_change_a_restart_applies_and_the_network_is_not():
    master = plain("m", gpus=[0])
    before = runtime.container_spec(master).config_hash
    assert runtime.cluster_network(master) is None

    cluster = clusters.cluster_create(name="render", master=master)
    joined = runtime.container_spec(Instance.objects.get(pk=master.pk)).config_hash
    assert joined != before  # its command now ends with --enable-cors-header

    clusters.cluster_add_worker(cluster=cluster, instance=plain("w", gpus=[1]))
    master = Instance.objects.get(pk=master.pk)
    assert runtime.container_spec(master).config_hash == joined  # a worker joining changes only the network
    name, labels, aliases = runtime.cluster_network(master)
    assert name == runtime.cluster_network_name("render")
    assert labels[runtime.LABEL_CLUSTER] == "render" and labels[runtime.LABEL_MANAGED] == "true"
    assert aliases == [master.container_name, "m"]


def test_the_names_written_are_instance_ids_never_display_names_the_node_would_render_as_html():
    master = plain("m")
    worker = plain("w")
    Instance.objects.filter(pk__in=[master.pk, worker.pk]).update(display_name="<img src=x onerror=alert(1)>")
    cluster = clusters.cluster_create(name="render", master=Instance.objects.get(pk=master.pk),
                                      workers=[Instance.objects.get(pk=worker.pk)])

    for member in (cluster.master, Instance.objects.get(pk=worker.pk)):
        sections = clusters.desired_sections(cluster, member)
        assert "<img" not in json.dumps(sections)
    master_sections = clusters.desired_sections(cluster, cluster.master)
    assert master_sections["master"]["name"] == "m" and master_sections["workers"][0]["name"] == "w"
