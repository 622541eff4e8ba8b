"""The image ComfyHub ships (docker/comfyui/Dockerfile), as the test image built from it: the ComfyUI test double in
place of ComfyUI and a stub torch 2.13.0 as its torch stack, run on the real engine as an instance's uid:gid."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support.docker_fixtures import published_port, session_label, wait_for_http
from tests.support.images import (
    ARGUMENTS_LABEL, BASE_TAG, DOUBLE_BUILD_ARGS, ImageBuildError, assemble_image_context, build_image,
)

pytestmark = pytest.mark.docker

UID, GID = 4321, 4321
ARGUMENTS = ["--listen", "0.0.0.0", "--port", "8188", "--base-directory", "/instance", "--cpu"]


@pytest.fixture
def instance_folder(tmp_path) -> Path:
    """An instance's folder as ComfyHub leaves it: owned by the uid:gid the container runs as."""
    folder = tmp_path / "instance"
    folder.mkdir()
    os.chown(folder, UID, GID)
    return folder


def start(client, image: str, instance_folder: Path, *, user: str = f"{UID}:{GID}", command=None,
          environment=None):
    return client.containers.run(
        image, command=command, detach=True, user=user, labels=session_label(), environment=environment or {},
        ports={"8188/tcp": ("127.0.0.1", None)},
        volumes={str(instance_folder): {"bind": "/instance", "mode": "rw"}},
    )


def system_stats(container) -> dict:
    port = published_port(container)
    return json.loads(wait_for_http(f"http://127.0.0.1:{port}/system_stats", timeout=30, container=container))


def run_to_the_end(client, image: str, instance_folder: Path, *command: str) -> tuple[int, str]:
    """Run a command (not ComfyUI) in the image as UID:GID with the instance folder mounted; its status and output."""
    container = client.containers.run(
        image, entrypoint=list(command), command=[], detach=True, user=f"{UID}:{GID}", labels=session_label(),
        volumes={str(instance_folder): {"bind": "/instance", "mode": "rw"}},
    )
    status = container.wait(timeout=120)["StatusCode"]
    return status, container.logs().decode(errors="replace")


def owner(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_uid, info.st_gid


def test_it_runs_as_any_uid_and_answers_on_system_stats(docker_cleanup, comfyui_double_image, instance_folder):
    container = start(docker_cleanup, comfyui_double_image, instance_folder, command=ARGUMENTS)

    stats = system_stats(container)

    assert stats["system"]["argv"] == ["/opt/comfyui/main.py", *ARGUMENTS]
    assert container.exec_run("id -u").output.decode().strip() == str(UID)
    assert owner(instance_folder / "output") == (UID, GID)


def test_its_default_command_serves_the_instance_folder(docker_cleanup, comfyui_double_image, instance_folder):
    container = start(docker_cleanup, comfyui_double_image, instance_folder)

    stats = system_stats(container)

    assert stats["system"]["argv"][1:] == ["--listen", "0.0.0.0", "--port", "8188", "--base-directory", "/instance"]


def test_a_comfyui_with_a_database_keeps_it_in_the_instances_user_folder(docker_cleanup, comfyui_double_image,
                                                                         instance_folder, tmp_path):
    # ComfyUI's default database lies beside its code, which the instance's uid cannot write. The double has no
    # comfy/cli_args.py; give it one that declares --database-url, as ComfyUI's does.
    cli_args = tmp_path / "cli_args.py"
    cli_args.write_text('parser.add_argument("--database-url", type=str, default="sqlite:///beside-the-code")\n')
    mounts = {str(instance_folder): {"bind": "/instance", "mode": "rw"},
              str(cli_args): {"bind": "/opt/comfyui/comfy/cli_args.py", "mode": "ro"}}

    def argv(command):
        container = docker_cleanup.containers.run(
            comfyui_double_image, command=command, detach=True, user=f"{UID}:{GID}", labels=session_label(),
            ports={"8188/tcp": ("127.0.0.1", None)}, volumes=mounts)
        return system_stats(container)["system"]["argv"]

    assert argv(ARGUMENTS) == ["/opt/comfyui/main.py", "--database-url", "sqlite:////instance/user/comfyui.db",
                               *ARGUMENTS]
    chosen = [*ARGUMENTS, "--database-url", "sqlite:///:memory:"]
    assert argv(chosen)[-2:] == ["--database-url", "sqlite:///:memory:"]  # the later one is the one ComfyUI takes


def test_home_and_its_cache_are_made_in_the_instance_folder_for_that_uid(docker_cleanup, comfyui_double_image,
                                                                         instance_folder):
    container = start(docker_cleanup, comfyui_double_image, instance_folder, command=ARGUMENTS)
    system_stats(container)

    environment = dict(line.split("=", 1) for line in container.exec_run("env").output.decode().splitlines())

    assert environment["HOME"] == "/instance/home"
    assert environment["XDG_CACHE_HOME"] == "/instance/home/.cache"
    assert owner(instance_folder / "home") == (UID, GID)
    assert owner(instance_folder / "home" / ".cache") == (UID, GID)


def test_it_writes_nothing_outside_the_instance_folder_and_tmp(docker_cleanup, comfyui_double_image,
                                                               instance_folder):
    container = start(docker_cleanup, comfyui_double_image, instance_folder, command=ARGUMENTS)
    system_stats(container)
    container.exec_run("python3 -c 'import yaml, json, urllib.request'")

    changed = [change["Path"] for change in container.diff() or []]

    outside = [path for path in changed if path not in ("/instance", "/tmp") and not path.startswith("/tmp/")]
    assert outside == []
    assert (instance_folder / "user").is_dir()


def test_it_refuses_to_run_as_root_and_says_to_pass_a_user(docker_cleanup, comfyui_double_image, instance_folder):
    container = start(docker_cleanup, comfyui_double_image, instance_folder, user="0:0", command=ARGUMENTS)

    status = container.wait(timeout=30)["StatusCode"]

    assert status == 1
    assert "refusing to run ComfyUI as root" in container.logs().decode()
    assert "--user UID:GID" in container.logs().decode()
    assert list(instance_folder.iterdir()) == []


def test_it_says_what_to_fix_when_the_instance_folder_is_not_writable(docker_cleanup, comfyui_double_image,
                                                                      instance_folder):
    os.chown(instance_folder, 0, 0)
    container = start(docker_cleanup, comfyui_double_image, instance_folder, command=ARGUMENTS)

    status = container.wait(timeout=30)["StatusCode"]

    assert status == 1
    assert f"cannot write /instance/home as uid {UID} gid {GID}" in container.logs().decode()


def test_it_pins_the_stub_torch_and_describes_what_it_holds(docker_cleanup, comfyui_double_image, instance_folder):
    image = docker_cleanup.images.get(comfyui_double_image)
    labels = image.labels

    status, constraints = run_to_the_end(docker_cleanup, comfyui_double_image, instance_folder,
                                         "cat", labels["comfyhub.image.constraints"])
    _, info = run_to_the_end(docker_cleanup, comfyui_double_image, instance_folder,
                             "cat", labels["comfyhub.image.info"])
    running = start(docker_cleanup, comfyui_double_image, instance_folder, command=ARGUMENTS)

    assert status == 0
    assert "torch==2.13.0" in constraints.splitlines()
    assert labels["comfyhub.image.constraints"] == "/etc/comfyhub/constraints.txt"
    assert labels[ARGUMENTS_LABEL] == "command"
    assert json.loads(info)["comfyui_version"] == system_stats(running)["system"]["comfyui_version"]
    assert json.loads(info)["torch_version"] == "2.13.0"
    assert json.loads(info)["comfyui_ref"] == "local"


def test_pip_installs_nothing_for_a_package_the_image_has(docker_cleanup, comfyui_double_image, instance_folder):
    status, output = run_to_the_end(docker_cleanup, comfyui_double_image, instance_folder,
                                    "python3", "-m", "pip", "install", "--user", "--no-index", "pyyaml")

    assert status == 0, output
    assert "Requirement already satisfied: pyyaml" in output
    installed = instance_folder / "python-packages"
    assert not installed.exists() or list(installed.rglob("*")) == []


def test_pip_refuses_to_replace_the_pinned_torch(docker_cleanup, comfyui_double_image, instance_folder):
    status, output = run_to_the_end(docker_cleanup, comfyui_double_image, instance_folder,
                                    "python3", "-m", "pip", "install", "--user", "--no-index", "torch==2.12.0")

    assert status != 0
    assert "torch==2.13.0" in output
    assert not (instance_folder / "python-packages").exists()


def test_a_build_that_cannot_download_comfyui_says_to_check_the_ref_or_build_offline(docker_cleanup, tmp_path):
    context = assemble_image_context(tmp_path / "context", comfyui_checkout=False)
    closed_port = {"COMFYUI_URL": "http://127.0.0.1:9", "COMFYUI_REF": "v0.8.0"}

    with pytest.raises(ImageBuildError) as failure:
        build_image(docker_cleanup, context, f"comfyhub-test-unbuildable:{os.getpid()}",
                    buildargs={**DOUBLE_BUILD_ARGS, **closed_port}, labels=session_label())

    message = str(failure.value)
    assert "cannot download ComfyUI v0.8.0 from http://127.0.0.1:9/archive/v0.8.0.tar.gz" in message
    assert "Check COMFYUI_REF" in message
    assert "put a ComfyUI checkout into the build context's comfyui/ folder" in message


def test_the_cliargs_stand_in_reads_comfyuis_arguments_from_its_environment(docker_cleanup, cliargs_image,
                                                                           instance_folder):
    container = start(docker_cleanup, cliargs_image, instance_folder,
                      environment={"CLI_ARGS": " ".join(ARGUMENTS)})

    stats = system_stats(container)

    assert stats["system"]["argv"] == ["/opt/comfyui/main.py", *ARGUMENTS]
    assert ARGUMENTS_LABEL not in docker_cleanup.images.get(cliargs_image).labels


def test_the_test_image_is_the_shipped_image_on_the_debootstrapped_base(docker_cleanup, comfyui_double_image):
    image = docker_cleanup.images.get(comfyui_double_image)
    base = docker_cleanup.images.get(BASE_TAG)

    base_layers = base.attrs["RootFS"]["Layers"]
    assert image.attrs["RootFS"]["Layers"][:len(base_layers)] == base_layers
    assert image.labels["comfyhub.image"] == "comfyui"
    assert image.attrs["Config"]["User"] == "1000:1000"
    assert image.attrs["Config"]["Entrypoint"] == ["/usr/local/bin/comfyhub-entrypoint"]
