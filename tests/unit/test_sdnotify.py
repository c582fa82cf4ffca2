"""sd_notify client against a real datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincd_containers.daemon import sdnotify


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    # mkdtemp, not tmp_path: AF_UNIX paths are limited to ~107 bytes and pytest's
    # tmp_path can be long.
    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        path = str(Path(d) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        try:
            yield sock
        finally:
            sock.close()


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_ready_watchdog_stopping_are_received(manager: socket.socket) -> None:
    assert sdnotify.ready()
    assert _recv(manager) == "READY=1"
    assert sdnotify.watchdog()
    assert _recv(manager) == "WATCHDOG=1"
    assert sdnotify.stopping()
    assert _recv(manager) == "STOPPING=1"


def test_status_is_one_line(manager: socket.socket) -> None:
    assert sdnotify.status("2 tasks\nrunning")
    assert _recv(manager) == "STATUS=2 tasks running"
    assert sdnotify.ready("serving")
    assert _recv(manager) == "READY=1\nSTATUS=serving"


@pytest.mark.skipif(sys.platform != "linux", reason="abstract sockets are Linux-only")
def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"boincd-test-{os.getpid()}-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert _recv(sock) == "READY=1"


def test_no_socket_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready()
    assert not sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"})


def test_unreachable_socket_returns_false(tmp_path: Path) -> None:
    assert not sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "absent")})


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": pid}) == 0.5
    # Meant for another process (e.g. our parent): not ours to ping.
    assert (
        sdnotify.watchdog_interval(
            {"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid() + 1)}
        )
        is None
    )
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
