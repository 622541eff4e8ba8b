"""The periodic reconcile: observed status, health and isolation checks, from the real engine and ComfyUI."""
from datetime import timedelta

import pytest
from django.utils import timezone

from instances import docker_engine, health, services
from instances.models import Instance
from tests.conftest import wait_for
from tests.support.docker_fixtures import session_label
from tests.support.running import engine, image  # noqa: F401 - fixtures
from tests.support.running import queue_prompts, reconciled, run_by_hand, started

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]


def checks_of(instance):
    return {check["check"]: check for check in instance.health["checks"]}


def test_a_running_instance_is_healthy_with_every_isolation_check_passing(image, run_worker):
    instance = reconciled(started(services.instance_create(instance_id="fine", image=image, gpu_indexes=[0]),
                                  run_worker))
    assert instance.status == Instance.Status.HEALTHY
    assert set(checks_of(instance)) == {"shared storage is read-only", "instance storage is its own",
                                        "GPUs match the assignment", "no other container writes its folders",
                                        "its port is its own"}
    assert all(check["ok"] for check in instance.health["checks"])
    assert instance.health["devices"] == ["cuda:0 host GPU 0 : test double"]


def test_a_container_removed_behind_comfyhubs_back_is_an_error(image, run_worker, engine):
    instance = started(services.instance_create(instance_id="vanished", image=image), run_worker)
    docker_engine.remove_container(engine, instance.container_name)
    instance = reconciled(instance)
    assert instance.status == Instance.Status.ERROR
    assert "the container is missing" in instance.status_detail


def test_a_stopped_instance_reads_stopped(image, run_worker):
    instance = started(services.instance_create(instance_id="rest", image=image), run_worker)
    services.instance_stop(instance=instance)
    run_worker()
    assert reconciled(instance).status == Instance.Status.STOPPED


def test_a_crash_loop_backs_off_and_is_marked_not_restarted_forever(image, engine, settings):
    settings.INSTANCE_MAX_RESTARTS = 2
    instance = services.instance_create(instance_id="looper", image=image, extra_args=["--not-a-flag"])
    run_by_hand(instance, engine, {})
    # Docker restarts it with growing delays, then gives up after INSTANCE_MAX_RESTARTS.
    wait_for(lambda: (s := docker_engine.container_state(engine, instance.container_name)).status == "exited"
             and s.restart_count == 2, timeout=60, message="Docker to give up restarting")
    instance = reconciled(instance)
    assert instance.status == Instance.Status.CRASH_LOOPING
    assert "gave up after 2 restarts; last exit code 2" in instance.status_detail


def test_another_container_writing_an_instances_folder_fails_its_isolation(image, run_worker, engine, settings):
    instance = started(services.instance_create(instance_id="guarded", image=image), run_worker)
    engine.containers.run(image, ["--port", "8188"], detach=True, name="intruder", labels=session_label(),
                          mounts=[docker_engine.docker.types.Mount(
                              target="/elsewhere", source=str(settings.COMFY_INSTANCES_PATH / "guarded"),
                              type="bind")])
    instance = reconciled(instance)
    check = checks_of(instance)["no other container writes its folders"]
    assert not check["ok"]
    assert "intruder also writes" in check["detail"]
    assert instance.status == Instance.Status.UNHEALTHY


def test_the_gpu_check_compares_the_assignment_with_what_the_container_got(image, run_worker):
    instance = started(services.instance_create(instance_id="gpus", image=image, gpu_indexes=[1]), run_worker)
    # Reassign without restarting: the running container still has GPU 1.
    services.instance_update(instance=instance, display_name="", description="", image=image, extra_args=[],
                             extra_env={}, host_port=None, gpu_indexes=[2])
    instance = reconciled(instance)
    check = checks_of(instance)["GPUs match the assignment"]
    assert not check["ok"]
    assert "assigned 2; container got 1" in check["detail"]
    assert services.instance_pending_changes(instance)


def test_a_paused_instance_is_unhealthy(image, run_worker, engine):
    instance = started(services.instance_create(instance_id="paused", image=image), run_worker)
    engine.containers.get(instance.container_name).pause()
    try:
        instance = reconciled(instance)
        assert (instance.status, instance.status_detail) == (Instance.Status.UNHEALTHY, "the container is paused")
    finally:
        engine.containers.get(instance.container_name).unpause()


def test_a_silent_comfyui_is_starting_during_the_grace_period_then_unhealthy(image, engine, settings):
    instance = services.instance_create(instance_id="mute", image=image)
    run_by_hand(instance, engine, {"COMFY_DOUBLE_START_DELAY": "600"})
    assert reconciled(instance).status == Instance.Status.STARTING
    settings.INSTANCE_START_TIMEOUT = 0
    instance = reconciled(instance)
    assert instance.status == Instance.Status.UNHEALTHY
    # Made here by hand, not by a start: the reconcile also notices that.
    assert instance.status_detail == ("ComfyUI does not answer /system_stats; "
                                      "its container was changed outside ComfyHub")


GIB = 1024 ** 3


def test_the_pass_records_the_queue_and_the_memory_of_each_gpu(image, run_worker):
    instance = reconciled(started(services.instance_create(instance_id="metered", image=image, gpu_indexes=[1, 3]),
                                  run_worker))
    assert instance.health["queue"] == {"running": 0, "pending": 0}
    assert instance.health["vram"] == [
        {"name": "cuda:0 host GPU 1 : test double", "index": 0, "gpu": 1, "used": 0, "total": 24 * GIB},
        {"name": "cuda:1 host GPU 3 : test double", "index": 1, "gpu": 3, "used": 0, "total": 24 * GIB},
    ]
    assert instance.last_activity_at is None  # an empty queue is no activity


def test_work_in_the_queue_is_recorded_as_activity(image, engine):
    instance = services.instance_create(instance_id="busy", image=image, gpu_indexes=[1])
    run_by_hand(instance, engine, {"COMFY_DOUBLE_PROMPT_SECONDS": "300"})
    wait_for(lambda: health.system_stats(instance) is not None, timeout=30, message="ComfyUI to answer")
    queue_prompts(instance, 3)
    wait_for(lambda: (health.queue_of(instance) or {}).get("running") == 1, timeout=10,
             message="the first prompt to run")

    before = timezone.now()
    instance = reconciled(instance)
    assert instance.health["queue"] == {"running": 1, "pending": 2}
    assert before - timedelta(seconds=5) <= instance.last_activity_at <= timezone.now()

    # A request through the hub after the pass began is not undone by it.
    later = timezone.now() + timedelta(minutes=1)
    Instance.objects.filter(pk=instance.pk).update(last_activity_at=later)
    assert reconciled(instance).last_activity_at == later


def test_gpu_memory_is_read_defensively_from_what_comfyui_says(image):
    instance = services.instance_create(instance_id="reader", image=image, gpu_indexes=[1, 2])
    instance = services.instances_with_relations().get(pk=instance.pk)
    cuda = {"type": "cuda", "vram_total": 24 * GIB, "vram_free": 20 * GIB}
    stats = {"devices": [{**cuda, "name": "cuda:0 A", "index": 0}, {**cuda, "name": "cuda:1 B", "index": 1}]}
    assert health.vram_of(instance, stats) == [
        {"name": "cuda:0 A", "index": 0, "gpu": 1, "used": 4 * GIB, "total": 24 * GIB},
        {"name": "cuda:1 B", "index": 1, "gpu": 2, "used": 4 * GIB, "total": 24 * GIB},
    ]
    # More or fewer devices than assigned: which host GPU each is cannot be told.
    [only] = health.vram_of(instance, {"devices": stats["devices"][:1]})
    assert only["gpu"] is None and only["used"] == 4 * GIB
    # The CPU is no GPU; nonsense is left out, not a crash.
    assert health.vram_of(instance, {"devices": [
        {"type": "cpu", "name": "cpu", "vram_total": 8, "vram_free": 4}, "not a device",
        {**cuda, "vram_free": "lots"}, {**cuda, "vram_total": True}, {**cuda, "vram_total": -1}]}) == []
    assert health.vram_of(instance, {"devices": [{**cuda, "name": "x" * 1000, "index": "0"}] * 40}) == [
        {"name": "x" * 200, "index": None, "gpu": None, "used": 4 * GIB, "total": 24 * GIB}] * 16
    assert health.vram_of(instance, None) == []
