"""The admin for model assets: expected hashes typed in are checked by the same rule as everywhere."""
import hashlib

import pytest
from django.urls import reverse

from comfyhub.models import Operation
from storage_app.models import ModelAsset

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def hashed_asset():
    return ModelAsset.objects.create(path="loras/a.pt", folder="loras", size=1, sha256=hashlib.sha256(b"a").hexdigest(),
                                     status=ModelAsset.Status.UNVERIFIED)


def test_a_typed_expected_hash_that_matches_verifies_the_asset(client, admin_user, hashed_asset):
    client.force_login(admin_user)
    url = reverse("admin:storage_app_modelasset_change", args=[hashed_asset.pk])
    client.post(url, {"expected_sha256": hashlib.sha256(b"a").hexdigest().upper()})
    hashed_asset.refresh_from_db()
    assert hashed_asset.status == ModelAsset.Status.VERIFIED
    assert hashed_asset.expected_source == "typed"


def test_a_typed_expected_hash_that_differs_marks_a_mismatch(client, admin_user, hashed_asset):
    client.force_login(admin_user)
    client.post(reverse("admin:storage_app_modelasset_change", args=[hashed_asset.pk]), {"expected_sha256": "b" * 64})
    hashed_asset.refresh_from_db()
    assert hashed_asset.status == ModelAsset.Status.MISMATCH


def test_a_malformed_expected_hash_is_refused_on_the_field(client, admin_user, hashed_asset):
    client.force_login(admin_user)
    response = client.post(reverse("admin:storage_app_modelasset_change", args=[hashed_asset.pk]),
                           {"expected_sha256": "xyz"})
    assert "64 hexadecimal digits" in response.content.decode()
    hashed_asset.refresh_from_db()
    assert hashed_asset.expected_sha256 == ""


def test_the_verify_action_enqueues_an_operation(client, admin_user, hashed_asset):
    client.force_login(admin_user)
    client.post(reverse("admin:storage_app_modelasset_changelist"),
                {"action": "verify_library", "_selected_action": [hashed_asset.pk]})
    assert Operation.objects.filter(kind="models_verify", requested_by=admin_user).exists()
