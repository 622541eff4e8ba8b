"""The runtime contract between ComfyHub and a ComfyUI container, in one module (documented in
docs/runtime-contract.md): the user it runs as, mounts, arguments (and how the image takes them), environment,
labels, ports, GPUs, restart policy, init, log rotation and hardening."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field

from django.conf import settings
from django.core.exceptions import ValidationError

from storage_app import layout

from . import comfyui_flags

CONTAINER_PORT = 8188
LABEL_MANAGED = "comfyhub.managed"
LABEL_INSTANCE = "comfyhub.instance"
LABEL_NODE = "comfyhub.node"
LABEL_CONFIG = "comfyhub.config-hash"
# The id (sha256:...) of the image the container was made from: a tag rebuilt or re-pulled since names another one.
LABEL_IMAGE_ID = "comfyhub.image-id"
# The cluster (instances/clusters.py) a network belongs to.
LABEL_CLUSTER = "comfyhub.cluster"
# Which of ComfyHub's networks a network is: "instances" (the node's own bridge for every instance) or a cluster's.
LABEL_NETWORK = "comfyhub.network"
# Every instance's container is on its node's bridge of ComfyHub's own, where containers cannot reach each other
# (inter-container communication off): code in one instance cannot call another's ComfyUI, which has no login,
# behind the hub's back. Clusters' networks are the only deliberate path between containers.
INSTANCES_NETWORK_OPTIONS = {"com.docker.network.bridge.enable_icc": "false"}
# What a cluster member's ComfyUI allows cross-origin requests from: set by ComfyHub, last, so it wins over any other.
CORS_FLAG = "--enable-cors-header"
# Docker restarts a crashed ComfyUI, backing off, at most INSTANCE_MAX_RESTARTS times, then gives up (crash-looping).
RESTART_POLICY = "on-failure"
# ComfyUI logs every request: rotated, 3 files of 20 MB at most.
LOG_DRIVER = "json-file"
LOG_OPTIONS = {"max-size": "20m", "max-file": "3"}

# Arguments ComfyHub sets itself: an instance's extra arguments may not touch them (they would break isolation),
# nor any abbreviation ComfyUI's parser would read as one of them (argparse's allow_abbrev: `--i` is
# --input-directory).
RESERVED_ARGS = ("--base-directory", "--extra-model-paths-config", "--listen", "--port", "--cuda-device",
                 "--models-directory", "--input-directory", "--output-directory", "--temp-directory",
                 "--user-directory", "--default-device")
# Environment variables ComfyHub sets, or that choose the GPUs and the code every process in the container loads.
# Compared without regard to case.
RESERVED_ENV = ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "PUID", "PGID")
# The container runs as PUID:PGID, which the image may not know (no passwd entry: HOME would be /): its home, caches
# and the packages custom nodes install (pip --user) live in the instance's own folder. Not overridable: another
# HOME or PYTHONUSERBASE would put them where the user cannot write, or hide the node packages from ComfyUI.
CONTAINER_HOME = "/instance/home"
CONTAINER_PACKAGES = "/instance/python-packages"
HOME_ENV = {
    "HOME": CONTAINER_HOME,
    "XDG_CACHE_HOME": f"{CONTAINER_HOME}/.cache",
    "PYTHONUSERBASE": CONTAINER_PACKAGES,
}
_GPU_VARIABLES = ("is set by ComfyHub from the instance's assigned GPUs (every NVIDIA_* and CUDA_* name is reserved, "
                  "in any case); assign GPUs instead")
RESERVED_ENV_PREFIXES = {
    "COMFY_": "is reserved: ComfyHub sets the COMFY_* variables of the storage contract itself (in any case); "
              "remove it",
    "NVIDIA_": _GPU_VARIABLES,
    "CUDA_": _GPU_VARIABLES,
    "LD_": "is refused: LD_* variables (LD_PRELOAD, LD_LIBRARY_PATH, ...) change the code every program in the "
           "container loads; put libraries into the image instead",
}
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# How the image takes ComfyUI's arguments (Instance.image_arguments): as the container's command (its entrypoint
# runs main.py "$@": ComfyHub's image, most images), or in an environment variable its entrypoint splits on
# whitespace ("env:CLI_ARGS", as images whose entrypoint runs `main.py $CLI_ARGS` do).
ARGUMENTS_COMMAND = "command"
ARGUMENTS_ENV_PREFIX = "env:"
ARGUMENTS_ENV_DEFAULT = "CLI_ARGS"
ARGUMENTS_MAX_LENGTH = 80


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
    restart_policy: str
    restart_max: int
    shm_size: str
    log_driver: str
    log_options: dict[str, str]
    init: bool = True  # a tiny init as PID 1 forwards signals and reaps the zombies custom nodes leave behind
    security_opt: list[str] = field(default_factory=lambda: ["no-new-privileges"])
    # What `image` names on the node now; "" when not known (then the hash is the one made before image ids counted).
    image_id: str = ""
    # "uid:gid" the container runs as (PUID:PGID), never root: the files it writes in /instance belong to it.
    user: str = ""
    # The network it is created on (runtime.instances_network), made with these labels and options when missing;
    # "" is Docker's default bridge.
    network: str = ""
    network_labels: dict[str, str] = field(default_factory=dict)
    network_options: dict[str, str] = field(default_factory=dict)

    @property
    def config_hash(self) -> str:
        data = asdict(self)
        data["labels"] = {k: v for k, v in self.labels.items() if k != LABEL_CONFIG}
        if not self.image_id:
            del data["image_id"]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def with_hash_label(self) -> "ContainerSpec":
        return ContainerSpec(**{**asdict(self), "mounts": self.mounts,
                                "labels": {**self.labels, LABEL_CONFIG: self.config_hash}})


def arguments_variable(image_arguments: str) -> str | None:
    """The environment variable the image reads ComfyUI's arguments from ("env:NAME"), or None when they are the
    container's command."""
    if isinstance(image_arguments, str) and image_arguments.startswith(ARGUMENTS_ENV_PREFIX):
        return image_arguments[len(ARGUMENTS_ENV_PREFIX):]
    return None


def image_arguments_problem(image_arguments) -> str | None:
    """Why `image_arguments` cannot say how an image takes ComfyUI's arguments, or None."""
    if image_arguments == ARGUMENTS_COMMAND:
        return None
    name = arguments_variable(image_arguments)
    if name is None:
        return (f"{json.dumps(image_arguments)} is not a way to pass ComfyUI's arguments: use 'command' (as the "
                f"container's command) or 'env:NAME' (in the environment variable NAME, e.g. "
                f"'env:{ARGUMENTS_ENV_DEFAULT}').")
    if not ENV_KEY_RE.fullmatch(name) or len(image_arguments) > ARGUMENTS_MAX_LENGTH:
        return (f"{json.dumps(name)} is not a variable name for ComfyUI's arguments: use letters A-Z, digits and '_', "
                f"not starting with a digit, e.g. {ARGUMENTS_ENV_DEFAULT}.")
    if name.upper() == "PYTHONPATH" or (problem := environment_problem(name)):
        return (f"'{name}' cannot carry ComfyUI's arguments: ComfyHub sets or refuses that variable itself. "
                f"Name the variable the image reads them from, e.g. {ARGUMENTS_ENV_DEFAULT}.")
    return None


def env_argument_problem(arg, variable: str) -> str | None:
    """Why `arg` cannot travel in the variable `variable` (the image splits it on whitespace), or None."""
    if not isinstance(arg, str):
        return None  # argument_problem names it
    if arg == "":
        return (f"An empty argument cannot travel in ${variable}: the image splits it at spaces, so it would vanish. "
                "Remove it, or use an image that takes the arguments as its command.")
    if any(c.isspace() for c in arg):
        return (f"{json.dumps(arg)} holds whitespace, but this image reads ComfyUI's arguments from ${variable}, "
                "which it splits at every space: it would become other arguments. Give values without spaces, or "
                "use an image that takes the arguments as its command.")
    return None


def image_arguments_problems(image_arguments, extra_args, extra_env) -> dict[str, list[str]]:
    """The refusals, by field (image_arguments, extra_args, extra_env), of how an instance passes ComfyUI's
    arguments together with its extra arguments and environment; {} when they fit together."""
    if problem := image_arguments_problem(image_arguments):
        return {"image_arguments": [problem]}
    variable = arguments_variable(image_arguments)
    if variable is None:
        return {}
    errors: dict[str, list[str]] = {}
    for arg in extra_args or []:
        if problem := env_argument_problem(arg, variable):
            errors.setdefault("extra_args", []).append(problem)
    if any(str(key).upper() == variable.upper() for key in (extra_env or {})):
        errors.setdefault("extra_env", []).append(
            f"'{variable}' carries ComfyUI's arguments (ComfyHub writes them into it); remove it, and put extra "
            "arguments among the extra arguments.")
    return errors


def arguments_hint(instance) -> str:
    """What to check when ComfyUI did not come up: the image may take its arguments the other way (a start's
    failure message ends with this)."""
    variable = arguments_variable(instance.image_arguments)
    if variable is None:
        return (f"If the image {instance.image} reads ComfyUI's arguments from an environment variable (an "
                "entrypoint running main.py $CLI_ARGS), it got none: set the instance's \"How the image takes "
                "ComfyUI's arguments\" to that variable (instances create --arguments-env CLI_ARGS).")
    return (f"ComfyUI's arguments went into ${variable} only (\"How the image takes ComfyUI's arguments\"); if the "
            f"image {instance.image} takes them as its command, set that to \"As the container's command\".")


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
    args += [str(arg) for arg in instance.extra_args]
    if (origin := cors_origin(instance)) is not None:
        # After the instance's own arguments: argparse keeps the last value, so nothing set before can change it.
        args += [CORS_FLAG, origin]
    return args


def _cluster_role(instance):
    """(cluster, "master" | "worker") for a cluster member, else None (from the model's reverse relations; the rules
    about clusters live in instances/clusters.py)."""
    from django.core.exceptions import ObjectDoesNotExist

    try:
        return instance.cluster_as_master, "master"
    except (ObjectDoesNotExist, AttributeError):
        pass
    try:
        return instance.cluster_membership.cluster, "worker"
    except (ObjectDoesNotExist, AttributeError):
        return None


def cors_origin(instance) -> str | None:
    """The origin a cluster member's ComfyUI allows (--enable-cors-header): the cluster's, else the hub's
    (HUB_ORIGIN). None for an instance in no cluster."""
    found = _cluster_role(instance)
    if found is None:
        return None
    return found[0].cors_origin or settings.HUB_ORIGIN


def instances_network(node_name: str) -> tuple[str, dict[str, str]]:
    """(name, labels) of the node's network every instance's container is created on (INSTANCES_NETWORK_OPTIONS)."""
    return (f"{settings.CONTAINER_NAME_PREFIX}instances",
            {LABEL_MANAGED: "true", LABEL_NODE: node_name, **settings.CONTAINER_EXTRA_LABELS,
             LABEL_NETWORK: "instances"})


def cluster_network_name(cluster_name: str) -> str:
    return f"{settings.CONTAINER_NAME_PREFIX}cluster-{cluster_name}"


def network_labels(cluster_name: str, node_name: str) -> dict[str, str]:
    """A cluster's network carries the labels of ComfyHub's containers (extra labels included) and its cluster's."""
    return {LABEL_MANAGED: "true", LABEL_NODE: node_name, **settings.CONTAINER_EXTRA_LABELS,
            LABEL_CLUSTER: cluster_name}


def cluster_network(instance) -> tuple[str, dict[str, str], list[str]] | None:
    """(network name, its labels, the aliases the container gets there) when `instance`'s container joins its
    cluster's network on its node: a worker on its master's node, a master with a worker on its node. Members on one
    node reach each other there by container name (the alias adds the bare instance id). None otherwise."""
    found = _cluster_role(instance)
    if found is None:
        return None
    cluster, role = found
    if role == "worker":
        shares_node = cluster.master.node_id == instance.node_id
    else:
        shares_node = cluster.workers.filter(instance__node_id=instance.node_id).exists()
    if not shares_node:
        return None
    return (cluster_network_name(cluster.name), network_labels(cluster.name, instance.node.name),
            [instance.container_name, instance.instance_id])


def mounts(instance) -> list[Mount]:
    """The shared tree read-only, the instance's own folder read-write, and the node's model cache read-only when it
    has one (only then: an instance on a node without a cache keeps the mounts, and so the configuration hash, it
    had before caches existed)."""
    found = [
        Mount(str(layout.shared_root(instance.node)), layout.CONTAINER_SHARED, read_only=True),
        Mount(str(layout.instance_dir(instance.instance_id, instance.node)), layout.CONTAINER_INSTANCE,
              read_only=False),
    ]
    if (cache := layout.model_cache_root(instance.node)) is not None:
        found.append(Mount(str(cache), layout.CONTAINER_MODEL_CACHE, read_only=True))
    return found


def container_spec(instance, image_id: str = "", gpus=None) -> ContainerSpec:
    """Everything Docker needs to run `instance`; its hash decides whether a container must be recreated.

    `image_id` is the id the instance's image reference names on its node now (docker_engine.image_id): with it, a
    tag rebuilt or re-pulled since the container was made gives another hash, so the next start recreates it."""
    if gpus is None:  # else: the GPUs it would hold (idle stop gave its own back)
        gpus = instance.assigned_gpus()
    environment = {str(k): str(v) for k, v in instance.extra_env.items()}
    # Python packages that custom nodes require live in the instance's own folder (see customnodes.py): installed
    # with pip --user under PYTHONUSERBASE, or (before) with --target straight into it, which PYTHONPATH keeps.
    environment["PYTHONPATH"] = ":".join(filter(None, [CONTAINER_PACKAGES, environment.get("PYTHONPATH", "")]))
    environment.update(
        {
            "COMFY_INSTANCE_ID": instance.instance_id,
            "COMFY_SHARED_DIRECTORY": layout.CONTAINER_SHARED,
            "COMFY_BASE_DIRECTORY": layout.CONTAINER_INSTANCE,
            "PUID": str(settings.PUID),
            "PGID": str(settings.PGID),
            **HOME_ENV,
        }
    )
    command = comfyui_arguments(instance, gpus)
    variable = arguments_variable(instance.image_arguments)
    if variable is not None:
        # The image's entrypoint reads them from the variable; its own command (CMD) is left as it is.
        environment[variable] = " ".join(command)
        command = []
    if gpus:
        # CUDA numbers the visible GPUs fastest first by default; in bus order, cuda:N inside is the N-th assigned GPU
        # by host index (the device ids below are in that order), which the instance page's map shows.
        environment["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
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
    if image_id:
        labels[LABEL_IMAGE_ID] = image_id
    network, network_labels = instances_network(instance.node.name)
    spec = ContainerSpec(
        name=instance.container_name,
        image=instance.image,
        command=command,
        environment=environment,
        labels=labels,
        mounts=mounts(instance),
        host_ip=instance.node.bind_address,
        host_port=instance.host_port,
        container_port=CONTAINER_PORT,
        gpu_ids=[gpu.device_id for gpu in gpus],
        restart_policy=RESTART_POLICY,
        restart_max=settings.INSTANCE_MAX_RESTARTS,
        shm_size=settings.INSTANCE_SHM_SIZE,
        log_driver=LOG_DRIVER,
        log_options=dict(LOG_OPTIONS),
        image_id=image_id,
        user=f"{settings.PUID}:{settings.PGID}",
        network=network,
        network_labels=network_labels,
        network_options=dict(INSTANCES_NETWORK_OPTIONS),
    )
    return spec.with_hash_label()


def comfyui_reads_as(arg: str) -> list[str]:
    """The option strings ComfyUI's parser could take `arg` for, following argparse (Python 3.11-3.13,
    `_parse_optional` and `_get_option_tuples` with allow_abbrev=True): an exact option string, or the option part
    before '=', wins; otherwise a `--prefix` stands for every option string it begins (argparse accepts it when
    there is exactly one and refuses it as ambiguous otherwise). A single dash never reaches a `--` option. []
    for a value."""
    options = set(comfyui_flags.OPTION_STRINGS) | set(RESERVED_ARGS)
    if len(arg) < 2 or arg[0] not in comfyui_flags.PREFIX_CHARS or arg == "--":  # '--' ends the options
        return []
    if arg in options:
        return [arg]
    option, _, _ = arg.partition("=")
    if option in options:
        return [option]
    if arg[1] not in comfyui_flags.PREFIX_CHARS or not comfyui_flags.ALLOW_ABBREV:
        return []
    return sorted(name for name in options if name.startswith(option))


def argument_problem(arg: str) -> str | None:
    """Why an extra ComfyUI argument is refused, or None."""
    if not isinstance(arg, str):
        return f"{json.dumps(arg)} is not an argument; give each argument as a string."
    if "\0" in arg:
        return f"{arg!r} holds a NUL character, which no program argument can carry; remove it."
    if arg == "--":
        return ("'--' would end ComfyUI's options: every argument after it, ComfyHub's own included, would be taken as "
                "a file name and ComfyUI would not start; remove it.")
    if arg.startswith("-") and any(c.isspace() for c in arg.split("=", 1)[0]):
        return (f"'{arg}' holds a flag and its value in one item; give them as separate items "
                f"('{arg.split()[0]}', '{' '.join(arg.split()[1:])}').")
    flag = arg.split("=", 1)[0]
    reserved = [name for name in comfyui_reads_as(arg) if name in RESERVED_ARGS]
    # A prefix of a reserved flag is refused even where today's flag list makes it ambiguous: another ComfyUI
    # version, with fewer flags, would read it as the reserved one.
    if not reserved and flag.startswith("--") and len(flag) > 2:
        reserved = [name for name in RESERVED_ARGS if name.startswith(flag)]
    if reserved or (flag.startswith("--") and flag.endswith("-directory")):
        read_as = f": ComfyUI takes it for {' or '.join(reserved)}" if reserved and reserved != [flag] else ""
        return (f"'{flag}' is set by ComfyHub to keep instances isolated{read_as} (directories, listening address, "
                "port and GPUs come from the instance's settings); remove it.")
    return None


def environment_problem(key: str, value="") -> str | None:
    """Why an extra environment variable is refused, or None."""
    if not isinstance(key, str) or not ENV_KEY_RE.fullmatch(key):
        return (f"{json.dumps(key)} is not a variable name: use letters A-Z, digits and '_', not starting with a "
                "digit.")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"The value of '{key}' must be text (or a number), not {json.dumps(value)}."
    if "\0" in str(value):
        return f"The value of '{key}' holds a NUL character, which no environment variable can carry; remove it."
    upper = key.upper()
    if upper in RESERVED_ENV:
        return (f"'{key}' is reserved: ComfyHub sets it from the instance's settings (GPUs, owner of its files); "
                "remove it.")
    if upper in HOME_ENV:
        return (f"'{key}' is reserved: ComfyHub sets HOME, XDG_CACHE_HOME and PYTHONUSERBASE to the instance's own "
                f"folder ({CONTAINER_HOME}, {CONTAINER_PACKAGES}), the only place the container's user (PUID) can "
                "write its caches and the packages custom nodes install; remove it.")
    for prefix, why in RESERVED_ENV_PREFIXES.items():
        if upper.startswith(prefix):
            return f"'{key}' {why}."
    return None


# --- Images ------------------------------------------------------------------------------------------------
# The grammar of a Docker image reference (github.com/distribution/reference, regexp.go):
#   [DOMAIN[:PORT]/]PATH[:TAG][@DIGEST]
_ALNUM = r"[a-z0-9]+"
_PATH_COMPONENT = rf"{_ALNUM}(?:(?:[._]|__|-+){_ALNUM})*"
_PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
NAME_MAX = 255
IMAGE_EXAMPLE = "Give an image name such as 'repository/comfyui:tag' (no spaces)"


def image_reference_problem(image: str) -> str | None:
    """Why `image` is not a Docker image reference, or None."""
    if not isinstance(image, str) or not image:
        return f"{IMAGE_EXAMPLE}."
    if any(c.isspace() for c in image) or "\0" in image:
        return f"{IMAGE_EXAMPLE}; got {image!r}."
    rest, at, digest = image.partition("@")
    problem = None
    if at and not _DIGEST_RE.fullmatch(digest):
        problem = f"'{digest}' is not a digest (ALGORITHM:HEX, e.g. sha256: and 64 hexadecimal digits)"
    name, tag = rest, ""
    if ":" in rest.rsplit("/", 1)[-1]:
        name, _, tag = rest.rpartition(":")
        if not _TAG_RE.fullmatch(tag):
            problem = problem or (f"'{tag}' is not a tag (letters, digits, '_', '.' and '-', at most 128, not "
                                  "starting with '.' or '-')")
    first, slash, path = name.partition("/")
    # Docker's rule: the first component names a registry only when it holds '.' or ':' or is localhost.
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _DOMAIN_RE.fullmatch(first):
            problem = problem or f"'{first}' is not a registry host[:port]"
    else:
        path = name
    if not problem and not _PATH_RE.fullmatch(path):
        problem = (f"the repository path '{path}' must be lowercase letters and digits, separated by '/', '.', '_', "
                   "'__' or '-'")
        if _PATH_RE.fullmatch(path.lower()):
            problem += f" (try '{image.replace(path, path.lower(), 1)}')"
    if not problem and len(name) > NAME_MAX:
        problem = f"the name is longer than {NAME_MAX} characters"
    if problem:
        return (f"'{image}' is not a Docker image reference: {problem}. Write it as "
                "[REGISTRY[:PORT]/]PATH[:TAG][@DIGEST], e.g. 'ghcr.io/comfyhub/comfyui:latest'.")
    return None


def image_allowed_problem(image: str) -> str | None:
    """Why `image` may not run here (INSTANCE_IMAGES_ALLOWED), or None."""
    patterns = list(settings.INSTANCE_IMAGES_ALLOWED)
    if any(fnmatch.fnmatchcase(image, pattern) for pattern in patterns):
        return None
    allowed = ", ".join(f"'{pattern}'" for pattern in patterns) or "none"
    return (f"Image '{image}' is not allowed on this ComfyHub: INSTANCE_IMAGES_ALLOWED permits {allowed}. Pick an "
            "image that matches, or have the administrator add a pattern to INSTANCE_IMAGES_ALLOWED.")


def image_problem(image: str) -> str | None:
    """Why an instance may not run `image`: not a reference, or not allowed. None when it may."""
    return image_reference_problem(image) or image_allowed_problem(image)


def checked_config(extra_args, extra_env) -> tuple[list, dict]:
    """Extra arguments as a list and the environment as a dict (numbers become text), or ValidationError: the
    admin and the CLI's JSON hand over whatever was typed, and list('abc') or dict([...]) would silently make
    something else of it."""
    errors: dict[str, list[str]] = {}
    args, env = [], {}
    if isinstance(extra_args, (list, tuple)):
        args = [_as_text(arg) for arg in extra_args]
    elif extra_args not in (None, ""):
        errors["extra_args"] = ['Extra arguments are a list of strings, e.g. ["--preview-method", "auto"].']
    if isinstance(extra_env, dict):
        env = {key: _as_text(value) for key, value in extra_env.items()}
    elif extra_env not in (None, ""):
        errors["extra_env"] = ['The extra environment is an object of names and values, e.g. {"TEAM": "art"}.']
    if errors:
        raise ValidationError(errors)
    return args, env


def _as_text(value):
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
