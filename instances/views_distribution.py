"""The instance page's distribution panel (loaded by htmx): the GPUs inside its container, its cluster, and the URLs
of its NetDist peers with the check from inside. Rules live in instances/distribution.py."""
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from comfyhub.forms import service_errors

from . import access, distribution, services
from .models import Instance

POLL_SECONDS = 2


@require_GET
def instance_distribution(request, instance_id):
    instance = get_object_or_404(services.instances_with_relations(), instance_id=instance_id)
    can_operate = access.can_operate(request.user, instance)
    check = distribution.netdist_last_check(instance) if can_operate else None
    # The peers' direct URLs skip the hub's login: shown to those who may operate this instance, and only for the
    # peers they may use themselves.
    peers = distribution.netdist_peers(instance, user=request.user) if can_operate else []
    return render(request, "instances/partials/distribution_panel.html", {
        "instance": instance,
        "gpu_map": distribution.gpu_map(instance),
        "membership": _membership(instance),
        "can_operate": can_operate,
        "peers": peers,
        "checkable": any(peer["url"] for peer in peers),
        "check": check,
        # Someone else's check may name peers this viewer may not use: only the rows of the peers listed here.
        "check_results": [row for row in _results(check)
                          if row.get("instance") in {peer["instance"].instance_id for peer in peers}],
        "poll_seconds": POLL_SECONDS,
    })


def _membership(instance):
    from . import clusters

    found = clusters.membership(instance)
    return {"cluster": found[0], "role": found[1]} if found else None


def _results(check):
    """The last check's rows, when it succeeded with the shape netdist_probe gives."""
    result = check.result if check is not None and isinstance(check.result, dict) else {}
    rows = result.get("peers")
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


@require_POST
def netdist_check(request, instance_id):
    instance = get_object_or_404(Instance.objects.select_related("node"), instance_id=instance_id)
    if not access.can_operate(request.user, instance):
        raise PermissionDenied
    with service_errors(request, prefix="Not checked: "):
        distribution.netdist_check(instance=instance, user=request.user)
        messages.success(request, f"Checking from inside '{instance}' which NetDist peers answer.")
    return redirect(instance.get_absolute_url() + "#distribution")
