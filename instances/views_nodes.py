"""Pages for nodes as GPU hosts (never custom nodes): the Nodes page with a live table, one node with its last
heartbeat and its instances, and approving or revoking a node. Rules live in instances/nodes.py."""
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from comfyhub.forms import service_errors

from . import nodes, services


def node_list(request):
    """The page, or for its polling (htmx) the table alone."""
    template = "instances/partials/node_rows.html" if request.htmx else "instances/node_list.html"
    return render(request, template, {"rows": nodes.node_rows(), "poll_seconds": settings.NODE_HEARTBEAT_SECONDS})


def node_detail(request, name, *, confirm_revoke=False):
    row = nodes.node_row(_node(name))
    instances = services.instances_with_relations().filter(node=row.node)
    return render(request, "instances/node_detail.html", {
        "row": row, "node": row.node, "instances": instances, "queues": nodes.node_queue_names(row.node.name),
        "confirm_revoke": confirm_revoke})


@require_POST
@permission_required("instances.change_node", raise_exception=True)
def node_approve(request, name):
    node = _node(name)
    with service_errors(request):
        if nodes.node_approve(node=node, user=request.user):
            messages.success(request, f"Node {node.name} is approved: its agent takes jobs from its next heartbeat "
                                      f"on (within {settings.NODE_HEARTBEAT_SECONDS} s).")
        else:
            messages.info(request, f"Node {node.name} was already approved.")
    return redirect("node-detail", name=node.name)


@require_POST
@permission_required("instances.change_node", raise_exception=True)
def node_revoke_approval(request, name):
    """Asks first (a page with a confirming button), then revokes: both steps are POSTs."""
    node = _node(name)
    if request.POST.get("confirm") != "yes":
        if "confirm" in request.POST:
            messages.warning(request, "Nothing changed yet: press “Revoke approval” to confirm, or go back.")
        return node_detail(request, name, confirm_revoke=True)
    with service_errors(request):
        if nodes.node_revoke_approval(node=node, user=request.user):
            messages.success(request, f"Approval of node {node.name} revoked: its agent finishes the job it runs and "
                                      "takes no more.")
        else:
            messages.info(request, f"Node {node.name} was not approved.")
    return redirect("node-detail", name=node.name)


def _node(name):
    node = nodes.node_named(name)
    if node is None:
        raise Http404(f"No node '{name}'.")
    return node
