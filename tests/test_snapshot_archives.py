"""Hostile archives and hostile instance folders: every kind of archive member that could write outside an instance or
plant something on the host is refused by the real restore job, with nothing written outside (a canary folder stays
byte-for-byte the same) and the instance unchanged; what a snapshot cannot restore is never silently archived; a swap
that fails partway leaves nothing behind."""
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile

import pytest
from django.conf import settings as django_settings

from comfyhub.models import Operation
from instances import services as instance_services
from instances.models import Instance
from storage_app import layout, services, snapshots
from storage_app.models import Snapshot

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def instance(storage):
    created = instance_services.instance_create(instance_id="snappy")
    layout.build_instance_tree("snappy")
    root = storage["instances"] / "snappy"
    (root / "user" / "default" / "workflows" / "w.json").write_text('{"nodes": []}')
    (root / "models" / "loras").mkdir(parents=True)
    (root / "models" / "loras" / "own.pt").write_bytes(b"own")
    (root / "custom_nodes" / "node.py").write_text("NODE_CLASS_MAPPINGS = {}")
    return created


@pytest.fixture
def canary(tmp_path):
    """A host folder next to the storage roots that no restore may touch."""
    folder = tmp_path / "canary"
    folder.mkdir()
    (folder / "secret").write_text("host secret")
    os.chmod(folder / "secret", 0o600)
    return folder


@pytest.fixture
def trusting(settings):
    """A cap so high that only the structure of an archive decides (the bomb test sets its own)."""
    settings.RESTORE_MAX_UNPACKED_RATIO = 100000.0
    settings.RESTORE_FREE_SPACE_MARGIN_MB = 0
    return settings


def fingerprint(folder):
    """Every entry below `folder` with its type, mode, owner and content hash (or link target), no link followed."""
    found = {}
    for here, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(here, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                detail = "link:" + os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    detail = hashlib.sha256(handle.read()).hexdigest()
            else:
                detail = stat.S_IFMT(info.st_mode)
            found[os.path.relpath(path, folder)] = (stat.filemode(info.st_mode), info.st_uid, info.st_gid, detail)
    return found


def run(operation, run_worker):
    run_worker()
    operation.refresh_from_db()
    return operation


def hand_made(storage, instance, build, *, kind="config", trees=("user",), manifest=None):
    """A Snapshot row pointing at a hand-made archive with a correct hash and a valid-looking manifest."""
    path = storage["backups"] / "snappy" / "hand-made.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        if manifest is not False:
            data = json.dumps(manifest or {"format": 2, "kind": kind, "trees": list(trees), "instance": {}}).encode()
            add_file(tar, snapshots.MANIFEST_NAME, data)
        for tree in trees:
            add_dir(tar, tree)
        build(tar)
    digest, size = snapshots._sha256(path)
    return Snapshot.objects.create(instance=instance, instance_label="snappy", kind=kind,
                                   archive="snappy/hand-made.tar.gz", size=size, sha256=digest)


def add_file(tar, name, content=b"x", **fields):
    info = tarfile.TarInfo(name)
    info.size = len(content)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(content))


def add_dir(tar, name, **fields):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info)


def add_entry(tar, name, kind, target=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    tar.addfile(info)


def add_link(tar, name, target):
    add_entry(tar, name, tarfile.SYMTYPE, target)


def add_hardlink(tar, name, target):
    add_entry(tar, name, tarfile.LNKTYPE, target)


def add_pax_named(tar, header_name, pax_path):
    info = tarfile.TarInfo(header_name)
    info.size = 1
    info.pax_headers = {"path": pax_path}
    tar.addfile(info, io.BytesIO(b"x"))


CANARY = "CANARY"  # replaced by the canary folder's absolute path

MALICIOUS = {
    "an absolute path": (lambda tar: add_file(tar, "/etc/evil"), "points outside the instance"),
    "a path climbing out": (lambda tar: add_file(tar, "../../escape.txt"), "points outside the instance"),
    "a path climbing out through a tree": (lambda tar: add_file(tar, "user/../../escape.txt"),
                                           "points outside the instance"),
    "a path to the canary": (lambda tar: add_file(tar, "user/../../../../canary/secret", b"owned"),
                             "points outside the instance"),
    "a link chain y -> x/.. after x -> ..": (lambda tar: (add_link(tar, "user/x", ".."), add_link(tar, "user/y", "x/..")),
                                              "'user/y' points to 'x/..', outside the instance"),
    "a link chain given in the other order": (lambda tar: (add_link(tar, "user/y", "x/.."), add_link(tar, "user/x", "..")),
                                              "'user/y' points to 'x/..', outside the instance"),
    "a longer link chain": (lambda tar: (add_link(tar, "user/a", "."), add_link(tar, "user/b", "a/a/a/.."),
                                         add_link(tar, "user/c", "b/../..")), "'user/c' points to 'b/../..'"),
    "a link loop": (lambda tar: (add_link(tar, "user/p", "q"), add_link(tar, "user/q", "p")), "a loop"),
    "an absolute symlink": (lambda tar: add_link(tar, "user/link", "/etc/passwd"), "outside the instance"),
    "a symlink to the canary": (lambda tar: add_link(tar, "user/link", CANARY), "outside the instance"),
    "a relative symlink leaving the instance": (lambda tar: add_link(tar, "user/link", "../../../canary"),
                                                "outside the instance"),
    "a file written through a link in the archive": (
        lambda tar: (add_dir(tar, "user/sub"), add_link(tar, "user/l", "sub"), add_file(tar, "user/l/evil")),
        "lies under 'user/l', which is a link"),
    "a folder replaced by a link later in the archive": (
        lambda tar: (add_dir(tar, "user/a"), add_link(tar, "user/a", "/etc")), "appears twice"),
    "a hardlink to /etc/passwd": (lambda tar: add_hardlink(tar, "user/hard", "/etc/passwd"),
                                  "points outside the instance"),
    "a hardlink climbing out": (lambda tar: add_hardlink(tar, "user/hard", "../../canary/secret"),
                                "points outside the instance"),
    "a hardlink to a member that is not there yet": (
        lambda tar: (add_hardlink(tar, "user/hard", "user/later"), add_file(tar, "user/later")),
        "not a plain file earlier in the archive"),
    "a hardlink to a link": (lambda tar: (add_link(tar, "user/l", "."), add_hardlink(tar, "user/hard", "user/l")),
                             "not a plain file earlier in the archive"),
    "a character device": (lambda tar: add_entry(tar, "user/null", tarfile.CHRTYPE), "is a device"),
    "a block device": (lambda tar: add_entry(tar, "user/disk", tarfile.BLKTYPE), "is a device"),
    "a fifo": (lambda tar: add_entry(tar, "user/pipe", tarfile.FIFOTYPE), "is a pipe"),
    "an entry of unknown type": (lambda tar: add_entry(tar, "user/odd", b"Z"), "unknown type"),
    "a folder the snapshot never holds": (lambda tar: add_file(tar, "elsewhere/file"), "not part of a config snapshot"),
    "another tree than the kind's": (lambda tar: add_file(tar, "models/evil.pt"), "not part of a config snapshot"),
    "a tree that is a link": (lambda tar: None, "must be a folder"),  # built specially below
    "a pax path climbing out": (lambda tar: add_pax_named(tar, "user/innocent", "../../escape.txt"),
                                "points outside the instance"),
    "a pax path differing from the tar header": (lambda tar: add_pax_named(tar, "../../escape.txt", "user/innocent"),
                                                 "has a pax header naming its name"),
    "a pax path with a NUL byte": (lambda tar: add_pax_named(tar, "user/a", "user/a\x00b"), "NUL byte"),
}


@pytest.mark.parametrize("case", list(MALICIOUS))
def test_it_refuses_each_malicious_member_and_changes_nothing(case, instance, storage, canary, run_worker, trusting):
    build, message = MALICIOUS[case]
    if case == "a symlink to the canary":
        build = lambda tar: add_link(tar, "user/link", str(canary))  # noqa: E731
    trees = ("user",)
    if case == "a tree that is a link":
        trees = ()
        build = lambda tar: add_link(tar, "user", str(canary))  # noqa: E731
    snapshot = hand_made(storage, instance, build, trees=trees)
    root = storage["instances"] / "snappy"
    instance_before, canary_before = fingerprint(root), fingerprint(canary)
    operation = run(services.snapshot_restore(snapshot=snapshot), run_worker)
    assert operation.status == Operation.Status.FAILED
    assert message in operation.error and "Nothing was restored" in operation.error
    assert fingerprint(root) == instance_before
    assert fingerprint(canary) == canary_before
    assert sorted(p.name for p in storage["instances"].iterdir()) == ["snappy"]  # no staging folder left
    assert not list(storage["instances"].parent.parent.rglob("escape.txt"))
    assert Snapshot.objects.count() == 1  # refused before the undo snapshot: nothing to undo


@pytest.mark.parametrize("listed", [["../../etc"], ["models/../.."], ["user", "models"], ["user", "/etc"], "user"])
def test_it_refuses_a_manifest_listing_other_folders(listed, instance, storage, canary, run_worker, trusting):
    snapshot = hand_made(storage, instance, lambda tar: add_file(tar, "user/ok.json", b"{}"),
                         manifest={"format": 2, "kind": "config", "trees": listed, "instance": {}})
    root = storage["instances"] / "snappy"
    instance_before, canary_before = fingerprint(root), fingerprint(canary)
    operation = run(services.snapshot_restore(snapshot=snapshot), run_worker)
    assert operation.status == Operation.Status.FAILED
    assert "a forged archive" in operation.error
    assert fingerprint(root) == instance_before and fingerprint(canary) == canary_before


def test_it_refuses_an_archive_without_a_manifest(instance, storage, run_worker, trusting):
    snapshot = hand_made(storage, instance, lambda tar: add_file(tar, "user/ok.json"), manifest=False)
    root = storage["instances"] / "snappy"
    before = fingerprint(root)
    operation = run(services.snapshot_restore(snapshot=snapshot), run_worker)
    assert operation.status == Operation.Status.FAILED and "not a ComfyHub snapshot" in operation.error
    assert fingerprint(root) == before


def test_it_stops_a_gzip_bomb_at_the_cap(instance, storage, canary, run_worker, settings):
    settings.RESTORE_MAX_UNPACKED_RATIO = 20.0
    settings.RESTORE_FREE_SPACE_MARGIN_MB = 0
    bomb = b"\0" * (4 << 20)  # 4 MiB of zeros: a few KiB once gzipped, far over 20× that
    snapshot = hand_made(storage, instance, lambda tar: add_file(tar, "user/bomb.bin", bomb))
    assert snapshot.size * 20 < len(bomb)
    root = storage["instances"] / "snappy"
    instance_before, canary_before = fingerprint(root), fingerprint(canary)
    operation = run(services.snapshot_restore(snapshot=snapshot), run_worker)
    assert operation.status == Operation.Status.FAILED
    assert "user/bomb.bin" in operation.error and "RESTORE_MAX_UNPACKED_RATIO (20)" in operation.error
    assert fingerprint(root) == instance_before and fingerprint(canary) == canary_before
    assert sorted(p.name for p in storage["instances"].iterdir()) == ["snappy"]


def test_it_stops_a_bomb_that_would_fill_the_disk(instance, storage, run_worker, settings):
    settings.RESTORE_MAX_UNPACKED_RATIO = 100000.0
    disk = os.statvfs(storage["instances"])
    free_mb = disk.f_bavail * disk.f_frsize // (1 << 20)
    settings.RESTORE_FREE_SPACE_MARGIN_MB = free_mb - 1  # leaves about 1 MiB usable
    snapshot = hand_made(storage, instance, lambda tar: add_file(tar, "user/bomb.bin", b"\0" * (3 << 20)))
    root = storage["instances"] / "snappy"
    before = fingerprint(root)
    operation = run(services.snapshot_restore(snapshot=snapshot), run_worker)
    assert operation.status == Operation.Status.FAILED
    assert "The disk is too full to restore" in operation.error and "RESTORE_FREE_SPACE_MARGIN_MB" in operation.error
    assert fingerprint(root) == before


def test_it_counts_the_bytes_it_writes_not_only_what_headers_declare(instance, storage, trusting):
    from storage_app.snapshots import Limit

    archive = storage["backups"] / "plain.tar.gz"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        add_file(tar, snapshots.MANIFEST_NAME, b'{"trees": ["user"]}')
        add_file(tar, "user/a.bin", b"a" * 5000)
    # The check passes under a generous cap; extraction under a smaller one stops at the bytes actually written.
    plan = snapshots.inspect_archive(archive, ("user",), Limit(1 << 20, "test", False))
    plan.limit = Limit(4000, "a test cap", False)
    staging = snapshots.make_staging(storage["instances"])
    try:
        with pytest.raises(snapshots.SnapshotError, match="user/a.bin.*a test cap"):
            snapshots.extract_to_staging(archive, staging, plan)
    finally:
        staging.remove()
        staging.close()
    assert sorted(p.name for p in storage["instances"].iterdir()) == ["snappy"]


def test_forged_owners_and_modes_are_normalised(instance, storage, run_worker, trusting):
    def build(tar):
        add_dir(tar, "user/open", mode=0o1777, uid=0, gid=0, uname="root", gname="root")
        add_file(tar, "user/open/suid", b"#!/bin/sh\n", mode=0o6777, uid=0, gid=0, uname="root", gname="root",
                 mtime=-5)
        add_file(tar, "user/open/private.json", b"{}", mode=0o600, uid=4242, gid=4242, mtime=2 ** 40)

    snapshot = hand_made(storage, instance, build)
    operation = run(services.snapshot_restore(snapshot=snapshot), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    root = storage["instances"] / "snappy" / "user"
    modes = {name: (stat.S_IMODE(os.lstat(root / name).st_mode), os.lstat(root / name).st_uid,
                    os.lstat(root / name).st_gid) for name in ("open", "open/suid", "open/private.json")}
    owner = (django_settings.PUID, django_settings.PGID) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    assert modes == {"open": (0o755, *owner), "open/suid": (0o755, *owner), "open/private.json": (0o600, *owner)}


def test_hardlinks_to_earlier_files_in_the_archive_are_restored(instance, storage, run_worker, trusting):
    def build(tar):
        add_file(tar, "user/first.json", b'{"a": 1}')
        add_hardlink(tar, "user/second.json", "user/first.json")
        add_link(tar, "user/alias.json", "first.json")

    operation = run(services.snapshot_restore(snapshot=hand_made(storage, instance, build)), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    user = storage["instances"] / "snappy" / "user"
    assert (user / "second.json").read_bytes() == b'{"a": 1}'
    assert os.readlink(user / "alias.json") == "first.json"


def test_a_clone_of_a_malicious_archive_creates_nothing(instance, storage, canary, run_worker, trusting):
    snapshot = hand_made(storage, instance, lambda tar: (add_link(tar, "user/x", ".."), add_link(tar, "user/y", "x/..")))
    canary_before = fingerprint(canary)
    operation = run(services.snapshot_clone(snapshot=snapshot, new_instance_id="copy"), run_worker)
    assert operation.status == Operation.Status.FAILED and "outside the instance" in operation.error
    assert not Instance.objects.filter(instance_id="copy").exists()
    assert sorted(p.name for p in storage["instances"].iterdir()) == ["snappy"]
    assert fingerprint(canary) == canary_before


def test_a_snapshot_of_a_folder_with_links_leaving_it_leaves_them_out_and_restores(instance, storage, canary,
                                                                                  run_worker):
    root = storage["instances"] / "snappy"
    default = root / "user" / "default"
    os.symlink(str(canary / "secret"), default / "absolute")
    os.symlink("../../../../canary", default / "leaving")
    os.symlink("..", root / "user" / "x")  # inside (the instance folder itself) ...
    os.symlink("x/..", root / "user" / "y")  # ... but through x this one climbs out
    os.symlink("workflows/w.json", default / "inside")
    os.mkfifo(default / "pipe")
    operation = run(services.snapshot_create(instance=instance, kind="config"), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    for name in ("user/default/absolute", "user/default/leaving", "user/y", "user/default/pipe"):
        assert f"left out of the snapshot: {name} (" in operation.log
    assert "user/default/inside" not in operation.log and "user/x " not in operation.log
    snapshot = Snapshot.objects.get()
    with tarfile.open(snapshots.archive_path(snapshot)) as tar:
        names = set(tar.getnames())
    assert {"user/default/inside", "user/x", "user/default/workflows/w.json"} <= names
    assert not names & {"user/default/absolute", "user/default/leaving", "user/y", "user/default/pipe"}
    assert [item["path"] for item in snapshot.manifest["skipped"]] == [
        "user/default/pipe", "user/default/absolute", "user/default/leaving", "user/y"]

    (default / "workflows" / "w.json").write_text('{"changed": true}')
    canary_before = fingerprint(canary)
    restore = run(services.snapshot_restore(snapshot=snapshot), run_worker)
    assert restore.status == Operation.Status.SUCCEEDED, restore.error
    assert json.loads((default / "workflows" / "w.json").read_text()) == {"nodes": []}
    assert os.readlink(default / "inside") == "workflows/w.json" and os.readlink(root / "user" / "x") == ".."
    assert not os.path.lexists(default / "absolute") and not os.path.lexists(root / "user" / "y")
    assert "not in this snapshot (left out when it was taken): user/default/absolute" in restore.log
    assert fingerprint(canary) == canary_before


def test_a_tree_that_is_a_link_is_left_out_of_a_snapshot(instance, storage, canary, run_worker):
    root = storage["instances"] / "snappy"
    os.rename(root / "models", root / "models-real")
    os.symlink(str(canary), root / "models")
    operation = run(services.snapshot_create(instance=instance, kind="full"), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert f"left out of the snapshot: models (the folder is a link to {canary}" in operation.log
    with tarfile.open(snapshots.archive_path(Snapshot.objects.get())) as tar:
        assert not [n for n in tar.getnames() if n.startswith("models") or "secret" in n]


def test_a_swap_that_fails_partway_leaves_nothing_behind(instance, storage, run_worker, tmp_path, trusting):
    root = storage["instances"] / "snappy"
    snapshot = snapshots.create(instance, kind="full")
    (root / "user" / "default" / "workflows" / "w.json").write_text('{"now": true}')
    (root / "custom_nodes" / "node.py").write_text("# changed since")
    # models/ becomes a mount point: user/ and custom_nodes/ swap in, then renaming models/ fails (EBUSY).
    saved = tmp_path / "models-saved"
    os.rename(root / "models", saved)
    (root / "models").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root / "models")], check=True)
    try:
        (root / "models" / "mounted.pt").write_bytes(b"on the mount")
        before = fingerprint(root)
        operation = run(services.snapshot_restore(snapshot=snapshot), run_worker)
        assert operation.status == Operation.Status.FAILED
        assert "Swapping the restored 'models'" in operation.error and "left exactly as it was" in operation.error
        assert fingerprint(root) == before
        assert sorted(p.name for p in storage["instances"].iterdir()) == ["snappy"]  # no staging folder
        assert not [p for p in root.iterdir() if p.name.startswith(".")]
    finally:
        subprocess.run(["umount", str(root / "models")], check=True)


def test_an_archive_made_by_gnu_tar_before_still_restores(instance, storage, run_worker, tmp_path, trusting):
    # Snapshots taken before ComfyHub wrote its own tar stream were made by GNU tar: long names as ././@LongLink,
    # hard links between equal files, folders with a trailing slash.
    source = tmp_path / "old"
    deep = source / "user" / "default" / ("a-rather-long-folder-name-" * 3) / ("and-a-long-file-name-" * 3 + ".json")
    deep.parent.mkdir(parents=True)
    deep.write_text('{"old": true}')
    os.link(deep, source / "user" / "default" / "same.json")
    os.symlink("same.json", source / "user" / "default" / "alias.json")
    (source / snapshots.MANIFEST_NAME).write_text(json.dumps({"format": 1, "kind": "config", "trees": ["user"]}))
    archive = storage["backups"] / "snappy" / "old.tar.gz"
    archive.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "--create", "--gzip", "--file", str(archive), "--numeric-owner", "-C", str(source),
                    snapshots.MANIFEST_NAME, "user"], check=True)
    digest, size = snapshots._sha256(archive)
    snapshot = Snapshot.objects.create(instance=instance, instance_label="snappy", kind="config",
                                       archive="snappy/old.tar.gz", size=size, sha256=digest)
    operation = run(services.snapshot_restore(snapshot=snapshot), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    restored = storage["instances"] / "snappy" / deep.relative_to(source)
    assert json.loads(restored.read_text()) == {"old": True}
    default = storage["instances"] / "snappy" / "user" / "default"
    assert (default / "same.json").read_text() == '{"old": true}' and os.readlink(default / "alias.json") == "same.json"
    assert not (default / "workflows").exists()  # the whole user/ folder was replaced
