"""The ComfyUI test double, run as real containers on a real Docker engine.

Every test starts the double image the way ComfyHub starts ComfyUI: ComfyUI arguments as the command, a read-only
shared library at /shared, the instance's own directory at /instance, port 8188 published on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

from tests.support.docker_fixtures import TEST_LABEL, published_port, session_label, wait_for_http
from tests.support.images import INPUTS_HASH_LABEL, double_inputs_hash, BASE_TAG

pytestmark = pytest.mark.docker

BASE_COMMAND = ["--listen", "0.0.0.0", "--port", "8188", "--base-directory", "/instance", "--disable-auto-launch"]
GPUS_1_AND_3 = [docker.types.DeviceRequest(device_ids=["1", "3"], capabilities=[["gpu"]])]


@dataclass
class Response:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class RunningDouble:
    container: object
    port: int | None = None
    command: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Response:
        request = urllib.request.Request(self.url(path), data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return Response(response.status, dict(response.headers), response.read())
        except urllib.error.HTTPError as error:
            return Response(error.code, dict(error.headers), error.read())

    def get_json(self, path: str):
        response = self.request("GET", path)
        assert response.status == 200, (path, response.status, response.body)
        return response.json()

    def logs(self, stdout: bool = True, stderr: bool = True) -> str:
        return self.container.logs(stdout=stdout, stderr=stderr).decode(errors="replace")

    def wait_for_exit(self, timeout: float = 30) -> int:
        return self.container.wait(timeout=timeout)["StatusCode"]


class DoubleLauncher:
    def __init__(self, client: docker.DockerClient, image: str, root: Path) -> None:
        self.client = client
        self.image = image
        self.shared = root / "shared"
        self.instance = root / "instance"
        self.shared.mkdir()
        self.instance.mkdir()
        os.chown(self.instance, 1000, 1000)  # the image runs as its USER 1000:1000 and writes /instance/home

    def start(self, *extra_args: str, command: list[str] | None = None, environment: dict | None = None,
              device_requests=None, user: str | None = None, wait: bool = True) -> RunningDouble:
        command = list(command if command is not None else [*BASE_COMMAND, *extra_args])
        container = self.client.containers.run(
            self.image,
            command=command,
            detach=True,
            labels=session_label(),
            ports={"8188/tcp": ("127.0.0.1", None)},
            volumes={
                str(self.shared): {"bind": "/shared", "mode": "ro"},
                str(self.instance): {"bind": "/instance", "mode": "rw"},
            },
            environment=environment or {},
            device_requests=device_requests,
            user=user,
        )
        running = RunningDouble(container=container, command=command)
        if wait:
            running.port = published_port(container)
            wait_for_http(running.url("/prompt"), timeout=30, container=container)
        return running


@pytest.fixture
def launcher(docker_cleanup, comfyui_double_image, tmp_path) -> DoubleLauncher:
    return DoubleLauncher(docker_cleanup, comfyui_double_image, tmp_path)


def touch(path: Path, content: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


# --- command line ---------------------------------------------------------------------------------------------------

def test_it_rejects_an_unknown_flag(launcher):
    double = launcher.start("--no-such-comfyui-flag", wait=False)

    assert double.wait_for_exit() == 2
    assert "unrecognized arguments: --no-such-comfyui-flag" in double.logs(stdout=False)


def test_it_rejects_two_vram_modes_at_once(launcher):
    double = launcher.start("--cpu", "--lowvram", wait=False)

    assert double.wait_for_exit() == 2
    assert "not allowed with argument" in double.logs(stdout=False)


def test_it_reports_the_arguments_it_was_started_with(launcher):
    double = launcher.start("--preview-method", "auto", "--enable-cors-header")

    stats = double.get_json("/system_stats")

    assert stats["system"]["argv"] == ["/opt/comfyui/main.py", *double.command]
    assert stats["system"]["comfyui_version"] == "0.0.0-testdouble"
    assert "To see the GUI go to: http://0.0.0.0:8188" in double.logs()


def test_it_exits_with_status_1_when_told_to_crash(launcher):
    double = launcher.start(environment={"COMFY_DOUBLE_CRASH": "1"}, wait=False)

    assert double.wait_for_exit() == 1
    assert "fails on purpose" in double.logs(stdout=False)


def test_it_waits_the_start_delay_before_listening(launcher):
    started = time.monotonic()
    double = launcher.start(environment={"COMFY_DOUBLE_START_DELAY": "3"})

    assert time.monotonic() - started >= 3
    assert "waiting 3 s before listening" in double.logs()


def test_it_stops_promptly_and_cleanly_on_sigterm(launcher):
    double = launcher.start()

    started = time.monotonic()
    double.container.stop(timeout=20)

    assert time.monotonic() - started < 5
    assert double.wait_for_exit() == 0


def test_it_reports_a_taken_port(launcher):
    double = launcher.start()

    exit_code, output = double.container.exec_run(["python3", "/opt/comfyui/main.py", *BASE_COMMAND])

    assert exit_code == 1
    assert b"Port 8188 is already in use" in output


# --- directories and models -----------------------------------------------------------------------------------------

def test_it_creates_its_directories_under_the_base_directory_and_empties_temp(launcher):
    touch(launcher.instance / "temp" / "left-over.png")
    os.chown(launcher.instance / "temp", 1000, 1000)

    launcher.start()

    for name in ("input", "output", "temp", "user", "custom_nodes"):
        assert (launcher.instance / name).is_dir(), name
    assert list((launcher.instance / "temp").iterdir()) == []


def test_it_lists_checkpoints_from_the_extra_model_paths_yaml(launcher):
    touch(launcher.shared / "models" / "checkpoints" / "sd15.safetensors")
    touch(launcher.shared / "models" / "checkpoints" / "xl" / "base.ckpt")
    touch(launcher.shared / "models" / "checkpoints" / "README.txt")
    touch(launcher.shared / "models" / "checkpoints" / ".git" / "hidden.safetensors")
    touch(launcher.instance / "models" / "checkpoints" / "own.sft")
    touch(launcher.instance / "shared_models.yaml",
          b"shared:\n  base_path: /shared/models\n  is_default: true\n  checkpoints: checkpoints/\n")

    double = launcher.start("--extra-model-paths-config", "/instance/shared_models.yaml")

    expected = ["own.sft", "sd15.safetensors", "xl/base.ckpt"]
    assert double.get_json("/models/checkpoints") == expected
    assert double.get_json("/api/models/checkpoints") == expected
    checkpoint_input = double.get_json("/object_info/CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]
    assert checkpoint_input["required"]["ckpt_name"][0] == expected


def test_it_reads_multi_line_values_legacy_names_and_a_base_path_relative_to_the_yaml(launcher):
    touch(launcher.shared / "library" / "unet" / "flux.safetensors")
    touch(launcher.shared / "library" / "diffusion" / "wan.safetensors")
    touch(launcher.shared / "library" / "clip" / "t5.safetensors")
    touch(launcher.shared / "library" / "lycoris" / "style.safetensors")
    touch(launcher.shared / "config" / "extra.yaml", (
        "library:\n"
        "  base_path: ../library\n"
        "  unet: |\n"
        "    unet\n"
        "    diffusion\n"
        "  clip: clip\n"
        "  loras: |\n"
        "    loras\n"
        "    lycoris\n"
        "empty_section:\n"
    ).encode())

    double = launcher.start("--extra-model-paths-config", "/shared/config/extra.yaml")

    assert double.get_json("/models/diffusion_models") == ["flux.safetensors", "wan.safetensors"]
    assert double.get_json("/models/text_encoders") == ["t5.safetensors"]
    assert double.get_json("/models/loras") == ["style.safetensors"]
    assert "Adding extra search path diffusion_models /shared/library/diffusion" not in double.logs()
    assert "Adding extra search path unet /shared/library/diffusion" in double.logs()


def test_with_comfyhubs_yaml_every_model_folder_lists_the_instances_own_folder_first(launcher):
    # Nodes save downloads to folder_paths.get_folder_paths(kind)[0]: the instance's writable models/, not /shared.
    from storage_app import layout

    touch(launcher.instance / "extra_model_paths.yaml", layout.extra_model_paths_yaml().encode())

    double = launcher.start("--extra-model-paths-config", "/instance/extra_model_paths.yaml")

    folders = {entry["name"]: entry["folders"] for entry in double.get_json("/api/experiment/models")}
    assert "configs" not in folders and "custom_nodes" not in folders  # left out by ComfyUI's route too
    assert set(layout.MODEL_FOLDERS) - {"configs"} <= set(folders)
    for key, names in layout.MODEL_FOLDERS.items():
        if key == "configs":
            continue
        assert folders[key][0] == f"/instance/models/{names[0]}", (key, folders[key])
        assert folders[key].index(f"/shared/models/{names[0]}") > 0, (key, folders[key])


def test_it_fails_to_start_when_an_extra_model_paths_yaml_is_missing(launcher):
    double = launcher.start("--extra-model-paths-config", "/instance/missing.yaml", wait=False)

    assert double.wait_for_exit() == 1
    assert "FileNotFoundError" in double.logs(stdout=False)


def test_it_lists_the_model_folders_and_404s_an_unknown_one(launcher):
    double = launcher.start()

    folders = double.get_json("/models")

    assert {"checkpoints", "loras", "vae", "text_encoders", "diffusion_models", "controlnet", "upscale_models",
            "embeddings", "custom_nodes"} <= set(folders)
    assert "unet" not in folders
    assert double.request("GET", "/models/unet").status == 404
    assert double.request("GET", "/api/no/such/route").status == 404


def test_it_lists_embeddings_without_their_extension(launcher):
    touch(launcher.instance / "models" / "embeddings" / "easynegative.safetensors")
    touch(launcher.instance / "models" / "embeddings" / "sub" / "bad_hands.pt")

    double = launcher.start()

    assert double.get_json("/embeddings") == ["easynegative", "sub/bad_hands"]


def test_it_offers_only_top_level_input_images_to_load_image(launcher):
    touch(launcher.shared / "input" / "shared.png")
    touch(launcher.instance / "input" / "own.jpg")
    touch(launcher.instance / "input" / "notes.txt")
    touch(launcher.instance / "input" / "nested" / "deep.png")
    os.symlink("/shared/input/shared.png", launcher.instance / "input" / "shared.png")
    os.symlink("/shared/input/gone.png", launcher.instance / "input" / "dangling.png")

    double = launcher.start()

    load_image = double.get_json("/object_info/LoadImage")["LoadImage"]
    assert load_image["input"]["required"]["image"][0] == ["own.jpg", "shared.png"]


# --- devices --------------------------------------------------------------------------------------------------------

def test_it_reports_the_gpus_docker_assigned(launcher):
    double = launcher.start(device_requests=GPUS_1_AND_3)

    devices = double.get_json("/system_stats")["devices"]

    assert [(d["type"], d["index"]) for d in devices] == [("cuda", 0), ("cuda", 1)]
    assert "host GPU 1 " in devices[0]["name"]
    assert "host GPU 3 " in devices[1]["name"]


def test_it_narrows_the_gpus_to_the_cuda_device_flag(launcher):
    double = launcher.start("--cuda-device", "1", device_requests=GPUS_1_AND_3)

    devices = double.get_json("/system_stats")["devices"]

    assert [d["name"] for d in devices] == ["cuda:0 host GPU 3 : test double"]


@pytest.mark.parametrize("args, device_requests", [((), None), (("--cpu",), GPUS_1_AND_3)],
                         ids=["without-gpus", "with---cpu"])
def test_it_reports_one_cpu_device(launcher, args, device_requests):
    double = launcher.start(*args, device_requests=device_requests)

    devices = double.get_json("/system_stats")["devices"]

    assert [(d["name"], d["type"], d["index"]) for d in devices] == [("cpu", "cpu", None)]


# --- custom nodes ---------------------------------------------------------------------------------------------------

def make_custom_nodes(instance: Path) -> None:
    custom_nodes = instance / "custom_nodes"
    (custom_nodes / "ComfyUI-Simple").mkdir(parents=True)
    touch(custom_nodes / "ComfyUI-Pack" / "nodes.json", b'["PackLoader", "PackSampler"]')
    (custom_nodes / "ComfyUI-Old.disabled").mkdir()
    (custom_nodes / "__pycache__").mkdir()
    touch(custom_nodes / "README.md")


def test_it_lists_one_node_class_per_custom_node_package(launcher):
    make_custom_nodes(launcher.instance)

    double = launcher.start()

    nodes = double.get_json("/object_info")
    modules = {name: info["python_module"] for name, info in nodes.items() if info["python_module"] != "nodes"}
    assert modules == {
        "ComfyUI-Simple": "custom_nodes.ComfyUI-Simple",
        "PackLoader": "custom_nodes.ComfyUI-Pack",
        "PackSampler": "custom_nodes.ComfyUI-Pack",
    }
    assert nodes["KSampler"]["python_module"] == "nodes"
    assert double.get_json("/api/object_info/PackLoader")["PackLoader"]["name"] == "PackLoader"
    assert double.get_json("/object_info/NoSuchNode") == {}


def test_it_loads_no_custom_nodes_when_told_to_disable_them(launcher):
    make_custom_nodes(launcher.instance)

    double = launcher.start("--disable-all-custom-nodes")

    nodes = double.get_json("/object_info")
    assert {info["python_module"] for info in nodes.values()} == {"nodes"}
    assert {"CheckpointLoaderSimple", "KSampler", "CLIPTextEncode", "VAEDecode", "SaveImage", "LoadImage",
            "LoraLoader", "EmptyLatentImage"} <= set(nodes)


# --- user data and settings -----------------------------------------------------------------------------------------

def test_it_round_trips_a_workflow_through_userdata(launcher):
    double = launcher.start()
    workflow = json.dumps({"nodes": [{"id": 1, "type": "KSampler"}], "links": []}).encode()

    created = double.request("POST", "/api/userdata/workflows%2Fportrait.json?overwrite=false", body=workflow)
    again = double.request("POST", "/api/userdata/workflows%2Fportrait.json?overwrite=false", body=b"{}")
    fetched = double.request("GET", "/api/userdata/workflows%2Fportrait.json")
    listing = double.get_json("/api/userdata?dir=workflows&recurse=true&full_info=true")

    assert (created.status, created.json()) == (200, "workflows/portrait.json")
    assert again.status == 409
    assert (fetched.status, fetched.body) == (200, workflow)
    assert [(entry["path"], entry["size"]) for entry in listing] == [("portrait.json", len(workflow))]
    on_disk = launcher.instance / "user" / "default" / "workflows" / "portrait.json"
    assert on_disk.read_bytes() == workflow

    assert double.request("DELETE", "/api/userdata/workflows%2Fportrait.json").status == 204
    assert double.request("GET", "/api/userdata/workflows%2Fportrait.json").status == 404
    assert not on_disk.exists()


def test_it_overwrites_a_workflow_unless_told_not_to(launcher):
    double = launcher.start()

    double.request("POST", "/userdata/workflows%2Fa.json", body=b'{"v": 1}')
    overwritten = double.request("POST", "/userdata/workflows%2Fa.json", body=b'{"v": 2}')

    assert overwritten.status == 200
    assert double.request("GET", "/userdata/workflows%2Fa.json").body == b'{"v": 2}'


def test_it_refuses_userdata_paths_that_leave_the_user_directory(launcher):
    double = launcher.start()

    assert double.request("GET", "/userdata/..%2F..%2Fcustom_nodes%2Fx.py").status == 403
    assert double.request("POST", "/userdata/..%2Fescape.json", body=b"{}").status == 403
    assert double.request("GET", "/userdata?dir=..%2F..").status == 403
    assert double.request("GET", "/userdata").status == 400
    assert not (launcher.instance / "user" / "escape.json").exists()


def test_it_merges_posted_settings_into_the_settings_file(launcher):
    double = launcher.start()

    double.request("POST", "/settings", body=b'{"Comfy.Theme": "dark", "Comfy.Locale": "en"}')
    double.request("POST", "/api/settings", body=b'{"Comfy.Locale": "de"}')

    expected = {"Comfy.Theme": "dark", "Comfy.Locale": "de"}
    assert double.get_json("/settings") == expected
    assert double.get_json("/settings/Comfy.Locale") == "de"
    settings_file = launcher.instance / "user" / "default" / "comfy.settings.json"
    assert json.loads(settings_file.read_text()) == expected


def test_it_works_as_a_non_root_user(launcher):
    os.chown(launcher.instance, 1000, 1000)

    double = launcher.start(user="1000:1000")
    response = double.request("POST", "/userdata/workflows%2Fmine.json", body=b"{}")

    assert response.status == 200
    written = launcher.instance / "user" / "default" / "workflows" / "mine.json"
    assert (written.stat().st_uid, written.stat().st_gid) == (1000, 1000)


# --- origin check and CORS ------------------------------------------------------------------------------------------

def test_it_refuses_a_loopback_host_with_a_foreign_origin(launcher):
    double = launcher.start()

    foreign = double.request("GET", "/system_stats",
                             headers={"Host": "127.0.0.1:8188", "Origin": "http://evil.example:8188"})
    same = double.request("GET", "/system_stats",
                          headers={"Host": "127.0.0.1:8188", "Origin": "http://127.0.0.1:8188"})

    assert foreign.status == 403
    assert same.status == 200


def test_it_sends_cors_headers_when_enabled(launcher):
    double = launcher.start("--enable-cors-header", "http://hub.example")

    response = double.request("GET", "/prompt",
                              headers={"Host": "127.0.0.1:8188", "Origin": "http://hub.example"})

    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "http://hub.example"
    assert response.json() == {"exec_info": {"queue_remaining": 0}}


# --- the image ------------------------------------------------------------------------------------------------------

def test_the_double_image_records_the_hash_of_its_inputs(docker_engine, comfyui_double_image):
    image = docker_engine.images.get(comfyui_double_image)
    base = docker_engine.images.get(BASE_TAG)

    assert image.labels[INPUTS_HASH_LABEL] == double_inputs_hash(base.id)
    assert image.labels[TEST_LABEL] == "1"
