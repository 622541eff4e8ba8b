"""Periodic jobs, run by `manage.py rqcron comfyhub.cron` (make run starts it).

These housekeeping jobs write no Operation rows (one every 30 s would bury the real ones); what they find is
recorded on the objects themselves (an operation's failure, an instance's status)."""
import django

django.setup()

from django.conf import settings  # noqa: E402
from rq import cron  # noqa: E402

from comfyhub.jobs import sweep_operations  # noqa: E402
from instances.jobs import reconcile_instances  # noqa: E402
from storage_app.jobs import scheduled_full_verify, scheduled_snapshots  # noqa: E402

cron.register(sweep_operations, "default", interval=settings.OPERATION_SWEEP_INTERVAL, job_timeout=120)
cron.register(reconcile_instances, "default", interval=settings.INSTANCE_HEALTH_INTERVAL, job_timeout=300)
cron.register(scheduled_snapshots, "default", cron="7 * * * *", job_timeout=120)
if settings.MODEL_FULL_VERIFY_CRON:
    cron.register(scheduled_full_verify, "default", cron=settings.MODEL_FULL_VERIFY_CRON, job_timeout=60)
