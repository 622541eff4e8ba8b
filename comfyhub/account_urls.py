"""The signed-in user's own page: personal access tokens."""

urlpatterns = []
