"""Through the hub vs direct: an instance on the ComfyUI test double, used through ComfyHub's nginx (/i/<id>/, every
request checked by Django's /_hub/auth, answers cached ACCESS_CACHE_SECONDS) with a logged-in session, and straight
at its published port, in one run, the two sides alternating:

- `GET /system_stats` on one keep-alive connection per side: median through the hub <= 1.5x direct + 2 ms;
- the double's frontend with 200 assets (COMFYUI_DOUBLE_ASSETS=200) loaded in Chromium, a fresh browser context (cold
  cache) per load, navigation start -> load event from the page's own Navigation Timing: median <= 1.5x direct;
- a 50 MB `/view` download (one connection, read in 1 MiB chunks): median throughput >= 0.8x direct;
- WebSocket round trips of the double's echo message (`comfyhub_double_echo`) on one socket per side: median added
  latency <= 2 ms.

The hub is real: nginx rendered by comfyhub/proxy.py on a free port, gunicorn (2 workers) on a unix socket behind it,
the private environment's database; the user owns the instance (no superuser shortcut).
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time

from . import docker_support
from .environment import BenchError, PrivateEnvironment, median, ms, percentile, run, save_result, verdict

NAME = "proxy"
TARGET = 1.5  # the page-load and /system_stats ratio; the others are named below
STATS_EXTRA_S = 0.002
DOWNLOAD_TARGET = 0.8
ECHO_ADDED_TARGET_S = 0.002
REQUESTS = int(os.environ.get("BENCH_PROXY_REQUESTS", "400"))
PAGE_LOADS = int(os.environ.get("BENCH_PROXY_PAGE_LOADS", "10"))
DOWNLOADS = 5
ASSETS = 200
DOWNLOAD_BYTES = 50 * 1000 * 1000
INSTANCE_ID = "bench-proxy"
USERNAME = "bench-owner"
CHROMIUM = "/usr/bin/chromium"
# As tests/conftest.py's browser_type_launch_args: Debian's Chromium, and root needs --no-sandbox.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


class _Quiet:
    def log(self, *args, **kwargs):
        pass

    progress = log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process, what: str, log_tail, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{what} did not start:\n{log_tail()}")
            time.sleep(0.05)


def main() -> int:
    nginx = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if nginx is None:
        raise BenchError("nginx is missing: `make bench` installs it (apt-get install nginx).")
    if not os.path.exists(CHROMIUM):
        raise BenchError("Chromium is missing: apt-get install chromium.")
    token = docker_support.run_token(NAME)
    engine, image = docker_support.client()
    extra_env = docker_support.extra_env(token, INSTANCE_PORT_RANGE="41900-41999")
    with PrivateEnvironment(NAME, extra_env=extra_env) as env:
        try:
            return _measure(env, nginx, image)
        finally:
            docker_support.clean_up(engine, NAME, token)


def _measure(env, nginx, image) -> int:
    env.setup_django()

    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client

    from comfyhub.proxy import nginx_command, write_private_config
    from instances import containers, services
    from storage_app import layout

    # The hub: gunicorn on a unix socket, nginx in front on a free port.
    gunicorn_socket = env.root / "gunicorn.sock"
    gunicorn = env.start_process("gunicorn", [
        sys.executable, "-m", "gunicorn", "comfyhub.wsgi:application", "--bind", f"unix:{gunicorn_socket}",
        "--workers", "2", "--log-level", "warning"])
    deadline = time.monotonic() + 30
    while not gunicorn_socket.exists():
        if gunicorn.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"gunicorn did not start:\n{env.log_tail('gunicorn')}")
        time.sleep(0.05)
    port = _free_port()
    prefix = env.root / "nginx"
    write_private_config(prefix, listen=f"127.0.0.1:{port}", django_upstream=f"unix:{gunicorn_socket}",
                         user="root" if os.geteuid() == 0 else None, server_names=["127.0.0.1"])
    checked = subprocess.run(nginx_command(nginx, prefix, test=True), capture_output=True, text=True)
    if checked.returncode != 0:
        raise BenchError(f"the rendered nginx configuration does not load:\n{checked.stderr}")
    proxy = env.start_process("nginx", nginx_command(nginx, prefix))
    _wait_for_port(port, proxy, "nginx", lambda: env.log_tail("nginx"))

    # The owner, logged in (a session like the login form's), and the instance, started.
    owner = get_user_model().objects.create_user(USERNAME, password="bench-owner-password-1")
    client = Client()
    client.force_login(owner)
    session = client.cookies[settings.SESSION_COOKIE_NAME].value
    cookie = f"{settings.SESSION_COOKIE_NAME}={session}"
    instance = services.instance_create(instance_id=INSTANCE_ID, image=image, owner=owner,
                                        extra_env={"COMFYUI_DOUBLE_ASSETS": str(ASSETS)})
    containers.start(instance, _Quiet())
    # What instance_start records before its job runs: the hub proxies only to an instance meant to be running.
    type(instance).objects.filter(pk=instance.pk).update(desired_state=type(instance).DesiredState.RUNNING)
    instance.refresh_from_db()
    output = layout.instance_dir(instance.instance_id) / "output"
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "bench-50mb.bin", "wb") as f:
        for _ in range(DOWNLOAD_BYTES // (1 << 20)):
            f.write(os.urandom(1 << 20))
        f.write(os.urandom(DOWNLOAD_BYTES % (1 << 20)))

    direct = {"port": instance.host_port, "prefix": "", "headers": {}}
    hub = {"port": port, "prefix": f"/i/{INSTANCE_ID}", "headers": {"Cookie": cookie}}
    sides = {"direct": direct, "hub": hub}
    _check_hub(hub, env)

    results = {
        "system_stats": _system_stats(sides),
        "page_load": _page_loads(sides, session, settings.SESSION_COOKIE_NAME),
        "download": _downloads(sides),
        "echo": _echoes(sides),
    }

    stats, page, download, echo = (results[k] for k in ("system_stats", "page_load", "download", "echo"))
    checks = []
    stats_limit = TARGET * median(stats["direct"]) + STATS_EXTRA_S
    checks.append(("GET /system_stats median", median(stats["hub"]) <= stats_limit))
    page_ratio = median(page["hub"]) / median(page["direct"])
    checks.append((f"frontend with {ASSETS} assets, load median", page_ratio <= TARGET))
    download_ratio = median(download["hub"]) / median(download["direct"])
    checks.append(("50 MB /view throughput", download_ratio >= DOWNLOAD_TARGET))
    echo_added = median(echo["hub"]) - median(echo["direct"])
    checks.append(("WebSocket echo added median latency", echo_added <= ECHO_ADDED_TARGET_S))

    print(f"{NAME}: instance '{INSTANCE_ID}' on {image}; hub = nginx 127.0.0.1:{port} /i/{INSTANCE_ID}/ -> "
          f"/_hub/auth (gunicorn, 2 workers; answers cached {settings.ACCESS_CACHE_SECONDS} s), logged-in session; "
          f"direct = 127.0.0.1:{instance.host_port}; {os.cpu_count()} CPUs (the download is CPU-bound: the hub adds a "
          "process that copies every byte)", flush=True)
    print(f"  GET /system_stats, {REQUESTS} each on one keep-alive connection: hub median "
          f"{ms(median(stats['hub']))} (p90 {ms(percentile(stats['hub'], 0.9))}) | baseline direct median "
          f"{ms(median(stats['direct']))} (p90 {ms(percentile(stats['direct'], 0.9))}) | ratio "
          f"{median(stats['hub']) / median(stats['direct']):.2f} (target <= {TARGET} x direct + "
          f"{STATS_EXTRA_S * 1000:g} ms = {ms(stats_limit)}) {verdict(checks[0][1])}")
    print(f"  frontend + {ASSETS} assets in Chromium, {PAGE_LOADS} cold loads each: hub median "
          f"{ms(median(page['hub']))} | baseline direct median {ms(median(page['direct']))} | ratio "
          f"{page_ratio:.2f} (target <= {TARGET}) {verdict(checks[1][1])}")
    mb = lambda values: f"{median(values) / 1e6:.0f} MB/s"  # noqa: E731
    print(f"  /view of {DOWNLOAD_BYTES / 1e6:.0f} MB, {DOWNLOADS} each: hub median {mb(download['hub'])} | baseline "
          f"direct median {mb(download['direct'])} | ratio {download_ratio:.2f} (target >= {DOWNLOAD_TARGET}) "
          f"{verdict(checks[2][1])}")
    print(f"  WebSocket echo round trip, {REQUESTS} each: hub median {ms(median(echo['hub']))} (p90 "
          f"{ms(percentile(echo['hub'], 0.9))}) | baseline direct median {ms(median(echo['direct']))} (p90 "
          f"{ms(percentile(echo['direct'], 0.9))}) | added {echo_added * 1000:.2f} ms (target <= "
          f"{ECHO_ADDED_TARGET_S * 1000:g} ms) {verdict(checks[3][1])}")
    ok = all(passed for _, passed in checks)
    print(f"{NAME}: " + "; ".join(f"{label} {verdict(passed)}" for label, passed in checks), flush=True)
    save_result(NAME, {"pass": ok, "checks": dict(checks), "requests": REQUESTS, "page_loads": PAGE_LOADS,
                       "downloads": DOWNLOADS, "access_cache_seconds": settings.ACCESS_CACHE_SECONDS,
                       "stats_limit_s": stats_limit, "page_ratio": page_ratio, "download_ratio": download_ratio,
                       "echo_added_s": echo_added, "samples": results})
    return 0 if ok else 1


def _get(connection: http.client.HTTPConnection, side: dict, path: str) -> bytes:
    connection.request("GET", side["prefix"] + path, headers=side["headers"])
    response = connection.getresponse()
    body = response.read()
    if response.status != 200:
        raise BenchError(f"GET {side['prefix']}{path} answered {response.status}: {body[:300]!r}")
    return body


def _check_hub(hub: dict, env) -> None:
    """The hub answers for the owner (and for nobody else): a wrong set-up is an error, not a slow result."""
    connection = http.client.HTTPConnection("127.0.0.1", hub["port"], timeout=30)
    try:
        _get(connection, hub, "/system_stats")
        connection.request("GET", hub["prefix"] + "/system_stats", headers={"Accept": "application/json"})
        anonymous = connection.getresponse()
        anonymous.read()
    except (OSError, BenchError) as exc:
        raise BenchError(f"the hub does not serve the instance: {exc}\nnginx: {env.log_tail('nginx')}\n"
                         f"gunicorn: {env.log_tail('gunicorn')}") from exc
    finally:
        connection.close()
    if anonymous.status != 401:
        raise BenchError(f"an anonymous request through the hub answered {anonymous.status}, not 401")


def _alternate(sides: dict, once, runs: int, warmup: int) -> dict[str, list[float]]:
    samples = {name: [] for name in sides}
    for number in range(warmup + runs):
        order = list(sides) if number % 2 == 0 else list(reversed(sides))
        for name in order:
            value = once(name)
            if number >= warmup:
                samples[name].append(value)
    return samples


def _system_stats(sides: dict) -> dict[str, list[float]]:
    connections = {name: http.client.HTTPConnection("127.0.0.1", side["port"], timeout=30)
                   for name, side in sides.items()}

    def once(name):
        started = time.perf_counter()
        _get(connections[name], sides[name], "/system_stats")
        return time.perf_counter() - started

    try:
        return _alternate(sides, once, REQUESTS, warmup=20)
    finally:
        for connection in connections.values():
            connection.close()


def _page_loads(sides: dict, session: str, cookie_name: str) -> dict[str, list[float]]:
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise BenchError(f"Playwright is missing ({exc}): `make bench` installs the test requirements.") from exc
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except PlaywrightError as exc:
            raise BenchError(f"Chromium did not start: {exc}") from exc
        try:
            def once(name):
                side = sides[name]
                context = browser.new_context()
                url = f"http://127.0.0.1:{side['port']}{side['prefix']}/"
                if side["headers"]:
                    context.add_cookies([{"name": cookie_name, "value": session, "url": url}])
                page = context.new_page()
                try:
                    page.goto(url, wait_until="load")
                    loaded = page.evaluate("() => { const n = performance.getEntriesByType('navigation')[0];"
                                           " return [n.loadEventEnd - n.startTime, window.comfyDoubleAssets || 0]; }")
                    page.wait_for_function("document.getElementById('ws-state').textContent === 'open'",
                                           timeout=10_000)
                finally:
                    context.close()
                took_ms, assets = loaded
                if assets != ASSETS:
                    raise BenchError(f"{name}: the page ran {assets} of its {ASSETS} assets")
                return took_ms / 1000

            return _alternate(sides, once, PAGE_LOADS, warmup=2)
        finally:
            browser.close()


def _downloads(sides: dict) -> dict[str, list[float]]:
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)

    def once(name):
        side = sides[name]
        connection = http.client.HTTPConnection("127.0.0.1", side["port"], timeout=60)
        try:
            started = time.perf_counter()
            connection.request("GET", side["prefix"] + "/view?filename=bench-50mb.bin&type=output",
                               headers=side["headers"])
            response = connection.getresponse()
            if response.status != 200:
                raise BenchError(f"{name}: /view answered {response.status}: {response.read(300)!r}")
            received = 0
            while count := response.readinto(view):
                received += count
            took = time.perf_counter() - started
        finally:
            connection.close()
        if received != DOWNLOAD_BYTES:
            raise BenchError(f"{name}: /view sent {received} bytes of {DOWNLOAD_BYTES}")
        return DOWNLOAD_BYTES / took

    return _alternate(sides, once, DOWNLOADS, warmup=1)


def _echoes(sides: dict) -> dict[str, list[float]]:
    from tests.support import ws

    sockets = {}
    try:
        for name, side in sides.items():
            sockets[name] = ws.connect(f"ws://127.0.0.1:{side['port']}{side['prefix']}/ws?clientId=bench-{name}",
                                       headers=side["headers"])
            greeting = sockets[name].receive_json(timeout=10)
            if greeting.get("type") != "status":
                raise BenchError(f"{name}: the WebSocket's first message was {greeting!r}, not the status")

        def once(name):
            socket_ = sockets[name]
            message = json.dumps({"type": "comfyhub_double_echo", "n": time.perf_counter_ns()})
            started = time.perf_counter()
            socket_.send_text(message)
            while socket_.receive_text(timeout=10) != message:
                pass  # a status broadcast in between
            return time.perf_counter() - started

        return _alternate(sides, once, REQUESTS, warmup=20)
    except ws.WebSocketError as exc:
        raise BenchError(f"the WebSocket failed: {exc}") from exc
    finally:
        for socket_ in sockets.values():
            socket_.close()


if __name__ == "__main__":
    sys.exit(run(main))
