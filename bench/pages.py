"""Dashboard (`/`) and operations list (`/operations/`) with 10 operations, then with 10,000.

A superuser logs in with django.test.Client against the private SQLite database. For each page: the number of SQL
queries one request makes (CaptureQueriesContext) with 10 Operation rows (the baseline), then in a copy of that
database bulk-filled up to 10,000 rows; and the median render time of REQUESTS requests per size, the requests
alternating between the two databases so that other load on the host hits both alike. The rows mix statuses,
kinds, targets and requesters. The dashboard's Docker ping is cached per process (DOCKER_STATUS_CACHE_SECONDS is
raised so the cache cannot expire mid-run) and warmed before timing; its Redis calls hit the private Redis both
times.

Targets per page: the same number of queries with 10 and 10,000 rows; render time ratio (10k / 10) <= 2.
"""
from __future__ import annotations

import os
import random
import re
import sys
import time
from collections import Counter
from datetime import timedelta

from .environment import (
    BenchError, PrivateEnvironment, admin_client, copy_database, median, ms, percentile, run, save_result,
    set_up_as_running, use_database, verdict,
)

NAME = "pages"
TIME_TARGET = 2.0
SMALL, LARGE = 10, 10_000
REQUESTS = int(os.environ.get("BENCH_PAGES_REQUESTS", "20"))
WARMUP = 3
PAGES = (("dashboard", "/"), ("operations list", "/operations/"))
STATUS_WEIGHTS = (("succeeded", 60), ("failed", 15), ("cancelled", 5), ("running", 10), ("queued", 10))


def _operations(count, *, start, users, target_types, rng):
    """`count` unsaved Operation rows, newest first from `start` backwards, statuses and kinds mixed."""
    from comfyhub.models import Operation
    from comfyhub.operations import kind_choices

    kinds = [kind for kind, _ in kind_choices()] or ["noop"]
    statuses = [status for status, _ in STATUS_WEIGHTS]
    weights = [weight for _, weight in STATUS_WEIGHTS]
    rows = []
    for index in range(count):
        created = start - timedelta(seconds=37 * index + rng.randint(0, 30))
        status = rng.choices(statuses, weights)[0]
        row = Operation(
            kind=rng.choice(kinds),
            queue_name=rng.choice(("default", "default", "long")),
            status=status,
            created_at=created,
            requested_by=rng.choice(users) if rng.random() < 0.7 else None,
        )
        if rng.random() < 0.6:
            content_type, label = rng.choice(target_types)
            row.target_type = content_type
            row.target_id = str(rng.randint(1, 500))
            row.target_label = f"{label} {row.target_id}"
        if status != "queued":
            row.started_at = created + timedelta(seconds=rng.uniform(0.01, 2))
            row.heartbeat_at = row.started_at
            row.worker_name = f"worker-{rng.randint(1, 4)}"
            lines = rng.randint(1, 40)
            row.log = "\n".join(f"2025-01-01 00:00:{n % 60:02d} INFO step {n} of {lines}" for n in range(1, lines + 1))
        if status == "running":
            row.progress = rng.randint(1, 99)
            row.progress_message = "working"
        elif status in ("succeeded", "failed", "cancelled"):
            row.finished_at = row.started_at + timedelta(seconds=rng.uniform(0.05, 600))
            row.progress = 100 if status == "succeeded" else rng.randint(0, 99)
        if status == "succeeded":
            row.result = {"ok": True, "items": rng.randint(0, 50)}
        elif status == "failed":
            row.error = "Something went wrong; fix it and run it again."
            row.traceback = "Traceback (most recent call last):\n" + '  File "x.py", line 1, in <module>\n' * 20
        rows.append(row)
    return rows


def main() -> int:
    with PrivateEnvironment(
        NAME,
        extra_env={"DOCKER_STATUS_CACHE_SECONDS": "86400"},
    ) as env:
        env.setup_django()

        from django.contrib.auth.models import User
        from django.contrib.contenttypes.models import ContentType
        from django.db import connection
        from django.test.utils import CaptureQueriesContext
        from django.utils import timezone

        from comfyhub.models import Operation

        set_up_as_running()
        rng = random.Random(20250101)
        admin, client = admin_client()
        users = [admin] + [User.objects.create_user(f"user{n}", password=None) for n in range(1, 6)]
        target_types = [(ContentType.objects.get_for_model(User), "user")] + [
            (content_type, content_type.model) for content_type in ContentType.objects.exclude(app_label="auth")[:4]
        ]
        now = timezone.now()

        def get(url):
            response = client.get(url)
            if response.status_code != 200:
                raise BenchError(f"GET {url} answered {response.status_code}")
            return response

        def count_queries(url):
            for _ in range(WARMUP):  # also warms the Docker status cache and the template cache
                get(url)
            with CaptureQueriesContext(connection) as captured:
                response = get(url)
            # Read them now: the next request's request_started signal empties the connection's query log.
            sql = [query["sql"] for query in captured.captured_queries]
            rows = len(re.findall(rb'<a href="/operations/[0-9a-f-]{36}/"', response.content))
            return {"queries": len(sql), "sql": sql, "rows_shown": rows, "times": []}

        # 10 operations: count the queries.
        Operation.objects.bulk_create(_operations(SMALL, start=now, users=users, target_types=target_types, rng=rng))
        small = {label: count_queries(url) for label, url in PAGES}

        # 10,000 operations, in a copy of that database (same users, session and first ten rows), so the timed
        # requests can alternate between the two: load elsewhere on the host then hits both sizes alike.
        small_db, large_db = copy_database(connection, "comfyhub-10k.sqlite3")
        # Older than the first ten (the pages' first rows stay comparable); batched like a long history.
        oldest = Operation.objects.order_by("created_at").values_list("created_at", flat=True).first()
        Operation.objects.bulk_create(
            _operations(LARGE - SMALL, start=oldest - timedelta(seconds=60), users=users,
                        target_types=target_types, rng=rng),
            batch_size=500,
        )
        if Operation.objects.count() != LARGE:
            raise BenchError(f"expected {LARGE} operations, found {Operation.objects.count()}")
        large = {label: count_queries(url) for label, url in PAGES}

        # Render times: REQUESTS per page and size, alternating sizes (and which goes first).
        databases = {"small": (small_db, small), "large": (large_db, large)}
        for label, url in PAGES:
            for run in range(REQUESTS):
                for size in ("small", "large") if run % 2 == 0 else ("large", "small"):
                    path, results = databases[size]
                    use_database(connection, path)
                    connection.ensure_connection()  # connecting is not what is measured
                    start = time.perf_counter()
                    get(url)
                    results[label]["times"].append(time.perf_counter() - start)

    ok_all = True
    lines = []
    for label, url in PAGES:
        a, b = small[label], large[label]
        same_queries = a["queries"] == b["queries"]
        ratio = median(b["times"]) / median(a["times"])
        ok = same_queries and ratio <= TIME_TARGET
        ok_all &= ok
        lines.append(
            f"{NAME}: {label} ({url}) queries {a['queries']} with {SMALL} vs {b['queries']} with {LARGE:,} "
            f"({verdict(same_queries)} same) | render median {ms(median(a['times']))} -> {ms(median(b['times']))}"
            f" (p90 {ms(percentile(a['times'], 0.9))} -> {ms(percentile(b['times'], 0.9))}), "
            f"ratio {ratio:.2f} vs the {SMALL}-row baseline (target <= {TIME_TARGET:g}) {verdict(ok)}"
        )
        if not same_queries:
            more = Counter(b["sql"]) - Counter(a["sql"])
            listed = " | ".join(f"{count} x {sql[:200]}" for sql, count in more.items())
            lines.append(f"    extra queries with {LARGE:,} rows: {listed or '(none; fewer than with 10)'}")
    print(f"{NAME}: {REQUESTS} requests per page and size"
          + "; rows shown (10 vs 10k): "
          + ", ".join(f"{label} {small[label]['rows_shown']} vs {large[label]['rows_shown']}" for label, _ in PAGES),
          flush=True)
    for line in lines:
        print(line, flush=True)
    save_result(
        NAME,
        {"time_target": TIME_TARGET, "pass": ok_all, "small": small, "large": large},
    )
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(run(main))
