"""`manage.py snapshots`: the snapshot services from a shell, with the exit codes and JSON that docs/cli.md promises.

Real instance folders, real archives, real git repositories for custom nodes, and real RQ workers: in this process
(`run_worker`) after `--no-wait`, or a separate worker process that the command waits for.
"""
import json
import uuid
from functools import partial

import pytest

from comfyhub.models import Operation
from instances import customnodes, services as instance_services
from instances.models import CustomNode, Instance
from storage_app import layout, snapshots
from storage_app.models import Snapshot
from tests.support.cli import run, run_process
from tests.support.gitrepos import make_node_repo

pytestmark = pytest.mark.django_db(transaction=True)

SNAPSHOT_KEYS = {"id", "instance", "instance_exists", "kind", "include_output", "size", "sha256", "created_at", "note",
                 "automatic", "archive"}


snaps = partial(run, "snapshots")
snaps_process = partial(run_process, "snapshots")


@pytest.fixture
def studio(storage):
    instance = instance_services.instance_create(instance_id="studio", gpu_indexes=[2], extra_env={"TEAM": "a"})
    layout.build_instance_tree("studio")
    root = storage["instances"] / "studio"
    (root / "user" / "default" / "workflows" / "w.json").write_text('{"nodes": []}')
    (root / "output" / "image.png").write_bytes(b"png")
    return instance


@pytest.fixture
def workflow_file(storage):
    return storage["instances"] / "studio" / "user" / "default" / "workflows" / "w.json"


# --- create --------------------------------------------------------------------------------------------------------

def test_create_waits_for_the_worker_and_prints_the_archive(studio, worker_process):
    worker_process()

    result = snaps_process("create", "studio", "--kind", "full", "--output", "--note", "before the upgrade")

    assert result.code == 0, result.err
    snapshot = Snapshot.objects.get()
    assert (snapshot.kind, snapshot.include_output, snapshot.note) == ("full", True, "before the upgrade")
    assert "Create snapshot 'studio': operation" in result.out
    assert "Create snapshot 'studio' succeeded." in result.out
    assert f"Snapshot {snapshot.pk}: {snapshot.archive} (" in result.out
    assert f"sha256 {snapshot.sha256})" in result.out
    assert snapshots.archive_path(snapshot).is_file()


def test_create_without_waiting_makes_a_config_snapshot_by_default(studio, run_worker):
    result = snaps("create", "studio", "--no-wait")

    assert result.code == 0
    operation = Operation.objects.get(pk=uuid.UUID(result.out.strip()))
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert Snapshot.objects.get().kind == "config"


@pytest.mark.parametrize("args, message", [
    (["studio", "--kind", "weekly"], "kind: 'weekly' is not a snapshot kind; use config or full."),
    (["studio", "--note", "x" * 301], "note: Keep the note under 300 characters."),
    (["nope"], "No instance 'nope'. Known: studio"),
])
def test_create_refuses_bad_input_with_exit_code_2(studio, args, message):
    result = snaps("create", *args)

    assert result.code == 2
    assert result.err == message
    assert not Operation.objects.exists()


# --- list ----------------------------------------------------------------------------------------------------------

def test_list_json_holds_the_documented_keys_newest_first(studio):
    other = instance_services.instance_create(instance_id="other")
    layout.build_instance_tree("other")
    first = snapshots.create(studio, kind="config", note="first")
    second = snapshots.create(studio, kind="full", include_output=True)
    snapshots.create(other, kind="config")

    data = json.loads(snaps("list", "studio", "--json").out)

    assert [item["id"] for item in data] == [second.pk, first.pk]
    assert all(set(item) == SNAPSHOT_KEYS for item in data)
    newest = data[0]
    assert (newest["instance"], newest["kind"], newest["include_output"], newest["automatic"]) == (
        "studio", "full", True, "")
    assert (newest["size"], newest["sha256"], newest["archive"]) == (second.size, second.sha256, second.archive)
    assert newest["created_at"].endswith("+00:00") and newest["instance_exists"] is True
    assert data[1]["note"] == "first"
    assert len(json.loads(snaps("list", "--json").out)) == 3


def test_list_keeps_the_snapshots_of_a_deleted_instance(studio):
    snapshot = snapshots.create(studio, kind="config")
    Instance.objects.filter(pk=studio.pk).delete()

    [item] = json.loads(snaps("list", "studio", "--json").out)
    table = snaps("list").out.splitlines()

    assert item["id"] == snapshot.pk and item["instance_exists"] is False
    assert table[0].split() == ["SNAPSHOT", "INSTANCE", "KIND", "SIZE", "CREATED", "NOTE"]
    assert table[1].split()[:3] == [str(snapshot.pk), "studio", "(deleted)"]


def test_list_of_an_unknown_instance_exits_2(studio):
    result = snaps("list", "nope")

    assert result.code == 2
    assert result.err == "No instance 'nope'. Known: studio"


# --- restore and clone ---------------------------------------------------------------------------------------------

def test_restore_puts_the_files_back_and_names_the_undo_snapshot(studio, workflow_file, worker_process):
    snapshot = snapshots.create(studio, kind="config")
    workflow_file.write_text('{"nodes": [], "changed": true}')
    worker_process()

    result = snaps("restore", str(snapshot.pk))

    assert result.code == 0, result.err
    assert json.loads(workflow_file.read_text()) == {"nodes": []}
    undo = Snapshot.objects.get(automatic="before-restore")
    assert "Restore snapshot 'studio' succeeded." in result.out
    assert f"Restored user; to undo, restore snapshot {undo.pk}." in result.out


def test_restore_as_clones_into_a_new_instance_with_the_gpus_given(studio, worker_process, storage):
    snapshot = snapshots.create(studio, kind="config")
    worker_process()

    result = snaps("restore", str(snapshot.pk), "--as", "studio-copy", "--gpus", "1")

    assert result.code == 0, result.err
    clone = Instance.objects.get(instance_id="studio-copy")
    assert [gpu.index for gpu in clone.assigned_gpus()] == [1]
    assert clone.extra_env == {"TEAM": "a"}
    assert (storage["instances"] / "studio-copy" / "user" / "default" / "workflows" / "w.json").is_file()
    assert (f"Created instance 'studio-copy' on port {clone.host_port}, GPUs 1. Start it with: python manage.py "
            "instances start studio-copy") in result.out


@pytest.mark.parametrize("args, message", [
    (["--as", "Bad_Id"], "new_instance_id: Use lowercase letters a-z, digits and '-'"),
    (["--as", "studio"], "new_instance_id: An instance 'studio' already exists; pick another id."),
    (["--as", "fresh", "--gpus", "first"], "gpus: GPUs are given by index"),
    (["--gpus", "1"], "gpus: --gpus applies to a clone only (--as NEW_ID); a restore keeps the instance's GPUs."),
])
def test_restore_refuses_bad_input_with_exit_code_2(studio, args, message):
    snapshot = snapshots.create(studio, kind="config")

    result = snaps("restore", str(snapshot.pk), *args)

    assert result.code == 2
    assert result.err.startswith(message)
    assert not Operation.objects.exists()


def test_restoring_into_a_deleted_instance_says_to_clone_instead(studio):
    snapshot = snapshots.create(studio, kind="config")
    Instance.objects.filter(pk=studio.pk).delete()

    result = snaps("restore", str(snapshot.pk))

    assert result.code == 2
    assert result.err == ("snapshot: Instance 'studio' no longer exists; clone the snapshot into a new instance "
                          "instead.")


@pytest.mark.parametrize("action", [["restore"], ["delete", "--yes"], ["export-manager", "-"]])
@pytest.mark.parametrize("number", ["999", "latest"])
def test_an_unknown_snapshot_names_the_known_ones(studio, action, number):
    snapshot = snapshots.create(studio, kind="config")

    result = snaps(action[0], number, *action[1:])

    assert result.code == 2
    assert result.err == f"No snapshot '{number}'. Known: {snapshot.pk}"


# --- delete --------------------------------------------------------------------------------------------------------

def test_delete_refuses_without_yes_and_keeps_the_archive(studio):
    snapshot = snapshots.create(studio, kind="config")

    result = snaps_process("delete", str(snapshot.pk), timeout=60)

    assert result.code == 2
    assert result.err.strip() == (f"This deletes snapshot {snapshot.pk} and its archive {snapshot.archive} for good; "
                                  "add --yes to confirm.")
    assert Snapshot.objects.filter(pk=snapshot.pk).exists()
    assert snapshots.archive_path(snapshot).is_file()


def test_delete_with_yes_removes_the_row_and_the_archive(studio):
    snapshot = snapshots.create(studio, kind="config")
    archive = snapshots.archive_path(snapshot)

    result = snaps("delete", str(snapshot.pk), "--yes")

    assert result.code == 0, result.err
    assert result.out.strip() == f"Deleted snapshot {snapshot.pk} and its archive {snapshot.archive}."
    assert not Snapshot.objects.exists()
    assert not archive.exists()


# --- ComfyUI-Manager snapshots -------------------------------------------------------------------------------------

@pytest.fixture
def repo(tmp_path, node_git):
    return make_node_repo(tmp_path / "repos")


def test_export_manager_writes_the_custom_nodes_as_comfyui_manager_json(studio, repo, tmp_path):
    url, commits = repo
    node = customnodes.install(studio, url, "v1")
    customnodes.set_enabled(node, False)
    snapshot = snapshots.create(studio, kind="full")
    target = tmp_path / "manager.json"

    result = snaps("export-manager", str(snapshot.pk), str(target))

    assert result.code == 0, result.err
    assert result.out.strip() == f"Wrote 1 custom node(s) to {target}."
    data = json.loads(target.read_text())
    assert data["git_custom_nodes"] == {url: {"hash": commits["v1"], "disabled": True}}
    assert set(data) == {"comfyui", "git_custom_nodes", "file_custom_nodes", "pips"}
    assert json.loads(snaps("export-manager", str(snapshot.pk), "-").out) == data


@pytest.mark.docker
def test_export_manager_names_the_comfyui_version_the_running_instance_reports(comfyui_double_image, docker_cleanup,
                                                                               run_worker, tmp_path):
    running = instance_services.instance_create(instance_id="busy", image=comfyui_double_image)
    operation = instance_services.instance_start(instance=running)
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    running.refresh_from_db()
    snapshot = snapshots.create(running, kind="config")
    target = tmp_path / "manager.json"

    result = snaps("export-manager", str(snapshot.pk), str(target))

    assert result.code == 0, result.err
    assert snapshot.manifest["comfyui_version"] == "0.0.0-testdouble"  # what the double's /system_stats says
    assert json.loads(target.read_text())["comfyui"] == "0.0.0-testdouble"


def test_import_manager_installs_the_nodes_at_their_commits(studio, repo, tmp_path, worker_process):
    url, commits = repo
    manager = tmp_path / "manager.json"
    manager.write_text(json.dumps({"comfyui": "", "git_custom_nodes": {url: {"hash": commits["v1"],
                                                                            "disabled": False}}}))
    worker_process()

    result = snaps("import-manager", "studio", str(manager))

    assert result.code == 0, result.err
    assert "Import ComfyUI-Manager snapshot 'studio' succeeded." in result.out
    assert f"  {url}: installed at {commits['v1'][:12]}" in result.out
    node = CustomNode.objects.get(instance=studio)
    assert (node.name, node.commit) == ("ComfyUI-Test-Nodes", commits["v1"])


@pytest.mark.parametrize("content, message", [
    ("{not json", "file: The snapshot file {path} is not valid JSON: "),
    ('["a list"]', "file: Not a ComfyUI-Manager snapshot: the JSON is a list, not an object with 'git_custom_nodes'."),
    ('{"git_custom_nodes": []}', "file: Not a ComfyUI-Manager snapshot: 'git_custom_nodes' is a list; it should be "
                                 "an object of git URLs"),
    ('{"git_custom_nodes": {"https://example.com/a/b": {"hash": 5}}}',
     "file: 'git_custom_nodes' → 'https://example.com/a/b' → 'hash' is a number; it should be a commit"),
    ("[" * 5000 + "]" * 5000, "file: The snapshot file {path} nests 5,000 levels deep; at most 64 are taken "
                              "(UPLOAD_MAX_DEPTH)."),
])
def test_import_manager_refuses_a_bad_file_with_exit_code_2(studio, tmp_path, content, message):
    manager = tmp_path / "manager.json"
    manager.write_text(content)

    result = snaps("import-manager", "studio", str(manager))

    assert result.code == 2
    assert result.err.startswith(message.format(path=manager))
    assert not Operation.objects.exists()


def test_import_manager_of_a_missing_file_exits_2(studio, tmp_path):
    result = snaps("import-manager", "studio", str(tmp_path / "nope.json"))

    assert result.code == 2
    assert result.err == f"file: Cannot read {tmp_path / 'nope.json'}: No such file or directory."
