"""Idle stop (instances/idle.py): the periodic job, enqueued as comfyhub.cron registers it and run by a real worker,
stops a running instance that had no traffic through the hub for its idle_stop_after minutes and whose ComfyUI queue
is empty, so its GPU is free again; it leaves alone one used recently, one with work in its queue, one whose ComfyUI
does not answer, and one with idle stop off. Real containers of the ComfyUI test double on the test engine."""
import http.server
import json
import threading
from datetime import timedelta

import pytest
from django.apps import apps
from django.conf import settings
from django.urls import reverse
from django.utils import timezone

from comfyhub import queues
from comfyhub.models import Operation
from instances import access, docker_engine, health, idle, jobs, services
from instances.comfyui_api import ComfyUI
from instances.models import GPU, Instance
from tests.conftest import wait_for
from tests.support import running
from tests.support.running import engine, image  # noqa: F401 - fixtures
from tests.support.running import queue_prompts, run_by_hand, seen_healthy

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]

IDLE_REASON = ("Stopped after 1 min idle: no traffic through the hub and an empty queue. Its GPUs are free for others "
               "until its next start.")


def started(instance, drain):
    """Started through its operation, then seen healthy by a health pass (what idle stop looks for)."""
    return seen_healthy(running.started(instance, drain))


def idle_for(instance, minutes):
    """As if it was started, and last used through the hub, `minutes` ago."""
    moment = timezone.now() - timedelta(minutes=minutes)
    Instance.objects.filter(pk=instance.pk).update(started_at=moment, last_activity_at=moment)
    instance.refresh_from_db()
    return moment


def run_idle_check(drain):
    """The periodic job as comfyhub.cron registers it (the instances app's periodic_jobs, every IDLE_CHECK_INTERVAL),
    enqueued on its queue and run by a worker with everything it queues; the idle-stop Operation, or None."""
    periodic = [entry for entry in apps.get_app_config("instances").periodic_jobs()
                if entry["func"] is jobs.check_idle_instances]
    assert len(periodic) == 1 and periodic[0]["interval"] == settings.IDLE_CHECK_INTERVAL
    job = queues.get_queue(periodic[0]["queue_name"]).enqueue(periodic[0]["func"],
                                                              job_timeout=periodic[0]["job_timeout"])
    # A forking worker takes the job off the queue a moment before it calls it started: wait for its end too.
    drain()
    wait_for(lambda: job.get_status(refresh=True) in ("finished", "failed", "stopped", "canceled"), timeout=60,
             message="the periodic job to end")
    drain()
    assert job.is_finished, job.latest_result().exc_string
    operation_id = job.return_value()
    if operation_id is None:
        return None
    operation = Operation.objects.get(pk=operation_id)
    assert operation.kind == "idle_stop"
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    return operation


def running_holders_of(engine, gpu):
    return [state.name for state in docker_engine.list_containers(engine)
            if state.running and gpu.device_id in state.device_ids]


def still_running(instance, engine):
    instance.refresh_from_db()
    assert instance.desired_state == Instance.DesiredState.RUNNING
    assert (instance.stopped_at, instance.stop_reason) == (None, "")
    assert docker_engine.container_state(engine, instance.container_name).running
    assert not Operation.objects.filter(kind="instance_stop", target_id=str(instance.pk)).exists()
    return instance


def test_an_idle_instance_is_stopped_its_gpu_freed_and_its_page_says_when_and_why(image, production_worker, engine,
                                                                                  client, stranger):
    instance = services.instance_create(instance_id="sleepy", image=image, gpu_indexes=[1], idle_stop_after=1)
    gpu = GPU.objects.get(index=1)
    instance = started(instance, production_worker)
    assert running_holders_of(engine, gpu) == [instance.container_name]
    idle_since = idle_for(instance, minutes=2)

    before = timezone.now()
    operation = run_idle_check(production_worker)
    assert operation.result == {"stopped": [{"instance": "sleepy", "idle_since": idle_since.isoformat(),
                                             "operation": operation.result["stopped"][0]["operation"]}],
                                "skipped": []}
    assert "sleepy: stopped, idle since" in operation.log and "(idle stop after 1 min)" in operation.log
    stop = Operation.objects.get(pk=operation.result["stopped"][0]["operation"])
    assert (stop.kind, stop.target_id, stop.status) == ("instance_stop", str(instance.pk), Operation.Status.SUCCEEDED)

    instance.refresh_from_db()
    assert instance.desired_state == Instance.DesiredState.STOPPED
    assert instance.stop_reason == IDLE_REASON
    assert before <= instance.stopped_at <= timezone.now()
    assert not docker_engine.container_state(engine, instance.container_name).running
    assert running_holders_of(engine, gpu) == []  # the GPU is free: no running container holds it
    health.reconcile_all()
    instance.refresh_from_db()
    assert instance.status == Instance.Status.STOPPED
    assert (instance.health["queue"], instance.health["vram"]) == (None, [])

    client.force_login(stranger)
    page = client.get(reverse("instance-detail", args=["sleepy"])).content.decode()
    panel = page.split('id="instance-activity"')[1].split("</section>")[0]
    assert timezone.localtime(instance.stopped_at).strftime("%Y-%m-%d %H:%M:%S") in panel
    assert IDLE_REASON in panel.split('data-testid="stop-reason">')[1].split("</dd>")[0]

    # Nothing more to do: the next check records no operation.
    assert run_idle_check(production_worker) is None


def test_the_gpus_idle_stop_gave_back_go_to_others_and_its_next_start_takes_them_again(image, production_worker,
                                                                                      engine):
    sleepy = started(services.instance_create(instance_id="sleepy", image=image, gpu_indexes=[1], idle_stop_after=1),
                     production_worker)
    idle_for(sleepy, minutes=2)
    operation = run_idle_check(production_worker)
    stop = Operation.objects.get(pk=operation.result["stopped"][0]["operation"])
    assert stop.result["gpus_given_back"] == [1] and "GPU(s) 1 given back" in stop.log
    sleepy.refresh_from_db()
    assert sleepy.gpus_released == [1] and not sleepy.assignments.exists()
    assert services.instance_pending_change_kinds(sleepy) == set()  # nothing to apply: its start takes GPUs again

    # GPU 1 (exclusive) goes to someone else meanwhile...
    other = services.instance_create(instance_id="other", image=image, gpu_indexes=[1])
    assert [gpu.index for gpu in other.assigned_gpus()] == [1]
    # ...so the next start takes another free GPU, and its container gets that one.
    start = services.instance_start(instance=sleepy)
    production_worker()
    start.refresh_from_db()
    assert start.status == Operation.Status.SUCCEEDED, start.error
    assert "Took GPU(s) 0 back, given back by idle stop (GPU(s) 1 were held by others)" in start.log
    sleepy.refresh_from_db()
    assert sleepy.gpus_released == [] and [gpu.index for gpu in sleepy.assigned_gpus()] == [0]
    assert running_holders_of(engine, GPU.objects.get(index=0)) == [sleepy.container_name]


def test_a_start_finding_too_few_free_gpus_says_so_and_changes_nothing(image, run_worker):
    sleepy = services.instance_create(instance_id="sleepy", image=image, gpu_indexes=[1, 2])
    services.gpus_give_back(sleepy)
    for index in (0, 1, 2, 3):
        if index != 2:
            services.instance_create(instance_id=f"holder-{index}", image=image, gpu_indexes=[index])
    start = services.instance_start(instance=sleepy)
    run_worker()
    start.refresh_from_db()
    assert start.status == Operation.Status.FAILED
    assert ("It needs 2 GPU(s) again (idle stop gave back 1, 2), but node local has 1 free now (GPU 1 by 'holder-1' "
            "held)") in start.error and "Nothing was started." in start.error
    sleepy.refresh_from_db()
    assert sleepy.gpus_released == [1, 2] and not sleepy.assignments.exists()
    assert sleepy.container_id == ""


def test_an_instance_used_through_the_hub_a_moment_ago_keeps_running(image, run_worker, engine):
    instance = started(services.instance_create(instance_id="used", image=image, gpu_indexes=[1], idle_stop_after=1),
                       run_worker)
    idle_for(instance, minutes=2)
    access.note_activity(instance)  # what the proxy's endpoint calls on a request through the hub
    assert run_idle_check(run_worker) is None
    assert not Operation.objects.filter(kind="idle_stop").exists()
    still_running(instance, engine)


def started_with_slow_prompts(instance, engine):
    """Its container made by hand with COMFY_DOUBLE_PROMPT_SECONDS, then seen healthy by a health pass."""
    run_by_hand(instance, engine, {"COMFY_DOUBLE_PROMPT_SECONDS": "300"}, started_at=timezone.now())
    wait_for(lambda: health.system_stats(instance) is not None, timeout=30, message="ComfyUI to answer")
    return seen_healthy(instance)


def test_work_in_its_queue_is_activity_and_keeps_it_running(image, run_worker, engine):
    instance = started_with_slow_prompts(
        services.instance_create(instance_id="working", image=image, gpu_indexes=[1], idle_stop_after=1), engine)
    queue_prompts(instance, 2)
    wait_for(lambda: ComfyUI.of(instance).queue().running == 1, timeout=10, message="the first prompt to run")
    idle_for(instance, minutes=2)

    operation = run_idle_check(run_worker)
    assert operation.result == {"stopped": [], "skipped": [{
        "instance": "working", "why": "its queue has work (1 running, 1 pending), which counts as activity"}]}
    assert "working: not stopped: its queue has work" in operation.log
    instance = still_running(instance, engine)
    assert timezone.now() - instance.last_activity_at < timedelta(seconds=30)
    assert idle.idle_due() == []


def test_a_comfyui_that_does_not_answer_is_not_stopped(image, run_worker, engine, settings):
    settings.INSTANCE_HEALTH_TIMEOUT = 1
    instance = started(services.instance_create(instance_id="hung", image=image, gpu_indexes=[1], idle_stop_after=1),
                       run_worker)
    idle_for(instance, minutes=2)
    container = engine.containers.get(instance.container_name)
    container.pause()  # the port still accepts; ComfyUI never answers
    try:
        operation = run_idle_check(run_worker)
    finally:
        container.unpause()
    assert operation.result["stopped"] == []
    [skipped] = operation.result["skipped"]
    assert skipped["instance"] == "hung"
    assert skipped["why"].startswith("ComfyUI does not answer /queue, so its queue may hold work (ComfyUI at "
                                     f"http://127.0.0.1:{instance.host_port} did not answer GET /queue within 1 s")
    assert "hung: not stopped: ComfyUI does not answer /queue" in operation.log
    still_running(instance, engine)


def test_idle_stop_off_never_stops_an_instance(image, run_worker, engine):
    instance = started(services.instance_create(instance_id="forever", image=image, gpu_indexes=[1]), run_worker)
    assert instance.idle_stop_after == 0
    idle_for(instance, minutes=60 * 24 * 30)
    assert run_idle_check(run_worker) is None
    assert not Operation.objects.filter(kind="idle_stop").exists()
    still_running(instance, engine)


# --- Which instances the check looks at (the registry only) ------------------------------------------------------

def registered(instance_id, *, status=Instance.Status.HEALTHY, desired=Instance.DesiredState.RUNNING, idle_minutes=2,
               idle_stop_after=1):
    instance = services.instance_create(instance_id=instance_id, image="example/comfyui:1",
                                        idle_stop_after=idle_stop_after)
    moment = timezone.now() - timedelta(minutes=idle_minutes)
    Instance.objects.filter(pk=instance.pk).update(status=status, desired_state=desired, started_at=moment,
                                                   last_activity_at=None)
    return instance


def test_only_running_instances_past_their_idle_time_are_due():
    registered("due")
    registered("unhealthy-due", status=Instance.Status.UNHEALTHY)
    registered("recent", idle_minutes=0)
    registered("off", idle_stop_after=0)
    registered("starting", status=Instance.Status.STARTING)
    registered("crashing", status=Instance.Status.CRASH_LOOPING)
    registered("erring", status=Instance.Status.ERROR)
    registered("stopping", desired=Instance.DesiredState.STOPPED)
    registered("longer", idle_stop_after=5)
    assert sorted(i.instance_id for i in idle.idle_due()) == ["due", "unhealthy-due"]


def test_a_check_while_the_last_one_still_waits_queues_no_second_operation():
    registered("due")
    first = idle.idle_check()
    assert first is not None
    assert idle.idle_check() is None
    assert Operation.objects.filter(kind="idle_stop").count() == 1


# --- What happens while its queue is asked ---------------------------------------------------------------------------

class QueueAnswering(http.server.BaseHTTPRequestHandler):
    """A ComfyUI whose queue is empty; while /queue is asked, `server.meanwhile` runs (what someone does then)."""

    def do_GET(self):
        if self.path == "/queue":
            self.server.meanwhile()
        data = json.dumps({"queue_running": [], "queue_pending": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Report:
    def __init__(self):
        self.lines = []

    def log(self, line):
        self.lines.append(line)


@pytest.fixture
def comfyui_asked():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QueueAnswering)
    server.meanwhile = lambda: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("meanwhile, why", [
    (lambda pk: access.note_activity(Instance.objects.get(pk=pk)),
     "it was used meanwhile (through the hub, or work in its cluster's queues)"),
    (lambda pk: Instance.objects.filter(pk=pk).update(idle_stop_after=0), "idle stop was turned off meanwhile"),
    (lambda pk: Instance.objects.filter(pk=pk).update(idle_stop_after=600),
     "its idle stop time was raised to 600 min meanwhile"),
    (lambda pk: Instance.objects.filter(pk=pk).update(status=Instance.Status.CRASH_LOOPING),
     "it is crash-looping now, not running"),
    (lambda pk: Instance.objects.filter(pk=pk).update(desired_state=Instance.DesiredState.STOPPED),
     "it was stopped or deleted meanwhile"),
])
def test_what_happens_while_its_queue_is_asked_decides(comfyui_asked, meanwhile, why):
    instance = registered("asked")
    Instance.objects.filter(pk=instance.pk).update(host_port=comfyui_asked.server_address[1])
    comfyui_asked.meanwhile = lambda: meanwhile(instance.pk)
    report = Report()
    result = idle.stop_idle(report)
    assert result == {"stopped": [], "skipped": [{"instance": "asked", "why": why}]}
    assert not Operation.objects.filter(kind="instance_stop").exists()
    instance.refresh_from_db()
    assert instance.stop_reason == "" and instance.stopped_at is None


def test_with_nothing_happening_meanwhile_it_is_stopped(comfyui_asked):
    instance = registered("asked")
    Instance.objects.filter(pk=instance.pk).update(host_port=comfyui_asked.server_address[1])
    result = idle.stop_idle(Report())
    assert [stopped["instance"] for stopped in result["stopped"]] == ["asked"]
    instance.refresh_from_db()
    assert instance.desired_state == Instance.DesiredState.STOPPED and instance.stop_reason == IDLE_REASON


# --- A cluster is used as one --------------------------------------------------------------------------------------

def a_cluster(master, *workers):
    from instances.models import Cluster, ClusterWorker

    cluster = Cluster.objects.create(name="render", master=master)
    for worker in workers:
        ClusterWorker.objects.create(cluster=cluster, instance=worker)
    return cluster


def test_a_cluster_worker_is_not_idle_while_its_master_is_used_through_the_hub():
    # Its master hands it work directly, never through the hub: the master's use is the whole cluster's.
    master, worker, other = registered("master"), registered("worker"), registered("other")
    a_cluster(master, worker)
    access.note_activity(Instance.objects.get(pk=master.pk))
    assert [i.instance_id for i in idle.idle_due()] == ["other"]
    worker.refresh_from_db()
    assert worker.last_activity_at == Instance.objects.get(pk=master.pk).last_activity_at


class BusyQueue(QueueAnswering):
    def do_GET(self):
        data = json.dumps({"queue_running": [[0, "p1", {}, {}, []]], "queue_pending": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def busy_comfyui():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BusyQueue)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_work_in_a_workers_queue_keeps_its_whole_cluster_running(comfyui_asked, busy_comfyui):
    # Both due; the master (asked first, its own queue empty) is not stopped while its worker has work.
    master, worker = registered("a-master"), registered("b-worker")
    a_cluster(master, worker)
    Instance.objects.filter(pk=master.pk).update(host_port=comfyui_asked.server_address[1])
    Instance.objects.filter(pk=worker.pk).update(host_port=busy_comfyui.server_address[1])
    result = idle.stop_idle(Report())
    assert result["stopped"] == []
    assert {entry["instance"]: entry["why"] for entry in result["skipped"]} == {
        "a-master": "it was used meanwhile (through the hub, or work in its cluster's queues)",
        "b-worker": "its queue has work (1 running, 0 pending), which counts as activity"}
    assert Instance.objects.get(pk=master.pk).desired_state == Instance.DesiredState.RUNNING


def test_an_edit_keeps_given_back_gpus_unless_another_choice_is_made(image):
    sleepy = services.instance_create(instance_id="sleepy", image=image, gpu_indexes=[1])
    services.gpus_give_back(sleepy)
    services.instance_create(instance_id="other", image=image, gpu_indexes=[1])  # GPU 1 is someone else's meanwhile
    sleepy.refresh_from_db()
    assert sleepy.gpu_choice() == [1]

    def edit(instance, **changes):
        return services.instance_update(**{
            "instance": instance, "display_name": instance.display_name, "description": "", "image": instance.image,
            "extra_args": [], "extra_env": {}, "host_port": None, "gpu_indexes": instance.gpu_choice(), **changes})

    # Kept as they are (the edit page, `instances edit`, the admin pass gpu_choice): not checked, still given back.
    edited = edit(sleepy, display_name="Renamed")
    assert edited.display_name == "Renamed" and edited.gpus_released == [1] and not edited.assignments.exists()
    # Another choice is made now: the CPU here.
    edited = edit(edited, gpu_indexes=[])
    assert edited.gpus_released == [] and edited.gpu_choice() == []


def test_an_idle_stop_that_finds_the_instance_started_again_leaves_it_running(image):
    from instances import containers

    instance = services.instance_create(instance_id="sleepy", image=image, gpu_indexes=[1])
    Instance.objects.filter(pk=instance.pk).update(desired_state=Instance.DesiredState.RUNNING)
    report = Report()
    assert containers.stop(instance, report, give_back_gpus=True) == {"stopped": None,
                                                                     "skipped": "started again meanwhile"}
    assert "was started again meanwhile: left running, its GPUs kept" in report.lines[-1]
    instance.refresh_from_db()
    assert instance.gpus_released == [] and [gpu.index for gpu in instance.assigned_gpus()] == [1]
