"""pytest plugin: `hub_proxy`, a real private nginx rendered by comfyhub/proxy.py in front of pytest-django's
`live_server` (session scope). Registered in pytest.ini (`-p tests.support.hubproxy`). Tests using it need
`live_server` and a transactional database, like the browser tests."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import processes

NGINX_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])


def find_nginx() -> str | None:
    return shutil.which("nginx", path=NGINX_SEARCH_PATH)


@dataclass
class HubProxy:
    url: str
    port: int
    prefix: Path

    def error_log(self) -> str:
        path = self.prefix / "logs" / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def hub_proxy(live_server, tmp_path_factory):
    from comfyhub.proxy import nginx_command, write_private_config

    nginx = find_nginx()
    if nginx is None:
        raise RuntimeError("nginx is missing: `make test` installs it (apt-get install nginx).")
    prefix = tmp_path_factory.mktemp("hub-nginx")
    port = _free_port()
    host, live_port = live_server.thread.host, live_server.thread.port
    upstream = f"{'127.0.0.1' if host == 'localhost' else host}:{live_port}"
    # As root nginx's workers would become "nobody", who cannot enter pytest's private temporary folders.
    write_private_config(prefix, listen=f"127.0.0.1:{port}", django_upstream=upstream,
                         user="root" if os.geteuid() == 0 else None, server_names=["127.0.0.1", "localhost"],
                         cache=True)
    checked = subprocess.run(nginx_command(nginx, prefix, test=True), capture_output=True, text=True)
    if checked.returncode != 0:
        raise RuntimeError(f"the rendered nginx configuration does not load:\n{checked.stderr}")
    process = subprocess.Popen(nginx_command(nginx, prefix), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    processes.wait_until_listening(process, port, "nginx", lambda: process.stderr.read().decode(errors="replace"))
    try:
        yield HubProxy(url=f"http://127.0.0.1:{port}", port=port, prefix=prefix)
    finally:
        processes.stop(process)
