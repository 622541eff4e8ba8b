"""A node's model cache with real files, a real RQ worker and a real container of the ComfyUI test double: warming
(copied and verified), a hit (ComfyUI finds the cache before /shared), eviction by size, a damaged copy dropped,
unverified library files and path escapes refused."""
import hashlib
import json
import os
from functools import partial

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from comfyhub.models import Operation
from instances import runtime, services as instance_services
from instances.workflows import workflows_dir
from storage_app import layout, library, modelcache, services
from storage_app.models import ModelAsset
from tests.support.cli import run

pytestmark = pytest.mark.django_db(transaction=True)

models = partial(run, "models")


@pytest.fixture
def cache(settings, tmp_path):
    settings.MODEL_CACHE_PATH = tmp_path / "fast-disk" / "cache"
    settings.NODE_NAME = "local"
    return settings.MODEL_CACHE_PATH


@pytest.fixture
def library_dir(settings):
    path = settings.COMFY_SHARED_PATH / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def put(root, relpath, content):
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def hashed(library_dir, files: dict):
    """Put the files in the library, scan and verify it: the library records each one's SHA-256."""
    for relpath, content in files.items():
        put(library_dir, relpath, content)
    library.scan()
    library.verify()
    return {relpath: hashlib.sha256(content).hexdigest() for relpath, content in files.items()}


def cached(cache, relpath):
    return cache / "models" / relpath


def index(cache):
    return json.loads((cache / modelcache.INDEX_FILE).read_text())


def files_in(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


# --- The container's view -------------------------------------------------------------------------------------

def test_without_a_cache_the_yaml_and_the_mounts_are_exactly_what_they_were(settings, storage):
    settings.MODEL_CACHE_PATH = None
    instance = instance_services.instance_create(instance_id="plain")
    layout.build_shared_tree()
    layout.build_instance_tree("plain")
    text = (storage["instances"] / "plain" / layout.EXTRA_MODEL_PATHS_FILE).read_text()
    assert "model-cache" not in text and text == layout.extra_model_paths_yaml()
    assert [mount.target for mount in runtime.container_spec(instance).mounts] == ["/shared", "/instance"]


def test_with_a_cache_every_folder_lists_the_instance_then_the_cache_then_the_library(cache, storage):
    import yaml

    instance = instance_services.instance_create(instance_id="fast")
    layout.build_shared_tree(instance.node)
    layout.build_instance_tree("fast", instance.node)
    assert (cache / "models").is_dir()
    config = yaml.safe_load((storage["instances"] / "fast" / layout.EXTRA_MODEL_PATHS_FILE).read_text())
    assert list(config) == ["comfyhub_instance", "comfyhub_cache", "comfyhub_shared"]
    assert config["comfyhub_cache"]["base_path"] == "/model-cache/models"
    assert config["comfyhub_cache"]["text_encoders"].split() == ["text_encoders/", "clip/"]
    mounts = runtime.container_spec(instance).mounts
    assert mounts[-1] == runtime.Mount(str(cache), "/model-cache", read_only=True)


def test_another_nodes_instances_get_no_cache_from_this_nodes_setting(cache):
    from instances.models import Node

    other = Node.objects.create(name="gpu-2", port_range_start=9000, port_range_end=9100)
    assert layout.model_cache_root(other) is None and layout.model_cache_root() == cache


# --- Warming --------------------------------------------------------------------------------------------------

def test_warm_copies_library_files_verified_and_leaves_no_temporary_file(cache, library_dir):
    digests = hashed(library_dir, {"checkpoints/base.safetensors": b"base weights" * 1000,
                                   "loras/detail.pt": b"lora"})
    result = modelcache.warm(["models/checkpoints/base.safetensors", "loras/detail.pt"])
    assert sorted(result.copied) == ["checkpoints/base.safetensors", "loras/detail.pt"] and not result.refused
    for relpath, digest in digests.items():
        assert hashlib.sha256(cached(cache, relpath).read_bytes()).hexdigest() == digest
        assert not cached(cache, relpath).samefile(library_dir / relpath)  # a copy on the cache's disk
        assert index(cache)["files"][relpath]["sha256"] == digest
    assert files_in(cache / "models") == ["checkpoints/base.safetensors", "loras/detail.pt"]


def test_a_second_warm_is_a_hit_that_copies_nothing_and_marks_the_file_used(cache, library_dir):
    hashed(library_dir, {"checkpoints/a.ckpt": b"a"})
    modelcache.warm(["checkpoints/a.ckpt"])
    first = index(cache)["files"]["checkpoints/a.ckpt"]
    inode = os.stat(cached(cache, "checkpoints/a.ckpt")).st_ino
    again = modelcache.warm(["checkpoints/a.ckpt"])
    assert again.hits == ["checkpoints/a.ckpt"] and again.copied == []
    assert os.stat(cached(cache, "checkpoints/a.ckpt")).st_ino == inode
    assert index(cache)["files"]["checkpoints/a.ckpt"]["last_used_at"] > first["last_used_at"]


def test_the_least_recently_used_files_are_evicted_past_the_limit(cache, library_dir):
    hashed(library_dir, {f"checkpoints/{name}.ckpt": name[0].encode() * 100 for name in ("old", "used", "new")})
    modelcache.warm(["checkpoints/old.ckpt"], limit=250)
    modelcache.warm(["checkpoints/used.ckpt"], limit=250)
    modelcache.warm(["checkpoints/old.ckpt"], limit=250)  # used again: now "used" is the least recently used
    result = modelcache.warm(["checkpoints/new.ckpt"], limit=250)
    assert result.evicted == ["checkpoints/used.ckpt"] and result.copied == ["checkpoints/new.ckpt"]
    assert files_in(cache / "models") == ["checkpoints/new.ckpt", "checkpoints/old.ckpt"]
    assert set(index(cache)["files"]) == {"checkpoints/new.ckpt", "checkpoints/old.ckpt"}
    assert modelcache.status(limit=250)["bytes"] == 200


def test_files_one_warm_needs_are_never_evicted_for_each_other_and_what_does_not_fit_is_refused(cache, library_dir):
    hashed(library_dir, {"checkpoints/a.ckpt": b"a" * 100, "checkpoints/b.ckpt": b"b" * 100,
                         "checkpoints/huge.ckpt": b"h" * 1000})
    result = modelcache.warm(["checkpoints/a.ckpt", "checkpoints/b.ckpt", "checkpoints/huge.ckpt"], limit=150)
    refused = dict(result.refused)
    assert result.copied == ["checkpoints/a.ckpt"]
    assert "does not fit" in refused["checkpoints/b.ckpt"]
    assert "more than the cache may hold" in refused["checkpoints/huge.ckpt"]
    assert files_in(cache / "models") == ["checkpoints/a.ckpt"]


def test_a_library_file_that_was_never_hashed_is_refused_with_the_reason(cache, library_dir):
    put(library_dir, "checkpoints/fresh.ckpt", b"never verified")
    library.scan()  # recorded, not hashed
    result = modelcache.warm(["checkpoints/fresh.ckpt"])
    assert result.copied == [] and result.refused == [
        ["checkpoints/fresh.ckpt", "the library has not hashed it yet, so a copy cannot be verified: run models "
                                   "verify first"]]
    assert files_in(cache / "models") == []


def test_a_mismatch_in_the_library_is_refused(cache, library_dir):
    hashed(library_dir, {"loras/bad.pt": b"x"})
    ModelAsset.objects.filter(path="loras/bad.pt").update(status=ModelAsset.Status.MISMATCH)
    assert "mismatch" in modelcache.warm(["loras/bad.pt"]).refused[0][1]


def test_a_copy_that_does_not_match_the_librarys_hash_is_not_kept(cache, library_dir):
    hashed(library_dir, {"checkpoints/rot.ckpt": b"good bytes"})
    path = library_dir / "checkpoints" / "rot.ckpt"
    stamp = os.stat(path)
    path.write_bytes(b"rott bytes")  # bit rot: same size, same time, the library's record not updated
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    result = modelcache.warm(["checkpoints/rot.ckpt"])
    assert result.copied == [] and "is not the library's" in result.refused[0][1]
    assert files_in(cache / "models") == [] and not list((cache / "models").rglob(".comfyhub-caching-*"))


def test_path_escapes_are_refused(cache, library_dir):
    for bad in ("../etc/passwd", "/etc/passwd", "models/../../x.ckpt", "checkpoints/.hidden.ckpt", "checkpoints",
                "checkpoints/a\\..\\b.ckpt", "checkpoints/notes.txt", "", "checkpoints/a\x00.ckpt"):
        with pytest.raises(modelcache.CacheError):
            modelcache.library_path(bad)
    assert modelcache.library_path("models/loras/sub/x.safetensors") == "loras/sub/x.safetensors"


def test_a_library_link_pointing_outside_the_library_is_not_followed(cache, library_dir, canary):
    (library_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    os.symlink(canary / "host.safetensors", library_dir / "checkpoints" / "host.safetensors")
    ModelAsset.objects.create(path="checkpoints/host.safetensors", folder="checkpoints", size=1,
                              sha256=hashlib.sha256(b"x").hexdigest(), status=ModelAsset.Status.UNVERIFIED)
    result = modelcache.warm(["checkpoints/host.safetensors"])
    assert "pointing outside the library" in result.refused[0][1]
    assert files_in(cache / "models") == []


def test_a_link_in_the_cache_folder_is_never_written_through(cache, library_dir, tmp_path):
    hashed(library_dir, {"vae/v.pt": b"vae"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cache / "models").mkdir(parents=True)
    os.symlink(elsewhere, cache / "models" / "vae")
    result = modelcache.warm(["vae/v.pt"])
    assert "is a link" in result.refused[0][1]
    assert list(elsewhere.iterdir()) == []


# --- Checking -------------------------------------------------------------------------------------------------

def test_check_drops_a_corrupted_cached_file_and_the_instance_no_longer_lists_it(cache, library_dir, storage):
    hashed(library_dir, {"checkpoints/good.ckpt": b"good" * 100, "checkpoints/hit.ckpt": b"hit" * 100})
    modelcache.warm(["checkpoints/good.ckpt", "checkpoints/hit.ckpt"])
    damaged = cached(cache, "checkpoints/hit.ckpt")
    damaged.write_bytes(b"HIT" + damaged.read_bytes()[3:])
    result = modelcache.check()
    assert result.checked == 2 and [path for path, _ in result.dropped] == ["checkpoints/hit.ckpt"]
    assert "no longer matches the library's" in result.dropped[0][1]
    assert not damaged.exists() and cached(cache, "checkpoints/good.ckpt").exists()
    status = modelcache.status()
    assert status["files"] == 1 and status["dropped"][0]["path"] == "checkpoints/hit.ckpt"
    assert [entry["path"] for entry in status["entries"]] == ["checkpoints/good.ckpt"]


def test_check_keeps_unknown_files_that_match_and_drops_links_leftovers_and_strangers(cache, library_dir, tmp_path):
    hashed(library_dir, {"loras/kept.pt": b"kept"})
    put(cache / "models", "loras/kept.pt", b"kept")  # the index was lost
    put(cache / "models", "loras/stranger.pt", b"not from the library")
    put(cache / "models", "loras/.comfyhub-caching-1234.tmp", b"half a copy")
    os.symlink(tmp_path, cache / "models" / "loras" / "link.pt")
    result = modelcache.check()
    assert result.adopted == ["loras/kept.pt"]
    assert sorted(path for path, _ in result.dropped) == ["loras/link.pt", "loras/stranger.pt"]
    assert files_in(cache / "models") == ["loras/kept.pt"] and tmp_path.is_dir()


def test_check_drops_a_cached_file_the_library_no_longer_has(cache, library_dir):
    hashed(library_dir, {"loras/gone.pt": b"gone"})
    modelcache.warm(["loras/gone.pt"])
    (library_dir / "loras" / "gone.pt").unlink()
    library.scan()
    assert modelcache.check().dropped == [["loras/gone.pt", "the library no longer vouches for it: it is missing "
                                                            "from the library"]]


# --- What to warm: workflows and instances, as operations on a real worker --------------------------------------

API_WORKFLOW = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
                "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5.safetensors"}},
                "3": {"class_type": "LoraLoader", "inputs": {"lora_name": "not-here.safetensors"}}}


def test_warming_for_a_workflow_copies_what_it_names_from_the_library(cache, library_dir, run_worker, operator):
    hashed(library_dir, {"checkpoints/sdxl.safetensors": b"sdxl", "clip/t5.safetensors": b"t5",
                         "checkpoints/unrelated.safetensors": b"other"})
    operation = services.model_cache_warm(workflow=json.dumps(API_WORKFLOW).encode(), user=operator)
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert operation.queue_name == "long" and operation.requested_by == operator
    assert sorted(operation.result["copied"]) == ["checkpoints/sdxl.safetensors", "clip/t5.safetensors"]
    assert operation.result["not_in_library"] == ["loras/not-here.safetensors"]
    assert files_in(cache / "models") == ["checkpoints/sdxl.safetensors", "clip/t5.safetensors"]


def test_warming_for_an_instance_reads_its_workflows(cache, library_dir, run_worker):
    hashed(library_dir, {"checkpoints/sdxl.safetensors": b"sdxl", "loras/style.safetensors": b"style"})
    instance = instance_services.instance_create(instance_id="artist")
    layout.build_instance_tree("artist")
    ui = {"nodes": [{"id": 1, "type": "LoraLoader", "widgets_values": ["style.safetensors", 1, 1]}]}
    (workflows_dir(instance) / "a.json").write_text(json.dumps(API_WORKFLOW))
    (workflows_dir(instance) / "b.json").write_text(json.dumps(ui))
    (workflows_dir(instance) / "broken.json").write_text("{oops")
    operation = services.model_cache_warm(instance=instance)
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert sorted(operation.result["copied"]) == ["checkpoints/sdxl.safetensors", "loras/style.safetensors"]
    assert "skipped workflow broken.json" in operation.log


def test_a_warm_with_a_refused_file_fails_naming_it_and_caches_the_rest(cache, library_dir, run_worker):
    hashed(library_dir, {"checkpoints/ok.ckpt": b"ok"})
    put(library_dir, "checkpoints/new.ckpt", b"new")
    library.scan()
    operation = services.model_cache_warm(paths=["checkpoints/ok.ckpt", "checkpoints/new.ckpt"])
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.FAILED
    assert "checkpoints/new.ckpt: the library has not hashed it yet" in operation.error
    assert files_in(cache / "models") == ["checkpoints/ok.ckpt"]


def test_the_services_refuse_another_node_no_cache_and_unknown_files(cache, library_dir, settings):
    from django.core.exceptions import ValidationError

    from instances.models import Node

    from comfyhub.operations import NodeUnavailable

    hashed(library_dir, {"checkpoints/a.ckpt": b"a"})
    Node.objects.create(name="gpu-2", port_range_start=9000, port_range_end=9100)
    # Another node's cache is warmed by its agent: one that never reported takes nothing, and nothing is recorded.
    with pytest.raises(NodeUnavailable, match="Node gpu-2 has no agent yet"):
        services.model_cache_warm(node_name="gpu-2", paths=["checkpoints/a.ckpt"])
    assert not Operation.objects.exists()
    with pytest.raises(ValidationError, match="No node 'gpu-9'"):
        services.model_cache_check(node_name="gpu-9")
    with pytest.raises(ValidationError, match="Not in the shared library: checkpoints/nope.ckpt"):
        services.model_cache_warm(paths=["models/checkpoints/nope.ckpt"])
    with pytest.raises(ValidationError, match="one of"):
        services.model_cache_warm()
    settings.MODEL_CACHE_PATH = None
    with pytest.raises(ValidationError, match="has no model cache: set MODEL_CACHE_PATH"):
        services.model_cache_warm(paths=["checkpoints/a.ckpt"])
    assert services.model_cache_status()["configured"] is False


# --- The command ------------------------------------------------------------------------------------------------

def test_the_command_warms_checks_and_shows_the_cache(cache, library_dir, run_worker):
    hashed(library_dir, {"checkpoints/a.ckpt": b"aaaa"})
    result = models("cache", "warm", "models/checkpoints/a.ckpt", "--no-wait")
    assert result.code == 0, result.err
    run_worker()
    status = json.loads(models("cache", "status", "--json").out)
    assert status["node"] == "local" and status["files"] == 1 and status["bytes"] == 4
    assert status["entries"][0]["path"] == "checkpoints/a.ckpt" and status["last_warm"]["copied"] == 1
    assert models("cache", "check", "--no-wait").code == 0
    run_worker()
    assert "1 file(s), 4 bytes" in models("cache", "status").out


def test_the_command_refuses_bad_input_with_exit_2(cache, library_dir):
    assert "not a cache action" in models("cache", "warmup").err
    assert models("cache", "status", "checkpoints/a.ckpt").code == 2
    refused = models("cache", "warm", "--node", "gpu-2", "checkpoints/a.ckpt")
    assert refused.code == 2 and "No node 'gpu-2'" in refused.err
    assert models("cache", "warm", "../../etc/passwd").code == 2
    assert models("cache", "warm", "--for-instance", "nope").code == 2


# --- The page -------------------------------------------------------------------------------------------------

def test_the_models_page_shows_the_cache_and_warms_for_an_uploaded_workflow(cache, library_dir, client, operator,
                                                                            run_worker):
    hashed(library_dir, {"checkpoints/sdxl.safetensors": b"sdxl", "clip/t5.safetensors": b"t5"})
    client.force_login(operator)
    page = client.get(reverse("model-list")).content.decode()
    assert "Model cache on this node (local)" in page and 'id="cache-warm-workflow"' in page
    response = client.post(reverse("models-cache-warm"),
                           {"workflow": SimpleUploadedFile("w.json", json.dumps(API_WORKFLOW).encode())})
    assert response.status_code == 302
    run_worker()
    page = client.get(reverse("model-list")).content.decode()
    assert '<span data-testid="cache-files">2 files</span>' in page and "checkpoints/sdxl.safetensors" in page
    cached(cache, "clip/t5.safetensors").write_bytes(b"T5")
    assert client.post(reverse("models-cache-check")).status_code == 302
    run_worker()
    page = client.get(reverse("model-list")).content.decode()
    assert 'id="cache-dropped"' in page and "clip/t5.safetensors" in page


def test_without_the_permission_nobody_warms_or_checks(cache, client, stranger):
    client.force_login(stranger)
    assert client.post(reverse("models-cache-warm"), {"instance": "x"}).status_code == 403
    assert client.post(reverse("models-cache-check")).status_code == 403
    assert 'id="cache-warm-workflow"' not in client.get(reverse("model-list")).content.decode()


# --- A real container: ComfyUI finds the cached file before the shared one ----------------------------------------

@pytest.mark.docker
def test_a_running_instance_lists_the_cache_before_the_library_and_reads_the_cached_copy(
        cache, library_dir, comfyui_double_image, docker_cleanup, docker_engine, run_worker):
    hashed(library_dir, {"checkpoints/fast.safetensors": b"cached weights"})
    modelcache.warm(["checkpoints/fast.safetensors"])
    instance = instance_services.instance_create(instance_id="cached", image=comfyui_double_image)
    operation = instance_services.instance_start(instance=instance)
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error

    from instances.comfyui_api import ComfyUI

    client = ComfyUI.of(instance)
    folders = {entry["name"]: entry["folders"] for entry in client._get_json("/api/experiment/models", list,
                                                                            timeout=10, max_bytes=1 << 20)}
    for key, names in layout.MODEL_FOLDERS.items():
        if key == "configs":
            continue
        paths = folders[key]
        assert paths[0] == f"/instance/models/{names[0]}", (key, paths)
        assert paths.index(f"/model-cache/models/{names[0]}") < paths.index(f"/shared/models/{names[0]}"), paths
    assert client.models("checkpoints") == ["fast.safetensors"]

    container = docker_engine.containers.get(instance.container_name)
    read = container.exec_run(["sha256sum", "/model-cache/models/checkpoints/fast.safetensors"])
    assert read.exit_code == 0 and read.output.decode().split()[0] == hashlib.sha256(b"cached weights").hexdigest()
    write = container.exec_run(["touch", "/model-cache/models/checkpoints/new.safetensors"])
    assert write.exit_code != 0 and b"Read-only file system" in write.output
