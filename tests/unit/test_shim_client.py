"""The shim's own HTTP/1.1 client against a scripted server on a real Unix socket."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from boincd_containers.shim.client import DaemonClient, DaemonError, DaemonUnreachable


class Scripted:
    """Answers each connection's requests with the next canned responses."""

    def __init__(self, path: Path, answers: list[list[bytes]]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.answers = answers
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for per_connection in self.answers:
            conn, _ = self.sock.accept()
            with conn:
                for answer in per_connection:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    head, _, rest = data.partition(b"\r\n\r\n")
                    length = int(
                        next(
                            (
                                line.split(b":")[1]
                                for line in head.split(b"\r\n")
                                if line.lower().startswith(b"content-length")
                            ),
                            b"0",
                        )
                    )
                    while len(rest) < length:
                        rest += conn.recv(65536)
                    self.requests.append(head + b"\r\n\r\n" + rest)
                    conn.sendall(answer)

    def close(self) -> None:
        self.sock.close()


def json_answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


@pytest.fixture
def sock_path(short_tmp: Path) -> Path:
    return short_tmp / "s.sock"


def test_json_round_trip_on_one_kept_alive_connection(sock_path: Path) -> None:
    server = Scripted(sock_path, [[json_answer(b'{"a": 1}'), json_answer(b'{"b": 2}')]])
    client = DaemonClient(str(sock_path), timeout=5)
    try:
        assert client.request("POST", "/v1/x", {"k": "v"}) == {"a": 1}
        assert client.request("GET", "/v1/y") == {"b": 2}
    finally:
        client.close()
        server.close()
    first, second = server.requests
    assert first.startswith(b"POST /v1/x HTTP/1.1\r\n")
    assert first.endswith(b'{"k": "v"}')
    assert b"Content-Type: application/json" in first
    assert second.startswith(b"GET /v1/y HTTP/1.1\r\n")


def test_chunked_bodies_and_error_objects(sock_path: Path) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    error = json_answer(
        b'{"error": {"code": "busy", "message": "GPU taken", "retryable": true}}',
        status="409 Conflict",
    )
    server = Scripted(sock_path, [[chunked, error]])
    client = DaemonClient(str(sock_path), timeout=5)
    try:
        assert client.request("GET", "/logs") == "hello world"
        with pytest.raises(DaemonError) as info:
            client.request("POST", "/v1/tasks", {})
    finally:
        client.close()
        server.close()
    assert (info.value.status, info.value.code, info.value.retryable) == (409, "busy", True)
    assert info.value.message == "GPU taken"


def test_a_connection_the_daemon_closed_is_reopened_once(sock_path: Path) -> None:
    # The server answers the first request with "Connection: close" semantics
    # missing, then drops the connection: the client must notice and reconnect.
    server = Scripted(sock_path, [[json_answer(b"{}")], [json_answer(b'{"again": true}')]])
    client = DaemonClient(str(sock_path), timeout=5)
    try:
        assert client.request("GET", "/a") == {}
        assert client.request("GET", "/b") == {"again": True}
    finally:
        client.close()
        server.close()


def test_no_daemon_is_said_clearly(sock_path: Path) -> None:
    # (EACCES, exit 4 of ctl, is tested as uid nobody in tests/engine/test_ctl_real.py.)
    with pytest.raises(DaemonUnreachable, match="not running") as missing:
        DaemonClient(str(sock_path), timeout=2).request("GET", "/v1/status")
    assert missing.value.permission_denied is False
