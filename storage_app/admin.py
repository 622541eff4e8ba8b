"""Admin for the model library: read what was found; type in an expected hash (checked like everywhere else)."""
from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.shortcuts import redirect

from comfyhub.queues import QueueUnavailable

from . import services
from .models import ModelAsset, Snapshot


class ModelAssetForm(forms.ModelForm):
    class Meta:
        model = ModelAsset
        fields = ["expected_sha256"]

    def clean_expected_sha256(self):
        # The service owns the rule; the form only shows its message on the field.
        value = self.cleaned_data["expected_sha256"]
        try:
            services.validate_sha256(value)
        except ValidationError as exc:
            raise ValidationError(exc.messages) from exc
        return value.strip().lower()


@admin.register(ModelAsset)
class ModelAssetAdmin(admin.ModelAdmin):
    form = ModelAssetForm
    list_display = ("path", "folder", "size", "status", "short_hash", "architecture", "last_verified_at")
    list_filter = ("status", "folder", "architecture", "expected_source")
    search_fields = ("path", "sha256", "expected_sha256")
    readonly_fields = ("path", "folder", "size", "mtime_ns", "inode", "sha256", "blake3", "expected_source",
                       "status", "status_reason", "hashed_size", "hashed_mtime_ns", "hashed_inode",
                       "last_verified_at", "evidence", "architecture", "metadata", "first_seen_at", "last_seen_at")
    fields = ("expected_sha256", *readonly_fields)
    actions = ["verify_library"]

    def has_add_permission(self, request):
        return False  # assets come from scanning the library

    def save_model(self, request, obj, form, change):
        services.asset_set_expected(asset=obj, sha256=form.cleaned_data["expected_sha256"])

    @admin.action(description="Verify the library now (incremental)", permissions=["verify"])
    def verify_library(self, request, queryset):
        try:
            services.models_verify(user=request.user)
        except QueueUnavailable as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        self.message_user(request, "Verification queued; see Operations.")

    def has_verify_permission(self, request):
        return request.user.has_perm("storage_app.verify_modelasset")


@admin.register(Snapshot)
class SnapshotAdmin(admin.ModelAdmin):
    list_display = ("instance_label", "kind", "size", "automatic", "note", "created_by", "created_at")
    list_filter = ("kind", "automatic", "instance_label")
    readonly_fields = ("instance", "instance_label", "kind", "include_output", "automatic", "note", "archive", "size",
                       "sha256", "manifest", "created_by", "created_at")
    actions = ["restore", "delete_with_archive"]

    def has_add_permission(self, request):
        return False  # snapshots are made by operations

    def has_delete_permission(self, request, obj=None):
        return False  # the action below also removes the archive

    @admin.action(description="Restore into its instance (an undo snapshot is taken first)", permissions=["restore"])
    def restore(self, request, queryset):
        for snapshot in queryset:
            try:
                services.snapshot_restore(snapshot=snapshot, user=request.user)
            except (QueueUnavailable, ValidationError) as exc:
                self.message_user(request, f"{snapshot}: {exc}", messages.ERROR)
                return
        self.message_user(request, "Restore queued; see Operations.")

    @admin.action(description="Delete with the archive file (asks for the number on its delete page)",
                  permissions=["restore"])
    def delete_with_archive(self, request, queryset):
        # Deleting asks for the number typed out; the snapshot's delete page does that.
        snapshots = list(queryset[:2])
        if len(snapshots) != 1:
            self.message_user(request, "Choose one snapshot to delete: its delete page asks for its number to "
                                       "confirm.", messages.ERROR)
            return None
        return redirect("snapshot-delete", snapshots[0].pk)

    def has_restore_permission(self, request):
        return request.user.has_perm("storage_app.restore_snapshot")
