"""A private, throw-away environment for one benchmark: a temp dir with a SQLite file, storage roots and a private
Redis on a unix socket, plus the worker processes a benchmark starts. Everything is stopped (by PID) and removed
on exit, also on SIGTERM/SIGINT. Also what several benchmarks share: waiting, numbers, model-sized data files, and
the hub's pages as a logged-in superuser asks for them.

Use it before Django is imported:

    with PrivateEnvironment("roundtrip") as env:
        env.setup_django()          # django.setup() + migrate on the private database
        worker = env.start_process("worker", [...])
        key = env.worker_key(worker, "worker", "default")   # once it listens
"""
from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"


class BenchError(RuntimeError):
    """The benchmark could not be run (as opposed to: it ran and missed its target)."""


def _raise_system_exit(signum, frame):
    # Once: a second signal (Ctrl-C reaches this process and `python -m bench` forwards it) must not cut the cleanup.
    for other in (signal.SIGTERM, signal.SIGINT):
        signal.signal(other, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def descendants(pid: int) -> list[int]:
    """PIDs of every process below `pid` (from /proc), so a worker's work horse can be stopped too."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


class PrivateEnvironment:
    def __init__(self, name: str, extra_env: dict[str, str] | None = None):
        self.name = name
        self.extra_env = extra_env or {}
        self.root: Path | None = None
        self.redis: subprocess.Popen | None = None
        self.processes: list[tuple[subprocess.Popen, object]] = []
        self._old_handlers = {}

    # --- setting up ------------------------------------------------------------------------------------------

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._old_handlers[signum] = signal.signal(signum, _raise_system_exit)
        self.root = Path(tempfile.mkdtemp(prefix=f"comfyhub-bench-{self.name}-"))
        try:
            self._configure()
            self._start_redis()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    @property
    def redis_socket(self) -> Path:
        return self.root / "redis.sock"

    @property
    def redis_url(self) -> str:
        return f"unix://{self.redis_socket}?db=0"

    def _configure(self):
        if "django" in sys.modules and "django.conf" in sys.modules:
            from django.conf import settings

            if settings.configured:
                raise BenchError("the private environment must be set up before Django's settings are loaded")
        (self.root / "var").mkdir()
        for variable in ("TEST_DATABASE_NAME", "SECRET_KEY_FILE"):
            os.environ.pop(variable, None)
        os.environ.update(
            {
                "DJANGO_SETTINGS_MODULE": "comfyhub.settings",
                "SECRET_KEY": "bench-only-" + secrets.token_urlsafe(40),
                "DEBUG": "false",
                "COMFYHUB_DATA_DIR": str(self.root / "var"),
                "DATABASE_URL": f"sqlite:///{self.root / 'var' / 'comfyhub.sqlite3'}",
                "REDIS_URL": self.redis_url,
                "COMFY_SHARED_PATH": str(self.root / "storage" / "shared"),
                "COMFY_INSTANCES_PATH": str(self.root / "storage" / "instances"),
                "COMFY_BACKUPS_PATH": str(self.root / "storage" / "backups"),
                **self.extra_env,
            }
        )

    def _start_redis(self):
        server = shutil.which("redis-server")
        if not server:
            raise BenchError("redis-server is missing: `make bench` installs it (apt-get install redis-server).")
        self.redis = subprocess.Popen(
            [server, "--port", "0", "--unixsocket", str(self.redis_socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while not self.redis_socket.exists():
            if self.redis.poll() is not None or time.monotonic() > deadline:
                raise BenchError("the private Redis did not start")
            time.sleep(0.02)

    def setup_django(self):
        """django.setup() against the private settings, then migrate the private database."""
        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", interactive=False, verbosity=0)

    def start_process(self, label: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a helper process (a worker) in its own session, logging to the temp dir; stopped on exit."""
        log = open(self.root / f"{label}.log", "wb")
        process = subprocess.Popen(
            argv, cwd=REPO, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append((process, log))
        return process

    def worker_key(self, process: subprocess.Popen, label: str, queue_name: str, timeout: float = 60.0) -> str:
        """The Redis key of the RQ worker that `process` (started as `label`) runs, once it listens on
        `queue_name`; BenchError with the end of its log when it exits first."""
        from redis import Redis
        from rq import Worker

        redis = Redis.from_url(self.redis_url)

        def listening():
            if process.poll() is not None:
                raise BenchError(f"the {label} exited:\n{self.log_tail(label)}")
            found = [w for w in Worker.all(connection=redis) if queue_name in w.queue_names()]
            return found[0].key if found else None

        try:
            return wait(listening, f"the {label} to listen on {queue_name}", timeout=timeout, interval=0.1)
        finally:
            redis.close()

    def log_tail(self, label: str, lines: int = 30) -> str:
        try:
            return "\n".join((self.root / f"{label}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- tearing down ----------------------------------------------------------------------------------------

    @staticmethod
    def _stop(process: subprocess.Popen, timeout: float = 15):
        if process.poll() is None:
            below = descendants(process.pid)
            try:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            for pid in below:  # e.g. a work horse left running in its own process group
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def close(self):
        try:
            # Workers first (they talk to Redis while shutting down), then Redis, then the files.
            for process, log in reversed(self.processes):
                self._stop(process)
                log.close()
            self.processes.clear()
            if self.redis is not None:
                self._stop(self.redis)
                self.redis = None
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler)
            self._old_handlers.clear()


def wait(condition, what: str, *, timeout: float, interval: float):
    """The first true value of `condition()`, called every `interval` s; BenchError after `timeout` s."""
    deadline = time.perf_counter() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.perf_counter() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def run(main) -> int:
    """Run a benchmark's main(): its exit code, or 2 (after the reason) when it could not run at all."""
    try:
        return main()
    except BenchError as exc:
        print(f"bench: could not run: {exc}", file=sys.stderr, flush=True)
        return 2


# --- numbers -------------------------------------------------------------------------------------------------

def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def timed_tool(argv: list[str]) -> tuple[float, str]:
    """(seconds, standard output) of a command-line tool run to its end; BenchError when it fails."""
    begin = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - begin
    if done.returncode != 0:
        raise BenchError(f"{argv[0]} failed: {done.stderr.strip()[:300]}")
    return seconds, done.stdout


def median(values):
    return statistics.median(values)


def percentile(values, fraction):
    """Nearest-rank percentile (p90 = percentile(values, 0.9))."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(round(fraction * len(ordered), 9))))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def save_result(name: str, data: dict):
    """Keep the last run's numbers in bench/results/<name>.json (ignored by git)."""
    import json

    try:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    except OSError:
        pass


# --- data files (hashing, model_cache): random bytes, never sparse, read once into the page cache (which cannot be
# dropped) so that both sides of a comparison read from it -------------------------------------------------------

BLOCK = 64 << 20  # one os.urandom block, repeated: incompressible, and quick to write


def random_block() -> bytes:
    return os.urandom(BLOCK)


def write_random(path, size: int, block: bytes, rotate: int = 0):
    """`size` bytes of `block`, repeated, starting `rotate` bytes into it."""
    rotated = block[rotate:] + block[:rotate] if rotate else block
    with open(path, "wb") as handle:
        left = size
        while left:
            piece = rotated[: min(left, len(rotated))]
            handle.write(piece)
            left -= len(piece)


def write_models(paths, size: int, block: bytes):
    """Each of `paths` written with `size` bytes of `block`, rotated by the file's number so no two are alike."""
    for number, path in enumerate(paths):
        write_random(path, size, block, rotate=(number * 7919 * 4096) % len(block))


def at_rest(paths):
    """Dated a day back: a model library is at rest, its files written long ago (hashing.MMAP_QUIET_SECONDS matters
    for BLAKE3)."""
    old = time.time() - 24 * 3600
    for path in paths:
        os.utime(path, (old, old))


def read_into_cache(paths):
    buffer = bytearray(8 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


# --- the hub's pages (pages, dashboard_instances, nodes, roundtrip) --------------------------------------------

ADMIN, ADMIN_PASSWORD = "bench-admin", "bench-admin-password-1"


def import_job_modules():
    """Register every job kind, as a running site would have (kind labels and the list's kind filter)."""
    import importlib

    from django.apps import apps

    for config in apps.get_app_configs():
        try:
            importlib.import_module(f"{config.name}.jobs")
        except ModuleNotFoundError as exc:
            if exc.name != f"{config.name}.jobs":
                raise


def set_up_as_running():
    """As a running site is before its first page: the pages link static files through the manifest, as in
    production (built in the temp dir), and every job kind is registered."""
    from django.conf import settings
    from django.core.management import call_command

    if "Manifest" in settings.STORAGES["staticfiles"]["BACKEND"]:
        call_command("collectstatic", interactive=False, verbosity=0)
    import_job_modules()


def admin_client():
    """(the benchmark's superuser, a django.test.Client logged in as them)."""
    from django.contrib.auth.models import User
    from django.test import Client

    admin = User.objects.create_superuser(ADMIN, password=ADMIN_PASSWORD)
    client = Client(HTTP_HOST="localhost")  # one of the default ALLOWED_HOSTS
    if not client.login(username=ADMIN, password=ADMIN_PASSWORD):
        raise BenchError("the benchmark superuser could not log in")
    return admin, client


def use_database(connection, path):
    """Point the default connection at another SQLite file (reconnects on its next query)."""
    connection.close()
    connection.settings_dict["NAME"] = str(path)


def copy_database(connection, name: str) -> tuple[Path, Path]:
    """The default SQLite database copied to `name` beside it, and the connection pointed at the copy: (the
    original's path, the copy's)."""
    original = Path(connection.settings_dict["NAME"])
    copy = original.with_name(name)
    connection.ensure_connection()
    with closing(sqlite3.connect(copy)) as target:
        connection.connection.backup(target)
    use_database(connection, copy)
    return original, copy
