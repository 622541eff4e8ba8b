"""Pages for instances and GPUs: the dashboard, one instance with its live status, its form, logs and actions, and
the GPU list. A view parses the request, calls one service, says what happened and redirects; rules live in
services.py."""
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.core.paginator import Paginator
from django.db.models import Prefetch
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.http import content_disposition_header, url_has_allowed_host_and_scheme
from django.views.decorators.http import require_http_methods, require_POST
from django_htmx.http import HttpResponseStopPolling

from comfyhub.forms import service_errors
from comfyhub.models import Operation
from comfyhub.queues import QueueUnavailable, queue_overview

from storage_app.library import library_summary

from . import access, images, remote, selfservice, services
from .docker_engine import EngineError, cached_engine_status
from .forms import InstanceDeleteForm, InstanceForm, SelfServiceForm, ShareForm
from .models import GPU, LOCAL_NODE, GPUAssignment, Instance, InstanceShare, Node

LATEST_OPERATIONS = 10
INSTANCE_OPERATIONS = 10
LOG_TAIL_DEFAULT = 500
LOG_TAIL_MAX = 5000

GPU_SOURCES = {
    "nvml": "Found {count} GPU(s) through the NVIDIA driver (source: nvml).",
    "settings": "No NVIDIA driver answered; using the {count} GPU(s) declared in COMFY_GPUS (source: settings).",
    "none": "No GPUs found: no NVIDIA driver answered and COMFY_GPUS declares none (source: none). Instances run on "
            "the CPU.",
}


# --- Dashboard -----------------------------------------------------------------------------------------------

def dashboard(request):
    latest = Operation.objects.select_related("requested_by", "target_type")[:LATEST_OPERATIONS]
    return render(
        request,
        "instances/dashboard.html",
        {"engine": cached_engine_status(), "queue": queue_overview(), "operations": latest,
         "library": library_summary(), "missing_images": images.missing_images(), **_instance_page(request)},
    )


# --- Images an instance needs that its host lacks (the dashboard's notice) -----------------------------------------

@require_POST
@permission_required("instances.change_instance", raise_exception=True)
def image_build(request):
    node = _node_named(request.POST.get("node", ""))
    with service_errors(request):
        operation = images.image_build(node=node, tag=request.POST.get("image", ""), user=request.user)
        messages.success(request, f"Building {operation.target_label}.")
        return redirect(operation)
    return redirect("dashboard")


@require_POST
@permission_required("instances.change_instance", raise_exception=True)
def image_pull(request):
    node = _node_named(request.POST.get("node", ""))
    with service_errors(request):
        operation = images.image_pull(node=node, image=request.POST.get("image", ""), user=request.user)
        messages.success(request, f"Pulling {operation.target_label}.")
        return redirect(operation)
    return redirect("dashboard")


def _node_named(name: str) -> Node:
    # A NUL byte is refused here: PostgreSQL takes none in a text it compares (SQLite would just find nothing).
    return get_object_or_404(Node, name=name if "\x00" not in name else None)


def instance_rows(request):
    """The dashboard's instance rows, which htmx reloads every few seconds."""
    return render(request, "instances/partials/instance_rows.html", _instance_page(request))


INSTANCES_PER_PAGE = 50


def _instance_page(request):
    """One page of the dashboard's instance table: a host with hundreds of instances stays fast."""
    page = Paginator(services.instances_with_relations().defer("library_check", "node_types", "description"),
                     INSTANCES_PER_PAGE).get_page(request.GET.get("page"))
    instances = list(page.object_list)
    for instance in instances:
        instance.checks_summary = _checks_summary(instance)
    return {"instances": instances, "instance_page": page}


def _checks_summary(instance):
    checks = (instance.health or {}).get("checks") or []
    return {"total": len(checks), "failing": [_check_name(c) for c in checks if not c.get("ok")]}


def _check_name(check):
    return check.get("check") or check.get("name") or "?"


# --- One instance --------------------------------------------------------------------------------------------

def instance_detail(request, instance_id):
    instance = get_object_or_404(services.instances_with_relations(), instance_id=instance_id)
    operations = _operations_of(instance)
    context = _live_context(instance)
    context.update(operations=operations[:INSTANCE_OPERATIONS], **_access_context(request, instance))
    return render(request, "instances/instance_detail.html", context)


def _access_context(request, instance, share_form=None):
    """What the instance page's buttons and its access panel need (instances/access.py decides)."""
    return {
        "can_operate": access.can_operate(request.user, instance),
        "can_share": access.can_share(request.user, instance),
        "hub_url": request.build_absolute_uri(instance.hub_path),
        "shares": access.shares_of(instance),
        "opens": access.recent_opens(instance),
        "share_form": share_form or ShareForm(),
        "access_cache_seconds": settings.ACCESS_CACHE_SECONDS,
    }


def instance_live(request, instance_id):
    """The observed status and health of an instance; htmx polls it while an operation on it is in progress."""
    instance = get_object_or_404(services.instances_with_relations(), instance_id=instance_id)
    context = _live_context(instance)
    response = render(request, "instances/partials/instance_live.html", context)
    if not context["polling"]:
        response.status_code = HttpResponseStopPolling.status_code
    return response


def _operations_of(instance):
    return Operation.objects.select_related("requested_by", "target_type").filter(
        target_type=ContentType.objects.get_for_model(Instance), target_id=str(instance.pk)
    )


def _live_context(instance):
    active = _operations_of(instance).filter(status__in=Operation.ACTIVE_STATUSES).first()
    health = instance.health or {}
    pending = remote.pending_change_kinds(instance)  # its container, inspected on its node
    return {
        "instance": instance,
        "active_operation": active,
        "polling": active is not None or instance.status == Instance.Status.STARTING,
        "pending_changes": "configuration" in pending,
        "image_updated": "image" in pending,
        "checks": [{**c, "name": _check_name(c)} for c in health.get("checks") or []],
        "devices": health.get("devices") or [],
        "comfyui_version": health.get("comfyui_version") or "",
    }


@require_http_methods(["GET", "POST"])
def instance_create(request):
    if not request.user.has_perm("instances.add_instance"):
        if selfservice.may_self_serve(request.user):
            return redirect("instance-create-own")  # "New instance" for those who make their own
        raise PermissionDenied
    # ?node=NAME: the node whose GPUs the form lists (the node field asks for them when it changes).
    form = InstanceForm(request.POST if request.method == "POST" else None, node=request.GET.get("node", ""))
    if form.is_bound and form.is_valid():
        with service_errors(request, form):
            instance = services.instance_create(**form.arguments(), user=request.user)
            adopted = " It took its kept folder as it is." if form.cleaned_data["adopt"] else ""
            where = f" on node {instance.node}" if instance.node.name != LOCAL_NODE else ""
            messages.success(request, f"Instance '{instance}' created{where} on port {instance.host_port}.{adopted}")
            try:
                services.instance_build(instance=instance, user=request.user)
            except QueueUnavailable as exc:
                messages.warning(request, f"{exc} Its directories will be built when it first starts.")
            return redirect(instance)
    return render(request, "instances/instance_form.html", {"form": form})


@require_http_methods(["GET", "POST"])
def instance_create_own(request):
    """Self-service: an instance of one's own from a self-service template, within the quotas."""
    if not selfservice.may_self_serve(request.user) and not selfservice.is_operator(request.user):
        raise PermissionDenied
    form = SelfServiceForm(request.POST if request.method == "POST" else None,
                           initial={"template": request.GET.get("template", "")})
    if form.is_bound and form.is_valid():
        data = form.cleaned_data
        with service_errors(request, form):
            instance, _ = selfservice.instance_create_own(user=request.user, template=data["template"],
                                                          instance_id=data["instance_id"],
                                                          display_name=data["display_name"])
            messages.success(request, f"Instance '{instance}' created from template '{data['template']}'; "
                                      "applying the template. Start it when that is done.")
            return redirect(instance)
    return render(request, "instances/self_service_form.html", {
        "form": form, "usage": selfservice.usage(request.user), "operator": selfservice.is_operator(request.user),
    }, status=400 if form.errors else 200)


@require_http_methods(["GET", "POST"])
@permission_required("instances.change_instance", raise_exception=True)
def instance_edit(request, instance_id):
    instance = get_object_or_404(services.instances_with_relations(), instance_id=instance_id)
    form = InstanceForm(request.POST if request.method == "POST" else None, instance=instance)
    if form.is_bound and form.is_valid():
        with service_errors(request, form):
            instance = services.instance_update(**form.arguments(), user=request.user)
            messages.success(request, f"Instance '{instance}' saved.")
            if "configuration" in remote.pending_change_kinds(instance):
                messages.warning(request, "Its container still runs the old configuration: restart to apply.")
            return redirect(instance)
    return render(request, "instances/instance_form.html", {
        "form": form, "instance": instance, "pending_changes": bool(remote.pending_change_kinds(instance)),
    })


@require_http_methods(["GET", "POST"])
@permission_required("instances.delete_instance", raise_exception=True)
def instance_delete(request, instance_id):
    instance = get_object_or_404(Instance.objects.select_related("node"), instance_id=instance_id)
    form = InstanceDeleteForm(request.POST if request.method == "POST" else None, instance=instance)
    if form.is_bound and form.is_valid():
        purge = form.cleaned_data["purge_data"]
        with service_errors(request, form):
            operation = services.instance_delete(instance=instance, purge_data=purge,
                                                 confirm=form.cleaned_data["confirm"], user=request.user)
            kept = "and its data" if purge else "(its data is kept)"
            messages.success(request, f"Deleting instance '{instance}' {kept}.")
            return redirect(operation)
    return render(request, "instances/instance_delete.html", {"form": form, "instance": instance},
                  status=400 if form.errors else 200)


@require_http_methods(["GET", "POST"])
@permission_required("instances.change_instance", raise_exception=True)
def instance_move(request, instance_id):
    """Move to another node: the page says what happens, the POST names the node and queues the move."""
    from . import moves, nodes

    instance = get_object_or_404(services.instances_with_relations(), instance_id=instance_id)
    chosen = request.POST.get("node", "") if request.method == "POST" else ""
    if request.method == "POST":
        with service_errors(request, prefix="Not moved: "):
            operation = moves.instance_move(instance=instance, target=moves.move_target(chosen), user=request.user)
            messages.success(request, f"Moving '{instance}' to node {chosen}.")
            return redirect(operation)
    targets = [row for row in nodes.node_rows() if row.node.pk != instance.node_id and row.node.approved]
    return render(request, "instances/instance_move.html",
                  {"instance": instance, "targets": targets, "chosen": chosen},
                  status=400 if request.method == "POST" else 200)


# --- Actions: each one queues an operation -------------------------------------------------------------------

@require_POST
@permission_required("instances.build_instance", raise_exception=True)
def instance_build(request, instance_id):
    return _queue_action(request, instance_id, services.instance_build, "Building the directories of '{}'.")


# Start, stop and restart: operators, and owners who make their own instances (access.can_operate).

@require_POST
def instance_start(request, instance_id):
    return _queue_action(request, instance_id, services.instance_start, "Starting '{}'.", operate=True)


@require_POST
def instance_stop(request, instance_id):
    return _queue_action(request, instance_id, services.instance_stop, "Stopping '{}'.", operate=True)


@require_POST
def instance_restart(request, instance_id):
    return _queue_action(request, instance_id, services.instance_restart, "Restarting '{}'.", operate=True)


def _queue_action(request, instance_id, service, done, operate=False):
    instance = get_object_or_404(Instance.objects.select_related("node"), instance_id=instance_id)
    if operate and not access.can_operate(request.user, instance):
        raise PermissionDenied
    with service_errors(request):
        service(instance=instance, user=request.user)
        messages.success(request, done.format(instance))
    return _back(request, instance)


def _back(request, instance):
    """Where the action was asked from (a dashboard button says so), else the instance's page."""
    target = request.POST.get("next", "")
    # Only a path: redirect() would take any other word for the name of a view (and fail on it).
    if target.startswith("/") and url_has_allowed_host_and_scheme(target, {request.get_host()},
                                                                  request.is_secure()):
        return redirect(target)
    return redirect(instance)


# --- Shares (the access panel) ---------------------------------------------------------------------------------

@require_POST
def share_add(request, instance_id):
    instance = get_object_or_404(Instance, instance_id=instance_id)
    if not access.can_share(request.user, instance):
        raise PermissionDenied
    form = ShareForm(request.POST)
    if form.is_valid():
        with service_errors(request, prefix="Not shared: "):
            share = access.share_add(instance=instance, username=form.cleaned_data["username"],
                                     group=form.cleaned_data["group"], user=request.user)
            messages.success(request, f"'{instance}' is now shared with {access.share_label(share)}.")
    else:
        messages.error(request, "Not shared: " + " ".join(f"{form.fields[field].label}: {' '.join(errors)}"
                                                          for field, errors in form.errors.items()))
    return redirect(instance.get_absolute_url() + "#access")


@require_POST
def share_remove(request, instance_id, pk):
    """Asks first (a page with a confirming button), then removes: both steps are POSTs."""
    instance = get_object_or_404(Instance, instance_id=instance_id)
    share = get_object_or_404(InstanceShare.objects.select_related("user", "group"), pk=pk, instance=instance)
    if not access.can_share(request.user, instance):
        raise PermissionDenied
    if request.POST.get("confirm") != "yes":
        if "confirm" in request.POST:
            messages.warning(request, "Nothing removed yet: press “Stop sharing” to confirm, or go back.")
        return render(request, "instances/share_remove.html", {"instance": instance, "share": share,
                                                                "label": access.share_label(share)})
    access.share_remove(share=share, user=request.user)
    messages.success(request, f"'{instance}' is no longer shared with {access.share_label(share)}; access ends "
                              f"within {settings.ACCESS_CACHE_SECONDS} s.")
    return redirect(instance.get_absolute_url() + "#access")


# --- Logs ----------------------------------------------------------------------------------------------------

def instance_logs(request, instance_id):
    """The container's last lines, from its node's engine (another node's through its agent: instances.remote)."""
    instance = get_object_or_404(Instance.objects.select_related("node"), instance_id=instance_id)
    tail = _tail(request)
    logs, error = "", ""
    try:
        logs = remote.instance_logs(instance, tail)
    except (EngineError, remote.NodeReadError) as exc:
        error = str(exc)
    template = "instances/partials/instance_logs.html" if request.htmx else "instances/instance_logs.html"
    return render(request, template, {"instance": instance, "tail": tail, "logs": logs, "error": error,
                                      "tail_choices": (100, LOG_TAIL_DEFAULT, 1000, LOG_TAIL_MAX)})


def instance_logs_download(request, instance_id):
    instance = get_object_or_404(Instance.objects.select_related("node"), instance_id=instance_id)
    try:
        logs = remote.instance_logs(instance, _tail(request))
    except (EngineError, remote.NodeReadError) as exc:
        messages.error(request, str(exc))
        return redirect("instance-logs", instance.instance_id)
    return HttpResponse(logs, content_type="text/plain; charset=utf-8", headers={
        "Content-Disposition": content_disposition_header(True, f"{instance.instance_id}-logs.txt"),
    })


def _tail(request) -> int:
    """`?tail=N`: how many lines, LOG_TAIL_DEFAULT when absent or not a number, at most LOG_TAIL_MAX."""
    try:
        tail = int(request.GET.get("tail", LOG_TAIL_DEFAULT))
    except ValueError:
        return LOG_TAIL_DEFAULT
    return max(1, min(tail, LOG_TAIL_MAX))


# --- GPUs ----------------------------------------------------------------------------------------------------

def gpu_list(request):
    holders = Prefetch("assignments", queryset=GPUAssignment.objects.select_related("instance"))
    nodes = Node.objects.prefetch_related(Prefetch("gpus", queryset=GPU.objects.prefetch_related(holders)))
    return render(request, "instances/gpu_list.html", {"nodes": nodes})


@require_POST
@permission_required("instances.change_instance", raise_exception=True)
def gpu_shareable(request, pk):
    gpu = get_object_or_404(GPU, pk=pk)
    with service_errors(request):
        services.gpu_set_shareable(gpu=gpu, shareable=request.POST.get("shareable") == "1")
        messages.success(request, f"{gpu} is now {'shareable' if gpu.shareable else 'exclusive'}.")
    return redirect("gpu-list")


@require_POST
@permission_required("instances.change_instance", raise_exception=True)
def gpu_discover(request):
    try:
        source, gpus = services.discover_gpus()
    except ImproperlyConfigured as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, GPU_SOURCES.get(source, "{count} GPU(s) found (source: " + source + ").")
                         .format(count=len(gpus)))
    return redirect("gpu-list")
