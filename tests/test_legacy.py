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

from instances.models import Instance
from storage_app import migration, services
from tests.conftest import REPO, worker_database_url

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
                         "files"}


def test_migrate_moves_by_rename_and_registers_the_instance(legacy, storage, settings):
    from instances.services import port_bound_on_host

    first_port_free = not port_bound_on_host("127.0.0.1", 18188)  # other test sessions may hold it
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
        assert instance.host_port == 18188  # the first port of the range: 8188 outside tests
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


def test_files_without_read_permission_are_reported_and_left(storage):
    import tempfile

    base = Path(tempfile.mkdtemp())  # outside pytest's root-only folders, so an ordinary user can walk it
    os.chmod(base, 0o755)
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
