"""Background jobs that belong to ComfyHub itself rather than to instances or storage."""
import time

from django.apps import apps
from django.db import connection

from . import queues
from .operations import OperationError, operation_job, operations_sweep


@operation_job("diagnostics", label="Diagnostics")
def diagnostics(report, *, pause: float = 0.0):
    """Check every part ComfyHub depends on and report each one; fails if a required part is broken.

    The database and the job queue are checked here; each app adds the parts it knows (the Docker engine, the
    model library, the storage folders) through its AppConfig's `diagnostics()`: a list of (name, check), where
    `check()` returns (ok, detail). `pause` spaces the steps out so a person can watch the progress (the dashboard
    uses a short one).
    """
    steps = [("database", _database), ("job queue", _job_queue)]
    for config in apps.get_app_configs():
        if hasattr(config, "diagnostics"):
            steps.extend(config.diagnostics())
    checks = []
    for number, (name, check) in enumerate(steps, 1):
        ok, detail = check()
        checks.append({"check": name, "ok": ok, "detail": detail})
        report.log(f"{'ok ' if ok else 'FAIL'} {name}: {detail}", "INFO" if ok else "WARNING")
        report.progress(100 * number / len(steps), name)
        time.sleep(pause)
    failed = [c for c in checks if not c["ok"]]
    if failed:
        raise OperationError("Diagnostics found problems. " + " ".join(f"{c['check']}: {c['detail']}" for c in failed))
    return {"checks": checks}


def _database():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return True, f"{connection.vendor} answers"


def _job_queue():
    overview = queues.queue_overview()
    return overview.available, overview.error or f"Redis at {overview.address}, " + ", ".join(
        f"{q.name}: {q.workers} worker(s), {q.waiting} waiting" for q in overview.queues)


@operation_job("noop", label="No-op")
def noop(report):
    """Does nothing; measures the cost of the operation machinery itself (bench/) and checks workers."""
    return {"ok": True}


def sweep_operations():
    """Periodic (rq cron): fail operations whose worker died or whose job vanished from Redis."""
    result = operations_sweep()
    return {"dead": result.dead, "lost": result.lost}
