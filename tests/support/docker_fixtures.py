"""pytest plugin: a real Docker engine, the ComfyUI test images, and cleanup of what tests create.

Load it with `pytest_plugins = ["tests.support.docker_fixtures"]` in tests/conftest.py.
Every container, network and image a test creates must carry the label TEST_LABEL ("comfyhub.test"); docker_cleanup
removes them after the test. Set COMFYHUB_TEST_KEEP_DOCKERD=1 to leave a dockerd started by the tests running.
Tests of several GPU hosts ask for second_docker_engine: another engine on this machine, started when first asked for.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

import docker
import docker.errors
import pytest

from tests.support.engine import EngineHandle, SecondEngine, ensure_engine, ensure_second_engine
from tests.support.images import (BASE_TAG, CACHED_TAGS, CLIARGS_TAG, DOUBLE_TAG, TEST_LABEL, copy_test_images,
                                   ensure_test_images)

__all__ = ["TEST_LABEL", "DOUBLE_TAG", "CLIARGS_TAG", "wait_for_http", "published_port", "remove_test_objects", "session_label"]


@pytest.fixture(scope="session")
def docker_engine_handle() -> EngineHandle:
    handle = ensure_engine()
    yield handle
    # Image builds in tests (the test images, `images build`) leave untagged stages behind, labelled comfyhub.test
    # through their base: drop those no container uses, so they do not pile up from session to session.
    try:
        handle.client.images.prune(filters={"dangling": True, "label": TEST_LABEL})
    except docker.errors.APIError:
        pass  # a prune already running (409) does it
    if handle.started_here and not os.environ.get("COMFYHUB_TEST_KEEP_DOCKERD"):
        handle.stop()
    else:
        handle.client.close()
        handle.release()


# The session's engine clients once some test asked for them: every test after that gets its containers removed.
_session_client: docker.DockerClient | None = None
_second_session_client: docker.DockerClient | None = None


@pytest.fixture(scope="session")
def docker_engine(docker_engine_handle: EngineHandle) -> docker.DockerClient:
    """A DockerClient on a real engine (started for the session if none answered)."""
    global _session_client
    _session_client = docker_engine_handle.client
    return docker_engine_handle.client


@pytest.fixture(autouse=True)
def _no_container_outlives_its_test():
    """Containers a test made (ComfyHub's own included: they carry this session's label) are removed after it,
    whether or not the test asked for docker_cleanup, so no port or GPU stays taken for the next test."""
    yield
    for client in (_session_client, _second_session_client):
        if client is not None:
            remove_test_objects(client)


@pytest.fixture(scope="session")
def second_docker_engine(docker_engine: docker.DockerClient, comfyui_double_image: str) -> SecondEngine:
    """A second Docker engine on this machine, as another GPU host would have: its own socket (.docker_host,
    "unix://…"), data root, bridge and subnet, its ports published on .publish_address (127.0.0.2), GPU device
    requests accepted, the test images loaded from the first engine. Started for the session when first asked for
    (or reused); stopped at the end, bridge and data root with it, unless another session still uses it or
    COMFYHUB_TEST_KEEP_DOCKERD=1."""
    global _second_session_client
    started = time.monotonic()
    engine = ensure_second_engine(docker_engine)
    ready = time.monotonic()
    try:
        copied = copy_test_images(docker_engine, engine.client)
    except BaseException:
        _put_away(engine)
        raise
    print(f"\n[comfyhub tests] second Docker engine {'started' if engine.started_here else 'reused'} in "
          f"{ready - started:.1f} s; {len(copied)} test images loaded into it in {time.monotonic() - ready:.1f} s",
          flush=True)
    _second_session_client = engine.client
    yield engine
    _second_session_client = None
    try:
        remove_test_objects(engine.client)
        engine.client.images.prune(filters={"dangling": True, "label": TEST_LABEL})
    except docker.errors.APIError:
        pass  # a prune already running (409) does it; stopping the engine removes the rest
    finally:
        _put_away(engine)


def _put_away(engine: SecondEngine) -> None:
    if os.environ.get("COMFYHUB_TEST_KEEP_DOCKERD"):
        engine.client.close()
        engine.release()
    else:
        engine.stop()


@pytest.fixture(scope="session")
def comfyui_double_image(docker_engine: docker.DockerClient) -> str:
    """The tag of the ComfyUI test double image, built now if missing or stale."""
    return ensure_test_images(docker_engine)["comfyui_double"]


@pytest.fixture(scope="session")
def cliargs_image(docker_engine: docker.DockerClient) -> str:
    """The tag of the stand-in for images that read ComfyUI's arguments from $CLI_ARGS (the double image with the
    entrypoint `sh -c 'exec python3 /opt/comfyui/main.py $CLI_ARGS'` and no comfyhub.image.arguments label), built
    now if missing or stale."""
    return ensure_test_images(docker_engine)["comfyui_cliargs"]


@pytest.fixture
def node_git(settings, monkeypatch, docker_engine: docker.DockerClient) -> str:
    """Custom nodes from the tests' own repositories (file:// URLs): git runs in the test base image, and local
    sources are allowed, in this process and in the worker processes the test starts."""
    ensure_test_images(docker_engine)
    settings.CUSTOM_NODE_GIT_IMAGE = BASE_TAG
    settings.CUSTOM_NODE_LOCAL_SOURCES = True
    monkeypatch.setenv("CUSTOM_NODE_GIT_IMAGE", BASE_TAG)
    monkeypatch.setenv("CUSTOM_NODE_LOCAL_SOURCES", "true")
    return BASE_TAG


@pytest.fixture
def docker_cleanup(docker_engine: docker.DockerClient) -> docker.DockerClient:
    """After the test, force-remove every container, network and (non-cached) image labelled comfyhub.test."""
    yield docker_engine
    remove_test_objects(docker_engine)


def session_label() -> dict:
    """The label (key and this session's value) every container a test creates must carry."""
    return {TEST_LABEL: os.environ.get("COMFYHUB_TEST_SESSION", "1")}


def remove_test_objects(client: docker.DockerClient) -> None:
    label_filter = {"label": f"{TEST_LABEL}={session_label()[TEST_LABEL]}"}
    for container in client.containers.list(all=True, filters=label_filter):
        _ignore_missing(container.remove, force=True, v=True)
    for network in client.networks.list(filters=label_filter):
        _ignore_missing(network.remove)
    cached_ids = set()
    for tag in CACHED_TAGS:
        try:
            cached_ids.add(client.images.get(tag).id)
        except docker.errors.ImageNotFound:
            pass
    for image in client.images.list(filters=label_filter):
        if image.id not in cached_ids:
            _ignore_missing(client.images.remove, image.id, force=True)


def _ignore_missing(action, *args, **kwargs) -> None:
    try:
        action(*args, **kwargs)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as error:
        # A removal already in progress (409) finishes by itself.
        if error.status_code != 409:
            raise


def published_port(container, container_port: str = "8188/tcp", timeout: float = 10.0) -> int:
    """The host port Docker published container_port on (for ports={...: ("127.0.0.1", None)})."""
    deadline = time.monotonic() + timeout
    while True:
        container.reload()
        bindings = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get(container_port)
        if bindings:
            return int(bindings[0]["HostPort"])
        if container.status in ("exited", "dead") or time.monotonic() > deadline:
            raise AssertionError(
                f"container {container.name} has no published {container_port} (status {container.status}); "
                f"logs:\n{container.logs().decode(errors='replace')[-3000:]}"
            )
        time.sleep(0.1)


def wait_for_http(url: str, timeout: float = 30.0, container=None) -> bytes:
    """Poll url until it answers 200 and return the body. With container, fail at once if it exits, showing its logs."""
    deadline = time.monotonic() + timeout
    last_error: Exception | str = "no attempt"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
            last_error = error
        if container is not None:
            container.reload()
            if container.status in ("exited", "dead"):
                raise AssertionError(
                    f"container {container.name} exited ({container.attrs['State'].get('ExitCode')}) before {url} "
                    f"answered; logs:\n{container.logs().decode(errors='replace')[-3000:]}"
                )
        time.sleep(0.2)
    logs = ""
    if container is not None:
        logs = "; logs:\n" + container.logs().decode(errors="replace")[-3000:]
    raise TimeoutError(f"{url} did not answer 200 within {timeout:g} s (last error: {last_error}){logs}")
