from django.urls import path

from . import views

urlpatterns = [
    path("models/", views.model_list, name="model-list"),
    path("models/scan/", views.models_scan, name="models-scan"),
    path("models/verify/", views.models_verify, name="models-verify"),
    path("models/import/", views.models_import, name="models-import"),
    path("models/export/", views.models_export, name="models-export"),
    path("models/promote/<slug:instance_id>/", views.models_promote, name="models-promote"),
]
