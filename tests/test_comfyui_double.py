"""The ComfyUI test double, run as real containers on a real Docker engine.

Every test starts the double image the way ComfyHub starts ComfyUI: ComfyUI arguments as the command, a read-only
shared library at /shared, the instance's own directory at /instance, port 8188 published on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

from tests.support import ws
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

    def websocket(self, path: str = "/ws", **kwargs) -> ws.WebSocket:
        return ws.connect(f"ws://127.0.0.1:{self.port}{path}", **kwargs)

    def post_json(self, path: str, data) -> Response:
        return self.request("POST", path, body=json.dumps(data).encode(), headers={"Content-Type": "application/json"})

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


# --- ComfyUI-Distributed's routes ----------------------------------------------------------------------------------

def test_it_serves_the_distributed_config_from_its_custom_node_folder_or_the_defaults(launcher):
    double = launcher.start()
    assert double.get_json("/distributed/config") == {"master": {"host": ""}, "workers": [], "settings": {}}

    config = {"master": {"host": "hub-master", "port": 8188}, "workers": [{"id": "w1", "host": "x", "port": 1}],
              "settings": {"debug": True}}
    touch(launcher.instance / "custom_nodes" / "ComfyUI-Distributed" / "gpu_config.json", json.dumps(config).encode())

    assert double.get_json("/distributed/config") == config
    assert double.get_json("/api/distributed/config") == config


def test_it_reports_which_distributed_workers_of_its_config_answer_from_inside(launcher):
    double = launcher.start()
    config = {"workers": [{"id": "itself", "host": "127.0.0.1", "port": 8188},
                          {"id": "nobody", "host": "127.0.0.1", "port": 1}]}
    touch(launcher.instance / "custom_nodes" / "ComfyUI-Distributed" / "gpu_config.json", json.dumps(config).encode())

    reach = double.get_json("/distributed/reach")

    assert reach["itself"] == {"url": "http://127.0.0.1:8188/system_stats", "ok": True, "detail": "HTTP 200"}
    assert reach["nobody"]["ok"] is False and "refused" in reach["nobody"]["detail"].lower()


# --- WebSocket ------------------------------------------------------------------------------------------------------

SAVE_PROMPT = {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI"}}}


def test_its_websocket_greets_a_client_with_the_queue_status_and_its_client_id(launcher):
    double = launcher.start()

    with double.websocket("/ws?clientId=alice-tab-1") as socket:
        greeting = socket.receive_json()
    with double.websocket("/api/ws") as socket:
        anonymous = socket.receive_json()

    assert greeting == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}},
                                                   "sid": "alice-tab-1"}}
    assert re.fullmatch(r"[0-9a-f]{32}", anonymous["data"]["sid"])


def test_its_websocket_echoes_the_double_only_echo_message_and_answers_pings(launcher):
    double = launcher.start()

    with double.websocket() as socket:
        socket.receive_json()
        socket.ping(b"are you there")
        opcode, payload = socket.receive_message(time.monotonic() + 5, pongs=True)
        echo = {"type": "comfyhub_double_echo", "sent": 12.5, "padding": "x" * 100_000}
        socket.send_json(echo)
        socket.send_json({"type": "something ComfyUI ignores"})
        socket.send_json({"type": "comfyhub_double_echo", "n": 2})

        assert (opcode, payload) == (ws.PONG, b"are you there")
        assert socket.receive_json() == echo
        assert socket.receive_json() == {"type": "comfyhub_double_echo", "n": 2}


def test_its_websocket_answers_the_first_feature_flags_message(launcher):
    double = launcher.start()

    with double.websocket() as socket:
        socket.receive_json()
        socket.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})

        flags = socket.receive_json()

    assert flags["type"] == "feature_flags"
    assert flags["data"]["max_upload_size"] == 100 * 1024 * 1024


def test_its_websocket_refuses_a_foreign_origin_and_plain_requests(launcher):
    double = launcher.start()

    with pytest.raises(ws.HandshakeError) as refused:
        double.websocket(headers={"Origin": "http://evil.example"})
    plain = double.request("GET", "/ws")

    assert refused.value.status == 403
    assert plain.status == 400
    assert b"No WebSocket UPGRADE hdr" in plain.body


# --- prompts, queue and history -------------------------------------------------------------------------------------

def test_a_queued_prompt_runs_reports_over_the_websocket_and_lands_in_the_history(launcher):
    double = launcher.start(environment={"COMFY_DOUBLE_PROMPT_SECONDS": "1"})

    with double.websocket("/ws?clientId=tab-1") as socket:
        socket.receive_json()
        first = double.post_json("/prompt", {"prompt": SAVE_PROMPT, "client_id": "tab-1"})
        second = double.post_json("/api/prompt", {"prompt": SAVE_PROMPT, "client_id": "tab-1"})
        first_id, second_id = first.json()["prompt_id"], second.json()["prompt_id"]
        queue = double.get_json("/queue")
        remaining = double.get_json("/prompt")["exec_info"]["queue_remaining"]
        success = socket.receive_until(
            lambda m: m["type"] == "execution_success" and m["data"]["prompt_id"] == second_id, timeout=10)
        idle = socket.receive_until(lambda m: m["type"] == "status", timeout=5)

    assert first.status == 200 and first.json()["number"] == 0 and first.json()["node_errors"] == {}
    assert second.json()["number"] == 1
    assert [item[1] for item in queue["queue_running"]] == [first_id]
    assert [item[1] for item in queue["queue_pending"]] == [second_id]
    assert queue["queue_pending"][0][2] == SAVE_PROMPT
    assert remaining == 2
    assert success["data"]["prompt_id"] == second_id
    assert idle["data"] == {"status": {"exec_info": {"queue_remaining": 0}}}
    history = double.get_json("/history")
    assert list(history) == [first_id, second_id]
    entry = double.get_json(f"/history/{second_id}")[second_id]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [event for event, _ in entry["status"]["messages"]] == ["execution_start", "execution_cached",
                                                                   "execution_success"]
    assert entry["outputs"] == {"9": {"images": []}}
    assert list(double.get_json("/history?max_items=1")) == [second_id]
    assert double.get_json("/history/no-such-prompt") == {}


def test_the_client_that_queued_a_prompt_hears_it_execute_node_by_node(launcher):
    double = launcher.start(environment={"COMFY_DOUBLE_PROMPT_SECONDS": "0.2"})
    prompt = {"3": {"class_type": "EmptyLatentImage", "inputs": {}}, **SAVE_PROMPT}

    with double.websocket("/ws?clientId=tab-2") as socket:
        socket.receive_json()
        prompt_id = double.post_json("/prompt", {"prompt": prompt, "client_id": "tab-2"}).json()["prompt_id"]
        heard = []
        while not heard or heard[-1] != ("executing", None):
            message = socket.receive_json(timeout=5)
            if message["type"] != "status":
                heard.append((message["type"], message["data"].get("node")))
                assert message["data"]["prompt_id"] == prompt_id

    assert heard == [("execution_start", None), ("execution_cached", None), ("executing", "3"), ("executing", "9"),
                     ("executed", "9"), ("execution_success", None), ("executing", None)]


@pytest.mark.parametrize("body, status, kind", [
    (b"{not json", 400, "invalid_json"),
    (b'{"client_id": "x"}', 400, "no_prompt"),
    (b'{"prompt": [1, 2]}', 400, "invalid_prompt"),
    (b'{"prompt": {"1": {"inputs": {}}}}', 400, "invalid_prompt"),
    (b'{"prompt": {"1": {"class_type": "NoSuchNode"}}}', 400, "invalid_prompt"),
    (b'{"prompt": {"1": {"class_type": "KSampler"}}}', 400, "prompt_no_outputs"),
], ids=["not-json", "no-prompt", "prompt-not-an-object", "no-class-type", "unknown-node", "no-output-node"])
def test_it_refuses_a_bad_prompt_with_comfyuis_error(launcher, body, status, kind):
    double = launcher.start()

    response = double.request("POST", "/prompt", body=body, headers={"Content-Type": "application/json"})

    assert (response.status, response.json()["error"]["type"]) == (status, kind)
    assert response.json()["node_errors"] == {}
    assert double.get_json("/queue") == {"queue_running": [], "queue_pending": []}


def test_clearing_the_queue_drops_pending_prompts_and_an_interrupt_stops_the_running_one(launcher):
    double = launcher.start(environment={"COMFY_DOUBLE_PROMPT_SECONDS": "60"})
    ids = [double.post_json("/prompt", {"prompt": SAVE_PROMPT}).json()["prompt_id"] for _ in range(3)]

    cleared = double.post_json("/queue", {"clear": True})
    after_clear = double.get_json("/queue")
    interrupted = double.post_json("/interrupt", {})
    wait_until = time.monotonic() + 10
    while double.get_json("/prompt")["exec_info"]["queue_remaining"] and time.monotonic() < wait_until:
        time.sleep(0.05)

    assert cleared.status == 200 and interrupted.status == 200
    assert [item[1] for item in after_clear["queue_running"]] == ids[:1]
    assert after_clear["queue_pending"] == []
    assert double.get_json("/queue") == {"queue_running": [], "queue_pending": []}
    status = double.get_json(f"/history/{ids[0]}")[ids[0]]["status"]
    assert (status["status_str"], status["completed"]) == ("error", False)
    assert "execution_interrupted" in [event for event, _ in status["messages"]]
    assert set(double.get_json("/history")) == {ids[0]}


def test_it_refuses_bad_prompt_settings_in_its_environment(launcher):
    double = launcher.start(environment={"COMFY_DOUBLE_ASSETS": "lots"}, wait=False)

    assert double.wait_for_exit() == 2
    assert "COMFY_DOUBLE_ASSETS a count from 0 to 9999" in double.logs(stdout=False)


# --- /view ----------------------------------------------------------------------------------------------------------

def test_view_streams_a_big_output_file_byte_for_byte(launcher):
    data = os.urandom(1024 * 1024) * 48 + b"the end"
    touch(launcher.instance / "output" / "renders" / "big.png", data)
    double = launcher.start()

    request = urllib.request.Request(double.url("/view?filename=big.png&subfolder=renders&type=output"))
    digest, size = hashlib.sha256(), 0
    with urllib.request.urlopen(request, timeout=30) as response:
        headers = dict(response.headers)
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)

    assert headers["Content-Length"] == str(len(data))
    assert headers["Content-Type"] == "image/png"
    assert headers["Content-Disposition"] == 'filename="big.png"'
    assert (size, digest.hexdigest()) == (len(data), hashlib.sha256(data).hexdigest())


def test_view_serves_input_and_temp_files_and_never_renders_html(launcher):
    touch(launcher.instance / "input" / "photo.jpg", b"jpeg bytes")
    touch(launcher.instance / "output" / "page.html", b"<script>alert(1)</script>")
    double = launcher.start()
    touch(launcher.instance / "temp" / "preview.webp", b"webp bytes")  # temp/ is emptied at start

    photo = double.request("GET", "/api/view?filename=photo.jpg&type=input")
    preview = double.request("GET", "/view?filename=preview.webp&type=temp")
    page = double.request("GET", "/view?filename=page.html")
    annotated = double.request("GET", "/view?filename=photo.jpg%20%5Binput%5D&type=output")

    assert (photo.status, photo.body) == (200, b"jpeg bytes")
    assert (preview.status, preview.body) == (200, b"webp bytes")
    assert (page.status, page.headers["Content-Type"]) == (200, "application/octet-stream")
    assert annotated.body == b"jpeg bytes"


@pytest.mark.parametrize("query, status", [
    ("filename=..%2Fuser%2Fdefault%2Fcomfy.settings.json", 400),
    ("filename=%2Fetc%2Fpasswd", 400),
    ("filename=", 400),
    ("filename=secret.txt&type=models", 400),
    ("filename=secret.txt&subfolder=..", 403),
    ("filename=secret.txt&subfolder=%2Finstance", 403),
    ("filename=secret.txt&type=input&subfolder=..%2Foutput%2F..", 403),
    ("filename=no-such.png", 404),
    ("", 404),
], ids=["dot-dot-name", "absolute-name", "empty-name", "unknown-type", "dot-dot-subfolder", "absolute-subfolder",
        "subfolder-escaping-input", "missing", "no-filename"])
def test_view_keeps_paths_inside_its_folder(launcher, query, status):
    touch(launcher.instance / "secret.txt", b"not for /view")
    double = launcher.start()

    response = double.request("GET", f"/view?{query}")

    assert response.status == status
    assert b"not for /view" not in response.body


# --- the frontend ---------------------------------------------------------------------------------------------------

def test_its_page_references_the_configured_assets_relatively_and_serves_them(launcher):
    double = launcher.start(environment={"COMFYUI_DOUBLE_ASSETS": "3"})  # the spelling extra_env accepts

    page = double.request("GET", "/")
    sources = re.findall(r'<script defer src="([^"]+)"', page.body.decode())

    assert page.status == 200 and page.headers["Cache-Control"] == "no-cache"
    assert sources == ["assets/a0001.js", "assets/a0002.js", "assets/a0003.js"]
    for source in sources:
        asset = double.request("GET", f"/{source}")
        assert asset.status == 200 and b"window.comfyDoubleAssets" in asset.body
    assert double.request("GET", "/assets/a0004.js").status == 404


def test_its_page_has_no_assets_by_default(launcher):
    double = launcher.start()

    assert "assets/" not in double.request("GET", "/").body.decode()
    assert double.request("GET", "/assets/a0001.js").status == 404


@pytest.mark.browser
def test_in_chromium_its_page_shows_the_websocket_status_and_queues_a_prompt(launcher, page):
    from playwright.sync_api import expect

    double = launcher.start(environment={"COMFY_DOUBLE_ASSETS": "20"})

    page.goto(double.url("/"))

    expect(page.get_by_test_id("ws-state")).to_have_text("open")
    expect(page.get_by_test_id("queue-remaining")).to_have_text("0")
    sid = page.get_by_test_id("sid").inner_text()
    expect(page.get_by_test_id("status")).to_have_text(f"queue_remaining 0, sid {sid}")
    expect(page.get_by_test_id("assets")).to_have_text("20")
    page.get_by_test_id("queue-prompt").click()
    expect(page.get_by_test_id("prompt-result")).to_contain_text("queued ")
    prompt_id = page.get_by_test_id("prompt-result").get_attribute("data-prompt-id")
    expect(page.get_by_test_id("messages")).to_contain_text(f"execution_success {prompt_id}")
    assert double.get_json(f"/history/{prompt_id}")[prompt_id]["prompt"][3]["client_id"] == sid


# --- the image ------------------------------------------------------------------------------------------------------

def test_the_double_image_records_the_hash_of_its_inputs(docker_engine, comfyui_double_image):
    image = docker_engine.images.get(comfyui_double_image)
    base = docker_engine.images.get(BASE_TAG)

    assert image.labels[INPUTS_HASH_LABEL] == double_inputs_hash(base.id)
    assert image.labels[TEST_LABEL] == "1"
