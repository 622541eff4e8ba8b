"""Loaded with `-p tests.testenv` before Django's settings: a private environment for the whole test session.

Everything goes into one temporary directory: the data dir, storage roots, a file SQLite test database (so workers
in other processes see it) and a private Redis on a unix socket, started here and stopped when the session ends.
"""
import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(tempfile.mkdtemp(prefix="comfyhub-test-"))
# Containers this session creates carry comfyhub.test=<SESSION>: cleanup removes only its own, never those of
# another test session sharing the engine.
SESSION = ROOT.name.rsplit("-", 1)[-1]
REDIS_SOCKET = ROOT / "redis.sock"

os.environ.update(
    {
        "SECRET_KEY": "test-only-secret-key-" + "x" * 40,
        "DEBUG": "false",
        "COMFYHUB_DATA_DIR": str(ROOT / "var"),
        "DATABASE_URL": f"sqlite:///{ROOT / 'var' / 'comfyhub.sqlite3'}",
        "TEST_DATABASE_NAME": str(ROOT / "test.sqlite3"),
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
        "INSTANCE_PORT_RANGE": "18188-18387",
        # The default image's repository, the test double and the made-up images tests name (never pulled).
        "INSTANCE_IMAGES_ALLOWED": "ghcr.io/comfyhub/comfyui,ghcr.io/comfyhub/comfyui:*,ghcr.io/comfyhub/comfyui@*,"
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


def _cleanup():
    stop_redis()
    shutil.rmtree(ROOT, ignore_errors=True)


start_redis()
atexit.register(_cleanup)
