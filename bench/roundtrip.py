"""Job round trip: enqueue -> running -> succeeded of the `noop` operation through a real `manage.py rqworker`.

Measured from the `operations.enqueue()` call until the Operation row reads `succeeded` (the DB polled every 2 ms).
Baseline, in the same run: a bare RQ enqueue of a plain function (bench.bare_jobs.noop) on its own queue, worked
by a plain `rq worker` (RQ's forking rq.Worker, a fork per job), measured until `job.get_status(refresh=True)`
reads `finished`, polled at the same interval. Target: median(ComfyHub) / median(bare) <= 1.5.

Also printed, for information: the same bare function through ComfyHub's own worker class (which keeps its work
horse from job to job instead of forking one per job, comfyhub/worker.py) on a queue of its own. ComfyHub / that
is what the Operation bookkeeping alone costs (the Redis ping, the row's INSERT, claim and finish UPDATEs, the
heartbeat thread), with the worker's own speed-up taken out.

Runs rotate through the three; before each run the previous job is finished in Redis and its worker idle again,
so every run measures one job on an idle worker.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from .environment import BenchError, PrivateEnvironment, run, median, ms, percentile, save_result, verdict

NAME = "roundtrip"
TARGET = 1.5
RUNS = int(os.environ.get("BENCH_ROUNDTRIP_RUNS", "50"))
WARMUP = int(os.environ.get("BENCH_ROUNDTRIP_WARMUP", "5"))
POLL_INTERVAL = float(os.environ.get("BENCH_POLL_MS", "2")) / 1000
RUN_TIMEOUT = 30.0
BARE_QUEUE = "bench-bare"
KEPT_QUEUE = "bench-kept"


@dataclass
class Samples:
    total: list[float] = field(default_factory=list)
    enqueue_call: list[float] = field(default_factory=list)
    # Wall-clock stamps the processes wrote, as offsets from the job's enqueue in Redis (see _timeline()).
    phases: dict[str, list[float]] = field(default_factory=dict)

    def add_phase(self, name, seconds):
        if seconds is not None:
            self.phases.setdefault(name, []).append(seconds)


def _wait(condition, what, timeout=RUN_TIMEOUT, interval=POLL_INTERVAL):
    deadline = time.perf_counter() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.perf_counter() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _delta(later, earlier):
    if later is None or earlier is None:
        return None
    return (later - earlier).total_seconds()


def main() -> int:
    with PrivateEnvironment(NAME) as env:
        env.setup_django()

        from redis import Redis
        from rq import Queue, Worker
        from rq.job import Job

        from comfyhub import jobs, operations, queues
        from comfyhub.models import Operation

        from . import bare_jobs

        redis = queues.get_connection("default")
        bare_redis = Redis.from_url(env.redis_url)
        bare_queue = Queue(BARE_QUEUE, connection=bare_redis)
        kept_queue = Queue(KEPT_QUEUE, connection=bare_redis)

        workers = {
            "comfyhub": env.start_process("comfyhub-worker", [sys.executable, "manage.py", "rqworker", "default"]),
            "bare": env.start_process(
                "bare-worker", [sys.executable, "-m", "rq.cli", "worker", "-u", env.redis_url, BARE_QUEUE]
            ),
            "kept": env.start_process("kept-worker", [sys.executable, "-m", "bench.bare_jobs", KEPT_QUEUE]),
        }

        def worker_key(queue_name, label):
            def listening():
                if workers[label].poll() is not None:
                    raise BenchError(f"the {label} worker exited:\n{env.log_tail(label + '-worker')}")
                found = [w for w in Worker.all(connection=redis) if queue_name in w.queue_names()]
                return found[0].key if found else None

            return _wait(listening, f"the {label} worker to listen on {queue_name}", timeout=60, interval=0.1)

        keys = {label: worker_key(queue_name, label)
                for label, queue_name in (("comfyhub", "default"), ("bare", BARE_QUEUE), ("kept", KEPT_QUEUE))}

        def settle(label, job_id, conn):
            """The job is finished in Redis and the worker is back to idle: the next run starts clean."""
            _wait(
                lambda: Job.fetch(job_id, connection=conn).get_status() == "finished"
                and redis.hget(keys[label], "state") == b"idle",
                f"the {label} worker to go idle",
            )

        def timeline(samples, rq_job, extra=()):
            # Wall-clock stamps from the processes (one host, one clock): where the time goes.
            samples.add_phase(
                "enqueued -> rq started (dequeue, horse, prepare)", _delta(rq_job.started_at, rq_job.enqueued_at)
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
                        raise BenchError(f"the bare job failed:\n{env.log_tail(label + '-worker')}")
                    return status == "finished"

                _wait(finished, f"the {label} job to finish")
                end = time.perf_counter()
                settle(label, job.id, bare_redis)
                if record:
                    samples.total.append(end - start)
                    samples.enqueue_call.append(enqueued - start)
                    timeline(samples, Job.fetch(job.id, connection=bare_redis))

            return once

        comfyhub, bare, kept = Samples(), Samples(), Samples()
        sides = [(comfyhub_once, comfyhub), (bare_once_on(bare_queue, "bare"), bare),
                 (bare_once_on(kept_queue, "kept"), kept)]
        for run in range(WARMUP + RUNS):
            record = run >= WARMUP
            # Rotate which goes first, so drift (other load on the host) hits all alike.
            shift = run % len(sides)
            for once, samples in sides[shift:] + sides[:shift]:
                once(samples, record)

    ratio = median(comfyhub.total) / median(bare.total)
    bookkeeping = median(comfyhub.total) / median(kept.total)
    ok = ratio <= TARGET
    print(f"{NAME}: {RUNS} sequential runs each, polled every {POLL_INTERVAL * 1000:.0f} ms", flush=True)
    for label, samples in (("noop operation (manage.py rqworker)", comfyhub), ("bare rq job (rq worker)", bare),
                           ("bare rq job (ComfyHubWorker)", kept)):
        print(
            f"  {label:38s} median {ms(median(samples.total)):>9s}  p90 {ms(percentile(samples.total, 0.9)):>9s}"
            f"  (enqueue call median {ms(median(samples.enqueue_call))})"
        )
        for phase, values in samples.phases.items():
            print(f"      {phase:66s} median {ms(median(values)):>9s}  p90 {ms(percentile(values, 0.9)):>9s}")
    print(
        f"{NAME}: for information, the Operation bookkeeping alone (noop operation / bare job, both on "
        f"ComfyHubWorker): ratio {bookkeeping:.2f}, {ms(median(comfyhub.total) - median(kept.total))} more",
        flush=True,
    )
    print(
        f"{NAME}: ComfyHub median {ms(median(comfyhub.total))} p90 {ms(percentile(comfyhub.total, 0.9))}"
        f" | baseline bare rq median {ms(median(bare.total))} p90 {ms(percentile(bare.total, 0.9))}"
        f" | ratio {ratio:.2f} (target <= {TARGET}) {verdict(ratio <= TARGET)}",
        flush=True,
    )
    save_result(
        NAME,
        {
            "target_ratio": TARGET,
            "ratio": ratio,
            "bookkeeping_ratio": bookkeeping,
            "pass": ok,
            "runs": RUNS,
            "comfyhub": {"total": comfyhub.total, "enqueue_call": comfyhub.enqueue_call, "phases": comfyhub.phases},
            "bare": {"total": bare.total, "enqueue_call": bare.enqueue_call, "phases": bare.phases},
            "kept": {"total": kept.total, "enqueue_call": kept.enqueue_call, "phases": kept.phases},
        },
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run(main))
