"""Instances run as PUID:PGID, never root, and everything they write belongs to PUID:PGID: checked on the real engine
with the ComfyHub test image (docker/comfyui/Dockerfile) and by walking the instance's folder with lstat. The
directory build gives root-owned folders back to PUID:PGID, never through a link."""
import json
import os
import shutil
import tarfile
import urllib.request
import uuid

import pytest

from comfyhub.models import Operation
from instances import runtime, services
from storage_app import layout, snapshots
from tests.test_settings import manage

OWNER = (1234, 2345)  # not the image's own USER (1000): the container's user comes from ComfyHub's settings


def run(operation, run_worker):
    run_worker()
    operation.refresh_from_db()
    return operation


def owners_in(folder):
    """(uid, gid) -> the paths under `folder` (itself included) with that owner, read with lstat (no link followed)."""
    found = {}
    for path in [folder, *folder.rglob("*")]:
        info = path.lstat()
        found.setdefault((info.st_uid, info.st_gid), []).append(str(path.relative_to(folder.parent)))
    return found


def post(instance, path, body: bytes, content_type: str):
    request = urllib.request.Request(f"http://127.0.0.1:{instance.host_port}{path}", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def upload(instance, kind, subfolder, filename, data):
    """ComfyUI's POST /upload/image into output/ or temp/ (type), as the frontend sends it."""
    boundary = uuid.uuid4().hex
    fields = {"type": kind, "subfolder": subfolder, "overwrite": "true"}
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    return post(instance, "/upload/image", b"".join(parts) + f"--{boundary}--\r\n".encode(),
                f"multipart/form-data; boundary={boundary}")


@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_an_instance_runs_as_puid_and_everything_it_writes_belongs_to_puid(comfyui_double_image, docker_cleanup,
                                                                           run_worker, settings, storage):
    settings.PUID, settings.PGID = OWNER
    layout.build_shared_tree()
    (storage["shared"] / "input" / "shared.png").write_bytes(b"shared")  # linked into input/ by the build
    instance = services.instance_create(instance_id="owned", image=comfyui_double_image)
    operation = run(services.instance_start(instance=instance), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error + operation.log

    container = docker_cleanup.containers.get(instance.container_name)
    assert container.attrs["Config"]["User"] == "1234:2345"
    identity = container.exec_run(["sh", "-c", 'id -u; id -g; echo "$HOME"'])
    assert identity.exit_code == 0 and identity.output.decode().split() == ["1234", "2345", "/instance/home"]
    environment = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
    assert {key: environment[key] for key in ("HOME", "XDG_CACHE_HOME", "PYTHONUSERBASE")} == {
        "HOME": "/instance/home", "XDG_CACHE_HOME": "/instance/home/.cache",
        "PYTHONUSERBASE": "/instance/python-packages"}
    assert environment["PYTHONPATH"].split(":")[0] == "/instance/python-packages"

    # ComfyUI saves its settings and a workflow in user/default, uploads into output/ and temp/; a node writes
    # into its home and its cache.
    assert post(instance, "/settings", json.dumps({"Comfy.LinkRenderMode": 2}).encode(), "application/json") == 200
    assert post(instance, "/userdata/workflows%2Fmine.json", b'{"nodes": []}', "application/json") == 200
    assert upload(instance, "output", "shots", "a.png", b"png") == 200
    assert upload(instance, "temp", "", "t.png", b"png") == 200
    wrote = container.exec_run(["sh", "-c", 'echo home > "$HOME/probe" && mkdir -p "$XDG_CACHE_HOME/hub" && '
                                            'echo cache > "$XDG_CACHE_HOME/hub/probe"'])
    assert wrote.exit_code == 0, wrote.output.decode()

    root = storage["instances"] / "owned"
    for written in ("user/default/comfy.settings.json", "user/default/workflows/mine.json", "output/shots/a.png",
                    "home/probe", "home/.cache/hub/probe"):
        assert (root / written).is_file(), written
    assert any(path.name == "t.png" for path in (root / "temp").rglob("*"))
    assert (root / "input" / "shared.png").is_symlink()
    owners = owners_in(root)
    assert set(owners) == {OWNER}, {owner: paths[:5] for owner, paths in owners.items() if owner != OWNER}


@pytest.mark.django_db
def test_the_container_spec_names_puid_and_pgid_as_its_user_and_the_hash_covers_it(settings):
    instance = services.instance_create(instance_id="speced")
    settings.PUID, settings.PGID = OWNER
    spec = runtime.container_spec(instance)
    assert spec.user == "1234:2345"
    settings.PUID = 1235
    assert runtime.container_spec(instance).config_hash != spec.config_hash


# --- The directory build --------------------------------------------------------------------------------------

def root_only():
    if os.geteuid() != 0:
        pytest.fail("this suite runs as root (make test on CI); ownership cannot be checked otherwise")


def test_every_folder_the_build_makes_belongs_to_puid_the_instance_folder_and_home_included(settings, storage):
    root_only()
    settings.PUID, settings.PGID = OWNER
    layout.build_instance_tree("fresh")
    root = storage["instances"] / "fresh"
    assert (root / "home").is_dir() and "home" in layout.INSTANCE_SUBDIRS
    owners = owners_in(root)
    assert set(owners) == {OWNER}, owners


def test_the_build_gives_root_owned_folders_back_to_puid(settings, storage):
    root_only()
    settings.PUID, settings.PGID = OWNER
    layout.build_instance_tree("repaired")
    root = storage["instances"] / "repaired"
    # As an older ComfyHub, or a container running as root, left them.
    for relpath in ("", "user/default", "user/default/workflows", "home", "output"):
        os.chown(root / relpath, 0, 0)
    (root / "output" / "mine.png").write_bytes(b"png")
    os.chown(root / "output" / "mine.png", 0, 0)
    report = layout.build_instance_tree("repaired")
    assert sorted(report.repaired) == sorted(str(root / relpath) if relpath else str(root)
                                             for relpath in ("", "user/default", "user/default/workflows", "home",
                                                             "output"))
    for relpath in ("", "user/default", "user/default/workflows", "home", "output"):
        info = (root / relpath).lstat()
        assert (info.st_uid, info.st_gid) == OWNER, relpath
    # Only the fixed folders: a file the instance keeps is its own business.
    assert (root / "output" / "mine.png").lstat().st_uid == 0
    assert layout.build_instance_tree("repaired").repaired == []


def test_a_folder_another_user_owns_is_left_as_it_is(settings, storage):
    root_only()
    settings.PUID, settings.PGID = OWNER
    layout.build_instance_tree("others")
    root = storage["instances"] / "others"
    os.chown(root / "models", 4321, 4321)  # the administrator's choice, not root's leftover
    assert layout.build_instance_tree("others").repaired == []
    assert (root / "models").lstat().st_uid == 4321


@pytest.mark.parametrize("level", ["user/default", "home"])
def test_a_link_planted_as_a_fixed_folder_is_refused_and_never_chowned_through(settings, storage, canary, level):
    root_only()
    settings.PUID, settings.PGID = OWNER
    layout.build_instance_tree("trapped")
    link = storage["instances"] / "trapped" / level
    shutil.rmtree(link)
    os.symlink(canary, link)  # the canary is root's: a chown through the link would change it
    with pytest.raises(layout.LayoutError) as refused:
        layout.build_instance_tree("trapped")
    assert f"{link} is a link" in str(refused.value)
    assert os.path.islink(link) and os.lstat(canary).st_uid == 0


@pytest.mark.django_db
def test_snapshots_leave_home_out(storage):
    instance = services.instance_create(instance_id="cached")
    layout.build_instance_tree("cached")
    root = storage["instances"] / "cached"
    (root / "home" / ".cache").mkdir()
    (root / "home" / ".cache" / "big.bin").write_bytes(b"cache")
    (root / "user" / "default" / "comfy.settings.json").write_text("{}")
    for kind in ("config", "full"):
        snapshot = snapshots.create(instance, kind=kind, include_output=True)
        with tarfile.open(snapshots.archive_path(snapshot)) as tar:
            names = tar.getnames()
        assert "user/default/comfy.settings.json" in names
        assert not [name for name in names if name == "home" or name.startswith("home/")], kind


# --- Settings ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["PUID", "PGID"])
def test_settings_refuse_root_as_the_instances_user_saying_what_to_set(name):
    result = manage("check", env={"DEBUG": "true", name: "0"})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"ComfyHub cannot start: {name}='0': instance containers never run as root "
        f"({'uid' if name == 'PUID' else 'gid'} 0); use the {'uid' if name == 'PUID' else 'gid'} that should own the "
        "instance files, e.g. 1000.")
