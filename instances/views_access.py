"""The hub's side of the proxy (docker/nginx, docs/access.md): the access check nginx asks before every request to
/i/<id>/..., the pages it shows instead of an instance (denied, unavailable), and /i/<id>/ itself for when nginx is
not in front. Who may do what is instances/access.py's; these views only ask it."""
from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple
from urllib.parse import unquote, urlencode

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.http import HttpResponse, JsonResponse
from django.shortcuts import redirect, render, resolve_url
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from comfyhub import tokens

from . import access, health, nodes
from .models import Instance, InstanceOpen

# /i/<id>/... as nginx saw it (X-Original-URI: the raw request URI); nginx refuses every other shape before asking.
_HUB_PATH = re.compile(r"/i/(?P<id>[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:[/?]|\Z)")


class Caller(NamedTuple):
    user: object  # None: nobody we know
    token: object  # the AccessToken when one was sent
    problem: str  # why user is None


def caller_of(request) -> Caller:
    """Who asks: a Bearer token when an Authorization header is sent (then only the token counts, even beside a
    session cookie), else the session's user."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, raw = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return Caller(None, None, "Send a personal access token as 'Authorization: Bearer chub_...'.")
        token = tokens.token_authenticate(raw.strip())
        if token is None:
            return Caller(None, None, "This token is unknown, revoked or expired: make a new one on your account "
                                      "page.")
        return Caller(token.user, token, "")
    if request.user.is_authenticated:
        return Caller(request.user, None, "")
    return Caller(None, None, "Log in to ComfyHub, or send a personal access token from your account page as "
                              "'Authorization: Bearer chub_...'.")


def original_uri(request) -> str:
    """The request the check is about: nginx sends X-Original-URI, Caddy's forward_auth and Traefik's ForwardAuth
    X-Forwarded-Uri."""
    return request.headers.get("X-Original-URI") or request.headers.get("X-Forwarded-Uri", "")


def instance_id_in(uri: str) -> str | None:
    match = _HUB_PATH.match(uri)
    return match["id"] if match else None


def original_method(request) -> str:
    return (request.headers.get("X-Original-Method") or request.headers.get("X-Forwarded-Method") or "GET").upper()


# nginx's $comfyhub_per_request (docker/nginx): paths decided per request, whose answers are cached per method and
# raw request line.
_PER_REQUEST = re.compile(
    r"/i/[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?/(?:/|[^/?]*%|(?:api/)?(?:/|[^/?]*%|distributed(?:[/?]|\Z)))")
_REST = re.compile(r"/i/[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?P<rest>/[^?#]*)")
# ComfyUI-Distributed's routes that change whom an instance sends work to, what it launches or publishes (changes), or
# make it fetch from a worker's address (reads): a share to use an instance does not let its holder point it at other
# machines; operating it does (access.can_operate). ComfyHub writes a cluster's workers itself (docs/distribution.md).
_DISTRIBUTED_CHANGES = re.compile(
    r"/distributed/(?:config(?:/.*)?|launch_worker|stop_worker|worker/clear_launching|tunnel/.*|load_image|check_file)"
    r"\Z", re.S)
_DISTRIBUTED_READS = re.compile(r"/distributed/remote_worker_log/.*\Z", re.S)


def per_request_key(request) -> str:
    uri = original_uri(request)
    return f"|{original_method(request)} {uri}" if _PER_REQUEST.match(uri) else ""


def needs_operate(request) -> bool:
    """Whether this request to an instance needs permission to operate it, not only to use it: ComfyUI-Distributed's
    configuration, launch, tunnel and file routes (also under /api/), as the instance's server reads the path
    (percent-decoded), and any path starting with an empty segment (never a frontend's)."""
    match = _REST.match(original_uri(request))
    if match is None:
        return False
    decoded = unquote(match["rest"])
    if decoded.startswith("/api/"):  # ComfyUI serves every route under /api/ too
        decoded = decoded[len("/api"):]
    if decoded.startswith("//"):
        return True
    if _DISTRIBUTED_READS.match(decoded):
        return True
    return original_method(request) not in ("GET", "HEAD") and bool(_DISTRIBUTED_CHANGES.match(decoded))


# The wildcard binds, and the loopback address the hub reaches its own node's instances on for each (as
# comfyui_api.probe_host does).
_WILDCARD_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}
# An instance is proxied to only while ComfyHub wants it running and its container is up (a start sets STARTING once
# the container runs). Otherwise its port is free, and whatever listens there (any local user's program) must not get
# the hub's origin: the user gets the unavailable page instead.
PROXIED_STATUSES = (Instance.Status.STARTING, Instance.Status.HEALTHY, Instance.Status.UNHEALTHY)


def upstream_of(instance: Instance) -> str | None:
    """HOST:PORT nginx proxies to: the node's bind address ([IPv6] bracketed). A wildcard bind means loopback. A
    loopback address is the node's own machine's: the hub uses it only when it shares that loopback (`local`, or an
    agent on the hub's machine), else None (the hub's own loopback would be the wrong machine)."""
    node = instance.node
    address = ipaddress.ip_address(_WILDCARD_LOOPBACK.get(node.bind_address, node.bind_address))
    loopback = address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)
    if loopback and not nodes.shares_hubs_loopback(node):
        return None
    return f"[{address}]:{instance.host_port}" if address.version == 6 else f"{address}:{instance.host_port}"


def proxy_refusal(instance: Instance) -> str | None:
    """Why requests to `instance` are not passed on now, for the unavailable page; None when they are."""
    if instance.desired_state != Instance.DesiredState.RUNNING or instance.status not in PROXIED_STATUSES:
        return "not running"
    node = instance.node
    if node.refusal():  # it takes no jobs: not approved, or no heartbeat lately
        # Its statuses are as old as its last heartbeat: whatever answers at its address now is unknown.
        return (f"Its node '{node.name}' is {node.state().label}, so ComfyHub cannot tell what answers at its address "
                "now: it opens again once the node's agent reports and the node is approved.")
    if upstream_of(instance) is None:
        kind = "the wildcard address" if node.bind_address in _WILDCARD_LOOPBACK else "its loopback address"
        return (f"Its node '{node.name}' publishes ports on {kind} {node.bind_address}, which only that machine "
                "reaches, not the hub: an administrator sets the node's address (NODE_ADDRESS on its agent) to one "
                "the hub reaches it on (docs/nodes.md).")
    return None


def session_cookie_count(request) -> int:
    """How many times the Cookie header names the session cookie, as Django's cookie parser reads names (stripped:
    `sessionid =x` counts). A page on the hub's origin can plant a second one for part of the site (path=/i/<id>/),
    and nginx reads the first where Django reads the last."""
    name = settings.SESSION_COOKIE_NAME
    return sum(1 for chunk in request.META.get("HTTP_COOKIE", "").split(";")
               if "=" in chunk and chunk.split("=", 1)[0].strip() == name)


def cache_key_of(request) -> str | None:
    """The key nginx files this answer under ($comfyhub_session|$http_authorization|$comfyhub_instance), rebuilt
    from what Django judges: the session cookie Django reads, the Authorization header, the instance. None when the
    session cookie is sent more than once, so that no two readings of the header can exist."""
    count = session_cookie_count(request)
    if count > 1:
        return None
    session = request.COOKIES.get(settings.SESSION_COOKIE_NAME, "") if count else ""
    return (f"{session}|{request.headers.get('Authorization', '')}|"
            f"{instance_id_in(original_uri(request)) or ''}{per_request_key(request)}")


def wants_page(request) -> bool:
    """A browser navigating (a page for people), not a script (JSON)."""
    return "Authorization" not in request.headers and "text/html" in request.headers.get("Accept", "")


def _decision(status: int, *, cache: bool = True) -> HttpResponse:
    response = HttpResponse(status=status)
    # nginx caches 200 and 403 this long (per session cookie, token and instance); a 401 never, nor a 403 for an
    # instance that is not running (it should open as soon as it runs).
    response["X-Accel-Expires"] = str(settings.ACCESS_CACHE_SECONDS) if status != 401 and cache else "0"
    response["Cache-Control"] = "private, no-store"
    # Refusals are this endpoint's everyday answers (every asset of a page a logged-out browser loads), not
    # problems: Django's request log would repeat each one as a warning.
    response._has_been_logged = status != 200
    return response


@login_not_required
@require_GET
def hub_auth(request):
    """nginx's auth_request: 200 with X-ComfyHub-Upstream, 401 (nobody, or a bad token) or 403 (no access, or no
    such instance)."""
    # Caddy and Traefik send a refusal back to the client as it is: give them the whole answer (login redirect,
    # JSON, the page) that nginx gets from hub_denied.
    forward_auth = "X-Original-URI" not in request.headers
    # nginx keeps the answer under the cookie and header it read (X-ComfyHub-Cache-Key); an answer about other
    # credentials than those would be handed to whoever sends that key next. Such a request gets an uncached 401.
    if not forward_auth and request.headers.get("X-ComfyHub-Cache-Key") != cache_key_of(request):
        return _decision(401)
    caller = caller_of(request)
    if caller.user is None:
        return _unauthorized(request, caller) if forward_auth else _decision(401)
    instance_id = instance_id_in(original_uri(request))
    instance = (Instance.objects.select_related("node").filter(instance_id=instance_id).first()
                if instance_id else None)
    if instance is None or not access.can_use(caller.user, instance) or \
            (needs_operate(request) and not access.can_operate(caller.user, instance)):
        return _forbidden(request, instance_id, instance, caller.user) if forward_auth else _decision(403)
    upstream = upstream_of(instance)
    if proxy_refusal(instance) is not None or upstream is None:
        # Nothing is proxied; nginx asks /_hub/denied/, which shows the unavailable page.
        return _unavailable(request, instance, caller.user) if forward_auth else _decision(403, cache=False)
    access.note_activity(instance)
    if caller.token is not None:
        tokens.token_touch(caller.token)
        access.record_open(user=caller.user, instance=instance, via=InstanceOpen.Via.TOKEN, token=caller.token)
    else:
        access.record_open(user=caller.user, instance=instance, via=InstanceOpen.Via.BROWSER)
    response = _decision(200)
    response["X-ComfyHub-Upstream"] = upstream
    return response


def _unauthorized(request, caller: Caller):
    if wants_page(request):
        uri = original_uri(request)
        return redirect(f"{resolve_url(settings.LOGIN_URL)}?{urlencode({'next': uri if uri.startswith('/') else '/'})}")
    response = JsonResponse({"error": caller.problem}, status=401)
    response["WWW-Authenticate"] = 'Bearer realm="ComfyHub"'
    return response


def _cross_site(request):
    """nginx refused a request from another site that carried the hub's cookie (docs/access.md)."""
    instance_id = instance_id_in(original_uri(request))
    where = f"/i/{instance_id}/" if instance_id else "the instance"
    message = (f"ComfyHub does not let pages of other sites use an instance with your login. Open {where} from "
               "ComfyHub itself (its dashboard, a bookmark or the address bar), or use a personal access token in a "
               "script.")
    if not wants_page(request):
        return JsonResponse({"error": message}, status=403)
    return render(request, "instances/access_denied.html", {"message": message}, status=403)


def _unreadable_session_cookie(request):
    # Logging in again would not help: a planted cookie stays and is still sent first.
    if session_cookie_count(request) > 1:
        message = ("Your browser sent two ComfyHub session cookies (a page on this site set one of its own), so "
                   "ComfyHub cannot tell who you are.")
    else:
        message = "Your browser sent a ComfyHub session cookie in a form ComfyHub does not read."
    message += " Clear this site's cookies in your browser, then log in again."
    if not wants_page(request):
        return JsonResponse({"error": message}, status=400)
    return render(request, "instances/access_denied.html", {"message": message}, status=400)


def _forbidden(request, instance_id: str | None, instance: Instance | None, user):
    if instance is None:
        message = f"There is no instance '{instance_id}' here." if instance_id else "There is no such instance here."
        grantors = None
    elif access.can_use(user, instance) and needs_operate(request) and not access.can_operate(user, instance):
        message = (f"You may use '{instance.name}', but not change whom it sends work to, what it launches or "
                   "publishes (ComfyUI-Distributed's settings, workers and tunnels): that needs permission to operate "
                   "it. ComfyHub keeps a cluster's workers itself: see its cluster's page.")
        grantors = None
    elif access.can_use(user, instance):
        message = (f"You may use '{instance.name}' now: access was given moments ago. Reload in "
                   f"{settings.ACCESS_CACHE_SECONDS or 1} seconds.")
        grantors = None
    else:
        grantors = access.grantors(instance)
        message = f"You may not use '{instance.name}'."
    if not wants_page(request):
        detail = message
        if grantors:
            names = [person.get_username() for person in ([grantors.owner] if grantors.owner else [])
                     + list(grantors.operators)]
            detail += f" Ask {', '.join(names) or 'an administrator'} to share it with you."
        return JsonResponse({"error": detail}, status=403)
    return render(request, "instances/access_denied.html", {
        "instance": instance, "instance_id": instance_id, "message": message, "grantors": grantors,
    }, status=403)


@login_not_required
@never_cache
@require_GET
def hub_denied(request):
    """What nginx shows for a 401 or 403 from hub_auth (it passes the original request's headers): the login, the
    page naming who may give access, or the unavailable page for an instance that is not proxied now."""
    if request.headers.get("X-ComfyHub-Refusal") == "cross-site":
        return _cross_site(request)
    if "X-ComfyHub-Cache-Key" in request.headers and request.headers["X-ComfyHub-Cache-Key"] != cache_key_of(request):
        return _unreadable_session_cookie(request)
    caller = caller_of(request)
    if caller.user is None:
        return _unauthorized(request, caller)
    instance_id = instance_id_in(original_uri(request))
    instance = (Instance.objects.select_related("node", "owner").filter(instance_id=instance_id).first()
                if instance_id else None)
    if instance is not None and access.can_use(caller.user, instance) and proxy_refusal(instance) is not None:
        return _unavailable(request, instance, caller.user)
    return _forbidden(request, instance_id, instance, caller.user)


@login_not_required
@never_cache
@require_GET
def hub_unavailable(request):
    """What nginx shows when the instance does not answer (502/504): its state, a Start button for those who may
    start it. The page polls this with htmx (?instance=<id>&was=<status it was drawn with>) and reloads the
    instance once it answers. A token gets only the JSON answer about the instance it asked for through /i/: the
    page and its poll are the browser's (docs/access.md)."""
    caller = caller_of(request)
    if caller.user is None:
        return _unauthorized(request, caller)
    by_browser = caller.token is None
    instance_id = (request.GET.get("instance") if by_browser else None) or instance_id_in(original_uri(request))
    instance = (Instance.objects.select_related("node", "owner").filter(instance_id=instance_id).first()
                if instance_id else None)
    if instance is None or not access.can_use(caller.user, instance):
        return _forbidden(request, instance_id, None if instance is None else instance, caller.user)
    if request.htmx and by_browser:
        if _opens_now(instance, was=request.GET.get("was", "")):
            response = HttpResponse(status=200)
            response["HX-Refresh"] = "true"
            return response
        # The whole page, 200 for htmx to swap; it selects the state card (hx-select).
        return render(request, "instances/instance_unavailable.html",
                      _unavailable_context(request, instance, caller.user))
    return _unavailable(request, instance, caller.user)


def _opens_now(instance: Instance, *, was: str) -> bool:
    """Whether reloading /i/<id>/ would open ComfyUI now: it is proxied to, and it became healthy since the page was
    drawn, or it answers (a page drawn while it was healthy, because nginx got no answer, waits for one)."""
    if proxy_refusal(instance) is not None:
        return False
    if instance.status == Instance.Status.HEALTHY and was != Instance.Status.HEALTHY:
        return True
    return health.system_stats(instance, timeout=1) is not None


def _unavailable(request, instance: Instance, user):
    """The instance is not proxied (not running, or no address to reach it on) or did not answer: 503, its state
    and who can start it; JSON for scripts."""
    context = _unavailable_context(request, instance, user)
    if not wants_page(request):
        detail = context["refusal"] or f"it is {instance.get_status_display().lower()}."
        return JsonResponse({"error": f"Instance '{instance.instance_id}' does not answer: {detail}",
                             "status": instance.status}, status=503)
    return render(request, "instances/instance_unavailable.html", context, status=503)


def _unavailable_context(request, instance, user):
    uri = original_uri(request)
    refusal = proxy_refusal(instance)
    running = instance.desired_state == Instance.DesiredState.RUNNING
    grantors = access.grantors(instance)
    return {
        "instance": instance,
        "can_operate": access.can_operate(user, instance),
        "grantors": grantors,
        # An owner without "create own instances" may use it but not start it.
        "owner_can_start": bool(grantors.owner) and access.can_operate(grantors.owner, instance),
        "back": uri if instance_id_in(uri) == instance.instance_id else instance.hub_path,
        "healthy": instance.status == Instance.Status.HEALTHY,
        # Wanted running, its container not up yet (a start queued or under way).
        "starting": running and instance.status in (Instance.Status.NEW, Instance.Status.STOPPED,
                                                    Instance.Status.STARTING),
        # Why it is not proxied when it is not a matter of starting it.
        "refusal": refusal if refusal and refusal != "not running" else "",
    }


def instance_open(request, instance_id, rest=""):
    """/i/<id>/ reached Django: nginx is not in front (COMFYHUB_NGINX=false, runserver), so nothing proxies it."""
    instance = Instance.objects.filter(instance_id=instance_id).first()
    return render(request, "instances/instance_open.html", {"instance": instance, "instance_id": instance_id,
                                                            "path": request.path}, status=503)
