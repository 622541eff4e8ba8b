"""Periodic jobs, run by `manage.py rqcron comfyhub.cron` (make run starts it).

Each app lists its own in its AppConfig's `periodic_jobs()` (keyword arguments of `rq.cron.register`); this module
registers those of every installed app. These housekeeping jobs write no Operation rows (one every 30 s would bury
the real ones); what they find is recorded on the objects themselves (an operation's failure, an instance's status)."""
import django

django.setup()

from django.apps import apps  # noqa: E402
from rq import cron  # noqa: E402

for config in apps.get_app_configs():
    if hasattr(config, "periodic_jobs"):
        for job in config.periodic_jobs():
            cron.register(**job)
