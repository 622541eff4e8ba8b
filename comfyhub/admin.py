from django.contrib import admin, messages

from . import tokens
from .models import AccessToken, Operation


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


@admin.register(AccessToken)
class AccessTokenAdmin(admin.ModelAdmin):
    """Tokens are made on the account page and with `manage.py tokens`: the admin lists them (never their digest)
    and revokes them. Staff see their own; only superusers see everyone's."""

    list_display = ("name", "user", "prefix_shown", "state", "created_at", "expires_at", "last_used_at")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter), "created_at")
    search_fields = ("name", "prefix", "user__username")
    list_select_related = ("user",)
    fields = ("user", "name", "prefix_shown", "state", "created_at", "expires_at", "last_used_at", "revoked_at")
    readonly_fields = fields
    actions = ("revoke",)

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        return queryset if request.user.is_superuser else queryset.filter(user=request.user)

    @admin.display(description="Token")
    def prefix_shown(self, token):
        return f"{token.prefix}…"

    @admin.display(description="State")
    def state(self, token):
        return tokens.token_state(token)

    @admin.action(description="Revoke the selected tokens", permissions=("view",))
    def revoke(self, request, queryset):
        revoked = sum(tokens.token_revoke(token=token, user=request.user) for token in queryset)
        already = queryset.count() - revoked
        self.message_user(request, f"Revoked {revoked} token(s)." + (f" {already} were revoked already." if already
                                                                      else ""), messages.SUCCESS)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        # Revoked tokens stay: the record of which token opened what (InstanceOpen.token).
        return False
