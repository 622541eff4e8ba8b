"""The one client for ComfyUI's HTTP API: the routes ComfyHub reads from a running instance (/system_stats, /queue,
/object_info, /models/<folder>), with their timeouts and size limits in one place. Failures are `ComfyUIError`."""
from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import dataclass
from urllib.parse import quote

import requests
import urllib3
from django.conf import settings

# Seconds to wait for an answer; /system_stats and /queue use INSTANCE_HEALTH_TIMEOUT (the health probe's setting).
CONNECT_TIMEOUT = 3.0
OBJECT_INFO_TIMEOUT = 10.0
MODELS_TIMEOUT = 5.0
# The most bytes read from one answer: an instance runs code ComfyHub does not trust, and its answer is parsed whole.
SYSTEM_STATS_MAX_BYTES = 1 << 20
OBJECT_INFO_MAX_BYTES = 64 << 20
MODELS_MAX_BYTES = 16 << 20
# Each queued item carries its whole prompt (and often the workflow it came from): a long queue is megabytes.
QUEUE_MAX_BYTES = 16 << 20
_CHUNK = 64 << 10


class ComfyUIError(Exception):
    """ComfyUI did not answer, or answered something ComfyHub cannot use; the message says what and where.
    `status_code` is the HTTP status when it answered one other than 200, else None."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


def probe_host(instance) -> str:
    """The address ComfyHub reaches `instance` on: its node's bind address, or loopback for a wildcard one."""
    host = instance.node.bind_address
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def base_url(host: str, port: int) -> str:
    """http://HOST:PORT, with an IPv6 literal in brackets (and a zone id's '%' escaped, RFC 6874)."""
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return f"http://{host}:{port}"
    if literal.version == 6:
        return f"http://[{str(literal).replace('%', '%25')}]:{port}"
    return f"http://{literal}:{port}"


@dataclass(frozen=True)
class Queue:
    """How many prompts ComfyUI is running and how many wait."""

    running: int
    pending: int

    @property
    def empty(self) -> bool:
        return self.running == 0 and self.pending == 0


@dataclass(frozen=True)
class ComfyUI:
    """One ComfyUI server, at `host`:`port`."""

    host: str
    port: int

    @classmethod
    def of(cls, instance) -> "ComfyUI":
        return cls(probe_host(instance), instance.host_port)

    @property
    def url(self) -> str:
        return base_url(self.host, self.port)

    def system_stats(self, timeout: float | None = None) -> dict:
        return self._get_json("/system_stats", dict, timeout=timeout or settings.INSTANCE_HEALTH_TIMEOUT,
                              max_bytes=SYSTEM_STATS_MAX_BYTES)

    def queue(self, timeout: float | None = None) -> Queue:
        """What /queue lists: the prompts running now and those waiting."""
        data = self._get_json("/queue", dict, timeout=timeout or settings.INSTANCE_HEALTH_TIMEOUT,
                              max_bytes=QUEUE_MAX_BYTES)
        running, pending = data.get("queue_running"), data.get("queue_pending")
        if not isinstance(running, list) or not isinstance(pending, list):
            raise ComfyUIError(f"ComfyUI at {self.url} answered GET /queue without the lists queue_running and "
                               "queue_pending.")
        return Queue(running=len(running), pending=len(pending))

    def object_info(self) -> dict:
        """Every node class the server offers, by class name."""
        return self._get_json("/object_info", dict, timeout=OBJECT_INFO_TIMEOUT, max_bytes=OBJECT_INFO_MAX_BYTES)

    def models(self, folder: str) -> list[str]:
        """The files ComfyUI lists in model folder `folder`; ComfyUIError with status_code 404 when it has no such
        folder."""
        path = f"/models/{quote(folder, safe='')}"
        names = self._get_json(path, list, timeout=MODELS_TIMEOUT, max_bytes=MODELS_MAX_BYTES)
        if not all(isinstance(name, str) for name in names):
            raise ComfyUIError(f"ComfyUI at {self.url} answered GET {path} with something other than a list of file "
                               "names.")
        return names

    def _get_json(self, path: str, kind: type, *, timeout: float, max_bytes: int):
        where = f"ComfyUI at {self.url}"
        body = self._get(path, timeout=timeout, max_bytes=max_bytes)
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ComfyUIError(f"{where} answered GET {path} with something that is not JSON ({exc}).") from exc
        if not isinstance(data, kind):
            raise ComfyUIError(f"{where} answered GET {path} with a JSON {type(data).__name__}, not a "
                               f"{'JSON object' if kind is dict else 'list'}.")
        return data

    def _get(self, path: str, *, timeout: float, max_bytes: int) -> bytes:
        where = f"ComfyUI at {self.url}"
        too_slow = f"{where} did not answer GET {path} within {timeout:g} s; check that the instance runs and its logs."
        deadline = time.monotonic() + timeout
        # Instances are reached directly: no proxy or .netrc from the environment, and no redirect (an instance's
        # code must not send ComfyHub's request somewhere else).
        with requests.Session() as session:
            session.trust_env = False
            try:
                with session.get(self.url + path, timeout=(min(CONNECT_TIMEOUT, timeout), timeout), stream=True,
                                 allow_redirects=False) as response:
                    if response.status_code != 200:
                        raise ComfyUIError(f"{where} answered GET {path} with HTTP {response.status_code}.",
                                           status_code=response.status_code)
                    body = bytearray()
                    # read1 returns what one read brings, so the deadline also holds for an answer that trickles in.
                    while chunk := response.raw.read1(_CHUNK, decode_content=True):
                        body += chunk
                        if len(body) > max_bytes:
                            raise ComfyUIError(f"{where} answered GET {path} with more than {max_bytes >> 20} MiB; "
                                               "ComfyHub reads at most that much.")
                        if time.monotonic() > deadline:
                            raise ComfyUIError(too_slow)
                    return bytes(body)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                if _timed_out(exc):
                    raise ComfyUIError(too_slow) from exc
                raise ComfyUIError(f"{where} does not answer GET {path} ({_reason(exc)}); check that the instance "
                                   "runs.") from exc


def _chain(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _timed_out(exc: BaseException) -> bool:
    # Not urllib3's TimeoutError: a refused connection (NewConnectionError) is one of those too.
    return any(isinstance(e, (requests.Timeout, urllib3.exceptions.ReadTimeoutError, TimeoutError))
               for e in _chain(exc))


def _reason(exc: BaseException) -> str:
    """What went wrong, in a few words: the socket's own error (requests wraps urllib3's, which wraps it)."""
    for seen in _chain(exc):
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
