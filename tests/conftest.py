"""Shared fixtures: named users, a clean private Redis per test, and real RQ workers (in-process or separate)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import Group, User
from rq import SimpleWorker

from comfyhub import queues
from comfyhub.signals import OPERATORS_GROUP
from tests import testenv
from tests.support.canary import make_canary, snapshot

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def storage(settings, tmp_path, monkeypatch):
    """Fresh shared/instances/backups roots for every test, also for worker processes the test starts."""
    roots = {}
    for name, sub in (("COMFY_SHARED_PATH", "shared"), ("COMFY_INSTANCES_PATH", "instances"),
                      ("COMFY_BACKUPS_PATH", "backups")):
        path = tmp_path / "storage" / sub
        setattr(settings, name, path)
        monkeypatch.setenv(name, str(path))
        roots[sub] = path
    return roots


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """Django's default hasher spends ~0.5 s per password on purpose; tests create and log in users by the
    thousand (the PBKDF2 rounds are Django's to test, not ours)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def clean_redis():
    queues.get_connection("default").flushdb()
    yield


@pytest.fixture
def canary(tmp_path):
    """A host folder outside storage that a hostile instance folder's links point to; checked byte-for-byte
    unchanged (contents, owners, modes, times) after the test."""
    host = make_canary(tmp_path / "host")
    before = snapshot(host)
    yield host
    assert snapshot(host) == before, "the host folder outside storage changed"


@pytest.fixture
def admin_user(db):
    return User.objects.create_superuser("alice", password="alice-password-1")


@pytest.fixture
def operator(db):
    user = User.objects.create_user("oscar", password="oscar-password-1")
    user.groups.add(Group.objects.get(name=OPERATORS_GROUP))
    return user


@pytest.fixture
def stranger(db):
    """Logged in, but holds no permission: may look, may not act."""
    return User.objects.create_user("sam", password="sam-password-1")


@pytest.fixture
def run_worker():
    """Drain every queue with RQ's non-forking SimpleWorker in this process: for tests that need only a job's
    effect. How an operation runs (failure, cancel, stop, timeout, a killed job) is tested on `production_worker`."""

    def run():
        worker = SimpleWorker(
            [queues.get_queue(name) for name in settings.RQ_QUEUES], connection=queues.get_connection("default")
        )
        worker.work(burst=True)
        return worker

    return run


def worker_database_url():
    return testenv.worker_database_url()  # the test database (SQLite file or PostgreSQL), for other processes


def descendants(pid):
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


class WorkerProcess:
    """A real `manage.py rqworker` (RQ["WORKER_CLASS"], ComfyHubWorker, as `serve` starts it) in its own process
    group, sharing the test database."""

    def __init__(self, *queue_names, env=None, log_path=None):
        environment = {**os.environ, "DATABASE_URL": worker_database_url(), **(env or {})}
        self.log_path = log_path
        self.log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "manage.py"), "rqworker", *(queue_names or ("default", "long")),
             "--with-scheduler"],
            cwd=REPO, env=environment, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_until_listening(self, queue_name="default", timeout=30):
        deadline = time.monotonic() + timeout
        while queues.workers_listening(queue_name) == 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the RQ worker did not start; log: {self.log_path}")
            time.sleep(0.1)
        return self

    def drain(self, timeout=60):
        """Wait until every operation has ended and the queues are empty: what `run_worker()` does, on this worker."""
        from comfyhub.models import Operation

        def drained():
            if self.process.poll() is not None:
                raise RuntimeError(f"the RQ worker exited; log: {self.log_path}")
            return not Operation.objects.filter(status__in=Operation.ACTIVE_STATUSES).exists() and all(
                queues.get_queue(name).count == 0 and queues.get_queue(name).started_job_registry.count == 0
                for name in settings.RQ_QUEUES
            )

        wait_for(drained, timeout=timeout, interval=0.05, message="the worker to run every queued operation")
        return self

    def kill_hard(self):
        """SIGKILL the worker and its work horse (RQ puts the horse in a process group of its own)."""
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=10)

    def stop(self):
        below = descendants(self.process.pid)  # its work horse leads a process group of its own
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # Whatever outlived it: a horse busy when a test failed, RQ's scheduler process after a worker killed
        # alone (it stays in the worker's group).
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.log is not subprocess.DEVNULL:
            self.log.close()


@pytest.fixture
def worker_process(transactional_db, tmp_path):
    """Start real worker processes; they are stopped after the test."""
    started = []

    def start(*queue_names, env=None):
        worker = WorkerProcess(*queue_names, env=env, log_path=tmp_path / f"worker-{len(started)}.log")
        started.append(worker)
        return worker.wait_until_listening(queue_names[0] if queue_names else "default")

    yield start
    for worker in started:
        worker.stop()


class ProductionWorker:
    """One worker process for a test, started when first needed: `production_worker()` runs every queued operation
    (as `run_worker()` does) and `production_worker.start()` only starts it; both return the WorkerProcess."""

    def __init__(self, start):
        self._start = start
        self.process = None

    def start(self, *queue_names, env=None) -> WorkerProcess:
        if self.process is None:
            self.process = self._start(*queue_names, env=env)
        return self.process

    def __call__(self, timeout=60) -> WorkerProcess:
        return self.start().drain(timeout)


@pytest.fixture
def production_worker(worker_process):
    """The worker class production runs (ComfyHubWorker, RQ's forking worker), in a process of its own."""
    return ProductionWorker(worker_process)


def wait_for(condition, timeout=30, interval=0.1, message="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """Playwright drives Debian's Chromium: nothing can be downloaded here, and root needs --no-sandbox."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError("Chromium is missing: `make test` installs it (apt-get install chromium).")
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"],
    }


@pytest.fixture
def logged_in_page(page, live_server):
    """A browser page logged in as `alice` (superuser), through the real login form."""

    def log_in(username="alice", password="alice-password-1"):
        page.goto(f"{live_server.url}/")
        page.fill("#id_username", username)
        page.fill("#id_password", password)
        page.click("button[type=submit]")
        page.wait_for_url(f"{live_server.url}/")
        return page

    return log_in
