"""URLs of the instance and GPU pages (included at the site root, so names are global: `instance-detail`)."""
from django.urls import path

from . import views

urlpatterns = [
    path("dashboard/instances/", views.instance_rows, name="instance-rows"),
    # "new" is a reserved instance id, so this never hides an instance's page.
    path("instances/new/", views.instance_create, name="instance-create"),
    path("instances/<slug:instance_id>/", views.instance_detail, name="instance-detail"),
    path("instances/<slug:instance_id>/live/", views.instance_live, name="instance-live"),
    path("instances/<slug:instance_id>/edit/", views.instance_edit, name="instance-edit"),
    path("instances/<slug:instance_id>/delete/", views.instance_delete, name="instance-delete"),
    path("instances/<slug:instance_id>/build/", views.instance_build, name="instance-build"),
    path("instances/<slug:instance_id>/start/", views.instance_start, name="instance-start"),
    path("instances/<slug:instance_id>/stop/", views.instance_stop, name="instance-stop"),
    path("instances/<slug:instance_id>/restart/", views.instance_restart, name="instance-restart"),
    path("instances/<slug:instance_id>/logs/", views.instance_logs, name="instance-logs"),
    path("instances/<slug:instance_id>/logs/download/", views.instance_logs_download, name="instance-logs-download"),
    path("gpus/", views.gpu_list, name="gpu-list"),
    path("gpus/discover/", views.gpu_discover, name="gpu-discover"),
]
