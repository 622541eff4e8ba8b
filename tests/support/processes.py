"""Servers the tests start as processes of their own (nginx, Caddy): wait until one listens, stop it."""
from __future__ import annotations

import socket
import subprocess
import time


def wait_until_listening(process: subprocess.Popen, port: int, what: str, output, timeout: float = 15) -> None:
    """Return once something accepts connections on 127.0.0.1:`port`; if `process` exits or `timeout` passes first,
    kill it and raise with `output()` (what it printed) in the message."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{what} did not start:\n{output()}") from None
            time.sleep(0.05)


def stop(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
