"""Memory of a verification: the peak RSS of `manage.py rqworker long --burst` (and its work horse) while the
models_verify operation (full) hashes a 4 GiB file.

The file is sparse (the page cache is not RSS; what is measured is the process's own memory). The operation is
enqueued first, then the worker is started with --burst under a small wrapper process that reports
getrusage(RUSAGE_CHILDREN).ru_maxrss once the worker exits: the largest peak RSS of the worker and of every
descendant it waited for (the work horse that runs the job). /proc/<pid>/status VmHWM of the worker and of the
work horse is also sampled every SAMPLE_MS while they run, as a cross-check.
Baseline for the ratio, in the same run: the same wrapper around an idle `manage.py rqworker long --burst` (an
empty queue: Django and the worker set up, nothing run).

Target: peak RSS <= 150 MB (10^6 bytes); the ratio to the idle worker is printed for information.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .environment import BenchError, PrivateEnvironment, descendants, run, save_result, verdict

NAME = "verify_memory"
TARGET_BYTES = 150 * 10**6
FILE_SIZE = 4 << 30
SAMPLE_MS = 20
TIMEOUT = 300.0

WRAPPER = """
import json, resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print("BENCH-RUSAGE " + json.dumps({"exit": code, "maxrss_kib": usage.ru_maxrss}), flush=True)
"""


def _status(pid) -> dict[str, int]:
    """VmHWM and VmRSS of `pid`, in bytes (empty once it is gone)."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                found[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found


def _run_worker(env, label) -> dict:
    """Run the wrapped burst worker to the end; its rusage peak and the sampled VmHWM per role."""
    process = env.start_process(label, [sys.executable, "-c", WRAPPER, sys.executable, "manage.py", "rqworker",
                                        "long", "--burst"])
    sampled: dict[str, int] = {}
    roles: dict[int, str] = {}
    deadline = time.monotonic() + TIMEOUT
    while process.poll() is None:
        if time.monotonic() > deadline:
            raise BenchError(f"the {label} worker did not finish within {TIMEOUT:.0f}s:\n{env.log_tail(label)}")
        below = descendants(process.pid)
        for pid in below:
            if pid not in roles:
                # The wrapper's child is the worker; anything below the worker is a work horse.
                roles[pid] = "worker" if len(roles) == 0 else "work horse"
            peak = _status(pid).get("VmHWM", 0)
            role = roles[pid]
            sampled[role] = max(sampled.get(role, 0), peak)
        time.sleep(SAMPLE_MS / 1000)
    report = None
    for line in (env.root / f"{label}.log").read_text(errors="replace").splitlines():
        if line.startswith("BENCH-RUSAGE "):
            report = json.loads(line.split(" ", 1)[1])
    if report is None or report["exit"] != 0:
        raise BenchError(f"the {label} worker failed:\n{env.log_tail(label)}")
    return {"maxrss": report["maxrss_kib"] * 1024, "sampled": sampled}


def main() -> int:
    with PrivateEnvironment(NAME, extra_env={"COMFY_DEFAULT_INSTANCE": "false", "MODEL_HASH_BLAKE3": "false"}) as env:
        env.setup_django()

        from comfyhub import operations
        from comfyhub.models import Operation
        from storage_app import jobs, layout

        folder = layout.shared_models_dir() / "checkpoints"
        folder.mkdir(parents=True)
        big = folder / "sparse-4g.ckpt"
        with open(big, "wb") as handle:
            handle.truncate(FILE_SIZE)

        idle = _run_worker(env, "idle-worker")

        operation = operations.enqueue(jobs.verify_models, full=True)
        begin = time.perf_counter()
        busy = _run_worker(env, "verify-worker")
        seconds = time.perf_counter() - begin
        row = Operation.objects.get(pk=operation.pk)
        if row.status != Operation.Status.SUCCEEDED or (row.result or {}).get("hashed") != 1:
            raise BenchError(f"the verify operation {row.status}: {row.error or row.result}\n{row.log[-2000:]}")

    job_seconds = (row.finished_at - row.started_at).total_seconds()
    log_lines = row.log.splitlines()
    peak = max(busy["maxrss"], *busy["sampled"].values())
    idle_peak = max(idle["maxrss"], *idle["sampled"].values())
    ok = peak <= TARGET_BYTES
    mb = lambda value: f"{value / 10**6:.1f} MB"  # noqa: E731
    print(f"{NAME}: models_verify (full) of a {FILE_SIZE >> 30} GiB sparse file by `manage.py rqworker long --burst` "
          f"in {seconds:.1f}s from worker start to exit, {job_seconds:.1f}s in the job "
          f"({(FILE_SIZE >> 20) / job_seconds:.0f} MiB/s); its last log line: {log_lines[-1] if log_lines else ''}",
          flush=True)
    for label, sample in (("verifying", busy), ("idle", idle)):
        print(f"  {label:9s} ru_maxrss of the worker and what it waited for {mb(sample['maxrss'])}; sampled VmHWM "
              + ", ".join(f"{role} {mb(value)}" for role, value in sample["sampled"].items()))
    print(f"{NAME}: peak RSS {mb(peak)} | baseline idle rqworker {mb(idle_peak)} | ratio {peak / idle_peak:.2f} "
          f"(information) | target <= {mb(TARGET_BYTES)} {verdict(ok)}", flush=True)
    save_result(NAME, {"target_bytes": TARGET_BYTES, "pass": ok, "peak_bytes": peak, "idle_bytes": idle_peak,
                       "verifying": busy, "idle": idle, "seconds": seconds, "job_seconds": job_seconds})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run(main))
