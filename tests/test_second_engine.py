"""The second Docker engine the harness runs beside the first: another GPU host's engine on this machine.

Each test starts the ComfyUI test double with a GPU device request, on one engine or on both, and looks at it through
each engine's own socket and published address.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import docker
import pytest

from tests.support.docker_fixtures import session_label, wait_for_http
from tests.support.engine import EngineUnavailable, _check_subnet_is_free
from tests.support.images import CACHED_TAGS

pytestmark = pytest.mark.docker

COMMAND = ["--listen", "0.0.0.0", "--port", "8188", "--base-directory", "/instance", "--disable-auto-launch"]


def start_double(client: docker.DockerClient, image: str, folder: Path, *, gpu: str, address: str | None = None,
                 port: int | None = None):
    """The double as ComfyHub runs ComfyUI, holding host GPU `gpu`, port 8188 published on address:port (the
    engine's default address and a free port when not given). Returns the container and its published address."""
    folder.mkdir()
    os.chown(folder, 1000, 1000)  # the image runs as 1000:1000 and writes /instance/home
    binding = None if address is None else (address, port)
    container = client.containers.run(
        image, command=COMMAND, detach=True, labels=session_label(),
        ports={"8188/tcp": binding},
        volumes={str(folder): {"bind": "/instance", "mode": "rw"}},
        device_requests=[docker.types.DeviceRequest(device_ids=[gpu], capabilities=[["gpu"]])],
    )
    container.reload()
    [published] = container.attrs["NetworkSettings"]["Ports"]["8188/tcp"]
    host, host_port = published["HostIp"], int(published["HostPort"])
    wait_for_http(f"http://{host}:{host_port}/system_stats", container=container)
    return container, host, host_port


def system_stats(host: str, port: int) -> dict:
    return json.loads(wait_for_http(f"http://{host}:{port}/system_stats"))


def listed_ids(client: docker.DockerClient) -> set[str]:
    return {container.id for container in client.containers.list(all=True, filters={"label": "comfyhub.test"})}


def test_a_container_started_on_the_second_engine_is_listed_through_its_socket_and_not_the_first(
        docker_engine, second_docker_engine, comfyui_double_image, tmp_path):
    container, _, _ = start_double(second_docker_engine.client, comfyui_double_image, tmp_path / "b", gpu="1")

    through_its_socket = docker.DockerClient(base_url=second_docker_engine.docker_host)
    try:
        assert container.id in listed_ids(through_its_socket)
    finally:
        through_its_socket.close()
    assert container.id not in listed_ids(docker_engine)
    with pytest.raises(docker.errors.NotFound):
        docker_engine.containers.get(container.id)


def test_a_container_started_on_the_first_engine_is_not_listed_on_the_second(
        docker_engine, second_docker_engine, comfyui_double_image, tmp_path):
    container, _, _ = start_double(docker_engine, comfyui_double_image, tmp_path / "a", gpu="0",
                                   address="127.0.0.1")

    assert container.id in listed_ids(docker_engine)
    assert container.id not in listed_ids(second_docker_engine.client)
    with pytest.raises(docker.errors.NotFound):
        second_docker_engine.client.containers.get(container.id)


def test_the_double_on_the_second_engine_answers_on_its_publish_address_with_the_requested_gpu(
        second_docker_engine, comfyui_double_image, tmp_path):
    container, host, port = start_double(second_docker_engine.client, comfyui_double_image, tmp_path / "b", gpu="2")

    # Published without an address, the port lands on the engine's own one, as on another host.
    assert host == second_docker_engine.publish_address == "127.0.0.2"
    stats = system_stats(host, port)
    assert [device["name"] for device in stats["devices"]] == ["cuda:0 host GPU 2 : test double"]
    # Docker puts the request into the container's main process only (an exec does not get it).
    assert b"NVIDIA_VISIBLE_DEVICES=2" in container.exec_run(["cat", "/proc/1/environ"]).output.split(b"\0")


def test_the_same_port_reaches_each_engine_own_container_on_its_own_address(
        docker_engine, second_docker_engine, comfyui_double_image, tmp_path):
    _, _, port = start_double(docker_engine, comfyui_double_image, tmp_path / "a", gpu="0", address="127.0.0.1")
    start_double(second_docker_engine.client, comfyui_double_image, tmp_path / "b", gpu="3",
                 address=second_docker_engine.publish_address, port=port)

    assert system_stats("127.0.0.1", port)["devices"][0]["name"] == "cuda:0 host GPU 0 : test double"
    assert system_stats("127.0.0.2", port)["devices"][0]["name"] == "cuda:0 host GPU 3 : test double"


def test_the_second_engine_has_its_own_bridge_subnet_and_data_root(
        docker_engine, second_docker_engine, comfyui_double_image, tmp_path):
    first, second = docker_engine, second_docker_engine.client
    first_bridge, second_bridge = first.networks.get("bridge"), second.networks.get("bridge")
    second_subnet = ipaddress.ip_network(second_bridge.attrs["IPAM"]["Config"][0]["Subnet"])
    first_subnet = ipaddress.ip_network(first_bridge.attrs["IPAM"]["Config"][0]["Subnet"])

    assert second_bridge.attrs["Options"]["com.docker.network.bridge.name"] == second_docker_engine.bridge
    assert first_bridge.attrs["Options"]["com.docker.network.bridge.name"] != second_docker_engine.bridge
    assert Path("/sys/class/net", second_docker_engine.bridge, "bridge").is_dir()
    assert second_subnet == second_docker_engine.subnet
    assert not second_subnet.overlaps(first_subnet)
    container, _, _ = start_double(second, comfyui_double_image, tmp_path / "b", gpu="1")
    assert ipaddress.ip_address(container.attrs["NetworkSettings"]["IPAddress"]) in second_subnet

    assert second.info()["DockerRootDir"] == str(second_docker_engine.data_root)
    assert second.info()["DockerRootDir"] != first.info()["DockerRootDir"]
    assert "comfyhub.test.engine=second" in second.info()["Labels"]


def test_the_second_engine_holds_the_same_test_images_as_the_first(docker_engine, second_docker_engine):
    for tag in CACHED_TAGS:
        assert second_docker_engine.client.images.get(tag).id == docker_engine.images.get(tag).id


def test_it_refuses_a_subnet_another_interface_of_the_machine_already_routes(docker_engine, second_docker_engine):
    first_bridge = docker_engine.networks.get("bridge")
    first_subnet = ipaddress.ip_network(first_bridge.attrs["IPAM"]["Config"][0]["Subnet"])
    inside_it = next(first_subnet.subnets(new_prefix=24))

    with pytest.raises(EngineUnavailable, match=rf"overlaps {first_subnet}, routed on "
                                                 rf"{first_bridge.attrs['Options']['com.docker.network.bridge.name']}"):
        _check_subnet_is_free(second_docker_engine.bridge, inside_it)
    _check_subnet_is_free(second_docker_engine.bridge, second_docker_engine.subnet)  # its own route is no clash
