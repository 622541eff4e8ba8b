"""/i/<id>/ through a real Caddy (Debian's `caddy`) running the Caddyfile printed in docs/access.md, in front of the
live server: the same promises tests/test_proxy.py checks on nginx, kept where Caddy keeps them. The Caddyfile is
taken from the document itself, with only the site address and the hub's address replaced, so the two cannot
drift apart."""
from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from comfyhub import tokens
from instances.models import Instance, InstanceOpen, InstanceShare
from tests.conftest import REPO
from tests.support import processes, ws
from tests.test_proxy import Echo, an_instance, owner, raw, request, session_cookie  # noqa: F401 (owner: a fixture)

pytestmark = pytest.mark.django_db(transaction=True)

ACCESS_DOC = REPO / "docs" / "access.md"
DOC_SITE = "hub.example.org"
DOC_HUB = "127.0.0.1:8001"


def documented_caddyfile() -> str:
    """The Caddyfile block of docs/access.md's section on Caddy."""
    text = ACCESS_DOC.read_text()
    section = text[text.index("## The same endpoint from Caddy or Traefik"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"^```caddyfile\n(.*?)^```", section, re.M | re.S)
    assert len(blocks) == 1, "docs/access.md's Caddy section should hold one ```caddyfile block"
    return blocks[0]


@dataclass
class Caddy:
    url: str
    port: int
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def caddy(live_server, tmp_path_factory):
    binary = shutil.which("caddy")
    if binary is None:
        raise RuntimeError("caddy is missing: `make test` installs it (apt-get install caddy).")
    home = tmp_path_factory.mktemp("caddy")
    port = _free_port()
    host, live_port = live_server.thread.host, live_server.thread.port
    hub = f"{'127.0.0.1' if host == 'localhost' else host}:{live_port}"
    block = documented_caddyfile()
    assert block.startswith(f"{DOC_SITE} {{") and DOC_HUB in block
    # Only what a test must change: plain HTTP on a free port, the live server for the hub; and, for a private
    # Caddy, no admin endpoint and no certificates.
    config = "{\n\tadmin off\n\tauto_https off\n}\n\n" + block.replace(DOC_SITE, f"http://127.0.0.1:{port}", 1) \
        .replace(DOC_HUB, hub)
    (home / "Caddyfile").write_text(config)
    environment = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data"),
                   "XDG_CONFIG_HOME": str(home / "config")}
    log = home / "caddy.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([binary, "run", "--config", str(home / "Caddyfile"), "--adapter", "caddyfile"],
                                   env=environment, stdout=output, stderr=subprocess.STDOUT)
    processes.wait_until_listening(process, port, "caddy", lambda: log.read_text(errors="replace"))
    try:
        yield Caddy(url=f"http://127.0.0.1:{port}", port=port, log=log)
    finally:
        processes.stop(process)


class EchoWithWebSocket(Echo):
    """The echo instance, which also accepts a WebSocket: it sends what it received, then echoes one message."""

    def handle_one(self):
        if self.headers.get("Upgrade", "").lower() != "websocket":
            return super().handle_one()
        self.server.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                 "body": b""})
        accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] + ws.GUID).encode()).digest())
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept.decode())
        self.end_headers()
        self._send_text(json.dumps({"path": self.path, "cookie": self.headers.get("Cookie")}))
        _first, second = self.rfile.read(2)
        key = self.rfile.read(4)  # client frames are masked; short ones only here
        payload = ws.mask(self.rfile.read(second & 0x7F), key)
        self._send_text(payload.decode())
        self.close_connection = True

    def _send_text(self, text):
        data = text.encode()
        self.wfile.write(bytes((0x81, len(data))) + data)
        self.wfile.flush()

    do_GET = handle_one


def start_echo():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoWithWebSocket)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop_echo(server):
    server.shutdown()
    server.server_close()


@pytest.fixture
def echo():
    server = start_echo()
    yield server
    stop_echo(server)


@pytest.fixture
def echo_instance(echo, owner):
    return an_instance("echo", owner, echo.server_address[1])


def test_an_owner_reaches_the_instance_with_the_raw_path_and_none_of_the_hubs_secrets(
        caddy, echo, echo_instance, owner):
    cookie = session_cookie(owner)
    response, data = request(caddy, "GET", "/i/echo/userdata/workflows%2Fmy%20flow.json?full_info=true&x=%2F",
                             {"Cookie": f"{cookie}; csrftoken=abc", "Origin": caddy.url})
    assert response.status == 200, data
    seen = echo.seen[-1]
    # The raw rest of the path, %2F inside one segment included, and the query, once.
    assert seen["path"] == "/userdata/workflows%2Fmy%20flow.json?full_info=true&x=%2F"
    assert seen["headers"]["Host"] == f"127.0.0.1:{caddy.port}"
    assert seen["headers"]["Origin"] == caddy.url
    assert "Cookie" not in seen["headers"] and "Authorization" not in seen["headers"]
    assert "X-ComfyHub-Upstream" not in seen["headers"]
    assert response.getheader("Set-Cookie") is None
    assert response.getheader("Service-Worker-Allowed") is None
    assert response.getheader("Clear-Site-Data") is None
    assert InstanceOpen.objects.filter(instance=echo_instance, user=owner, via="browser").count() == 1
    echo_instance.refresh_from_db()
    assert echo_instance.last_activity_at is not None


def test_a_post_body_reaches_the_instance(caddy, echo, echo_instance, owner):
    body = b"x" * (1024 * 1024)
    response, _ = request(caddy, "POST", "/i/echo/upload/image",
                          {"Cookie": session_cookie(owner), "Content-Type": "application/octet-stream"}, body)
    assert response.status == 200
    assert echo.seen[-1]["method"] == "POST" and echo.seen[-1]["body"] == body


def test_without_the_trailing_slash_it_redirects_to_the_instance(caddy, echo_instance):
    response, _ = request(caddy, "GET", "/i/echo")
    assert (response.status, response.getheader("Location")) == (301, "/i/echo/")


def test_anonymous_scripts_get_a_json_401_and_browsers_the_login_page_and_back(caddy, echo, echo_instance):
    response, data = request(caddy, "POST", "/i/echo/prompt", {"Content-Type": "application/json"}, b"{}")
    assert response.status == 401
    assert response.getheader("WWW-Authenticate").startswith("Bearer")
    assert "Log in" in json.loads(data)["error"]
    response, _ = request(caddy, "GET", "/i/echo/some%2Fpage?a=1", {"Accept": "text/html,*/*"})
    assert response.status == 302
    assert response.getheader("Location") == "/login/?next=%2Fi%2Fecho%2Fsome%252Fpage%3Fa%3D1"
    assert echo.seen == []


def test_a_stranger_gets_the_page_naming_who_may_give_access(caddy, echo, echo_instance, stranger, operator):
    response, data = request(caddy, "GET", "/i/echo/", {"Cookie": session_cookie(stranger), "Accept": "text/html"})
    assert response.status == 403
    page = data.decode()
    assert "You may not use" in page and "olga" in page
    response, data = request(caddy, "GET", "/i/nothing-here/", {"Cookie": session_cookie(stranger),
                                                                "Accept": "text/html"})
    assert response.status == 403 and "no instance &#x27;nothing-here&#x27;" in data.decode()
    response, data = request(caddy, "GET", "/i/echo/queue", {"Cookie": session_cookie(stranger)})
    assert response.status == 403 and "olga" in json.loads(data)["error"]
    assert echo.seen == []


def test_a_token_opens_it_and_a_revoked_one_does_not_even_beside_a_session(caddy, echo, echo_instance, owner):
    token, raw_token = tokens.token_create(user=owner, name="script")
    response, data = request(caddy, "GET", "/i/echo/history", {"Authorization": f"Bearer {raw_token}"})
    assert response.status == 200, data
    assert "Authorization" not in echo.seen[-1]["headers"]
    assert InstanceOpen.objects.filter(instance=echo_instance, via="token", token=token).exists()
    tokens.token_revoke(token=token, user=owner)
    # Caddy keeps no answer: refused on the very next request.
    response, data = request(caddy, "GET", "/i/echo/history", {"Authorization": f"Bearer {raw_token}",
                                                               "Cookie": session_cookie(owner)})
    assert response.status == 401 and "revoked or expired" in json.loads(data)["error"]


def test_a_share_does_not_let_its_holder_change_distributed_settings_behind_caddy(caddy, echo, echo_instance, owner,
                                                                                   stranger):
    InstanceShare.objects.create(instance=echo_instance, user=stranger, created_by=owner)
    cookie = session_cookie(stranger)
    assert request(caddy, "GET", "/i/echo/distributed/config", {"Cookie": cookie})[0].status == 200
    response, data = request(caddy, "POST", "/i/echo/distributed/config/update_worker", {"Cookie": cookie}, b"{}")
    assert response.status == 403 and "needs permission to operate it" in json.loads(data)["error"]
    assert [seen["path"] for seen in echo.seen] == ["/distributed/config"]
    response, _ = request(caddy, "POST", "/i/echo/distributed/config/update_worker", {"Cookie": session_cookie(owner)},
                          b"{}")
    assert response.status == 200 and echo.seen[-1]["path"] == "/distributed/config/update_worker"


@pytest.mark.parametrize("path", ["/i/echo/view?filename=evil.svg", "/i/echo/%76iew?filename=x",
                                  "/i/echo/api/userdata/evil.html"])
def test_files_users_uploaded_are_sandboxed_behind_caddy(caddy, echo, echo_instance, owner, path):
    response, _ = request(caddy, "GET", path, {"Cookie": session_cookie(owner)})
    assert response.status == 200
    assert (response.getheader("Content-Security-Policy"), response.getheader("X-Content-Type-Options")) == \
        ("sandbox", "nosniff")
    response, _ = request(caddy, "GET", "/i/echo/assets/index.js", {"Cookie": session_cookie(owner)})
    assert response.status == 200 and response.getheader("Content-Security-Policy") is None


def test_a_websocket_passes_without_the_hubs_cookie(caddy, echo, echo_instance, owner):
    cookie = session_cookie(owner)
    with ws.connect(f"ws://127.0.0.1:{caddy.port}/i/echo/ws?clientId=a%2Fb",
                    headers={"Cookie": cookie, "Origin": caddy.url}) as socket_:
        assert socket_.receive_json() == {"path": "/ws?clientId=a%2Fb", "cookie": None}
        socket_.send_text("hello through caddy")
        assert socket_.receive_text() == "hello through caddy"
    with pytest.raises(ws.HandshakeError) as refused:
        ws.connect(f"ws://127.0.0.1:{caddy.port}/i/echo/ws")
    assert refused.value.status == 401


def test_paths_and_headers_a_client_forges_reach_only_an_instance_django_let_them_use(
        caddy, echo, echo_instance, owner, stranger):
    """Caddy resolves dot segments instead of refusing them with 400 as nginx does, but the address it proxies to
    always comes from Django's answer about the raw path: a stranger's tricks reach their own instance at most."""
    theirs = start_echo()
    try:
        an_instance("theirs", stranger, theirs.server_address[1])
        cookie = session_cookie(stranger)
        for path in ("/i/theirs/../echo/x", "/i/theirs/%2e%2e/echo/x", "/i/theirs%2F..%2Fecho/", "/i/mine/../echo/",
                     "/i/echo%2Fx/", "//i/echo/", "/i/echo/../theirs/x"):
            response, _ = request(caddy, "GET", path, {"Cookie": cookie})
            assert response.status in (200, 403), (path, response.status)
        # The cleaned rest, or the whole raw path where Caddy's cleaned id and the raw one differ.
        assert [seen["path"] for seen in theirs.seen] == ["/x", "/i/theirs/%2e%2e/echo/x"]
        # Headers nginx or Django would believe are replaced or dropped on the way.
        response, _ = request(caddy, "GET", "/i/echo/x", {
            "Cookie": cookie, "X-Original-URI": "/i/theirs/", "X-Forwarded-Uri": "/i/theirs/",
            "X-ComfyHub-Upstream": f"127.0.0.1:{theirs.server_address[1]}"})
        assert response.status == 403
        response, _ = request(caddy, "GET", "/i/theirs/y", {
            "Cookie": cookie, "X-ComfyHub-Upstream": f"127.0.0.1:{echo.server_address[1]}"})
        assert response.status == 200 and theirs.seen[-1]["path"] == "/y"
        assert "X-ComfyHub-Upstream" not in theirs.seen[-1]["headers"]
    finally:
        stop_echo(theirs)
    assert echo.seen == []
    # The access check itself is not reachable from outside.
    response, _ = request(caddy, "GET", "/_hub/auth", {"Cookie": session_cookie(owner),
                                                       "X-Forwarded-Uri": "/i/echo/"})
    assert response.status == 404 and response.getheader("X-ComfyHub-Upstream") is None
    # A host name the site does not name: Caddy's empty answer, no instance asked.
    host = f"Cookie: {session_cookie(owner)}\r\nConnection: close\r\n"
    assert raw(caddy, f"GET /i/echo/ HTTP/1.1\r\nHost: evil.example\r\n{host}\r\n").startswith("HTTP/1.1 200")
    assert raw(caddy, f"GET http://other-host/i/echo/ HTTP/1.1\r\nHost: 127.0.0.1:{caddy.port}\r\n{host}\r\n") \
        .startswith("HTTP/1.1 200")
    assert echo.seen == []


def test_an_instance_that_does_not_answer_shows_the_start_page(caddy, owner, stranger):
    """A stopped instance is never proxied to: forward_auth's answer is ComfyHub's page itself. A running one that
    does not answer would get Caddy's empty 502; the documented handle_errors shows ComfyHub's page instead."""
    instance = an_instance("sleepy", owner, _free_port(), status=Instance.Status.STOPPED,
                           desired=Instance.DesiredState.STOPPED)  # nothing listens there
    Instance.objects.filter(pk=instance.pk).update(stop_reason="Stopped after 60 min idle.")
    # The page is about the instance in the path, whatever the instance's own query says.
    response, data = request(caddy, "GET", "/i/sleepy/view?instance=echo", {"Cookie": session_cookie(owner),
                                                                            "Accept": "text/html"})
    page = data.decode()
    assert response.status == 503, page
    assert "Stopped after 60 min idle." in page
    assert 'data-testid="unavailable-start"' in page and 'action="/instances/sleepy/start/"' in page
    InstanceShare.objects.create(instance=instance, user=stranger, created_by=owner)
    response, data = request(caddy, "GET", "/i/sleepy/", {"Cookie": session_cookie(stranger),
                                                          "Accept": "text/html"})
    assert response.status == 503
    assert "unavailable-start" not in data.decode() and "olga" in data.decode()
    response, data = request(caddy, "GET", "/i/sleepy/queue", {"Cookie": session_cookie(owner)})
    assert response.status == 503 and json.loads(data)["status"] == "stopped"
    Instance.objects.filter(pk=instance.pk).update(status=Instance.Status.HEALTHY,
                                                   desired_state=Instance.DesiredState.RUNNING)
    response, data = request(caddy, "GET", "/i/sleepy/", {"Cookie": session_cookie(owner), "Accept": "text/html"})
    assert response.status == 503 and "ComfyHub last saw it running, but it does not answer now" in data.decode()
