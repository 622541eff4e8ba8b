"""The one adapter to the Docker engine. Nothing else in ComfyHub imports `docker`.

Engine errors are translated into `EngineError` with a message that names the engine and says what to do.
A client is created per call site and process (never shared across fork()).
"""
from __future__ import annotations

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
    """A client whose engine answered a ping, or EngineUnavailable with the engine's address."""
    engine = client(base_url)
    try:
        engine.ping()
    except (DockerException, RequestException) as exc:
        engine.close()
        raise EngineUnavailable(unavailable_message(base_url, exc)) from exc
    return engine
