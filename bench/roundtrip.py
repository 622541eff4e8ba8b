"""Job round trip through the worker production runs (`manage.py rqworker`, ComfyHubWorker: RQ's forking worker).

1. Bookkeeping: `operations.enqueue(jobs.noop)` until its Operation row reads `succeeded` (the DB polled every 2 ms).
   Baseline, in the same run, on the same queue and worker process: a bare RQ enqueue of a plain function
   (bench.bare_jobs.noop) until `job.get_status(refresh=True)` reads `finished`, polled at the same interval. The worker is the same for both, so the ratio is what the Operation bookkeeping
   costs (the Redis ping, the row's INSERT, claim and finish UPDATEs, the heartbeat thread).
   Target: median(noop operation) / median(bare job) <= 1.5.
   For information, the bare function on a plain `rq worker` (no Django): what a Django-sized fork costs.
2. What a person feels: a logged-in POST of "Run diagnostics" (the dashboard's button, which enqueues an operation
   and redirects to its page) until the operation's live partial, polled as fast as it renders, shows "Running";
   one idle worker. Target: p95 <= 250 ms. Baseline, same clicks: the POST plus one render of the live partial
   (what the click would cost with a worker that took the job at once); the ratio is printed for information.
   Each click's operation is cancelled, and the worker idle again, before the next click.

Runs of part 1 rotate through its sides; before each run the previous job is finished in Redis and its worker idle
again, so every run measures one job on an idle worker.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass, field

from .environment import (
    BenchError, PrivateEnvironment, admin_client, median, ms, percentile, run, save_result, verdict, wait,
)

NAME = "roundtrip"
TARGET = 1.5
CLICK_TARGET = 0.250  # seconds, p95
RUNS = int(os.environ.get("BENCH_ROUNDTRIP_RUNS", "50"))
WARMUP = int(os.environ.get("BENCH_ROUNDTRIP_WARMUP", "5"))
CLICKS = int(os.environ.get("BENCH_ROUNDTRIP_CLICKS", "40"))
POLL_INTERVAL = float(os.environ.get("BENCH_POLL_MS", "2")) / 1000
RUN_TIMEOUT = 30.0
PLAIN_QUEUE = "bench-plain"


@dataclass
class Samples:
    total: list[float] = field(default_factory=list)
    enqueue_call: list[float] = field(default_factory=list)
    # Wall-clock stamps the processes wrote, as offsets from the job's enqueue in Redis (see timeline()).
    phases: dict[str, list[float]] = field(default_factory=dict)

    def add_phase(self, name, seconds):
        if seconds is not None:
            self.phases.setdefault(name, []).append(seconds)


_wait = functools.partial(wait, timeout=RUN_TIMEOUT, interval=POLL_INTERVAL)


def _delta(later, earlier):
    if later is None or earlier is None:
        return None
    return (later - earlier).total_seconds()


def main() -> int:
    with PrivateEnvironment(NAME) as env:
        env.setup_django()

        from redis import Redis
        from rq import Queue
        from rq.job import Job

        from comfyhub import jobs, operations, queues
        from comfyhub.models import Operation

        from . import bare_jobs

        redis = queues.get_connection("default")
        bare_redis = Redis.from_url(env.redis_url)
        bare_queue = Queue("default", connection=bare_redis)  # RQ's own Queue: no Operation row, no runner
        plain_queue = Queue(PLAIN_QUEUE, connection=bare_redis)

        workers = {
            "comfyhub": env.start_process("comfyhub-worker", [sys.executable, "manage.py", "rqworker", "default"]),
            "plain": env.start_process(
                "plain-worker", [sys.executable, "-m", "rq.cli", "worker", "-u", env.redis_url, PLAIN_QUEUE]
            ),
        }

        keys = {"comfyhub": env.worker_key(workers["comfyhub"], "comfyhub-worker", "default"),
                "plain": env.worker_key(workers["plain"], "plain-worker", PLAIN_QUEUE)}
        keys["bare"] = keys["comfyhub"]

        def idle(label):
            return redis.hget(keys[label], "state") == b"idle"

        def settle(label, job_id, conn):
            """The job is finished in Redis and the worker is back to idle: the next run starts clean."""
            _wait(lambda: Job.fetch(job_id, connection=conn).get_status() == "finished" and idle(label),
                  f"the {label} worker to go idle")

        def timeline(samples, rq_job, extra=()):
            # Wall-clock stamps from the processes (one host, one clock): where the time goes.
            samples.add_phase(
                "enqueued -> rq started (dequeue, fork, prepare)", _delta(rq_job.started_at, rq_job.enqueued_at)
            )
            for name, later, earlier in extra:
                samples.add_phase(name, _delta(later, earlier))
            samples.add_phase("rq started -> rq ended (job.perform)", _delta(rq_job.ended_at, rq_job.started_at))

        def comfyhub_once(samples, record):
            start = time.perf_counter()
            operation = operations.enqueue(jobs.noop)
            enqueued = time.perf_counter()

            def succeeded():
                status = Operation.objects.filter(pk=operation.pk).values_list("status", flat=True).first()
                if status in (Operation.Status.FAILED, Operation.Status.CANCELLED):
                    row = Operation.objects.get(pk=operation.pk)
                    raise BenchError(f"the noop operation {status}: {row.error}\n{env.log_tail('comfyhub-worker')}")
                return status == Operation.Status.SUCCEEDED

            _wait(succeeded, "the noop operation to succeed")
            end = time.perf_counter()
            settle("comfyhub", str(operation.pk), redis)
            if record:
                samples.total.append(end - start)
                samples.enqueue_call.append(enqueued - start)
                row = Operation.objects.get(pk=operation.pk)
                rq_job = Job.fetch(str(operation.pk), connection=redis)
                samples.add_phase(
                    "row created -> enqueued (INSERT commit, push)", _delta(rq_job.enqueued_at, row.created_at)
                )
                timeline(
                    samples,
                    rq_job,
                    extra=[
                        # row.started_at / finished_at are stamped just before the claim / finish UPDATE runs.
                        ("rq started -> runner starts (job import)", row.started_at, rq_job.started_at),
                        ("runner: DB connect, claim UPDATE, heartbeat thread, job", row.finished_at, row.started_at),
                        ("runner: finish UPDATE, heartbeat join -> rq ended", rq_job.ended_at, row.finished_at),
                    ],
                )

        def bare_once_on(queue, label):
            def once(samples, record):
                start = time.perf_counter()
                job = queue.enqueue(bare_jobs.noop)
                enqueued = time.perf_counter()

                def finished():
                    status = job.get_status(refresh=True)
                    if status == "failed":
                        raise BenchError(f"the {label} job failed:\n{env.log_tail(label + '-worker')}")
                    return status == "finished"

                _wait(finished, f"the {label} job to finish")
                end = time.perf_counter()
                settle(label, job.id, bare_redis)
                if record:
                    samples.total.append(end - start)
                    samples.enqueue_call.append(enqueued - start)
                    timeline(samples, Job.fetch(job.id, connection=bare_redis))

            return once

        comfyhub, bare, plain = Samples(), Samples(), Samples()
        sides = [(comfyhub_once, comfyhub), (bare_once_on(bare_queue, "bare"), bare),
                 (bare_once_on(plain_queue, "plain"), plain)]
        for number in range(WARMUP + RUNS):
            record = number >= WARMUP
            # Rotate which goes first, so drift (other load on the host) hits all alike.
            shift = number % len(sides)
            for once, samples in sides[shift:] + sides[:shift]:
                once(samples, record)

        # --- Part 2: click -> the page shows running --------------------------------------------------------
        _, client = admin_client()
        clicks, page_only = [], []
        for number in range(WARMUP + CLICKS):
            start = time.perf_counter()
            response = client.post("/diagnostics/")
            posted = time.perf_counter()
            if response.status_code != 302 or not response["Location"].startswith("/operations/"):
                raise BenchError(f"Run diagnostics answered {response.status_code} {response.get('Location')}")
            live = response["Location"] + "live/"
            first_render = None
            while True:
                before = time.perf_counter()
                body = client.get(live).content
                if first_render is None:
                    first_render = time.perf_counter() - before
                if b"badge-running" in body:
                    break
                if b"badge-queued" not in body:
                    raise BenchError(f"the diagnostics operation ended before it showed running:\n"
                                     f"{env.log_tail('comfyhub-worker')}")
                if time.perf_counter() - start > RUN_TIMEOUT:
                    raise BenchError("timed out waiting for the operation page to show running")
                time.sleep(POLL_INTERVAL)
            shown = time.perf_counter()
            operation = Operation.objects.get(pk=response["Location"].split("/")[2])
            operations.operation_cancel(operation=operation)  # frees the worker for the next click
            _wait(lambda: idle("comfyhub"), "the worker to go idle after the cancel")
            if number >= WARMUP:
                clicks.append(shown - start)
                page_only.append(posted - start + first_render)

    ratio = median(comfyhub.total) / median(bare.total)
    django_fork = median(bare.total) / median(plain.total)
    click_p95 = percentile(clicks, 0.95)
    click_ratio = click_p95 / percentile(page_only, 0.95)
    ok = ratio <= TARGET and click_p95 <= CLICK_TARGET
    print(f"{NAME}: {RUNS} sequential runs each, polled every {POLL_INTERVAL * 1000:.0f} ms", flush=True)
    for label, samples in (("noop operation (manage.py rqworker)", comfyhub),
                           ("bare rq job (same manage.py rqworker)", bare), ("bare rq job (plain rq worker)", plain)):
        print(
            f"  {label:38s} median {ms(median(samples.total)):>9s}  p90 {ms(percentile(samples.total, 0.9)):>9s}"
            f"  (enqueue call median {ms(median(samples.enqueue_call))})"
        )
        for phase, values in samples.phases.items():
            print(f"      {phase:66s} median {ms(median(values)):>9s}  p90 {ms(percentile(values, 0.9)):>9s}")
    print(
        f"{NAME}: for information, a Django-sized worker against a plain `rq worker` (the same bare job): ratio "
        f"{django_fork:.2f}, {ms(median(bare.total) - median(plain.total))} more",
        flush=True,
    )
    print(
        f"{NAME}: bookkeeping: noop operation median {ms(median(comfyhub.total))} p90 "
        f"{ms(percentile(comfyhub.total, 0.9))} | baseline bare rq job on the same worker median "
        f"{ms(median(bare.total))} p90 {ms(percentile(bare.total, 0.9))} | ratio {ratio:.2f} (target <= {TARGET}) "
        f"{verdict(ratio <= TARGET)}",
        flush=True,
    )
    print(
        f"{NAME}: click -> page shows running, {CLICKS} clicks: median {ms(median(clicks))} p95 {ms(click_p95)} "
        f"(target <= {ms(CLICK_TARGET)}) {verdict(click_p95 <= CLICK_TARGET)} | baseline POST + one render of the "
        f"live partial p95 {ms(percentile(page_only, 0.95))} | ratio {click_ratio:.2f}",
        flush=True,
    )
    save_result(
        NAME,
        {
            "target_ratio": TARGET,
            "ratio": ratio,
            "target_click_p95_s": CLICK_TARGET,
            "click_p95_s": click_p95,
            "click_ratio": click_ratio,
            "pass": ok,
            "runs": RUNS,
            "comfyhub": {"total": comfyhub.total, "enqueue_call": comfyhub.enqueue_call, "phases": comfyhub.phases},
            "bare": {"total": bare.total, "enqueue_call": bare.enqueue_call, "phases": bare.phases},
            "plain": {"total": plain.total, "enqueue_call": plain.enqueue_call, "phases": plain.phases},
            "clicks": {"shown_running": clicks, "page_only": page_only},
        },
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run(main))
