"""Migrating a single-instance install: the plan, moves vs copies, conflicts, and resuming after SIGKILL."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.core.management import call_command

from comfyhub.operations import OperationError
from instances.models import Instance
from storage_app import migration, services
from tests.conftest import REPO, worker_database_url
from tests import testenv

pytestmark = pytest.mark.django_db(transaction=True)


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture
def legacy(tmp_path):
    """The seed's ./data tree: data/comfy/<folders> and the same folders directly under data/."""
    data = tmp_path / "data"
    write(data / "comfy" / "models" / "checkpoints" / "base.safetensors", b"checkpoint" * 100)
    write(data / "comfy" / "models" / "loras" / "style.pt", b"lora")
    write(data / "comfy" / "custom_nodes" / "NodePack" / "__init__.py", b"# node")
    write(data / "comfy" / "custom_nodes" / "NodePack" / "weights" / "bundled.safetensors", b"bundled")
    write(data / "comfy" / "user" / "default" / "workflows" / "w.json", b"{}")
    write(data / "comfy" / "output" / "ComfyUI_00001_.png", b"png")
    write(data / "comfy" / "temp" / "scratch.png", b"tmp")
    write(data / "input" / "photo.png", b"photo")
    os.symlink("/etc/hostname", data / "comfy" / "models" / "loras" / "outside.pt")
    return data


def digests(root):
    return sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
                  and not p.is_symlink())


def test_the_plan_counts_bytes_per_destination_and_lists_every_conflict(legacy, storage):
    write(storage["shared"] / "models" / "loras" / "style.pt", b"lora")  # same content
    write(storage["shared"] / "models" / "checkpoints" / "base.safetensors", b"different")  # different content
    plan = services.legacy_plan(source=str(legacy), instance_id="comfy").as_dict()
    assert plan["layout"] == "legacy-data"
    assert plan["totals"]["shared-models"] == {"files": 2, "bytes": 1004, "deduplicated": 1, "renamed": 1}
    assert plan["totals"]["shared-input"]["files"] == 1
    assert plan["totals"]["instance:custom_nodes"]["files"] == 2
    assert plan["totals"]["instance:user"]["files"] == 1 and plan["totals"]["instance:output"]["files"] == 1
    kinds = {c["kind"]: c for c in plan["conflicts"]}
    assert kinds["same content already there"]["resolution"] == "deduplicated: nothing copied"
    assert kinds["different content already there"]["renamed_to"].endswith("base (legacy).safetensors")
    assert kinds["symlink"]["resolution"] == "reported, not followed"
    assert [r["path"] for r in plan["reports"]] == [str(legacy / "comfy/custom_nodes/NodePack/weights/bundled.safetensors")]
    assert plan["not_carried"] == [str(legacy / "comfy" / "temp")]
    assert (legacy / "comfy" / "models" / "loras" / "style.pt").exists()  # planning moves nothing


def test_the_plan_is_available_as_json_from_the_command(legacy, capsys):
    call_command("legacy", "plan", "--from", str(legacy), "--json")
    plan = json.loads(capsys.readouterr().out)
    assert set(plan) == {"source", "layout", "instance_id", "mode", "totals", "conflicts", "reports", "not_carried",
                         "previous", "files", "files_total", "conflicts_total", "reports_total"}
    assert plan["previous"] is None and plan["files_total"] == len(plan["files"]) == 7


def test_migrate_moves_by_rename_and_registers_the_instance(legacy, storage, settings):
    from instances.services import port_bound_on_host

    first_port_free = not port_bound_on_host("127.0.0.1", testenv.PORT_RANGE[0])  # other test sessions may hold it
    inode = os.stat(legacy / "comfy" / "models" / "checkpoints" / "base.safetensors").st_ino
    result = services.legacy_migrate_now(source=str(legacy), instance_id="comfy")
    moved = storage["shared"] / "models" / "checkpoints" / "base.safetensors"
    assert os.stat(moved).st_ino == inode  # renamed, not copied
    assert (storage["shared"] / "input" / "photo.png").read_bytes() == b"photo"
    assert (storage["instances"] / "comfy" / "user" / "default" / "workflows" / "w.json").exists()
    assert (storage["instances"] / "comfy" / "custom_nodes" / "NodePack" / "__init__.py").exists()
    assert not (storage["instances"] / "comfy" / "temp" / "scratch.png").exists()
    assert (legacy / "comfy" / "temp" / "scratch.png").exists()  # temp is left where it was
    assert not (legacy / "comfy" / "models" / "checkpoints").exists()  # emptied folders are removed...
    assert (legacy / "comfy" / "models" / "loras" / "outside.pt").is_symlink()  # ...links are left, not followed
    instance = Instance.objects.get(instance_id="comfy")
    assert result["port"] == instance.host_port
    if first_port_free:
        assert instance.host_port == testenv.PORT_RANGE[0]  # the first port of the range: 8188 outside tests
    assert os.path.exists(result["report"]) and os.path.exists(result["journal"])


def test_copy_mode_keeps_the_source(legacy, storage):
    before = digests(legacy)
    services.legacy_migrate_now(source=str(legacy), instance_id="comfy", mode="copy")
    assert digests(legacy) == before
    assert (storage["shared"] / "models" / "loras" / "style.pt").read_bytes() == b"lora"


def test_a_plain_comfyui_folder_is_recognised(tmp_path, storage):
    install = tmp_path / "ComfyUI"
    write(install / "main.py", b"")
    write(install / "models" / "vae" / "v.pt", b"vae")
    write(install / "user" / "default" / "comfy.settings.json", b"{}")
    plan = services.legacy_plan(source=str(install), instance_id="old").as_dict()
    assert plan["layout"] == "comfyui"
    services.legacy_migrate_now(source=str(install), instance_id="old")
    assert (storage["shared"] / "models" / "vae" / "v.pt").exists()
    assert (storage["instances"] / "old" / "user" / "default" / "comfy.settings.json").exists()


def test_a_folder_that_is_not_an_install_is_a_clear_error(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(services.ValidationError, match="not a ComfyUI install or a legacy data folder"):
        services.legacy_plan(source=str(tmp_path / "random"))
    with pytest.raises(services.ValidationError, match="is not a folder"):
        services.legacy_plan(source=str(tmp_path / "absent"))


def test_files_without_read_permission_are_reported_and_left(storage, settings):
    import tempfile

    base = Path(tempfile.mkdtemp())  # outside pytest's root-only folders, so an ordinary user can walk it
    os.chmod(base, 0o755)
    for name, sub in (("COMFY_SHARED_PATH", "shared"), ("COMFY_INSTANCES_PATH", "instances")):
        setattr(settings, name, base / "storage" / sub)
    install = base / "ComfyUI"
    write(install / "models" / "vae" / "open.pt", b"open")
    locked = write(install / "models" / "vae" / "locked.pt", b"locked")
    locked.chmod(0)
    # Permission bits mean nothing to root: plan in a child that drops to an ordinary user, as a non-root
    # ComfyHub would run.
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(reader)
            os.setgid(65534)
            os.setuid(65534)
            os.write(writer, json.dumps(migration.make_plan(install, instance_id="old").as_dict()).encode())
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        plan = json.loads(pipe.read())
    os.waitpid(pid, 0)
    shutil.rmtree(base)
    unreadable = [c for c in plan["conflicts"] if c["kind"] == "unreadable"]
    assert [c["path"] for c in unreadable] == [str(locked)]
    assert [f["source"] for f in plan["files"]] == [str(install / "models" / "vae" / "open.pt")]


def test_across_filesystems_files_are_copied_verified_then_removed(legacy, storage, tmp_path, settings):
    fast = tmp_path / "other-fs"
    fast.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(fast)], check=True)
    try:
        settings.COMFY_SHARED_PATH = fast / "shared"
        settings.COMFY_INSTANCES_PATH = fast / "instances"
        before = sorted(digests(legacy / "comfy" / "models") + digests(legacy / "input"))
        services.legacy_migrate_now(source=str(legacy), instance_id="comfy")
        assert digests(fast / "shared") == before
        assert not (legacy / "comfy" / "models" / "checkpoints").exists()
        assert not list(fast.rglob("*.comfyhub-partial"))
    finally:
        subprocess.run(["umount", str(fast)], check=True)


@pytest.mark.parametrize("kill_after_lines", [1, 7, 15, 30])
def test_a_migration_killed_at_any_point_loses_nothing_and_a_second_run_finishes(tmp_path, storage,
                                                                                 kill_after_lines):
    source = tmp_path / "data"
    contents = {}
    for number in range(40):
        relpath = f"comfy/models/loras/file-{number:02}.pt" if number % 2 else f"comfy/user/default/f{number:02}.json"
        contents[relpath] = os.urandom(256 << 10)
        write(source / relpath, contents[relpath])
    other_fs = tmp_path / "dest"
    other_fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(other_fs)], check=True)
    env = {**os.environ, "DATABASE_URL": worker_database_url(), "COMFY_SHARED_PATH": str(other_fs / "shared"),
           "COMFY_INSTANCES_PATH": str(other_fs / "instances")}
    try:
        command = [sys.executable, "manage.py", "legacy", "migrate", "--from", str(source)]
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        journal = None
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            journal = next(iter(storage_journals()), None)
            if journal and sum(1 for _ in open(journal)) >= kill_after_lines:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL, "the migration finished before it could be killed"
        # Every file whole in exactly one place (or, between copy and removal, identical in both).
        for relpath, content in contents.items():
            here = source / relpath
            there = (other_fs / "shared" / "models" / relpath.split("comfy/models/")[1]) if "models" in relpath else \
                (other_fs / "instances" / "comfy" / relpath.split("comfy/")[1])
            assert here.exists() or there.exists(), relpath
            for path in (here, there):
                if path.exists():
                    assert path.read_bytes() == content, path
        finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert finished.returncode == 0, finished.stderr
        for relpath, content in contents.items():
            there = (other_fs / "shared" / "models" / relpath.split("comfy/models/")[1]) if "models" in relpath else \
                (other_fs / "instances" / "comfy" / relpath.split("comfy/")[1])
            assert there.read_bytes() == content
            assert not (source / relpath).exists()
        assert not list(other_fs.rglob("*.comfyhub-partial"))
        assert not [p for p in other_fs.rglob("*") if "(legacy" in p.name]  # nothing duplicated
    finally:
        subprocess.run(["umount", str(other_fs)], check=True)


def storage_journals():
    from django.conf import settings

    return sorted((settings.DATA_DIR / "migrations").glob("*/journal.jsonl"), key=os.path.getmtime, reverse=True)


# --- Sources that overlap ComfyHub's storage -------------------------------------------------------------------

@pytest.fixture
def filled_storage(storage, tmp_path):
    """Each storage root holding files that a migration from it would take for duplicates of themselves."""
    files = {
        storage["shared"] / "models" / "loras" / "only-copy.safetensors": b"the only copy",
        storage["shared"] / "input" / "photo.png": b"photo",
        storage["instances"] / "comfy" / "user" / "default" / "workflows" / "w.json": b"{}",
        storage["instances"] / "comfy" / "models" / "checkpoints" / "inbox.safetensors": b"inbox",
        storage["instances"] / "comfy" / "custom_nodes" / "Pack" / "__init__.py": b"# node",
        storage["backups"] / "comfy" / "models" / "vae" / "v.pt": b"vae",
    }
    for path, content in files.items():
        write(path, content)
    os.symlink(storage["shared"], tmp_path / "link-to-shared")
    return files


OVERLAPPING_SOURCES = {
    "the shared folder": ("{shared}", "is the shared library (COMFY_SHARED_PATH)"),
    "the instances folder": ("{instances}", "is the instances' folders (COMFY_INSTANCES_PATH)"),
    "the backups folder": ("{backups}", "is the snapshots folder (COMFY_BACKUPS_PATH)"),
    "an instance's own folder": ("{instances}/comfy", "is inside the instances' folders (COMFY_INSTANCES_PATH)"),
    "a folder inside the shared folder": ("{shared}/models", "is inside the shared library (COMFY_SHARED_PATH)"),
    "a folder containing the storage roots": ("{storage}", "contains the shared library (COMFY_SHARED_PATH)"),
    "a link to the shared folder": ("{tmp}/link-to-shared", "(a link to {shared}) is the shared library"),
    "the project folder": ("{project}", "is ComfyHub's project folder"),
    "the data folder": ("{data}", "is ComfyHub's data folder (COMFYHUB_DATA_DIR)"),
}


def overlapping(name, storage, tmp_path):
    from django.conf import settings

    source, message = OVERLAPPING_SOURCES[name]
    values = {"shared": storage["shared"], "instances": storage["instances"], "backups": storage["backups"],
              "storage": storage["shared"].parent, "tmp": tmp_path, "project": settings.BASE_DIR,
              "data": settings.DATA_DIR}
    return source.format(**values), message.format(**values)


def contents(files):
    return {path: path.read_bytes() for path in files}


@pytest.mark.parametrize("name", OVERLAPPING_SOURCES)
def test_migrating_from_comfyhubs_own_storage_is_refused_with_exit_code_2_and_nothing_deleted(
        name, filled_storage, storage, tmp_path, capsys):
    from django.core.management.base import CommandError

    source, message = overlapping(name, storage, tmp_path)
    for action in ("plan", "migrate"):
        with pytest.raises(CommandError) as refused:
            call_command("legacy", action, "--from", source)
        assert refused.value.returncode == 2
        assert message in str(refused.value) and "Nothing was planned or moved" in str(refused.value)
    assert contents(filled_storage) == filled_storage
    assert not Instance.objects.exists()


def test_the_command_exits_2_naming_the_shared_folder(filled_storage, storage):
    env = {**os.environ, "DATABASE_URL": worker_database_url()}
    finished = subprocess.run([sys.executable, "manage.py", "legacy", "migrate", "--from", str(storage["shared"])],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    assert f"{storage['shared']} is the shared library (COMFY_SHARED_PATH)" in finished.stderr
    assert contents(filled_storage) == filled_storage


def test_a_bind_mount_of_the_shared_folder_is_refused_as_the_same_folder(filled_storage, storage, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["mount", "--bind", str(storage["shared"]), str(elsewhere)], check=True)
    try:
        with pytest.raises(services.ValidationError, match=r"elsewhere is the shared library \(COMFY_SHARED_PATH\)"):
            services.legacy_migrate_now(source=str(elsewhere), instance_id="comfy")
        with pytest.raises(services.ValidationError, match="elsewhere/models is inside the shared library"):
            services.legacy_plan(source=str(elsewhere / "models"))
    finally:
        subprocess.run(["umount", str(elsewhere)], check=True)
    assert contents(filled_storage) == filled_storage


def test_the_executor_never_deletes_a_file_that_is_its_own_duplicate(filled_storage, storage, tmp_path):
    """Defence in depth: a plan the source check would refuse (built by hand here; a bind mount in real life) still
    deletes nothing."""
    only_copy = storage["shared"] / "models" / "loras" / "only-copy.safetensors"
    same_path = migration.Plan(source=str(storage["shared"]), layout="comfyui", instance_id="comfy", mode="move",
                               entries=[migration.Entry(str(only_copy), str(only_copy), 13, "dedupe", "shared-models")])
    with pytest.raises(migration.MigrationError, match="same file as its destination"):
        migration.execute(same_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["mount", "--bind", str(storage["shared"]), str(elsewhere)], check=True)
    try:
        twin = elsewhere / "models" / "loras" / "only-copy.safetensors"
        for action in ("dedupe", "move"):
            same_inode = migration.Plan(source=str(elsewhere), layout="comfyui", instance_id="comfy", mode="move",
                                        entries=[migration.Entry(str(twin), str(only_copy), 13, action,
                                                                 "shared-models")])
            with pytest.raises(migration.MigrationError, match=f"Refusing to delete {twin}: it is the same file"):
                migration.execute(same_inode)
    finally:
        subprocess.run(["umount", str(elsewhere)], check=True)
    assert contents(filled_storage) == filled_storage


def test_legacy_source_roots_limits_where_a_source_may_be(legacy, tmp_path, settings, storage):
    settings.LEGACY_SOURCE_ROOTS = [tmp_path / "imports"]
    with pytest.raises(services.ValidationError) as refused:
        services.legacy_plan(source=str(legacy))
    assert f"{legacy} is outside the folders LEGACY_SOURCE_ROOTS allows ({tmp_path / 'imports'})" in \
        " ".join(refused.value.messages)
    moved = tmp_path / "imports" / "data"
    moved.parent.mkdir()
    legacy.rename(moved)
    assert services.legacy_plan(source=str(moved)).entries


# --- Resuming --------------------------------------------------------------------------------------------------

def test_a_rerun_finishes_a_migration_that_stopped_after_emptying_the_source(legacy, storage):
    """A real fault late in the run (the report cannot be written: its name is taken by a folder) stops it after
    every file was carried and the source's folders were removed; the rerun resumes from the journal."""
    (legacy / "comfy" / "models" / "loras" / "outside.pt").unlink()  # a link is left behind, with its folder
    env = {**os.environ, "DATABASE_URL": worker_database_url()}
    command = [sys.executable, "manage.py", "legacy", "migrate", "--from", str(legacy)]
    obstacle = migration.journal_dir(str(legacy)) / "report.json"
    obstacle.mkdir(parents=True)
    stopped = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert "Run the same command again to resume" in stopped.stderr
    with pytest.raises(migration.MigrationError, match="holds none of models/"):
        migration.source_folders(legacy)  # emptied: only temp/ (not carried) is left
    assert migration.journal_summary(legacy)["unfinished"]
    obstacle.rmdir()
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "Resuming an interrupted migration" in finished.stdout
    assert "7 file(s) were already carried by it." in finished.stdout
    assert "Done: 0 moved" in finished.stdout
    assert (storage["shared"] / "models" / "checkpoints" / "base.safetensors").read_bytes() == b"checkpoint" * 100
    assert (storage["instances"] / "comfy" / "user" / "default" / "workflows" / "w.json").read_bytes() == b"{}"
    assert not migration.journal_summary(legacy)["unfinished"]
    assert Instance.objects.filter(instance_id="comfy").exists()


def test_an_interrupted_migration_is_finished_with_the_instance_it_started_with(legacy, storage):
    obstacle = migration.journal_dir(str(legacy)) / "report.json"
    obstacle.mkdir(parents=True)
    with pytest.raises(OperationError, match="The migration stopped: .*report.json"):
        services.legacy_migrate_now(source=str(legacy), instance_id="comfy")
    obstacle.rmdir()
    with pytest.raises(services.ValidationError, match="run it again with --instance-id comfy --mode move"):
        services.legacy_plan(source=str(legacy), instance_id="other")


# --- Links planted in the destination --------------------------------------------------------------------------

def test_a_link_planted_in_the_destination_refuses_that_entry_and_writes_nothing_through_it(legacy, storage,
                                                                                             tmp_path):
    from storage_app import layout

    canary = tmp_path / "canary"
    write(canary / "keep.txt", b"host file")
    services.legacy_register(instance_id="comfy")  # what the container sees: its own folder, links planted in it
    layout.build_instance_tree("comfy")
    instance = storage["instances"] / "comfy"
    os.symlink(canary, instance / "custom_nodes" / "NodePack")
    os.symlink(canary / "keep.txt", instance / "user" / "default" / "workflows" / "w.json")
    plan = services.legacy_plan(source=str(legacy), instance_id="comfy")
    refused = {c["path"]: c["resolution"] for c in plan.conflicts if c["kind"] == "link in the destination"}
    assert f"{instance / 'custom_nodes' / 'NodePack'} is a link" in \
        refused[str(legacy / "comfy/custom_nodes/NodePack/__init__.py")]
    assert f"{instance / 'user/default/workflows/w.json'} is a link" in \
        refused[str(legacy / "comfy/user/default/workflows/w.json")]
    assert len(refused) == 3  # and the node's bundled weights
    result = services.legacy_migrate_now(source=str(legacy), instance_id="comfy")
    assert (legacy / "comfy" / "user" / "default" / "workflows" / "w.json").read_bytes() == b"{}"  # left in place
    assert (legacy / "comfy" / "custom_nodes" / "NodePack" / "__init__.py").read_bytes() == b"# node"
    assert sorted(p.name for p in canary.iterdir()) == ["keep.txt"]
    assert (canary / "keep.txt").read_bytes() == b"host file"
    assert result["moved"] == 4  # everything else was carried


def test_a_link_where_the_instance_needs_a_folder_refuses_the_migration_before_anything_moves(legacy, storage,
                                                                                               tmp_path):
    from django.core.management.base import CommandError

    from storage_app import layout

    canary = tmp_path / "canary"
    canary.mkdir()
    services.legacy_register(instance_id="comfy")
    layout.build_instance_tree("comfy")
    workflows = storage["instances"] / "comfy" / "user" / "default" / "workflows"
    workflows.rmdir()
    os.symlink(canary, workflows)
    before = digests(legacy)
    with pytest.raises(CommandError) as refused:
        call_command("legacy", "migrate", "--from", str(legacy))
    assert refused.value.returncode == 2 and f"{workflows} is a link" in str(refused.value)
    assert digests(legacy) == before and list(canary.iterdir()) == []


def test_a_link_planted_after_planning_is_refused_when_carrying(legacy, storage, tmp_path):
    from storage_app import layout

    canary = tmp_path / "canary"
    canary.mkdir()
    layout.build_shared_tree()
    layout.build_instance_tree("comfy")
    plan = services.legacy_plan(source=str(legacy), instance_id="comfy")
    loras = storage["shared"] / "models" / "loras"
    loras.rmdir()
    os.symlink(canary, loras)
    result = migration.execute(plan)
    assert [r["path"] for r in result["refused"]] == [str(legacy / "comfy/models/loras/style.pt")]
    assert f"{loras} is a link" in result["refused"][0]["reason"]
    assert list(canary.iterdir()) == []
    assert (legacy / "comfy" / "models" / "loras" / "style.pt").read_bytes() == b"lora"
