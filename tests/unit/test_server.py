"""The daemon's socket: created safely, never stolen from a live daemon."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from boincd_containers.errors import BoincdError
from boincd_containers.server import SocketInUse, prepare_socket_path, secure_socket


def test_parent_dir_is_created(short_tmp: Path) -> None:
    path = short_tmp / "run" / "deeper" / "boincd.sock"
    prepare_socket_path(path)
    assert path.parent.is_dir()
    assert not path.exists()


def test_a_stale_socket_is_removed(short_tmp: Path) -> None:
    path = short_tmp / "boincd.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # a daemon that died without cleaning up leaves this behind
    assert path.is_socket()
    prepare_socket_path(path)
    assert not path.exists()


def test_a_live_daemon_socket_is_never_replaced(short_tmp: Path) -> None:
    path = short_tmp / "boincd.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(SocketInUse, match="already serving"):
            prepare_socket_path(path)
        assert path.is_socket()
    finally:
        live.close()


def test_a_regular_file_in_the_way_is_refused(short_tmp: Path) -> None:
    path = short_tmp / "boincd.sock"
    path.write_text("not a socket")
    with pytest.raises(SocketInUse, match="not a socket"):
        prepare_socket_path(path)
    assert path.read_text() == "not a socket"


def test_socket_mode_and_group(short_tmp: Path) -> None:
    path = short_tmp / "boincd.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    try:
        secure_socket(path, "nogroup")
        st = path.stat()
        assert st.st_mode & 0o777 == 0o660
        import grp

        assert st.st_gid == grp.getgrnam("nogroup").gr_gid
        with pytest.raises(BoincdError, match="does not exist"):
            secure_socket(path, "no-such-group-xyz")
    finally:
        sock.close()
