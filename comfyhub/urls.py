from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from comfyhub import views as core_views
from instances import views as instance_views

urlpatterns = [
    path("", instance_views.dashboard, name="dashboard"),
    path("operations/", core_views.operation_list, name="operation-list"),
    path("operations/<uuid:pk>/", core_views.operation_detail, name="operation-detail"),
    path("operations/<uuid:pk>/live/", core_views.operation_progress, name="operation-live"),
    path("operations/<uuid:pk>/cancel/", core_views.operation_cancel, name="operation-cancel"),
    path("diagnostics/", core_views.diagnostics_run, name="diagnostics-run"),
    path("", include("instances.urls")),
    path("", include("instances.access_urls")),
    path("", include("instances.distribution_urls")),
    path("", include("comfyhub.account_urls")),
    path("", include("storage_app.urls")),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
]
