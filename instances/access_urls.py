"""The proxy's side of the hub (docker/nginx): the access check nginx asks on every /i/<id>/ request, the pages it
shows instead of an instance, and /i/<id>/ itself for when nginx is not in front."""

urlpatterns = []
