"""A tiny HTTP/JSON client for the daemon's Unix socket (standard library only).

Used by the shim, which must start fast and small, and by `ctl`, whose
`status` must answer in well under a second including process start. It speaks
just enough HTTP/1.1 itself: http.client would pull in ssl and email, about
18 ms and 7 MB at every start of every shim.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, BinaryIO

DEFAULT_SOCKET = "/run/boincd-containers/boincd.sock"
_MAX_HEADER_LINES = 100
# What may stand as itself in a request target (RFC 3986 unreserved, sub-delims,
# ':', '@', and '/' and '?' as the separators they are in the caller's URL).
_TARGET_SAFE = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?"
)
_HEX = "0123456789ABCDEF"


def socket_path() -> str:
    return os.environ.get("BOINCD_SOCKET") or DEFAULT_SOCKET


class DaemonUnreachable(Exception):
    """No daemon answers on the socket (not running, wrong path, no permission)."""

    def __init__(self, message: str, *, permission_denied: bool = False) -> None:
        super().__init__(message)
        self.permission_denied = permission_denied


class DaemonError(Exception):
    """The daemon answered with an error object."""

    def __init__(self, status: int, code: str, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retryable = retryable


class ProtocolError(OSError):
    """The peer's answer is not the HTTP we expect (or the connection dropped)."""


def request_target(url: str) -> str:
    """``url`` as an HTTP request target: every other byte percent-encoded, as UTF-8.

    The URL is raw text (callers format names into it as they are): a result
    name with a space, a '%', a '#' or a non-ASCII letter reaches the daemon as
    that name, and nothing in it can break the request line. A '/' or '?' in a
    name would still read as a separator; the shim refuses such names.
    """
    data = url.encode("utf-8", errors="surrogatepass")
    if all(b in _TARGET_SAFE for b in data):
        return url
    return "".join(chr(b) if b in _TARGET_SAFE else f"%{_HEX[b >> 4]}{_HEX[b & 15]}" for b in data)


def _read_response(reader: BinaryIO) -> tuple[int, dict[str, str], bytes, bool]:
    """Status, headers (lower-case names), body, and whether to keep the connection."""
    status_line = reader.readline(65537)
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise ProtocolError(f"unexpected answer {status_line[:80]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADER_LINES):
        line = reader.readline(65537)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(reader.readline(1024).split(b";")[0], 16)
            if size == 0:
                reader.readline(1024)
                break
            chunks.append(reader.read(size))
            reader.readline(1024)
        body = b"".join(chunks)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        body = reader.read(length)
        if len(body) != length:
            raise ProtocolError("the connection closed mid-answer")
    else:
        body = reader.read()  # HTTP/1.0 style: until the peer closes
        headers["connection"] = "close"
    keep = headers.get("connection", "").lower() != "close"
    return status, headers, body, keep


class DaemonClient:
    def __init__(self, path: str | None = None, timeout: float = 30.0) -> None:
        self.path = path or socket_path()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader: BinaryIO | None = None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self, timeout: float) -> tuple[socket.socket, BinaryIO]:
        if self._sock is None or self._reader is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            self._sock, self._reader = sock, sock.makefile("rb")
        self._sock.settimeout(timeout)
        return self._sock, self._reader

    def request(self, method: str, url: str, body: Any = None, timeout: float | None = None) -> Any:
        """One JSON request; reconnects once on a dropped keep-alive connection."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {request_target(url)} HTTP/1.1\r\n"
            f"Host: localhost\r\nContent-Length: {len(payload)}\r\n"
        )
        if body is not None:
            head += "Content-Type: application/json\r\n"
        message = (head + "\r\n").encode("latin-1") + payload
        for attempt in (1, 2):
            reused = self._sock is not None
            try:
                sock, reader = self._connect(timeout or self.timeout)
                sock.sendall(message)
                status, headers, raw, keep = _read_response(reader)
                break
            except PermissionError as exc:
                self.close()
                raise DaemonUnreachable(
                    f"no permission to use the daemon socket {self.path}: {exc.strerror}",
                    permission_denied=True,
                ) from None
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                self.close()
                raise DaemonUnreachable(
                    f"the daemon is not running (no answer on {self.path}: {exc.strerror})"
                ) from None
            except (OSError, ValueError) as exc:
                self.close()
                # A kept-alive connection the daemon closed meanwhile: one retry.
                if attempt == 2 or not reused:
                    raise DaemonUnreachable(f"lost the daemon on {self.path}: {exc}") from None
        if not keep:
            self.close()
        content_type = headers.get("content-type", "")
        try:
            data: Any = json.loads(raw) if "json" in content_type and raw else raw.decode("utf-8")
        except ValueError as exc:  # JSON or UTF-8 that does not decode
            raise DaemonUnreachable(f"unreadable answer from {self.path}: {exc}") from None
        if status >= 400:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            if not isinstance(error, dict):
                error = {"message": str(error)}
            raise DaemonError(
                status,
                str(error.get("code", "http_error")),
                str(error.get("message", data)),
                bool(error.get("retryable", status >= 500)),
            )
        return data
