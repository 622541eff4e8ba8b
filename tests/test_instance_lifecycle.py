"""Instances on the real engine: two containers on different GPUs, checked from outside (inspect and ComfyUI)."""
import io
import json
import urllib.request

import pytest
from django.conf import settings
from django.core.management import call_command
from django.urls import reverse

from comfyhub.models import Operation
from instances import containers, docker_engine, health, services
from instances.models import Instance
from storage_app import layout

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def image(comfyui_double_image, docker_cleanup):
    return comfyui_double_image


def run(operation, run_worker):
    run_worker()
    operation.refresh_from_db()
    return operation


def stats_of(instance):
    with urllib.request.urlopen(f"http://127.0.0.1:{instance.host_port}/system_stats", timeout=5) as response:
        return json.loads(response.read())


def test_two_instances_run_isolated_on_their_own_gpus(image, run_worker, docker_engine, admin_user, settings):
    alpha = services.instance_create(instance_id="alpha", image=image, gpu_indexes=[1], user=admin_user)
    beta = services.instance_create(instance_id="beta", image=image, gpu_indexes=[2, 3], extra_env={"TEAM": "b"})
    for instance in (alpha, beta):
        operation = run(services.instance_start(instance=instance, user=admin_user), run_worker)
        assert operation.status == Operation.Status.SUCCEEDED, operation.error + operation.log

    alpha_state = docker_engine_state(alpha)
    beta_state = docker_engine_state(beta)
    gpus = {g.index: g.device_id for g in alpha.node.gpus.all()}
    # Docker was asked for exactly the assigned GPUs, and passed exactly those into each container.
    assert alpha_state.device_ids == [gpus[1]]
    assert sorted(beta_state.device_ids) == sorted([gpus[2], gpus[3]])
    assert visible_devices(alpha) == gpus[1]
    assert sorted(visible_devices(beta).split(",")) == sorted([gpus[2], gpus[3]])
    # ComfyUI inside sees that many GPUs.
    assert len(stats_of(alpha)["devices"]) == 1
    assert len(stats_of(beta)["devices"]) == 2

    mounts = {m["destination"]: m for m in alpha_state.mounts}
    assert mounts["/shared"] == {"source": str(settings.COMFY_SHARED_PATH), "destination": "/shared", "rw": False}
    assert mounts["/instance"] == {"source": str(settings.COMFY_INSTANCES_PATH / "alpha"),
                                   "destination": "/instance", "rw": True}
    assert alpha_state.environment["COMFY_INSTANCE_ID"] == "alpha"
    assert alpha_state.environment["COMFY_SHARED_DIRECTORY"] == "/shared"
    assert alpha_state.environment["COMFY_BASE_DIRECTORY"] == "/instance"
    assert beta_state.environment["TEAM"] == "b"
    assert alpha_state.labels["comfyhub.managed"] == "true"
    assert alpha_state.labels["comfyhub.instance"] == "alpha"
    assert len(alpha_state.labels["comfyhub.config-hash"]) == 64
    assert alpha_state.host_ports == [("127.0.0.1", alpha.host_port)]
    assert alpha_state.name == f"{settings.CONTAINER_NAME_PREFIX}alpha"
    argv = stats_of(alpha)["system"]["argv"]
    assert argv[1:] == ["--listen", "0.0.0.0", "--port", "8188", "--base-directory", "/instance",
                        "--extra-model-paths-config", "/instance/extra_model_paths.yaml", "--disable-auto-launch"]

    health.reconcile_all()
    for instance in (alpha, beta):
        instance.refresh_from_db()
        assert instance.status == Instance.Status.HEALTHY, instance.status_detail
        assert all(check["ok"] for check in instance.health["checks"]), instance.health


def test_a_cpu_instance_gets_cpu_mode_and_no_gpu(image, run_worker):
    cpu = services.instance_create(instance_id="cpu-only", image=image)
    operation = run(services.instance_start(instance=cpu), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    state = docker_engine_state(cpu)
    assert state.device_ids == []
    assert state.environment["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert "--cpu" in stats_of(cpu)["system"]["argv"]
    assert stats_of(cpu)["devices"][0]["type"] == "cpu"


def test_the_shared_library_is_visible_and_read_only_inside(image, run_worker, settings):
    instance = services.instance_create(instance_id="reader", image=image)
    layout.build_shared_tree()
    (settings.COMFY_SHARED_PATH / "models" / "checkpoints" / "shared-model.safetensors").write_bytes(b"x")
    (settings.COMFY_SHARED_PATH / "input" / "shared-picture.png").write_bytes(b"png")
    assert run(services.instance_start(instance=instance), run_worker).status == Operation.Status.SUCCEEDED
    with urllib.request.urlopen(f"http://127.0.0.1:{instance.host_port}/models/checkpoints", timeout=5) as r:
        assert json.loads(r.read()) == ["shared-model.safetensors"]
    link = settings.COMFY_INSTANCES_PATH / "reader" / "input" / "shared-picture.png"
    assert link.is_symlink() and str(link.readlink()) == "/shared/input/shared-picture.png"
    engine = docker_engine.require_engine()
    result = engine.containers.get(instance.container_name).exec_run(["python3", "-c",
        "open('/shared/models/checkpoints/evil', 'w')"])
    assert result.exit_code != 0 and b"Read-only file system" in result.output


def test_two_starts_at_once_give_one_container(image, worker_process, run_worker):
    from tests.conftest import wait_for

    instance = services.instance_create(instance_id="twice", image=image)
    worker_process()
    worker_process()
    first = services.instance_start(instance=instance)
    second = services.instance_start(instance=instance)
    wait_for(lambda: all(Operation.objects.get(pk=o.pk).is_terminal for o in (first, second)), timeout=120,
             message="both starts to finish")
    assert {Operation.objects.get(pk=o.pk).status for o in (first, second)} == {Operation.Status.SUCCEEDED}
    engine = docker_engine.require_engine()
    assert len(engine.containers.list(all=True, filters={"label": "comfyhub.instance=twice"})) == 1


def test_a_changed_configuration_recreates_the_container_and_keeps_the_data(image, run_worker, settings):
    instance = services.instance_create(instance_id="changer", image=image)
    run(services.instance_start(instance=instance), run_worker)
    marker = settings.COMFY_INSTANCES_PATH / "changer" / "user" / "default" / "workflows" / "keep.json"
    marker.write_text("{}")
    old_id = docker_engine_state(instance).id
    services.instance_update(instance=instance, display_name="", description="", image=image,
                             extra_args=["--preview-method", "auto"], extra_env={}, host_port=None, gpu_indexes=[])
    assert services.instance_pending_changes(instance)
    operation = run(services.instance_restart(instance=instance), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert "recreating it" in operation.log
    assert docker_engine_state(instance).id != old_id
    assert "--preview-method" in stats_of(instance)["system"]["argv"]
    assert marker.read_text() == "{}"
    instance.refresh_from_db()
    assert not services.instance_pending_changes(instance)


def test_a_rebuilt_image_tag_is_pending_and_the_restart_recreates_the_container_from_it(image, run_worker, client,
                                                                                        admin_user, docker_cleanup):
    from tests.support.docker_fixtures import session_label

    tag = f"{image.split(':')[0]}:rebuilt"

    def build(step):  # the same tag, another layer each time; labelled so the cleanup removes it
        dockerfile = f"FROM {image}\nLABEL comfyhub.test.step={step}\n".encode()
        built, _ = docker_cleanup.images.build(fileobj=io.BytesIO(dockerfile), tag=tag, labels=session_label(),
                                               rm=True)
        return built.id

    first = build(1)
    instance = services.instance_create(instance_id="rebuilt", image=tag)
    assert run(services.instance_start(instance=instance), run_worker).status == Operation.Status.SUCCEEDED
    marker = settings.COMFY_INSTANCES_PATH / "rebuilt" / "user" / "default" / "workflows" / "keep.json"
    marker.write_text("{}")
    old = docker_engine_state(instance)
    assert old.labels["comfyhub.image-id"] == first
    instance.refresh_from_db()
    assert not services.instance_pending_changes(instance)

    second = build(2)
    assert second != first
    assert services.instance_pending_change_kinds(instance) == {"image"}
    client.force_login(admin_user)
    content = client.get(reverse("instance-detail", args=["rebuilt"])).content.decode()
    assert 'data-testid="image-updated"' in content and "Image updated: restart to use it" in content
    assert 'data-testid="pending-changes"' not in content  # no other change is pending
    out = io.StringIO()
    call_command("instances", "status", "rebuilt", stdout=out)
    assert "(image updated: restart to apply)" in out.getvalue()

    operation = run(services.instance_restart(instance=instance), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert f"The image {tag} was updated since the container was made" in operation.log
    new = docker_engine_state(instance)
    assert new.id != old.id
    assert docker_cleanup.api.inspect_container(new.id)["Image"] == second
    assert new.labels["comfyhub.image-id"] == second
    assert marker.read_text() == "{}"
    instance.refresh_from_db()
    assert not services.instance_pending_changes(instance)


def test_stop_then_delete_keeps_the_data_unless_purged(image, run_worker, settings):
    keep = services.instance_create(instance_id="keeper", image=image)
    run(services.instance_start(instance=keep), run_worker)
    assert run(services.instance_stop(instance=keep), run_worker).status == Operation.Status.SUCCEEDED
    assert not docker_engine_state(keep).running
    assert run(services.instance_delete(instance=keep), run_worker).status == Operation.Status.SUCCEEDED
    assert not Instance.objects.filter(instance_id="keeper").exists()
    assert docker_engine_state(keep) is None
    assert (settings.COMFY_INSTANCES_PATH / "keeper" / "user").is_dir()

    gone = services.instance_create(instance_id="goner", image=image)
    run(services.instance_build(instance=gone), run_worker)
    (settings.COMFY_SHARED_PATH / "input" / "stays.png").write_bytes(b"png")
    with pytest.raises(services.ValidationError, match="type the instance id 'goner'"):
        services.instance_delete(instance=gone, purge_data=True, confirm="gone")
    operation = run(services.instance_delete(instance=gone, purge_data=True, confirm="goner"), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert not (settings.COMFY_INSTANCES_PATH / "goner").exists()
    assert (settings.COMFY_SHARED_PATH / "input" / "stays.png").exists()


def test_a_container_that_crashes_on_start_fails_the_start_with_its_logs(image, run_worker):
    crasher = services.instance_create(instance_id="crasher", image=image, extra_args=["--definitely-not-a-comfyui-flag"])
    operation = run(services.instance_start(instance=crasher), run_worker)
    assert operation.status == Operation.Status.FAILED
    assert "while starting" in operation.error
    assert "unrecognized arguments: --definitely-not-a-comfyui-flag" in operation.error
    crasher.refresh_from_db()
    assert crasher.status == Instance.Status.ERROR


@pytest.mark.parametrize("status, exit_code, restarts, oom, why", [
    ("running", 0, 0, False, None),
    ("created", 0, 0, False, None),
    ("exited", 3, 0, False, "exited with code 3"),
    ("exited", 137, 0, True, "exited with code 137 (out of memory)"),
    # Restarted by its policy: Docker reads 0 for a running container, so no exit code is claimed.
    ("running", 0, 1, False, "crashed (Docker restarted it once)"),
    ("restarting", 3, 4, False, "crashed (Docker restarted it 4 times)"),
])
def test_a_failed_start_is_described_by_what_docker_still_knows(status, exit_code, restarts, oom, why):
    state = docker_engine.ContainerState(id="c", name="n", status=status, exit_code=exit_code, restart_count=restarts,
                                         oom_killed=oom, error="", started_at="", finished_at="", labels={}, mounts=[],
                                         environment={}, host_ports=[], device_ids=[], image="")
    assert containers.start_failure(state) == why
    assert containers.start_failure(None) == "crashed (the container vanished)"


def test_a_missing_image_on_an_offline_host_is_a_clear_error(run_worker, docker_cleanup):
    offline = services.instance_create(instance_id="offline", image="registry.invalid/nobody/comfyui:1")
    operation = run(services.instance_start(instance=offline), run_worker)
    assert operation.status == Operation.Status.FAILED
    assert "Could not pull image registry.invalid/nobody/comfyui:1" in operation.error
    assert "If this host is offline" in operation.error


def test_an_instance_whose_image_is_no_longer_allowed_does_not_start(run_worker, settings, docker_cleanup):
    outdated = services.instance_create(instance_id="outdated", image="example/comfyui:1")
    settings.INSTANCE_IMAGES_ALLOWED = ["ghcr.io/comfyhub/comfyui:*"]
    operation = run(services.instance_start(instance=outdated), run_worker)
    assert operation.status == Operation.Status.FAILED
    assert "INSTANCE_IMAGES_ALLOWED permits 'ghcr.io/comfyhub/comfyui:*'" in operation.error
    assert "Nothing was started" in operation.error
    assert not layout.instance_dir("outdated").exists()  # refused before anything was built


def test_a_stopped_engine_fails_the_operation_and_leaves_the_registry_intact(image, run_worker, settings):
    instance = services.instance_create(instance_id="steady", image=image, gpu_indexes=[0])
    assert run(services.instance_build(instance=instance), run_worker).status == Operation.Status.SUCCEEDED
    settings.DOCKER_HOST = "unix:///nonexistent/docker.sock"
    operation = run(services.instance_start(instance=instance), run_worker)
    assert operation.status == Operation.Status.FAILED
    assert "unix:///nonexistent/docker.sock is unreachable" in operation.error
    operation = run(services.instance_delete(instance=instance), run_worker)
    assert operation.status == Operation.Status.FAILED
    assert "The instance was not deleted." in operation.error
    instance.refresh_from_db()
    assert [g.index for g in instance.assigned_gpus()] == [0]
    health.reconcile_all()
    instance.refresh_from_db()
    assert instance.status == Instance.Status.UNKNOWN


def visible_devices(instance):
    """The host GPU ids ComfyUI's process saw in NVIDIA_VISIBLE_DEVICES (Docker sets it from the device request;
    the test double names each device after it)."""
    names = [d["name"] for d in stats_of(instance)["devices"]]
    return ",".join(name.split("host GPU ")[1].split(" :")[0] for name in names)


def docker_engine_state(instance):
    engine = docker_engine.require_engine()
    try:
        return docker_engine.container_state(engine, instance.container_name)
    finally:
        engine.close()


def test_the_node_types_an_instance_offers_are_remembered_by_the_health_checks_and_when_it_stops(image, run_worker,
                                                                                                  storage):
    instance = services.instance_create(instance_id="remembers", image=image)
    (storage["instances"] / "remembers" / "custom_nodes" / "MyPack").mkdir(parents=True)
    assert run(services.instance_start(instance=instance), run_worker).status == Operation.Status.SUCCEEDED
    instance.refresh_from_db()
    assert instance.node_types == []  # the start does not wait for /object_info

    health.reconcile_all()  # it answers and nothing is remembered yet: asked once
    instance.refresh_from_db()
    assert {"KSampler", "CheckpointLoaderSimple", "MyPack"} <= set(instance.node_types)

    Instance.objects.filter(pk=instance.pk).update(node_types=["Forgotten"])
    health.reconcile_all()  # something is remembered: the health checks do not ask again
    instance.refresh_from_db()
    assert instance.node_types == ["Forgotten"]

    assert run(services.instance_stop(instance=instance), run_worker).status == Operation.Status.SUCCEEDED
    instance.refresh_from_db()
    assert "KSampler" in instance.node_types and "Forgotten" not in instance.node_types
