"""The dashboard: engine, queue and the latest operations (instances join it with the registry)."""
from django.shortcuts import render

from comfyhub.models import Operation
from comfyhub.queues import queue_overview

from .docker_engine import cached_engine_status

LATEST_OPERATIONS = 10


def dashboard(request):
    latest = Operation.objects.select_related("requested_by", "target_type")[:LATEST_OPERATIONS]
    return render(
        request,
        "instances/dashboard.html",
        {"engine": cached_engine_status(), "queue": queue_overview(), "operations": latest},
    )
