"""A small WebSocket client (RFC 6455, standard library) for tests and benchmarks: connect with extra headers and
cookies, send text, receive text with a timeout, close. Client frames are masked, as the protocol requires.

    with ws.connect("ws://127.0.0.1:8188/ws?clientId=abc", headers={"Origin": "http://127.0.0.1:8188"}) as socket:
        status = socket.receive_json(timeout=5)
        socket.send_text('{"type": "comfyhub_double_echo"}')

A handshake the server refuses (no 101) raises HandshakeError with the status, headers and body it answered.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket as _socket
import ssl
import time
import urllib.parse

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_HEADER_BYTES = 64 * 1024


class WebSocketError(Exception):
    """The connection or the protocol failed."""


class HandshakeError(WebSocketError):
    """The server answered the upgrade request with something other than 101 Switching Protocols."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(f"WebSocket handshake refused with HTTP {status}: {body[:200]!r}")
        self.status = status
        self.headers = headers
        self.body = body


class ConnectionClosed(WebSocketError):
    """The server closed the WebSocket (code and reason from its close frame; code None when it just went away)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"WebSocket closed by the server (code {code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


def mask(data: bytes, key: bytes) -> bytes:
    if not data:
        return data
    length = len(data)
    repeated = (key * (length // 4 + 1))[:length]
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(length, "little")


def connect(url: str, *, headers: dict[str, str] | None = None, cookies: dict[str, str] | None = None,
            timeout: float = 10) -> "WebSocket":
    """Open a WebSocket to a ws:// or wss:// URL. headers are sent with the upgrade request as given (Origin,
    Authorization, ...); cookies become one Cookie header."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket URL (ws:// or wss://): {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    host = parts.hostname or ""
    host_header = parts.netloc.rsplit("@", 1)[-1]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    sock = _socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        key = base64.b64encode(os.urandom(16)).decode()
        request = {"Host": host_header, "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": key,
                   "Sec-WebSocket-Version": "13"}
        if cookies:
            request["Cookie"] = "; ".join(f"{name}={value}" for name, value in cookies.items())
        for name, value in (headers or {}).items():
            request = {k: v for k, v in request.items() if k.lower() != name.lower()}
            request[name] = value
        lines = [f"GET {target} HTTP/1.1"] + [f"{name}: {value}" for name, value in request.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        connection = WebSocket(sock)
        status, response_headers = connection._read_response_head()
        if status != 101:
            body = connection._read_refusal_body(response_headers)
            raise HandshakeError(status, response_headers, body)
        expected = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        if response_headers.get("sec-websocket-accept") != expected:
            raise WebSocketError("the server's Sec-WebSocket-Accept does not match the key sent")
        return connection
    except BaseException:
        sock.close()
        raise


class WebSocket:
    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.closed = False

    def __enter__(self) -> "WebSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sending
    def send_text(self, text: str) -> None:
        self._send_frame(TEXT, text.encode())

    def send_json(self, message) -> None:
        self.send_text(json.dumps(message))

    def ping(self, payload: bytes = b"") -> None:
        self._send_frame(PING, payload)

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        length = len(payload)
        if length < 126:
            header = bytes((0x80 | opcode, 0x80 | length))
        elif length < 1 << 16:
            header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
        else:
            header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
        key = os.urandom(4)
        self.sock.sendall(header + key + mask(payload, key))

    # -- receiving
    def receive_text(self, timeout: float = 10) -> str:
        """The next text message; pings are answered and pongs skipped on the way. Raises TimeoutError when none
        comes in time, ConnectionClosed when the server closes."""
        deadline = time.monotonic() + timeout
        while True:
            opcode, payload = self.receive_message(deadline)
            if opcode == TEXT:
                return payload.decode()

    def receive_json(self, timeout: float = 10):
        return json.loads(self.receive_text(timeout))

    def receive_until(self, predicate, timeout: float = 10):
        """Receive JSON messages until predicate(message) is true; return that message."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive_json(max(deadline - time.monotonic(), 0.001))
            if predicate(message):
                return message

    def receive_message(self, deadline: float, *, pongs: bool = False) -> tuple[int, bytes]:
        """The next whole message as (opcode, payload) before deadline (time.monotonic()); pongs are skipped unless
        asked for."""
        opcode, parts = None, []
        while True:
            fin, frame_opcode, payload = self._read_frame(deadline)
            if frame_opcode == PING:
                self._send_frame(PONG, payload)
                continue
            if frame_opcode == PONG:
                if pongs:
                    return PONG, payload
                continue
            if frame_opcode == CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                if not self.closed:
                    self.closed = True
                    try:
                        self._send_frame(CLOSE, payload[:2])
                    except OSError:
                        pass
                raise ConnectionClosed(code, payload[2:].decode(errors="replace"))
            if frame_opcode != CONTINUATION:
                opcode = frame_opcode
            parts.append(payload)
            if fin:
                return opcode, b"".join(parts)

    def _read_frame(self, deadline: float) -> tuple[bool, int, bytes]:
        first, second = self._read(2, deadline)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(self._read(2, deadline), "big")
        elif length == 127:
            length = int.from_bytes(self._read(8, deadline), "big")
        key = self._read(4, deadline) if second & 0x80 else None
        payload = self._read(length, deadline)
        if key is not None:  # a server must not mask; accept it anyway, unmasked
            payload = mask(payload, key)
        return bool(first & 0x80), first & 0x0F, payload

    def _read(self, count: int, deadline: float) -> bytes:
        while len(self.buffer) < count:
            self._fill(deadline, count - len(self.buffer))
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def _fill(self, deadline: float, wanted: int = 1) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no WebSocket message in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(max(65536, wanted))
        except _socket.timeout:
            raise TimeoutError("no WebSocket message in time") from None
        if not chunk:
            self.closed = True
            raise ConnectionClosed(None, "the connection ended without a close frame")
        self.buffer += chunk

    # -- the handshake's answer
    def _read_response_head(self) -> tuple[int, dict[str, str]]:
        deadline = time.monotonic() + (self.sock.gettimeout() or 10)
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > MAX_HEADER_BYTES:
                raise WebSocketError("the server's answer has no end of headers")
            try:
                self._fill(deadline)
            except ConnectionClosed:
                raise WebSocketError(f"the server closed the connection during the handshake: {self.buffer[:200]!r}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        try:
            status = int(status_line.split(" ", 2)[1])
        except (IndexError, ValueError):
            raise WebSocketError(f"not an HTTP answer: {status_line!r}") from None
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def _read_refusal_body(self, headers: dict[str, str]) -> bytes:
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = 0
        try:
            return self._read(min(length, 1 << 20), time.monotonic() + 5) if length else b""
        except (TimeoutError, ConnectionClosed):
            return self.buffer

    # -- closing
    def close(self, code: int = 1000) -> None:
        """Send a close frame, wait briefly for the server's, and close the socket."""
        if not self.closed:
            self.closed = True
            try:
                self._send_frame(CLOSE, code.to_bytes(2, "big"))
                deadline = time.monotonic() + 2
                while True:
                    _fin, opcode, _payload = self._read_frame(deadline)
                    if opcode == CLOSE:
                        break
            except (OSError, TimeoutError, WebSocketError):
                pass
        self.sock.close()
