"""Pages for operations: the list, one operation with live progress, cancel, and running diagnostics."""
from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST
from django_htmx.http import HttpResponseStopPolling

from . import jobs, operations
from .forms import OperationFilterForm, service_errors
from .models import Operation

PAGE_SIZE = 25


def operation_list(request):
    form = OperationFilterForm(request.GET or None)
    queryset = form.filter(Operation.objects.select_related("requested_by", "target_type"))
    page = Paginator(queryset, PAGE_SIZE).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "comfyhub/operation_list.html",
        {"form": form, "page": page, "operations": page.object_list, "query": query.urlencode()},
    )


def operation_detail(request, pk):
    operation = get_object_or_404(Operation.objects.select_related("requested_by", "target_type"), pk=pk)
    return render(request, "comfyhub/operation_detail.html", {"operation": operation})


def operation_progress(request, pk):
    """The live part of the operation page; tells htmx to stop polling once the operation is over."""
    operation = get_object_or_404(Operation.objects.select_related("requested_by", "target_type"), pk=pk)
    response = render(request, "comfyhub/partials/operation_live.html", {"operation": operation})
    if operation.is_terminal:
        response.status_code = HttpResponseStopPolling.status_code
    return response


@require_POST
@permission_required("comfyhub.cancel_operation", raise_exception=True)
def operation_cancel(request, pk):
    operation = get_object_or_404(Operation, pk=pk)
    try:
        operations.operation_cancel(operation=operation, user=request.user)
    except operations.OperationError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, "The operation was cancelled.")
    return redirect(operation)


@require_POST
@permission_required("comfyhub.run_diagnostics", raise_exception=True)
def diagnostics_run(request):
    with service_errors(request):
        operation = operations.enqueue(jobs.diagnostics, user=request.user, pause=0.4)
        messages.success(request, "Diagnostics queued.")
        return redirect(operation)
    return redirect("dashboard")
