"""`manage.py serve` (what `make run` runs): everything starts, a first login is printed once, Ctrl-C stops it all."""
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import REPO, descendants, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    def __init__(self, data_dir, port, extra_env=None):
        env = {k: v for k, v in os.environ.items()
               if k not in ("REDIS_URL", "DATABASE_URL", "DJANGO_SUPERUSER_PASSWORD", "DJANGO_SUPERUSER_USERNAME")}
        env.update({"COMFYHUB_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", **(extra_env or {})})
        self.output = data_dir.parent / f"serve-{port}.out"
        self.port = port
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
            cwd=REPO, env=env, stdout=open(self.output, "wb"), stderr=subprocess.STDOUT,
        )

    def text(self):
        return self.output.read_text(errors="replace")

    def wait_until_running(self):
        wait_for(lambda: "ComfyHub is running" in self.text() or self.process.poll() is not None, timeout=90,
                 message="serve to start")
        assert self.process.poll() is None, self.text()
        wait_for(self._answers, timeout=30, message="the web server")
        return self

    def _answers(self):
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/login/", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    def interrupt(self):
        children = descendants(self.process.pid)
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=60)
        return children


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = open(f"/proc/{pid}/stat").read()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def log_in(port, username, password):
    session = requests.Session()
    base = f"http://127.0.0.1:{port}"
    session.get(f"{base}/login/", timeout=20)
    response = session.post(
        f"{base}/login/", data={"username": username, "password": password,
                                "csrfmiddlewaretoken": session.cookies["csrftoken"]},
        headers={"Referer": f"{base}/login/"}, timeout=20,
    )
    return session, response


def login_status_with_scheme_headers(port, username, password, headers) -> int:
    """A login POST without Referer, with a client's own scheme headers: Django's CSRF check wants a Referer only for
    what it takes for https, so a 403 means a client's claim of https was believed."""
    session = requests.Session()
    base = f"http://127.0.0.1:{port}"
    session.get(f"{base}/login/", timeout=20)
    return session.post(f"{base}/login/", data={"username": username, "password": password,
                                                "csrfmiddlewaretoken": session.cookies["csrftoken"]},
                        headers=headers, allow_redirects=False, timeout=20).status_code


SCHEME_CLAIMS = [{"X-Forwarded-Proto": "https"}, {"X-Forwarded-Ssl": "on"}, {"X-Forwarded-Protocol": "ssl"},
                 {"X-Forwarded-Proto": "https", "X-Forwarded-Ssl": "on"}]


def test_it_runs_everything_prints_a_first_login_once_and_stops_it_all_on_ctrl_c(tmp_path):
    data_dir = tmp_path / "var"
    port = free_port()
    serve = Serve(data_dir, port).wait_until_running()
    try:
        match = re.search(r"Log in as 'admin' with password: (\S+)", serve.text())
        assert match, serve.text()
        assert f"http://localhost:{port}/" in serve.text()
        session, response = log_in(port, "admin", match.group(1))
        assert response.url.endswith("/") and "Dashboard" in response.text
        # The local Redis and a worker with the scheduler are up: the dashboard sees the worker.
        wait_for(lambda: "none</span>" not in session.get(f"http://127.0.0.1:{port}/", timeout=20).text.split(
            "Latest operations")[0], timeout=30, message="a worker on every queue")
        assert (data_dir / "redis.sock").exists()
        # nginx is in front (gunicorn on a socket of its own): it keeps the access check to itself and asks it
        # before any instance.
        assert (data_dir / "nginx" / "gunicorn.sock").exists()
        assert "Instances open at /i/<instance-id>/ through nginx" in serve.text()
        assert requests.get(f"http://127.0.0.1:{port}/_hub/auth", timeout=20).status_code == 404
        anonymous = requests.get(f"http://127.0.0.1:{port}/i/comfy/system_stats", timeout=20)
        assert anonymous.status_code == 401 and "Log in" in anonymous.json()["error"]
        raw = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        raw.request("GET", "/i/../login/")  # as written: requests would resolve the dot segment itself
        assert raw.getresponse().status == 400
        raw.close()
        # SECURE_PROXY_SSL_HEADER is off: a client saying https (to nginx, and through it to gunicorn) is not believed.
        for claim in SCHEME_CLAIMS:
            assert login_status_with_scheme_headers(port, "admin", match.group(1), claim) == 302, claim
    finally:
        children = serve.interrupt()
    assert serve.process.returncode == 0, serve.text()
    assert "ComfyHub stopped." in serve.text()
    assert children and not [pid for pid in children if alive(pid)]
    assert not (data_dir / "redis.sock").exists()
    assert not (data_dir / "nginx" / "gunicorn.sock").exists()

    second = Serve(data_dir, free_port()).wait_until_running()
    try:
        assert "with password:" not in second.text()
        assert "Log in with your existing superuser account." in second.text()
    finally:
        second.interrupt()


def test_it_takes_the_first_superuser_from_the_environment(tmp_path):
    port = free_port()
    serve = Serve(tmp_path / "var", port, {"DJANGO_SUPERUSER_USERNAME": "root-of-all",
                                           "DJANGO_SUPERUSER_PASSWORD": "a-long-password-42"}).wait_until_running()
    try:
        assert "with password:" not in serve.text()
        _, response = log_in(port, "root-of-all", "a-long-password-42")
        assert "Dashboard" in response.text
    finally:
        serve.interrupt()


def test_it_says_when_the_given_redis_does_not_answer_but_still_serves_pages(tmp_path):
    port = free_port()
    serve = Serve(tmp_path / "var", port, {"REDIS_URL": "unix:///nonexistent/redis.sock?db=0",
                                           "DJANGO_SUPERUSER_PASSWORD": "a-long-password-42"}).wait_until_running()
    try:
        assert "does not answer" in serve.text()
        session, response = log_in(port, "admin", "a-long-password-42")
        assert "The job queue is unavailable" in response.text
    finally:
        serve.interrupt()


def test_without_nginx_gunicorn_alone_serves_the_bind_address_and_i_says_why_instances_do_not_open(tmp_path):
    port = free_port()
    serve = Serve(tmp_path / "var", port, {"COMFYHUB_NGINX": "false",
                                           "DJANGO_SUPERUSER_PASSWORD": "a-long-password-42"}).wait_until_running()
    try:
        assert "COMFYHUB_NGINX=false" in serve.text()
        assert not (tmp_path / "var" / "nginx").exists()
        # Django answers what nginx would have kept: its own access check, and /i/<id>/ as a page saying why.
        assert requests.get(f"http://127.0.0.1:{port}/_hub/auth", timeout=20).status_code == 401
        session, _ = log_in(port, "admin", "a-long-password-42")
        page = session.get(f"http://127.0.0.1:{port}/i/comfy/", timeout=20)
        assert page.status_code == 503 and "make run" in page.text and "not in front" in page.text
        # gunicorn alone, asked from 127.0.0.1: it does not take a client's scheme headers either.
        for claim in SCHEME_CLAIMS:
            assert login_status_with_scheme_headers(port, "admin", "a-long-password-42", claim) == 302, claim
    finally:
        serve.interrupt()
