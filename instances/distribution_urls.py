"""URLs of the instance page's distribution panel (views_distribution.py), included at the site root."""
from django.urls import path

from . import views_distribution

urlpatterns = [
    path("instances/<slug:instance_id>/distribution/", views_distribution.instance_distribution,
         name="instance-distribution"),
    path("instances/<slug:instance_id>/distribution/check/", views_distribution.netdist_check,
         name="instance-netdist-check"),
]
