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
