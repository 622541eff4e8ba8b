"""The runtime contract between ComfyHub and a ComfyUI container, in one module (documented in
docs/runtime-contract.md): mounts, arguments, environment, labels, ports, GPUs, restart policy and hardening."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from django.conf import settings

from storage_app import layout

CONTAINER_PORT = 8188
LABEL_MANAGED = "comfyhub.managed"
LABEL_INSTANCE = "comfyhub.instance"
LABEL_NODE = "comfyhub.node"
LABEL_CONFIG = "comfyhub.config-hash"

# Arguments ComfyHub sets itself: an instance's extra arguments may not touch them (they would break isolation).
RESERVED_ARGS = ("--base-directory", "--extra-model-paths-config", "--listen", "--port", "--cuda-device",
                 "--models-directory", "--input-directory", "--output-directory", "--temp-directory",
                 "--user-directory", "--default-device")
RESERVED_ENV = ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "HIP_VISIBLE_DEVICES")
RESERVED_ENV_PREFIXES = ("COMFY_",)


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    command: list[str]
    environment: dict[str, str]
    labels: dict[str, str]
    mounts: list[Mount]
    host_ip: str
    host_port: int
    container_port: int
    gpu_ids: list[str]
    restart_max: int
    shm_size: str
    security_opt: list[str] = field(default_factory=lambda: ["no-new-privileges"])

    @property
    def config_hash(self) -> str:
        data = asdict(self)
        data["labels"] = {k: v for k, v in self.labels.items() if k != LABEL_CONFIG}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def with_hash_label(self) -> "ContainerSpec":
        return ContainerSpec(**{**asdict(self), "mounts": self.mounts,
                                "labels": {**self.labels, LABEL_CONFIG: self.config_hash}})


def comfyui_arguments(instance, gpus) -> list[str]:
    args = [
        "--listen", "0.0.0.0",
        "--port", str(CONTAINER_PORT),
        "--base-directory", layout.CONTAINER_INSTANCE,
        "--extra-model-paths-config", f"{layout.CONTAINER_INSTANCE}/{layout.EXTRA_MODEL_PATHS_FILE}",
        "--disable-auto-launch",
    ]
    if not gpus:
        args.append("--cpu")
    return args + [str(arg) for arg in instance.extra_args]


def container_spec(instance) -> ContainerSpec:
    """Everything Docker needs to run `instance`; its hash decides whether a container must be recreated."""
    gpus = instance.assigned_gpus()
    environment = {str(k): str(v) for k, v in instance.extra_env.items()}
    # Python packages that custom nodes require live in the instance's own folder (see customnodes.py).
    own_packages = f"{layout.CONTAINER_INSTANCE}/python-packages"
    environment["PYTHONPATH"] = ":".join(filter(None, [own_packages, environment.get("PYTHONPATH", "")]))
    environment.update(
        {
            "COMFY_INSTANCE_ID": instance.instance_id,
            "COMFY_SHARED_DIRECTORY": layout.CONTAINER_SHARED,
            "COMFY_BASE_DIRECTORY": layout.CONTAINER_INSTANCE,
            "PUID": str(settings.PUID),
            "PGID": str(settings.PGID),
        }
    )
    if not gpus:
        # CUDA base images set NVIDIA_VISIBLE_DEVICES=all; on a host whose default runtime is nvidia that would hand
        # a CPU instance every GPU.
        environment["NVIDIA_VISIBLE_DEVICES"] = "void"
    labels = {
        LABEL_MANAGED: "true",
        LABEL_INSTANCE: instance.instance_id,
        LABEL_NODE: instance.node.name,
        **settings.CONTAINER_EXTRA_LABELS,
    }
    spec = ContainerSpec(
        name=instance.container_name,
        image=instance.image,
        command=comfyui_arguments(instance, gpus),
        environment=environment,
        labels=labels,
        mounts=[
            Mount(str(layout.shared_root(instance.node)), layout.CONTAINER_SHARED, read_only=True),
            Mount(str(layout.instance_dir(instance.instance_id, instance.node)), layout.CONTAINER_INSTANCE,
                  read_only=False),
        ],
        host_ip=instance.node.bind_address,
        host_port=instance.host_port,
        container_port=CONTAINER_PORT,
        gpu_ids=[gpu.device_id for gpu in gpus],
        restart_max=settings.INSTANCE_MAX_RESTARTS,
        shm_size=settings.INSTANCE_SHM_SIZE,
    )
    return spec.with_hash_label()


def argument_problem(arg: str) -> str | None:
    """Why an extra ComfyUI argument is refused, or None."""
    if arg.startswith("-") and any(c.isspace() for c in arg.split("=", 1)[0]):
        return (f"'{arg}' holds a flag and its value in one item; give them as separate items "
                f"('{arg.split()[0]}', '{' '.join(arg.split()[1:])}').")
    flag = arg.split("=", 1)[0]
    # argparse also accepts unambiguous abbreviations (`--base` for `--base-directory`).
    reserved = flag.startswith("--") and len(flag) > 3 and any(name.startswith(flag) for name in RESERVED_ARGS)
    if reserved or (flag.startswith("--") and flag.endswith("-directory")):
        return (f"'{flag}' is set by ComfyHub to keep instances isolated (directories, listening address, port and "
                "GPUs come from the instance's settings); remove it.")
    return None


def environment_problem(key: str) -> str | None:
    if key in RESERVED_ENV:
        return f"'{key}' is set by ComfyHub from the instance's assigned GPUs; assign GPUs instead."
    if key.startswith(RESERVED_ENV_PREFIXES):
        return f"'{key}' is reserved: ComfyHub sets the COMFY_* variables of the storage contract itself."
    return None
