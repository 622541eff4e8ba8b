"""The ComfyUI client (instances/comfyui_api.py) against the ComfyUI test double run as a process on the loopback
addresses (IPv4 and, where the machine has it, IPv6), and against servers that misbehave: one that accepts and never
answers, one that trickles, one that answers too much, one that redirects. Then its three callers: the health probe,
the node types a workflow check uses, and the library visibility check."""
import http.server
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from instances import health, services
from instances.comfyui_api import ComfyUI, ComfyUIError, Queue, base_url
from instances.models import Instance
from storage_app import services as storage_services

DOUBLE = Path(__file__).resolve().parent / "comfyui_double" / "server.py"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback")
LOOPBACKS = ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)]


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class Double:
    """The ComfyUI test double as a process listening on `host`."""

    def __init__(self, host: str, base: Path):
        self.host, self.port, self.base = host, free_port(host), base
        (base / "models" / "checkpoints").mkdir(parents=True)
        (base / "models" / "checkpoints" / "sd15.safetensors").write_bytes(b"")
        self.process = subprocess.Popen(
            [sys.executable, str(DOUBLE), "--listen", host, "--port", str(self.port), "--base-directory", str(base),
             "--cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while True:
            try:
                ComfyUI(host, self.port).system_stats(timeout=1)
                return
            except ComfyUIError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"the double did not answer on {host}: {self.process.stderr.read()!r}")
                time.sleep(0.05)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process.stderr.close()


@pytest.fixture
def double_on(tmp_path):
    started = []

    def start(host: str) -> Double:
        started.append(Double(host, tmp_path / f"double-{len(started)}"))
        return started[-1]

    yield start
    for double in started:
        if double.process.poll() is None:
            double.stop()


@pytest.fixture
def misbehaving_server():
    """An HTTP server on 127.0.0.1 whose every GET is answered by `respond(handler)`; returns its port."""
    servers = []

    def serve(respond) -> int:
        handler = type("Handler", (http.server.BaseHTTPRequestHandler,),
                       {"do_GET": respond, "log_message": lambda *args: None})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


# --- The client ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", LOOPBACKS)
def test_it_reads_what_comfyui_says_on_ipv4_and_ipv6(double_on, host):
    double = double_on(host)
    comfyui = ComfyUI(host, double.port)

    assert comfyui.system_stats()["system"]["comfyui_version"] == "0.0.0-testdouble"
    assert {"KSampler", "CheckpointLoaderSimple"} <= set(comfyui.object_info())
    assert comfyui.models("checkpoints") == ["sd15.safetensors"]
    assert comfyui.queue() == Queue(running=0, pending=0) and comfyui.queue().empty


def test_an_ipv6_address_is_written_in_brackets():
    assert base_url("::1", 8188) == "http://[::1]:8188"
    assert base_url("[::1]", 8188) == "http://[::1]:8188"
    assert base_url("fe80::1%eth0", 8188) == "http://[fe80::1%25eth0]:8188"
    assert base_url("127.0.0.1", 8188) == "http://127.0.0.1:8188"
    assert base_url("gpu-box.lan", 8188) == "http://gpu-box.lan:8188"


def test_a_folder_comfyui_does_not_have_is_a_404_the_caller_can_tell_apart(double_on):
    double = double_on("127.0.0.1")
    with pytest.raises(ComfyUIError) as raised:
        ComfyUI("127.0.0.1", double.port).models("no_such_folder")
    assert raised.value.status_code == 404
    assert str(raised.value) == (f"ComfyUI at http://127.0.0.1:{double.port} answered GET /models/no_such_folder "
                                 "with HTTP 404.")
    # A folder name is one path segment: it cannot reach another route.
    with pytest.raises(ComfyUIError) as raised:
        ComfyUI("127.0.0.1", double.port).models("../system_stats")
    assert raised.value.status_code == 404


def test_a_port_nobody_listens_on_is_refused_in_words():
    port = free_port("127.0.0.1")
    with pytest.raises(ComfyUIError) as raised:
        ComfyUI("127.0.0.1", port).system_stats()
    assert raised.value.status_code is None
    assert str(raised.value) == (f"ComfyUI at http://127.0.0.1:{port} does not answer GET /system_stats "
                                 "(connection refused); check that the instance runs.")


def test_it_gives_up_on_a_server_that_accepts_but_never_answers():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # the kernel completes the handshake; nobody ever reads or writes
        port = silent.getsockname()[1]
        began = time.monotonic()
        with pytest.raises(ComfyUIError) as raised:
            ComfyUI("127.0.0.1", port).system_stats(timeout=0.5)
        assert time.monotonic() - began < 3
    assert str(raised.value) == (f"ComfyUI at http://127.0.0.1:{port} did not answer GET /system_stats within "
                                 "0.5 s; check that the instance runs and its logs.")


def test_an_answer_that_trickles_in_is_cut_off_at_the_timeout(misbehaving_server):
    def trickle(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        for _ in range(1000):
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0.05)

    port = misbehaving_server(trickle)
    began = time.monotonic()
    with pytest.raises(ComfyUIError, match="did not answer GET /system_stats within 0.5 s"):
        ComfyUI("127.0.0.1", port).system_stats(timeout=0.5)
    assert time.monotonic() - began < 3


def test_it_reads_at_most_64_mib_of_object_info(misbehaving_server):
    def endless(handler):
        handler.send_response(200)
        handler.end_headers()
        chunk = b'{"a": 1, ' * 8192
        try:
            while True:
                handler.wfile.write(chunk)
        except OSError:
            pass  # the client hung up, as it should

    port = misbehaving_server(endless)
    with pytest.raises(ComfyUIError) as raised:
        ComfyUI("127.0.0.1", port).object_info()
    assert str(raised.value) == (f"ComfyUI at http://127.0.0.1:{port} answered GET /object_info with more than "
                                 "64 MiB; ComfyHub reads at most that much.")


def test_it_reads_at_most_16_mib_of_queue(misbehaving_server):
    def endless(handler):
        handler.send_response(200)
        handler.end_headers()
        try:
            handler.wfile.write(b'{"queue_running": [], "queue_pending": [')
            while True:
                handler.wfile.write(b'[1, "id", {}, {}, []], ' * 4096)
        except OSError:
            pass

    port = misbehaving_server(endless)
    with pytest.raises(ComfyUIError) as raised:
        ComfyUI("127.0.0.1", port).queue()
    assert str(raised.value) == (f"ComfyUI at http://127.0.0.1:{port} answered GET /queue with more than "
                                 "16 MiB; ComfyHub reads at most that much.")


def test_the_queue_counts_what_runs_and_what_waits(misbehaving_server):
    body = (b'{"queue_running": [[0, "a", {}, {}, ["9"]]], '
            b'"queue_pending": [[1, "b", {}, {}, ["9"]], [2, "c", {}, {}, ["9"]]]}')

    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    queue = ComfyUI("127.0.0.1", misbehaving_server(answer)).queue()
    assert (queue.running, queue.pending, queue.empty) == (1, 2, False)


def test_it_does_not_follow_a_redirect(misbehaving_server):
    target = misbehaving_server(lambda handler: pytest.fail("the redirect was followed"))

    def redirect(handler):
        handler.send_response(302)
        handler.send_header("Location", f"http://127.0.0.1:{target}/system_stats")
        handler.end_headers()

    port = misbehaving_server(redirect)
    with pytest.raises(ComfyUIError) as raised:
        ComfyUI("127.0.0.1", port).system_stats()
    assert raised.value.status_code == 302


@pytest.mark.parametrize("path, body, message", [
    ("/system_stats", b"<html>", "answered GET /system_stats with something that is not JSON"),
    ("/system_stats", b"[1, 2]", "answered GET /system_stats with a JSON list, not a JSON object"),
    ("/object_info", b'"KSampler"', "answered GET /object_info with a JSON str, not a JSON object"),
    ("/models/loras", b'{"a": 1}', "answered GET /models/loras with a JSON dict, not a list"),
    ("/models/loras", b'["a.safetensors", 3]', "answered GET /models/loras with something other than a list of "
                                                "file names"),
    ("/queue", b'[]', "answered GET /queue with a JSON list, not a JSON object"),
    ("/queue", b'{"queue_running": 2, "queue_pending": []}', "answered GET /queue without the lists queue_running "
                                                             "and queue_pending"),
])
def test_an_answer_of_the_wrong_shape_is_an_error_not_a_crash_later(misbehaving_server, path, body, message):
    def answer(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    comfyui = ComfyUI("127.0.0.1", misbehaving_server(answer))
    call = {"/system_stats": comfyui.system_stats, "/object_info": comfyui.object_info,
            "/models/loras": lambda: comfyui.models("loras"), "/queue": comfyui.queue}[path]
    with pytest.raises(ComfyUIError, match=message):
        call()


# --- Its callers --------------------------------------------------------------------------------------------------

def instance_served_by(port: int, bind_address: str = "127.0.0.1") -> Instance:
    """An instance whose node publishes on `bind_address` and whose host port is `port`."""
    instance = services.instance_create(instance_id="probed", image="")
    instance.node.bind_address = bind_address
    instance.node.save()
    Instance.objects.filter(pk=instance.pk).update(host_port=port)
    return Instance.objects.select_related("node").get(pk=instance.pk)


@pytest.mark.django_db
@pytest.mark.parametrize("bind_address, host", [("0.0.0.0", "127.0.0.1"), pytest.param("::", "::1", marks=needs_ipv6)])
def test_the_health_probe_reaches_an_instance_published_on_every_address(double_on, bind_address, host):
    double = double_on(host)
    instance = instance_served_by(double.port, bind_address)
    assert health.system_stats(instance)["devices"][0]["type"] == "cpu"
    assert health.queue_of(instance) == {"running": 0, "pending": 0}
    double.stop()
    assert health.system_stats(instance) is None
    assert health.queue_of(instance) is None


@pytest.mark.django_db
def test_node_types_come_from_the_running_instance_and_are_remembered_for_when_it_stops(double_on):
    double = double_on("127.0.0.1")
    instance = instance_served_by(double.port)
    live = services.node_types_of(instance)
    assert "KSampler" in live
    instance.refresh_from_db()
    assert set(instance.node_types) == live

    double.stop()
    assert services.node_types_of(instance) == live


@pytest.mark.django_db
def test_library_visibility_compares_what_comfyui_lists_and_says_when_it_does_not_answer(double_on):
    double = double_on("127.0.0.1")
    instance = instance_served_by(double.port)
    # The double lists sd15.safetensors, which the library does not know.
    assert storage_services.library_visibility(instance) == {
        "reachable": True, "unseen_verified": [],
        "folders": {"checkpoints": {"missing": [], "extra": ["sd15.safetensors"]}}}

    double.stop()
    assert storage_services.library_visibility(instance) == {
        "reachable": False,
        "error": f"ComfyUI at http://127.0.0.1:{double.port} does not answer GET /models/checkpoints "
                 "(connection refused); check that the instance runs."}


@pytest.mark.django_db
def test_library_visibility_skips_a_folder_comfyui_has_not_and_stops_at_an_error(misbehaving_server):
    def older_comfyui(handler):
        status, body = {"/models/checkpoints": (200, b'["sd15.safetensors"]'),
                        "/models/vae": (500, b"")}.get(handler.path, (404, b""))
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    port = misbehaving_server(older_comfyui)
    instance = instance_served_by(port)
    assert storage_services.library_visibility(instance) == {
        "reachable": False, "error": f"ComfyUI at http://127.0.0.1:{port} answered GET /models/vae with HTTP 500."}

    def without_vae(handler):
        handler.path = handler.path.replace("/models/vae", "/models/none")
        older_comfyui(handler)

    Instance.objects.filter(pk=instance.pk).update(host_port=misbehaving_server(without_vae))
    instance.refresh_from_db()
    assert storage_services.library_visibility(instance) == {
        "reachable": True, "unseen_verified": [],
        "folders": {"checkpoints": {"missing": [], "extra": ["sd15.safetensors"]}}}


@pytest.mark.parametrize("bind_address, url", [
    ("127.0.0.1", "http://127.0.0.1:8190/"),
    ("::1", "http://[::1]:8190/"),
    ("0.0.0.0", "http://localhost:8190/"),
    ("::", "http://localhost:8190/"),
])
def test_the_open_link_of_an_instance_brackets_an_ipv6_address(db, bind_address, url):
    assert instance_served_by(8190, bind_address).url == url
