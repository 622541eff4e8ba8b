"""`python -m bench [NAME ...]`: run every benchmark (or the named ones), each in a process of its own.

Exits 0 when every target is met, 1 when one is missed, 2 when a benchmark could not run, 130 when interrupted.
"""
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import BENCHMARKS

REPO = Path(__file__).resolve().parent.parent
SIGNALS = (signal.SIGTERM, signal.SIGINT)
DOCKER_BENCHMARKS = {"start_latency", "reconcile", "proxy"}


def main(argv):
    names = argv or list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    engine = _engine_for(names)
    try:
        return _run_all(names)
    finally:
        if engine is not None and engine.started_here:
            engine.stop()


def _engine_for(names):
    """The benchmarks that start containers get the engine the test suite uses: the one that answers, or a dockerd
    started now (as root) and stopped at the end. Without one they say they could not run."""
    if not DOCKER_BENCHMARKS & set(names):
        return None
    from tests.support.engine import EngineUnavailable, ensure_engine

    try:
        return ensure_engine()
    except EngineUnavailable as exc:
        print(f"bench: no Docker engine for {', '.join(sorted(DOCKER_BENCHMARKS & set(names)))}: {exc}", flush=True)
        return None


def _run_all(names):
    outcomes = {}
    for name in names:
        started = time.monotonic()
        print(f"== {name}", flush=True)
        # A process per benchmark: each sets up its private environment before Django is imported.
        process = subprocess.Popen([sys.executable, "-m", f"bench.{name}"], cwd=REPO)
        forward = lambda signum, frame: process.send_signal(signum)  # noqa: E731
        handlers = {signum: signal.signal(signum, forward) for signum in SIGNALS}
        try:
            code = process.wait()  # on SIGTERM/SIGINT the benchmark cleans up, then exits
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        if code in (-signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGINT):
            print(f"== {name}: interrupted", flush=True)
            return 130
        outcomes[name] = "PASS" if code == 0 else "FAIL" if code == 1 else f"ERROR (exit {code})"
        print(f"== {name}: {outcomes[name]} in {time.monotonic() - started:.0f}s", flush=True)
    print("bench: " + ", ".join(f"{name} {outcome}" for name, outcome in outcomes.items()))
    if any(outcome.startswith("ERROR") for outcome in outcomes.values()):
        return 2
    return 0 if all(outcome == "PASS" for outcome in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
