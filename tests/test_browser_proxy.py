"""In real Chromium, through the hub's real nginx (tests/support/hubproxy.py) in front of the live server, with the
ComfyUI test double in a real container: the double's page at /i/<id>/ builds its URLs from its path as ComfyUI's
frontend does, so its assets, its WebSocket and its prompt POST all go through the hub."""
import re
import time

import pytest
from django.contrib.auth.models import Permission, User
from playwright.sync_api import expect

from comfyhub.models import Operation
from instances import access, services
from instances.models import Instance

pytestmark = [pytest.mark.browser, pytest.mark.docker, pytest.mark.django_db(transaction=True)]

ASSETS = 5


@pytest.fixture
def owner(transactional_db):
    user = User.objects.create_user("olga", password="olga-password-1")
    user.user_permissions.add(Permission.objects.get(codename="create_own_instance"))
    return user


@pytest.fixture
def stranger(transactional_db):
    return User.objects.create_user("sam", password="sam-password-1")


@pytest.fixture
def running_double(comfyui_double_image, docker_cleanup, run_worker, owner):
    """Olga's instance 'studio' on the test double, started (its page loads ASSETS assets)."""
    instance = services.instance_create(instance_id="studio", image=comfyui_double_image, owner=owner,
                                        extra_env={"COMFYUI_DOUBLE_ASSETS": str(ASSETS)})
    operation = services.instance_start(instance=instance, user=owner)
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error + operation.log
    return instance


def log_in(page, username, password):
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")


def expect_comfyui(page, hub_proxy):
    """The double's page, served through the hub, shows the status its WebSocket (through the hub) sent."""
    expect(page).to_have_url(f"{hub_proxy.url}/i/studio/")
    expect(page.get_by_test_id("ws-state")).to_have_text("open")
    expect(page.get_by_test_id("status")).to_have_text(re.compile(r"^queue_remaining 0, sid [0-9a-f]{32}$"))


def test_an_anonymous_visitor_logs_in_comes_back_and_uses_the_instance(page, hub_proxy, running_double, run_worker):
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("websocket", lambda socket: requested.append(socket.url))

    page.goto(f"{hub_proxy.url}/i/studio/")
    expect(page).to_have_url(f"{hub_proxy.url}/login/?next=%2Fi%2Fstudio%2F")
    log_in(page, "olga", "olga-password-1")

    expect_comfyui(page, hub_proxy)
    expect(page.get_by_test_id("assets")).to_have_text(str(ASSETS))
    sid = page.get_by_test_id("sid").inner_text()
    page.get_by_test_id("queue-prompt").click()
    expect(page.get_by_test_id("prompt-result")).to_have_text(re.compile(r"^queued [0-9a-f-]{36}$"))
    prompt_id = page.get_by_test_id("prompt-result").get_attribute("data-prompt-id")
    expect(page.get_by_test_id("messages")).to_contain_text(f"execution_success {prompt_id}")

    # Everything the page asked for went through /i/studio/ on the hub's origin, the WebSocket included.
    hub = f"127.0.0.1:{hub_proxy.port}"
    assert f"ws://{hub}/i/studio/ws?clientId={sid}" in requested or f"ws://{hub}/i/studio/ws" in requested
    assert f"{hub_proxy.url}/i/studio/api/prompt" in requested
    assert {f"{hub_proxy.url}/i/studio/assets/a{n:04d}.js" for n in range(1, ASSETS + 1)} <= set(requested)
    assert not [url for url in requested if f"127.0.0.1:{running_double.host_port}" in url]
    # The prompt reached the instance from the page's client: its history names the page's client id.
    history = page.request.get(f"{hub_proxy.url}/i/studio/history/{prompt_id}").json()
    assert history[prompt_id]["prompt"][3]["client_id"] == sid


def test_a_user_without_access_gets_the_403_page_and_a_share_opens_it_until_it_is_removed(
        page, hub_proxy, running_double, owner, stranger, settings):
    settings.ACCESS_CACHE_SECONDS = 1
    page.goto(f"{hub_proxy.url}/login/")
    log_in(page, "sam", "sam-password-1")
    page.wait_for_url(f"{hub_proxy.url}/")

    refused = page.goto(f"{hub_proxy.url}/i/studio/")
    assert refused.status == 403
    expect(page.get_by_test_id("access-denied-grantors")).to_contain_text("Ask its owner olga")

    share = access.share_add(instance=running_double, username="sam", user=owner)
    # The refusal was cached for ACCESS_CACHE_SECONDS (nginx counts whole seconds: up to one more).
    assert reload_until(page, f"{hub_proxy.url}/i/studio/", 200) < 2.5
    expect_comfyui(page, hub_proxy)

    access.share_remove(share=share, user=owner)
    assert reload_until(page, f"{hub_proxy.url}/i/studio/", 403) < 2.5
    expect(page.get_by_test_id("access-denied-message")).to_have_text("You may not use 'studio'.")


def reload_until(page, url, status, timeout=5):
    """Open url every 100 ms until it answers status; return how long that took (seconds)."""
    started = time.monotonic()
    while (response := page.goto(url)).status != status:
        assert time.monotonic() - started < timeout, f"{url} still answers {response.status}, not {status}"
        page.wait_for_timeout(100)
    return time.monotonic() - started


def test_a_stopped_instance_shows_the_start_page_and_opens_once_started(page, hub_proxy, running_double, owner,
                                                                         run_worker):
    services.instance_stop(instance=running_double, user=owner)
    run_worker()
    assert Instance.objects.get(pk=running_double.pk).status == Instance.Status.STOPPED

    page.goto(f"{hub_proxy.url}/i/studio/")
    log_in(page, "olga", "olga-password-1")

    expect(page.get_by_test_id("instance-unavailable")).to_be_visible()
    expect(page.get_by_test_id("unavailable-reason")).to_contain_text("Stopped by olga.")
    with page.expect_navigation():
        page.get_by_test_id("unavailable-start").click()
    expect(page).to_have_url(f"{hub_proxy.url}/i/studio/")  # back to where it was, still the start page
    start = Operation.objects.filter(kind="instance_start").latest("created_at")
    assert start.status == Operation.Status.QUEUED and start.requested_by == owner
    run_worker()  # the start operation the click queued
    # The page polls; once the instance answers it opens ComfyUI at /i/studio/.
    expect(page.get_by_test_id("ws-state")).to_have_text("open", timeout=30_000)
    expect_comfyui(page, hub_proxy)


EVIL_SVG = b"""<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">
<script>fetch("/i/studio/queue?script-ran=" + document.domain)</script><rect width="10" height="10"/></svg>"""


def test_an_uploaded_svg_opened_through_the_hub_runs_no_script_as_the_hub(page, hub_proxy, running_double, owner):
    # Any user of an instance can upload a file that ComfyUI's /view serves as it is (SVG is an image to it).
    page.goto(f"{hub_proxy.url}/login/")
    log_in(page, "olga", "olga-password-1")
    upload = page.request.post(f"{hub_proxy.url}/i/studio/upload/image", multipart={
        "image": {"name": "evil.svg", "mimeType": "image/svg+xml", "buffer": EVIL_SVG}})
    assert upload.ok, upload.text()
    requested = []
    page.on("request", lambda request: requested.append(request.url))

    response = page.goto(f"{hub_proxy.url}/i/studio/view?filename=evil.svg&type=input")
    assert response.status == 200 and response.headers["content-type"].startswith("image/svg+xml")
    assert response.headers["content-security-policy"] == "sandbox"
    time.sleep(1)  # what the script would have done by now
    assert not [url for url in requested if "script-ran" in url]
    # It is still an image: an <img> on the instance's own page shows it.
    page.goto(f"{hub_proxy.url}/i/studio/")
    width = page.evaluate("""() => new Promise(done => { const img = new Image(); img.onload = () => done(img.width);
        img.onerror = () => done(-1); img.src = "view?filename=evil.svg&type=input"; })""")
    assert width == 10
