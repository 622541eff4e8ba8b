"""The dashboard (`/`) with 10 instances, then with 500.

As bench/pages.py: a superuser logs in with django.test.Client against the private SQLite database; the number of
SQL queries one request makes (CaptureQueriesContext) with 10 instances (the baseline), then in a copy of that
database filled up to 500 instances; and the median render time of REQUESTS requests per size, alternating between
the two databases. Instances are made by services.instance_create (ports, GPU assignments: GPUs 0-2 exclusive to
one instance each, GPU 3 shareable and held by every tenth instance), then given a mix of statuses and the health
record a reconcile writes (five isolation checks, some failing). No containers are needed: the page reads the
registry. Both databases hold the same 10 operations. The Docker ping is cached for the run and warmed first.

Targets: the same number of queries with 10 and 500 instances; render time ratio (500 / 10) <= 3.
"""
from __future__ import annotations

import os
import random
import re
import sys
import time
from collections import Counter

from . import docker_support
from .environment import (
    BenchError, PrivateEnvironment, admin_client, copy_database, median, ms, percentile, run, save_result,
    set_up_as_running, use_database, verdict,
)
from .pages import _operations

NAME = "dashboard_instances"
TIME_TARGET = 3.0
SMALL, LARGE = 10, 500
REQUESTS = int(os.environ.get("BENCH_PAGES_REQUESTS", "20"))
WARMUP = 3
URL = "/"
CHECKS = ("shared storage is read-only", "instance storage is its own", "GPUs match the assignment",
          "no other container writes its folders", "its port is its own")
STATUS_WEIGHTS = (("healthy", 50), ("stopped", 25), ("new", 10), ("unhealthy", 5), ("starting", 4),
                  ("crash-looping", 3), ("error", 3))


def _create_instances(first, count, rng):
    from instances import services
    from instances.models import Instance

    made = []
    for number in range(first, first + count):
        if number < 3:
            gpus = [number]  # GPUs 0, 1, 2: exclusive, one holder each
        elif number % 10 == 0:
            gpus = [3]  # shareable
        else:
            gpus = []
        made.append(services.instance_create(
            instance_id=f"inst-{number:04d}", display_name=f"Team {number % 17} ComfyUI" if number % 3 else "",
            image="", gpu_indexes=gpus,  # COMFY_IMAGE, which INSTANCE_IMAGES_ALLOWED allows by default
            extra_args=["--preview-method", "auto"] if number % 4 == 0 else [],
        ))
    statuses = [status for status, _ in STATUS_WEIGHTS]
    weights = [weight for _, weight in STATUS_WEIGHTS]
    for instance in made:
        status = rng.choices(statuses, weights)[0]
        instance.status = status
        instance.desired_state = "running" if status in ("healthy", "unhealthy", "starting", "crash-looping",
                                                         "error") else "stopped"
        if status in ("healthy", "unhealthy", "starting"):
            failing = set(rng.sample(CHECKS, 1)) if status == "unhealthy" else set()
            instance.health = {
                "checks": [{"check": name, "ok": name not in failing, "detail": f"{name}: details " * 3}
                           for name in CHECKS],
                "devices": ["cuda:0 host GPU 0 : test double"], "comfyui_version": "0.3.40",
            }
            instance.status_detail = "isolation check failed" if failing else ""
    Instance.objects.bulk_update(made, ["status", "desired_state", "health", "status_detail"], batch_size=200)
    return made


def main() -> int:
    token = docker_support.run_token(NAME)
    with PrivateEnvironment(
        NAME,
        extra_env=docker_support.extra_env(token, DOCKER_STATUS_CACHE_SECONDS="86400",
                                           INSTANCE_PORT_RANGE="20000-20999"),
    ) as env:
        env.setup_django()

        from django.contrib.contenttypes.models import ContentType
        from django.db import connection
        from django.test.utils import CaptureQueriesContext
        from django.utils import timezone

        from comfyhub.models import Operation
        from instances.models import GPU, Instance

        set_up_as_running()
        rng = random.Random(20250102)
        admin, client = admin_client()
        if GPU.objects.filter(present=True).count() < 4:
            raise BenchError("expected 4 GPUs from COMFY_GPUS=0,1,2,3")
        GPU.objects.filter(index=3).update(shareable=True)
        target_types = [(ContentType.objects.get_for_model(Instance), "instance")]
        Operation.objects.bulk_create(_operations(10, start=timezone.now(), users=[admin], target_types=target_types,
                                                  rng=rng))

        def get():
            response = client.get(URL)
            if response.status_code != 200:
                raise BenchError(f"GET {URL} answered {response.status_code}")
            return response

        def count_queries():
            for _ in range(WARMUP):
                get()
            with CaptureQueriesContext(connection) as captured:
                response = get()
            sql = [query["sql"] for query in captured.captured_queries]
            rows = len(re.findall(rb'<tr data-instance="', response.content))
            return {"queries": len(sql), "sql": sql, "rows_shown": rows, "bytes": len(response.content),
                    "times": []}

        started = time.perf_counter()
        _create_instances(0, SMALL, rng)
        small = count_queries()

        small_db, large_db = copy_database(connection, "comfyhub-500.sqlite3")
        _create_instances(SMALL, LARGE - SMALL, rng)
        if Instance.objects.count() != LARGE:
            raise BenchError(f"expected {LARGE} instances, found {Instance.objects.count()}")
        setup_seconds = time.perf_counter() - started
        large = count_queries()

        databases = {"small": (small_db, small), "large": (large_db, large)}
        for number in range(REQUESTS):
            for size in ("small", "large") if number % 2 == 0 else ("large", "small"):
                path, results = databases[size]
                use_database(connection, path)
                connection.ensure_connection()
                begin = time.perf_counter()
                get()
                results["times"].append(time.perf_counter() - begin)

    same_queries = small["queries"] == large["queries"]
    ratio = median(large["times"]) / median(small["times"])
    ok = same_queries and ratio <= TIME_TARGET
    print(f"{NAME}: {REQUESTS} requests per size; rows shown {small['rows_shown']} vs {large['rows_shown']}, "
          f"page {small['bytes'] / 1024:.0f} KiB vs {large['bytes'] / 1024:.0f} KiB; instances made in "
          f"{setup_seconds:.1f}s", flush=True)
    print(f"{NAME}: dashboard ({URL}) queries {small['queries']} with {SMALL} vs {large['queries']} with {LARGE} "
          f"({verdict(same_queries)} same) | render median {ms(median(small['times']))} -> "
          f"{ms(median(large['times']))} (p90 {ms(percentile(small['times'], 0.9))} -> "
          f"{ms(percentile(large['times'], 0.9))}), ratio {ratio:.2f} vs the {SMALL}-instance baseline "
          f"(target <= {TIME_TARGET:g}) {verdict(ok)}", flush=True)
    if not same_queries:
        more = Counter(large["sql"]) - Counter(small["sql"])
        print("    extra queries with 500: " + (" | ".join(f"{n} x {sql[:200]}" for sql, n in more.items())
                                                or "(none; fewer than with 10)"))
    save_result(NAME, {"time_target": TIME_TARGET, "ratio": ratio, "pass": ok, "small": small, "large": large})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run(main))
