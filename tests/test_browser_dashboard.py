"""In real Chromium: log in, open the dashboard, run an operation and watch it finish live."""
import re

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_an_admin_runs_diagnostics_and_watches_it_succeed_live(
    logged_in_page, admin_user, worker_process, docker_engine, live_server, tmp_path
):
    worker_process()
    page = logged_in_page()
    expect(page.locator("h1")).to_have_text("Dashboard")
    expect(page.locator("#engine-status")).to_contain_text("Reachable")
    expect(page.locator("#queue-status")).to_contain_text("default")

    page.click("text=Run diagnostics")
    page.wait_for_url(re.compile(r"/operations/[0-9a-f-]+/$"))
    status = page.get_by_test_id("operation-status")
    # The page is not reloaded: htmx polling brings each state in.
    expect(status).to_have_text(re.compile("Queued|Running"))
    expect(status).to_have_text("Succeeded", timeout=30_000)
    expect(page.locator(".progress-bar")).to_have_text("100%")
    expect(page.get_by_test_id("operation-log")).to_contain_text("ok  docker engine")
    page.screenshot(path=str(tmp_path / "operation.png"), full_page=True)

    page.click("text=Dashboard")
    expect(page.locator("table").last).to_contain_text("Diagnostics")


def test_the_login_page_turns_away_a_wrong_password(page, live_server, admin_user):
    page.goto(f"{live_server.url}/operations/")
    expect(page).to_have_url(re.compile(r"/login/\?next=/operations/"))
    page.fill("#id_username", "alice")
    page.fill("#id_password", "not-her-password")
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_contain_text("didn't match")


def test_an_operator_sees_an_image_missing_from_the_host_and_pulls_it_from_the_dashboard(
    logged_in_page, admin_user, worker_process, docker_engine, live_server
):
    from instances import docker_engine as engine_adapter
    from instances import services

    engine_adapter.forget_cached_status()
    services.instance_create(instance_id="needs-pull", image="example/comfyui:never-pulled")
    worker_process("long")
    page = logged_in_page()

    notice = page.locator("section.image-missing")
    expect(notice).to_contain_text("The image example/comfyui:never-pulled is not on this host")
    expect(notice).to_contain_text("needs-pull")
    notice.get_by_role("button", name="Pull it").click()
    page.wait_for_url(re.compile(r"/operations/[0-9a-f-]+/$"))
    # This machine reaches no registry: the pull fails, and the page says so in words.
    expect(page.get_by_test_id("operation-status")).to_have_text("Failed", timeout=60_000)
    expect(page.locator("body")).to_contain_text("Could not pull image example/comfyui:never-pulled")
    expect(page.locator("body")).to_contain_text("load the image another way (docker load, or build it here)")
