"""Background jobs that belong to ComfyHub itself rather than to instances or storage."""
import os
import time

from django.conf import settings
from django.db import connection

from . import queues
from .operations import OperationError, operation_job, operations_sweep


@operation_job("diagnostics", label="Diagnostics")
def diagnostics(report, *, pause: float = 0.0):
    """Check every part ComfyHub depends on and report each one; fails if a required part is broken.

    `pause` spaces the steps out so a person can watch the progress (the dashboard uses a short one).
    """
    from instances.docker_engine import engine_status

    checks = []

    def step(percent, name, ok, detail):
        checks.append({"check": name, "ok": ok, "detail": detail})
        report.log(f"{'ok ' if ok else 'FAIL'} {name}: {detail}", "INFO" if ok else "WARNING")
        report.progress(percent, name)
        time.sleep(pause)

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    step(20, "database", True, f"{connection.vendor} answers")

    overview = queues.queue_overview()
    step(40, "job queue", overview.available, overview.error or f"Redis at {overview.address}, "
         + ", ".join(f"{q.name}: {q.workers} worker(s), {q.waiting} waiting" for q in overview.queues))

    engine = engine_status()
    step(60, "docker engine", engine.available, engine.error or f"{engine.address}, Docker {engine.version}")

    from storage_app.library import library_summary

    library = library_summary()
    step(70, "model library", not library["problems"],
         f"{library['files']} file(s); {library['mismatch']} mismatch, {library['missing']} missing, "
         f"{library['unreadable']} unreadable (see the models page)")

    for percent, name, path in (
        (80, "shared storage", settings.COMFY_SHARED_PATH),
        (90, "instance storage", settings.COMFY_INSTANCES_PATH),
        (100, "backup storage", settings.COMFY_BACKUPS_PATH),
    ):
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        writable = existing is not None and os.access(existing, os.W_OK)
        step(percent, name, writable, f"{path} ({'writable' if writable else 'not writable'})")

    failed = [c for c in checks if not c["ok"]]
    if failed:
        raise OperationError("Diagnostics found problems. " + " ".join(f"{c['check']}: {c['detail']}" for c in failed))
    return {"checks": checks}


@operation_job("noop", label="No-op")
def noop(report):
    """Does nothing; measures the cost of the operation machinery itself (bench/) and checks workers."""
    return {"ok": True}


def sweep_operations():
    """Periodic (rq cron): fail operations whose worker died or whose job vanished from Redis."""
    result = operations_sweep()
    return {"dead": result.dead, "lost": result.lost}
