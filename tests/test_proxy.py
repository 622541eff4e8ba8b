"""/i/<id>/ through a real nginx (tests/support/hubproxy.py) in front of the live server: who gets through, what an
instance sees of the hub's secrets, what is refused before any instance is asked. Most tests put a small echo server
where an instance would listen (it records every request it gets); the last ones run the ComfyUI test double."""
from __future__ import annotations

import http.client
import http.server
import json
import socket
import subprocess
import threading
import time
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from comfyhub import tokens
from comfyhub.models import AccessToken
from instances import access, services
from instances.models import Instance, InstanceOpen, InstanceShare
from tests.conftest import wait_for
from tests.support import ws

pytestmark = pytest.mark.django_db(transaction=True)


# What an instance might send that a browser keeps for the hub's whole origin (or opens it to other sites).
ORIGIN_WIDE_HEADERS = {
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains; preload",
    "NEL": '{"report_to": "evil", "max_age": 31536000}',
    "Report-To": '{"group": "evil", "max_age": 31536000, "endpoints": [{"url": "https://evil.example/r"}]}',
    "Reporting-Endpoints": 'evil="https://evil.example/r"',
    "Alt-Svc": 'h3=":443"; ma=86400',
    "Accept-CH": "Sec-CH-UA-Full-Version-List",
    "Critical-CH": "Sec-CH-UA-Full-Version-List",
    "Origin-Agent-Cluster": "?1",
    "Access-Control-Allow-Origin": "http://evil.example",
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Allow-Headers": "Authorization",
    "Timing-Allow-Origin": "*",
}


class Echo(http.server.BaseHTTPRequestHandler):
    """An instance that answers every request with what it received, and tries to set a cookie on the hub."""

    protocol_version = "HTTP/1.1"

    def handle_one(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                 "body": body})
        data = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Set-Cookie", "sessionid=planted-by-the-instance; Path=/")
        self.send_header("Service-Worker-Allowed", "/")
        self.send_header("Clear-Site-Data", '"*"')
        self.send_header("X-Accel-Redirect", "/_hub/auth")
        for name, value in ORIGIN_WIDE_HEADERS.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = handle_one

    def log_message(self, *args):
        pass


@pytest.fixture
def echo():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def fast_revocation(settings):
    settings.ACCESS_CACHE_SECONDS = 1


@pytest.fixture
def owner(transactional_db):
    user = User.objects.create_user("olga", password="olga-password-1")
    user.user_permissions.add(Permission.objects.get(codename="create_own_instance"))
    return user


def an_instance(instance_id, owner, port, *, status=Instance.Status.HEALTHY, desired=Instance.DesiredState.RUNNING):
    """An instance whose port is where the echo (or nothing) listens; running and healthy unless told otherwise."""
    instance = services.instance_create(instance_id=instance_id, owner=owner)
    Instance.objects.filter(pk=instance.pk).update(host_port=port, status=status, desired_state=desired)
    instance.refresh_from_db()
    return instance


@pytest.fixture
def echo_instance(echo, owner):
    return an_instance("echo", owner, echo.server_address[1])


def session_cookie(user):
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def request(hub_proxy, method, path, headers=None, body=None):
    """One request as written (http.client does not normalise the path)."""
    connection = http.client.HTTPConnection("127.0.0.1", hub_proxy.port, timeout=10)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response, data


def raw(hub_proxy, text: str) -> str:
    """The status line nginx answers to a request written byte for byte; "" when it closes without answering."""
    with socket.create_connection(("127.0.0.1", hub_proxy.port), timeout=10) as s:
        s.sendall(text.encode())
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    return received.decode(errors="replace").split("\r\n", 1)[0]


def test_an_owner_reaches_the_instance_with_the_raw_path_and_none_of_the_hubs_secrets(
        hub_proxy, echo, echo_instance, owner):
    cookie = session_cookie(owner)
    response, data = request(hub_proxy, "GET", "/i/echo/userdata/workflows%2Fmy%20flow.json?full_info=true&x=%2F",
                             {"Cookie": f"{cookie}; csrftoken=abc", "Origin": f"{hub_proxy.url}"})
    assert response.status == 200, data
    seen = echo.seen[-1]
    # The raw rest of the path, %2F inside one segment included, and the query, once.
    assert seen["path"] == "/userdata/workflows%2Fmy%20flow.json?full_info=true&x=%2F"
    # Host and Origin as sent; the hub's cookies never reach the instance.
    assert seen["headers"]["Host"] == f"127.0.0.1:{hub_proxy.port}"
    assert seen["headers"]["Origin"] == hub_proxy.url
    assert "Cookie" not in seen["headers"] and "Authorization" not in seen["headers"]
    # What the instance tried to set on the hub's origin is dropped; its X-Accel-Redirect steered nothing.
    assert response.getheader("Set-Cookie") is None
    assert response.getheader("Service-Worker-Allowed") is None
    assert response.getheader("Clear-Site-Data") is None
    assert [name for name in ORIGIN_WIDE_HEADERS if response.getheader(name) is not None] == []
    assert json.loads(data) == {"path": "/userdata/workflows%2Fmy%20flow.json?full_info=true&x=%2F"}
    # The open is recorded, and counts as activity.
    assert InstanceOpen.objects.filter(instance=echo_instance, user=owner, via="browser").count() == 1
    echo_instance.refresh_from_db()
    assert echo_instance.last_activity_at is not None


def test_without_the_trailing_slash_it_redirects_to_the_instance(hub_proxy, echo_instance):
    response, _ = request(hub_proxy, "GET", "/i/echo")
    assert (response.status, response.getheader("Location")) == (301, "/i/echo/")


def test_anonymous_scripts_get_a_json_401_and_browsers_the_login_page_and_back(hub_proxy, echo, echo_instance):
    response, data = request(hub_proxy, "POST", "/i/echo/prompt", {"Content-Type": "application/json"}, b"{}")
    assert response.status == 401
    assert response.getheader("WWW-Authenticate").startswith("Bearer")
    assert "Log in" in json.loads(data)["error"]
    response, _ = request(hub_proxy, "GET", "/i/echo/some%2Fpage?a=1", {"Accept": "text/html,*/*"})
    assert response.status == 302
    assert response.getheader("Location") == "/login/?next=%2Fi%2Fecho%2Fsome%252Fpage%3Fa%3D1"
    assert echo.seen == []


def test_a_stranger_gets_the_page_naming_who_may_give_access(hub_proxy, echo, echo_instance, stranger, operator):
    response, data = request(hub_proxy, "GET", "/i/echo/", {"Cookie": session_cookie(stranger),
                                                            "Accept": "text/html"})
    assert response.status == 403
    page = data.decode()
    assert "You may not use" in page and "olga" in page
    response, data = request(hub_proxy, "GET", "/i/nothing-here/", {"Cookie": session_cookie(stranger),
                                                                    "Accept": "text/html"})
    assert response.status == 403 and "no instance &#x27;nothing-here&#x27;" in data.decode()
    assert echo.seen == []


def test_a_token_opens_it_and_a_revoked_or_expired_one_does_not_even_beside_a_session(
        hub_proxy, echo, echo_instance, owner, fast_revocation):
    token, raw_token = tokens.token_create(user=owner, name="script")
    response, data = request(hub_proxy, "GET", "/i/echo/history", {"Authorization": f"Bearer {raw_token}"})
    assert response.status == 200, data
    assert "Authorization" not in echo.seen[-1]["headers"]
    assert InstanceOpen.objects.filter(instance=echo_instance, via="token", token=token).exists()
    token.refresh_from_db()
    assert token.last_used_at is not None

    expired, expired_raw = tokens.token_create(user=owner, name="old",
                                               expires_at=timezone.now() + timedelta(minutes=1))
    AccessToken.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    response, data = request(hub_proxy, "GET", "/i/echo/history", {"Authorization": f"Bearer {expired_raw}",
                                                                   "Cookie": session_cookie(owner)})
    assert response.status == 401 and "revoked or expired" in json.loads(data)["error"]

    token.revoked_at = timezone.now()
    token.save()
    # Its 200 was cached for ACCESS_CACHE_SECONDS (1 s here); then it is refused.
    revoked = time.monotonic()
    wait_for(lambda: request(hub_proxy, "GET", "/i/echo/history", {"Authorization": f"Bearer {raw_token}"})[0]
             .status == 401, timeout=5, interval=0.1, message="the revoked token to be refused")
    assert time.monotonic() - revoked < 2.5


def test_removing_a_share_takes_effect_within_the_cache_time(hub_proxy, echo, echo_instance, owner, stranger,
                                                             fast_revocation):
    share = InstanceShare.objects.create(instance=echo_instance, user=stranger, created_by=owner)
    cookie = session_cookie(stranger)
    assert request(hub_proxy, "GET", "/i/echo/queue", {"Cookie": cookie})[0].status == 200
    share.delete()
    removed = time.monotonic()
    wait_for(lambda: request(hub_proxy, "GET", "/i/echo/queue", {"Cookie": cookie})[0].status == 403,
             timeout=5, interval=0.1, message="the removed share to take effect")
    assert time.monotonic() - removed < 2.5


def test_bad_paths_absolute_urls_and_host_games_never_reach_an_instance(hub_proxy, echo, echo_instance, owner):
    cookie = session_cookie(owner)
    for path in ("/i/echo/../echo/", "/i/a/../echo/", "/i/echo/%2e%2e/x", "/i/echo/.%2E/x", "/i/echo%2F..%2Fb/",
                 "/i/Echo/", "/i/ech%6F/", "/i/echo%2f/", "/i/echo%5c/", "/i/echo\\..\\x/", "/i/echo/a/..%2F..%2F",
                 "/i/-echo/", "//i/echo/", "/i/../admin/", "/i/echo/distributed/config#x", "/i/echo/view#frag"):
        response, _ = request(hub_proxy, "GET", path, {"Cookie": cookie})
        assert response.status == 400, path
    host = f"Host: 127.0.0.1:{hub_proxy.port}\r\nCookie: {cookie}\r\nConnection: close\r\n"
    assert raw(hub_proxy, f"GET http://127.0.0.1:{hub_proxy.port}/i/echo/ HTTP/1.1\r\n{host}\r\n").startswith(
        "HTTP/1.1 400")
    assert raw(hub_proxy, f"GET http://other-host/i/echo/ HTTP/1.1\r\n{host}\r\n") == ""  # closed, no answer
    assert raw(hub_proxy, f"GET /i/echo/ HTTP/1.1\r\nHost: evil.example\r\nCookie: {cookie}\r\n"
                          "Connection: close\r\n\r\n") == ""
    assert raw(hub_proxy, f"GET /i/echo/ HTTP/1.1\r\n{host}Host: evil.example\r\n\r\n").startswith("HTTP/1.1 400")
    assert raw(hub_proxy, "GET /i/echo/ HTTP/1.0\r\n\r\n") == ""  # no Host at all
    # The access check itself is nginx's alone.
    assert request(hub_proxy, "GET", "/_hub/auth", {"Cookie": cookie, "X-Original-URI": "/i/echo/"})[0].status == 404
    assert echo.seen == []
    # ...while the same session does reach it the normal way.
    assert request(hub_proxy, "GET", "/i/echo/", {"Cookie": cookie})[0].status == 200
    # A Host that is not a host and port is refused, also while that session's answer is cached.
    for bad in (f"127.0.0.1:{hub_proxy.port}@evil.example", f"127.0.0.1:{hub_proxy.port}:1", "127.0.0.1 x"):
        assert raw(hub_proxy, f"GET /i/echo/queue HTTP/1.1\r\nHost: {bad}\r\nCookie: {cookie}\r\n"
                              "Connection: close\r\n\r\n").startswith("HTTP/1.1 400"), bad
    assert len(echo.seen) == 1


@pytest.mark.parametrize("path", [
    "/i/echo/view?filename=evil.svg&type=input", "/i/echo/api/view?filename=evil.svg", "/i/echo/%76iew?filename=x",
    "/i/echo//view?filename=x", "/i/echo/userdata/workflows%2Fevil.html", "/i/echo/api/userdata/evil.html",
    "/i/echo/api/v2/userdata?path=x", "/i/echo/view_metadata/loras?filename=x",
    "/i/echo/api/experiment/models/preview/checkpoints/0/x.webp", "/i/echo/api/assets/1234/content?disposition=inline",
])
def test_files_users_uploaded_or_wrote_are_served_sandboxed_so_no_script_in_them_runs_as_the_hub(
        hub_proxy, echo, echo_instance, owner, path):
    response, _ = request(hub_proxy, "GET", path, {"Cookie": session_cookie(owner)})
    assert response.status == 200
    assert response.getheader("Content-Security-Policy") == "sandbox"
    assert response.getheader("X-Content-Type-Options") == "nosniff"


@pytest.mark.parametrize("path", ["/i/echo/", "/i/echo/assets/index.js", "/i/echo/extensions/node/x.js",
                                  "/i/echo/api/prompt", "/i/echo/viewer/"])
def test_the_frontend_and_the_api_are_not_sandboxed(hub_proxy, echo, echo_instance, owner, path):
    response, _ = request(hub_proxy, "GET", path, {"Cookie": session_cookie(owner)})
    assert response.status == 200
    assert response.getheader("Content-Security-Policy") is None


def test_an_instance_that_does_not_answer_shows_the_start_page_not_a_502(hub_proxy, owner, stranger):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    instance = an_instance("sleepy", owner, port, status=Instance.Status.STOPPED,
                           desired=Instance.DesiredState.STOPPED)
    Instance.objects.filter(pk=instance.pk).update(stop_reason="Stopped after 60 min idle.")
    response, data = request(hub_proxy, "GET", "/i/sleepy/", {"Cookie": session_cookie(owner),
                                                              "Accept": "text/html"})
    page = data.decode()
    assert response.status == 503
    assert "Stopped" in page and "Stopped after 60 min idle." in page
    assert 'data-testid="unavailable-start"' in page and f'action="/instances/sleepy/start/"' in page
    # Someone it is shared with may use it, not start it: the page says who can.
    InstanceShare.objects.create(instance=instance, user=stranger, created_by=owner)
    assert access.can_use(stranger, instance) and not access.can_operate(stranger, instance)
    response, data = request(hub_proxy, "GET", "/i/sleepy/", {"Cookie": session_cookie(stranger),
                                                              "Accept": "text/html"})
    assert response.status == 503
    who = data.decode().split('data-testid="unavailable-who">')[1].split("</p>")[0]
    assert "unavailable-start" not in data.decode() and "Its owner <strong>olga</strong>" in who
    # An owner who may not create (so start) their own instances is not named as one who can start it.
    owner.user_permissions.clear()
    response, data = request(hub_proxy, "GET", "/i/sleepy/", {"Cookie": session_cookie(stranger),
                                                              "Accept": "text/html"})
    who = data.decode().split('data-testid="unavailable-who">')[1].split("</p>")[0]
    assert "olga" not in who and "An operator can start it." in who
    # A script gets JSON.
    response, data = request(hub_proxy, "GET", "/i/sleepy/queue", {"Cookie": session_cookie(owner)})
    assert response.status == 503 and json.loads(data)["status"] == "stopped"


def test_an_upload_streams_through(hub_proxy, echo, echo_instance, owner):
    body = b"x" * (3 * 1024 * 1024)
    response, _ = request(hub_proxy, "POST", "/i/echo/upload/image",
                          {"Cookie": session_cookie(owner), "Content-Type": "application/octet-stream"}, body)
    assert response.status == 200
    assert echo.seen[-1]["method"] == "POST" and echo.seen[-1]["body"] == body


# --- The ComfyUI test double in a real container -----------------------------------------------------------------

@pytest.mark.docker
def test_the_double_is_used_through_the_hub_api_uploads_userdata_websocket_and_stop(
        hub_proxy, comfyui_double_image, docker_cleanup, run_worker, owner):
    from comfyhub.models import Operation

    instance = services.instance_create(instance_id="real", image=comfyui_double_image, owner=owner)
    operation = services.instance_start(instance=instance, user=owner)
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error + operation.log
    cookie = session_cookie(owner)

    response, data = request(hub_proxy, "GET", "/i/real/system_stats", {"Cookie": cookie})
    assert response.status == 200 and "devices" in json.loads(data)

    boundary = "hubboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"pixel.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + b"\x89PNG fake" + f"\r\n--{boundary}--\r\n".encode()
    response, data = request(hub_proxy, "POST", "/i/real/upload/image",
                             {"Cookie": cookie, "Content-Type": f"multipart/form-data; boundary={boundary}",
                              "Origin": hub_proxy.url}, form)
    assert response.status == 200, data
    assert json.loads(data)["name"] == "pixel.png"

    response, data = request(hub_proxy, "POST", "/i/real/userdata/workflows%2Fthrough-the-hub.json",
                             {"Cookie": cookie, "Content-Type": "application/json"}, b'{"nodes": []}')
    assert response.status == 200, data
    response, data = request(hub_proxy, "GET", "/i/real/userdata/workflows%2Fthrough-the-hub.json",
                             {"Cookie": cookie})
    assert response.status == 200 and json.loads(data) == {"nodes": []}

    handshake = _websocket_status(hub_proxy, cookie)
    assert handshake.startswith("HTTP/1.1 101"), handshake

    # A script with a token, as a user would run it: curl for the API, a WebSocket for the progress messages.
    token, raw_token = tokens.token_create(user=owner, name="render script")
    bearer = f"Authorization: Bearer {raw_token}"
    with ws.connect(f"ws://127.0.0.1:{hub_proxy.port}/i/real/ws?clientId=script-1",
                    headers={"Authorization": f"Bearer {raw_token}"}) as socket_:
        status = socket_.receive_until(lambda message: message.get("type") == "status")
        assert status["data"]["sid"] == "script-1"
        queued = _curl("-X", "POST", "-H", bearer, "-H", "Content-Type: application/json", "--data",
                       json.dumps({"prompt": {"1": {"class_type": "SaveImage", "inputs": {}}},
                                   "client_id": "script-1"}), f"{hub_proxy.url}/i/real/prompt")
        assert queued.returncode == 0, queued.stderr
        prompt_id = json.loads(queued.stdout)["prompt_id"]
        # The prompt's messages reach the script's WebSocket through the hub.
        socket_.receive_until(lambda message: (message.get("data") or {}).get("prompt_id") == prompt_id)
    wait_for(lambda: prompt_id in json.loads(_curl("-H", bearer, f"{hub_proxy.url}/i/real/history/{prompt_id}").stdout),
             timeout=10, interval=0.2, message="the prompt in the history, read with curl")
    tokens.token_revoke(token=token, user=owner)
    wait_for(lambda: _curl("-o", "/dev/null", "-w", "%{http_code}", "-H", bearer,
                           f"{hub_proxy.url}/i/real/system_stats").stdout == "401",
             timeout=10, interval=0.2, message="curl with the revoked token to get 401")

    operation = services.instance_stop(instance=instance, user=owner)
    run_worker()
    response, data = request(hub_proxy, "GET", "/i/real/system_stats", {"Cookie": cookie})
    assert response.status == 503 and json.loads(data)["status"] == "stopped"


def _curl(*arguments):
    """The curl command line a user would type, with its output."""
    return subprocess.run(["curl", "--silent", "--show-error", "--max-time", "20", *arguments], capture_output=True,
                          text=True, timeout=30)


def _websocket_status(hub_proxy, cookie) -> str:
    """The status line of a WebSocket handshake with /i/real/ws (read up to the end of the headers)."""
    with socket.create_connection(("127.0.0.1", hub_proxy.port), timeout=10) as s:
        s.sendall((
            f"GET /i/real/ws?clientId=hub-test HTTP/1.1\r\nHost: 127.0.0.1:{hub_proxy.port}\r\nCookie: {cookie}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        received = b""
        while b"\r\n\r\n" not in received and (chunk := s.recv(65536)):
            received += chunk
    return received.decode(errors="replace").split("\r\n", 1)[0]


def test_caddy_and_traefik_forward_auth_get_the_whole_answer_from_the_access_check(live_server, echo_instance,
                                                                                   stranger, owner):
    """They send X-Forwarded-Uri and pass a refusal to the client as it is: a login redirect, JSON or the page."""
    client = Client()
    response = client.get("/_hub/auth", headers={"X-Forwarded-Uri": "/i/echo/", "Accept": "text/html"})
    assert response.status_code == 302 and response["Location"] == "/login/?next=%2Fi%2Fecho%2F"
    client.force_login(stranger)
    response = client.get("/_hub/auth", headers={"X-Forwarded-Uri": "/i/echo/x", "Accept": "text/html"})
    assert response.status_code == 403 and b"olga" in response.content
    client.force_login(owner)
    response = client.get("/_hub/auth", headers={"X-Forwarded-Uri": "/i/echo/x"})
    assert response.status_code == 200 and response["X-ComfyHub-Upstream"] == f"127.0.0.1:{echo_instance.host_port}"


# --- The access cache is keyed on exactly the credentials Django judged --------------------------------------------

@pytest.mark.parametrize("shape", ["sessionid=; {own}", "sessionid=junk; {own}", "sessionid =junk; {own}",
                                   "{own_spaced}", "{own}; sessionid={own_value}"])
def test_a_session_cookie_nginx_could_read_otherwise_than_django_is_refused_and_opens_nothing_to_others(
        hub_proxy, echo, echo_instance, owner, shape):
    """nginx keys its cache on the first `sessionid=`; Django reads the last one and accepts `sessionid =x`. An
    answer about one cookie must never be kept under another's key (anonymous's above all)."""
    own = session_cookie(owner)
    cookie = shape.format(own=own, own_value=own.split("=", 1)[1], own_spaced=own.replace("=", " =", 1))
    response, data = request(hub_proxy, "GET", "/i/echo/queue", {"Cookie": cookie})
    assert response.status == 400 and "Clear this site's cookies" in json.loads(data)["error"]
    assert request(hub_proxy, "GET", "/i/echo/queue")[0].status == 401
    assert request(hub_proxy, "GET", "/i/echo/queue", {"Cookie": "sessionid=junk"})[0].status == 401
    assert request(hub_proxy, "GET", "/i/echo/queue", {"Cookie": "sessionid="})[0].status == 401
    assert echo.seen == []
    # The same session, sent plainly, is what gets in.
    assert request(hub_proxy, "GET", "/i/echo/queue", {"Cookie": own})[0].status == 200


def test_a_browser_sending_two_session_cookies_is_told_to_clear_them_not_sent_round_the_login_page(
        hub_proxy, echo, echo_instance, owner):
    response, data = request(hub_proxy, "GET", "/i/echo/", {"Cookie": f"sessionid=planted; {session_cookie(owner)}",
                                                            "Accept": "text/html"})
    assert response.status == 400
    page = data.decode()
    assert "two ComfyHub session cookies" in page and "Clear this site&#x27;s cookies" in page
    assert echo.seen == []


def test_an_authorization_header_sent_twice_is_refused(hub_proxy, echo, echo_instance, owner):
    _, raw_token = tokens.token_create(user=owner, name="script")
    answer = raw(hub_proxy, f"GET /i/echo/queue HTTP/1.1\r\nHost: 127.0.0.1:{hub_proxy.port}\r\n"
                            f"Authorization: Bearer junk\r\nAuthorization: Bearer {raw_token}\r\nConnection: close\r\n\r\n")
    assert answer.startswith("HTTP/1.1 400") or answer.startswith("HTTP/1.1 401"), answer
    assert request(hub_proxy, "GET", "/i/echo/queue", {"Authorization": "Bearer junk"})[0].status == 401
    assert echo.seen == []


# --- Only a running instance is proxied to, and only at an address the hub can name ------------------------------

@pytest.mark.parametrize("status, desired, says", [
    (Instance.Status.STOPPED, Instance.DesiredState.STOPPED, "Stopped"),
    (Instance.Status.NEW, Instance.DesiredState.STOPPED, "Not started yet"),
    (Instance.Status.HEALTHY, Instance.DesiredState.STOPPED, "Healthy"),  # its stop is under way
    (Instance.Status.STOPPED, Instance.DesiredState.RUNNING, "Starting: this page opens ComfyUI"),  # start queued
    (Instance.Status.CRASH_LOOPING, Instance.DesiredState.RUNNING, "crash-looping"),
    (Instance.Status.ERROR, Instance.DesiredState.RUNNING, "error"),
])
def test_a_program_squatting_on_the_port_of_an_instance_that_is_not_running_is_never_reached(
        hub_proxy, echo, owner, status, desired, says):
    """Any local user may listen on a stopped instance's port: what answers there must not get the hub's origin."""
    an_instance("squatted", owner, echo.server_address[1], status=status, desired=desired)
    cookie = session_cookie(owner)
    response, data = request(hub_proxy, "GET", "/i/squatted/", {"Cookie": cookie, "Accept": "text/html"})
    assert response.status == 503
    page = data.decode()
    assert 'data-testid="instance-unavailable"' in page and says in page
    starting = "Starting" in says  # nothing to press while a start is under way
    assert ('data-testid="unavailable-start"' in page) == (not starting)
    _, raw_token = tokens.token_create(user=owner, name="script")
    response, data = request(hub_proxy, "GET", "/i/squatted/prompt", {"Authorization": f"Bearer {raw_token}"})
    assert response.status == 503 and json.loads(data)["status"] == status
    # Asked again and again (not from a cached answer), the port is never reached.
    for _ in range(3):
        assert request(hub_proxy, "GET", "/i/squatted/x.js", {"Cookie": cookie})[0].status == 503
    assert echo.seen == []


def test_an_instance_opens_as_soon_as_its_container_runs_not_a_cache_time_later(hub_proxy, echo, owner):
    instance = an_instance("waking", owner, echo.server_address[1], status=Instance.Status.STOPPED)
    cookie = session_cookie(owner)
    assert request(hub_proxy, "GET", "/i/waking/", {"Cookie": cookie})[0].status == 503
    Instance.objects.filter(pk=instance.pk).update(status=Instance.Status.STARTING)
    assert request(hub_proxy, "GET", "/i/waking/", {"Cookie": cookie})[0].status == 200
    assert [seen["path"] for seen in echo.seen] == ["/"]


def test_a_running_instance_that_does_not_answer_shows_the_unavailable_page(hub_proxy, owner):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    an_instance("silent", owner, port)
    response, data = request(hub_proxy, "GET", "/i/silent/", {"Cookie": session_cookie(owner), "Accept": "text/html"})
    assert response.status == 503 and "ComfyHub last saw it running, but it does not answer now" in data.decode()


def moved_to_another_node(instance, **node_fields):
    """`instance` as if on node gpu-b (online: a heartbeat just now), made with `node_fields`."""
    from instances.models import Node

    remote = Node.objects.create(name="gpu-b", last_heartbeat_at=timezone.now(), **node_fields)
    Instance.objects.filter(pk=instance.pk).update(node=remote)
    instance.refresh_from_db()
    return remote


def unavailable_page(hub_proxy, user, path="/i/echo/") -> str:
    response, data = request(hub_proxy, "GET", path, {"Cookie": session_cookie(user), "Accept": "text/html"})
    assert response.status == 503
    return data.decode()


def test_a_wildcard_bind_means_loopback_on_the_hubs_own_node_only(hub_proxy, echo, echo_instance, owner):
    from instances.models import Node
    from instances.views_access import upstream_of

    port = echo.server_address[1]
    local = echo_instance.node
    assert local.name == "local"
    for wildcard, upstream in (("0.0.0.0", f"127.0.0.1:{port}"), ("::", f"[::1]:{port}")):
        Node.objects.filter(pk=local.pk).update(bind_address=wildcard)
        echo_instance.refresh_from_db()
        assert upstream_of(echo_instance) == upstream
    Node.objects.filter(pk=local.pk).update(bind_address="0.0.0.0")
    assert request(hub_proxy, "GET", "/i/echo/queue", {"Cookie": session_cookie(owner)})[0].status == 200
    assert len(echo.seen) == 1

    # Another node's wildcard names none of its addresses: the hub's own loopback would be the wrong machine.
    moved_to_another_node(echo_instance, bind_address="0.0.0.0")
    assert upstream_of(echo_instance) is None
    page = unavailable_page(hub_proxy, owner)
    assert "publishes ports on the wildcard address 0.0.0.0" in page and "gpu-b" in page
    assert "unavailable-start" not in page
    response, data = request(hub_proxy, "GET", "/i/echo/queue", {"Authorization": "Bearer x", "Cookie": ""})
    assert response.status == 401
    assert len(echo.seen) == 1


def test_another_nodes_loopback_is_opened_only_when_its_agent_shares_the_hubs(hub_proxy, echo, echo_instance, owner):
    from instances.models import Node
    from instances.nodes import network_identity
    from instances.views_access import upstream_of

    port = echo.server_address[1]
    remote = moved_to_another_node(echo_instance, bind_address="127.0.0.1")
    # Its agent on another machine (or in another network namespace): 127.0.0.1 there is not the hub's.
    for reported in ({}, {"network_identity": ""}, {"network_identity": "another-boot/net:1"}):
        Node.objects.filter(pk=remote.pk).update(heartbeat=reported)
        echo_instance.refresh_from_db()
        assert upstream_of(echo_instance) is None
    page = unavailable_page(hub_proxy, owner)
    assert "publishes ports on its loopback address 127.0.0.1" in page and "NODE_ADDRESS" in page
    assert echo.seen == []

    # Its agent beside the hub (its own Docker engine on this machine) reports the hub's own loopback.
    Node.objects.filter(pk=remote.pk).update(heartbeat={"network_identity": network_identity()})
    echo_instance.refresh_from_db()
    assert upstream_of(echo_instance) == f"127.0.0.1:{port}"
    assert request(hub_proxy, "GET", "/i/echo/queue", {"Cookie": session_cookie(owner)})[0].status == 200
    assert len(echo.seen) == 1


@pytest.mark.parametrize("change, state", [
    ({"last_heartbeat_at": timezone.now() - timedelta(hours=1)}, "offline since"),
    ({"approved": False}, "waiting for approval"),
])
def test_an_instance_on_a_node_that_is_offline_or_unapproved_is_not_opened(hub_proxy, echo, echo_instance, owner,
                                                                            fast_revocation, change, state):
    from instances.models import Node
    from instances.nodes import network_identity

    remote = moved_to_another_node(echo_instance, bind_address="127.0.0.1",
                                   heartbeat={"network_identity": network_identity()})
    cookie = session_cookie(owner)
    assert request(hub_proxy, "GET", "/i/echo/queue", {"Cookie": cookie})[0].status == 200
    Node.objects.filter(pk=remote.pk).update(**change)
    wait_for(lambda: request(hub_proxy, "GET", "/i/echo/queue", {"Cookie": cookie})[0].status != 200,
             timeout=5, interval=0.1, message="the node's state to take effect within the cache time")
    reached = len(echo.seen)
    assert f"Its node &#x27;gpu-b&#x27; is {state}" in unavailable_page(hub_proxy, owner, "/i/echo/queue")
    assert len(echo.seen) == reached


# --- ComfyUI-Distributed's settings: operating an instance, not only using it -------------------------------------

DISTRIBUTED_CHANGES = [
    ("POST", "/i/echo/distributed/config/update_worker"),
    ("POST", "/i/echo/distributed/config"),
    ("POST", "/i/echo/distributed/launch_worker"),
    ("POST", "/i/echo/distributed/tunnel/start"),
    ("GET", "/i/echo/distributed/remote_worker_log/w1"),
    # Spelt as the instance's server decodes them, or with an empty first segment.
    ("POST", "/i/echo/%64istributed/config/update_worker"),
    ("POST", "/i/echo/distributed/%63onfig/update_worker"),
    ("POST", "/i/echo//distributed/config/update_worker"),
    ("POST", "/i/echo/distributed/load_image"),
    # ComfyUI serves every route under /api/ too.
    ("POST", "/i/echo/api/distributed/config"),
    ("GET", "/i/echo/api/distributed/remote_worker_log/w1"),
    ("POST", "/i/echo/%61pi/distributed/launch_worker"),
    ("POST", "/i/echo/api/%64istributed/tunnel/start"),
    ("POST", "/i/echo/api//distributed/config"),
]


@pytest.mark.parametrize("method, path", DISTRIBUTED_CHANGES)
def test_a_share_does_not_let_its_holder_repoint_an_instances_distributed_workers(
        hub_proxy, echo, echo_instance, owner, stranger, method, path):
    InstanceShare.objects.create(instance=echo_instance, user=stranger, created_by=owner)
    cookie = session_cookie(stranger)
    # What a share allows, asked first, so that a cached answer would be there to reuse.
    assert request(hub_proxy, "GET", "/i/echo/distributed/config", {"Cookie": cookie})[0].status == 200
    assert request(hub_proxy, "POST", "/i/echo/distributed/queue", {"Cookie": cookie}, b"{}")[0].status == 200
    token = tokens.token_create(user=stranger, name="script")[1]
    for headers in ({"Cookie": cookie}, {"Authorization": f"Bearer {token}"}):
        response, data = request(hub_proxy, method, path, headers, b"{}" if method == "POST" else None)
        assert response.status == 403
        assert "needs permission to operate it" in json.loads(data)["error"]
    assert [seen["path"] for seen in echo.seen] == ["/distributed/config", "/distributed/queue"]

    # Its owner, who may operate it, may.
    body = b"{}" if method == "POST" else None
    response, _ = request(hub_proxy, method, path, {"Cookie": session_cookie(owner)}, body)
    assert response.status == 200 and len(echo.seen) == 3


def test_the_page_says_why_a_change_to_distributed_settings_was_refused(hub_proxy, echo, echo_instance, owner,
                                                                         stranger):
    InstanceShare.objects.create(instance=echo_instance, user=stranger, created_by=owner)
    response, data = request(hub_proxy, "POST", "/i/echo/distributed/launch_worker",
                             {"Cookie": session_cookie(stranger), "Accept": "text/html"}, b"{}")
    assert response.status == 403
    assert "but not change whom it sends work to" in data.decode() and "cluster" in data.decode()
    assert echo.seen == []


# --- Requests from other sites with the hub's cookie ---------------------------------------------------------------

@pytest.mark.parametrize("method, headers", [
    ("GET", {"Sec-Fetch-Site": "cross-site"}),
    ("GET", {"Sec-Fetch-Site": "same-site"}),
    ("POST", {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"}),
    ("POST", {"Origin": "http://evil.example"}),  # a browser that sends no fetch metadata
    ("POST", {"Origin": "null"}),
    ("DELETE", {"Origin": "http://127.0.0.1:1"}),
    ("OPTIONS", {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}),
    ("GET", {"Origin": "http://evil.example", "Upgrade": "websocket", "Connection": "Upgrade"}),
])
def test_a_request_from_another_site_with_the_hubs_cookie_is_refused_before_anyone_is_asked(
        hub_proxy, echo, echo_instance, owner, method, headers):
    response, data = request(hub_proxy, method, "/i/echo/prompt",
                             {"Cookie": session_cookie(owner), "Accept": "text/html", **headers}, b"{}")
    assert response.status == 403
    assert "does not let pages of other sites use an instance with your login" in data.decode()
    assert "/i/echo/" in data.decode()
    assert echo.seen == []


def test_a_link_from_another_site_opens_the_instances_page_but_nothing_below_it(hub_proxy, echo, echo_instance, owner):
    navigation = {"Cookie": session_cookie(owner), "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
                  "Sec-Fetch-Dest": "document"}
    response, _ = request(hub_proxy, "GET", "/i/echo/", navigation)
    assert response.status == 200 and len(echo.seen) == 1
    for path, headers in [("/i/echo/api/manager/reboot", navigation),
                          ("/i/echo/", {**navigation, "Sec-Fetch-Dest": "iframe"}),
                          ("/i/echo/", {**navigation, "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"})]:
        response, _ = request(hub_proxy, "GET", path, headers)
        assert response.status == 403, (path, headers)
    response, _ = request(hub_proxy, "POST", "/i/echo/", {**navigation, "Origin": "http://evil.example"}, b"{}")
    assert response.status == 403
    assert len(echo.seen) == 1


@pytest.mark.parametrize("method, headers", [
    ("GET", {"Sec-Fetch-Site": "same-origin"}),
    ("GET", {"Sec-Fetch-Site": "none"}),  # typed or bookmarked
    ("GET", {}),  # a script with the cookie: no fetch metadata, no Origin
    ("GET", {"Origin": "http://evil.example"}),  # reading is the same-origin policy's business
    ("POST", {"Sec-Fetch-Site": "same-origin", "Origin": "{hub}"}),
    ("POST", {"Origin": "{hub_upper}"}),
    ("POST", {"Origin": "https://127.0.0.1:{port}"}),  # behind a TLS front the browser's scheme is https
    ("POST", {}),
])
def test_the_hubs_own_pages_and_scripts_with_the_cookie_still_get_through(hub_proxy, echo, echo_instance, owner,
                                                                          method, headers):
    headers = {name: value.format(hub=hub_proxy.url, hub_upper=hub_proxy.url.upper(), port=hub_proxy.port)
               for name, value in headers.items()}
    response, data = request(hub_proxy, method, "/i/echo/prompt", {"Cookie": session_cookie(owner), **headers},
                             b"{}")
    assert response.status == 200, data
    assert len(echo.seen) == 1


def test_a_token_is_exempt_and_a_forged_refusal_header_changes_nothing(hub_proxy, echo, echo_instance, owner,
                                                                       stranger):
    _, raw_token = tokens.token_create(user=owner, name="script")
    response, _ = request(hub_proxy, "POST", "/i/echo/prompt", {
        "Authorization": f"Bearer {raw_token}", "Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"}, b"{}")
    assert response.status == 200 and len(echo.seen) == 1
    response, data = request(hub_proxy, "GET", "/i/echo/", {"Cookie": session_cookie(stranger), "Accept": "text/html",
                                                            "X-ComfyHub-Refusal": "cross-site"})
    assert response.status == 403 and "You may not use" in data.decode()


# --- The unavailable page's poll, and what a token gets there -----------------------------------------------------

def poll(client, instance_id, was, **headers):
    return client.get("/_hub/unavailable/", {"instance": instance_id, "was": was},
                      headers={"HX-Request": "true", **headers})


def test_the_unavailable_page_reloads_the_instance_once_it_answers_even_when_drawn_while_healthy(
        echo, owner, stranger):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        silent_port = s.getsockname()[1]
    instance = an_instance("flaky", owner, silent_port)  # healthy in the registry, nothing answering
    client = Client()
    client.force_login(stranger)
    assert poll(client, "flaky", "healthy").status_code == 403
    client.force_login(owner)
    # Drawn while the registry said healthy (nginx got no answer): no reload while nothing answers...
    response = poll(client, "flaky", "healthy")
    assert response.status_code == 200 and "HX-Refresh" not in response
    assert 'data-testid="instance-unavailable"' in response.content.decode()
    # ...and one as soon as it answers again.
    Instance.objects.filter(pk=instance.pk).update(host_port=echo.server_address[1])
    assert poll(client, "flaky", "healthy")["HX-Refresh"] == "true"
    # A start: drawn stopped, it reloads once the container runs and answers, or once seen healthy.
    Instance.objects.filter(pk=instance.pk).update(status=Instance.Status.STARTING)
    assert poll(client, "flaky", "stopped")["HX-Refresh"] == "true"
    Instance.objects.filter(pk=instance.pk).update(status=Instance.Status.HEALTHY, host_port=silent_port)
    assert poll(client, "flaky", "stopped")["HX-Refresh"] == "true"
    # Never for an instance that is not proxied, whatever answers on its port.
    Instance.objects.filter(pk=instance.pk).update(desired_state=Instance.DesiredState.STOPPED,
                                                   host_port=echo.server_address[1])
    assert "HX-Refresh" not in poll(client, "flaky", "stopped")


def test_a_token_gets_only_json_about_the_instance_it_asked_for_on_the_hubs_refusal_pages(
        hub_proxy, echo, owner):
    an_instance("parked", owner, echo.server_address[1], status=Instance.Status.STOPPED,
                desired=Instance.DesiredState.STOPPED)
    _, raw_token = tokens.token_create(user=owner, name="script")
    bearer = {"Authorization": f"Bearer {raw_token}"}
    client = Client()
    # The browser's poll is not a token's: no ?instance=, no page, no reload.
    response = poll(client, "parked", "stopped", **bearer)
    assert response.status_code == 403 and response["Content-Type"] == "application/json"
    response = client.get("/_hub/unavailable/", {"instance": "parked"},
                          headers={"X-Original-URI": "/i/parked/queue", "Accept": "text/html", **bearer})
    assert response.status_code == 503 and json.loads(response.content)["status"] == "stopped"
    # /_hub/denied/ is nginx's to show: from outside, 404 like /_hub/auth.
    assert request(hub_proxy, "GET", "/_hub/denied/", {**bearer, "X-Original-URI": "/i/parked/"})[0].status == 404
    assert request(hub_proxy, "GET", "/_hub/denied/", {"Cookie": session_cookie(owner)})[0].status == 404
    assert echo.seen == []
