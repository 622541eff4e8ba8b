"""A real Docker engine for the test suite: use the one that answers, or start dockerd for the session.

The dockerd started here gets tests/support/bin first on its PATH, so it registers the "nvidia" device driver through
the no-op nvidia-container-runtime-hook stand-in and GPU device requests reach containers as NVIDIA_VISIBLE_DEVICES.
Its PID is kept in a pidfile so that a later run can find and reuse it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import docker
import docker.errors

HOOK_DIR = Path(__file__).resolve().parent / "bin"
STATE_DIR = Path(tempfile.gettempdir()) / "comfyhub-test-dockerd"
PIDFILE = STATE_DIR / "dockerd.pid"
LOGFILE = STATE_DIR / "dockerd.log"
LOCKFILE = STATE_DIR / "start.lock"
# Every test session holds a shared lock on this file while it uses the engine: the session that started dockerd
# stops it only when it can take the lock alone, never under another session still running tests on it.
USERS_LOCKFILE = STATE_DIR / "users.lock"
DEFAULT_SOCKET = "/var/run/docker.sock"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class EngineUnavailable(RuntimeError):
    """No Docker engine answers and none could be started."""


@dataclasses.dataclass
class EngineHandle:
    client: docker.DockerClient
    base_url: str
    started_here: bool
    """True when this process started dockerd (only then does the session stop it)."""
    pid: int | None = None
    """PID of the dockerd the test harness started, in this run or an earlier one; None for an engine run by others."""
    log_path: Path | None = None
    users_lock: object = None
    """The open users.lock, held shared for as long as this session uses the engine."""

    @property
    def harness_owned(self) -> bool:
        return self.pid is not None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the dockerd the harness started: SIGTERM to its PID, then wait for it to exit. Left running while
        another test session still uses it (that session holds users.lock shared)."""
        self.client.close()
        if self.pid is None:
            raise RuntimeError("This Docker engine was not started by the test harness; leaving it running.")
        if self.users_lock is not None:
            try:
                fcntl.flock(self.users_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.release()
                return
        try:
            _stop_dockerd(self.pid, timeout)
            self.pid = None
        finally:
            self.release()

    def release(self) -> None:
        """Stop counting as a user of the engine."""
        if self.users_lock is not None:
            self.users_lock.close()
            self.users_lock = None


def ensure_engine() -> EngineHandle:
    """Return a handle on a Docker engine that answers, starting dockerd first if needed and allowed."""
    users_lock = None
    try:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        users_lock = open(USERS_LOCKFILE, "a")
        # Blocks only while a session that started dockerd is stopping it: then this one starts a fresh one.
        fcntl.flock(users_lock, fcntl.LOCK_SH)
    except OSError:
        users_lock = None  # a read-only /tmp: sessions cannot see each other, as before
    handle = _ensure_engine()
    handle.users_lock = users_lock
    return handle


def _ensure_engine() -> EngineHandle:
    client = _answering_client()
    if client is not None:
        return _reused(client)

    if os.environ.get("DOCKER_HOST"):
        raise EngineUnavailable(
            f"No Docker engine answers at DOCKER_HOST={os.environ['DOCKER_HOST']}. Start that engine, or unset "
            "DOCKER_HOST so the tests can use (or start) the local one at unix://" + DEFAULT_SOCKET + "."
        )
    dockerd = shutil.which("dockerd", path=os.environ.get("PATH", "") + ":" + SYSTEM_PATH)
    if dockerd is None:
        raise EngineUnavailable(
            "No Docker engine answers at unix://" + DEFAULT_SOCKET + " and dockerd is not installed: "
            "install docker.io (apt-get install -y docker.io), or start Docker and set DOCKER_HOST."
        )
    if os.geteuid() != 0:
        raise EngineUnavailable(
            "No Docker engine answers at unix://" + DEFAULT_SOCKET + " and starting dockerd needs root: "
            "run the tests as root or start Docker yourself."
        )

    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOCKFILE, "w") as lock:
        # Another pytest process may be starting dockerd at this moment; the second one waits and then reuses it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = _answering_client()
        if client is not None:
            return _reused(client)
        pid = _start_dockerd(dockerd)
        client = _wait_until_answering(pid)
    return EngineHandle(client=client, base_url=client.api.base_url, started_here=True, pid=pid, log_path=LOGFILE)


def _reused(client: docker.DockerClient) -> EngineHandle:
    pid = _harness_dockerd_pid()
    return EngineHandle(client=client, base_url=client.api.base_url, started_here=False, pid=pid,
                        log_path=LOGFILE if pid else None)


def _answering_client() -> docker.DockerClient | None:
    try:
        client = docker.from_env(use_context=False)
    except docker.errors.DockerException:
        return None
    try:
        client.ping()
    except Exception:
        client.close()
        return None
    return client


def _start_dockerd(dockerd: str) -> int:
    env = dict(os.environ)
    env["PATH"] = f"{HOOK_DIR}:{env.get('PATH', '')}:{SYSTEM_PATH}"
    env.pop("DOCKER_HOST", None)
    log = open(LOGFILE, "ab")
    log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} started by tests/support/engine.py ---\n".encode())
    log.flush()
    process = subprocess.Popen(
        [dockerd, "--pidfile", str(PIDFILE), "-H", f"unix://{DEFAULT_SOCKET}"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        # Its own session: Ctrl-C on pytest must not take the engine down half-way through a teardown.
        start_new_session=True,
    )
    log.close()
    # Keeps the Popen object from warning when it is garbage-collected while dockerd still runs.
    process.returncode = 0
    return process.pid


def _wait_until_answering(pid: int) -> docker.DockerClient:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _is_alive(pid):
            raise EngineUnavailable(f"dockerd exited while starting; see {LOGFILE}:\n{_log_tail()}")
        client = _answering_client()
        if client is not None:
            return client
        time.sleep(0.3)
    raise EngineUnavailable(
        f"dockerd (PID {pid}) did not answer on unix://{DEFAULT_SOCKET} within {START_TIMEOUT_S:.0f} s; "
        f"see {LOGFILE}:\n{_log_tail()}"
    )


def _harness_dockerd_pid() -> int | None:
    """The PID in our pidfile, if that process is still a running dockerd."""
    try:
        pid = int(PIDFILE.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_dockerd(pid) else None


def _is_dockerd(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and os.path.basename(cmdline[0]) == b"dockerd" and str(PIDFILE).encode() in cmdline


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A child of ours that exited stays a zombie until reaped.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


def _stop_dockerd(pid: int, timeout: float) -> None:
    if not _is_dockerd(pid):
        return  # Already gone, or the PID now belongs to something else: never signal that.
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_alive(pid):
            return
        time.sleep(0.2)
    raise RuntimeError(f"dockerd (PID {pid}) did not stop within {timeout:.0f} s after SIGTERM; see {LOGFILE}")


def _log_tail(lines: int = 30) -> str:
    try:
        return "\n".join(LOGFILE.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
