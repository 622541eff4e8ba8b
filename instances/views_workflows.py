"""Pages for what an instance holds and what instances share: its workflows (copy with a dependency pre-flight,
publish, check an uploaded file), the workflow library, instance templates and their drift, and custom nodes.
A view parses the request, calls one service, says what happened and redirects; rules live in services.py,
workflows.py, templating.py and customnodes.py."""
import json
from datetime import datetime, timezone

from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.core.exceptions import ValidationError
from django.db.models import Count, Prefetch
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from comfyhub import jsonlimits
from comfyhub.forms import service_errors

from . import customnodes, services, templating, workflows
from .forms import (LibraryInstallForm, NodeActionForm, NodeInstallForm, TemplateApplyForm, TemplateForm,
                    TemplateInstanceForm, WorkflowCopyForm, WorkflowPublishForm, WorkflowUploadForm)
from .models import Instance, InstanceTemplate, WorkflowEntry, WorkflowInstall, WorkflowVersion


def _instance(instance_id) -> Instance:
    return get_object_or_404(services.instances_with_relations().select_related("template"), instance_id=instance_id)


# --- An instance's workflows ---------------------------------------------------------------------------------

def instance_workflows(request, instance_id):
    return _workflows_page(request, _instance(instance_id))


def _listed(request, instance) -> list[dict]:
    """The instance's workflows; a link planted on the way to them is said on the page instead of followed."""
    try:
        return workflows.list_workflows(instance)
    except workflows.WorkflowError as exc:
        messages.error(request, f"The workflows of {instance} cannot be listed: {exc}")
        return []


def _workflows_page(request, instance, *, copy_form=None, upload_form=None, checks=None, upload_checks=None):
    listed = _listed(request, instance)
    installed = {row.path: row.version for row in
                 WorkflowInstall.objects.filter(instance=instance).select_related("version__entry")}
    for workflow in listed:
        workflow["modified_at"] = datetime.fromtimestamp(workflow["modified"], tz=timezone.utc)
        workflow["library_version"] = installed.get(workflow["path"])
        workflow["publish_name"] = workflow["path"].rsplit("/", 1)[-1][:-len(".json")]
    return render(request, "instances/workflows.html", {
        "instance": instance,
        "workflows": listed,
        "copy_form": copy_form or WorkflowCopyForm(source=instance, workflows=listed),
        "upload_form": upload_form or WorkflowUploadForm(),
        "checks": checks,
        "problems": _problems(checks),
        "upload_checks": upload_checks,
    })


@require_POST
@permission_required("instances.manage_workflows", raise_exception=True)
def workflows_check(request, instance_id):
    """The pre-flight of the selected workflows against each chosen target: in place through htmx, or the page."""
    instance = _instance(instance_id)
    form = WorkflowCopyForm(request.POST, source=instance, workflows=_listed(request, instance))
    checks = None
    if form.is_valid():
        paths, targets = form.cleaned_data["paths"], list(form.cleaned_data["targets"])
        if not paths:
            form.add_error("paths", "Choose at least one workflow to check.")
        if not targets:
            form.add_error("targets", "Choose at least one other instance to check against.")
        if not form.errors:
            checks = _preflight(instance, paths, targets)
    if request.htmx:
        return render(request, "instances/partials/preflight.html", {
            "checks": checks, "errors": _form_errors(form), "copy_button": True, "problems": _problems(checks),
        })
    return _workflows_page(request, instance, copy_form=form, checks=checks)


def _preflight(source, paths, targets) -> list[dict]:
    """[{path, error, results: [{target, **preflight}]}]; each target's node list is asked for once."""
    node_types = {target.pk: services.node_types_of(target) for target in targets}
    checks = []
    for path in paths:
        check = {"path": path, "error": "", "results": []}
        try:
            data = workflows.parse_workflow(workflows.read_workflow(source, path))
            for target in targets:
                check["results"].append(_result(target, workflows.preflight(data, target, node_types[target.pk])))
        except workflows.WorkflowError as exc:
            check["error"] = str(exc)
        checks.append(check)
    return checks


def _result(target, preflight) -> dict:
    """`clear`: nothing known to be missing (node types may still be unknown: see `node_types_known`)."""
    return {"target": target, "clear": not preflight["missing_node_types"] and not preflight["missing_models"],
            **preflight}


def _problems(checks) -> bool:
    return any(check["error"] or not all(r["clear"] for r in check["results"]) for check in checks or [])


def _form_errors(form) -> list[str]:
    return [message for messages_ in form.errors.values() for message in messages_]


@require_POST
@permission_required("instances.manage_workflows", raise_exception=True)
def workflows_copy(request, instance_id):
    instance = _instance(instance_id)
    form = WorkflowCopyForm(request.POST, source=instance, workflows=_listed(request, instance))
    if form.is_valid():
        arguments = form.arguments()
        with service_errors(request, form):
            operation = services.workflows_copy(**arguments, user=request.user)
            targets = ", ".join(str(t) for t in arguments["targets"])
            which = "every workflow" if arguments["all_workflows"] else f"{len(arguments['paths'])} workflow(s)"
            messages.success(request, f"Copying {which} from '{instance}' to {targets}.")
            return redirect(operation)
    return _workflows_page(request, instance, copy_form=form)


@require_POST
@permission_required("instances.manage_workflows", raise_exception=True)
def workflow_publish(request, instance_id):
    instance = _instance(instance_id)
    form = WorkflowPublishForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Say which workflow to publish.")
        return redirect("instance-workflows", instance.instance_id)
    path, name = form.cleaned_data["path"], form.cleaned_data["name"].strip()
    with service_errors(request):
        version, created = services.workflow_publish(instance=instance, path=path, name=name, user=request.user)
        if created:
            messages.success(request, f"Published {path} to the library as '{version.entry}': new version "
                                      f"{version.number}.")
        else:
            messages.info(request, f"{path} is identical to version {version.number} of '{version.entry}': "
                                   "nothing new.")
    return redirect("instance-workflows", instance.instance_id)


@require_POST
@permission_required("instances.manage_workflows", raise_exception=True)
def workflow_check_file(request, instance_id):
    """The pre-flight of an uploaded workflow file against this instance; nothing is stored."""
    instance = _instance(instance_id)
    form = WorkflowUploadForm(request.POST, request.FILES)
    checks = None
    if form.is_valid():
        upload = form.cleaned_data["file"]
        try:
            # Refused by its size before it is read; read with a cap.
            raw = jsonlimits.read_upload(upload, what=f"The workflow file {upload.name}")
            result = services.workflow_check(instance=instance, raw=raw)
        except jsonlimits.JSONInputError as exc:
            form.add_error("file", str(exc))
        except ValidationError as exc:
            form.add_error("file", f"{upload.name}: {' '.join(exc.messages)}")
        else:
            checks = [{"path": upload.name, "error": "", "results": [_result(instance, result)]}]
    if request.htmx:
        return render(request, "instances/partials/preflight.html", {"checks": checks, "errors": _form_errors(form)})
    return _workflows_page(request, instance, upload_form=form, upload_checks=checks)


# --- The workflow library ------------------------------------------------------------------------------------

def library(request):
    return _library_page(request)


def _library_page(request, bound_form=None):
    versions = Prefetch("versions", queryset=WorkflowVersion.objects.select_related("author"))
    entries = []
    for entry in WorkflowEntry.objects.prefetch_related(versions):
        form = LibraryInstallForm(entry=entry)
        if bound_form is not None and bound_form.data.get("name") == entry.name:
            form = bound_form
            form.fields["version"].choices = LibraryInstallForm(entry=entry).fields["version"].choices
        entries.append({"entry": entry, "versions": list(entry.versions.all()), "holders": workflows.holders(entry),
                        "form": form})
    unknown = bound_form is not None and not any(e["form"] is bound_form for e in entries)
    return render(request, "instances/library.html", {"entries": entries,
                                                     "orphan_form": bound_form if unknown else None})


@require_POST
@permission_required("instances.manage_workflows", raise_exception=True)
def library_install(request):
    form = LibraryInstallForm(request.POST)
    if form.is_valid():
        instances = list(form.cleaned_data["instances"])
        with service_errors(request, form):
            operation = services.workflow_install(spec=form.spec(), instances=instances, user=request.user)
            messages.success(request, f"Installing '{form.spec()}' into {', '.join(str(i) for i in instances)}.")
            return redirect(operation)
    return _library_page(request, bound_form=form)


# --- Templates -----------------------------------------------------------------------------------------------

def template_list(request):
    templates = InstanceTemplate.objects.annotate(instance_count=Count("instances")).prefetch_related(
        Prefetch("starter_workflows", queryset=WorkflowVersion.objects.select_related("entry")))
    return render(request, "instances/template_list.html", {"templates": templates})


@require_http_methods(["GET", "POST"])
@permission_required("instances.add_instancetemplate", raise_exception=True)
def template_create(request):
    form = TemplateForm(request.POST if request.method == "POST" else None)
    if form.is_bound and form.is_valid():
        with service_errors(request, form):
            template = services.template_create(**form.arguments())
            messages.success(request, f"Template '{template}' created.")
            return redirect("template-detail", template.name)
    return render(request, "instances/template_form.html", {"form": form})


def template_detail(request, name):
    return _template_page(request, _template(name))


def _template(name) -> InstanceTemplate:
    starters = Prefetch("starter_workflows", queryset=WorkflowVersion.objects.select_related("entry"))
    return get_object_or_404(InstanceTemplate.objects.prefetch_related(starters), name=name)


def _template_page(request, template, *, instance_form=None, apply_form=None):
    users = services.instances_with_relations().filter(template=template).select_related("template") \
        .prefetch_related("custom_nodes")
    return render(request, "instances/template_detail.html", {
        "template": template,
        "users": [{"instance": instance, "drift": len(templating.drift(instance))} for instance in users],
        "instance_form": instance_form or TemplateInstanceForm(),
        "apply_form": apply_form or TemplateApplyForm(),
    })


@require_POST
@permission_required("instances.add_instance", raise_exception=True)
def template_new_instance(request, name):
    template = _template(name)
    form = TemplateInstanceForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        # Without a job queue nothing is created: an instance whose template cannot be applied would be half made.
        with service_errors(request, form, prefix=f"Instance '{data['instance_id']}' was not created: "):
            instance, operation = services.instance_create_from_template(
                template=template, instance_id=data["instance_id"], host_port=data["host_port"],
                display_name=data["display_name"], user=request.user)
            messages.success(request, f"Instance '{instance}' created from template '{template}' on port "
                                      f"{instance.host_port}; applying the template.")
            return redirect(operation)
    return _template_page(request, template, instance_form=form)


@require_POST
@permission_required("instances.change_instance", raise_exception=True)
def template_apply(request, name):
    template = _template(name)
    form = TemplateApplyForm(request.POST)
    if form.is_valid():
        instance = form.cleaned_data["instance"]
        with service_errors(request, form):
            operation = services.template_apply(template=template, instance=instance, user=request.user)
            messages.success(request, f"Applying template '{template}' to '{instance}'.")
            return redirect(operation)
    return _template_page(request, template, apply_form=form)


def instance_drift(request, instance_id):
    instance = _instance(instance_id)
    differences = [{**d, "template": _shown(d["template"]), "instance": _shown(d["instance"])}
                   for d in templating.drift(instance)]
    return render(request, "instances/template_drift.html", {"instance": instance, "differences": differences})


def _shown(value) -> str:
    """Lists and dicts (arguments, environment, settings) as compact JSON; the rest as text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict, bool)) or value is None else str(value)


# --- Custom nodes --------------------------------------------------------------------------------------------

def instance_nodes(request, instance_id):
    return _nodes_page(request, _instance(instance_id))


def _nodes_page(request, instance, install_form=None):
    listed, nodes_error = [], ""
    try:
        listed = customnodes.list_nodes(instance)
    except customnodes.CustomNodeError as exc:  # another node's agent could not be asked: said in the table
        nodes_error = f"The custom nodes of {instance} cannot be listed: {exc}"
    return render(request, "instances/nodes.html", {
        "instance": instance, "nodes": listed, "nodes_error": nodes_error,
        "install_form": install_form or NodeInstallForm(),
    })


@require_POST
@permission_required("instances.manage_custom_nodes", raise_exception=True)
def node_install(request, instance_id):
    instance = _instance(instance_id)
    form = NodeInstallForm(request.POST)
    if form.is_valid():
        url, ref = form.cleaned_data["url"], form.cleaned_data["ref"]
        with service_errors(request, form):
            operation = services.node_install(instance=instance, url=url, ref=ref, user=request.user)
            messages.success(request, f"Installing {customnodes.name_from_url(url.strip())} into '{instance}'.")
            return redirect(operation)
    return _nodes_page(request, instance, install_form=form)


NODE_ACTION_DONE = {"update": "Updating", "disable": "Disabling", "enable": "Enabling", "remove": "Removing"}


@require_POST
@permission_required("instances.manage_custom_nodes", raise_exception=True)
def node_action(request, instance_id):
    instance = _instance(instance_id)
    form = NodeActionForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Say which custom node and what to do with it.")
        return redirect("instance-nodes", instance.instance_id)
    name, action = form.cleaned_data["name"], form.cleaned_data["action"]
    with service_errors(request):
        operation = services.node_action(instance=instance, name=name, action=action, user=request.user)
        messages.success(request, f"{NODE_ACTION_DONE[action]} custom node {name} of '{instance}'.")
        return redirect(operation)
    return redirect("instance-nodes", instance.instance_id)
