"""Snapshots with real files and archives: create, restore (undoable), clone, disk full. Hostile archives and hostile
instance folders: tests/test_snapshot_archives.py."""
import datetime
import json
import os
import signal
import subprocess
import tarfile
import time

import pytest
from django.core.exceptions import ValidationError

from comfyhub.models import Operation
from instances import customnodes, services as instance_services
from instances.models import CustomNode, Instance
from storage_app import layout, services, snapshots
from storage_app.models import Snapshot
from tests.support.gitrepos import make_node_repo

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def instance(storage):
    created = instance_services.instance_create(instance_id="snappy", gpu_indexes=[1], extra_args=["--lowvram"],
                                                extra_env={"TEAM": "a"})
    layout.build_instance_tree("snappy")
    root = storage["instances"] / "snappy"
    (root / "user" / "default" / "workflows" / "w.json").write_text('{"nodes": []}')
    (root / "user" / "default" / "comfy.settings.json").write_text('{"a": 1}')
    (root / "output" / "image.png").write_bytes(b"png")
    (root / "input" / "uploaded.png").write_bytes(b"upload")
    (root / "models" / "loras").mkdir(parents=True)
    (root / "models" / "loras" / "own.pt").write_bytes(b"own")
    return created


def run(operation, run_worker):
    run_worker()
    operation.refresh_from_db()
    return operation


def names_in(snapshot):
    with tarfile.open(snapshots.archive_path(snapshot)) as tar:
        return set(tar.getnames())


def test_a_config_snapshot_holds_user_data_and_registry_settings(instance, run_worker, operator, storage):
    operation = run(services.snapshot_create(instance=instance, kind="config", note="before upgrade", user=operator),
                    run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    snapshot = Snapshot.objects.get()
    assert (snapshot.kind, snapshot.note, snapshot.created_by, snapshot.instance_label) == (
        "config", "before upgrade", operator, "snappy")
    names = names_in(snapshot)
    assert "user/default/workflows/w.json" in names and "comfyhub-snapshot.json" in names
    assert not any(n.startswith(("output", "custom_nodes", "models")) for n in names)
    assert snapshot.manifest["instance"]["extra_args"] == ["--lowvram"]
    assert snapshot.manifest["instance"]["gpus"] == [1]
    assert snapshot.size == os.path.getsize(snapshots.archive_path(snapshot))
    assert snapshots.archive_path(snapshot).is_relative_to(storage["backups"])


def test_a_full_snapshot_adds_nodes_and_the_inbox_and_output_only_when_asked(instance, tmp_path, node_git):
    url, commits = make_node_repo(tmp_path / "repos")
    customnodes.install(instance, url, "v1")
    full = snapshots.create(instance, kind="full")
    names = names_in(full)
    assert "models/loras/own.pt" in names and "custom_nodes/ComfyUI-Test-Nodes/__init__.py" in names
    assert not any(n.startswith(("output", "input")) for n in names)
    node = full.manifest["custom_nodes"][0]
    assert (node["folder"], node["git_url"], node["commit"], node["dirty"], node["disabled"]) == (
        "ComfyUI-Test-Nodes", url, commits["v1"], None, False)
    with_output = snapshots.create(instance, kind="full", include_output=True)
    assert {"output/image.png", "input/uploaded.png"} <= set(names_in(with_output))  # its own uploads too


def test_restoring_puts_the_files_back_and_can_be_undone(instance, run_worker, storage):
    snapshot = snapshots.create(instance, kind="config")
    workflow = storage["instances"] / "snappy" / "user" / "default" / "workflows" / "w.json"
    workflow.write_text('{"nodes": [], "changed": true}')
    (workflow.parent / "new.json").write_text("{}")
    operation = run(services.snapshot_restore(snapshot=snapshot), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert json.loads(workflow.read_text()) == {"nodes": []}
    assert not (workflow.parent / "new.json").exists()
    undo = Snapshot.objects.get(pk=operation.result["undo_snapshot"])
    assert undo.automatic == "before-restore"
    run(services.snapshot_restore(snapshot=undo), run_worker)
    assert json.loads(workflow.read_text()) == {"nodes": [], "changed": True}
    assert (workflow.parent / "new.json").exists()
    assert not [p for p in (storage["instances"] / "snappy").iterdir() if p.name.startswith(".")]


def test_restoring_brings_back_the_registry_settings(instance, run_worker):
    snapshot = snapshots.create(instance, kind="config")
    instance_services.instance_update(instance=instance, display_name="", description="", image="other:1",
                                      extra_args=[], extra_env={}, host_port=None, gpu_indexes=[1])
    run(services.snapshot_restore(snapshot=snapshot), run_worker)
    instance.refresh_from_db()
    assert (instance.image, instance.extra_args, instance.extra_env) == (snapshot.manifest["instance"]["image"],
                                                                        ["--lowvram"], {"TEAM": "a"})


def test_a_damaged_archive_is_refused_before_anything_changes(instance, run_worker, storage):
    snapshot = snapshots.create(instance, kind="config")
    with open(snapshots.archive_path(snapshot), "r+b") as handle:
        handle.seek(40)
        handle.write(b"XXXX")
    workflow = storage["instances"] / "snappy" / "user" / "default" / "workflows" / "w.json"
    workflow.write_text('{"kept": true}')
    operation = run(services.snapshot_restore(snapshot=snapshot), run_worker)
    assert operation.status == Operation.Status.FAILED
    assert "is damaged" in operation.error and "Nothing was restored." in operation.error
    assert json.loads(workflow.read_text()) == {"kept": True}
    assert Snapshot.objects.count() == 1  # no undo snapshot either


def test_clone_makes_a_new_instance_with_new_port_and_gpus(instance, run_worker, storage):
    snapshot = snapshots.create(instance, kind="full")
    operation = run(services.snapshot_clone(snapshot=snapshot, new_instance_id="snappy-copy", gpu_indexes=[2]),
                    run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    clone = Instance.objects.get(instance_id="snappy-copy")
    assert clone.host_port != instance.host_port
    assert [g.index for g in clone.assigned_gpus()] == [2]
    assert clone.extra_args == ["--lowvram"]
    root = storage["instances"] / "snappy-copy"
    assert (root / "user" / "default" / "workflows" / "w.json").exists()
    assert (root / "models" / "loras" / "own.pt").read_bytes() == b"own"
    assert (root / "extra_model_paths.yaml").exists() and not (root / "comfyhub-snapshot.json").exists()


def test_a_clone_brings_the_custom_node_records_with_the_folders(instance, tmp_path, run_worker, storage, node_git):
    url, commits = make_node_repo(tmp_path / "repos")
    other_url, other_commits = make_node_repo(tmp_path / "repos", "Other-Nodes")
    customnodes.set_enabled(customnodes.install(instance, url, "v1"), False)
    customnodes.install(instance, other_url, "main")
    (storage["instances"] / "snappy" / "custom_nodes" / "hand-made").mkdir()
    snapshot = snapshots.create(instance, kind="full")
    operation = run(services.snapshot_clone(snapshot=snapshot, new_instance_id="snappy-copy"), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    clone = Instance.objects.get(instance_id="snappy-copy")
    assert sorted(clone.custom_nodes.values_list("name", "url", "ref", "commit")) == [
        ("ComfyUI-Test-Nodes", url, "v1", commits["v1"]), ("Other-Nodes", other_url, "main", other_commits["main"])]
    listed = {node["name"]: node for node in customnodes.list_nodes(clone)}
    assert [(name, listed[name]["managed"], listed[name]["enabled"]) for name in sorted(listed)] == [
        ("ComfyUI-Test-Nodes", True, False), ("Other-Nodes", True, True), ("hand-made", False, True)]
    operation = run(instance_services.node_action(instance=clone, name="Other-Nodes", action="disable"), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert (storage["instances"] / "snappy-copy" / "custom_nodes" / "Other-Nodes.disabled").is_dir()
    assert instance.custom_nodes.count() == 2  # the original keeps its own


def test_a_clone_of_a_snapshot_without_records_records_its_git_folders(instance, tmp_path, run_worker, node_git):
    url, commits = make_node_repo(tmp_path / "repos")
    customnodes.install(instance, url, "v1")
    snapshot = snapshots.create(instance, kind="full")
    for node in snapshot.manifest["custom_nodes"]:
        del node["record"]  # as a snapshot taken before the manifest held the records
    snapshot.save()
    operation = run(services.snapshot_clone(snapshot=snapshot, new_instance_id="snappy-copy"), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    clone = Instance.objects.get(instance_id="snappy-copy")
    assert list(clone.custom_nodes.values_list("name", "url", "commit")) == [
        ("ComfyUI-Test-Nodes", url, commits["v1"])]


def test_a_restore_makes_the_custom_node_records_match_the_restored_folders(instance, tmp_path, run_worker, storage,
                                                                           node_git):
    url, commits = make_node_repo(tmp_path / "repos")
    other_url, other_commits = make_node_repo(tmp_path / "repos", "Other-Nodes")
    later_url, later_commits = make_node_repo(tmp_path / "repos", "Later-Nodes")
    customnodes.install(instance, url, "v1")
    customnodes.install(instance, other_url, "main")
    snapshot = snapshots.create(instance, kind="full")
    customnodes.update(CustomNode.objects.get(name="ComfyUI-Test-Nodes"), "main")
    customnodes.remove(CustomNode.objects.get(name="Other-Nodes"))
    customnodes.install(instance, later_url)
    operation = run(services.snapshot_restore(snapshot=snapshot), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert list(instance.custom_nodes.values_list("name", "url", "ref", "commit")) == [
        ("ComfyUI-Test-Nodes", url, "v1", commits["v1"]), ("Other-Nodes", other_url, "main", other_commits["main"])]
    nodes = storage["instances"] / "snappy" / "custom_nodes"
    assert (nodes / "Other-Nodes").is_dir() and not (nodes / "Later-Nodes").exists()
    undo = Snapshot.objects.get(pk=operation.result["undo_snapshot"])
    assert run(services.snapshot_restore(snapshot=undo), run_worker).status == Operation.Status.SUCCEEDED
    assert list(instance.custom_nodes.values_list("name", "ref", "commit")) == [
        ("ComfyUI-Test-Nodes", "main", commits["main"]), ("Later-Nodes", "", later_commits["main"])]


def test_clone_refuses_a_taken_or_bad_id(instance):
    snapshot = snapshots.create(instance, kind="config")
    with pytest.raises(ValidationError, match="already exists"):
        services.snapshot_clone(snapshot=snapshot, new_instance_id="snappy")
    with pytest.raises(ValidationError, match="lowercase"):
        services.snapshot_clone(snapshot=snapshot, new_instance_id="Bad/Id")


def test_a_disk_that_fills_up_during_restore_leaves_the_instance_exactly_as_it_was(instance, storage, run_worker,
                                                                                    tmp_path, settings):
    # The instance lives on a 3 MB filesystem; the snapshot holds a 4 MB file that cannot fit beside it.
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)], check=True)
    try:
        settings.COMFY_INSTANCES_PATH = small
        tiny = instance_services.instance_create(instance_id="tiny")
        layout.build_instance_tree("tiny")
        (small / "tiny" / "user" / "default" / "big.bin").write_bytes(os.urandom(2 << 20))
        snapshot = snapshots.create(tiny, kind="config")
        (small / "tiny" / "user" / "default" / "big.bin").unlink()
        (small / "tiny" / "user" / "default" / "note.txt").write_text("current state")
        (small / "tiny" / "user" / "default" / "filler.bin").write_bytes(b"f" * (1 << 20))
        before = {str(p.relative_to(small)): (p.read_bytes() if p.is_file() else None) for p in small.rglob("*")}
        operation = run(services.snapshot_restore(snapshot=snapshot), run_worker)
        assert operation.status == Operation.Status.FAILED
        assert "disk filled up" in operation.error or "full" in operation.error
        after = {str(p.relative_to(small)): (p.read_bytes() if p.is_file() else None) for p in small.rglob("*")}
        assert after == before
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_manager_snapshots_export_and_import(instance, tmp_path, run_worker, storage, node_git):
    url, commits = make_node_repo(tmp_path / "repos")
    node = customnodes.install(instance, url, "v1")
    customnodes.set_enabled(node, False)
    snapshot = snapshots.create(instance, kind="full")
    exported = services.snapshot_export_manager(snapshot=snapshot)
    assert exported == {"comfyui": "", "git_custom_nodes": {url: {"hash": commits["v1"], "disabled": True}},
                        "file_custom_nodes": [], "pips": {}}
    other = instance_services.instance_create(instance_id="importer")
    layout.build_instance_tree("importer")
    exported["git_custom_nodes"][f"file://{tmp_path}/missing-repo"] = {"hash": "abc", "disabled": False}
    operation = run(services.snapshot_import_manager(instance=other, data=exported), run_worker)
    assert operation.status == Operation.Status.FAILED  # one of two failed: reported, the other installed
    assert "1 of 2 node(s) failed" in operation.error and "missing-repo" in operation.error
    assert (storage["instances"] / "importer" / "custom_nodes" / "ComfyUI-Test-Nodes.disabled").is_dir()
    with pytest.raises(ValidationError, match="Not a ComfyUI-Manager snapshot"):
        services.snapshot_import_manager(instance=other, data=["nope"])


def test_scheduled_snapshots_keep_the_last_n(instance, run_worker):
    from storage_app import jobs

    Instance.objects.filter(pk=instance.pk).update(snapshot_every_hours=1, snapshot_keep=2)
    for _ in range(3):
        assert jobs.scheduled_snapshots() == ["snappy"]
        run_worker()
        Snapshot.objects.update(created_at=Snapshot.objects.first().created_at - datetime.timedelta(hours=2))
    assert Snapshot.objects.filter(automatic="schedule").count() == 2
    assert jobs.scheduled_snapshots() == ["snappy"]
    run_worker()
    assert jobs.scheduled_snapshots() == []  # the newest is not due yet


def test_the_admin_restores_through_an_operation_and_deletes_archives(instance, client, admin_user):
    from django.urls import reverse

    snapshot = snapshots.create(instance, kind="config")
    archive = snapshots.archive_path(snapshot)
    client.force_login(admin_user)
    changelist = reverse("admin:storage_app_snapshot_changelist")
    client.post(changelist, {"action": "restore", "_selected_action": [snapshot.pk]})
    assert Operation.objects.filter(kind="snapshot_restore").exists()
    response = client.post(changelist, {"action": "delete_with_archive", "_selected_action": [snapshot.pk]})
    assert response.status_code == 302 and response.url == reverse("snapshot-delete", args=[snapshot.pk])
    assert Snapshot.objects.exists() and archive.exists()  # nothing deleted before the number is typed
    client.post(response.url, {"confirm": str(snapshot.pk)})
    assert not Snapshot.objects.exists() and not archive.exists()


@pytest.mark.docker
def test_restoring_a_running_instance_stops_it_first_and_starts_it_again(comfyui_double_image, docker_cleanup,
                                                                         run_worker, storage):
    from instances import docker_engine

    running = instance_services.instance_create(instance_id="busy", image=comfyui_double_image)
    assert run(instance_services.instance_start(instance=running), run_worker).status == Operation.Status.SUCCEEDED
    workflow = storage["instances"] / "busy" / "user" / "default" / "workflows" / "w.json"
    workflow.write_text('{"nodes": [], "v": 1}')
    snapshot = snapshots.create(running, kind="config")
    workflow.write_text('{"nodes": [], "v": 2}')
    engine = docker_engine.require_engine()
    started_before = docker_engine.container_state(engine, running.container_name).started_at
    operation = run(services.snapshot_restore(snapshot=snapshot), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert operation.result["restarted"] is True and "ComfyUI answers on" in operation.log
    assert json.loads(workflow.read_text())["v"] == 1
    after = docker_engine.container_state(engine, running.container_name)
    assert after.running and after.started_at != started_before  # stopped for the restore, started again
    engine.close()


def _frozen_inside_the_swap(instances_root, workers, operation):
    """Wait until `operation` (a restore) extracts into its staging folder, then SIGSTOP the worker running it, its
    work horse included. Returns the frozen process ids."""
    from rq import Worker

    from comfyhub import queues
    from tests.conftest import descendants

    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".restore-") for folder in (instances_root, instances_root / "busy")
                  for p in (folder.iterdir() if folder.is_dir() else ())):
        assert time.monotonic() < deadline, "the restore never reached its swap"
        time.sleep(0.001)
    pid = next(w.pid for w in Worker.all(connection=queues.get_connection())
               if w.get_current_job_id() == str(operation.pk))
    running = next(w for w in workers if w.process.pid == pid)
    frozen = [pid, *descendants(pid)]
    for each in frozen:
        os.kill(each, signal.SIGSTOP)
    staging = [p for folder in (instances_root, instances_root / "busy") for p in folder.iterdir()
               if p.name.startswith(".restore-")]
    assert staging, "the restore left its swap before it could be held there; make the archive bigger"
    assert running.process.poll() is None
    return frozen


@pytest.mark.docker
@pytest.mark.postgres
def test_a_start_waits_until_a_restore_has_stopped_swapped_and_started_the_instance(
        comfyui_double_image, docker_cleanup, worker_process, storage):
    from instances import docker_engine
    from tests.conftest import wait_for

    workers = [worker_process("default", "long"), worker_process("default", "long")]
    busy = instance_services.instance_create(instance_id="busy", image=comfyui_double_image)
    started = instance_services.instance_start(instance=busy)
    wait_for(lambda: Operation.objects.get(pk=started.pk).is_terminal, timeout=120, message="the first start")
    assert Operation.objects.get(pk=started.pk).status == Operation.Status.SUCCEEDED
    user = storage["instances"] / "busy" / "user" / "default"
    (user / "workflows" / "w.json").write_text('{"nodes": [], "v": 1}')
    with open(user / "big.bin", "wb") as big:  # 200 MB of zeros: a tiny archive that takes a while to unpack
        big.truncate(200 << 20)
    snapshot = snapshots.create(busy, kind="config")
    (user / "big.bin").unlink()
    (user / "workflows" / "w.json").write_text('{"nodes": [], "v": 2}')

    restore = services.snapshot_restore(snapshot=snapshot)
    frozen = _frozen_inside_the_swap(storage["instances"], workers, restore)
    try:
        start = instance_services.instance_start(instance=busy)
        wait_for(lambda: "Waiting for another operation on" in Operation.objects.get(pk=start.pk).log, timeout=30,
                 message="the start to wait for the restore's lock")
        time.sleep(1)  # long enough for a start that did not wait to make a container run
        engine = docker_engine.require_engine()
        assert not docker_engine.container_state(engine, busy.container_name).running  # stopped for the swap
        assert Operation.objects.get(pk=start.pk).status == Operation.Status.RUNNING
    finally:
        resumed = datetime.datetime.now(datetime.timezone.utc)
        for each in frozen:
            os.kill(each, signal.SIGCONT)
    for operation in (restore, start):
        wait_for(lambda: Operation.objects.get(pk=operation.pk).is_terminal, timeout=120, message=operation.kind)
    restore.refresh_from_db()
    start.refresh_from_db()
    assert restore.status == Operation.Status.SUCCEEDED, restore.error
    assert start.status == Operation.Status.SUCCEEDED, start.error
    assert restore.result["restarted"] is True and start.started_at < restore.finished_at
    # The start found running the container the restore had started once the files were back.
    assert "The container is already running." in start.log
    container = docker_engine.container_state(engine, busy.container_name)
    assert container.running and datetime.datetime.fromisoformat(container.started_at) > resumed
    assert json.loads((user / "workflows" / "w.json").read_text())["v"] == 1
    engine.close()
