"""Admin for the registry. Actions enqueue the same operations as the browser UI and the CLI."""
from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError

from comfyhub.queues import QueueUnavailable

from . import services
from .models import GPU, CustomNode, GPUAssignment, Instance, InstanceTemplate, Node, WorkflowEntry, WorkflowVersion


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = ("name", "docker_host", "bind_address", "port_range_start", "port_range_end", "gpu_source",
                    "gpus_discovered_at")
    actions = ["rediscover_gpus"]

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


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin):
    list_display = ("instance_id", "display_name", "node", "host_port", "desired_state", "status", "checked_at")
    list_filter = ("status", "desired_state", "node")
    search_fields = ("instance_id", "display_name", "description", "image")
    inlines = [GPUAssignmentInline]
    actions = ["build", "start", "stop", "restart", "delete_keeping_data"]
    readonly_fields = ("instance_id", "node", "host_port", "desired_state", "status", "status_detail",
                       "container_id", "config_hash", "restart_count", "health", "checked_at", "started_at",
                       "created_by", "created_at", "updated_at")
    fields = ("instance_id", "display_name", "description", "node", "image", "extra_args", "extra_env",
              *readonly_fields[2:])

    def get_queryset(self, request):
        return services.instances_with_relations()

    def has_add_permission(self, request):
        return False  # created with the form or `manage.py instances create`, which run every safety check

    def save_model(self, request, obj, form, change):
        # Route edits through the service so the admin obeys the same rules as the UI and the CLI.
        try:
            services.instance_update(
                instance=Instance.objects.get(pk=obj.pk), display_name=obj.display_name,
                description=obj.description, image=obj.image, extra_args=obj.extra_args, extra_env=obj.extra_env,
                host_port=obj.host_port, gpu_indexes=[g.index for g in obj.assigned_gpus()], user=request.user,
            )
        except ValidationError as exc:
            self.message_user(request, "; ".join(exc.messages), messages.ERROR)

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

    @admin.action(description="Delete (container and registry entry; data is kept)", permissions=["remove"])
    def delete_keeping_data(self, request, queryset):
        self._enqueue(request, queryset, services.instance_delete, "Delete")

    def has_delete_permission(self, request, obj=None):
        return False  # deleting must remove the container too: the action above does it as an operation

    def has_remove_permission(self, request):
        return request.user.has_perm("instances.delete_instance")

    def has_build_permission(self, request):
        return request.user.has_perm("instances.build_instance")

    def has_start_permission(self, request):
        return request.user.has_perm("instances.start_instance")


class InstanceTemplateForm(forms.ModelForm):
    class Meta:
        model = InstanceTemplate
        fields = "__all__"

    def clean(self):
        from .templating import validate_template

        data = super().clean()
        try:
            validate_template(image=data.get("image", ""), extra_args=data.get("extra_args"),
                              extra_env=data.get("extra_env"), custom_nodes=data.get("custom_nodes"),
                              settings=data.get("settings"))
        except ValidationError as exc:
            for field, errors in exc.message_dict.items():
                self.add_error(field, errors)
        return data


@admin.register(InstanceTemplate)
class InstanceTemplateAdmin(admin.ModelAdmin):
    form = InstanceTemplateForm
    list_display = ("name", "image", "gpu_count", "description")
    filter_horizontal = ("starter_workflows",)


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


@admin.register(CustomNode)
class CustomNodeAdmin(admin.ModelAdmin):
    list_display = ("name", "instance", "url", "ref", "commit", "updated_at")
    list_filter = ("instance",)
    readonly_fields = ("instance", "name", "url", "ref", "commit", "requirements", "installed_at", "updated_at")

    def has_add_permission(self, request):
        return False  # installed by an operation, which clones and records it
