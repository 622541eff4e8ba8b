"""The signed-in user's own page: their personal access tokens (made, shown once, revoked) and the instances they may
use through the hub. Only one's own tokens are ever found here; another user's is a 404."""
from django.conf import settings
from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from . import tokens
from .forms import AccessTokenForm, service_errors

@require_safe
def account(request):
    return account_page(request, AccessTokenForm(user=request.user))


@never_cache
def account_page(request, form, new_token=None):
    """The page; with `new_token` ({"name", "raw"}) right after it was made, the one time it is shown."""
    return render(request, "comfyhub/account.html", {
        "form": form,
        "tokens": with_states(tokens.tokens_of(request.user)),
        "new_token": new_token,
        "instances": usable_instances(request.user),
    }, status=400 if form.errors else 200)


@require_POST
def token_create(request):
    """The new token is shown in this POST's own answer (never cached, never kept in the session): nothing stores
    it but the person who copies it."""
    form = AccessTokenForm(request.POST, user=request.user)
    if form.is_valid():
        with service_errors(request, form):
            token, raw = tokens.token_create(user=request.user, name=form.cleaned_data["name"],
                                             expires_at=form.cleaned_data["expires"])
            messages.success(request, f"Made the token '{token.name}'.")
            return account_page(request, AccessTokenForm(user=request.user), {"name": token.name, "raw": raw})
    return account_page(request, form)


@require_http_methods(["GET", "POST"])
def token_revoke(request, pk):
    token = get_object_or_404(tokens.tokens_of(request.user), pk=pk)
    if request.method == "POST":
        if tokens.token_revoke(token=token, user=request.user):
            messages.success(request, f"Revoked the token '{token.name}' ({token.prefix}…): scripts using it are "
                                      f"refused within {settings.ACCESS_CACHE_SECONDS} seconds.")
        else:
            messages.info(request, f"The token '{token.name}' ({token.prefix}…) was already revoked.")
        return redirect("account")
    if token.revoked_at is not None:
        messages.info(request, f"The token '{token.name}' ({token.prefix}…) was already revoked.")
        return redirect("account")
    return render(request, "comfyhub/token_revoke.html",
                  {"token": token, "cache_seconds": settings.ACCESS_CACHE_SECONDS})


def with_states(queryset) -> list:
    now = timezone.now()
    rows = list(queryset)
    for token in rows:
        token.state = tokens.token_state(token, now=now)
    return rows


def usable_instances(user) -> list:
    # The core imports no app at import time (STYLE.md); the page only lists what instances.access allows.
    from instances import access

    return list(access.usable_by(user).order_by("instance_id"))
