"""Periodic jobs, run by `manage.py rqcron comfyhub.cron` (make run starts it)."""
import django

django.setup()

from django.conf import settings  # noqa: E402
from rq import cron  # noqa: E402

from comfyhub.jobs import sweep_operations  # noqa: E402

cron.register(sweep_operations, "default", interval=settings.OPERATION_SWEEP_INTERVAL, job_timeout=120)
