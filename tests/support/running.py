"""Instances of the ComfyUI test double running on the test engine, for the tests of what the hub sees of running
instances (tests/test_health.py, tests/test_idle_stop.py, tests/test_probes.py). Import the fixtures by name into the
test module: `from tests.support.running import engine, image  # noqa: F401 - fixtures`."""
import dataclasses
import json
import urllib.request

import pytest

from comfyhub.models import Operation
from instances import docker_engine, health, runtime, services
from instances.docker_engine import require_engine
from instances.models import Instance
from storage_app import layout


@pytest.fixture
def image(comfyui_double_image, docker_cleanup):
    """The test double's image; the test's containers are removed after it."""
    return comfyui_double_image


@pytest.fixture
def engine(docker_engine):
    """ComfyHub's own client of the test engine (instances.docker_engine; the `docker_engine` fixture, which names
    the engine for the session, hides that module's name here)."""
    client = require_engine()
    yield client
    client.close()


def started(instance, drain):
    """Started through its operation, run by `drain` (a worker fixture)."""
    operation = services.instance_start(instance=instance)
    drain()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    instance.refresh_from_db()
    return instance


def reconciled(instance):
    """After one health pass."""
    health.reconcile_all()
    instance.refresh_from_db()
    return instance


def seen_healthy(instance):
    """After a health pass, which found it healthy."""
    instance = reconciled(instance)
    assert instance.status == Instance.Status.HEALTHY, instance.status_detail
    return instance


def run_by_hand(instance, engine, double_env: dict, **fields):
    """Its container made and started as a start makes it, plus the test double's own settings (`double_env`:
    COMFY_DOUBLE_*; an instance's own COMFY_* variables are refused, so they cannot come from extra_env); the registry
    says it is meant to run (and `fields`). Not a start: a health pass sees the container was made outside ComfyHub."""
    layout.build_shared_tree()
    layout.build_instance_tree(instance.instance_id)
    spec = runtime.container_spec(instance)
    docker_engine.create_container(engine, dataclasses.replace(spec, environment={**spec.environment, **double_env}))
    docker_engine.start_container(engine, instance.container_name)
    Instance.objects.filter(pk=instance.pk).update(desired_state=Instance.DesiredState.RUNNING, **fields)


def queue_prompts(instance, count):
    """`count` prompts queued on its ComfyUI, straight on its port."""
    body = json.dumps({"prompt": {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "queued"}}}}).encode()
    for _ in range(count):
        request = urllib.request.Request(f"http://127.0.0.1:{instance.host_port}/prompt", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
