"""In real Chromium, with a real worker and a real container: create an instance on GPU 1, start it and watch it
become healthy without reloading, read its logs, stop it."""
import re

import pytest
from playwright.sync_api import expect

from instances import health
from instances.models import Instance

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.django_db(transaction=True)]


def mark_page(page):
    """Leave a mark in the page's JavaScript state: it survives htmx swaps, not a reload."""
    page.evaluate("window.__notReloaded = true")


def still_marked(page):
    return page.evaluate("window.__notReloaded === true")


def test_an_admin_creates_starts_watches_and_stops_an_instance(
    logged_in_page, admin_user, worker_process, comfyui_double_image, docker_cleanup, live_server, tmp_path
):
    worker_process()
    page = logged_in_page()
    instance_url = f"{live_server.url}/instances/browser-gpu1/"

    page.click("text=New instance")
    expect(page.locator("h1")).to_have_text("New instance")
    page.fill("#id_instance_id", "Browser/GPU1")
    page.fill("#id_display_name", "Browser on GPU 1")
    page.fill("#id_image", comfyui_double_image)
    page.check("input[name=gpus][value='1']")
    page.fill("#id_extra_env", "CUDA_VISIBLE_DEVICES=0")
    page.click("button:has-text('Create instance')")
    # The service's refusals come back next to their fields, and what was typed is kept.
    expect(page.locator("#field-instance_id .errorlist")).to_contain_text("e.g. 'browser-gpu1'")
    expect(page.locator("#field-extra_env .errorlist")).to_contain_text("'CUDA_VISIBLE_DEVICES' is set by ComfyHub")
    expect(page.locator("input[name=gpus][value='1']")).to_be_checked()
    expect(page.locator("#id_image")).to_have_value(comfyui_double_image)
    page.screenshot(path=str(tmp_path / "form-errors.png"), full_page=True)
    assert not Instance.objects.exists()
    page.fill("#id_instance_id", "browser-gpu1")
    page.fill("#id_extra_env", "")
    page.click("button:has-text('Create instance')")
    page.wait_for_url(instance_url)
    expect(page.locator(".messages")).to_contain_text("Instance 'browser-gpu1' created")
    expect(page.get_by_test_id("instance-gpus")).to_contain_text("GPU 1")
    # The directory build was queued with it; the worker runs it while the page watches.
    expect(page.get_by_test_id("operation-status")).to_have_text("Succeeded", timeout=30_000)

    with page.expect_navigation():
        page.click("#instance-actions button:has-text('Start')")
    expect(page.locator(".messages")).to_contain_text("Starting 'browser-gpu1'.")
    mark_page(page)
    status = page.locator("#instance-live").get_by_test_id("instance-status")
    expect(status).to_have_text("Healthy", timeout=120_000)
    expect(page.get_by_test_id("operation-status")).to_have_text("Succeeded", timeout=30_000)
    expect(page.get_by_test_id("operation-log")).to_contain_text("ComfyUI answers on")
    assert still_marked(page), "the page was reloaded; the status should have arrived through htmx"

    # The health pass (run here rather than waiting for the periodic one) records checks and the GPUs ComfyUI sees.
    health.reconcile_all()
    page.reload()
    expect(page.get_by_test_id("instance-devices")).to_contain_text("host GPU")
    expect(page.locator("#instance-live .check-ok")).to_have_count(5)
    expect(page.locator("#instance-live .check-failed")).to_have_count(0)
    page.screenshot(path=str(tmp_path / "instance.png"), full_page=True)

    page.click("#instance-actions a:has-text('Logs')")
    page.wait_for_url(instance_url + "logs/")
    logs = page.get_by_test_id("instance-logs")
    expect(logs).to_contain_text("To see the GUI go to")
    page.screenshot(path=str(tmp_path / "logs.png"))
    mark_page(page)
    page.click("button:has-text('Refresh')")
    expect(page.locator("#instance-logs .muted")).to_contain_text("Fetched")
    expect(logs).to_contain_text("To see the GUI go to")
    assert still_marked(page)
    with page.expect_download() as download:
        page.click("a:has-text('Download')")
    assert download.value.suggested_filename == "browser-gpu1-logs.txt"
    assert "To see the GUI go to" in open(download.value.path()).read()

    page.goto(instance_url)
    with page.expect_navigation():
        page.click("#instance-actions button:has-text('Stop')")
    mark_page(page)
    expect(page.locator("#instance-live").get_by_test_id("instance-status")).to_have_text("Stopped", timeout=60_000)
    expect(page.get_by_test_id("operation-status")).to_have_text("Succeeded", timeout=30_000)
    assert still_marked(page)
    assert Instance.objects.get(instance_id="browser-gpu1").desired_state == Instance.DesiredState.STOPPED

    page.click("text=Dashboard")
    row = page.locator("tr[data-instance='browser-gpu1']")
    expect(row.get_by_test_id("instance-status")).to_have_text("Stopped")
    expect(row.locator("a:has-text('Open ComfyUI')")).to_have_attribute("target", "_blank")
    expect(row).to_contain_text(re.compile(r"\b1\b"))
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
    page.click("nav >> text=GPUs")
    expect(page.locator("tr[data-gpu='1']")).to_contain_text("browser-gpu1")
    page.screenshot(path=str(tmp_path / "gpus.png"), full_page=True)
