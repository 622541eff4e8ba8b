"""The models page: the shared library with its checksums, totals, duplicates and the instances' inboxes."""
from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.core.paginator import Paginator
from django.db.models import Prefetch
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from comfyhub.forms import service_errors
from comfyhub.models import Operation
from instances.models import Instance, Node

from . import checks, library, services
from .forms import ImportHashesForm, ModelFilterForm
from .models import ModelAsset, ModelNodeCheck

PAGE_SIZE = 100
MODEL_KINDS = ("models_scan", "models_verify", "models_promote", "models_sharing", "model_cache_warm",
               "model_cache_check", "models_verify_node")


def model_list(request):
    folders = list(ModelAsset.objects.order_by("folder").values_list("folder", flat=True).distinct())
    form = ModelFilterForm(request.GET or None, folders=folders)
    assets = form.filter(ModelAsset.objects.all())
    node_summary = services.model_node_summary()
    node_filter = request.GET.get("node", "")
    if node_filter:
        # Only the files that node lacks or has other bytes of; an unknown name lists nothing, as any filter would.
        assets = assets.filter(node_checks__node__name=node_filter[:63],
                               node_checks__status__in=ModelNodeCheck.PROBLEM_STATUSES)
    assets = assets.prefetch_related(Prefetch(
        "node_checks", to_attr="node_problems", queryset=ModelNodeCheck.objects.filter(
            status__in=ModelNodeCheck.PROBLEM_STATUSES).select_related("node").order_by("node__name")))
    page = Paginator(assets, PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    latest = Operation.objects.filter(kind__in=MODEL_KINDS).select_related("requested_by").first()
    instances = Instance.objects.select_related("node").order_by("instance_id")
    # Each instance's on its node; a node whose agent cannot be asked is said in the inboxes' section.
    inboxes, unread = checks.inboxes(list(instances))
    return render(request, "storage_app/model_list.html", {
        "form": form, "page": page, "assets": page.object_list, "query": query.urlencode(),
        "totals": library.folder_totals(), "duplicates": library.duplicates(),
        "problems": ModelAsset.objects.filter(status__in=ModelAsset.PROBLEM_STATUSES).count(),
        "latest": latest, "inboxes": inboxes, "inboxes_unread": unread,
        "import_form": ImportHashesForm(),
        "cache": services.model_cache_status(),
        "cache_reports": services.model_cache_reports(),
        "cache_instances": list(instances),
        "nodes": list(Node.objects.filter(approved=True).order_by("name").values_list("name", flat=True)),
        "node_summary": node_summary, "node_filter": node_filter[:63],
    })


def _enqueue(request, start, success):
    with service_errors(request):
        operation = start()
        messages.success(request, success)
        return redirect(operation)
    return redirect("model-list")


@require_POST
@permission_required("storage_app.verify_modelasset", raise_exception=True)
def models_scan(request):
    return _enqueue(request, lambda: services.models_scan(user=request.user), "Library scan queued.")


@require_POST
@permission_required("storage_app.verify_modelasset", raise_exception=True)
def models_verify(request):
    full = request.POST.get("full") == "1"
    return _enqueue(request, lambda: services.models_verify(full=full, user=request.user),
                    "Full verification queued." if full else "Verification queued (changed files only).")


@require_POST
@permission_required("storage_app.verify_modelasset", raise_exception=True)
def models_verify_node(request):
    node = request.POST.get("node", "")
    full = request.POST.get("full") == "1"
    return _enqueue(request, lambda: services.models_verify_node(node_name=node, full=full, user=request.user),
                    f"Checking node {node[:63]}'s copy of the library queued.")


@require_POST
@permission_required("storage_app.verify_modelasset", raise_exception=True)
def models_promote(request, instance_id):
    instance = get_object_or_404(Instance, instance_id=instance_id)
    path = request.POST.get("path", "")
    return _enqueue(request, lambda: services.models_promote(instance=instance, path=path, user=request.user),
                    f"Promoting {path} from {instance} queued.")


@require_POST
@permission_required("storage_app.verify_modelasset", raise_exception=True)
def models_import(request):
    form = ImportHashesForm(request.POST, request.FILES)
    if not form.is_valid():
        messages.error(request, "Choose a file in sha256sum format to import.")
        return redirect("model-list")
    upload = form.cleaned_data["file"]
    if upload.size > 10 << 20:
        messages.error(request, "That file is over 10 MB; a hash list is much smaller. Check you picked the right one.")
        return redirect("model-list")
    with service_errors(request):
        result = services.models_import_hashes(text=upload.read().decode("utf-8", errors="replace"))
        note = f"Imported {result['matched']} expected hash(es)."
        if result["unknown"]:
            note += f" {len(result['unknown'])} path(s) are not in the library: {', '.join(result['unknown'][:5])}."
        if result["bad"]:
            note += f" Skipped {len(result['bad'])} malformed line(s)."
        messages.success(request, note + " Verify to compare.")
    return redirect("model-list")


def models_export(request):
    response = HttpResponse(services.models_export_hashes(), content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="models.sha256"'
    return response


@require_POST
@permission_required("storage_app.verify_modelasset", raise_exception=True)
def models_cache_warm(request):
    """Warm a node's cache (the instance's node, else the one chosen) for one instance's workflows, or for an
    uploaded workflow file."""
    from comfyhub import jsonlimits

    instance_id = request.POST.get("instance", "")
    upload = request.FILES.get("workflow")
    instance, workflow = None, None
    if instance_id:
        instance = Instance.objects.select_related("node").filter(instance_id=instance_id[:63]).first()
        if instance is None:
            messages.error(request, "Choose one of the instances listed to warm the cache for.")
            return redirect("model-list")
    if upload is not None:
        try:
            workflow = jsonlimits.read_upload(upload, what=upload.name)
        except jsonlimits.JSONInputError as exc:
            messages.error(request, str(exc))
            return redirect("model-list")
    node = request.POST.get("node", "")
    return _enqueue(request, lambda: services.model_cache_warm(node_name=node, instance=instance, workflow=workflow,
                                                               user=request.user),
                    "Warming the model cache queued.")


@require_POST
@permission_required("storage_app.verify_modelasset", raise_exception=True)
def models_cache_check(request):
    node = request.POST.get("node", "")
    return _enqueue(request, lambda: services.model_cache_check(node_name=node, user=request.user),
                    "Model cache check queued.")
