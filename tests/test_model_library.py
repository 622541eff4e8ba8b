"""The shared model library with real files: scanning, verifying, bad files, expected hashes, duplicates."""
import hashlib
import os
import threading
import time

import pytest

from comfyhub import operations
from comfyhub.models import Operation
from storage_app import hashing, library, services
from storage_app.models import ModelAsset
from tests.support.safetensors import FLUX_KEYS, SD15_KEYS, SDXL_KEYS, write_safetensors

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def models_dir(settings):
    path = settings.COMFY_SHARED_PATH / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def put(models_dir, relpath, content=b"weights"):
    path = models_dir / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def asset(path):
    return ModelAsset.objects.get(path=path)


def test_a_scan_records_model_files_by_folder_and_skips_other_files(models_dir):
    put(models_dir, "checkpoints/a.safetensors")
    put(models_dir, "loras/sub/b.pt")
    put(models_dir, "unet/c.gguf")
    put(models_dir, "checkpoints/readme.txt")
    put(models_dir, "configs/v1.yaml")
    result = library.scan()
    assert result.new == 4
    assert {a.path: a.folder for a in ModelAsset.objects.all()} == {
        "checkpoints/a.safetensors": "checkpoints", "loras/sub/b.pt": "loras",
        "unet/c.gguf": "diffusion_models", "configs/v1.yaml": "configs"}
    assert asset("loras/sub/b.pt").status == ModelAsset.Status.NEW


def test_a_scan_notices_changed_and_missing_files(models_dir):
    kept = put(models_dir, "vae/kept.pt")
    gone = put(models_dir, "vae/gone.pt")
    library.scan()
    library.verify()
    kept.write_bytes(b"different and longer")
    gone.unlink()
    result = library.scan()
    assert (result.changed, result.missing, result.new) == (1, 1, 0)
    assert asset("vae/kept.pt").status == ModelAsset.Status.CHANGED
    assert asset("vae/gone.pt").status == ModelAsset.Status.MISSING


def test_safetensors_headers_give_metadata_and_architecture(models_dir):
    write_safetensors(models_dir / "checkpoints/sd15.safetensors", SD15_KEYS)
    write_safetensors(models_dir / "checkpoints/sdxl.safetensors", SDXL_KEYS)
    write_safetensors(models_dir / "diffusion_models/flux.safetensors", FLUX_KEYS)
    write_safetensors(models_dir / "loras/tagged.safetensors", {"x": (2,)},
                      metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "ss_note": "hi"})
    write_safetensors(models_dir / "loras/kohya.safetensors", {"x": (2,)}, metadata={"ss_base_model_version": "sd_v1"})
    write_safetensors(models_dir / "loras/plain.safetensors", {"x": (2,)})
    library.scan()
    assert {a.name: a.architecture for a in ModelAsset.objects.all()} == {
        "sd15.safetensors": "SD1.x", "sdxl.safetensors": "SDXL", "flux.safetensors": "Flux",
        "tagged.safetensors": "SDXL", "kohya.safetensors": "SD1.x", "plain.safetensors": "unknown"}
    assert asset("loras/tagged.safetensors").metadata["ss_note"] == "hi"


def test_a_verify_hashes_each_file_like_sha256sum(models_dir):
    content = os.urandom(3 << 20)
    put(models_dir, "checkpoints/real.ckpt", content)
    library.scan()
    result = library.verify(with_blake3=True)
    row = asset("checkpoints/real.ckpt")
    assert row.sha256 == hashlib.sha256(content).hexdigest()
    assert row.short_hash == hashlib.sha256(content).hexdigest()[:10].upper()
    import blake3

    assert row.blake3 == blake3.blake3(content).hexdigest()
    assert row.status == ModelAsset.Status.UNVERIFIED
    assert result.hashed == 1 and result.bytes == len(content)


def test_a_sparse_multi_gigabyte_file_is_hashed_in_constant_memory(models_dir):
    path = models_dir / "checkpoints" / "huge.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(3 << 30)  # 3 GiB of holes: real size, no disk
    expected = hashlib.sha256()
    zeros = bytes(1 << 20)
    for _ in range(3 << 10):
        expected.update(zeros)
    digest = hashing.hash_file(path)
    assert digest.sha256 == expected.hexdigest() and digest.size == 3 << 30


def test_an_incremental_verify_reads_only_what_changed_and_full_reads_all(models_dir):
    put(models_dir, "loras/one.pt", b"1" * 1000)
    two = put(models_dir, "loras/two.pt", b"2" * 1000)
    library.scan()
    assert library.verify().hashed == 2
    assert (library.verify().hashed, library.verify().skipped) == (0, 2)
    two.write_bytes(b"3" * 1001)
    assert library.verify().hashed == 1
    assert library.verify(full=True).hashed == 2


def test_an_expected_hash_verifies_or_marks_a_mismatch_with_evidence(models_dir):
    good = put(models_dir, "vae/good.pt", b"good")
    put(models_dir, "vae/bad.pt", b"tampered")
    manifest = (f"{hashlib.sha256(b'good').hexdigest()}  vae/good.pt\n"
                f"{hashlib.sha256(b'original').hexdigest()} *vae/bad.pt\n"
                f"{'0' * 64}  vae/not-here.pt\n")
    library.scan()
    imported = services.models_import_hashes(text=manifest)
    assert imported == {"matched": 2, "unknown": ["vae/not-here.pt"], "bad": []}
    library.verify()
    assert asset("vae/good.pt").status == ModelAsset.Status.VERIFIED
    bad = asset("vae/bad.pt")
    assert bad.status == ModelAsset.Status.MISMATCH and bad.is_problem
    assert bad.evidence[-1]["expected_sha256"] == hashlib.sha256(b"original").hexdigest()
    assert bad.evidence[-1]["new_sha256"] == hashlib.sha256(b"tampered").hexdigest()
    assert good.exists()


def test_content_that_changes_behind_an_unchanged_size_and_mtime_is_a_mismatch(models_dir):
    path = put(models_dir, "checkpoints/quiet.ckpt", b"A" * 4096)
    library.scan()
    library.verify()
    stat = os.stat(path)
    with open(path, "r+b") as handle:
        handle.write(b"B")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    library.verify(full=True)
    row = asset("checkpoints/quiet.ckpt")
    assert row.status == ModelAsset.Status.MISMATCH
    assert "silent corruption" in row.status_reason
    assert row.evidence[-1]["old_sha256"] == hashlib.sha256(b"A" * 4096).hexdigest()


def test_hashes_export_in_sha256sum_format_and_import_back(models_dir):
    put(models_dir, "loras/x.pt", b"x")
    library.scan()
    library.verify()
    exported = services.models_export_hashes()
    assert exported == f"{hashlib.sha256(b'x').hexdigest()}  loras/x.pt\n"
    assert services.models_import_hashes(text=exported)["matched"] == 1
    with pytest.raises(services.ValidationError, match="sha256sum format"):
        services.models_import_hashes(text="not a hash line\n")


def test_typed_expected_hashes_must_be_sha256(models_dir):
    put(models_dir, "loras/t.pt", b"t")
    library.scan()
    row = asset("loras/t.pt")
    with pytest.raises(services.ValidationError, match="64 hexadecimal digits"):
        services.asset_set_expected(asset=row, sha256="abc")
    services.asset_set_expected(asset=row, sha256=hashlib.sha256(b"t").hexdigest().upper())
    assert asset("loras/t.pt").expected_source == "typed"


def test_duplicates_are_reported_with_the_space_they_waste(models_dir):
    put(models_dir, "checkpoints/a.ckpt", b"same" * 1000)
    put(models_dir, "checkpoints/copy-of-a.ckpt", b"same" * 1000)
    put(models_dir, "loras/other.pt", b"other")
    library.scan()
    library.verify()
    [group] = library.duplicates()
    assert sorted(group["paths"]) == ["checkpoints/a.ckpt", "checkpoints/copy-of-a.ckpt"]
    assert group["wasted"] == 4000


def test_hard_links_to_one_file_waste_nothing_and_are_no_duplicates_alone(models_dir):
    a = put(models_dir, "checkpoints/a.ckpt", b"same" * 1000)
    os.link(a, models_dir / "checkpoints" / "linked.ckpt")
    put(models_dir, "loras/b.ckpt", b"kept" * 1000)
    os.link(models_dir / "loras" / "b.ckpt", models_dir / "loras" / "b-linked.ckpt")
    put(models_dir, "loras/copy-of-a.ckpt", b"same" * 1000)
    library.scan()
    library.verify()
    [group] = library.duplicates()
    assert sorted(group["paths"]) == ["checkpoints/a.ckpt", "checkpoints/linked.ckpt", "loras/copy-of-a.ckpt"]
    assert group["wasted"] == 4000


# --- bad files ----------------------------------------------------------------------------------------------

def test_a_truncated_or_absurd_safetensors_header_is_reported_not_fatal(models_dir):
    truncated = write_safetensors(models_dir / "checkpoints/truncated.safetensors", SD15_KEYS)
    truncated.write_bytes(truncated.read_bytes()[:20])
    absurd = models_dir / "checkpoints/absurd.safetensors"
    absurd.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    tiny = models_dir / "checkpoints/tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(hashing.HeaderError, match="truncated"):
        hashing.read_safetensors_header(truncated)
    with pytest.raises(hashing.HeaderError, match="more than the"):
        hashing.read_safetensors_header(absurd)
    result = library.scan()
    assert result.new == 3
    assert {a.architecture for a in ModelAsset.objects.all()} == {"unknown"}
    library.verify()
    assert all(a.sha256 for a in ModelAsset.objects.all())


def test_a_non_utf8_name_is_recorded_as_unreadable_and_the_rest_goes_on(models_dir):
    os.makedirs(models_dir / "loras", exist_ok=True)
    with open(os.path.join(os.fsencode(models_dir / "loras"), b"caf\xe9.safetensors"), "wb") as handle:
        handle.write(b"x")
    put(models_dir, "loras/fine.pt")
    result = library.scan()
    assert result.new == 1
    weird = ModelAsset.objects.get(status=ModelAsset.Status.UNREADABLE)
    assert weird.path == "loras/caf\\xe9.safetensors"
    assert "not valid UTF-8" in weird.status_reason


def test_symlinks_out_of_the_library_and_loops_are_not_followed(models_dir, tmp_path):
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"secret")
    os.makedirs(models_dir / "loras", exist_ok=True)
    os.symlink(outside, models_dir / "loras" / "escape.safetensors")
    os.symlink(models_dir / "loras" / "loop.pt", models_dir / "loras" / "loop.pt")
    inside = put(models_dir, "checkpoints/real.ckpt", b"real")
    os.symlink(inside, models_dir / "loras" / "alias.ckpt")
    os.symlink(tmp_path, models_dir / "outside-folder")
    library.scan()
    library.verify()
    assert "outside the library" in asset("loras/escape.safetensors").status_reason
    assert "loop" in asset("loras/loop.pt").status_reason
    assert asset("loras/alias.ckpt").sha256 == hashlib.sha256(b"real").hexdigest()
    assert not ModelAsset.objects.filter(path__contains="secret").exclude(path="loras/escape.safetensors").exists()
    assert not ModelAsset.objects.filter(sha256=hashlib.sha256(b"secret").hexdigest()).exists()


def test_an_unreadable_file_is_recorded_and_the_others_are_verified(models_dir):
    locked = put(models_dir, "vae/locked.pt", b"locked")
    put(models_dir, "vae/open.pt", b"open")
    library.scan()
    locked.chmod(0)
    pid = os.fork()
    if pid == 0:  # drop root in a child so the permission bits apply, as they would to ComfyHub's user
        try:
            os.setgid(65534)
            os.setuid(65534)
            hashing.hash_file(locked)
            os._exit(1)
        except PermissionError:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0, "an unprivileged user could read a mode-000 file"
    result = library.verify()
    # Root reads anything, so the verify itself may succeed here; what must hold is that it went on.
    assert asset("vae/open.pt").sha256 == hashlib.sha256(b"open").hexdigest()
    assert result.hashed + len(result.problems) == 2


def test_a_file_deleted_while_being_hashed_is_missing_and_the_job_goes_on(models_dir):
    doomed = put(models_dir, "checkpoints/doomed.ckpt", b"x" * (1 << 20))
    put(models_dir, "checkpoints/stays.ckpt", b"stays")
    library.scan()
    original = hashing.hash_file

    def delete_first(path, **kwargs):
        if str(path).endswith("doomed.ckpt"):
            os.unlink(path)
        return original(path, **kwargs)

    hashing.hash_file = delete_first
    try:
        library.verify()
    finally:
        hashing.hash_file = original
    assert asset("checkpoints/doomed.ckpt").status == ModelAsset.Status.MISSING
    assert "vanished" in asset("checkpoints/doomed.ckpt").status_reason
    assert asset("checkpoints/stays.ckpt").sha256
    assert not doomed.exists()


def test_a_file_that_grows_while_being_read_is_recorded(models_dir):
    growing = put(models_dir, "checkpoints/growing.ckpt", b"x" * (8 << 20))
    stop = threading.Event()

    def append():
        # Bounded (at most 256 MiB) and paced, so a slow reader on a busy machine can never fill the disk.
        with open(growing, "ab") as handle:
            for _ in range(4096):
                if stop.is_set():
                    break
                handle.write(b"y" * 65536)
                handle.flush()
                time.sleep(0.001)

    writer = threading.Thread(target=append)
    writer.start()
    try:
        with pytest.raises(hashing.FileChangedWhileReading, match="changed while being read"):
            hashing.hash_file(growing, chunk_size=64 << 10)
    finally:
        stop.set()
        writer.join()


def test_verify_runs_as_an_operation_with_byte_progress(models_dir, run_worker, operator):
    put(models_dir, "checkpoints/p.ckpt", os.urandom(1 << 20))
    operation = services.models_verify(user=operator)
    assert operation.queue_name == "long"
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert operation.result["hashed"] == 1 and operation.result["bytes"] == 1 << 20
    assert "MB/s" in operation.progress_message and "ETA" in operation.progress_message


def test_a_verify_that_finds_a_mismatch_fails_and_says_which(models_dir, run_worker):
    put(models_dir, "vae/m.pt", b"m")
    library.scan()
    ModelAsset.objects.filter(path="vae/m.pt").update(expected_sha256="0" * 64, expected_source="typed")
    operation = services.models_verify()
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.FAILED
    assert "vae/m.pt" in operation.error


@pytest.mark.parametrize("with_sha256", [True, False])
def test_blake3_of_a_file_at_rest_matches_the_streaming_one(models_dir, with_sha256):
    import blake3

    content = os.urandom(5 << 20)
    path = put(models_dir, "checkpoints/rest.ckpt", content)
    old = os.stat(path).st_mtime - 3600
    os.utime(path, (old, old))  # at rest: BLAKE3 maps it
    at_rest = hashing.hash_file(path, with_sha256=with_sha256, with_blake3=True)
    assert at_rest.blake3 == blake3.blake3(content).hexdigest()
    assert at_rest.sha256 == (hashlib.sha256(content).hexdigest() if with_sha256 else "")
    assert at_rest.size == len(content)
    os.utime(path)  # just written: streamed
    assert hashing.hash_file(path, with_sha256=with_sha256, with_blake3=True).blake3 == at_rest.blake3


def test_a_safetensors_header_nested_too_deeply_is_reported_not_fatal(models_dir):
    header = b"[" * 200_000 + b"]" * 200_000
    path = models_dir / "checkpoints" / "deep.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(hashing.HeaderError, match="nests too deeply"):
        hashing.read_safetensors_header(path)
