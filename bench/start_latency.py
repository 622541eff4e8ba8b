"""Instance start: enqueue -> healthy of an instance on the ComfyUI test double, through a real worker process.

Measured from the `services.instance_start()` call until the start operation's row reads `succeeded` (the DB polled
every BENCH_POLL_MS, default 2 ms); the start job itself creates and starts the container with ComfyHub's Docker
adapter and waits until ComfyUI answers /system_stats. The worker is `manage.py rqworker default`.
Baseline, in the same run: `docker run -d` of the same image with the same arguments (environment, labels, mounts,
port binding, restart policy, init, shm size, log options, GPU request: runtime.container_spec translated to the
CLI), started by a subprocess, plus the same health wait: http://127.0.0.1:PORT/system_stats polled every
BENCH_HTTP_POLL_MS (default 10 ms) until it answers 200. Every run is a cold container start: the container is
removed (by name) after each run, outside the timed part. Runs alternate between the two.

It also prints where the time goes: the rows' stamps (operation created/started/finished, instance started_at
stamped right after the engine's start call returned) and the moment the double printed "To see the GUI" (that is,
listens), read from `docker logs --timestamps` (one host, one clock).

Target: median(ComfyHub) / median(docker run) <= 1.3.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone as dt_timezone

from . import docker_support
from .environment import BenchError, PrivateEnvironment, median, ms, percentile, run, save_result, verdict, wait

NAME = "start_latency"
TARGET = 1.3
RUNS = int(os.environ.get("BENCH_START_RUNS", "8"))
WARMUP = 1
POLL_INTERVAL = float(os.environ.get("BENCH_POLL_MS", "2")) / 1000
HTTP_POLL_INTERVAL = float(os.environ.get("BENCH_HTTP_POLL_MS", "10")) / 1000
RUN_TIMEOUT = 120.0
DIAGNOSTIC_RUNS = 3
INSTANCE_ID = "bench-start"
LISTENING = "To see the GUI go to"


_wait = functools.partial(wait, timeout=RUN_TIMEOUT, interval=POLL_INTERVAL)


def _docker_time(value: str) -> datetime | None:
    """RFC 3339 with nanoseconds (Docker's) -> aware datetime (microseconds)."""
    if not value or value.startswith("0001-"):
        return None
    stamp, _, rest = value.partition(".")
    fraction = "".join(ch for ch in rest if ch.isdigit())[:6].ljust(6, "0")
    return datetime.fromisoformat(f"{stamp}.{fraction}+00:00")


def _listening_at(engine, name) -> datetime | None:
    raw = engine.api.logs(name, stdout=True, stderr=True, timestamps=True).decode("utf-8", errors="replace")
    for line in raw.splitlines():
        if LISTENING in line:
            return _docker_time(line.split(" ", 1)[0])
    return None


def _delta(later, earlier):
    if later is None or earlier is None:
        return None
    return (later - earlier).total_seconds()


def main() -> int:
    token = docker_support.run_token(NAME)
    engine, image = docker_support.client()
    with PrivateEnvironment(NAME, extra_env=docker_support.extra_env(token, INSTANCE_PORT_RANGE="41800-41899")) as env:
        try:
            return _measure(env, engine, image, token)
        finally:
            docker_support.clean_up(engine, NAME, token)


def _measure(env, engine, image, token) -> int:
    env.setup_django()

    from comfyhub.models import Operation
    from instances import runtime, services
    from instances.models import Instance

    worker = env.start_process("worker", [sys.executable, "manage.py", "rqworker", "default"])
    env.worker_key(worker, "worker", "default")

    instance = services.instance_create(instance_id=INSTANCE_ID, image=image, gpu_indexes=[0])
    container = instance.container_name
    baseline_name = f"bench-docker-run-{token}"
    start, end = services.port_range_setting()
    baseline_port = next(port for port in range(start, end + 1) if port != instance.host_port
                         and not services.port_bound_on_host(instance.node.bind_address, port))

    def remove(name):
        import docker.errors

        try:
            engine.api.remove_container(name, force=True)
        except docker.errors.NotFound:
            pass

    comfyhub = {"total": [], "enqueue_call": [], "phases": {}}
    baseline = {"total": [], "run_call": [], "phases": {}}

    def add(samples, phase, seconds):
        if seconds is not None:
            samples["phases"].setdefault(phase, []).append(seconds)

    def comfyhub_once(record):
        wall_start = datetime.now(dt_timezone.utc)
        begin = time.perf_counter()
        operation = services.instance_start(instance=instance)
        enqueued = time.perf_counter()

        def succeeded():
            status = Operation.objects.filter(pk=operation.pk).values_list("status", flat=True).first()
            if status in (Operation.Status.FAILED, Operation.Status.CANCELLED):
                row = Operation.objects.get(pk=operation.pk)
                raise BenchError(f"the start operation {status}: {row.error}\n{row.log}\n{env.log_tail('worker')}")
            return status == Operation.Status.SUCCEEDED

        _wait(succeeded, "the start operation to succeed")
        finish = time.perf_counter()
        row = Operation.objects.get(pk=operation.pk)
        started_at = Instance.objects.filter(pk=instance.pk).values_list("started_at", flat=True).first()
        inspected = engine.api.inspect_container(container)
        state, created = inspected["State"], _docker_time(inspected.get("Created", ""))
        listening_at = _listening_at(engine, container)
        remove(container)
        if record:
            comfyhub["total"].append(finish - begin)
            comfyhub["enqueue_call"].append(enqueued - begin)
            add(comfyhub, "call -> worker claims the row (enqueue, dequeue, fork)", _delta(row.started_at, wall_start))
            add(comfyhub, "claimed -> engine start returned (lock, ping, dirs, image, create, start)",
                _delta(started_at, row.started_at))
            add(comfyhub, "  of which: claimed -> Docker's Created stamp (lock, ping, dirs, image, inspect)",
                _delta(created, row.started_at))
            add(comfyhub, "  of which: Docker Created -> StartedAt (create returns, start call, runc)",
                _delta(_docker_time(state.get("StartedAt", "")), created))
            add(comfyhub, "  of which: Docker StartedAt -> engine start call returned",
                _delta(started_at, _docker_time(state.get("StartedAt", ""))))
            add(comfyhub, "start returned -> ComfyUI listens (container boot, python)",
                _delta(listening_at, started_at))
            add(comfyhub, "ComfyUI listens -> row succeeded (health wait, 0.5 s sleeps)",
                _delta(row.finished_at, listening_at))

    spec = runtime.container_spec(instance)
    argv = docker_support.docker_run_argv(spec, name=baseline_name, host_port=baseline_port)
    url = f"http://127.0.0.1:{baseline_port}/system_stats"

    def baseline_once(record):
        wall_start = datetime.now(dt_timezone.utc)
        begin = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        returned = time.perf_counter()
        wall_returned = datetime.now(dt_timezone.utc)
        if done.returncode != 0:
            raise BenchError(f"docker run failed: {done.stderr.strip()[:800]}")
        healthy = docker_support.wait_http(url, timeout=RUN_TIMEOUT, interval=HTTP_POLL_INTERVAL)
        listening_at = _listening_at(engine, baseline_name)
        inspected = engine.api.inspect_container(baseline_name)
        state, created = inspected["State"], _docker_time(inspected.get("Created", ""))
        remove(baseline_name)
        if record:
            baseline["total"].append(healthy - begin)
            baseline["run_call"].append(returned - begin)
            add(baseline, "call -> Docker StartedAt (CLI, create, start)",
                _delta(_docker_time(state.get("StartedAt", "")), wall_start))
            add(baseline, "  of which: call -> Docker's Created stamp (CLI start-up, create request)",
                _delta(created, wall_start))
            add(baseline, "  of which: Docker Created -> StartedAt (create returns, start call, runc)",
                _delta(_docker_time(state.get("StartedAt", "")), created))
            add(baseline, "docker run returned -> ComfyUI listens", _delta(listening_at, wall_returned))
            add(baseline, "ComfyUI listens -> 200 seen (health wait)",
                _delta(wall_start + timedelta(seconds=healthy - begin), listening_at))

    remove(container)
    remove(baseline_name)
    for number in range(WARMUP + RUNS):
        record = number >= WARMUP
        pair = [comfyhub_once, baseline_once]
        for once in pair if number % 2 == 0 else reversed(pair):
            once(record)

    steps = _adapter_steps(instance, spec, baseline_name, baseline_port, remove)

    ratio = median(comfyhub["total"]) / median(baseline["total"])
    ok = ratio <= TARGET
    print(f"{NAME}: {RUNS} cold starts each (after {WARMUP} warm-up), image {image}, GPU 0 requested; DB polled "
          f"every {POLL_INTERVAL * 1000:g} ms, the baseline's /system_stats every {HTTP_POLL_INTERVAL * 1000:g} ms", flush=True)
    for label, samples, call in (("ComfyHub start operation (rqworker)", comfyhub, "enqueue call"),
                                 ("docker run -d + health wait", baseline, "docker run call")):
        calls = samples["enqueue_call"] if "enqueue_call" in samples else samples["run_call"]
        print(f"  {label:38s} median {ms(median(samples['total'])):>10s}  p90 "
              f"{ms(percentile(samples['total'], 0.9)):>10s}  ({call} median {ms(median(calls))})")
        for phase, values in samples["phases"].items():
            print(f"      {phase:74s} median {ms(median(values)):>10s}  p90 {ms(percentile(values, 0.9)):>10s}")
    print(f"  the start job's engine steps (containers.start), timed in this process on the baseline's name and port, "
          f"median of {DIAGNOSTIC_RUNS}:")
    for step, values in steps.items():
        print(f"      {step:74s} median {ms(median(values)):>10s}")
    print(f"{NAME}: ComfyHub median {ms(median(comfyhub['total']))} | baseline docker run median "
          f"{ms(median(baseline['total']))} | ratio {ratio:.2f} (target <= {TARGET}) {verdict(ok)}", flush=True)
    save_result(NAME, {"target_ratio": TARGET, "ratio": ratio, "pass": ok, "runs": RUNS,
                       "comfyhub": comfyhub, "baseline": baseline, "engine_steps": steps,
                       "docker_run_argv": argv})
    return 0 if ok else 1


def _adapter_steps(instance, spec, name, port, remove) -> dict[str, list[float]]:
    """The calls containers.start() makes before its health wait, one by one (not part of the ratio)."""
    import dataclasses

    from instances import containers, docker_engine

    class _Quiet:
        def log(self, *args, **kwargs):
            pass

        progress = log

    spec = dataclasses.replace(spec, name=name, host_port=port)
    steps: dict[str, list[float]] = {}
    for _ in range(DIAGNOSTIC_RUNS):
        remove(name)
        marks = [("", time.perf_counter())]

        def mark(label):
            marks.append((label, time.perf_counter()))

        with containers.instance_lock(instance):
            mark("Redis instance lock acquired")
            engine = docker_engine.require_engine(None)
            mark("require_engine (new client, version negotiation, ping)")
            containers.build_directories(instance, _Quiet())
            mark("build_directories")
            docker_engine.image_id(engine, spec.image)
            mark("image_id (inspect image: there, and its id)")
            docker_engine.container_state(engine, spec.name)
            mark("container_state (inspect: none yet)")
            docker_engine.create_container(engine, spec)
            mark("create_container (SDK create + inspect)")
            docker_engine.start_container(engine, spec.name)
            mark("start_container")
            docker_engine.container_state(engine, spec.name)
            mark("container_state (inspect)")
            engine.close()
        mark("lock released")
        for (_, before), (label, after) in zip(marks, marks[1:]):
            steps.setdefault(label, []).append(after - before)
    remove(name)
    return steps


if __name__ == "__main__":
    sys.exit(run(main))
