"""ComfyUI-Distributed clusters (instances/clusters.py, instances/jobs_clusters.py): the refusals, the gpu_config.json
files ComfyHub writes and keeps in sync, the cluster's network, the start and stop order and the probe from inside the
master. Real Docker with the ComfyUI test double (it serves /distributed/config and /distributed/reach), real git for
ComfyUI-Distributed's stand-in (tests/support/distributed.py), real RQ workers, and a real agent for node B on the
second engine."""
import json
import os
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


def test_an_instance_in_a_cluster_cannot_be_deleted_until_it_leaves():
    cluster = clusters.cluster_create(name="render", master=plain("m"), workers=[plain("w")])
    assert "is the master of cluster 'render'" in clusters.deletion_problem(cluster.master)
    assert "clusters remove-worker render w" in clusters.deletion_problem(Instance.objects.get(instance_id="w"))
    assert clusters.deletion_problem(plain("alone")) is None


def test_gpu_instances_number_their_gpus_in_bus_order():
    spec = runtime.container_spec(plain("g", gpus=[3, 1]))
    assert spec.environment["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert spec.gpu_ids == [g.device_id for g in GPU.objects.filter(node__name="local", index__in=[1, 3])
                            .order_by("index")]
    assert "CUDA_DEVICE_ORDER" not in runtime.container_spec(plain("c")).environment


# --- What ComfyHub writes --------------------------------------------------------------------------------------

def test_a_merge_keeps_what_a_person_set_and_replaces_what_comfyhub_decides():
    existing = {"master": {"host": "old", "name": "x", "note": "mine"},
                "workers": [{"id": "w1", "host": "old", "colour": "red"}, {"id": "gone", "host": "h"}],
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
    assert merged["tunnel"] == {"status": "running"} and merged["future_key"] == [1]
