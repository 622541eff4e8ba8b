"""In real Chromium, with a real worker: snapshot an instance, change a workflow, restore the snapshot from the
browser and watch the operation succeed without reloading; the workflow is back."""
import json
import re

import pytest
from playwright.sync_api import expect

from instances import services as instance_services
from storage_app import layout
from storage_app.models import Snapshot

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_an_admin_snapshots_changes_and_restores_a_workflow(logged_in_page, admin_user, worker_process, live_server,
                                                            storage, tmp_path):
    instance_services.instance_create(instance_id="browsed")
    layout.build_instance_tree("browsed")
    workflow = storage["instances"] / "browsed" / "user" / "default" / "workflows" / "portrait.json"
    workflow.write_text(json.dumps({"nodes": [{"id": 1, "type": "KSampler"}]}))
    worker_process()
    page = logged_in_page()

    page.click("nav >> text=Snapshots")
    expect(page.locator("h1")).to_have_text("Snapshots")
    page.click("main >> a:text-is('browsed')")
    expect(page.locator("h1")).to_have_text("Snapshots of browsed")
    page.fill("#id_note", "before trying a new sampler")
    page.click("button:has-text('Create snapshot')")
    page.wait_for_url(re.compile(r"/operations/[0-9a-f-]+/$"))
    expect(page.locator(".messages")).to_contain_text("Taking a config snapshot of 'browsed'.")
    expect(page.get_by_test_id("operation-status")).to_have_text("Succeeded", timeout=30_000)
    snapshot = Snapshot.objects.get()

    workflow.write_text(json.dumps({"nodes": [{"id": 1, "type": "SamplerCustom"}]}))

    page.goto(f"{live_server.url}/snapshots/instance/browsed/")
    row = page.locator(f"tr[data-snapshot='{snapshot.pk}']")
    expect(row).to_contain_text("before trying a new sampler")
    expect(row).to_contain_text("alice")
    page.screenshot(path=str(tmp_path / "snapshots.png"), full_page=True)
    row.locator("a:has-text('Restore')").click()
    expect(page.locator("main")).to_contain_text("An undo snapshot is taken first")
    with page.expect_navigation():
        page.click("button:has-text('Restore snapshot')")
    expect(page.locator(".messages")).to_contain_text(f"Restoring snapshot {snapshot.pk} into 'browsed'")
    page.evaluate("window.__notReloaded = true")
    expect(page.get_by_test_id("operation-status")).to_have_text("Succeeded", timeout=30_000)
    expect(page.get_by_test_id("operation-log")).to_contain_text("swapping the restored folders in")
    assert page.evaluate("window.__notReloaded === true"), "the status should have arrived through htmx"
    assert json.loads(workflow.read_text()) == {"nodes": [{"id": 1, "type": "KSampler"}]}

    page.goto(f"{live_server.url}/snapshots/")
    expect(page.locator("#snapshot-table tbody tr")).to_have_count(2)
    expect(page.locator("#snapshot-table")).to_contain_text("before-restore")
    page.screenshot(path=str(tmp_path / "snapshots-all.png"), full_page=True)
