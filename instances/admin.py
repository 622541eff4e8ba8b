"""Admin for the registry. Actions enqueue the same operations as the browser UI and the CLI; edits are checked
by the same services (their refusals show on the form, nothing is saved) and saved by them."""
from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.http import HttpResponseRedirect
from django.shortcuts import redirect

from comfyhub.forms import add_service_error
from comfyhub.queues import QueueUnavailable

from . import services
from . import access, nodes
from .models import (GPU, CustomNode, GPUAssignment, Instance, InstanceOpen, InstanceShare, InstanceTemplate, Node,
                     WorkflowEntry, WorkflowVersion)


class ServiceRefused(Exception):
    """A service refused a save the form had passed (another request changed something in between)."""

    def __init__(self, error: ValidationError):
        super().__init__("; ".join(error.messages))


class SavedByServices(admin.ModelAdmin):
    """The form runs the service's checks in clean(); save_model calls the service. Should the service still refuse,
    nothing is saved and the page says why, never "changed successfully"."""

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except ServiceRefused as exc:  # raised inside the admin's transaction: rolled back, log entry included
            self.message_user(request, f"Not saved: {exc}", messages.ERROR)
            return HttpResponseRedirect(request.path)


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ("name", "state", "approved", "docker_host", "bind_address", "port_range_start", "port_range_end",
                    "gpu_source", "gpus_discovered_at")
    list_filter = ("approved",)
    # What the agent reports; approval goes through the actions (the same services as the Nodes page).
    readonly_fields = ("approved", "registered_at", "last_heartbeat_at", "online_since", "heartbeat")
    actions = ["rediscover_gpus", "approve", "revoke_approval"]

    @admin.display(description="State")
    def state(self, node):
        return nodes.node_state(node).label

    @admin.action(description="Approve: their agents take jobs", permissions=["change"])
    def approve(self, request, queryset):
        for node in queryset:
            done = nodes.node_approve(node=node, user=request.user)
            self.message_user(request, f"{node}: {'approved' if done else 'was already approved'}.")

    @admin.action(description="Revoke approval: their agents take no more jobs", permissions=["change"])
    def revoke_approval(self, request, queryset):
        for node in queryset:
            try:
                done = nodes.node_revoke_approval(node=node, user=request.user)
            except ValidationError as exc:
                self.message_user(request, f"{node}: {' '.join(exc.messages)}", messages.ERROR)
                continue
            self.message_user(request, f"{node}: {'approval revoked' if done else 'was not approved'}.")

    @admin.action(description="Rediscover GPUs", permissions=["change"])
    def rediscover_gpus(self, request, queryset):
        for node in queryset:
            source, gpus = services.discover_gpus(node)
            self.message_user(request, f"{node}: {len(gpus)} GPU(s) from {source}.")


@admin.register(GPU)
class GPUAdmin(admin.ModelAdmin):
    list_display = ("__str__", "node", "index", "uuid", "memory_total", "shareable", "present", "holders")
    list_filter = ("node", "shareable", "present")
    readonly_fields = ("node", "index", "uuid", "name", "memory_total", "present", "shareable")

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("node").prefetch_related("assignments__instance")

    @admin.display(description="Held by")
    def holders(self, gpu):
        return ", ".join(str(a.instance) for a in gpu.assignments.all()) or "—"

    def has_add_permission(self, request):
        return False  # GPUs come from discovery

    actions = ["make_shareable", "make_exclusive"]

    @admin.action(description="Allow several instances (shareable)", permissions=["change"])
    def make_shareable(self, request, queryset):
        for gpu in queryset:
            services.gpu_set_shareable(gpu=gpu, shareable=True)
        self.message_user(request, "Marked shareable.")

    @admin.action(description="One instance only (exclusive)", permissions=["change"])
    def make_exclusive(self, request, queryset):
        for gpu in queryset:
            try:
                services.gpu_set_shareable(gpu=gpu, shareable=False)
            except ValidationError as exc:
                self.message_user(request, " ".join(exc.messages), messages.ERROR)


class GPUAssignmentInline(admin.TabularInline):
    model = GPUAssignment
    extra = 0
    readonly_fields = ("gpu", "exclusive")
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False  # assigned through the instance form, which runs the exclusivity checks


class InstanceShareForm(forms.ModelForm):
    """A share added in the admin: judged by access.share_add's rules (not the owner, not twice, a user or a group)."""

    class Meta:
        model = InstanceShare
        fields = ("user", "group")

    def clean(self):
        data = super().clean()
        if self.instance.pk is not None or not self.has_changed():
            return data
        instance = getattr(self.instance, "instance", None) if self.instance.instance_id else None
        user, group = data.get("user"), data.get("group")
        if bool(user) == bool(group):
            raise ValidationError("Choose a user or a group, not both.")
        if instance is not None:
            if user is not None and user.pk == instance.owner_id:
                raise ValidationError(f"'{user}' owns '{instance}' already; owners need no share.")
        return data


class InstanceShareInline(admin.TabularInline):
    model = InstanceShare
    form = InstanceShareForm
    fk_name = "instance"
    extra = 0
    fields = ("user", "group", "created_by", "created_at")
    readonly_fields = ("created_by", "created_at")

    def _may_share(self, request, obj):
        return obj is None or access.can_share(request.user, obj)

    def has_add_permission(self, request, obj=None):
        return self._may_share(request, obj)

    def has_change_permission(self, request, obj=None):
        return False  # a share is added or removed, never turned into another one

    def has_delete_permission(self, request, obj=None):
        return self._may_share(request, obj)

    def has_view_permission(self, request, obj=None):
        return True


class InstanceOpenInline(admin.TabularInline):
    model = InstanceOpen
    extra = 0
    fields = ("user", "via", "token", "at")
    readonly_fields = fields
    can_delete = False
    max_num = 0
    verbose_name_plural = "Last opened through the hub"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("user", "token")

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_view_permission(self, request, obj=None):
        return True


class InstanceAdminForm(forms.ModelForm):
    """The admin's instance form: services.instance_update_check judges it, as it judges the instance page."""

    class Meta:
        model = Instance
        fields = "__all__"

    CHECKED = ("display_name", "description", "image", "extra_args", "extra_env", "image_arguments", "owner",
               "idle_stop_after")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "image_arguments" in self.fields:
            self.fields["image_arguments"].required = False  # empty: as the container's command

    def clean_image_arguments(self):
        return self.cleaned_data.get("image_arguments") or "command"

    def clean(self):
        data = super().clean()
        if self.instance.pk is None or any(name in self.errors for name in self.CHECKED):
            return data  # no add in the admin; a field that did not even parse has its own error already
        instance = Instance.objects.select_related("node").get(pk=self.instance.pk)
        try:
            services.instance_update_check(
                instance=instance, display_name=data.get("display_name", ""), description=data.get("description", ""),
                image=data.get("image", ""), extra_args=data.get("extra_args"), extra_env=data.get("extra_env"),
                host_port=None, gpu_indexes=instance.gpu_choice(),
                image_arguments=data.get("image_arguments", instance.image_arguments),
                idle_stop_after=data.get("idle_stop_after", instance.idle_stop_after),
                owner=data.get("owner", services.KEEP))
        except ValidationError as exc:
            add_service_error(self, exc)
        return data


@admin.register(Instance)
class InstanceAdmin(SavedByServices):
    form = InstanceAdminForm
    list_display = ("instance_id", "display_name", "owner", "node", "host_port", "desired_state", "status",
                    "checked_at")
    list_filter = ("status", "desired_state", "node")
    search_fields = ("instance_id", "display_name", "description", "image", "owner__username")
    inlines = [GPUAssignmentInline, InstanceShareInline, InstanceOpenInline]
    actions = ["build", "start", "stop", "restart", "delete_keeping_data"]
    readonly_fields = ("instance_id", "node", "host_port", "desired_state", "status", "status_detail",
                       "container_id", "config_hash", "restart_count", "health", "checked_at", "started_at",
                       "last_activity_at", "stopped_at", "stop_reason", "gpus_released", "created_by", "created_at",
                       "updated_at")
    fields = ("instance_id", "display_name", "description", "node", "owner", "idle_stop_after", "image",
              "image_arguments", "extra_args", "extra_env", *readonly_fields[2:])

    def get_queryset(self, request):
        return services.instances_with_relations().select_related("owner")

    def save_formset(self, request, form, formset, change):
        if formset.model is not InstanceShare:
            return super().save_formset(request, form, formset, change)
        # Shares go through access.share_add/share_remove: the same rules and the same record of who shared.
        added = formset.save(commit=False)
        for share in formset.deleted_objects:
            access.share_remove(share=share, user=request.user)
        for share in added:
            if share.pk is None:
                try:
                    access.share_add(instance=form.instance, username=share.user.get_username() if share.user else "",
                                     group=share.group.name if share.group else "", user=request.user)
                except ValidationError as exc:
                    raise ServiceRefused(exc) from exc

    def has_add_permission(self, request):
        return False  # created with the form or `manage.py instances create`, which run every safety check

    def save_model(self, request, obj, form, change):
        # Route edits through the service so the admin obeys the same rules as the UI and the CLI.
        instance = Instance.objects.select_related("node").get(pk=obj.pk)
        try:
            services.instance_update(
                instance=instance, display_name=obj.display_name, description=obj.description, image=obj.image,
                extra_args=obj.extra_args, extra_env=obj.extra_env, host_port=None,
                gpu_indexes=instance.gpu_choice(), image_arguments=obj.image_arguments,
                idle_stop_after=obj.idle_stop_after, owner=obj.owner, user=request.user,
            )
        except ValidationError as exc:
            raise ServiceRefused(exc) from exc

    def _enqueue(self, request, queryset, action, verb):
        done = 0
        for instance in queryset:
            try:
                action(instance=instance, user=request.user)
                done += 1
            except (QueueUnavailable, ValidationError) as exc:
                self.message_user(request, f"{instance}: {exc}", messages.ERROR)
                return
        self.message_user(request, f"{verb} queued for {done} instance(s); see Operations.")

    @admin.action(description="Build directories", permissions=["build"])
    def build(self, request, queryset):
        self._enqueue(request, queryset, services.instance_build, "Build")

    @admin.action(description="Start", permissions=["start"])
    def start(self, request, queryset):
        self._enqueue(request, queryset, services.instance_start, "Start")

    @admin.action(description="Stop", permissions=["start"])
    def stop(self, request, queryset):
        self._enqueue(request, queryset, services.instance_stop, "Stop")

    @admin.action(description="Restart", permissions=["start"])
    def restart(self, request, queryset):
        self._enqueue(request, queryset, services.instance_restart, "Restart")

    @admin.action(description="Delete (asks for the instance id on its delete page)", permissions=["remove"])
    def delete_keeping_data(self, request, queryset):
        # Deleting asks for the id typed out; the instance's delete page does that (and offers purging the data).
        instances = list(queryset[:2])
        if len(instances) != 1:
            self.message_user(request, "Choose one instance to delete: its delete page asks for its id to confirm.",
                              messages.ERROR)
            return None
        return redirect("instance-delete", instances[0].instance_id)

    def has_delete_permission(self, request, obj=None):
        return False  # deleting must remove the container too: the action above does it as an operation

    def has_remove_permission(self, request):
        return request.user.has_perm("instances.delete_instance")

    def has_build_permission(self, request):
        return request.user.has_perm("instances.build_instance")

    def has_start_permission(self, request):
        return request.user.has_perm("instances.start_instance")


class InstanceTemplateForm(forms.ModelForm):
    """The admin's template form: judged by the services' rules for templates, as the template page is."""

    class Meta:
        model = InstanceTemplate
        fields = "__all__"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if "name" in self.fields:  # taken as typed and judged by the services' rule, as on the template page
            self.fields["name"] = forms.CharField(max_length=63, strip=False,
                                                  help_text="Lowercase letters, digits and '-'.")
        if "min_gpus" in self.fields:  # empty: no minimum, as on the template page
            self.fields["min_gpus"].required = False

    def clean(self):
        from .templating import validate_template

        data = super().clean()
        if self.instance.pk is None and "name" in data:
            if problem := services.template_name_problem(data["name"]):
                self.add_error("name", problem)
        try:
            validate_template(image=data.get("image", ""), extra_args=data.get("extra_args"),
                              extra_env=data.get("extra_env"), custom_nodes=data.get("custom_nodes"),
                              settings=data.get("settings"))
        except ValidationError as exc:
            for field, errors in exc.message_dict.items():
                if field not in self.errors:  # a field that did not parse has its own error already
                    self.add_error(field if field in self.fields else None, errors)
        return data


@admin.register(InstanceTemplate)
class InstanceTemplateAdmin(SavedByServices):
    form = InstanceTemplateForm
    list_display = ("name", "image", "gpu_count", "self_service", "description")
    list_filter = ("self_service",)
    filter_horizontal = ("starter_workflows",)
    readonly_fields = ("created_at",)

    def get_readonly_fields(self, request, obj=None):
        # The name is how instances and commands refer to a template: set once, like an instance id.
        return ("name", *self.readonly_fields) if obj is not None else self.readonly_fields

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        values = dict(description=data["description"], image=data["image"], extra_args=data["extra_args"],
                      extra_env=data["extra_env"], gpu_count=data["gpu_count"], custom_nodes=data["custom_nodes"],
                      settings_values=data["settings"], starter_workflows=list(data["starter_workflows"]),
                      self_service=data["self_service"], min_gpus=data.get("min_gpus") or 0)
        try:
            if change:
                template = services.template_update(template=InstanceTemplate.objects.get(pk=obj.pk), **values)
            else:
                template = services.template_create(name=data["name"], **values)
        except ValidationError as exc:
            raise ServiceRefused(exc) from exc
        obj.pk, obj.created_at = template.pk, template.created_at
        obj._state.adding = False

    def save_related(self, request, form, formsets, change):
        for formset in formsets:  # the service has set the starter workflows
            self.save_formset(request, form, formset, change=change)


class WorkflowVersionInline(admin.TabularInline):
    model = WorkflowVersion
    extra = 0
    fields = ("number", "sha256", "published_from", "author", "created_at")
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False  # versions come from publishing


@admin.register(WorkflowEntry)
class WorkflowEntryAdmin(admin.ModelAdmin):
    list_display = ("name", "created_at")
    search_fields = ("name",)
    inlines = [WorkflowVersionInline]
    # The name becomes a file name when a version is installed; publishing checks it, so it is not edited here.
    readonly_fields = ("name", "created_at")

    def has_add_permission(self, request):
        return False  # entries come from publishing, which checks the name


@admin.register(CustomNode)
class CustomNodeAdmin(admin.ModelAdmin):
    list_display = ("name", "instance", "url", "ref", "commit", "updated_at")
    list_filter = ("instance",)
    readonly_fields = ("instance", "name", "url", "ref", "commit", "requirements", "installed_at", "updated_at")

    def has_add_permission(self, request):
        return False  # installed by an operation, which clones and records it
