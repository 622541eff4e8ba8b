"""The proxy's side of the hub (docker/nginx): the access check nginx asks on every /i/<id>/ request, the pages it
shows instead of an instance, and /i/<id>/ itself for when nginx is not in front."""
from django.urls import path

from . import views_access

urlpatterns = [
    path("_hub/auth", views_access.hub_auth, name="hub-auth"),
    path("_hub/denied/", views_access.hub_denied, name="hub-denied"),
    path("_hub/unavailable/", views_access.hub_unavailable, name="hub-unavailable"),
    # Only reached when nginx is not in front: with it, nginx proxies every /i/<id>/... to the instance.
    path("i/<slug:instance_id>/", views_access.instance_open, name="instance-open"),
    path("i/<slug:instance_id>/<path:rest>", views_access.instance_open, name="instance-open-path"),
]
