"""Who is on the other end of the Unix socket, and whether they may change anything."""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: Any) -> Peer | None:
    """SO_PEERCRED: the kernel's word on the peer, which no client can forge."""
    if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
        return None
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return Peer(pid, uid, gid)


def writer_uids(boinc_user: str) -> frozenset[int]:
    """Root, the daemon's own user, and the configured BOINC user may change things."""
    uids = {0, os.getuid()}
    with contextlib.suppress(KeyError):
        uids.add(pwd.getpwnam(boinc_user).pw_uid)
    return frozenset(uids)
