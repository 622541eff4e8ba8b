"""Pages for snapshots (list, create, download, restore, clone, delete, ComfyUI-Manager export and import, the
schedule), the legacy migration (plan, then migrate) and the storage check. Each view validates a form, calls one
service, says what happened and redirects; the rules live in services.py, snapshots.py, migration.py and checks.py."""
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.contrib.contenttypes.models import ContentType
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import content_disposition_header, urlencode
from django.views.decorators.http import require_http_methods, require_POST
from django_htmx.http import HttpResponseStopPolling

from comfyhub.forms import service_errors
from comfyhub.models import Operation
from instances.models import Instance

from . import migration, services, snapshots
from .checks import check_storage
from .forms import (LegacyPlanForm, ManagerImportForm, SnapshotCloneForm, SnapshotCreateForm, SnapshotDeleteForm,
                    SnapshotScheduleForm)
from .models import Snapshot

PAGE_SIZE = 100
SNAPSHOT_KINDS = ("snapshot_create", "snapshot_restore", "snapshot_clone", "snapshot_import_manager")
PLAN_FILES_SHOWN = 500
RESTORE = "storage_app.restore_snapshot"


# --- Lists ---------------------------------------------------------------------------------------------------

def snapshot_list(request):
    page = Paginator(Snapshot.objects.select_related("instance", "created_by"), PAGE_SIZE) \
        .get_page(request.GET.get("page"))
    return render(request, "storage_app/snapshot_list.html", {
        "page": page, "snapshots": page.object_list,
        "instances": Instance.objects.order_by("instance_id").only("instance_id"),
        "backups_path": settings.COMFY_BACKUPS_PATH,
    })


def snapshot_instance(request, instance_id):
    return _instance_page(request, instance_id)


def _instance_page(request, instance_id, *, create_form=None, import_form=None, schedule_form=None):
    """One instance's snapshots and its forms; the POST views below render it again with their bound form when
    it has errors. Snapshots of a deleted instance stay listed under its id (they can still be cloned)."""
    instance = Instance.objects.select_related("node").filter(instance_id=instance_id).first()
    found = Snapshot.objects.filter(instance_label=instance_id).select_related("instance", "created_by")
    if instance is None and not found.exists():
        raise Http404(f"No instance '{instance_id}' and no snapshots of one.")
    page = Paginator(found, PAGE_SIZE).get_page(request.GET.get("page"))
    latest = None
    if instance is not None:
        latest = Operation.objects.select_related("requested_by").filter(
            kind__in=SNAPSHOT_KINDS, target_id=str(instance.pk),
            target_type=ContentType.objects.get_for_model(Instance)).first()
    status = 400 if any(f is not None and f.errors for f in (create_form, import_form, schedule_form)) else 200
    return render(request, "storage_app/snapshot_list.html", {
        "instance_id": instance_id, "instance": instance, "page": page, "snapshots": page.object_list,
        "latest": latest,
        "create_form": create_form or SnapshotCreateForm(),
        "import_form": import_form or ManagerImportForm(),
        "schedule_form": schedule_form or (SnapshotScheduleForm(instance=instance) if instance else None),
    }, status=status)


def _back_to(snapshot):
    return redirect("snapshot-instance", snapshot.instance_label)


# --- Acting on one instance ----------------------------------------------------------------------------------

@require_POST
@permission_required(RESTORE, raise_exception=True)
def snapshot_create(request, instance_id):
    instance = get_object_or_404(Instance.objects.select_related("node"), instance_id=instance_id)
    form = SnapshotCreateForm(request.POST)
    if form.is_valid():
        with service_errors(request, form):
            operation = services.snapshot_create(instance=instance, **form.cleaned_data, user=request.user)
            messages.success(request, f"Taking a {form.cleaned_data['kind']} snapshot of '{instance}'.")
            return redirect(operation)
    return _instance_page(request, instance_id, create_form=form)


@require_POST
@permission_required(RESTORE, raise_exception=True)
def snapshot_import(request, instance_id):
    instance = get_object_or_404(Instance.objects.select_related("node"), instance_id=instance_id)
    form = ManagerImportForm(request.POST, request.FILES)
    if form.is_valid():
        with service_errors(request, form):
            operation = services.snapshot_import_manager(instance=instance, data=form.cleaned_data["data"],
                                                         user=request.user)
            messages.success(request, f"Installing the custom nodes of that ComfyUI-Manager snapshot into "
                                      f"'{instance}'.")
            return redirect(operation)
    return _instance_page(request, instance_id, import_form=form)


@require_POST
@permission_required(RESTORE, raise_exception=True)
def snapshot_schedule(request, instance_id):
    instance = get_object_or_404(Instance, instance_id=instance_id)
    form = SnapshotScheduleForm(request.POST, instance=instance)
    if not form.is_valid():
        return _instance_page(request, instance_id, schedule_form=form)
    # The one place a view saves a model itself: two plain numbers with no rule beyond the form's bounds, and no
    # service to own them. Only these two columns are written, so a worker updating the instance's status at the
    # same moment is not overwritten.
    form.save(commit=False).save(update_fields=list(SnapshotScheduleForm.Meta.fields))
    every, keep = form.cleaned_data["snapshot_every_hours"], form.cleaned_data["snapshot_keep"]
    messages.success(request, f"'{instance}' takes a config snapshot every {every} hour(s), keeping the last {keep}."
                     if every else f"Scheduled snapshots of '{instance}' are off.")
    return redirect("snapshot-instance", instance_id)


# --- Acting on one snapshot ----------------------------------------------------------------------------------

@permission_required("storage_app.restore_snapshot", raise_exception=True)  # archives hold settings and env
def snapshot_download(request, pk):
    snapshot = get_object_or_404(Snapshot, pk=pk)
    try:
        path = snapshots.archive_path(snapshot)  # refuses an archive outside COMFY_BACKUPS_PATH
        handle = open(path, "rb")
    except snapshots.SnapshotError as exc:
        raise Http404(str(exc)) from exc
    except (FileNotFoundError, IsADirectoryError):
        messages.error(request, f"The archive {snapshot.archive} is missing from {settings.COMFY_BACKUPS_PATH}; "
                                "this snapshot cannot be downloaded or restored. Delete it.")
        return _back_to(snapshot)
    return FileResponse(handle, as_attachment=True, filename=path.name, content_type="application/gzip")


@permission_required("storage_app.restore_snapshot", raise_exception=True)
def snapshot_export(request, pk):
    snapshot = get_object_or_404(Snapshot, pk=pk)
    response = JsonResponse(services.snapshot_export_manager(snapshot=snapshot), json_dumps_params={"indent": 2})
    name = f"{snapshot.created_at:%Y-%m-%d_%H-%M-%S}_{snapshot.instance_label}_snapshot.json"
    response["Content-Disposition"] = content_disposition_header(True, name)
    return response


@require_http_methods(["GET", "POST"])
@permission_required(RESTORE, raise_exception=True)
def snapshot_restore(request, pk):
    snapshot = get_object_or_404(Snapshot.objects.select_related("instance"), pk=pk)
    if request.method == "POST":
        with service_errors(request):
            operation = services.snapshot_restore(snapshot=snapshot, user=request.user)
            messages.success(request, f"Restoring snapshot {snapshot.pk} into '{snapshot.instance}'; a snapshot of "
                                      "its current state is taken first.")
            return redirect(operation)
    return render(request, "storage_app/snapshot_restore.html", {"snapshot": snapshot})


@require_http_methods(["GET", "POST"])
@permission_required(RESTORE, raise_exception=True)
def snapshot_clone(request, pk):
    snapshot = get_object_or_404(Snapshot.objects.select_related("instance"), pk=pk)
    # "Show this node's GPUs" sends the form by GET: the page comes back with that node's GPUs and the id kept.
    form = SnapshotCloneForm(request.POST if request.method == "POST" else None, node=request.GET.get("node", ""),
                             initial={"new_instance_id": request.GET.get("new_instance_id", "")})
    if form.is_bound and form.is_valid():
        node = form.cleaned_data.get("node")
        with service_errors(request, form):
            operation = services.snapshot_clone(snapshot=snapshot, new_instance_id=form.cleaned_data["new_instance_id"],
                                                gpu_indexes=form.cleaned_data["gpus"], node=node, user=request.user)
            messages.success(request, f"Cloning snapshot {snapshot.pk} into a new instance "
                                      f"'{form.cleaned_data['new_instance_id']}'"
                                      + (f" on node {node}." if node is not None else "."))
            return redirect(operation)
    return render(request, "storage_app/snapshot_clone.html", {"snapshot": snapshot, "form": form},
                  status=400 if form.errors else 200)


@require_http_methods(["GET", "POST"])
@permission_required(RESTORE, raise_exception=True)
def snapshot_delete(request, pk):
    snapshot = get_object_or_404(Snapshot.objects.select_related("instance"), pk=pk)
    form = SnapshotDeleteForm(request.POST if request.method == "POST" else None, snapshot=snapshot)
    if form.is_bound and form.is_valid():
        number = snapshot.pk  # deleting the row clears it
        with service_errors(request, prefix=f"Snapshot {number} was not deleted: "):
            services.snapshot_delete(snapshot=snapshot)
            messages.success(request, f"Deleted snapshot {number} of '{snapshot.instance_label}' and its archive.")
        return _back_to(snapshot)
    return render(request, "storage_app/snapshot_delete.html", {"snapshot": snapshot, "form": form},
                  status=400 if form.errors else 200)


# --- Legacy migration ----------------------------------------------------------------------------------------

MIGRATE = (RESTORE, "instances.add_instance")


def legacy(request):
    """The form. Planning is an operation (`legacy_plan`): this page never looks at the host's folders."""
    form = LegacyPlanForm(initial=_legacy_initial(request.GET))
    return _legacy_page(request, form, None)


@require_POST
@permission_required(MIGRATE, raise_exception=True)
def legacy_plan(request):
    form = LegacyPlanForm(request.POST)
    if form.is_valid():
        with service_errors(request, form):
            operation = services.legacy_plan_start(**form.cleaned_data, user=request.user)
            return redirect(f"{reverse('legacy-plan-result', args=[operation.pk])}?{urlencode(form.cleaned_data)}")
    return _legacy_page(request, form, None)


@permission_required(MIGRATE, raise_exception=True)
def legacy_plan_result(request, pk):
    operation = get_object_or_404(Operation, pk=pk, kind="legacy_plan")
    initial = _legacy_initial(operation.result if operation.status == Operation.Status.SUCCEEDED else request.GET)
    return _legacy_page(request, LegacyPlanForm(initial=initial), operation)


@permission_required(MIGRATE, raise_exception=True)
def legacy_plan_live(request, pk):
    """The plan's live part; htmx stops polling once the planning operation is over."""
    operation = get_object_or_404(Operation, pk=pk, kind="legacy_plan")
    response = render(request, "storage_app/partials/legacy_plan.html", _plan_context(request, operation))
    if operation.is_terminal:
        response.status_code = HttpResponseStopPolling.status_code
    return response


@require_POST
@permission_required(MIGRATE, raise_exception=True)
def legacy_migrate(request):
    form = LegacyPlanForm(request.POST)
    if form.is_valid():
        with service_errors(request, form):
            operation = services.legacy_migrate(**form.cleaned_data, user=request.user)
            data = form.cleaned_data
            messages.success(request, f"Migrating {data['source']} into '{data['instance_id']}' ({data['mode']}).")
            return redirect(operation)
    return _legacy_page(request, form, None)


def _legacy_initial(values) -> dict:
    values = values or {}
    initial = {"instance_id": settings.COMFY_INSTANCE_ID, "mode": "move"}
    initial.update({key: values[key] for key in ("source", "instance_id", "mode") if values.get(key)})
    return initial


def _plan_context(request, operation) -> dict:
    plan = operation.result if operation is not None and operation.status == Operation.Status.SUCCEEDED else None
    destinations = []
    if plan is not None:
        folder_of_group = {group: name for name, group in migration.CARRIED.items()}
        for group, totals in plan["totals"].items():
            name = folder_of_group.get(group) or group.split(":", 1)[-1]
            _, root = migration.destination_root(name, plan["instance_id"])
            destinations.append({"group": group, "path": str(root), **totals})
    return {"operation": operation, "plan": plan, "destinations": destinations,
            "files": plan["files"][:PLAN_FILES_SHOWN] if plan else [], "files_shown": PLAN_FILES_SHOWN,
            "may_migrate": request.user.has_perms(MIGRATE)}


def _legacy_page(request, form, operation):
    return render(request, "storage_app/legacy.html", {"form": form, **_plan_context(request, operation)},
                  status=400 if form.errors else 200)


# --- Storage check -------------------------------------------------------------------------------------------

def storage_check(request):
    findings = check_storage()
    return render(request, "storage_app/storage_check.html", {
        "findings": findings, "fixable": [f for f in findings if f.fixable],
    })


@require_POST
@permission_required("instances.change_instance", raise_exception=True)
def storage_fix(request):
    try:
        fixed = [f for f in check_storage(fix=True) if f.fixed]
    except OSError as exc:
        messages.error(request, f"Applying the safe fixes stopped: {exc}. Fix that, then try again.")
        return redirect("storage-check")
    if fixed:
        messages.success(request, f"Fixed {len(fixed)}: " + "; ".join(
            f"{f.code} ({f.subject}): {f.fix.removesuffix(' (safe).').removesuffix('.')}" for f in fixed) + ".")
    else:
        messages.info(request, "Nothing needed a safe fix; what remains needs a person.")
    return redirect("storage-check")
