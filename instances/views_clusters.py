"""Pages for ComfyUI-Distributed clusters: the list, a new cluster (new members on chosen GPUs, or existing instances
adopted), one cluster with each member's health and what the master's last reachability probe found, and its
actions, each one call of instances/clusters.py, which has the rules."""
from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.contrib.contenttypes.models import ContentType
from django.db.models import Q
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST
from django_htmx.http import HttpResponseStopPolling

from comfyhub.forms import service_errors
from comfyhub.models import Operation

from . import clusters
from .forms_clusters import ClusterDeleteForm, ClusterForm, ClusterRemoveWorkerForm, ClusterWorkerForm
from .jobs_clusters import prepare_member
from .models import Cluster, Instance

CLUSTER_OPERATIONS = 10


def cluster_list(request):
    rows = [_summary(cluster) for cluster in Cluster.objects.select_related("master__node").prefetch_related(
        "workers__instance__node")]
    return render(request, "instances/cluster_list.html", {"rows": rows})


def _summary(cluster: Cluster) -> dict:
    """A list row: its members' nodes and how many of them are in each status."""
    members = [cluster.master, *(worker.instance for worker in cluster.workers.all())]
    statuses = {}
    for member in members:
        label = member.get_status_display()
        statuses[label] = statuses.get(label, 0) + 1
    return {"cluster": cluster, "workers": len(members) - 1,
            "nodes": sorted({member.node.name for member in members}),
            "statuses": sorted(statuses.items(), key=lambda item: (-item[1], item[0]))}


@require_http_methods(["GET", "POST"])
@permission_required("instances.add_instance", raise_exception=True)
def cluster_create(request):
    form = ClusterForm(request.POST if request.method == "POST" else None)
    if form.is_bound and form.is_valid():
        with service_errors(request, form):
            cluster = clusters.cluster_create(**form.arguments(), user=request.user)
            messages.success(request, f"Cluster {cluster} created. Start it when its members are built.")
            return redirect(cluster)
    return render(request, "instances/cluster_form.html", {"form": form}, status=400 if form.errors else 200)


def cluster_detail(request, name, *, worker_form=None, status=200):
    cluster = _cluster(name)
    context = _live_context(cluster)
    context.update(operations=_operations_of(cluster)[:CLUSTER_OPERATIONS],
                   worker_form=worker_form or ClusterWorkerForm())
    return render(request, "instances/cluster_detail.html", context, status=status)


def cluster_live(request, name):
    """The members table, which htmx reloads while an operation on the cluster runs or a member is starting."""
    context = _live_context(_cluster(name))
    response = render(request, "instances/cluster_live.html", context)
    if not context["polling"]:
        response.status_code = HttpResponseStopPolling.status_code
    return response


def _live_context(cluster: Cluster) -> dict:
    probe = clusters.last_probe(cluster)
    found = probe.result if probe is not None and isinstance(probe.result, dict) else {}
    members = clusters.cluster_members(cluster)
    for member in members:
        instance = member["instance"]
        member["probe"] = found.get(instance.instance_id) if member["role"] == "worker" else None
        member["failing"] = [c.get("check") or c.get("name") or "?" for c in (instance.health or {}).get("checks") or []
                             if not c.get("ok")]
    active = _operations_of(cluster).filter(status__in=Operation.ACTIVE_STATUSES).first()
    starting = any(m["instance"].status == Instance.Status.STARTING for m in members)
    return {"cluster": cluster, "members": members, "probe": probe, "active_operation": active,
            "polling": active is not None or starting}


def _operations_of(cluster: Cluster):
    """The cluster's own operations, and the preparation of each of its members (ComfyUI-Distributed installed, its
    gpu_config.json written), which a new cluster or worker waits for."""
    members = [str(instance.pk) for instance in clusters.members_of(cluster)]
    return Operation.objects.select_related("requested_by", "target_type").filter(
        Q(target_type=ContentType.objects.get_for_model(Cluster), target_id=str(cluster.pk))
        | Q(target_type=ContentType.objects.get_for_model(Instance), target_id__in=members,
            kind=prepare_member.kind))


# --- Actions: each one calls a service; those that take time queue an operation ------------------------------

@require_POST
@permission_required("instances.start_instance", raise_exception=True)
def cluster_start(request, name):
    return _queue(request, name, clusters.cluster_start, "Starting cluster {}: its workers, then its master.")


@require_POST
@permission_required("instances.start_instance", raise_exception=True)
def cluster_stop(request, name):
    return _queue(request, name, clusters.cluster_stop, "Stopping cluster {}: its workers, then its master.")


@require_POST
@permission_required("instances.change_instance", raise_exception=True)
def cluster_sync(request, name):
    return _queue(request, name, clusters.cluster_sync, "Writing the members' gpu_config.json for cluster {}.")


@require_POST
@permission_required("instances.change_instance", raise_exception=True)
def cluster_probe(request, name):
    return _queue(request, name, clusters.cluster_probe,
                  "Checking from inside the master of cluster {} which workers it reaches.")


def _queue(request, name, service, done):
    cluster = _cluster(name)
    with service_errors(request):
        service(cluster=cluster, user=request.user)
        messages.success(request, done.format(cluster))
    return redirect(cluster)


@require_POST
@permission_required("instances.change_instance", raise_exception=True)
def cluster_add_worker(request, name):
    cluster = _cluster(name)
    form = ClusterWorkerForm(request.POST)
    if form.is_valid():
        instance = form.cleaned_data["instance"]
        with service_errors(request, form):
            clusters.cluster_add_worker(cluster=cluster, instance=instance, user=request.user)
            messages.success(request, f"'{instance}' is now a worker of cluster {cluster}.")
            return redirect(cluster)
    return cluster_detail(request, name, worker_form=form, status=400)


@require_POST
@permission_required("instances.change_instance", raise_exception=True)
def cluster_remove_worker(request, name):
    """Asks first (a page with a confirming button), then removes: both steps are POSTs."""
    cluster = _cluster(name)
    form = ClusterRemoveWorkerForm(request.POST, cluster=cluster)
    if not form.is_valid():
        messages.error(request, "Not removed: " + " ".join(error for errors in form.errors.values()
                                                            for error in errors))
        return redirect(cluster)
    instance = form.cleaned_data["instance"]
    if not form.confirmed():
        if "confirm" in request.POST:
            messages.warning(request, "Nothing removed yet: press “Remove worker” to confirm, or go back.")
        return render(request, "instances/cluster_remove_worker.html", {"cluster": cluster, "instance": instance})
    with service_errors(request, prefix="Not removed: "):
        clusters.cluster_remove_worker(cluster=cluster, instance=instance, user=request.user)
        messages.success(request, f"'{instance}' is no longer a worker of cluster {cluster}; it stays as an "
                                  "instance of its own.")
    return redirect(cluster)


@require_http_methods(["GET", "POST"])
@permission_required("instances.delete_instance", raise_exception=True)
def cluster_delete(request, name):
    cluster = _cluster(name)
    form = ClusterDeleteForm(request.POST if request.method == "POST" else None, cluster=cluster)
    if form.is_bound and form.is_valid():
        with service_errors(request, form):
            clusters.cluster_delete(cluster=cluster, user=request.user)
            messages.success(request, f"Cluster {name} deleted; its members stay as instances of their own.")
            return redirect("cluster-list")
    return render(request, "instances/cluster_delete.html",
                  {"form": form, "cluster": cluster, "members": clusters.cluster_members(cluster)},
                  status=400 if form.errors else 200)


def _cluster(name) -> Cluster:
    cluster = Cluster.objects.select_related("master__node").filter(name=name).first()
    if cluster is None:
        raise Http404(f"No cluster '{name}'.")
    return cluster
