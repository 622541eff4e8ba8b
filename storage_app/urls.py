from django.urls import path

from . import views

urlpatterns = [
    path("models/", views.model_list, name="model-list"),
    path("models/scan/", views.models_scan, name="models-scan"),
    path("models/verify/", views.models_verify, name="models-verify"),
    path("models/verify-node/", views.models_verify_node, name="models-verify-node"),
    path("models/import/", views.models_import, name="models-import"),
    path("models/export/", views.models_export, name="models-export"),
    path("models/promote/<slug:instance_id>/", views.models_promote, name="models-promote"),
    path("models/cache/warm/", views.models_cache_warm, name="models-cache-warm"),
    path("models/cache/check/", views.models_cache_check, name="models-cache-check"),
]

# Snapshots, the legacy migration and the storage check (views_snapshots.py).
from . import views_snapshots  # noqa: E402

urlpatterns += [
    path("snapshots/", views_snapshots.snapshot_list, name="snapshot-list"),
    path("snapshots/instance/<slug:instance_id>/", views_snapshots.snapshot_instance, name="snapshot-instance"),
    path("snapshots/instance/<slug:instance_id>/create/", views_snapshots.snapshot_create, name="snapshot-create"),
    path("snapshots/instance/<slug:instance_id>/import/", views_snapshots.snapshot_import, name="snapshot-import"),
    path("snapshots/instance/<slug:instance_id>/schedule/", views_snapshots.snapshot_schedule,
         name="snapshot-schedule"),
    path("snapshots/<int:pk>/download/", views_snapshots.snapshot_download, name="snapshot-download"),
    path("snapshots/<int:pk>/manager.json", views_snapshots.snapshot_export, name="snapshot-export"),
    path("snapshots/<int:pk>/restore/", views_snapshots.snapshot_restore, name="snapshot-restore"),
    path("snapshots/<int:pk>/clone/", views_snapshots.snapshot_clone, name="snapshot-clone"),
    path("snapshots/<int:pk>/delete/", views_snapshots.snapshot_delete, name="snapshot-delete"),
    path("legacy/", views_snapshots.legacy, name="legacy"),
    path("legacy/plan/", views_snapshots.legacy_plan, name="legacy-plan"),
    path("legacy/plan/<uuid:pk>/", views_snapshots.legacy_plan_result, name="legacy-plan-result"),
    path("legacy/plan/<uuid:pk>/live/", views_snapshots.legacy_plan_live, name="legacy-plan-live"),
    path("legacy/migrate/", views_snapshots.legacy_migrate, name="legacy-migrate"),
    path("storage/", views_snapshots.storage_check, name="storage-check"),
    path("storage/fix/", views_snapshots.storage_fix, name="storage-fix"),
]
