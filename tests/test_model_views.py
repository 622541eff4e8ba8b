"""The models page and its actions."""
import hashlib
import re

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from playwright.sync_api import expect

from comfyhub.models import Operation
from instances import services as instance_services
from storage_app import layout, library
from storage_app.models import ModelAsset

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def library_files(storage):
    models = storage["shared"] / "models"
    for relpath, content in (("checkpoints/a.safetensors", b"a"), ("loras/b.pt", b"b"), ("loras/c.pt", b"b")):
        (models / relpath).parent.mkdir(parents=True, exist_ok=True)
        (models / relpath).write_bytes(content)
    library.scan()
    library.verify()
    return models


def test_the_page_lists_files_with_hashes_totals_and_duplicates(client, stranger, library_files):
    client.force_login(stranger)
    content = client.get("/models/").content.decode()
    assert "checkpoints/a.safetensors" in content
    assert hashlib.sha256(b"a").hexdigest() in content  # full hash behind the copy button
    assert hashlib.sha256(b"a").hexdigest()[:10].upper() in content
    assert 'id="duplicates"' in content and "loras/b.pt, loras/c.pt" in content


def test_the_page_filters_by_folder_status_and_search(client, stranger, library_files):
    client.force_login(stranger)
    assert [a.path for a in client.get("/models/?folder=loras").context["assets"]] == ["loras/b.pt", "loras/c.pt"]
    assert [a.path for a in client.get("/models/?q=a.safe").context["assets"]] == ["checkpoints/a.safetensors"]
    prefix = hashlib.sha256(b"b").hexdigest()[:12]
    assert len(client.get(f"/models/?q={prefix}").context["assets"]) == 2
    assert list(client.get("/models/?status=mismatch").context["assets"]) == []


def test_problem_files_are_red_on_the_page(client, stranger, library_files):
    ModelAsset.objects.filter(path="loras/b.pt").update(status=ModelAsset.Status.MISMATCH,
                                                        status_reason="differs from the expected hash")
    client.force_login(stranger)
    content = client.get("/models/").content.decode()
    assert 'id="model-problems"' in content and "1 file needs attention" in content
    assert 'class="row-problem"' in content


def test_a_stranger_cannot_scan_verify_import_or_promote(client, stranger):
    client.force_login(stranger)
    for name in ("models-scan", "models-verify", "models-import"):
        assert client.post(reverse(name)).status_code == 403
    instance_services.instance_create(instance_id="someone")
    assert client.post(reverse("models-promote", args=["someone"]), {"path": "loras/x.pt"}).status_code == 403
    assert not Operation.objects.exists()


def test_an_operator_starts_a_verify_and_lands_on_its_operation(client, operator):
    client.force_login(operator)
    response = client.post(reverse("models-verify"), {"full": "1"})
    operation = Operation.objects.get()
    assert response["Location"] == operation.get_absolute_url()
    assert operation.kind == "models_verify"


def test_hashes_import_from_an_upload_and_export_as_a_download(client, operator, library_files):
    client.force_login(operator)
    manifest = f"{hashlib.sha256(b'a').hexdigest()}  checkpoints/a.safetensors\n{'1' * 64}  nowhere.pt\n"
    response = client.post(reverse("models-import"),
                           {"file": SimpleUploadedFile("m.sha256", manifest.encode())}, follow=True)
    text = response.content.decode()
    assert "Imported 1 expected hash(es)." in text and "nowhere.pt" in text
    assert ModelAsset.objects.get(path="checkpoints/a.safetensors").expected_source == "manifest"
    response = client.post(reverse("models-import"), {"file": SimpleUploadedFile("bad", b"garbage\n")}, follow=True)
    assert "sha256sum format" in response.content.decode()
    export = client.get(reverse("models-export"))
    assert export["Content-Disposition"] == 'attachment; filename="models.sha256"'
    assert f"{hashlib.sha256(b'a').hexdigest()}  checkpoints/a.safetensors" in export.content.decode()


def test_the_inbox_shows_with_a_promote_button(client, operator, storage, run_worker):
    instance = instance_services.instance_create(instance_id="downloader")
    layout.build_instance_tree("downloader")
    inbox = storage["instances"] / "downloader" / "models" / "loras"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "fetched.safetensors").write_bytes(b"fetched")
    client.force_login(operator)
    assert "loras/fetched.safetensors" in client.get("/models/").content.decode()
    client.post(reverse("models-promote", args=[instance.instance_id]), {"path": "loras/fetched.safetensors"})
    run_worker()
    assert (storage["shared"] / "models" / "loras" / "fetched.safetensors").read_bytes() == b"fetched"


@pytest.mark.browser
def test_a_verify_started_in_the_browser_reaches_succeeded_live(logged_in_page, admin_user, worker_process,
                                                                library_files, live_server):
    worker_process()
    page = logged_in_page()
    page.click("text=Models")
    expect(page.locator("#model-table")).to_contain_text("checkpoints/a.safetensors")
    page.click("button:text-is('Verify')")
    page.wait_for_url(re.compile(r"/operations/[0-9a-f-]+/$"))
    expect(page.get_by_test_id("operation-status")).to_have_text("Succeeded", timeout=30_000)


def test_problem_files_are_red_on_the_dashboard_too(client, stranger, library_files):
    client.force_login(stranger)
    assert "need attention" not in client.get("/").content.decode()
    ModelAsset.objects.filter(path="loras/b.pt").update(status=ModelAsset.Status.MISMATCH)
    content = client.get("/").content.decode()
    assert 'card-problem' in content and "1 mismatch" in content and "?status=mismatch" in content
