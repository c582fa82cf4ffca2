"""A tiny HTTP/JSON client for the daemon's Unix socket (standard library only).

Used by the shim, which must start fast and small, and by `ctl`, whose
`status` must answer in well under a second including process start.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any

DEFAULT_SOCKET = "/run/boincd-containers/boincd.sock"


def socket_path() -> str:
    return os.environ.get("BOINCD_SOCKET") or DEFAULT_SOCKET


class DaemonUnreachable(Exception):
    """No daemon answers on the socket (not running, wrong path, no permission)."""


class DaemonError(Exception):
    """The daemon answered with an error object."""

    def __init__(self, status: int, code: str, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retryable = retryable


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class DaemonClient:
    def __init__(self, path: str | None = None, timeout: float = 30.0) -> None:
        self.path = path or socket_path()
        self.timeout = timeout
        self._conn: _UnixConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, url: str, body: Any = None, timeout: float | None = None) -> Any:
        """One JSON request; reconnects once on a dropped keep-alive connection."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = _UnixConnection(self.path, self.timeout)
            conn = self._conn
            conn.timeout = timeout or self.timeout
            if conn.sock is not None:
                conn.sock.settimeout(conn.timeout)
            try:
                conn.request(method, url, body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
                break
            except PermissionError as exc:
                self.close()
                raise DaemonUnreachable(
                    f"no permission to use the daemon socket {self.path}: {exc.strerror}"
                ) from None
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                self.close()
                raise DaemonUnreachable(
                    f"the daemon is not running (no answer on {self.path}: {exc.strerror})"
                ) from None
            except (http.client.HTTPException, OSError) as exc:
                self.close()
                if attempt == 2:
                    raise DaemonUnreachable(f"lost the daemon on {self.path}: {exc}") from None
        content_type = response.getheader("Content-Type", "")
        data: Any = json.loads(raw) if "json" in content_type and raw else raw.decode()
        if response.status >= 400:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            raise DaemonError(
                response.status,
                str(error.get("code", "http_error")),
                str(error.get("message", data)),
                bool(error.get("retryable", response.status >= 500)),
            )
        return data
