"""What-if switches for the round-trip benchmark: measure a proposed change without editing the project.

`BENCH_WHATIF=wal,warm-worker` (comma-separated) turns them on; the default run measures the project as it is.
Each switch emulates one change suggested in bench/README.md, as closely as a benchmark can from outside:

  wal                  SQLite in WAL mode with synchronous=NORMAL (passed as DATABASE_URL ?init_command=...,
                       i.e. DATABASES OPTIONS "init_command"), for every process.
  warm-worker          the ComfyHub worker imports the apps' job modules and runs one Operation query before it
                       starts forking, so each work horse inherits a warm ORM (compiler module, model caches).
  redis-client         comfyhub.queues keeps one Redis client per process instead of a new client (and socket,
                       and handshake) per get_connection()/get_queue() call; in this process and the worker.
  no-heartbeat-thread  the runner starts no heartbeat thread in the work horse (as if the heartbeat came from the
                       worker's own monitoring loop or RQ's job heartbeat instead).
  simple-worker        the ComfyHub worker runs jobs in-process (rq.SimpleWorker, no fork per job). The baseline
                       still forks, so this is NOT the like-for-like comparison the target asks for: it shows how
                       much of the gap is the fork of a Django-sized worker and the horse's fresh DB connection.
  fast-health-poll     (start_latency) the start job's health wait (instances.containers._wait_until_healthy)
                       sleeps at most 50 ms between /system_stats probes instead of 0.5 s.
"""
from __future__ import annotations

import os

SWITCHES = ("wal", "warm-worker", "redis-client", "no-heartbeat-thread", "simple-worker", "fast-health-poll")
WAL_INIT_COMMAND = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL"

# Run by `python -c` as the ComfyHub worker when a switch needs to act inside it: argv = switches, manage.py args.
WORKER_LAUNCHER = """
import os, sys
sys.path.insert(0, os.getcwd())
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "comfyhub.settings")
import django
django.setup()
from bench import whatif
whatif.apply_in_worker(sys.argv[1].split(","))
from django.core.management import execute_from_command_line
execute_from_command_line(["manage.py", *sys.argv[2:]])
"""


def selected() -> list[str]:
    names = [name.strip() for name in os.environ.get("BENCH_WHATIF", "").split(",") if name.strip()]
    unknown = sorted(set(names) - set(SWITCHES))
    if unknown:
        raise SystemExit(f"BENCH_WHATIF: unknown switch(es) {', '.join(unknown)}; known: {', '.join(SWITCHES)}")
    return names


def sqlite_init_command(names) -> str:
    return WAL_INIT_COMMAND if "wal" in names else ""


def worker_argv(python: str, names, manage_args: list[str]) -> list[str]:
    if "simple-worker" in names:
        manage_args = [*manage_args, "--worker-class", "rq.SimpleWorker"]
    inside = [name for name in names
              if name in ("warm-worker", "redis-client", "no-heartbeat-thread", "fast-health-poll")]
    if not inside:
        return [python, "manage.py", *manage_args]
    return [python, "-c", WORKER_LAUNCHER, ",".join(inside), *manage_args]


def apply_in_client(names):
    """In the benchmark's own process (the side that calls enqueue())."""
    if "redis-client" in names:
        _cache_redis_clients()


def apply_in_worker(names):
    if "redis-client" in names:
        _cache_redis_clients()
    if "no-heartbeat-thread" in names:
        from comfyhub import operations

        operations._Heartbeat.start = lambda self: None
        operations._Heartbeat.join = lambda self, timeout=None: None
    if "fast-health-poll" in names:
        _fast_health_poll()
    if "warm-worker" in names:
        _warm_orm()


def _fast_health_poll():
    import time
    import types

    from instances import containers

    containers.time = types.SimpleNamespace(
        monotonic=time.monotonic, sleep=lambda seconds: time.sleep(min(seconds, 0.05))
    )


def _cache_redis_clients():
    import django_rq
    from django.conf import settings
    from redis import Redis

    from comfyhub import queues

    clients = {}

    def get_connection(name="default"):
        config = settings.RQ_QUEUES[name]
        client = clients.get(config["URL"])
        if client is None:
            client = clients[config["URL"]] = Redis.from_url(config["URL"], **config.get("CONNECTION_KWARGS", {}))
        return client

    def get_queue(name="default"):
        return django_rq.get_queue(name, connection=get_connection(name))

    queues.get_connection = get_connection
    queues.get_queue = get_queue


def _warm_orm():
    import importlib
    import uuid

    from django.apps import apps
    from django.db import connections

    for config in apps.get_app_configs():
        try:
            importlib.import_module(f"{config.name}.jobs")
        except ModuleNotFoundError as exc:
            if exc.name != f"{config.name}.jobs":
                raise
    from comfyhub.models import Operation

    nobody = uuid.UUID(int=0)
    Operation.objects.filter(pk=nobody, status=Operation.Status.QUEUED).update(status=Operation.Status.QUEUED)
    Operation.objects.filter(pk=nobody).values_list("status", flat=True).first()
    connections.close_all()
