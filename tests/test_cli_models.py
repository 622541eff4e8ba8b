"""`manage.py models`: the model library services from a shell, with the exit codes and JSON that docs/cli.md promises.

Real model files under the test's shared/models, real RQ workers: in this process (`run_worker`) after `--no-wait`,
or a separate worker process that the command waits for.
"""
import hashlib
import json
import os
import signal
import uuid
from functools import partial

import pytest
from rq import suspension

from comfyhub import queues
from comfyhub.models import Operation
from instances import services as instance_services
from storage_app import layout
from storage_app.models import ModelAsset
from tests.support.cli import run, run_process, start_process
from tests.support.safetensors import SDXL_KEYS, write_safetensors

pytestmark = pytest.mark.django_db(transaction=True)

ASSET_KEYS = {"path", "folder", "size", "status", "status_reason", "sha256", "short_hash", "blake3", "expected_sha256",
              "expected_source", "architecture", "last_verified_at", "evidence"}


models = partial(run, "models")
models_process = partial(run_process, "models")


@pytest.fixture
def library_dir(settings):
    path = settings.COMFY_SHARED_PATH / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def put(root, relpath, content=b"weights"):
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@pytest.fixture
def hashed(library_dir, run_worker):
    """Three files in the library, scanned and hashed through the command and a real worker."""
    write_safetensors(library_dir / "checkpoints" / "sdxl.safetensors", SDXL_KEYS)
    put(library_dir, "loras/detail.pt", b"lora bytes")
    put(library_dir, "vae/kl.pt", b"vae bytes")
    assert models("verify", "--no-wait").code == 0
    run_worker()
    return library_dir


# --- scan and verify -----------------------------------------------------------------------------------------------

def test_scan_without_waiting_prints_the_operation_and_a_worker_records_the_files(library_dir, run_worker):
    put(library_dir, "checkpoints/a.safetensors")
    put(library_dir, "loras/sub/b.pt")

    result = models("scan", "--no-wait")

    assert result.code == 0
    operation = Operation.objects.get(pk=uuid.UUID(result.out.strip()))
    assert (operation.kind, operation.queue_name) == ("models_scan", "long")
    assert "No RQ worker is listening on queue 'long'" in result.err
    run_worker()
    assert {a.path: a.status for a in ModelAsset.objects.all()} == {"checkpoints/a.safetensors": "new",
                                                                   "loras/sub/b.pt": "new"}


def test_verify_waits_for_the_worker_and_prints_what_it_hashed(library_dir, worker_process):
    put(library_dir, "checkpoints/a.safetensors", b"a" * 1000)
    put(library_dir, "vae/b.pt", b"b" * 24)
    worker_process()

    result = models("verify")

    assert result.code == 0, result.err
    assert "Verify model checksums: operation" in result.out
    assert "[100%]" in result.out
    assert "new: checkpoints/a.safetensors (1000 bytes)" in result.out
    assert "Verify model checksums succeeded." in result.out
    assert "2 file(s) hashed (1.0 KB), 0 unchanged since last verified." in result.out
    assert ModelAsset.objects.get(path="vae/b.pt").sha256 == sha256(b"b" * 24)

    again = models("verify", "--full")
    assert "2 file(s) hashed" in again.out


def test_a_verify_that_finds_a_mismatch_exits_1_with_the_evidence(library_dir, worker_process):
    put(library_dir, "loras/x.pt", b"actual bytes")
    worker_process()
    assert models("scan").code == 0
    ModelAsset.objects.filter(path="loras/x.pt").update(expected_sha256="0" * 64, expected_source="typed")

    result = models_process("verify")

    assert result.code == 1
    assert "Verify model checksums failed (operation " in result.err
    assert "1 file(s) do not match their expected or previous hash: loras/x.pt" in result.err
    assert ModelAsset.objects.get().status == ModelAsset.Status.MISMATCH


def test_scan_without_a_listening_worker_exits_3(library_dir):
    result = models_process("scan", timeout=60)

    assert result.code == 3
    assert "No RQ worker is listening on queue 'long'; start one with `python manage.py rqworker long" in result.err


@pytest.fixture
def suspended_worker(worker_process):
    """A live worker that takes no job (`rq suspend`): operations stay queued with someone listening."""
    suspension.suspend(queues.get_connection())
    try:
        yield worker_process()
    finally:
        suspension.resume(queues.get_connection())


def test_it_gives_up_after_the_timeout_and_points_to_the_operation_page(library_dir, suspended_worker):
    result = models_process("scan", "--timeout", "2")

    operation = Operation.objects.get()
    assert result.code == 4
    assert result.err.strip() == (f"Gave up waiting after 2 s; operation {operation.pk} is still queued and goes on. "
                                  f"Follow it on the operations page: /operations/{operation.pk}/")
    assert operation.status == Operation.Status.QUEUED


def test_ctrl_c_stops_waiting_with_exit_130_and_the_operation_goes_on(library_dir, suspended_worker):
    waiting = start_process("models", "verify")
    first_line = waiting.stdout.readline()  # printed and flushed once it is following the operation
    operation = Operation.objects.get()
    assert first_line.strip() == f"Verify model checksums: operation {operation.pk}"
    waiting.send_signal(signal.SIGINT)
    out, err = waiting.communicate(timeout=60)

    assert waiting.returncode == 130
    assert err.strip() == f"Stopped waiting; operation {operation.pk} goes on."
    assert Operation.objects.get().status == Operation.Status.QUEUED


# --- list ----------------------------------------------------------------------------------------------------------

def test_list_json_holds_the_documented_keys(hashed):
    result = models("list", "--json")

    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert [item["path"] for item in data] == ["checkpoints/sdxl.safetensors", "loras/detail.pt", "vae/kl.pt"]
    assert all(set(item) == ASSET_KEYS for item in data)
    lora = data[1]
    assert lora["folder"] == "loras" and lora["size"] == len(b"lora bytes")
    assert lora["sha256"] == sha256(b"lora bytes") and lora["short_hash"] == sha256(b"lora bytes")[:10].upper()
    assert lora["status"] == "unverified" and lora["status_reason"] == "no expected hash to compare with"
    assert lora["last_verified_at"].endswith("+00:00")
    assert lora["evidence"] == [] and lora["expected_sha256"] == "" and lora["expected_source"] == ""
    assert data[0]["architecture"] == "SDXL"


def test_list_filters_by_folder_and_status_and_prints_a_table(hashed):
    ModelAsset.objects.filter(path="vae/kl.pt").update(status=ModelAsset.Status.MISMATCH)

    assert [i["path"] for i in json.loads(models("list", "--json", "--folder", "loras").out)] == ["loras/detail.pt"]
    assert [i["path"] for i in json.loads(models("list", "--json", "--status", "mismatch").out)] == ["vae/kl.pt"]
    lines = models("list").out.splitlines()
    assert lines[0].split() == ["PATH", "FOLDER", "SIZE", "STATUS", "HASH", "ARCHITECTURE", "VERIFIED"]
    assert lines[2].split()[:6] == ["loras/detail.pt", "loras", "10", "bytes", "unverified",
                                    sha256(b"lora bytes")[:10].upper()]


def test_an_unknown_status_exits_2_naming_the_statuses(hashed):
    result = models("list", "--status", "broken")

    assert result.code == 2
    assert result.err.startswith("status: 'broken' is not a status; use one of new, unverified, verified, mismatch")


def test_an_empty_library_lists_as_an_empty_json_list(library_dir):
    assert json.loads(models("list", "--json").out) == []
    assert "models scan" in models("list").out


# --- expected hashes -----------------------------------------------------------------------------------------------

def test_import_hashes_reports_matched_unknown_and_bad_lines(hashed, tmp_path):
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text(f"{sha256(b'lora bytes')}  loras/detail.pt\n"
                        f"{'a' * 64} *./vae/kl.pt\n"
                        f"{'b' * 64}  loras/elsewhere.pt\n"
                        "not a hash line\n")

    result = models("import-hashes", str(manifest))

    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("matched 2")
    assert lines[1] == "unknown 1: no such file in the library" and lines[2] == "  loras/elsewhere.pt"
    assert lines[3] == "bad 1: not in sha256sum format" and lines[4] == "  line 4: not '<64 hex digits>  <path>'"
    assert ModelAsset.objects.get(path="vae/kl.pt").expected_sha256 == "a" * 64
    assert ModelAsset.objects.get(path="loras/detail.pt").expected_source == "manifest"


def test_import_hashes_of_a_file_with_no_sha256sum_line_exits_2(hashed, tmp_path):
    manifest = tmp_path / "notes.txt"
    manifest.write_text("hello\nworld\n")

    result = models("import-hashes", str(manifest))

    assert result.code == 2
    assert result.err.startswith("file: No line is in sha256sum format ('<64 hex digits>  <path>'): line 1")
    assert not ModelAsset.objects.exclude(expected_sha256="").exists()


def test_import_hashes_of_a_missing_file_exits_2(tmp_path):
    result = models("import-hashes", str(tmp_path / "nope.txt"))

    assert result.code == 2
    assert result.err == f"file: Cannot read {tmp_path / 'nope.txt'}: No such file or directory."


def test_export_hashes_writes_sha256sum_format_that_imports_again(hashed, tmp_path):
    target = tmp_path / "SHA256SUMS"

    result = models("export-hashes", str(target))

    assert result.code == 0
    assert result.out.strip() == f"Wrote 3 hash(es) to {target}."
    assert f"{sha256(b'vae bytes')}  vae/kl.pt" in target.read_text().splitlines()
    assert models("export-hashes", "-").out == target.read_text()
    assert models("import-hashes", str(target)).out.startswith("matched 3")


# --- inbox, promote, duplicates ------------------------------------------------------------------------------------

@pytest.fixture
def studio(library_dir):
    instance = instance_services.instance_create(instance_id="studio")
    layout.build_instance_tree("studio")
    return instance


def test_inbox_lists_what_nodes_downloaded_per_instance_or_for_all(studio, storage):
    other = instance_services.instance_create(instance_id="other")
    put(storage["instances"] / "studio" / "models", "loras/downloaded.safetensors", b"d" * 2048)
    put(storage["instances"] / "other" / "models", "vae/mine.pt", b"v")

    one = models("inbox", "studio", "--json")
    everything = json.loads(models("inbox", "--json").out)

    assert json.loads(one.out) == [{"instance": "studio", "path": "loras/downloaded.safetensors", "folder": "loras",
                                    "size": 2048, "problem": ""}]
    assert [(i["instance"], i["path"]) for i in everything] == [(other.instance_id, "vae/mine.pt"),
                                                               ("studio", "loras/downloaded.safetensors")]
    table = models("inbox").out.splitlines()
    assert table[0].split() == ["INSTANCE", "PATH", "FOLDER", "SIZE", "PROBLEM"]
    assert table[2].split() == ["studio", "loras/downloaded.safetensors", "loras", "2.0", "KB", "-"]


def test_inbox_of_an_unknown_instance_names_the_known_ones(studio):
    result = models("inbox", "nope")

    assert result.code == 2
    assert result.err == "No instance 'nope'. Known: studio"


def test_promote_moves_an_inbox_file_into_the_library_through_a_worker(studio, storage, library_dir, worker_process):
    put(storage["instances"] / "studio" / "models", "loras/new.safetensors", b"fresh")
    worker_process()

    result = models("promote", "studio", "loras/new.safetensors")

    assert result.code == 0, result.err
    assert "Promote inbox file 'studio' succeeded." in result.out
    assert "Moved into the shared library as loras/new.safetensors." in result.out
    assert (library_dir / "loras" / "new.safetensors").read_bytes() == b"fresh"
    assert ModelAsset.objects.get().sha256 == sha256(b"fresh")


def test_promote_keeps_the_instances_name_when_the_library_has_the_bytes_under_another(studio, storage, library_dir,
                                                                                        run_worker):
    content = b"same weights" * 1000
    original = put(library_dir, "checkpoints/a.safetensors", content)
    models("verify", "--no-wait")
    run_worker()
    inbox_copy = put(storage["instances"] / "studio" / "models", "loras/b.safetensors", content)

    assert models("promote", "studio", "loras/b.safetensors", "--no-wait").code == 0
    run_worker()

    # The node that downloaded loras/b.safetensors finds it there through /shared/models/loras, with no second copy
    # of the bytes: a hard link to the library's file, never the instance's own inode.
    promoted = library_dir / "loras" / "b.safetensors"
    assert promoted.read_bytes() == content and not inbox_copy.exists()
    assert os.stat(promoted).st_ino == os.stat(original).st_ino and not promoted.is_symlink()
    assert original.read_bytes() == content
    assert Operation.objects.get(kind="models_promote").result == {
        "result": "linked", "path": "loras/b.safetensors", "same_as": "checkpoints/a.safetensors",
        "sha256": sha256(content)}
    listed = {asset["path"]: asset for asset in json.loads(models("list", "--json").out)}
    assert set(listed) == {"checkpoints/a.safetensors", "loras/b.safetensors"}
    assert listed["loras/b.safetensors"]["sha256"] == sha256(content)
    assert listed["loras/b.safetensors"]["folder"] == "loras"
    # Scans and verifies take both names for the files they are; one file under two names wastes nothing.
    assert models("scan", "--no-wait").code == 0
    run_worker()
    assert Operation.objects.get(kind="models_scan").result == {"new": 0, "changed": 0, "missing": 0,
                                                                 "unchanged": 2, "problems": []}
    assert models("verify", "--full", "--no-wait").code == 0
    run_worker()
    assert Operation.objects.filter(kind="models_verify").latest("created_at").result["hashed"] == 2
    assert {(a.status, a.sha256, tuple(a.evidence)) for a in ModelAsset.objects.all()} == {
        (ModelAsset.Status.UNVERIFIED, sha256(content), ())}
    assert json.loads(models("duplicates", "--json").out) == []


def test_promote_prints_which_library_file_the_new_name_links_to(studio, storage, library_dir, worker_process):
    put(library_dir, "checkpoints/a.safetensors", b"twin")
    put(storage["instances"] / "studio" / "models", "loras/b.safetensors", b"twin")
    worker_process()
    assert models("verify").code == 0

    result = models("promote", "studio", "loras/b.safetensors")

    assert result.code == 0, result.err
    assert ("The library already had this content as checkpoints/a.safetensors; loras/b.safetensors is now a hard "
            "link to it and the inbox copy was dropped.") in result.out
    assert (library_dir / "loras" / "b.safetensors").read_bytes() == b"twin"


@pytest.mark.parametrize("path", ["../escape.pt", "/etc/passwd", "loras/../../x.pt"])
def test_promote_refuses_a_path_outside_the_inbox_with_exit_2(studio, path):
    result = models("promote", "studio", path)

    assert result.code == 2
    assert result.err == f"path: '{path}' is not a path inside the instance's models/ folder."
    assert not Operation.objects.exists()


def test_duplicates_shows_each_group_and_the_wasted_bytes(library_dir, run_worker):
    put(library_dir, "checkpoints/a.safetensors", b"x" * 4096)
    put(library_dir, "checkpoints/copy-of-a.safetensors", b"x" * 4096)
    put(library_dir, "loras/third.pt", b"x" * 4096)
    put(library_dir, "loras/own.pt", b"y")
    models("verify", "--no-wait")
    run_worker()

    data = json.loads(models("duplicates", "--json").out)
    text = models("duplicates").out

    assert data == [{"sha256": sha256(b"x" * 4096), "size": 4096, "wasted": 8192,
                     "paths": ["checkpoints/a.safetensors", "checkpoints/copy-of-a.safetensors", "loras/third.pt"]}]
    assert f"{sha256(b'x' * 4096)[:10].upper()}  3 copies of 4.0 KB, 8.0 KB wasted" in text
    assert "  loras/third.pt" in text
    assert text.splitlines()[-1] == "In all 8.0 KB wasted in 1 group(s)."


def test_no_duplicates_says_so(hashed):
    assert json.loads(models("duplicates", "--json").out) == []
    assert models("duplicates").out.startswith("No duplicates")
