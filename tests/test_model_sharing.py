"""What instances see of the shared library, and moving their own downloads (the inbox) into it."""
import hashlib
import os
import shutil

import pytest

from comfyhub.models import Operation
from instances import health, services as instance_services
from storage_app import layout, library, services
from storage_app.models import ModelAsset

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def instance(storage):
    created = instance_services.instance_create(instance_id="studio")
    layout.build_shared_tree()
    layout.build_instance_tree("studio")
    return created


def put(root, relpath, content):
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_the_inbox_lists_model_files_nodes_downloaded_into_the_instance(instance, storage):
    inbox = storage["instances"] / "studio" / "models"
    put(inbox, "loras/downloaded.safetensors", b"d")
    put(inbox, "loras/notes.txt", b"n")
    assert library.inbox(instance) == [
        {"path": "loras/downloaded.safetensors", "folder": "loras", "size": 1, "problem": ""}]


def test_promote_copies_a_file_into_the_library_and_drops_the_inbox_copy(instance, storage, settings):
    source = put(storage["instances"] / "studio" / "models", "loras/new.safetensors", b"fresh")
    os.chown(source, settings.PUID, settings.PGID)
    inode = os.stat(source).st_ino
    result = library.promote(instance, "loras/new.safetensors")
    target = storage["shared"] / "models" / "loras" / "new.safetensors"
    assert result["result"] == "moved" and not source.exists()
    # A copy, not the container's inode: nothing the container still holds (an open descriptor, another hard link
    # in its folder) can write the library's file, and the file is not the instance user's.
    info = os.stat(target)
    assert target.read_bytes() == b"fresh" and info.st_ino != inode and info.st_uid == os.geteuid()
    assert [p.name for p in target.parent.iterdir()] == ["new.safetensors"]  # no temporary file left
    row = ModelAsset.objects.get(path="loras/new.safetensors")
    assert row.sha256 == hashlib.sha256(b"fresh").hexdigest()


def test_promote_drops_a_duplicate_of_a_library_file(instance, storage):
    put(storage["shared"] / "models", "loras/same.pt", b"same")
    source = put(storage["instances"] / "studio" / "models", "loras/same.pt", b"same")
    assert library.promote(instance, "loras/same.pt")["result"] == "deduplicated"
    assert not source.exists()


def test_promote_keeps_the_name_of_content_the_library_has_under_another_as_a_hard_link(instance, storage):
    original = put(storage["shared"] / "models", "checkpoints/original.ckpt", b"identical")
    library.scan()
    library.verify()
    source = put(storage["instances"] / "studio" / "models", "checkpoints/renamed.ckpt", b"identical")
    result = library.promote(instance, "checkpoints/renamed.ckpt")
    assert result == {"result": "linked", "path": "checkpoints/renamed.ckpt", "same_as": "checkpoints/original.ckpt",
                      "sha256": hashlib.sha256(b"identical").hexdigest()}
    promoted = storage["shared"] / "models" / "checkpoints" / "renamed.ckpt"
    assert not source.exists() and not promoted.is_symlink()
    assert os.stat(promoted).st_ino == os.stat(original).st_ino and os.stat(original).st_nlink == 2
    assert ModelAsset.objects.get(path="checkpoints/renamed.ckpt").inode == os.stat(original).st_ino


def test_promote_copies_when_the_library_name_with_the_same_hash_no_longer_holds_those_bytes(instance, storage):
    original = put(storage["shared"] / "models", "checkpoints/original.ckpt", b"identical")
    library.scan()
    library.verify()
    original.write_bytes(b"rewritten")  # the record is stale: linking to it would give the instance other bytes
    source = put(storage["instances"] / "studio" / "models", "loras/renamed.ckpt", b"identical")
    assert library.promote(instance, "loras/renamed.ckpt")["result"] == "moved"
    promoted = storage["shared"] / "models" / "loras" / "renamed.ckpt"
    assert promoted.read_bytes() == b"identical" and original.read_bytes() == b"rewritten" and not source.exists()
    assert os.stat(promoted).st_ino != os.stat(original).st_ino


def test_promote_copies_rather_than_link_through_a_link_in_the_library(instance, storage, tmp_path):
    outside = put(tmp_path, "outside.ckpt", b"identical")
    put(storage["shared"] / "models", "checkpoints/original.ckpt", b"identical")
    library.scan()
    library.verify()
    # The recorded name is now a link out of the library: never followed, never linked to.
    (storage["shared"] / "models" / "checkpoints" / "original.ckpt").unlink()
    os.symlink(outside, storage["shared"] / "models" / "checkpoints" / "original.ckpt")
    put(storage["instances"] / "studio" / "models", "loras/renamed.ckpt", b"identical")
    assert library.promote(instance, "loras/renamed.ckpt")["result"] == "moved"
    promoted = storage["shared"] / "models" / "loras" / "renamed.ckpt"
    assert promoted.read_bytes() == b"identical" and not promoted.is_symlink()
    assert os.stat(promoted).st_ino != os.stat(outside).st_ino and os.stat(outside).st_nlink == 1


def test_promote_never_replaces_a_different_file(instance, storage):
    existing = put(storage["shared"] / "models", "vae/clash.pt", b"library version")
    source = put(storage["instances"] / "studio" / "models", "vae/clash.pt", b"instance version")
    with pytest.raises(library.PromoteError, match="already has a different file"):
        library.promote(instance, "vae/clash.pt")
    assert existing.read_bytes() == b"library version" and source.read_bytes() == b"instance version"


@pytest.mark.parametrize("bad", ["../../shared/models/x.pt", "/etc/passwd", "loras/../../x.pt", "x.pt",
                                 "loras/absent.pt", "notafolder/x.pt"])
def test_promote_refuses_paths_outside_the_inbox(instance, storage, bad):
    put(storage["instances"] / "studio" / "models", "notafolder/x.pt", b"x")
    with pytest.raises(library.PromoteError):
        library.promote(instance, bad)


def test_promote_refuses_a_symlink_in_the_inbox(instance, storage, tmp_path):
    outside = put(tmp_path, "outside.pt", b"outside")
    (storage["instances"] / "studio" / "models" / "loras").mkdir(parents=True, exist_ok=True)
    os.symlink(outside, storage["instances"] / "studio" / "models" / "loras" / "link.pt")
    with pytest.raises(library.PromoteError):
        library.promote(instance, "loras/link.pt")
    assert outside.exists()


def test_promote_runs_as_an_operation(instance, storage, run_worker, operator):
    put(storage["instances"] / "studio" / "models", "loras/op.pt", b"op")
    operation = services.models_promote(instance=instance, path="loras/op.pt", user=operator)
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert operation.result["result"] == "moved"
    with pytest.raises(services.ValidationError):
        services.models_promote(instance=instance, path="../x.pt")


@pytest.mark.docker
def test_a_running_instance_sees_the_library_and_a_hidden_verified_file_fails_isolation(
        comfyui_double_image, docker_cleanup, run_worker, storage):
    instance = instance_services.instance_create(instance_id="viewer", image=comfyui_double_image)
    models = storage["shared"] / "models"
    content = b"checkpoint"
    put(models, "checkpoints/seen.ckpt", content)
    put(models, "loras/also.safetensors", b"lora")
    put(storage["instances"] / "viewer" / "models", "loras/own.safetensors", b"own")
    library.scan()
    library.verify()
    ModelAsset.objects.filter(path="checkpoints/seen.ckpt").update(
        expected_sha256=hashlib.sha256(content).hexdigest(), expected_source="typed")
    library.verify(full=True)
    operation = instance_services.instance_start(instance=instance)
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error

    report = services.library_visibility(instance)
    if not report["reachable"]:
        print(instance_services.instance_logs(instance=instance, tail=50))
    assert report == {"reachable": True, "folders": {}, "unseen_verified": []}

    # A verified file the instance cannot list (here: unreadable to ComfyUI's directory walk) is flagged.
    hidden = ModelAsset.objects.create(path="checkpoints/ghost.ckpt", folder="checkpoints", size=1,
                                       sha256="a" * 64, status=ModelAsset.Status.VERIFIED)
    from storage_app.jobs import check_sharing as sharing

    operation = Operation.objects.create(kind="models_sharing")
    from comfyhub.operations import Report

    sharing.body(Report(operation.pk))
    health.reconcile_all()
    instance.refresh_from_db()
    check = next(c for c in instance.health["checks"] if c["check"] == "sees the verified shared library")
    assert not check["ok"] and "checkpoints/ghost.ckpt" in check["detail"]
    assert instance.status == instance.Status.UNHEALTHY
    assert instance.library_check["folders"]["checkpoints"]["missing"] == ["ghost.ckpt"]


# --- A hostile instance folder: links the container planted ---------------------------------------------------

@pytest.mark.parametrize("how", ["absolute", "relative"])
@pytest.mark.parametrize("level", ["models", "models/checkpoints"])
def test_promote_refuses_a_planted_link_at_any_level_and_moves_no_host_file(instance, storage, canary, level, how):
    link = storage["instances"] / "studio" / level
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists():
        shutil.rmtree(link)
    host = canary if level == "models" else canary / "checkpoints"  # either way checkpoints/host.safetensors
    os.symlink(host if how == "absolute" else os.path.relpath(host, link.parent), link)
    with pytest.raises(library.PromoteError) as refused:
        library.promote(instance, "checkpoints/host.safetensors")
    assert f"{link} is a link" in str(refused.value) and f"rm '{link}'" in str(refused.value)
    assert not (storage["shared"] / "models" / "checkpoints" / "host.safetensors").exists()
    assert ModelAsset.objects.count() == 0


def test_promote_refuses_a_link_as_the_file_itself(instance, storage, canary):
    link = storage["instances"] / "studio" / "models" / "loras" / "host.safetensors"
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(canary / "host.safetensors", link)
    with pytest.raises(library.PromoteError, match="host.safetensors is a link"):
        library.promote(instance, "loras/host.safetensors")
    assert not (storage["shared"] / "models" / "loras" / "host.safetensors").exists()


def test_promote_refuses_a_fifo_without_waiting_for_a_writer(instance, storage):
    fifo = storage["instances"] / "studio" / "models" / "loras" / "pipe.safetensors"
    fifo.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(fifo)
    with pytest.raises(library.PromoteError, match="not a regular file"):
        library.promote(instance, "loras/pipe.safetensors")


def test_promote_never_writes_through_a_link_in_the_shared_tree(instance, storage, canary):
    shutil.rmtree(storage["shared"] / "models" / "vae")
    os.symlink(canary / "sub", storage["shared"] / "models" / "vae")
    source = put(storage["instances"] / "studio" / "models", "vae/new.pt", b"instance file")
    with pytest.raises(library.PromoteError, match="vae is a link"):
        library.promote(instance, "vae/new.pt")
    assert source.read_bytes() == b"instance file"  # nothing lost


def test_the_inbox_lists_planted_links_as_problems_and_never_what_they_point_to(instance, storage, canary):
    models = storage["instances"] / "studio" / "models"
    (models / "loras").mkdir(parents=True, exist_ok=True)
    os.symlink(canary / "host.safetensors", models / "loras" / "host.safetensors")
    os.symlink(canary, models / "checkpoints")
    inbox = {item["path"]: item["problem"] for item in library.inbox(instance)}
    assert set(inbox) == {"checkpoints", "loras/host.safetensors"}
    assert f"rm '{models / 'loras' / 'host.safetensors'}'" in inbox["loras/host.safetensors"]
    shutil.rmtree(models / "loras")
    models.rename(models.with_name("models-moved"))
    os.symlink(canary, models)
    [item] = library.inbox(instance)
    assert f"{models} is a link" in item["problem"]
