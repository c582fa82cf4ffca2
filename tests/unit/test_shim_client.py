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


def _sent(sock_path: Path, url: str, answer: bytes | None = None) -> bytes:
    server = Scripted(sock_path, [[answer or json_answer(b"{}")]])
    client = DaemonClient(str(sock_path), timeout=5)
    try:
        client.request("GET", url)
    finally:
        client.close()
        server.close()
        sock_path.unlink()
    return server.requests[0].split(b"\r\n", 1)[0]


def test_a_non_ascii_result_name_is_percent_encoded(sock_path: Path) -> None:
    # The shim crashed here: the request line was encoded as latin-1.
    line = _sent(sock_path, "/v1/tasks/wu_\u00e9t\u00e9_\u7ed3_0")
    assert line == b"GET /v1/tasks/wu_%C3%A9t%C3%A9_%E7%BB%93_0 HTTP/1.1"


def test_nothing_in_a_name_can_break_the_request_line(sock_path: Path) -> None:
    line = _sent(sock_path, "/v1/tasks/a b\r\nX-Evil: 1\r\n#%\ud800/wait?timeout=0.1")
    assert line == (
        b"GET /v1/tasks/a%20b%0D%0AX-Evil:%201%0D%0A%23%25%ED%A0%80/wait?timeout=0.1 HTTP/1.1"
    )


def test_plain_urls_are_sent_as_they_are(sock_path: Path) -> None:
    url = "/v1/tasks/c;x_0-1.2~3/logs?tail=200&x=y"
    assert _sent(sock_path, url) == f"GET {url} HTTP/1.1".encode()


def test_an_answer_that_is_not_json_is_not_a_crash(sock_path: Path) -> None:
    with pytest.raises(DaemonUnreachable, match="unreadable answer"):
        _sent(sock_path, "/v1/status", json_answer(b"{not json"))
    with pytest.raises(DaemonUnreachable, match="unreadable answer"):
        _sent(
            sock_path,
            "/v1/status",
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n\xff\xfe",
        )


def test_an_error_that_is_not_an_object_is_still_a_daemon_error(sock_path: Path) -> None:
    with pytest.raises(DaemonError, match="boom") as info:
        _sent(sock_path, "/v1/status", json_answer(b'{"error": "boom"}', status="500 Oops"))
    assert info.value.retryable
