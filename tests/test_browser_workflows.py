"""In real Chromium, with a real worker: select a workflow, check it against another instance and see what that
instance lacks without a reload, copy it, watch the copy succeed live, and find it in the other instance's list."""
import json
import re

import pytest
from playwright.sync_api import expect

from instances import services, workflows
from instances.models import Instance
from storage_app import layout, library

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PORTRAIT = {
    "last_node_id": 2, "links": [],
    "nodes": [
        {"id": 1, "type": "CheckpointLoaderSimple", "widgets_values": ["dreamy_v2.safetensors"]},
        {"id": 2, "type": "FancyCustomNode", "widgets_values": [42]},
    ],
}


def mark_page(page):
    """Leave a mark in the page's JavaScript state: it survives htmx swaps, not a reload."""
    page.evaluate("window.__notReloaded = true")


def still_marked(page):
    return page.evaluate("window.__notReloaded === true")


def test_an_admin_checks_a_workflow_against_another_instance_and_copies_it(
    logged_in_page, admin_user, worker_process, live_server, storage, tmp_path
):
    for instance_id in ("studio-a", "studio-b"):
        services.instance_create(instance_id=instance_id)
        layout.build_instance_tree(instance_id)
    source = Instance.objects.get(instance_id="studio-a")
    for relpath, data in (("portrait.json", PORTRAIT), ("sketches/quick.json", {"nodes": []})):
        path = workflows.workflows_dir(source) / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    model = storage["shared"] / "models" / "checkpoints" / "dreamy_v1.safetensors"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"x")
    library.scan()
    # studio-b ran once (it is stopped now): ComfyHub remembers the node types it offered.
    Instance.objects.filter(instance_id="studio-b").update(node_types=["CheckpointLoaderSimple", "KSampler"])
    worker_process()
    page = logged_in_page()

    page.goto(f"{live_server.url}/instances/studio-a/")
    page.click("[data-testid=instance-subnav] >> text=Workflows")
    page.wait_for_url(f"{live_server.url}/instances/studio-a/workflows/")
    expect(page.locator("tr[data-workflow]")).to_have_count(2)
    page.check("input[name=paths][value='portrait.json']")
    page.check("#copy-form input[name=targets][value='studio-b']")
    mark_page(page)
    page.get_by_role("button", name="Check", exact=True).click()

    result = page.locator("#preflight [data-target='studio-b']")
    missing = result.locator(".missing-models")
    expect(missing).to_contain_text("dreamy_v2.safetensors")
    expect(missing).to_contain_text("dreamy_v1.safetensors")  # the near match it has
    expect(result.locator("code.missing")).to_have_text("FancyCustomNode")
    expect(page.locator("#copy-submit")).to_have_text("Copy anyway")
    assert still_marked(page), "the pre-flight should arrive through htmx, not a reload"
    page.screenshot(path=str(tmp_path / "workflows-preflight.png"), full_page=True)

    page.click("#copy-submit")
    page.wait_for_url(re.compile(r"/operations/[0-9a-f-]+/$"))
    expect(page.locator(".messages")).to_contain_text("Copying 1 workflow(s) from 'studio-a' to studio-b.")
    mark_page(page)
    expect(page.get_by_test_id("operation-status")).to_have_text("Succeeded", timeout=30_000)
    expect(page.get_by_test_id("operation-log")).to_contain_text("portrait.json -> studio-b: written")
    assert still_marked(page), "the operation's progress should arrive through htmx, not a reload"
    page.screenshot(path=str(tmp_path / "copy-operation.png"), full_page=True)

    page.goto(f"{live_server.url}/instances/studio-b/workflows/")
    expect(page.locator("tr[data-workflow='portrait.json']")).to_contain_text("portrait.json")
    expect(page.locator("tr[data-workflow]")).to_have_count(1)
