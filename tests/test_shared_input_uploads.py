"""An upload over the name of a shared input image, on the real engine: ComfyUI writes it through the instance's link
onto the read-only /shared mount and answers 500 (shown with the test double, which writes uploads as ComfyUI's
server.py does); the upload guard ComfyHub's image ships (docker/comfyui/custom_nodes/comfyhub_shared_input) first
turns that link into the instance's own copy of the shared file, so the upload is written there. The guard's rule runs
here inside the instance's container, as its user, on its real mounts; its aiohttp glue needs ComfyUI itself
(docs/runtime-contract.md)."""
import io
import json
import os
import tarfile
import urllib.error
import urllib.request
import uuid

import pytest
from django.conf import settings

from comfyhub.models import Operation
from instances import docker_engine, services
from storage_app import layout
from tests.conftest import REPO

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]

GUARD = REPO / "docker" / "comfyui" / "custom_nodes" / "comfyhub_shared_input"
SHIPPED_GUARD = "/opt/comfyhub/custom_nodes/comfyhub_shared_input"
GUARD_COPY = "/tmp/comfyhub-guard"  # this checkout's guard, put into the running container by the tests


@pytest.fixture
def studio(comfyui_double_image, docker_cleanup, run_worker):
    """A running instance with the shared input image picture.png linked into its input/ (as ComfyHub does)."""
    layout.build_shared_tree()
    (settings.COMFY_SHARED_PATH / "input" / "picture.png").write_bytes(b"the shared picture")
    instance = services.instance_create(instance_id="studio", image=comfyui_double_image)
    operation = services.instance_start(instance=instance)
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error + operation.log
    instance.refresh_from_db()
    assert os.readlink(own_input() / "picture.png") == "/shared/input/picture.png"
    return instance


def own_input():
    return settings.COMFY_INSTANCES_PATH / "studio" / "input"


def shared_picture():
    return (settings.COMFY_SHARED_PATH / "input" / "picture.png").read_bytes()


def upload(instance, path, filename, data, **fields):
    """POST a multipart form to the instance as the ComfyUI frontend does; (status, parsed JSON or text)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f'Content-Type: image/png\r\n\r\n'.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"http://127.0.0.1:{instance.host_port}{path}", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def container_of(instance):
    return docker_engine.require_engine().containers.get(instance.container_name)


def run_guard(instance, *calls):
    """Run the guard's rule inside the instance's container, as the container's user: for each call
    (subfolder, filename, overwrite), what it replaced (a path relative to /instance/input) or None."""
    container = container_of(instance)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add(GUARD / "uploads.py", arcname="comfyhub-guard/uploads.py")
    assert container.put_archive("/tmp", archive.getvalue())
    script = (f"import json, os, sys; sys.path.insert(0, {GUARD_COPY!r}); import uploads; "
              "calls = json.loads(sys.argv[1]); "
              "print(json.dumps([os.geteuid(), os.getegid(), [uploads.replace_shared_link_before_upload("
              "'/instance/input', subfolder, filename, overwrite=overwrite) for subfolder, filename, overwrite "
              "in calls]]))")
    result = container.exec_run(["python3", "-c", script, json.dumps(calls)])
    assert result.exit_code == 0, result.output.decode(errors="replace")
    uid, gid, replaced = json.loads(result.output)
    assert (uid, gid) == (settings.PUID, settings.PGID)  # the instance's user, not root
    return replaced


@pytest.mark.parametrize("path, fields", [
    ("/upload/image", {}),
    ("/api/upload/image", {"type": "input"}),
    ("/upload/mask", {"original_ref": json.dumps({"filename": "picture.png", "type": "input"})}),
])
def test_comfyui_answers_500_for_an_upload_over_a_shared_name_with_overwrite(studio, path, fields):
    status, answer = upload(studio, path, "picture.png", b"mine", overwrite="true", **fields)

    assert status == 500, answer
    assert shared_picture() == b"the shared picture"
    assert os.readlink(own_input() / "picture.png") == "/shared/input/picture.png"


def test_comfyui_saves_an_upload_over_a_shared_name_without_overwrite_under_a_new_name(studio):
    assert upload(studio, "/upload/image", "picture.png", b"mine") == (
        200, {"name": "picture (1).png", "subfolder": "", "type": "input"})
    assert upload(studio, "/upload/image", "picture.png", b"the shared picture") == (
        200, {"name": "picture.png", "subfolder": "", "type": "input"})  # the same bytes: nothing written

    renamed = own_input() / "picture (1).png"
    assert renamed.read_bytes() == b"mine" and not renamed.is_symlink()
    assert os.stat(renamed).st_uid == settings.PUID
    assert os.readlink(own_input() / "picture.png") == "/shared/input/picture.png"


@pytest.mark.parametrize("path, fields", [
    ("/upload/image", {}),
    ("/upload/mask", {"original_ref": json.dumps({"filename": "picture.png", "type": "input"})}),  # masks itself
])
def test_with_the_guard_the_upload_replaces_the_link_and_the_refresh_leaves_it(studio, path, fields):
    assert run_guard(studio, ["", "picture.png", True]) == ["picture.png"]
    copy = own_input() / "picture.png"  # the instance's own copy now, the shared file as it was
    assert copy.read_bytes() == b"the shared picture" and not copy.is_symlink()
    assert os.stat(copy).st_uid == settings.PUID
    assert sorted(os.listdir(own_input())) == ["picture.png"]  # no temporary file left behind
    assert shared_picture() == b"the shared picture"

    assert upload(studio, path, "picture.png", b"mine", overwrite="true", **fields) == (
        200, {"name": "picture.png", "subfolder": "", "type": "input"})
    assert copy.read_bytes() == b"mine" and not copy.is_symlink()
    assert shared_picture() == b"the shared picture"

    assert layout.refresh_shared_input(["studio"]) == {"linked": {}, "unlinked": {}, "refused": {}}
    assert copy.read_bytes() == b"mine" and not copy.is_symlink()


def test_the_guard_removes_a_dangling_shared_link_an_upload_without_overwrite_would_write_through(studio):
    (settings.COMFY_SHARED_PATH / "input" / "picture.png").unlink()  # the refresh has not run yet

    assert run_guard(studio, ["", "picture.png", False]) == ["picture.png"]
    assert upload(studio, "/upload/image", "picture.png", b"mine") == (
        200, {"name": "picture.png", "subfolder": "", "type": "input"})
    assert (own_input() / "picture.png").read_bytes() == b"mine"


def test_the_guard_leaves_everything_else_to_comfyui(studio):
    instance_dir = settings.COMFY_INSTANCES_PATH / "studio"
    (own_input() / "own.png").write_bytes(b"the instance's own")
    os.symlink("/instance/output/elsewhere.png", own_input() / "elsewhere.png")
    os.symlink("own.png", own_input() / "relative.png")
    for folder in (instance_dir / "output" / "inner", own_input() / "sub"):
        folder.mkdir()
        os.chown(folder, settings.PUID, settings.PGID)  # as ComfyUI would have made them
    os.symlink("/shared/input/picture.png", instance_dir / "output" / "inner" / "picture.png")
    os.symlink("/instance/output/inner", own_input() / "through")  # a folder reached through a link
    os.symlink("/shared/input/picture.png", own_input() / "sub" / "picture.png")

    replaced = run_guard(
        studio,
        ["", "own.png", True],  # the instance's own file: ComfyUI overwrites it
        ["", "elsewhere.png", True],  # a link, but not into /shared
        ["", "relative.png", True],
        ["../output/inner", "picture.png", True],  # leaves input/: ComfyUI answers 400
        ["", "../output/inner/picture.png", True],
        ["through", "picture.png", True],  # never followed out of input/
        ["", "picture.png", False],  # the shared file exists: ComfyUI picks "picture (1).png"
        ["", "", True],
        ["sub/..", "picture.png", True],  # ComfyUI's own path arithmetic: input/picture.png
        ["sub", "picture.png", True],
    )

    assert replaced == [None, None, None, None, None, None, None, None, "picture.png", "sub/picture.png"]
    assert (own_input() / "sub" / "picture.png").read_bytes() == b"the shared picture"
    assert not (own_input() / "sub" / "picture.png").is_symlink()
    assert (own_input() / "own.png").read_bytes() == b"the instance's own"
    assert os.readlink(own_input() / "elsewhere.png") == "/instance/output/elsewhere.png"
    assert os.readlink(own_input() / "relative.png") == "own.png"
    assert os.readlink(instance_dir / "output" / "inner" / "picture.png") == "/shared/input/picture.png"
    assert os.readlink(own_input() / "through") == "/instance/output/inner"
    assert shared_picture() == b"the shared picture"
    assert upload(studio, "/upload/image", "picture.png", b"x", subfolder="../output/inner", overwrite="true")[0] == 400


def test_the_image_ships_the_guard_where_comfyui_loads_it(studio):
    """The instance's image holds this checkout's guard, and ComfyUI's own extra_model_paths.yaml (the one next to
    main.py, which ComfyUI reads at every start) adds its folder to the custom node folders."""
    container = container_of(studio)
    for name in ("__init__.py", "uploads.py", "nodes.json"):
        result = container.exec_run(["cat", f"{SHIPPED_GUARD}/{name}"])
        assert result.exit_code == 0, result.output.decode(errors="replace")
        assert result.output == (GUARD / name).read_bytes(), f"{SHIPPED_GUARD}/{name} differs from the checkout"
    logs = container.logs().decode(errors="replace")
    assert "Adding extra search path custom_nodes /opt/comfyhub/custom_nodes" in logs
    nodes = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{studio.host_port}/object_info", timeout=10).read())
    assert not [name for name, info in nodes.items() if "comfyhub" in info["python_module"]]  # it defines no nodes
