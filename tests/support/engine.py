"""A real Docker engine for the test suite: use the one that answers, or start dockerd for the session.

The dockerd started here gets tests/support/bin first on its PATH, so it registers the "nvidia" device driver through
the no-op nvidia-container-runtime-hook stand-in and GPU device requests reach containers as NVIDIA_VISIBLE_DEVICES.
Its PID is kept in a pidfile so that a later run can find and reuse it.

ensure_second_engine() starts a second engine beside it, always the harness's own: another Docker host on this machine
for tests of several GPU hosts (see its docstring).
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import os
import shutil
import signal
import socket
import struct
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


def _answering_client(base_url: str | None = None) -> docker.DockerClient | None:
    """A client on the engine at base_url (by default the one DOCKER_HOST or the default socket names), if it answers."""
    try:
        client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env(use_context=False)
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


def _wait_until_answering(pid: int, base_url: str | None = None, logfile: Path = LOGFILE) -> docker.DockerClient:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _is_alive(pid):
            raise EngineUnavailable(f"dockerd exited while starting; see {logfile}:\n{_log_tail(logfile=logfile)}")
        client = _answering_client(base_url)
        if client is not None:
            return client
        time.sleep(0.1)
    raise EngineUnavailable(
        f"dockerd (PID {pid}) did not answer on {base_url or 'unix://' + DEFAULT_SOCKET} within "
        f"{START_TIMEOUT_S:.0f} s; see {logfile}:\n{_log_tail(logfile=logfile)}"
    )


def _harness_dockerd_pid(pidfile: Path = PIDFILE) -> int | None:
    """The PID in our pidfile, if that process is still a running dockerd."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_dockerd(pid, pidfile) else None


def _is_dockerd(pid: int, pidfile: Path = PIDFILE) -> bool:
    """Whether pid is a dockerd started with this pidfile (a PID reused by another process never is)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and os.path.basename(cmdline[0]) == b"dockerd" and str(pidfile).encode() in cmdline


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


def _stop_dockerd(pid: int, timeout: float, pidfile: Path = PIDFILE, logfile: Path = LOGFILE) -> None:
    if not _is_dockerd(pid, pidfile):
        return  # Already gone, or the PID now belongs to something else: never signal that.
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_alive(pid):
            return
        time.sleep(0.2)
    raise RuntimeError(f"dockerd (PID {pid}) did not stop within {timeout:.0f} s after SIGTERM; see {logfile}")


def _log_tail(lines: int = 30, logfile: Path = LOGFILE) -> str:
    try:
        return "\n".join(logfile.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# The second engine: another Docker host on this machine, for tests of several GPU hosts (nodes), each with its engine.

SECOND_STATE_DIR = Path(tempfile.gettempdir()) / "comfyhub-test-dockerd-b"
SECOND_SOCKET = SECOND_STATE_DIR / "docker.sock"
SECOND_DOCKER_HOST = f"unix://{SECOND_SOCKET}"
SECOND_PIDFILE = SECOND_STATE_DIR / "dockerd.pid"
SECOND_LOGFILE = SECOND_STATE_DIR / "dockerd.log"
SECOND_EXEC_ROOT = SECOND_STATE_DIR / "exec"
SECOND_LOCKFILE = SECOND_STATE_DIR / "start.lock"
SECOND_USERS_LOCKFILE = SECOND_STATE_DIR / "users.lock"
SECOND_DATA_ROOT_NAME = "comfyhub-test-docker-b"
# Its own bridge and addresses, outside the ranges the first engine takes its networks from (172.17-31.x, 192.168.x),
# so neither engine ever routes the other's subnet.
SECOND_BRIDGE = "comfyhub-b0"
SECOND_BRIDGE_ADDRESS = ipaddress.IPv4Interface("10.213.250.1/24")
SECOND_ADDRESS_POOL = "base=10.214.0.0/16,size=24"
# Ports its containers publish bind here by default: the first engine's stay on 127.0.0.1, so the same port number
# can be taken on both, as on two hosts.
SECOND_PUBLISH_ADDRESS = "127.0.0.2"
SECOND_CONTAINERD_NAMESPACE = "comfyhub-test-b"

# Linux ioctls for a bridge and its IPv4 address (<linux/sockios.h>): no iproute2 needed on a bare machine.
_SIOCGIFFLAGS, _SIOCSIFFLAGS = 0x8913, 0x8914
_SIOCSIFADDR, _SIOCSIFNETMASK = 0x8916, 0x891C
_SIOCBRADDBR, _SIOCBRDELBR = 0x89A0, 0x89A1
_IFF_UP = 0x1


@dataclasses.dataclass
class SecondEngine:
    """A second dockerd the harness runs: its own data root, exec root, pidfile, socket, bridge and subnet, no
    iptables rules, ports published on SECOND_PUBLISH_ADDRESS, GPU device requests through the no-op hook."""

    client: docker.DockerClient
    docker_host: str
    publish_address: str
    bridge: str
    subnet: ipaddress.IPv4Network
    data_root: Path
    pid: int
    started_here: bool
    """True when this session started it (False: it reused one an earlier or a parallel session started)."""
    users_lock: object = None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Stop it when no other test session uses it: dockerd (its containers with it), then its bridge, data root
        and exec root go. Returns False, leaving it running for them, while another session holds users.lock."""
        self.client.close()
        if self.users_lock is not None:
            try:
                fcntl.flock(self.users_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.release()
                return False
        try:
            _stop_dockerd(self.pid, timeout, SECOND_PIDFILE, SECOND_LOGFILE)
            _delete_bridge(SECOND_BRIDGE)
            for folder in (self.data_root, SECOND_EXEC_ROOT):
                # Only ever a folder of ours: the data root's name is fixed, whatever folder it was put in.
                if folder.name in (SECOND_DATA_ROOT_NAME, SECOND_EXEC_ROOT.name) and folder.is_dir():
                    shutil.rmtree(folder)
        finally:
            self.release()
        return True

    def release(self) -> None:
        """Stop counting as a user of the engine."""
        if self.users_lock is not None:
            self.users_lock.close()
            self.users_lock = None


def ensure_second_engine(first: docker.DockerClient) -> SecondEngine:
    """Start the second engine, or reuse the one the pidfile names if it is still running (started by an earlier
    session kept with COMFYHUB_TEST_KEEP_DOCKERD=1, or by a test session running beside this one). Until stop() or
    release(), this session holds users.lock shared, so no other session takes the engine down under it.

    Its data root lies beside the first engine's (same filesystem, where that engine's storage driver works) when
    that one is on this machine, else in SECOND_STATE_DIR."""
    SECOND_STATE_DIR.mkdir(parents=True, exist_ok=True)
    users_lock = open(SECOND_USERS_LOCKFILE, "a")
    try:
        # Blocks only while a session is stopping it: then this one starts a fresh one.
        fcntl.flock(users_lock, fcntl.LOCK_SH)
        with open(SECOND_LOCKFILE, "w") as lock:
            # Two sessions starting at once: the second waits here and then reuses the first one's engine.
            fcntl.flock(lock, fcntl.LOCK_EX)
            pid = _harness_dockerd_pid(SECOND_PIDFILE)
            started_here = pid is None
            if started_here:
                pid = _start_second_dockerd(_second_data_root(first))
            client = _wait_until_answering(pid, SECOND_DOCKER_HOST, SECOND_LOGFILE)
        data_root = Path(client.info()["DockerRootDir"])
    except BaseException:
        users_lock.close()
        raise
    return SecondEngine(client=client, docker_host=SECOND_DOCKER_HOST, publish_address=SECOND_PUBLISH_ADDRESS,
                        bridge=SECOND_BRIDGE, subnet=SECOND_BRIDGE_ADDRESS.network, data_root=data_root, pid=pid,
                        started_here=started_here, users_lock=users_lock)


def _second_data_root(first: docker.DockerClient) -> Path:
    try:
        first_root = Path(first.info()["DockerRootDir"])
    except (docker.errors.APIError, KeyError, TypeError):
        first_root = None
    if first_root is not None and first_root.is_dir():
        return first_root.parent / SECOND_DATA_ROOT_NAME
    return SECOND_STATE_DIR / SECOND_DATA_ROOT_NAME


def _start_second_dockerd(data_root: Path) -> int:
    dockerd = shutil.which("dockerd", path=os.environ.get("PATH", "") + ":" + SYSTEM_PATH)
    if dockerd is None:
        raise EngineUnavailable("The second Docker engine needs dockerd: install docker.io (apt-get install -y "
                                "docker.io).")
    if os.geteuid() != 0:
        raise EngineUnavailable("Starting the second Docker engine (dockerd and its bridge) needs root: run the "
                                "tests as root.")
    _check_subnet_is_free(SECOND_BRIDGE, SECOND_BRIDGE_ADDRESS.network)
    _create_bridge(SECOND_BRIDGE, SECOND_BRIDGE_ADDRESS)
    env = dict(os.environ)
    env["PATH"] = f"{HOOK_DIR}:{env.get('PATH', '')}:{SYSTEM_PATH}"
    env.pop("DOCKER_HOST", None)
    with open(SECOND_LOGFILE, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} started by tests/support/engine.py ---\n".encode())
        log.flush()
        process = subprocess.Popen(
            [dockerd, "--data-root", str(data_root), "--exec-root", str(SECOND_EXEC_ROOT),
             "--pidfile", str(SECOND_PIDFILE), "-H", SECOND_DOCKER_HOST,
             "--bridge", SECOND_BRIDGE, "--iptables=false", "--ip", SECOND_PUBLISH_ADDRESS,
             "--default-address-pool", SECOND_ADDRESS_POOL,
             # Its own containerd namespaces: on a machine whose containerd serves the first engine too, neither
             # engine sees (or cleans up) the other's containers there.
             "--containerd-namespace", SECOND_CONTAINERD_NAMESPACE,
             "--containerd-plugins-namespace", SECOND_CONTAINERD_NAMESPACE + "-plugins",
             "--label", "comfyhub.test.engine=second"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    process.returncode = 0  # reaped by _is_alive if it dies; no warning when the Popen object goes
    return process.pid


def _check_subnet_is_free(bridge: str, subnet: ipaddress.IPv4Network) -> None:
    """Refuse a subnet another interface of this machine already routes: the two would shadow each other."""
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or fields[0] == bridge:
            continue
        destination = ipaddress.IPv4Address(struct.pack("<I", int(fields[1], 16)))
        mask = ipaddress.IPv4Address(struct.pack("<I", int(fields[7], 16)))
        if int(mask) == 0:
            continue  # the default route overlaps everything and clashes with nothing
        routed = ipaddress.IPv4Network(f"{destination}/{mask}", strict=False)
        if routed.overlaps(subnet):
            raise EngineUnavailable(
                f"The second Docker engine's subnet {subnet} overlaps {routed}, routed on {fields[0]} on this "
                f"machine: change SECOND_BRIDGE_ADDRESS (and SECOND_ADDRESS_POOL) in tests/support/engine.py."
            )


def _ifreq_flags(name: str, flags: int = 0) -> bytes:
    return struct.pack("16sH22x", name.encode(), flags)


def _ifreq_address(name: str, address: ipaddress.IPv4Address) -> bytes:
    return struct.pack("16sH2x4s16x", name.encode(), socket.AF_INET, address.packed)


def _set_up(sock: socket.socket, name: str, up: bool) -> None:
    flags = struct.unpack("16sH22x", fcntl.ioctl(sock, _SIOCGIFFLAGS, _ifreq_flags(name)))[1]
    fcntl.ioctl(sock, _SIOCSIFFLAGS, _ifreq_flags(name, flags | _IFF_UP if up else flags & ~_IFF_UP))


def _create_bridge(name: str, interface: ipaddress.IPv4Interface) -> None:
    """The bridge dockerd attaches its containers to (`ip link add NAME type bridge`, its address, up); one left by an
    engine that died is taken over as it is."""
    link = Path("/sys/class/net") / name
    if link.exists() and not (link / "bridge").is_dir():
        raise EngineUnavailable(f"{name} exists on this machine and is not a bridge: remove it (ip link del {name}).")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            if not link.exists():
                fcntl.ioctl(sock, _SIOCBRADDBR, name.encode() + b"\0")
            fcntl.ioctl(sock, _SIOCSIFADDR, _ifreq_address(name, interface.ip))
            fcntl.ioctl(sock, _SIOCSIFNETMASK, _ifreq_address(name, interface.netmask))
            _set_up(sock, name, True)
        except OSError as error:
            raise EngineUnavailable(f"Could not create the bridge {name} ({interface}) for the second Docker engine: "
                                    f"{error}") from error


def _delete_bridge(name: str) -> None:
    if not (Path("/sys/class/net") / name).exists():
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _set_up(sock, name, False)
        fcntl.ioctl(sock, _SIOCBRDELBR, name.encode() + b"\0")
