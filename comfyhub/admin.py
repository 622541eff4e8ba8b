from django.contrib import admin

from .models import Operation


@admin.register(Operation)
class OperationAdmin(admin.ModelAdmin):
    """Operations are written by the runner only: the admin shows them, it never edits them."""

    list_display = ("kind", "target_label", "status", "progress", "requested_by", "created_at", "finished_at")
    list_filter = ("status", "kind", "queue_name")
    search_fields = ("id", "kind", "target_label", "error")
    date_hierarchy = "created_at"
    list_select_related = ("requested_by",)

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
