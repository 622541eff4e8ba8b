"""The one adapter to the Docker engine. Nothing else in ComfyHub imports `docker`.

Engine errors are translated into `EngineError` with a message that names the engine and says what to do.
A client is created per call site and process (never shared across fork()).
"""
from __future__ import annotations

import io
import re
import tarfile
import threading
import time
from dataclasses import dataclass

import docker
from django.conf import settings
from docker.errors import DockerException
from requests.exceptions import RequestException

DEFAULT_SOCKET = "unix:///var/run/docker.sock"


class EngineError(Exception):
    """Anything that went wrong talking to a Docker engine, in words a person can act on."""


class EngineUnavailable(EngineError):
    """The engine does not answer at all."""


def engine_address(base_url: str | None = None) -> str:
    return base_url or settings.DOCKER_HOST or DEFAULT_SOCKET


def unavailable_message(base_url: str | None = None, exc: Exception | None = None) -> str:
    detail = f" ({_short(exc)})" if exc else ""
    return (
        f"The Docker engine at {engine_address(base_url)} is unreachable{detail}. "
        "Start Docker on that host or fix DOCKER_HOST."
    )


def _short(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def client(base_url: str | None = None, *, timeout: float | None = None) -> docker.DockerClient:
    """A new client for the engine at `base_url` (default: DOCKER_HOST or the local socket)."""
    try:
        return docker.DockerClient(
            base_url=engine_address(base_url),
            timeout=timeout if timeout is not None else settings.DOCKER_TIMEOUT,
            version="auto",
        )
    except (DockerException, RequestException) as exc:
        raise EngineUnavailable(unavailable_message(base_url, exc)) from exc


@dataclass(frozen=True)
class EngineStatus:
    available: bool
    address: str
    version: str = ""
    api_version: str = ""
    error: str = ""


def engine_status(base_url: str | None = None) -> EngineStatus:
    """Ping the engine; never raises."""
    address = engine_address(base_url)
    try:
        engine = client(base_url, timeout=settings.DOCKER_PING_TIMEOUT)
        try:
            version = engine.version()
        finally:
            engine.close()
    except EngineError as exc:
        return EngineStatus(available=False, address=address, error=str(exc))
    except (DockerException, RequestException) as exc:
        return EngineStatus(available=False, address=address, error=unavailable_message(base_url, exc))
    return EngineStatus(
        available=True, address=address, version=version.get("Version", ""), api_version=version.get("ApiVersion", "")
    )


_status_cache: dict[str, tuple[float, EngineStatus]] = {}
_status_lock = threading.Lock()


def cached_engine_status(base_url: str | None = None) -> EngineStatus:
    """`engine_status`, remembered for DOCKER_STATUS_CACHE_SECONDS so every page can show it cheaply."""
    address = engine_address(base_url)
    now = time.monotonic()
    with _status_lock:
        hit = _status_cache.get(address)
        if hit and now - hit[0] < settings.DOCKER_STATUS_CACHE_SECONDS:
            return hit[1]
    status = engine_status(base_url)
    with _status_lock:
        _status_cache[address] = (time.monotonic(), status)
    return status


def forget_cached_status():
    with _status_lock:
        _status_cache.clear()


def require_engine(base_url: str | None = None) -> docker.DockerClient:
    """A client whose engine answered (negotiating the API version is the round trip that proves it), or
    EngineUnavailable with the engine's address."""
    return client(base_url)


# --- Containers ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ContainerState:
    """What ComfyHub needs to know about a container, read from `docker inspect`."""

    id: str
    name: str
    status: str  # created, running, restarting, exited, paused, dead
    exit_code: int
    restart_count: int
    oom_killed: bool
    error: str
    started_at: str
    finished_at: str
    labels: dict
    mounts: list  # [{"source", "destination", "rw"}]
    environment: dict
    host_ports: list  # [(host_ip, host_port)]
    device_ids: list  # GPU ids requested through device requests
    image: str

    @property
    def running(self):
        return self.status == "running"


def _state_from_attrs(attrs: dict) -> ContainerState:
    state = attrs.get("State", {})
    config = attrs.get("Config", {})
    host_config = attrs.get("HostConfig", {})
    env = dict(item.split("=", 1) if "=" in item else (item, "") for item in config.get("Env") or [])
    ports = []
    for bindings in (attrs.get("NetworkSettings", {}).get("Ports") or {}).values():
        for binding in bindings or []:
            ports.append((binding.get("HostIp", ""), int(binding.get("HostPort") or 0)))
    if not ports:  # a stopped container has no live bindings: read what it asks for
        for bindings in (host_config.get("PortBindings") or {}).values():
            for binding in bindings or []:
                ports.append((binding.get("HostIp", ""), int(binding.get("HostPort") or 0)))
    devices = []
    for request in host_config.get("DeviceRequests") or []:
        devices.extend(request.get("DeviceIDs") or [])
    return ContainerState(
        id=attrs.get("Id", ""),
        name=attrs.get("Name", "").lstrip("/"),
        status=state.get("Status", "unknown"),
        exit_code=int(state.get("ExitCode") or 0),
        restart_count=int(attrs.get("RestartCount") or 0),
        oom_killed=bool(state.get("OOMKilled")),
        error=state.get("Error") or "",
        started_at=state.get("StartedAt") or "",
        finished_at=state.get("FinishedAt") or "",
        labels=config.get("Labels") or {},
        mounts=[{"source": m.get("Source"), "destination": m.get("Destination"), "rw": bool(m.get("RW"))}
                for m in attrs.get("Mounts") or []],
        environment=env,
        host_ports=ports,
        device_ids=devices,
        image=config.get("Image", ""),
    )


class _translated:
    """Turns Docker SDK and transport errors into EngineError messages that say what failed and where."""

    def __init__(self, what: str, engine=None):
        self.what = what
        self.address = getattr(getattr(engine, "api", None), "base_url", None)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, EngineError):
            return False
        if isinstance(exc, docker.errors.ImageNotFound):
            raise EngineError(f"{self.what}: the image is not on this host ({exc.explanation or exc}).") from exc
        if isinstance(exc, docker.errors.APIError):
            raise EngineError(f"{self.what}: Docker said: {exc.explanation or exc}") from exc
        if isinstance(exc, (DockerException, RequestException, ConnectionError, OSError)):
            raise EngineUnavailable(f"{self.what}: {unavailable_message(None, exc)}") from exc
        return False


def container_state(engine, name: str) -> ContainerState | None:
    with _translated(f"Could not inspect container {name}", engine):
        try:
            return _state_from_attrs(engine.api.inspect_container(name))
        except docker.errors.NotFound:
            return None


def list_containers(engine, label: str | None = None) -> list[ContainerState]:
    """Every container on the engine (stopped ones too), or those carrying `label` ("key" or "key=value")."""
    with _translated("Could not list the engine's containers", engine):
        summaries = engine.api.containers(all=True, filters={"label": label} if label else None)
        states = []
        for summary in summaries:
            try:
                states.append(_state_from_attrs(engine.api.inspect_container(summary["Id"])))
            except docker.errors.NotFound:
                continue  # removed between list and inspect
        return states


def create_container(engine, spec) -> str:
    """Create (not start) the container `spec` describes; returns its id (one API call, no inspect after)."""
    host_config = engine.api.create_host_config(
        mounts=[docker.types.Mount(target=m.target, source=m.source, type="bind", read_only=m.read_only)
                for m in spec.mounts],
        port_bindings={spec.container_port: (spec.host_ip, spec.host_port)},
        restart_policy={"Name": spec.restart_policy, "MaximumRetryCount": spec.restart_max},
        security_opt=list(spec.security_opt),
        shm_size=spec.shm_size,
        init=spec.init,
        log_config=docker.types.LogConfig(type=spec.log_driver, config=dict(spec.log_options)),
        device_requests=[docker.types.DeviceRequest(device_ids=list(spec.gpu_ids), capabilities=[["gpu"]])]
        if spec.gpu_ids else None,
        network_mode=spec.network or None,
    )
    if spec.network:
        ensure_network(engine, spec.network, spec.network_labels, spec.network_options)
    with _translated(f"Could not create container {spec.name}", engine):
        # An empty command leaves the image's own (an image that reads ComfyUI's arguments from a variable).
        created = engine.api.create_container(
            image=spec.image, command=spec.command or None, name=spec.name, environment=spec.environment,
            labels=spec.labels, ports=[spec.container_port], host_config=host_config, detach=True,
            user=spec.user or None,
        )
        return created["Id"]


def start_container(engine, name: str):
    with _translated(f"Could not start container {name}", engine):
        engine.api.start(name)


def stop_container(engine, name: str, timeout: int = 30):
    with _translated(f"Could not stop container {name}", engine):
        try:
            engine.api.stop(name, timeout=timeout)
        except docker.errors.NotFound:
            pass


def remove_container(engine, name: str):
    with _translated(f"Could not remove container {name}", engine):
        try:
            engine.api.remove_container(name, force=True, v=False)
        except docker.errors.NotFound:
            pass


def container_logs(engine, name: str, tail: int = 500) -> str:
    with _translated(f"Could not read the logs of {name}", engine):
        try:
            raw = engine.api.logs(name, stdout=True, stderr=True, tail=tail, timestamps=False)
        except docker.errors.NotFound:
            return ""
        return raw.decode("utf-8", errors="replace")


# --- Images --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExecResult:
    exit_code: int  # -1 when it did not end within the deadline
    output: str  # stdout and stderr together, cut at max_output bytes: it comes from inside a hostile container
    timed_out: bool = False


def exec_in(engine, name: str, command: list[str], *, max_output: int = 65536, timeout: float = 30) -> ExecResult:
    """Run `command` inside the running container `name` as the container's own user (`docker exec`, no tty, no
    privileges). It runs in the container, with the container's rights, never on the host. Docker's exec has no time
    limit, so ComfyHub keeps its own: after `timeout` seconds it stops reading and returns (exit code -1);
    what the command goes on doing is the container's business."""
    deadline = time.monotonic() + timeout
    with _translated(f"Could not run a command in container {name}", engine):
        created = engine.api.exec_create(name, command, stdout=True, stderr=True, tty=False, privileged=False)
        raw = engine.api.exec_start(created["Id"], socket=True)
        try:
            chunks, timed_out = _read_exec_frames(getattr(raw, "_sock", raw), deadline, max_output)
        finally:
            raw.close()
        exit_code = None
        for _ in range(1 if timed_out else 20):  # the stream can end a moment before Docker records the exit
            state = engine.api.exec_inspect(created["Id"])
            if not state.get("Running"):
                exit_code = state.get("ExitCode")
                break
            time.sleep(0.05)
    output = b"".join(chunks).decode("utf-8", errors="replace")
    if timed_out or exit_code is None:
        return ExecResult(exit_code=-1, output=output, timed_out=timed_out)
    return ExecResult(exit_code=int(exit_code), output=output)


def _read_exec_frames(sock, deadline: float, max_output: int) -> tuple[list[bytes], bool]:
    """The payloads of Docker's multiplexed exec stream (8-byte headers: stream, 0, 0, 0, big-endian length), read
    until the command ends or the deadline passes (docker-py's own reader waits without a time limit). What passes
    `max_output` is read and dropped, so the command is not blocked writing."""
    chunks, size, pending = [], 0, b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return chunks, True
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return chunks, True
        if not data:
            return chunks, False
        pending += data
        while len(pending) >= 8 and len(pending) >= 8 + int.from_bytes(pending[4:8], "big"):
            end = 8 + int.from_bytes(pending[4:8], "big")
            payload, pending = pending[8:end], pending[end:]
            if size < max_output:
                chunks.append(payload[:max_output - size])
            size += len(payload)


def ensure_network(engine, name: str, labels: dict, options: dict | None = None) -> str:
    """A user-defined bridge network `name` with these driver `options`, created when missing; returns its id. An
    existing network of that name without ComfyHub's labels, or without those options, is refused, never used."""
    with _translated(f"Could not create network {name}", engine):
        found = _networks_named(engine, name)
        if not found:
            try:
                engine.api.create_network(name, driver="bridge", labels=labels, options=options or None,
                                          check_duplicate=True)
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # made meanwhile by another worker of this node: use it
                    raise
            found = _networks_named(engine, name)
        for network in found:
            _refuse_unless_ours(network, name, labels, options)
        # Docker's duplicate check is best effort: workers making it at once can make several of that name, and then
        # no container on it starts ("network ... is ambiguous"). Every caller keeps the same one (the lowest id) and
        # removes the others while they hold no container.
        keep, *extra = sorted(found, key=lambda network: network["Id"])
        for network in extra:
            try:
                if not engine.api.inspect_network(network["Id"]).get("Containers"):
                    engine.api.remove_network(network["Id"])
            except docker.errors.NotFound:
                pass  # another caller removed it
        return keep["Id"]


def _networks_named(engine, name: str) -> list[dict]:
    return [network for network in engine.api.networks(names=[name]) if network.get("Name") == name]


def _refuse_unless_ours(network: dict, name: str, labels: dict, options: dict | None) -> None:
    theirs = network.get("Labels") or {}
    if any(theirs.get(key) != value for key, value in labels.items()):
        raise EngineError(f"A Docker network named {name} exists and is not ComfyHub's (labels "
                          f"{theirs or 'none'}); rename or remove it.")
    found = network.get("Options") or {}
    if any(found.get(key) != value for key, value in (options or {}).items()):
        raise EngineError(f"The Docker network {name} lacks the options ComfyHub makes it with ({options}); remove it "
                          f"(docker network rm {name}, with its containers stopped) and ComfyHub makes it again.")


def network_members(engine, name: str) -> dict[str, list[str]] | None:
    """Container name -> its aliases on network `name`, or None when the network does not exist."""
    with _translated(f"Could not inspect network {name}", engine):
        try:
            attrs = engine.api.inspect_network(name)
        except docker.errors.NotFound:
            return None
        members = {}
        for container_id in (attrs.get("Containers") or {}):
            info = engine.api.inspect_container(container_id)
            endpoint = ((info.get("NetworkSettings") or {}).get("Networks") or {}).get(name) or {}
            members[info["Name"].lstrip("/")] = list(endpoint.get("Aliases") or [])
        return members


def connect_network(engine, name: str, container: str, aliases: list[str] | None = None):
    """Attach a container (created or running) to network `name`; attaching it twice is not an error."""
    with _translated(f"Could not connect container {container} to network {name}", engine):
        try:
            engine.api.connect_container_to_network(container, name, aliases=aliases or None)
        except docker.errors.APIError as exc:
            if "already exists" not in str(exc.explanation or exc):
                raise


def disconnect_network(engine, name: str, container: str):
    with _translated(f"Could not disconnect container {container} from network {name}", engine):
        try:
            engine.api.disconnect_container_from_network(container, name, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "is not connected" not in str(exc.explanation or exc):
                raise


def remove_network(engine, name: str):
    with _translated(f"Could not remove network {name}", engine):
        try:
            engine.api.remove_network(name)
        except docker.errors.NotFound:
            pass


def image_present(engine, image: str) -> bool:
    with _translated(f"Could not look up image {image}", engine):
        try:
            engine.api.inspect_image(image)
            return True
        except docker.errors.ImageNotFound:
            return False


def image_id(engine, image: str) -> str | None:
    """The id (sha256:...) of the image `image` names on this engine now, or None when it is not here."""
    with _translated(f"Could not look up image {image}", engine):
        try:
            return engine.api.inspect_image(image)["Id"]
        except docker.errors.ImageNotFound:
            return None


def pull_image(engine, image: str, on_progress=None):
    """Pull `image`, calling on_progress(percent, message) as layers download."""
    repository, tag = _split_image(image)
    layers: dict[str, tuple[int, int]] = {}
    try:
        for event in engine.api.pull(repository, tag=tag, stream=True, decode=True):
            if "error" in event:
                raise EngineError(_pull_error(image, event["error"]))
            detail = event.get("progressDetail") or {}
            if event.get("id") and detail.get("total"):
                layers[event["id"]] = (int(detail.get("current") or 0), int(detail["total"]))
            if on_progress and layers:
                done = sum(c for c, _ in layers.values())
                total = sum(t for _, t in layers.values())
                on_progress(100 * done / max(total, 1), f"{event.get('status', 'Pulling')} {image}")
    except EngineError:
        raise
    except docker.errors.APIError as exc:
        raise EngineError(_pull_error(image, exc.explanation or str(exc))) from exc
    except (DockerException, RequestException) as exc:
        raise EngineUnavailable(f"Could not pull {image}: {unavailable_message(None, exc)}") from exc


def _pull_error(image, reason):
    return (f"Could not pull image {image}: {reason}. If this host is offline, load the image another way "
            "(docker load, or build it here) and try again.")


def _split_image(image: str) -> tuple[str, str]:
    name, _, digest = image.partition("@")
    if digest:
        return name, digest
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repository, tag = name.rsplit(":", 1)
        return repository, tag
    return name, "latest"


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    output: str  # stdout and stderr together
    stdout: str


def run_container(engine, *, image: str, command: list[str], workdir: str, mounts: list[tuple[str, str]],
                  labels: dict, timeout: int = 600, user: str | None = None, network: bool = True,
                  read_only_mounts: list[tuple[str, str]] = (), environment: dict | None = None,
                  drop_capabilities: bool = False) -> RunResult:
    """Run `command` in a throw-away container of `image` (its entrypoint replaced) and return its exit code and
    output, whatever the code. `mounts` are (host path, container path) pairs mounted read-write,
    `read_only_mounts` read-only; `user` ("uid:gid") replaces the image's user; without `network` the container
    has none at all; `drop_capabilities` drops every Linux capability."""
    with _translated(f"Could not run {command[0]} in {image}", engine):
        container = engine.containers.create(
            image, entrypoint=[command[0]], command=command[1:], working_dir=workdir, labels=labels,
            mounts=[docker.types.Mount(target=target, source=source, type="bind") for source, target in mounts]
            + [docker.types.Mount(target=target, source=source, type="bind", read_only=True)
               for source, target in read_only_mounts],
            security_opt=["no-new-privileges"], detach=True, user=user or "", environment=environment or {},
            network_mode=None if network else "none",
            cap_drop=["ALL"] if drop_capabilities else None,
        )
        try:
            container.start()
            try:
                outcome = container.wait(timeout=timeout)
            except RequestException as exc:
                container.kill()
                raise EngineError(f"{command[0]} did not finish within {timeout} s.") from exc
            output = container.logs(stdout=True, stderr=True).decode("utf-8", errors="replace")
            stdout = container.logs(stdout=True, stderr=False).decode("utf-8", errors="replace")
        finally:
            container.remove(force=True)
    return RunResult(exit_code=int(outcome.get("StatusCode", 1)), output=output, stdout=stdout)


def run_once(engine, *, image: str, command: list[str], workdir: str, mounts: list[tuple[str, str]], labels: dict,
             timeout: int = 600, **options) -> str:
    """Run `command` in a throw-away container (see `run_container` for the options); return its output, or raise
    EngineError with the last lines when it fails."""
    result = run_container(engine, image=image, command=command, workdir=workdir, mounts=mounts, labels=labels,
                           timeout=timeout, **options)
    if result.exit_code != 0:
        tail = "\n".join(result.output.strip().splitlines()[-8:])
        raise EngineError(f"{' '.join(command[:4])} exited with code {result.exit_code}:\n{tail}")
    return result.output


# --- Building images and reading what they hold (instances/images.py) -----------------------------------------

@dataclass(frozen=True)
class ImageDetails:
    """What `docker image inspect` says about an image, as instances/images.py needs it."""

    id: str
    tags: list
    size: int  # bytes
    created: str  # ISO 8601, as the engine writes it
    labels: dict


def image_details(engine, image: str) -> ImageDetails | None:
    """The image `image` names on this engine, or None when it is not here (one inspect)."""
    with _translated(f"Could not look up image {image}", engine):
        try:
            attrs = engine.api.inspect_image(image)
        except docker.errors.ImageNotFound:
            return None
    return ImageDetails(id=attrs.get("Id", ""), tags=list(attrs.get("RepoTags") or []),
                        size=int(attrs.get("Size") or 0), created=attrs.get("Created") or "",
                        labels=dict((attrs.get("Config") or {}).get("Labels") or {}))


def build_image(engine, *, context, tag: str | None = None, build_args: dict | None = None,
                labels: dict | None = None, on_line=None, timeout: float | None = None, name: str = "") -> str:
    """Build an image with the classic builder from `context` (an open file holding a tar of the build context,
    Dockerfile at its top), calling on_line(text) for each line of the build's log as it comes. Returns the new
    image's id; a failed build raises EngineError with the builder's own message and the last lines of its log.
    `tag`: the tag it gets (none: untagged); `name`: what messages call it (default the tag); `timeout`: seconds the
    engine may stay silent (a pip install of torch prints nothing for minutes)."""
    tail: list[str] = []
    image = None
    pending = ""
    name = name or tag or "the image"

    def emit(text):
        text = _TERMINAL_CODES.sub("", text)
        if text.startswith("Step "):
            tail.clear()  # a failure shows the step that failed and what it printed
        if text.strip() and not _BUILDER_CHATTER.match(text):
            tail.append(text)
            del tail[:-BUILD_ERROR_LINES]
        if on_line is not None:
            on_line(text)

    what = f"Could not build {name}"
    try:
        stream = engine.api.build(
            fileobj=context, custom_context=True, tag=tag, buildargs=build_args or {}, labels=labels or {},
            rm=True, forcerm=True, pull=False, decode=True, timeout=timeout or settings.DOCKER_TIMEOUT,
        )
        for event in stream:
            if "error" in event:
                if pending:
                    emit(pending)
                reason = (event.get("errorDetail") or {}).get("message") or event["error"]
                raise EngineError(_build_failure(name, str(reason).strip(), tail))
            if "stream" in event:
                pending += event["stream"]
                *lines, pending = pending.split("\n")
                for line in lines:
                    emit(line.rstrip("\r"))
            if (event.get("aux") or {}).get("ID"):
                image = event["aux"]["ID"]
        if pending:
            emit(pending)
    except EngineError:
        raise
    except docker.errors.APIError as exc:
        raise EngineError(_build_failure(name, exc.explanation or str(exc), tail)) from exc
    except (DockerException, RequestException, OSError) as exc:
        raise EngineUnavailable(f"{what}: {unavailable_message(None, exc)}") from exc
    if image is None:  # an engine without the aux message: "Successfully built 0123456789ab"
        built = [line.split()[-1] for line in tail if line.startswith("Successfully built ")]
        if not built:
            raise EngineError(_build_failure(name, "the engine did not say which image it built", tail))
        image = image_id(engine, built[-1])
    return image


BUILD_ERROR_LINES = 20
# Colour codes around a RUN's stderr, and the builder's own bookkeeping lines (left out of a failure's last lines).
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BUILDER_CHATTER = re.compile(r"^\s*(---> |Removing intermediate container |Running in )")


def _build_failure(name, reason, tail) -> str:
    lines = "\n".join(tail)
    return f"Building {name} failed: {reason}" + (f"\nThe build's last lines:\n{lines}" if lines else "")


def tag_image(engine, image: str, tag: str):
    """Make `tag` name `image` (an id or another tag) on this engine."""
    repository, name = _split_image(tag)
    with _translated(f"Could not tag {image} as {tag}", engine):
        engine.api.tag(image, repository, name, force=True)


def read_image_file(engine, image: str, path: str, *, labels: dict, max_bytes: int = 65536) -> bytes | None:
    """The contents of the regular file `path` inside `image`, copied out of a container that is created, never
    started, and removed at once; None when the image has no regular file there (a link is not followed) or it is
    larger than `max_bytes`."""
    with _translated(f"Could not read {path} from image {image}", engine):
        container = engine.api.create_container(image=image, entrypoint=["/comfyhub-never-started"], command=[],
                                                labels=labels, network_disabled=True, detach=True)
        try:
            try:
                stream, _ = engine.api.get_archive(container["Id"], path)
            except docker.errors.NotFound:
                return None
            data = bytearray()
            for chunk in stream:
                data += chunk
                if len(data) > max_bytes + 10240:  # the tar wraps the file in 512-byte headers and padding
                    return None
        finally:
            engine.api.remove_container(container["Id"], force=True, v=True)
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as archive:
        member = next(iter(archive.getmembers()), None)
        if member is None or not member.isreg() or member.size > max_bytes:
            return None
        return archive.extractfile(member).read()


def container_image_id(engine, name: str) -> str | None:
    """The id (sha256:...) of the image the container `name` was made from, or None when there is no such container."""
    with _translated(f"Could not inspect container {name}", engine):
        try:
            return engine.api.inspect_container(name).get("Image") or None
        except docker.errors.NotFound:
            return None
