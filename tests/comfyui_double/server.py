"""ComfyUI TEST DOUBLE: an offline stand-in for the part of ComfyUI's server that ComfyHub talks to.

This is not ComfyUI and runs no models. It exists so that ComfyHub's tests can start real containers on a real Docker
engine without network access or GPUs; the product itself runs real ComfyUI images. It mimics, after ComfyUI's own
source (https://github.com/comfyanonymous/ComfyUI, the files named below):

- the command line (comfy/cli_args.py): the same flags, defaults and argparse errors (unknown flag -> exit 2);
- directory resolution (folder_paths.py, main.py): --base-directory, --models-directory, --input/--output/--user/
  --temp-directory (the latter gets "/temp" appended), model folder names, extensions and legacy aliases, and
  extra_model_paths.yaml loading (utils/extra_config.py), including that a missing YAML file stops the start;
- the HTTP routes ComfyHub uses, also under the /api prefix: /system_stats, /prompt (GET), /queue (GET),
  /object_info, /models, /experiment/models, /embeddings, /userdata, /settings, /users, /upload/image and
  /upload/mask, plus the origin check and CORS headers;
- ComfyUI-Distributed's GET /distributed/config (its custom_nodes/ComfyUI-Distributed/gpu_config.json, or its
  defaults), and for tests GET /distributed/reach: for each worker in it, whether its /system_stats answers from here;
- prompts (POST /prompt, a queue running one prompt at a time, /queue, /history, /interrupt), /view streaming files,
  the WebSocket /ws (RFC 6455 here in the standard library) with ComfyUI's status and execution messages, and a
  stand-in for the frontend at / that builds its URLs from its own path as ComfyUI's does (README.md).

GPUs: the devices reported come from NVIDIA_VISIBLE_DEVICES, which Docker sets from the container's GPU device
requests, so a test can see which host GPUs reached the container.

Switches for failure tests (environment): COMFY_DOUBLE_CRASH=1 exits 1 right after parsing the arguments;
COMFY_DOUBLE_START_DELAY=<seconds> waits that long before listening. COMFY_DOUBLE_PROMPT_SECONDS (default 0.2) is
how long a prompt runs; COMFY_DOUBLE_ASSETS (default 0) how many static assets the frontend page loads.

Standard library only, plus PyYAML when --extra-model-paths-config is given (as ComfyUI).
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.policy
import errno
import glob
import hashlib
import http.server
import ipaddress
import itertools
import json
import mimetypes
import os
import shutil
import signal
import socket
import socketserver
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid

COMFYUI_VERSION = "0.0.0-testdouble"
FAKE_VRAM_BYTES = 24 * 1024**3
PT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
LEGACY_FOLDER_NAMES = {"unet": "diffusion_models", "clip": "text_encoders"}


def log(message: str) -> None:
    print(message, flush=True)


# --- command line (after comfy/cli_args.py) -------------------------------------------------------------------------

def is_valid_directory(path: str) -> str:
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"The path '{path}' does not exist.")
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"'{path}' is not a directory.")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"You do not have read permissions for '{path}'.")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", type=str, default="127.0.0.1", metavar="IP", nargs="?", const="0.0.0.0,::",
                        help="Comma-separated IP addresses to listen on (bare --listen: 0.0.0.0,::).")
    parser.add_argument("--port", type=int, default=8188, help="Set the listen port.")
    parser.add_argument("--tls-keyfile", type=str)
    parser.add_argument("--tls-certfile", type=str)
    parser.add_argument("--enable-cors-header", type=str, default=None, metavar="ORIGIN", nargs="?", const="*")
    parser.add_argument("--max-upload-size", type=float, default=100)
    parser.add_argument("--base-directory", type=str, default=None)
    parser.add_argument("--extra-model-paths-config", type=str, default=None, metavar="PATH", nargs="+",
                        action="append", help="Load one or more extra_model_paths.yaml files.")
    parser.add_argument("--output-directory", type=str, default=None)
    parser.add_argument("--temp-directory", type=str, default=None)
    parser.add_argument("--input-directory", type=str, default=None)
    parser.add_argument("--auto-launch", action="store_true")
    parser.add_argument("--disable-auto-launch", action="store_true")
    parser.add_argument("--cuda-device", type=str, default=None, metavar="DEVICE_ID")
    parser.add_argument("--default-device", type=int, default=None, metavar="DEFAULT_DEVICE_ID")
    cuda_malloc = parser.add_mutually_exclusive_group()
    cuda_malloc.add_argument("--cuda-malloc", action="store_true")
    cuda_malloc.add_argument("--disable-cuda-malloc", action="store_true")
    fp_group = parser.add_mutually_exclusive_group()
    fp_group.add_argument("--force-fp32", action="store_true")
    fp_group.add_argument("--force-fp16", action="store_true")
    parser.add_argument("--preview-method", type=str, default="none", choices=["none", "auto", "latent2rgb", "taesd"])
    parser.add_argument("--preview-size", type=int, default=512)
    cache_group = parser.add_mutually_exclusive_group()
    cache_group.add_argument("--cache-classic", action="store_true")
    cache_group.add_argument("--cache-lru", type=int, default=0)
    cache_group.add_argument("--cache-none", action="store_true")
    attention = parser.add_mutually_exclusive_group()
    attention.add_argument("--use-split-cross-attention", action="store_true")
    attention.add_argument("--use-quad-cross-attention", action="store_true")
    attention.add_argument("--use-pytorch-cross-attention", action="store_true")
    attention.add_argument("--use-sage-attention", action="store_true")
    attention.add_argument("--use-flash-attention", action="store_true")
    parser.add_argument("--disable-xformers", action="store_true")
    vram_group = parser.add_mutually_exclusive_group()
    vram_group.add_argument("--gpu-only", action="store_true")
    vram_group.add_argument("--highvram", action="store_true")
    vram_group.add_argument("--normalvram", action="store_true")
    vram_group.add_argument("--lowvram", action="store_true")
    vram_group.add_argument("--novram", action="store_true")
    vram_group.add_argument("--cpu", action="store_true", help="To use the CPU for everything (slow).")
    parser.add_argument("--reserve-vram", type=float, default=None)
    parser.add_argument("--disable-smart-memory", action="store_true")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--dont-print-server", action="store_true")
    parser.add_argument("--quick-test-for-ci", action="store_true")
    parser.add_argument("--windows-standalone-build", action="store_true")
    parser.add_argument("--disable-metadata", action="store_true")
    parser.add_argument("--disable-all-custom-nodes", action="store_true")
    parser.add_argument("--whitelist-custom-nodes", type=str, nargs="+", default=[])
    parser.add_argument("--disable-api-nodes", action="store_true")
    parser.add_argument("--multi-user", action="store_true")
    parser.add_argument("--verbose", default="INFO", const="DEBUG", nargs="?",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    parser.add_argument("--log-stdout", action="store_true")
    parser.add_argument("--front-end-version", type=str, default="comfyanonymous/ComfyUI@latest")
    parser.add_argument("--front-end-root", type=is_valid_directory, default=None)
    parser.add_argument("--user-directory", type=is_valid_directory, default=None)
    parser.add_argument("--enable-compress-response-body", action="store_true")
    parser.add_argument("--database-url", type=str, default=None)
    parser.add_argument("--disable-assets", action="store_true")
    parser.add_argument("--models-directory", type=is_valid_directory, default=None)
    return parser


# --- directories (after folder_paths.py and main.py) ----------------------------------------------------------------

class Paths:
    def __init__(self, args: argparse.Namespace) -> None:
        install_dir = os.path.dirname(os.path.realpath(__file__))
        base = os.path.abspath(args.base_directory) if args.base_directory else install_dir
        models = os.path.abspath(args.models_directory) if args.models_directory else os.path.join(base, "models")
        self.install_dir = install_dir
        self.base = base
        self.output = os.path.join(base, "output")
        self.temp = os.path.join(base, "temp")
        self.input = os.path.join(base, "input")
        self.user = os.path.join(base, "user")
        pt = set(PT_EXTENSIONS)

        def m(*names: str) -> list[str]:
            return [os.path.join(models, name) for name in names]

        self.folders: dict[str, tuple[list[str], set[str]]] = {
            "checkpoints": (m("checkpoints"), set(pt)),
            "configs": (m("configs"), {".yaml"}),
            "loras": (m("loras"), set(pt)),
            "vae": (m("vae"), set(pt)),
            "text_encoders": (m("text_encoders", "clip"), set(pt)),
            "diffusion_models": (m("unet", "diffusion_models"), set(pt)),
            "clip_vision": (m("clip_vision"), set(pt)),
            "style_models": (m("style_models"), set(pt)),
            "embeddings": (m("embeddings"), set(pt)),
            "diffusers": (m("diffusers"), {"folder"}),
            "vae_approx": (m("vae_approx"), set(pt)),
            "controlnet": (m("controlnet", "t2i_adapter"), set(pt)),
            "gligen": (m("gligen"), set(pt)),
            "upscale_models": (m("upscale_models"), set(pt)),
            "latent_upscale_models": (m("latent_upscale_models"), set(pt)),
            "custom_nodes": ([os.path.join(base, "custom_nodes")], set()),
            "hypernetworks": (m("hypernetworks"), set(pt)),
            "photomaker": (m("photomaker"), set(pt)),
            "classifiers": (m("classifiers"), {""}),
            "model_patches": (m("model_patches"), set(pt)),
            "audio_encoders": (m("audio_encoders"), set(pt)),
        }

    def add_model_folder_path(self, folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
        folder_name = LEGACY_FOLDER_NAMES.get(folder_name, folder_name)
        if folder_name in self.folders:
            paths = self.folders[folder_name][0]
            if full_folder_path in paths:
                if is_default and paths[0] != full_folder_path:
                    paths.remove(full_folder_path)
                    paths.insert(0, full_folder_path)
            elif is_default:
                paths.insert(0, full_folder_path)
            else:
                paths.append(full_folder_path)
        else:
            self.folders[folder_name] = ([full_folder_path], set())

    def load_extra_path_config(self, yaml_path: str) -> None:
        # As ComfyUI: a missing or malformed file raises, and the server does not start.
        import yaml

        with open(yaml_path, "r", encoding="utf-8") as stream:
            config = yaml.safe_load(stream)
        yaml_dir = os.path.dirname(os.path.abspath(yaml_path))
        for section in config:
            conf = config[section]
            if conf is None:
                continue
            base_path = None
            if "base_path" in conf:
                base_path = conf.pop("base_path")
                base_path = os.path.expandvars(os.path.expanduser(base_path))
                if not os.path.isabs(base_path):
                    base_path = os.path.abspath(os.path.join(yaml_dir, base_path))
            is_default = False
            if "is_default" in conf:
                is_default = conf.pop("is_default")
            for folder_name in conf:
                for line in conf[folder_name].split("\n"):
                    if len(line) == 0:
                        continue
                    full_path = line
                    if base_path:
                        full_path = os.path.join(base_path, full_path)
                    elif not os.path.isabs(full_path):
                        full_path = os.path.abspath(os.path.join(yaml_dir, line))
                    normalized = os.path.normpath(full_path)
                    log(f"Adding extra search path {folder_name} {normalized}")
                    self.add_model_folder_path(folder_name, normalized, is_default)

    def apply_custom_paths(self, args: argparse.Namespace) -> None:
        default_yaml = os.path.join(self.install_dir, "extra_model_paths.yaml")
        if os.path.isfile(default_yaml):
            self.load_extra_path_config(default_yaml)
        if args.extra_model_paths_config:
            for config_path in itertools.chain(*args.extra_model_paths_config):
                self.load_extra_path_config(config_path)
        if args.output_directory:
            self.output = os.path.abspath(args.output_directory)
            log(f"Setting output directory to: {self.output}")
        # Where CheckpointSave and friends write; ComfyUI also searches them.
        for folder_name in ("checkpoints", "clip", "vae", "diffusion_models", "loras"):
            self.add_model_folder_path(folder_name, os.path.join(self.output, folder_name))
        if args.input_directory:
            self.input = os.path.abspath(args.input_directory)
            log(f"Setting input directory to: {self.input}")
        if args.user_directory:
            self.user = os.path.abspath(args.user_directory)
            log(f"Setting user directory to: {self.user}")
        if args.temp_directory:
            self.temp = os.path.join(os.path.abspath(args.temp_directory), "temp")
            log(f"Setting temp directory to: {self.temp}")

    def prepare(self) -> None:
        # ComfyUI empties temp/ at every start.
        shutil.rmtree(self.temp, ignore_errors=True)
        for path in (self.input, self.output, self.temp, self.user, os.path.join(self.base, "custom_nodes")):
            os.makedirs(path, exist_ok=True)

    def filename_list(self, folder_name: str) -> list[str]:
        folder_name = LEGACY_FOLDER_NAMES.get(folder_name, folder_name)
        search_paths, extensions = self.folders[folder_name]
        found: set[str] = set()
        for directory in search_paths:
            for relpath in recursive_search(directory, excluded_dir_names=[".git"]):
                if len(extensions) == 0 or os.path.splitext(relpath)[-1].lower() in extensions:
                    found.add(relpath)
        return sorted(found)

    def input_images(self) -> list[str]:
        # LoadImage lists only files directly inside input/ (symlinks followed), filtered to images.
        try:
            names = os.listdir(self.input)
        except OSError:
            return []
        files = [n for n in names if os.path.isfile(os.path.join(self.input, n))]
        return sorted(n for n in files if (mimetypes.guess_type(n)[0] or "").startswith("image/"))


def recursive_search(directory: str, excluded_dir_names: list[str]) -> list[str]:
    if not os.path.isdir(directory):
        return []
    result = []
    for dirpath, subdirs, filenames in os.walk(directory, followlinks=True, topdown=True):
        subdirs[:] = [d for d in subdirs if d not in excluded_dir_names]
        for file_name in filenames:
            result.append(os.path.relpath(os.path.join(dirpath, file_name), directory))
    return result


# --- devices --------------------------------------------------------------------------------------------------------

class NoCudaDevice(RuntimeError):
    pass


def read_meminfo() -> tuple[int, int]:
    values = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total = values.get("MemTotal", 0)
    return total, values.get("MemAvailable", values.get("MemFree", total))


def detect_devices(args: argparse.Namespace) -> list[dict]:
    """What torch would see: the GPUs Docker exposed (NVIDIA_VISIBLE_DEVICES), narrowed by --cuda-device."""
    visible = os.environ.get("NVIDIA_VISIBLE_DEVICES", "").strip()
    if args.cpu or visible.lower() in ("", "void", "none"):
        ram_total, ram_free = read_meminfo()
        return [{"name": "cpu", "type": "cpu", "index": None, "vram_total": ram_total, "vram_free": ram_free,
                 "torch_vram_total": ram_total, "torch_vram_free": ram_free}]
    host_ids = [part.strip() for part in visible.split(",") if part.strip()]
    selection = args.cuda_device if args.cuda_device is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    if selection is not None and selection != "all":
        chosen = []
        for part in selection.split(","):
            part = part.strip()
            if part.isdigit() and int(part) < len(host_ids):
                chosen.append(host_ids[int(part)])
            else:
                break  # CUDA stops at the first invalid entry.
        host_ids = chosen
    if not host_ids:
        raise NoCudaDevice(
            f"No CUDA GPUs are available (NVIDIA_VISIBLE_DEVICES={visible!r}, --cuda-device={args.cuda_device!r})"
        )
    return [
        {"name": f"cuda:{index} host GPU {host_id} : test double", "type": "cuda", "index": index,
         "vram_total": FAKE_VRAM_BYTES, "vram_free": FAKE_VRAM_BYTES,
         "torch_vram_total": 0, "torch_vram_free": 0}
        for index, host_id in enumerate(host_ids)
    ]


# --- nodes ----------------------------------------------------------------------------------------------------------

SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_sde", "ddim", "uni_pc"]
SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"]


def builtin_nodes(paths: Paths) -> dict[str, dict]:
    def node(name, display, category, required, outputs, output_node=False, hidden=None):
        inputs = {"required": required}
        if hidden:
            inputs["hidden"] = hidden
        return {
            "input": inputs,
            "input_order": {key: list(value) for key, value in inputs.items()},
            "output": [t for t, _ in outputs],
            "output_is_list": [False for _ in outputs],
            "output_name": [n for _, n in outputs],
            "name": name,
            "display_name": display,
            "description": "",
            "python_module": "nodes",
            "category": category,
            "output_node": output_node,
        }

    int_spec = lambda default, lo, hi: ["INT", {"default": default, "min": lo, "max": hi}]  # noqa: E731
    float_spec = lambda default, lo, hi: ["FLOAT", {"default": default, "min": lo, "max": hi, "step": 0.01}]  # noqa: E731
    return {
        "CheckpointLoaderSimple": node(
            "CheckpointLoaderSimple", "Load Checkpoint", "loaders",
            {"ckpt_name": [paths.filename_list("checkpoints"), {"tooltip": "The name of the checkpoint to load."}]},
            [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
        "KSampler": node(
            "KSampler", "KSampler", "sampling",
            {"model": ["MODEL"], "seed": int_spec(0, 0, 0xFFFFFFFFFFFFFFFF), "steps": int_spec(20, 1, 10000),
             "cfg": float_spec(8.0, 0.0, 100.0), "sampler_name": [SAMPLERS], "scheduler": [SCHEDULERS],
             "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
             "denoise": float_spec(1.0, 0.0, 1.0)},
            [("LATENT", "LATENT")]),
        "CLIPTextEncode": node(
            "CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning",
            {"text": ["STRING", {"multiline": True, "dynamicPrompts": True}], "clip": ["CLIP"]},
            [("CONDITIONING", "CONDITIONING")]),
        "VAEDecode": node(
            "VAEDecode", "VAE Decode", "latent", {"samples": ["LATENT"], "vae": ["VAE"]}, [("IMAGE", "IMAGE")]),
        "SaveImage": node(
            "SaveImage", "Save Image", "image",
            {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}, [], output_node=True,
            hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}),
        "LoadImage": node(
            "LoadImage", "Load Image", "image", {"image": [paths.input_images(), {"image_upload": True}]},
            [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
        "LoraLoader": node(
            "LoraLoader", "Load LoRA", "loaders",
            {"model": ["MODEL"], "clip": ["CLIP"], "lora_name": [paths.filename_list("loras")],
             "strength_model": float_spec(1.0, -100.0, 100.0), "strength_clip": float_spec(1.0, -100.0, 100.0)},
            [("MODEL", "MODEL"), ("CLIP", "CLIP")]),
        "EmptyLatentImage": node(
            "EmptyLatentImage", "Empty Latent Image", "latent",
            {"width": int_spec(512, 16, 16384), "height": int_spec(512, 16, 16384), "batch_size": int_spec(1, 1, 4096)},
            [("LATENT", "LATENT")]),
    }


def custom_node_classes(paths: Paths, args: argparse.Namespace) -> dict[str, dict]:
    """One entry per class a custom node package declares (nodes.json), or one named after the package."""
    classes: dict[str, dict] = {}
    for custom_nodes_dir in paths.folders["custom_nodes"][0]:
        try:
            names = sorted(os.listdir(os.path.realpath(custom_nodes_dir)))
        except OSError:
            continue
        for name in names:
            module_path = os.path.join(custom_nodes_dir, name)
            if name == "__pycache__" or name.endswith(".disabled"):
                continue
            if os.path.isfile(module_path):
                if os.path.splitext(name)[1] != ".py":
                    continue
                module_name = os.path.splitext(name)[0]
            elif os.path.isdir(module_path):
                module_name = name
            else:
                continue
            if args.disable_all_custom_nodes and name not in args.whitelist_custom_nodes:
                continue
            class_names = [module_name]
            declared = os.path.join(module_path, "nodes.json")
            if os.path.isfile(declared):
                try:
                    with open(declared, encoding="utf-8") as f:
                        class_names = [str(c) for c in json.load(f)]
                except (OSError, ValueError) as error:
                    log(f"Cannot import {module_path} module for custom nodes: {error}")
                    continue
            for class_name in class_names:
                classes[class_name] = {
                    "input": {"required": {}}, "input_order": {"required": []}, "output": [],
                    "output_is_list": [], "output_name": [], "name": class_name, "display_name": class_name,
                    "description": "", "python_module": f"custom_nodes.{module_name}",
                    "category": "test double", "output_node": False,
                }
    return classes


# --- HTTP -----------------------------------------------------------------------------------------------------------

class HttpError(Exception):
    def __init__(self, status: int, text: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    loopback = False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            for _family, _, _, _, sockaddr in socket.getaddrinfo(host, None, family, socket.SOCK_STREAM):
                if not ipaddress.ip_address(sockaddr[0]).is_loopback:
                    return loopback
                loopback = True
        except socket.gaierror:
            pass
    return loopback


def origin_mismatch(host_header: str | None, origin_header: str | None) -> tuple[str, str] | None:
    """ComfyUI's origin-only middleware: a loopback Host with a different Origin is refused."""
    if not host_header or not origin_header:
        return None
    host_domain = host_header.lower()
    parsed = urllib.parse.urlparse(origin_header)
    origin_domain = parsed.netloc.lower()
    host_parsed = urllib.parse.urlsplit("//" + host_domain)
    loopback = is_loopback(host_parsed.hostname)
    if parsed.port is None:
        host_domain = host_parsed.hostname
    if host_parsed.port is None:
        origin_domain = parsed.hostname
    if loopback and host_domain and origin_domain and host_domain != origin_domain:
        return host_domain, origin_domain
    return None


class App:
    def __init__(self, args: argparse.Namespace, paths: Paths, devices: list[dict], prompt_seconds: float = 0.2,
                 asset_count: int = 0) -> None:
        self.args = args
        self.paths = paths
        self.devices = devices
        self.settings_lock = threading.Lock()
        self.sockets = Sockets()
        self.prompts = PromptQueue(self.sockets, self.object_info, prompt_seconds)
        self.asset_count = asset_count
        self.index = index_html(asset_count)

    # ComfyUI-Distributed (its api/config_routes.py): the configuration it reads from its own folder, or its
    # defaults when there is none; and, for tests only, which of its workers answer /system_stats from here.
    def distributed_config(self) -> dict:
        path = os.path.join(self.paths.base, "custom_nodes", "ComfyUI-Distributed", "gpu_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError):
            config = None
        if not isinstance(config, dict):
            return {"master": {"host": ""}, "workers": [], "settings": {}}
        return config

    def distributed_reach(self) -> dict:
        answers = {}
        for worker in self.distributed_config().get("workers") or []:
            if not isinstance(worker, dict):
                continue
            host, port = str(worker.get("host", "")), worker.get("port")
            url = f"http://{host}:{port}/system_stats"
            try:
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=3) as answer:
                    answer.read(65536)
                    answers[str(worker.get("id"))] = {"url": url, "ok": True, "detail": f"HTTP {answer.status}"}
            except Exception as exc:  # noqa: BLE001 - any failure is "not reached"
                answers[str(worker.get("id"))] = {"url": url, "ok": False, "detail": f"{type(exc).__name__}: {exc}"}
        return answers

    # user data (app/user_manager.py): without --multi-user the user is always "default"
    def user_root(self) -> str:
        return os.path.abspath(os.path.join(self.paths.user, "default"))

    def user_filepath(self, file: str | None, create_dir: bool = True) -> str | None:
        root = self.user_root()
        path = root
        if file is not None:
            if "%" in file:
                file = urllib.parse.unquote(file)
            path = os.path.abspath(os.path.join(root, file))
            if os.path.commonpath((root, path)) != root:
                return None
        parent = os.path.split(path)[0]
        if create_dir and not os.path.exists(parent):
            os.makedirs(parent, exist_ok=True)
        return path

    def userdata_path(self, file: str, check_exists: bool = False) -> str:
        if not file:
            raise HttpError(400)
        path = self.user_filepath(file)
        if not path:
            raise HttpError(403)
        if check_exists and not os.path.exists(path):
            raise HttpError(404)
        return path

    @staticmethod
    def file_info(path: str, relative_to: str) -> dict:
        return {"path": os.path.relpath(path, relative_to).replace(os.sep, "/"), "size": os.path.getsize(path),
                "modified": int(os.path.getmtime(path) * 1000), "created": int(os.path.getctime(path) * 1000)}

    def settings_file(self) -> str:
        return self.user_filepath("comfy.settings.json")

    def read_settings(self) -> dict:
        file = self.settings_file()
        if os.path.isfile(file):
            try:
                with open(file, encoding="utf-8") as f:
                    return json.load(f)
            except (OSError, ValueError):
                return {}
        return {}

    def write_settings(self, settings: dict) -> None:
        write_atomically(self.settings_file(), json.dumps(settings, indent=4).encode())

    def object_info(self) -> dict:
        nodes = builtin_nodes(self.paths)
        for name, info in custom_node_classes(self.paths, self.args).items():
            nodes.setdefault(name, info)
        return nodes

    def system_stats(self) -> dict:
        ram_total, ram_free = read_meminfo()
        return {
            "system": {
                "os": "posix", "ram_total": ram_total, "ram_free": ram_free,
                "comfyui_version": COMFYUI_VERSION, "python_version": sys.version, "pytorch_version": "none",
                "embedded_python": False, "argv": sys.argv,
            },
            "devices": self.devices,
        }


def write_atomically(path: str, data: bytes) -> None:
    handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --- uploads (server.py: image_upload behind POST /upload/image and /upload/mask) ----------------------------------

class FileField:
    """A form part that came with a file name, as aiohttp's request.post() hands it to ComfyUI."""

    def __init__(self, filename: str, data: bytes) -> None:
        self.filename = filename
        self.data = data


def parse_form(content_type: str, body: bytes) -> dict:
    """The first value of each field, as aiohttp's request.post() gives them (MultiDict.get): a multipart part with a
    non-empty file name is a FileField, every other field a str; a body of another type is an empty form."""
    kind = content_type.split(";")[0].strip().lower()
    form: dict = {}
    if kind == "application/x-www-form-urlencoded":
        for name, value in urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
            form.setdefault(name, value)
    elif kind == "multipart/form-data":
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name is None:
                continue
            data = part.get_payload(decode=True) or b""
            filename = part.get_filename()
            form.setdefault(name, FileField(filename, data) if filename
                            else data.decode(part.get_content_charset() or "utf-8", "replace"))
    return form


def annotated_filepath(name: str) -> tuple[str, str | None]:
    """folder_paths.annotated_filepath: "a.png [output]" names a.png in the output folder (same slicing)."""
    for annotation, length in (("[output]", 9), ("[input]", 8), ("[temp]", 7)):
        if name.endswith(annotation):
            return name[:-length], annotation[1:-1]
    return name, None


# --- WebSocket (RFC 6455; ComfyUI's /ws is aiohttp's WebSocketResponse) ---------------------------------------------

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WS_CONTINUATION, WS_TEXT, WS_BINARY, WS_CLOSE, WS_PING, WS_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
WS_MAX_MESSAGE = 4 * 1024 * 1024  # aiohttp's default max_msg_size
ECHO_TYPE = "comfyhub_double_echo"  # double-only: echoed back at once, for latency measurements


class WebSocketClosed(Exception):
    pass


def ws_accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


def ws_unmask(data: bytes, mask: bytes) -> bytes:
    if not data:
        return data
    length = len(data)
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(length, "little")


class WebSocketConnection:
    """The server side of one WebSocket: frames read by the handler's thread, sent from any thread (the prompt
    worker broadcasts status), one frame at a time."""

    def __init__(self, sock: socket.socket, rfile) -> None:
        self.sock = sock
        self.rfile = rfile
        self.send_lock = threading.Lock()
        self.closed = False

    def send_json(self, message: dict) -> bool:
        return self.send_frame(WS_TEXT, json.dumps(message).encode())

    def send_frame(self, opcode: int, payload: bytes) -> bool:
        length = len(payload)
        if length < 126:
            header = bytes((0x80 | opcode, length))
        elif length < 1 << 16:
            header = bytes((0x80 | opcode, 126)) + length.to_bytes(2, "big")
        else:
            header = bytes((0x80 | opcode, 127)) + length.to_bytes(8, "big")
        with self.send_lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(header + payload)
            except OSError:
                self.closed = True
                return False
            if opcode == WS_CLOSE:
                self.closed = True
        return True

    def close(self, code: int, reason: str = "") -> None:
        self.send_frame(WS_CLOSE, code.to_bytes(2, "big") + reason.encode()[:120])

    def _read_exactly(self, count: int) -> bytes:
        data = self.rfile.read(count) if count else b""
        if len(data) != count:
            raise WebSocketClosed("the client went away")
        return data

    def receive(self) -> tuple[int, bytes]:
        """The next whole message (text or binary), answering pings on the way. Raises WebSocketClosed at a close
        frame (answered), a protocol error (closed with 1002 or 1009) or the end of the stream."""
        opcode, parts, size = None, [], 0
        while True:
            first, second = self._read_exactly(2)
            fin, frame_opcode, masked, length = first & 0x80, first & 0x0F, second & 0x80, second & 0x7F
            if first & 0x70:
                self.close(1002, "reserved bits set")
                raise WebSocketClosed("reserved bits set")
            if length == 126:
                length = int.from_bytes(self._read_exactly(2), "big")
            elif length == 127:
                length = int.from_bytes(self._read_exactly(8), "big")
            if not masked:  # RFC 6455 5.1: a server closes the connection on an unmasked client frame
                self.close(1002, "client frames must be masked")
                raise WebSocketClosed("unmasked client frame")
            if size + length > WS_MAX_MESSAGE:
                self.close(1009, "message too big")
                raise WebSocketClosed("message too big")
            mask = self._read_exactly(4)
            payload = ws_unmask(self._read_exactly(length), mask)
            if frame_opcode == WS_PING:
                self.send_frame(WS_PONG, payload)
                continue
            if frame_opcode == WS_PONG:
                continue
            if frame_opcode == WS_CLOSE:
                self.send_frame(WS_CLOSE, payload[:2])
                raise WebSocketClosed("closed by the client")
            if frame_opcode in (WS_TEXT, WS_BINARY):
                if opcode is not None:
                    self.close(1002, "a new message inside a fragmented one")
                    raise WebSocketClosed("bad fragmentation")
                opcode = frame_opcode
            elif frame_opcode != WS_CONTINUATION or opcode is None:
                self.close(1002, "unknown opcode")
                raise WebSocketClosed(f"unknown opcode {frame_opcode}")
            parts.append(payload)
            size += length
            if fin:
                return opcode, b"".join(parts)


class Sockets:
    """ComfyUI's PromptServer.sockets: client id -> its WebSocket; a reconnect with the same id replaces the old."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_sid: dict[str, WebSocketConnection] = {}

    def add(self, sid: str, connection: WebSocketConnection) -> None:
        with self.lock:
            self.by_sid[sid] = connection

    def remove(self, sid: str, connection: WebSocketConnection) -> None:
        with self.lock:
            if self.by_sid.get(sid) is connection:
                del self.by_sid[sid]

    def send(self, event: str, data: dict, sid: str | None = None) -> None:
        """To one client (sid) or, with sid None, to all: as ComfyUI's send_json."""
        with self.lock:
            targets = list(self.by_sid.values()) if sid is None else [self.by_sid[sid]] if sid in self.by_sid else []
        for connection in targets:
            connection.send_json({"type": event, "data": data})


# --- the prompt queue (execution.PromptQueue, main.prompt_worker) ---------------------------------------------------

class PromptError(Exception):
    def __init__(self, error: dict) -> None:
        super().__init__(error["message"])
        self.error = error


def prompt_error(kind: str, message: str, details: str = "") -> PromptError:
    return PromptError({"type": kind, "message": message, "details": details, "extra_info": {}})


class PromptQueue:
    """One prompt runs at a time, for prompt_seconds, in a worker thread; nothing is computed. Items are ComfyUI's
    [number, prompt_id, prompt, extra_data, outputs_to_execute]; history entries its {"prompt", "outputs",
    "status", "meta"}."""

    MAXIMUM_HISTORY_SIZE = 10000

    def __init__(self, sockets: Sockets, node_classes, prompt_seconds: float) -> None:
        self.sockets = sockets
        self.node_classes = node_classes  # () -> {class name: object_info entry}
        self.prompt_seconds = prompt_seconds
        self.mutex = threading.RLock()
        self.not_empty = threading.Condition(self.mutex)
        self.pending: list[list] = []  # sorted by number
        self.running: list | None = None
        self.history: dict[str, dict] = {}
        self.number = 0
        self.interrupted = threading.Event()
        self.client_id: str | None = None  # the client whose prompt runs now, as PromptServer.client_id

    def start(self) -> None:
        threading.Thread(target=self.work, name="prompt-worker", daemon=True).start()

    def remaining(self) -> int:
        with self.mutex:
            return len(self.pending) + (1 if self.running is not None else 0)

    def status(self) -> dict:
        return {"exec_info": {"queue_remaining": self.remaining()}}

    def updated(self) -> None:
        self.sockets.send("status", {"status": self.status()})

    def put(self, body) -> dict:
        """POST /prompt: validated as execution.validate_prompt does before it looks at inputs."""
        if not isinstance(body, dict):
            raise prompt_error("invalid_prompt", "The request body must be a JSON object.")
        with self.mutex:
            if "number" in body:
                try:
                    number = float(body["number"])
                except (TypeError, ValueError):
                    raise prompt_error("invalid_prompt", "number must be a number.")
            else:
                number = self.number
                if body.get("front"):
                    number = -number
                self.number += 1
        if "prompt" not in body:
            raise prompt_error("no_prompt", "No prompt provided", "No prompt provided")
        prompt = body["prompt"]
        if not isinstance(prompt, dict):
            raise prompt_error("invalid_prompt", "The prompt must be a JSON object of nodes.")
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        classes = self.node_classes()
        outputs = []
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                raise prompt_error("invalid_prompt", "Cannot execute because a node is missing the class_type "
                                   "property.", f"Node ID '#{node_id}'")
            info = classes.get(node["class_type"])
            if info is None:
                raise prompt_error("invalid_prompt", f"Cannot execute because node {node['class_type']} does not "
                                   "exist.", f"Node ID '#{node_id}'")
            if info.get("output_node"):
                outputs.append(node_id)
        if not outputs:
            raise prompt_error("prompt_no_outputs", "Prompt has no outputs")
        extra_data = dict(body["extra_data"]) if isinstance(body.get("extra_data"), dict) else {}
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        extra_data["create_time"] = int(time.time() * 1000)
        item = [number, prompt_id, prompt, extra_data, outputs]
        with self.not_empty:
            index = len([queued for queued in self.pending if queued[0] <= number])
            self.pending.insert(index, item)
            self.updated()
            self.not_empty.notify()
        return {"prompt_id": prompt_id, "number": number, "node_errors": {}}

    def queue(self) -> dict:
        with self.mutex:
            return {"queue_running": [self.running] if self.running is not None else [],
                    "queue_pending": list(self.pending)}

    def clear(self) -> None:
        with self.mutex:
            self.pending = []
            self.updated()

    def delete(self, prompt_ids) -> None:
        with self.mutex:
            kept = [item for item in self.pending if item[1] not in prompt_ids]
            if len(kept) != len(self.pending):
                self.pending = kept
                self.updated()

    def interrupt(self, prompt_id: str | None = None) -> None:
        with self.mutex:
            if self.running is not None and (prompt_id is None or self.running[1] == prompt_id):
                self.interrupted.set()

    def get_history(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict:
        with self.mutex:
            if prompt_id is not None:
                return {prompt_id: self.history[prompt_id]} if prompt_id in self.history else {}
            entries = list(self.history.items())
            if offset < 0 and max_items is not None:
                offset = len(entries) - max_items
            entries = entries[max(offset, 0):]
            if max_items is not None:
                entries = entries[:max_items]
            return dict(entries)

    def clear_history(self) -> None:
        with self.mutex:
            self.history = {}

    def delete_history(self, prompt_ids) -> None:
        with self.mutex:
            for prompt_id in prompt_ids:
                self.history.pop(prompt_id, None)

    def work(self) -> None:
        while True:
            with self.not_empty:
                while not self.pending:
                    self.not_empty.wait()
                item = self.pending.pop(0)
                self.running = item
                self.interrupted.clear()
                self.updated()
            self.execute(item)

    def execute(self, item: list) -> None:
        """execution.PromptExecutor.execute as far as the messages go: execution_start, executing and executed per
        node (only output nodes are "executed"), execution_success or execution_interrupted, then executing null."""
        _number, prompt_id, prompt, extra_data, outputs = item
        client_id = extra_data.get("client_id")
        self.client_id = client_id
        messages = []

        def message(event: str, data: dict, broadcast: bool = False) -> None:
            data = {**data, "timestamp": int(time.time() * 1000)}
            messages.append([event, data])
            if broadcast or client_id is not None:
                self.sockets.send(event, data, None if broadcast else client_id)

        message("execution_start", {"prompt_id": prompt_id})
        message("execution_cached", {"nodes": [], "prompt_id": prompt_id})
        node_ids = list(prompt)
        step = self.prompt_seconds / max(len(node_ids), 1)
        success = True
        results = {}
        for node_id in node_ids:
            if client_id is not None:
                self.sockets.send("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id},
                                  client_id)
            if self.interrupted.wait(step):
                message("execution_interrupted", {"prompt_id": prompt_id, "node_id": node_id,
                                                  "node_type": prompt[node_id]["class_type"], "executed": []},
                        broadcast=True)
                success = False
                break
            if node_id in outputs:
                results[node_id] = {"images": []}
                if client_id is not None:
                    self.sockets.send("executed", {"node": node_id, "display_node": node_id,
                                                   "output": results[node_id], "prompt_id": prompt_id}, client_id)
        if success:
            message("execution_success", {"prompt_id": prompt_id})
        with self.mutex:
            self.running = None
            if len(self.history) > self.MAXIMUM_HISTORY_SIZE:
                self.history.pop(next(iter(self.history)))
            self.history[prompt_id] = {
                "prompt": item,
                "outputs": results,
                "status": {"status_str": "success" if success else "error", "completed": success,
                           "messages": messages},
                "meta": {node_id: {"node_id": node_id, "display_node": node_id, "parent_node": None,
                                   "real_node_id": node_id} for node_id in results},
            }
            self.updated()
        if client_id is not None:
            self.sockets.send("executing", {"node": None, "prompt_id": prompt_id}, client_id)


# --- the frontend (a stand-in for ComfyUI_frontend's index.html and its assets) -------------------------------------

ASSET_BYTES = 1024


def asset_name(number: int) -> str:
    return f"a{number:04d}.js"


def asset_body(number: int) -> bytes:
    code = (f"// ComfyUI test double: static asset {number}\n"
            "window.comfyDoubleAssets = (window.comfyDoubleAssets || 0) + 1;\n")
    return (code + "//" + "." * max(ASSET_BYTES - len(code) - 3, 0) + "\n").encode()


INDEX_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ComfyUI</title>
<link rel="icon" href="data:,">
{assets}</head>
<body>
<h1>ComfyUI test double</h1>
<p>Not ComfyUI: a stand-in for its frontend that builds every URL the way ComfyUI's does.</p>
<dl>
  <dt>WebSocket</dt><dd id="ws-state" data-testid="ws-state">connecting</dd>
  <dt>Status</dt><dd id="status" data-testid="status">waiting for the first status message</dd>
  <dt>Queue remaining</dt><dd id="queue-remaining" data-testid="queue-remaining"></dd>
  <dt>Session</dt><dd id="sid" data-testid="sid"></dd>
  <dt>Assets</dt><dd id="assets" data-testid="assets" data-expected="{asset_count}">loading</dd>
</dl>
<button id="queue-prompt" data-testid="queue-prompt" type="button">Queue prompt</button>
<p id="prompt-result" data-testid="prompt-result"></p>
<ol id="messages" data-testid="messages"></ol>
<script>
// As ComfyUI_frontend's api.ts: api_base is the page's path without its last part, the WebSocket goes to
// ws(s)://<host><api_base>/ws?clientId=..., and API calls to <api_base>/api/<route>.
const api_base = location.pathname.split('/').slice(0, -1).join('/');
let clientId = sessionStorage.getItem('clientId');
const $ = (id) => document.getElementById(id);

function connect() {{
  const query = clientId ? `?clientId=${{clientId}}` : '';
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const socket = new WebSocket(`${{scheme}}://${{location.host}}${{api_base}}/ws${{query}}`);
  socket.addEventListener('open', () => {{ $('ws-state').textContent = 'open'; }});
  socket.addEventListener('close', () => {{ $('ws-state').textContent = 'closed'; }});
  socket.addEventListener('error', () => {{ $('ws-state').textContent = 'error'; }});
  socket.addEventListener('message', (event) => {{
    const message = JSON.parse(event.data);
    if (message.type === 'status') {{
      if (message.data.sid) {{
        clientId = message.data.sid;
        sessionStorage.setItem('clientId', clientId);
        $('sid').textContent = clientId;
      }}
      const remaining = message.data.status.exec_info.queue_remaining;
      $('queue-remaining').textContent = String(remaining);
      $('status').textContent = `queue_remaining ${{remaining}}, sid ${{clientId}}`;
    }} else {{
      const item = document.createElement('li');
      item.textContent = `${{message.type}} ${{(message.data && message.data.prompt_id) || ''}}`.trim();
      $('messages').appendChild(item);
    }}
  }});
}}

async function queuePrompt() {{
  const prompt = {{'1': {{class_type: 'SaveImage', inputs: {{filename_prefix: 'ComfyUI'}}}}}};
  const body = {{client_id: clientId, prompt}};
  const result = $('prompt-result');
  try {{
    const response = await fetch(`${{api_base}}/api/prompt`, {{
      method: 'POST', headers: {{'Content-Type': 'application/json'}}, body: JSON.stringify(body)}});
    const data = await response.json().catch(() => ({{}}));
    if (response.ok) {{
      result.dataset.promptId = data.prompt_id;
      result.textContent = `queued ${{data.prompt_id}}`;
    }} else {{
      result.textContent = `error ${{response.status}}: ${{JSON.stringify(data.error || data)}}`;
    }}
  }} catch (error) {{
    result.textContent = `error: ${{error}}`;
  }}
}}

$('queue-prompt').addEventListener('click', queuePrompt);
window.addEventListener('load', () => {{
  $('assets').textContent = String(window.comfyDoubleAssets || 0);
}});
connect();
</script>
</body></html>
"""


def index_html(asset_count: int) -> bytes:
    assets = "".join(f'<script defer src="assets/{asset_name(n)}"></script>\n' for n in range(1, asset_count + 1))
    return INDEX_TEMPLATE.format(assets=assets, asset_count=asset_count).encode()




class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "ComfyUI-test-double"
    protocol_version = "HTTP/1.1"
    app: App  # set on the subclass made in serve()

    def setup(self) -> None:
        super().setup()
        # As aiohttp: no Nagle. Headers and body go out in two writes; with Nagle, the body of a keep-alive answer
        # waits for the client's delayed ACK (40 ms).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        sys.stdout.write("%s - %s\n" % (self.address_string(), format % args))
        sys.stdout.flush()

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    def do_PUT(self) -> None:
        self.dispatch("PUT")

    def do_PATCH(self) -> None:
        self.dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self.dispatch("OPTIONS")

    # -- plumbing
    def dispatch(self, method: str) -> None:
        self._body = None
        cors = self.app.args.enable_cors_header
        try:
            if cors is None:
                mismatch = origin_mismatch(self.headers.get("Host"), self.headers.get("Origin"))
                if mismatch:
                    log("WARNING: request with non matching host and origin {} != {}, returning 403".format(*mismatch))
                    raise HttpError(403)
            if method == "OPTIONS":
                self.respond(200, b"", "text/plain")
                return
            split = urllib.parse.urlsplit(self.path)
            raw_path = split.path
            if raw_path == "/api" or raw_path.startswith("/api/"):
                raw_path = raw_path[4:] or "/"
            self.query = urllib.parse.parse_qs(split.query)
            self.route(method, raw_path)
        except HttpError as error:
            self.respond_text(error.status, error.text or f"{error.status}: {self.responses[error.status][0]}")
        except Exception as error:  # pragma: no cover - a bug in the double; show it like aiohttp does
            log(f"Error handling request: {error!r}")
            self.respond_text(500, "500 Internal Server Error")

    def q(self, name: str, default: str = "") -> str:
        return self.query.get(name, [default])[0]

    def read_body(self) -> bytes:
        if self._body is None:
            length = int(self.headers.get("Content-Length") or 0)
            self._body = self.rfile.read(length) if length else b""
        return self._body

    def read_json(self):
        try:
            return json.loads(self.read_body() or b"null")
        except ValueError:
            raise HttpError(400, "Invalid JSON")

    def respond(self, status: int, body: bytes, content_type: str, extra_headers: dict | None = None) -> None:
        if self.command in ("POST", "PUT", "PATCH", "DELETE") and self._body is None:
            self.read_body()  # drain it, so that keep-alive connections stay in step
        self.send_head(status, content_type, len(body), extra_headers)
        if status != 204:
            self.wfile.write(body)

    def send_head(self, status: int, content_type: str, length: int, extra_headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        cors = self.app.args.enable_cors_header
        if cors is not None:
            self.send_header("Access-Control-Allow-Origin", cors)
            self.send_header("Access-Control-Allow-Methods", "POST, GET, DELETE, PUT, OPTIONS, PATCH")
            self.send_header("Access-Control-Allow-Headers", "Content-Type, Authorization")
            self.send_header("Access-Control-Allow-Credentials", "true")
        for key, value in (extra_headers or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def respond_json(self, data, status: int = 200) -> None:
        self.respond(status, json.dumps(data).encode(), "application/json; charset=utf-8")

    def respond_text(self, status: int, text: str) -> None:
        self.respond(status, text.encode(), "text/plain; charset=utf-8")

    def read_json_object(self) -> dict:
        body = self.read_json()
        if not isinstance(body, dict):
            raise HttpError(400, "The request body must be a JSON object")
        return body

    # -- prompts, files, frontend and WebSocket (server.py: post_prompt, view_image, websocket_handler, get_root)
    def post_prompt(self) -> None:
        # ComfyUI answers a body that is not JSON with aiohttp's 500; the double says what is wrong, with a 400.
        try:
            body = json.loads(self.read_body() or b"null")
        except ValueError:
            return self.respond_json({"error": {"type": "invalid_json", "message": "The request body is not JSON.",
                                                "details": "", "extra_info": {}}, "node_errors": {}}, status=400)
        try:
            return self.respond_json(self.app.prompts.put(body))
        except PromptError as error:
            log(f"invalid prompt: {error.error}")
            return self.respond_json({"error": error.error, "node_errors": {}}, status=400)

    def view(self) -> None:
        """GET /view?filename=&type=output|input|temp&subfolder=: the file streamed from disk (ComfyUI answers a
        FileResponse), with ComfyUI's checks: 400 for a name starting with / or holding .., or an unknown type; 403
        for a subfolder outside the folder; 404 for no such file."""
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query, keep_blank_values=True))
        if "filename" not in query:
            raise HttpError(404)
        filename, annotation = annotated_filepath(query["filename"])
        if not filename or filename[0] == "/" or ".." in filename:
            raise HttpError(400)
        output_dir = self.directory_by_type(annotation or query.get("type", "output"))
        if output_dir is None:
            raise HttpError(400)
        if "subfolder" in query:
            full_output_dir = os.path.join(output_dir, query["subfolder"])
            if os.path.commonpath((os.path.abspath(full_output_dir), output_dir)) != output_dir:
                raise HttpError(403)
            output_dir = full_output_dir
        filename = os.path.basename(filename)
        path = os.path.join(output_dir, filename)
        if not os.path.isfile(path):
            raise HttpError(404)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript",
                            "text/css"}:
            content_type = "application/octet-stream"  # as ComfyUI: downloaded, never rendered
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.send_head(200, content_type, size, {"Content-Disposition": f'filename="{filename}"'})
            sent = self.connection.sendfile(f, 0, size) if size else 0  # the kernel streams it, chunk by chunk
        if sent != size:  # the file shrank while it was sent: the length promised cannot be kept
            self.close_connection = True

    def asset(self, name: str) -> None:
        numbers = {asset_name(n): n for n in range(1, self.app.asset_count + 1)}
        if name not in numbers:
            raise HttpError(404)
        self.respond(200, asset_body(numbers[name]), "text/javascript; charset=utf-8")

    def websocket(self) -> None:
        """GET /ws?clientId=: aiohttp's handshake checks, then ComfyUI's handler: the status message with the sid
        (the clientId given, or a new one), status broadcasts while the queue changes, prompt messages to the
        client that queued it; text messages are read and ignored, except feature_flags (first message) and the
        double-only echo."""
        headers = self.headers
        key = headers.get("Sec-WebSocket-Key", "")
        if headers.get("Upgrade", "").lower() != "websocket":
            raise HttpError(400, "No WebSocket UPGRADE hdr: {}\n Can \"Upgrade\" only to \"WebSocket\".".format(
                headers.get("Upgrade")))
        if "upgrade" not in headers.get("Connection", "").lower():
            raise HttpError(400, "No CONNECTION upgrade hdr: {}".format(headers.get("Connection")))
        if headers.get("Sec-WebSocket-Version", "") not in ("13", "8", "7"):
            raise HttpError(400, "Unsupported version: {}".format(headers.get("Sec-WebSocket-Version")))
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            valid_key = False
        if not valid_key:
            raise HttpError(400, f"Handshake error: {key!r}")
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "upgrade")
        self.send_header("Sec-WebSocket-Accept", ws_accept_key(key))
        self.end_headers()
        self.close_connection = True  # after the WebSocket, the connection is done with HTTP

        app = self.app
        sid = self.q("clientId") or uuid.uuid4().hex
        connection = WebSocketConnection(self.connection, self.rfile)
        app.sockets.add(sid, connection)
        try:
            connection.send_json({"type": "status", "data": {"status": app.prompts.status(), "sid": sid}})
            first_message = True
            while True:
                opcode, payload = connection.receive()
                if opcode != WS_TEXT:
                    continue
                try:
                    message = json.loads(payload)
                except ValueError:
                    log(f"Invalid JSON received from client {sid}: {payload[:200]!r}")
                    continue
                kind = message.get("type") if isinstance(message, dict) else None
                if kind == ECHO_TYPE:
                    connection.send_frame(WS_TEXT, payload)
                elif kind == "feature_flags" and first_message:
                    flags = {"supports_preview_metadata": False,
                             "max_upload_size": int(app.args.max_upload_size * 1024 * 1024)}
                    connection.send_json({"type": "feature_flags", "data": flags})
                first_message = False
        except (WebSocketClosed, OSError):  # closed, broken, or a reset connection: the handler's thread ends
            pass
        finally:
            app.sockets.remove(sid, connection)

    # -- routes (server.py, app/user_manager.py, app/app_settings.py)
    def route(self, method: str, path: str) -> None:
        app = self.app
        parts = path.split("/")[1:]  # "/userdata/a%2Fb.json" -> ["userdata", "a%2Fb.json"]; %2F stays encoded
        key = (method, parts[0] if parts else "", len(parts))

        if key == ("GET", "", 1):
            return self.respond(200, app.index, "text/html; charset=utf-8",
                                {"Cache-Control": "no-cache", "Pragma": "no-cache", "Expires": "0"})
        if key == ("GET", "assets", 2):
            return self.asset(parts[1])
        if key == ("GET", "ws", 1):
            return self.websocket()
        if key == ("GET", "system_stats", 1):
            return self.respond_json(app.system_stats())
        if key == ("GET", "prompt", 1):
            return self.respond_json(app.prompts.status())
        if key == ("POST", "prompt", 1):
            return self.post_prompt()
        if key == ("GET", "queue", 1):
            return self.respond_json(app.prompts.queue())
        if key == ("POST", "queue", 1):
            body = self.read_json_object()
            if body.get("clear"):
                app.prompts.clear()
            if "delete" in body:
                app.prompts.delete(set(body["delete"] or []))
            return self.respond(200, b"", "text/plain")
        if key == ("POST", "interrupt", 1):
            try:
                body = json.loads(self.read_body() or b"{}")
            except ValueError:
                body = {}
            app.prompts.interrupt(body.get("prompt_id") if isinstance(body, dict) else None)
            return self.respond(200, b"", "text/plain")
        if key == ("GET", "history", 1):
            max_items, offset = self.q("max_items"), self.q("offset")
            try:
                return self.respond_json(app.prompts.get_history(
                    max_items=int(max_items) if max_items else None, offset=int(offset) if offset else -1))
            except ValueError:  # int() of a bad value: a 500 in ComfyUI
                raise HttpError(400, "max_items and offset must be integers")
        if key == ("GET", "history", 2):
            return self.respond_json(app.prompts.get_history(prompt_id=urllib.parse.unquote(parts[1])))
        if key == ("POST", "history", 1):
            body = self.read_json_object()
            if body.get("clear"):
                app.prompts.clear_history()
            if "delete" in body:
                app.prompts.delete_history(body["delete"] or [])
            return self.respond(200, b"", "text/plain")
        if key == ("GET", "view", 1):
            return self.view()
        if key == ("GET", "object_info", 1):
            return self.respond_json(app.object_info())
        if key == ("GET", "object_info", 2):
            node_class = urllib.parse.unquote(parts[1])
            nodes = app.object_info()
            return self.respond_json({node_class: nodes[node_class]} if node_class in nodes else {})
        if key == ("GET", "models", 1):
            return self.respond_json(list(app.paths.folders.keys()))
        if key == ("GET", "models", 2):
            folder = urllib.parse.unquote(parts[1])
            if folder not in app.paths.folders:
                raise HttpError(404)
            return self.respond_json(app.paths.filename_list(folder))
        if key == ("GET", "experiment", 2) and parts[1] == "models":
            # app/model_manager.py: every model folder's search paths, get_folder_paths() order (nodes save to [0]).
            return self.respond_json([{"name": name, "folders": list(search)}
                                      for name, (search, _extensions) in app.paths.folders.items()
                                      if name not in ("configs", "custom_nodes")])
        if key == ("GET", "embeddings", 1):
            return self.respond_json([os.path.splitext(n)[0] for n in app.paths.filename_list("embeddings")])
        if key == ("GET", "users", 1):
            return self.respond_json({"storage": "server", "migrated": os.path.exists(app.user_root())})
        if key == ("GET", "settings", 1):
            return self.respond_json(app.read_settings())
        if key == ("GET", "settings", 2):
            return self.respond_json(app.read_settings().get(urllib.parse.unquote(parts[1])))
        if key == ("POST", "settings", 1):
            new = self.read_json()
            if not isinstance(new, dict):
                raise HttpError(400, "Settings must be a JSON object")
            with app.settings_lock:
                app.write_settings({**app.read_settings(), **new})
            return self.respond(200, b"", "text/plain")
        if key == ("POST", "settings", 2):
            value = self.read_json()
            with app.settings_lock:
                settings = app.read_settings()
                settings[urllib.parse.unquote(parts[1])] = value
                app.write_settings(settings)
            return self.respond(200, b"", "text/plain")
        if key == ("GET", "userdata", 1):
            return self.list_userdata()
        if key == ("GET", "userdata", 2):
            path = app.userdata_path(parts[1], check_exists=True)
            if not os.path.isfile(path):
                raise HttpError(404)
            with open(path, "rb") as f:
                data = f.read()
            name = os.path.basename(path)
            return self.respond(200, data, mimetypes.guess_type(name)[0] or "application/octet-stream",
                                {"Content-Disposition": f'attachment; filename="{name}"'})
        if key == ("POST", "userdata", 2):
            return self.post_userdata(parts[1])
        if key == ("DELETE", "userdata", 2):
            path = app.userdata_path(parts[1], check_exists=True)
            os.remove(path)
            return self.respond(204, b"", "text/plain")
        if method == "POST" and len(parts) == 4 and parts[0] == "userdata" and parts[2] == "move":
            return self.move_userdata(parts[1], parts[3])
        if key == ("POST", "upload", 2) and parts[1] in ("image", "mask"):
            return self.upload(mask=parts[1] == "mask")
        if key == ("GET", "distributed", 2) and parts[1] == "config":
            return self.respond_json(app.distributed_config())
        if key == ("GET", "distributed", 2) and parts[1] == "reach":
            return self.respond_json(app.distributed_reach())
        raise HttpError(404)

    def list_userdata(self) -> None:
        directory = self.q("dir")
        if not directory:
            raise HttpError(400, "Directory not provided")
        path = self.app.user_filepath(directory)
        if not path:
            raise HttpError(403, "Invalid directory")
        if not os.path.exists(path):
            raise HttpError(404, "Directory not found")
        recurse = self.q("recurse").lower() == "true"
        full_info = self.q("full_info").lower() == "true"
        split = self.q("split").lower() == "true"
        pattern = os.path.join(glob.escape(path), "**", "*") if recurse else os.path.join(glob.escape(path), "*")
        results = []
        for full_path in sorted(glob.glob(pattern, recursive=recurse)):
            if not os.path.isfile(full_path):
                continue
            if full_info:
                results.append(self.app.file_info(full_path, path))
            else:
                rel = os.path.relpath(full_path, path).replace(os.sep, "/")
                results.append([rel, *rel.split("/")] if split else rel)
        self.respond_json(results)

    def post_userdata(self, file: str) -> None:
        path = self.app.userdata_path(file)
        overwrite = self.q("overwrite", "true") != "false"
        full_info = self.q("full_info", "false").lower() == "true"
        body = self.read_body()
        if not overwrite and os.path.exists(path):
            raise HttpError(409, "File already exists")
        if os.path.isdir(path):
            raise HttpError(400, "Path is a directory")
        write_atomically(path, body)
        root = self.app.user_root()
        self.respond_json(self.app.file_info(path, root) if full_info else os.path.relpath(path, root))

    def move_userdata(self, source: str, dest: str) -> None:
        source_path = self.app.userdata_path(source, check_exists=True)
        dest_path = self.app.userdata_path(dest)
        overwrite = self.q("overwrite", "true") != "false"
        full_info = self.q("full_info", "false").lower() == "true"
        if not overwrite and os.path.exists(dest_path):
            raise HttpError(409, "File already exists")
        shutil.move(source_path, dest_path)
        root = self.app.user_root()
        self.respond_json(self.app.file_info(dest_path, root) if full_info else os.path.relpath(dest_path, root))


    def directory_by_type(self, kind: str | None) -> str | None:
        return {"input": self.app.paths.input, "output": self.app.paths.output,
                "temp": self.app.paths.temp}.get(kind)

    def upload(self, mask: bool) -> None:
        """ComfyUI's image_upload: the file lands in <type>/<subfolder>/<name>, written through whatever is there
        (open(path, "wb") follows a link: onto the read-only /shared that is an OSError, answered 500). Without
        overwrite=true|1 an existing name becomes "name (1).ext", unless it holds the same bytes (nothing written)."""
        post = parse_form(self.headers.get("Content-Type", ""), self.read_body())
        image = post.get("image")
        overwrite = post.get("overwrite")
        upload_type = post.get("type")
        if upload_type is None:
            upload_type = "input"
        upload_dir = self.directory_by_type(upload_type)
        if upload_dir is None:  # ComfyUI's get_dir_by_type leaves its variable unset: an exception, 500
            raise RuntimeError(f"unknown upload type {upload_type!r}")
        if not image:
            raise HttpError(400)
        if not isinstance(image, FileField):  # ComfyUI reads image.file of a str: an exception, 500
            raise RuntimeError("'str' object has no attribute 'file'")
        filename = image.filename
        if not filename:
            raise HttpError(400)
        subfolder = post.get("subfolder", "")
        full_output_folder = os.path.join(upload_dir, os.path.normpath(subfolder))
        filepath = os.path.abspath(os.path.join(full_output_folder, filename))
        if os.path.commonpath((upload_dir, filepath)) != upload_dir:
            raise HttpError(400)
        if not os.path.exists(full_output_folder):
            os.makedirs(full_output_folder)
        stem, extension = os.path.splitext(filename)
        duplicate = False
        if overwrite not in ("true", "1"):
            i = 1
            while os.path.exists(filepath):
                with open(filepath, "rb") as f:  # ComfyUI compares hashes of the two
                    if f.read() == image.data:
                        duplicate = True
                        break
                filename = f"{stem} ({i}){extension}"
                filepath = os.path.join(full_output_folder, filename)
                i += 1
        if not duplicate:
            if mask:
                self.save_mask(image, post, filepath)
            else:
                with open(filepath, "wb") as f:
                    f.write(image.data)
        self.respond_json({"name": filename, "subfolder": subfolder, "type": upload_type})

    def save_mask(self, image: FileField, post: dict, filepath: str) -> None:
        """The mask is saved only when its original_ref names an existing file (ComfyUI's checks, whose refusals it
        ignores: the answer is still 200). ComfyUI puts the mask's alpha onto that image with Pillow; the double,
        without Pillow, writes the uploaded bytes as they are, to the same path and the same way."""
        original_ref = json.loads(post.get("original_ref"))  # missing or not JSON: an exception, 500 as in ComfyUI
        filename, annotation = annotated_filepath(original_ref["filename"])
        if not filename or filename[0] == "/" or ".." in filename:
            return
        output_dir = self.directory_by_type(annotation or original_ref.get("type", "output"))
        if output_dir is None:
            return
        if original_ref.get("subfolder", "") != "":
            full_output_dir = os.path.join(output_dir, original_ref["subfolder"])
            if os.path.commonpath((os.path.abspath(full_output_dir), output_dir)) != output_dir:
                return
            output_dir = full_output_dir
        if os.path.isfile(os.path.join(output_dir, filename)):
            with open(filepath, "wb") as f:
                f.write(image.data)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can wait on DNS in an offline container.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port


def listen_address(listen: str) -> tuple[str, int]:
    """ComfyUI binds every address in the list; the double binds the first IPv4 one (else the first one)."""
    addresses = [a.strip() for a in listen.split(",") if a.strip()] or ["127.0.0.1"]
    for address in addresses:
        if ":" not in address:
            return address, socket.AF_INET
    return addresses[0].strip("[]"), socket.AF_INET6


def serve(app: App, args: argparse.Namespace) -> None:
    address, family = listen_address(args.listen)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server_class = type("BoundServer", (Server,), {"address_family": family})
    try:
        server = server_class((address, args.port), handler)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            log(f"Port {args.port} is already in use on address {address}. "
                "Please close the other application or use a different port with --port.")
            raise SystemExit(1)
        raise
    log("Starting server\n")
    shown = f"[{address}]" if ":" in address else address
    log(f"To see the GUI go to: http://{shown}:{args.port}")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()


def double_setting(name: str) -> str | None:
    """COMFY_DOUBLE_<name>, or COMFYUI_DOUBLE_<name>: ComfyHub refuses COMFY_* in an instance's own environment, so
    tests and benchmarks that start the double as an instance (extra_env) use the second spelling."""
    value = os.environ.get(f"COMFY_DOUBLE_{name}")
    return value if value is not None else os.environ.get(f"COMFYUI_DOUBLE_{name}")


def on_signal(signum, _frame) -> None:
    log(f"Stopped server (signal {signum})")
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    args = build_parser().parse_args(argv)
    if os.environ.get("COMFY_DOUBLE_CRASH") == "1":
        print("COMFY_DOUBLE_CRASH=1: the ComfyUI test double fails on purpose.", file=sys.stderr, flush=True)
        return 1
    log(f"ComfyUI test double {COMFYUI_VERSION} (not ComfyUI)")
    log(f"Python version: {sys.version}")
    paths = Paths(args)
    paths.apply_custom_paths(args)
    paths.prepare()
    try:
        devices = detect_devices(args)
    except NoCudaDevice as error:
        print(f"RuntimeError: {error}", file=sys.stderr, flush=True)
        return 1
    for device in devices:
        log(f"Device: {device['name']}")
    got = (double_setting("PROMPT_SECONDS"), double_setting("ASSETS"))
    try:
        prompt_seconds = float(got[0] or 0.2)
        asset_count = int(got[1] or 0)
        if not (0 <= prompt_seconds <= 3600 and 0 <= asset_count <= 9999):
            raise ValueError
    except ValueError:
        print("COMFY_DOUBLE_PROMPT_SECONDS must be seconds from 0 to 3600 and COMFY_DOUBLE_ASSETS a count from 0 to "
              f"9999 (got {got[0]!r}, {got[1]!r})", file=sys.stderr, flush=True)
        return 2
    delay = float(os.environ.get("COMFY_DOUBLE_START_DELAY") or 0)
    if delay > 0:
        log(f"COMFY_DOUBLE_START_DELAY: waiting {delay:g} s before listening")
        time.sleep(delay)
    app = App(args, paths, devices, prompt_seconds=prompt_seconds, asset_count=asset_count)
    app.prompts.start()
    serve(app, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
