"""Loaded with `-p tests.testenv` before Django's settings: a private environment for the whole test session.

Everything goes into one temporary directory: the data dir, storage roots, a private Redis on a unix socket, started
here and stopped when the session ends, and the test database, which worker processes the tests start share:
- by default a SQLite file;
- with COMFYHUB_TEST_DATABASE=postgres, a throw-away PostgreSQL cluster on a unix socket, started here too
  (`make test` runs the database-sensitive part, POSTGRES_PART below, a second time that way);
- with DATABASE_URL=postgres://... given by the person running the tests, that server (the suite creates and drops
  its own test database there, named test_<name>).
"""
import atexit
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(tempfile.mkdtemp(prefix="comfyhub-test-"))
# Containers this session creates carry comfyhub.test=<SESSION>: cleanup removes only its own, never those of
# another test session sharing the engine.
SESSION = ROOT.name.rsplit("-", 1)[-1]
REDIS_SOCKET = ROOT / "redis.sock"
POSTGRES_DIR = ROOT / "postgres"  # the private cluster's data and its socket, owned by the user it runs as
POSTGRES_SCHEMES = ("postgres://", "postgresql://", "pgsql://")
# The database-sensitive part of the suite, which `make test` runs again on PostgreSQL (`pytest -m postgres`):
# operations (conditional updates racing, rows written by worker processes), instance starts (two at once),
# snapshots and restores (the instance's lock), templates, the admin and the pages; test_database.py (migrations,
# serve, races), the registry's constraint and concurrency tests and the commands' bad-argument table join it with
# @pytest.mark.postgres. The rest runs on SQLite only, to keep `make test` within 20 minutes (about 3 minutes
# here on a quiet 2-core machine; DATABASE_URL=postgres://... runs all of it on PostgreSQL).
POSTGRES_PART = {
    "test_operations.py", "test_instance_lifecycle.py", "test_snapshots.py", "test_templates.py",
    "test_instance_admin.py", "test_model_admin.py", "test_access.py", "test_operation_views.py",
    "test_instance_views.py", "test_node_views.py", "test_template_views.py", "test_workflow_views.py",
    "test_model_views.py", "test_snapshot_views.py", "test_legacy_views.py", "test_storage_check_views.py",
    # Self-service quotas take a per-user lock; node heartbeats are conditional updates from agent processes.
    "test_self_service.py", "test_nodes.py", "test_agent.py",
}


def _database_url():
    given = os.environ.get("DATABASE_URL", "")
    if given.startswith(POSTGRES_SCHEMES):
        return given  # the person's own server: all of the suite runs there
    choice = os.environ.get("COMFYHUB_TEST_DATABASE", "sqlite")
    if choice == "postgres":
        return f"postgres://comfyhub@/comfyhub?host={POSTGRES_DIR}"  # the private cluster started below
    if choice != "sqlite":
        raise RuntimeError(f"COMFYHUB_TEST_DATABASE={choice!r}: use sqlite (the default) or postgres.")
    return f"sqlite:///{ROOT / 'var' / 'comfyhub.sqlite3'}"


DATABASE_URL = _database_url()
ON_POSTGRES = DATABASE_URL.startswith(POSTGRES_SCHEMES)
PORT_RANGE = (18388, 18587) if ON_POSTGRES else (18188, 18387)
PRIVATE_POSTGRES = DATABASE_URL == f"postgres://comfyhub@/comfyhub?host={POSTGRES_DIR}"
if ON_POSTGRES:
    # Django creates and drops test_<name> beside the database the URL names.
    TEST_DATABASE_NAME = "test_" + urllib.parse.unquote(urllib.parse.urlsplit(DATABASE_URL).path.lstrip("/"))
else:
    # A file, not memory: worker processes the tests start must see the rows the tests write.
    TEST_DATABASE_NAME = str(ROOT / "test.sqlite3")


def database_url(name):
    """DATABASE_URL for the database `name` on the server the tests use (for SQLite, `name` is a file)."""
    if not ON_POSTGRES:
        return f"sqlite:///{name}"
    parts = urllib.parse.urlsplit(DATABASE_URL)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(str(name))))


def worker_database_url():
    """DATABASE_URL for processes the tests start (RQ workers, commands): the test database itself."""
    return database_url(TEST_DATABASE_NAME)


os.environ.update(
    {
        "DATABASE_URL": DATABASE_URL,
        "TEST_DATABASE_NAME": TEST_DATABASE_NAME,
        "SECRET_KEY": "test-only-secret-key-" + "x" * 40,
        "DEBUG": "false",
        "COMFYHUB_DATA_DIR": str(ROOT / "var"),
        "REDIS_URL": f"unix://{REDIS_SOCKET}?db=0",
        "COMFY_SHARED_PATH": str(ROOT / "storage" / "shared"),
        "COMFY_INSTANCES_PATH": str(ROOT / "storage" / "instances"),
        "COMFY_BACKUPS_PATH": str(ROOT / "storage" / "backups"),
        "DJANGO_ALLOW_ASYNC_UNSAFE": "true",
        # The live server of browser tests serves static files by their plain names.
        "STATIC_MANIFEST": "false",
        # Tests create the instances they need; the fresh-install instance has a test of its own.
        "COMFY_DEFAULT_INSTANCE": "false",
        # Four fake GPUs (the no-op GPU hook makes Docker accept device requests for them).
        "COMFY_GPUS": "0,1,2,3",
        "COMFY_GPU_DISCOVERY": "settings",  # the same four GPUs on a host with real ones
        # Labelled as test objects, so the harness removes every container tests create.
        "CONTAINER_EXTRA_LABELS": f"comfyhub.test={SESSION}",
        "COMFYHUB_TEST_SESSION": SESSION,
        # Two test sessions on one engine never reuse each other's container names.
        "CONTAINER_NAME_PREFIX": f"comfyhub-t{SESSION}-",
        # The SQLite and PostgreSQL parts of `make test` run side by side: each picks ports from its own range.
        "INSTANCE_PORT_RANGE": "{}-{}".format(*PORT_RANGE),
        # The default image's repository, the test double and the made-up images tests name (never pulled).
        "INSTANCE_IMAGES_ALLOWED": "comfyhub/comfyui,comfyhub/comfyui:*,comfyhub/comfyui@*,"
                                   "ghcr.io/comfyhub/comfyui,ghcr.io/comfyhub/comfyui:*,ghcr.io/comfyhub/comfyui@*,"
                                   "comfyhub-comfyui-double:*,comfyhub-test-*:*,example/comfyui:*,comfy:*,img:*,"
                                   "other:*,registry.invalid/*",
    }
)
(ROOT / "var" / "static").mkdir(parents=True)

_redis = None


def start_redis():
    global _redis
    server = shutil.which("redis-server")
    if not server:
        raise RuntimeError("redis-server is missing: `make test` installs it (apt-get install redis-server).")
    _redis = subprocess.Popen(
        [server, "--port", "0", "--unixsocket", str(REDIS_SOCKET), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(ROOT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while not REDIS_SOCKET.exists():
        if _redis.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the private test Redis did not start")
        time.sleep(0.05)


def stop_redis():
    if _redis is not None and _redis.poll() is None:
        _redis.send_signal(signal.SIGTERM)
        _redis.wait(timeout=10)


_postgres_owner = {}


def _postgres_program(name):
    """Debian keeps initdb and pg_ctl off PATH, under /usr/lib/postgresql/<version>/bin: take the newest."""
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                      key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0)
    program = str(versions[-1]) if versions else shutil.which(name)
    if not program:
        raise RuntimeError(f"PostgreSQL's {name} is missing: `make test` installs it (apt-get install postgresql).")
    return program


def _run_as_owner(*argv):
    done = subprocess.run([str(arg) for arg in argv], cwd=POSTGRES_DIR, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **_postgres_owner)
    if done.returncode != 0:
        log = POSTGRES_DIR / "log"
        raise RuntimeError(f"the private test PostgreSQL: {Path(argv[0]).name} failed:\n{done.stdout}"
                           + (log.read_text(errors="replace")[-3000:] if log.exists() else ""))


def start_postgres():
    """A throw-away cluster: trust authentication, no TCP (only a unix socket in POSTGRES_DIR), no fsync."""
    POSTGRES_DIR.mkdir()
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: the cluster belongs to the `postgres` user Debian's package creates.
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("PostgreSQL refuses to run as root and there is no `postgres` user: "
                               "install Debian's postgresql package (`make test` does).") from None
        os.chown(POSTGRES_DIR, owner.pw_uid, owner.pw_gid)
        ROOT.chmod(0o711)  # it may pass through the session's folder to its own, not list or read the rest
        _postgres_owner.update(user=owner.pw_uid, group=owner.pw_gid, extra_groups=[])
    data = POSTGRES_DIR / "data"
    _run_as_owner(_postgres_program("initdb"), "-D", data, "-A", "trust", "-U", "comfyhub", "-E", "UTF8",
                  "--locale=C", "--no-sync")
    _run_as_owner(_postgres_program("pg_ctl"), "-D", data, "-l", POSTGRES_DIR / "log", "-w", "-t", "60", "-o",
                  f"-k {POSTGRES_DIR} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                  "-c full_page_writes=off", "start")
    # The database DATABASE_URL names; the tests themselves run in test_comfyhub, which Django creates.
    _run_as_owner(_postgres_program("createdb"), "-h", POSTGRES_DIR, "-U", "comfyhub", "comfyhub")


def stop_postgres():
    if (POSTGRES_DIR / "data" / "postmaster.pid").exists():
        _run_as_owner(_postgres_program("pg_ctl"), "-D", POSTGRES_DIR / "data", "-m", "immediate", "-w", "stop")


def _cleanup():
    stop_redis()
    try:
        stop_postgres()
    finally:
        shutil.rmtree(ROOT, ignore_errors=True)


atexit.register(_cleanup)
start_redis()
if PRIVATE_POSTGRES:
    start_postgres()


def pytest_report_header(config):
    if not ON_POSTGRES:
        return f"database: SQLite, {TEST_DATABASE_NAME}"
    where = f"the private cluster in {POSTGRES_DIR}" if PRIVATE_POSTGRES else "the server DATABASE_URL names"
    return f"database: PostgreSQL, {TEST_DATABASE_NAME} on {where}"


def pytest_collection_modifyitems(config, items):
    """Files of the database-sensitive part are marked `postgres`; a test marked `postgres_only` (one SQLite has
    another test for) is left out of a SQLite run, reported as deselected, never as skipped."""
    kept, left_out = [], []
    for item in items:
        if item.path.name in POSTGRES_PART:
            item.add_marker(pytest.mark.postgres)
        if not ON_POSTGRES and item.get_closest_marker("postgres_only"):
            left_out.append(item)
        else:
            kept.append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept
