"""`manage.py instances`: the instance services from a shell, with the exit codes and JSON that docs/cli.md promises.

Quick commands run in-process through call_command; commands that wait run as real `manage.py` processes next to a
real RQ worker, sharing the test database file.
"""
import json
import socket
import time
import uuid
from datetime import datetime
from functools import partial

import pytest
from django.conf import settings

from comfyhub import operations, queues
from comfyhub.models import Operation
from instances import services
from instances.models import Instance
from tests.conftest import wait_for
from tests.support.cli import run, run_process, start_process
from tests import testenv

LIST_KEYS = {"instance_id", "name", "description", "node", "image", "host_port", "url", "gpus", "cpu_only",
             "desired_state", "status", "status_detail", "container_id", "pending_changes", "checked_at",
             "created_at", "hub_path", "owner", "idle_stop_after"}
STATUS_KEYS = LIST_KEYS | {"restart_count", "started_at", "health", "extra_args", "extra_env", "operations", "shares"}
OPERATION_KEYS = {"id", "kind", "status", "progress", "progress_message", "created_at", "finished_at", "error"}


cli = partial(run, "instances")
cli_process = partial(run_process, "instances")


@pytest.fixture
def image(comfyui_double_image, docker_cleanup):
    return comfyui_double_image


@pytest.fixture
def free_port():
    """A port in the instance range that nothing uses right now."""
    node = services.local_node()
    taken = set(Instance.objects.values_list("host_port", flat=True))
    return next(port for port in range(node.port_range_start + 50, node.port_range_end)
                if port not in taken and not services.port_bound_on_host(node.bind_address, port))


# --- create --------------------------------------------------------------------------------------------------------

@pytest.mark.django_db
def test_it_creates_an_instance_with_gpus_port_args_and_env(free_port):
    result = cli("create", "studio", "--name", "Studio", "--description", "For the team", "--gpus", "0,1",
                 "--port", str(free_port), "--image", "example/comfyui:1", "--arg=--preview-method", "--arg=auto",
                 "--env", "TEAM=a", "--env=HF_HOME=/instance/hf")

    assert result.code == 0, result.err
    instance = Instance.objects.get(instance_id="studio")
    assert (instance.display_name, instance.description) == ("Studio", "For the team")
    assert [gpu.index for gpu in instance.assigned_gpus()] == [0, 1]
    assert instance.host_port == free_port
    assert instance.image == "example/comfyui:1"
    assert instance.extra_args == ["--preview-method", "auto"]
    assert instance.extra_env == {"TEAM": "a", "HF_HOME": "/instance/hf"}
    assert "Created instance 'studio'" in result.out
    assert f"port   {free_port} (http://127.0.0.1:{free_port}/)" in result.out
    assert "GPUs   0, 1" in result.out
    assert "image  example/comfyui:1" in result.out


@pytest.mark.django_db
def test_without_options_it_creates_a_cpu_instance_on_a_free_port_with_the_default_image():
    result = cli("create", "plain")

    assert result.code == 0, result.err
    instance = Instance.objects.get(instance_id="plain")
    assert instance.cpu_only
    assert testenv.PORT_RANGE[0] <= instance.host_port <= testenv.PORT_RANGE[1]
    assert instance.image == settings.COMFY_IMAGE
    assert "GPUs   none (CPU mode)" in result.out


@pytest.fixture
def taken(db):
    """An instance holding GPU 0 exclusively and a port."""
    return services.instance_create(instance_id="taken", gpu_indexes=[0])


@pytest.mark.django_db
@pytest.mark.parametrize("args, message", [
    (["Bad_Id"], "instance_id: Use lowercase letters a-z, digits and '-'"),
    (["shared"], "instance_id: 'shared' is reserved by ComfyHub's storage layout"),
    (["taken"], "instance_id: An instance 'taken' already exists; pick another id."),
    (["other", "--port", "{taken_port}"], "host_port: Port {taken_port} is used by instance 'taken'"),
    (["other", "--port", "80"], "host_port: Ports go from 1024 to 65535"),
    (["other", "--port", "eighty"], "host_port: 'eighty' is not a port number"),
    (["other", "--gpus", "0"], "gpus: GPU 0 is held exclusively by instance 'taken'"),
    (["other", "--gpus", "7"], "gpus: GPU 7 does not exist on node local (GPUs: 0, 1, 2, 3)."),
    (["other", "--gpus", "first"], "gpus: GPUs are given by index"),
    (["other", "--arg=--base-directory", "--arg=/elsewhere"], "extra_args: '--base-directory' is set by ComfyHub"),
    (["other", "--arg=--port=1"], "extra_args: '--port' is set by ComfyHub"),
    (["other", "--env", "NVIDIA_VISIBLE_DEVICES=all"], "extra_env: 'NVIDIA_VISIBLE_DEVICES' is set by ComfyHub"),
    (["other", "--env", "COMFY_X=1"], "extra_env: 'COMFY_X' is reserved"),
    (["other", "--env", "NOEQUALS"], "extra_env: 'NOEQUALS' is not KEY=VALUE"),
    (["other", "--image", "has spaces:1"], "image: Give an image name"),
])
def test_it_refuses_bad_input_with_exit_code_2_and_creates_nothing(taken, args, message):
    args = [arg.format(taken_port=taken.host_port) for arg in args]
    message = message.format(taken_port=taken.host_port)

    result = cli("create", *args)

    assert result.code == 2
    assert message in result.err
    assert any(line.startswith(message) for line in result.err.splitlines()), result.err
    assert result.out == ""
    assert list(Instance.objects.values_list("instance_id", flat=True)) == ["taken"]


@pytest.mark.django_db
def test_it_refuses_a_port_another_program_holds_on_the_host(free_port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", free_port))
        holder.listen()
        result = cli("create", "squatted", "--port", str(free_port))

    assert result.code == 2
    assert f"host_port: Port {free_port} is already in use on this host (by another program)" in result.err
    assert not Instance.objects.exists()


@pytest.mark.django_db
def test_it_reports_every_problem_at_once(taken):
    result = cli("create", "Bad_Id", "--port", "80", "--arg=--listen", "--env", "COMFY_X=1", "--gpus", "0")

    assert result.code == 2
    fields = [line.split(":", 1)[0] for line in result.err.splitlines()]
    assert fields == ["instance_id", "extra_args", "extra_env", "host_port", "gpus"]


def test_the_command_line_prints_one_field_message_line_per_problem(transactional_db):
    result = cli_process("create", "Bad_Id", "--env", "COMFY_X=1", timeout=60)

    assert result.code == 2
    assert result.err.splitlines() == [
        "instance_id: Use lowercase letters a-z, digits and '-', starting and ending with a letter or digit "
        "(e.g. 'bad-id').",
        "extra_env: 'COMFY_X' is reserved: ComfyHub sets the COMFY_* variables of the storage contract itself (in any case); remove it.",
    ]
    assert not Instance.objects.exists()


def test_the_help_explains_how_to_pass_arguments_that_start_with_a_dash():
    result = cli_process("create", "--help", timeout=60)

    assert result.code == 0
    assert "--arg=--preview-method" in result.out


# --- list and status -----------------------------------------------------------------------------------------------

@pytest.fixture
def two_instances(db):
    alpha = services.instance_create(instance_id="alpha", display_name="Alpha", gpu_indexes=[1, 2],
                                     extra_args=["--preview-method", "auto"], extra_env={"TEAM": "a"})
    beta = services.instance_create(instance_id="beta", description="CPU only")
    return alpha, beta


def test_list_json_holds_the_documented_keys(two_instances):
    alpha, beta = two_instances

    result = cli("list", "--json")

    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert [item["instance_id"] for item in data] == ["alpha", "beta"]
    for item in data:
        assert set(item) == LIST_KEYS
        assert item["node"] == "local"
        assert item["status"] == "new" and item["desired_state"] == "stopped"
        assert item["checked_at"] is None
        assert datetime.fromisoformat(item["created_at"]).tzinfo is not None
        assert item["pending_changes"] is False
    first, second = data
    assert first["name"] == "Alpha" and second["name"] == "beta"
    assert [gpu["index"] for gpu in first["gpus"]] == [1, 2]
    assert all(set(gpu) == {"index", "uuid", "name"} for gpu in first["gpus"])
    assert first["cpu_only"] is False and second["cpu_only"] is True and second["gpus"] == []
    assert first["host_port"] == alpha.host_port
    assert first["url"] == f"http://127.0.0.1:{alpha.host_port}/"
    assert second["description"] == "CPU only"


@pytest.mark.django_db
def test_list_json_of_no_instances_is_an_empty_list():
    assert json.loads(cli("list", "--json").out) == []
    assert "No instances yet" in cli("list").out


def test_list_prints_a_table(two_instances):
    alpha, beta = two_instances

    lines = cli("list").out.splitlines()

    assert lines[0].split() == ["ID", "STATUS", "DESIRED", "GPUS", "PORT", "IMAGE"]
    assert lines[1].split() == ["alpha", "new", "stopped", "1,2", str(alpha.host_port), alpha.image]
    assert lines[2].split() == ["beta", "new", "stopped", "cpu", str(beta.host_port), beta.image]


def test_status_json_adds_health_configuration_and_latest_operations(two_instances):
    alpha, _ = two_instances
    operation = services.instance_build(instance=alpha)

    result = cli("status", "alpha", "--json")

    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert set(data) == STATUS_KEYS
    assert data["extra_args"] == ["--preview-method", "auto"]
    assert data["extra_env"] == {"TEAM": "a"}
    assert data["health"] == {"checks": [], "devices": [], "comfyui_version": ""}
    assert data["restart_count"] == 0 and data["started_at"] is None
    [listed] = data["operations"]
    assert set(listed) == OPERATION_KEYS
    assert listed["id"] == str(operation.pk)
    assert (listed["kind"], listed["status"], listed["progress"], listed["error"]) == ("instance_build", "queued",
                                                                                      0, "")


def test_status_prints_the_instance_in_detail(two_instances):
    alpha, _ = two_instances
    services.instance_build(instance=alpha)

    out = cli("status", "alpha").out

    assert out.startswith("alpha (Alpha)")
    assert "status     new (desired: stopped)" in out
    assert f"url        http://127.0.0.1:{alpha.host_port}/" in out
    assert "args       --preview-method auto" in out
    assert "env        TEAM=a" in out
    assert "Health checks: none yet" in out
    assert "Build directories" in out and "queued" in out


@pytest.mark.parametrize("args", [["status", "nope"], ["start", "nope"], ["delete", "nope"], ["logs", "nope"]])
def test_an_unknown_id_names_the_known_ones(two_instances, args):
    result = cli(*args)

    assert result.code == 2
    assert result.err == "No instance 'nope'. Known: alpha, beta"
    assert not Operation.objects.exists()


# --- delete and logs without an engine -----------------------------------------------------------------------------

def test_delete_with_purge_data_refuses_without_yes(two_instances):
    result = cli("delete", "alpha", "--purge-data")

    assert result.code == 2
    assert (f"--purge-data deletes {settings.COMFY_INSTANCES_PATH / 'alpha'} for good; add --yes to confirm (it "
            "stands for typing the instance id).") in result.err
    assert Instance.objects.filter(instance_id="alpha").exists()
    assert not Operation.objects.exists()


def test_logs_says_when_the_engine_is_unreachable(two_instances, settings):
    settings.DOCKER_HOST = "unix:///nonexistent/docker.sock"

    result = cli("logs", "alpha")

    assert result.code == 1
    assert "The Docker engine at unix:///nonexistent/docker.sock is unreachable" in result.err


# --- waiting for operations ----------------------------------------------------------------------------------------

@pytest.fixture
def lonely(transactional_db):
    """An instance with an id of its own: the folders one test builds outlive its database rows."""
    return services.instance_create(instance_id=f"lonely-{uuid.uuid4().hex[:8]}")


def test_without_a_listening_worker_it_exits_3_instead_of_hanging(lonely):
    started = time.monotonic()
    result = cli_process("build", lonely.instance_id, timeout=60)

    assert result.code == 3
    assert time.monotonic() - started < 30
    [operation] = Operation.objects.all()
    assert result.err.strip() == (
        "No RQ worker is listening on queue 'default'; start one with `python manage.py rqworker default "
        f"--with-scheduler` or use `make run`. The operation {operation.pk} stays queued.")
    assert operation.status == Operation.Status.QUEUED


def test_no_wait_prints_the_operation_id_and_returns_at_once(lonely):
    result = cli_process("build", lonely.instance_id, "--no-wait", timeout=60)

    assert result.code == 0
    operation = Operation.objects.get(pk=uuid.UUID(result.out.strip()))
    assert operation.kind == "instance_build" and operation.status == Operation.Status.QUEUED
    assert "No RQ worker is listening on queue 'default'" in result.err


def test_a_queue_that_does_not_answer_is_exit_1_and_records_nothing(lonely):
    result = cli_process("build", lonely.instance_id, env={"REDIS_URL": "unix:///nonexistent/redis.sock"}, timeout=60)

    assert result.code == 1
    assert "The job queue is unavailable: Redis at unix:///nonexistent/redis.sock does not answer" in result.err
    assert not Operation.objects.exists()


def test_build_waits_for_the_worker_and_prints_the_log(lonely, worker_process):
    worker_process()

    result = cli_process("build", lonely.instance_id)

    assert result.code == 0, result.err
    assert f"Build directories '{lonely}': operation" in result.out
    assert f"created {settings.COMFY_INSTANCES_PATH / lonely.instance_id}" in result.out
    assert f"Build directories '{lonely}' succeeded." in result.out
    assert Operation.objects.get().status == Operation.Status.SUCCEEDED


def test_it_gives_up_waiting_after_the_timeout_and_the_operation_goes_on(lonely, worker_process, docker_cleanup):
    worker_process()
    # Another operation on the same instance holds its lock, so this one waits for it.
    lock = queues.get_connection().lock(f"comfyhub:lock:instance:{lonely}", timeout=120)
    assert lock.acquire(blocking=False)
    try:
        result = cli_process("stop", lonely.instance_id, "--timeout", "3")
    finally:
        lock.release()

    operation = Operation.objects.get()
    assert result.code == 4
    assert f"Waiting for another operation on {lonely} to finish..." in result.out
    assert f"Gave up waiting after 3 s; operation {operation.pk} is still running and goes on." in result.err
    wait_for(lambda: Operation.objects.get().status == Operation.Status.SUCCEEDED, timeout=60,
             message="the stop to finish once the lock is free")


def test_a_cancelled_operation_exits_1_with_the_reason(lonely, worker_process, docker_cleanup, admin_user):
    worker_process()
    lock = queues.get_connection().lock(f"comfyhub:lock:instance:{lonely}", timeout=120)
    assert lock.acquire(blocking=False)
    try:
        waiting = start_process("instances", "stop", lonely.instance_id)
        operation = wait_for(lambda: Operation.objects.filter(status=Operation.Status.RUNNING).first(),
                             message="the stop to wait for the instance's lock")
        operations.operation_cancel(operation=operation, user=admin_user)
        out, err = waiting.communicate(timeout=60)
    finally:
        lock.release()

    assert waiting.returncode == 1
    assert f"Stop instance '{lonely}' was cancelled (operation {operation.pk}): Cancelled by alice." in err


# --- on the real engine with the ComfyUI test double ---------------------------------------------------------------

def test_an_instance_goes_through_its_life_from_the_command_line(image, worker_process, free_port, settings):
    worker_process()
    created = cli_process("create", "cli-life", "--image", image, "--gpus", "1", "--port", str(free_port))
    assert created.code == 0, created.err

    started = cli_process("start", "cli-life")

    assert started.code == 0, started.out + started.err
    assert "[100%] healthy" in started.out
    assert "Start instance 'cli-life' succeeded." in started.out
    assert f"Open it at {settings.HUB_ORIGIN}/i/cli-life/ (through the hub, with a login)" in started.out
    assert f"ComfyUI answers at http://127.0.0.1:{free_port}/ on its node" in started.out
    instance = Instance.objects.get(instance_id="cli-life")
    assert instance.status == Instance.Status.HEALTHY
    assert instance.desired_state == Instance.DesiredState.RUNNING

    logs = cli("logs", "cli-life", "--tail", "50")
    assert logs.code == 0
    assert "To see the GUI go to: http://" in logs.out

    status = json.loads(cli("status", "cli-life", "--json").out)
    assert status["status"] == "healthy" and status["container_id"]
    assert [(o["kind"], o["status"], o["progress"]) for o in status["operations"]] == [
        ("instance_start", "succeeded", 100)]

    stopped = cli_process("stop", "cli-life")
    assert stopped.code == 0, stopped.err
    assert Instance.objects.get(instance_id="cli-life").status == Instance.Status.STOPPED

    deleted = cli_process("delete", "cli-life", "--purge-data", "--yes")
    assert deleted.code == 0, deleted.err
    assert not Instance.objects.filter(instance_id="cli-life").exists()
    assert not (settings.COMFY_INSTANCES_PATH / "cli-life").exists()


def test_a_start_that_fails_exits_1_with_the_error(image, worker_process):
    worker_process()
    assert cli_process("create", "cli-crash", "--image", image, "--arg=--definitely-not-a-flag").code == 0

    result = cli_process("start", "cli-crash")

    assert result.code == 1
    assert "Start instance 'cli-crash' failed (operation " in result.err
    assert "while starting" in result.err
    assert "unrecognized arguments: --definitely-not-a-flag" in result.err
    assert Instance.objects.get(instance_id="cli-crash").status == Instance.Status.ERROR


# --- adopting the folder a deleted instance kept -------------------------------------------------------------------

WORKFLOW = b'{"last_node_id": 1, "nodes": [{"id": 1, "type": "KSampler"}]}\n'
OUTPUT = bytes(range(256)) * 40  # an "image": every byte value, not text


def test_a_kept_folder_is_adopted_as_it_is_and_the_instance_starts_with_it(image, worker_process, free_port,
                                                                           settings):
    worker_process()
    assert cli_process("create", "kept", "--image", image, "--port", str(free_port)).code == 0
    assert cli_process("build", "kept").code == 0
    folder = settings.COMFY_INSTANCES_PATH / "kept"
    (folder / "user/default/workflows/mine.json").write_bytes(WORKFLOW)
    (folder / "output/ComfyUI_00001_.png").write_bytes(OUTPUT)
    (folder / "custom_nodes/hand-made").mkdir()
    (folder / "custom_nodes/hand-made/__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    deleted = cli_process("delete", "kept")  # keeping its data
    assert deleted.code == 0, deleted.err
    assert not Instance.objects.filter(instance_id="kept").exists()

    refused = cli("create", "kept", "--image", image, "--port", str(free_port))
    assert refused.code == 2
    assert f"instance_id: {folder} already exists" in refused.err and "--adopt" in refused.err
    assert not Instance.objects.filter(instance_id="kept").exists()

    adopted = cli("create", "kept", "--adopt", "--image", image, "--port", str(free_port))
    assert adopted.code == 0, adopted.err
    assert f"It adopted {folder} as it is." in adopted.out
    started = cli_process("start", "kept")

    assert started.code == 0, started.out + started.err
    assert Instance.objects.get(instance_id="kept").status == Instance.Status.HEALTHY
    assert (folder / "user/default/workflows/mine.json").read_bytes() == WORKFLOW
    assert (folder / "output/ComfyUI_00001_.png").read_bytes() == OUTPUT
    nodes = run("nodes", "list", "kept")
    assert "hand-made" in nodes.out and "by hand" in nodes.out


@pytest.mark.django_db
def test_adopting_a_folder_that_does_not_exist_is_refused(settings):
    result = cli("create", "nothing-kept", "--adopt")

    assert result.code == 2
    assert (f"instance_id: Nothing to adopt: {settings.COMFY_INSTANCES_PATH / 'nothing-kept'} does not exist."
            in result.err)
    assert not Instance.objects.exists()
    assert not (settings.COMFY_INSTANCES_PATH / "nothing-kept").exists()


def test_an_adopted_folder_with_a_planted_link_is_refused_by_the_build_naming_it(worker_process, settings, tmp_path):
    worker_process()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_bytes(b"not the instance's\n")
    folder = settings.COMFY_INSTANCES_PATH / "planted"
    folder.mkdir(parents=True)
    (folder / "output").symlink_to(elsewhere)
    assert cli("create", "planted", "--adopt").code == 0

    result = cli_process("build", "planted")

    assert result.code == 1
    assert str(folder / "output") in result.err
    assert sorted(p.name for p in elsewhere.iterdir()) == ["precious.txt"]
    assert (elsewhere / "precious.txt").read_bytes() == b"not the instance's\n"
    assert (folder / "output").is_symlink()


def test_output_into_a_pipe_nobody_reads_any_more_ends_quietly(transactional_db):
    services.instance_create(instance_id="piped", image=settings.COMFY_IMAGE)
    process = start_process("instances", "list")
    process.stdout.close()  # as `| head` does once it has its lines: every write now meets a closed pipe
    _, err = process.communicate(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert process.returncode == 141  # 128 + SIGPIPE, what a Unix tool cut off by its reader exits with
