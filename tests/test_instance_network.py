"""Instances on one node cannot reach each other inside Docker: each is on its node's bridge of ComfyHub's own, where
containers do not talk to each other. ComfyUI has no login, so this is what keeps one instance's code away from
another's ComfyUI behind the hub's back (docs/security.md)."""
import pytest

from comfyhub.models import Operation
from instances import probes, runtime, services
from tests.support.running import started

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]


def address_on(engine, container_name, network):
    engine_container = engine.containers.get(container_name)
    return engine_container.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]


def test_one_instance_cannot_reach_anothers_comfyui_at_its_container_address(
        comfyui_double_image, docker_cleanup, docker_engine, run_worker):
    alpha = started(services.instance_create(instance_id="alpha", image=comfyui_double_image), run_worker)
    beta = started(services.instance_create(instance_id="beta", image=comfyui_double_image), run_worker)
    network, _ = runtime.instances_network(alpha.node.name)

    attrs = docker_engine.networks.get(network).attrs
    assert attrs["Options"]["com.docker.network.bridge.enable_icc"] == "false"
    assert set(docker_engine.containers.get(alpha.container_name).attrs["NetworkSettings"]["Networks"]) == {network}
    beta_inside = f"http://{address_on(docker_engine, beta.container_name, network)}:8188/system_stats"
    own = "http://127.0.0.1:8188/system_stats"

    found = {reach.url: reach for reach in probes.reach_from_inside(alpha, [beta_inside, own], timeout=2)}

    assert found[own].ok  # the probe works from inside alpha: beta's silence is the network's doing
    assert not found[beta_inside].ok, found[beta_inside]


def test_a_network_of_that_name_without_the_isolation_is_refused_not_used(
        comfyui_double_image, docker_cleanup, docker_engine, run_worker):
    gamma = services.instance_create(instance_id="gamma", image=comfyui_double_image)
    network, labels = runtime.instances_network(gamma.node.name)
    docker_engine.networks.create(network, labels=labels)  # ComfyHub's labels, but containers may talk there

    operation = services.instance_start(instance=gamma)
    run_worker()
    operation.refresh_from_db()

    assert operation.status == Operation.Status.FAILED
    assert f"The Docker network {network} lacks the options ComfyHub makes it with" in operation.error
    assert f"docker network rm {network}" in operation.error
