"""The signed-in user's own page: personal access tokens."""
from django.urls import path

from . import views_account

urlpatterns = [
    path("account/", views_account.account, name="account"),
    path("account/tokens/", views_account.token_create, name="account-token-create"),
    path("account/tokens/<int:pk>/revoke/", views_account.token_revoke, name="account-token-revoke"),
]
