"""Minimal sd_notify(3) client: tell systemd we are ready, alive or stopping.

Stdlib only, because libsystemd bindings would be a native dependency for what is
one datagram.  Every function is a no-op returning False when the process was not
started by systemd with ``Type=notify`` (no ``NOTIFY_SOCKET``), so the daemon can
call them unconditionally, also under launchd, in a terminal or in tests.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = [
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]

# A send to systemd's socket is local and normally instant; the bound only stops
# a wedged manager (full receive queue) from freezing the daemon's event loop.
_SEND_TIMEOUT_S = 2.0


def _address(env: Mapping[str, str]) -> str | None:
    raw = env.get("NOTIFY_SOCKET", "")
    if raw.startswith("@"):
        # Linux abstract namespace: systemd writes the leading NUL byte as "@".
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # Empty, or a form we do not speak (systemd >= 253 also offers "vsock:" for
    # VMs); silently not notifying is what sd_notify does without a socket too.
    return None


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` lines) to the service manager.

    Returns True when the datagram was sent, False when there is no manager to
    tell or the send failed.  Never raises: a lost notification must not take the
    daemon down (systemd's watchdog will say so if it matters).
    """
    address = _address(os.environ if env is None else env)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Startup finished: the socket is listening and state is rebuilt."""
    message = "READY=1"
    if status_text:
        message += "\nSTATUS=" + _one_line(status_text)
    return notify(message)


def stopping() -> bool:
    """Graceful shutdown began; systemd then waits TimeoutStopSec= for us."""
    return notify("STOPPING=1")


def watchdog() -> bool:
    """Keep-alive ping; send at least every watchdog_interval() / 2 seconds."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """Free-form status shown by ``systemctl status``."""
    return notify("STATUS=" + _one_line(text))


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds within which systemd expects WATCHDOG=1, or None when not watched.

    WATCHDOG_PID, when set, names the process the watchdog is meant for; a child
    that inherited the environment must not ping on the parent's behalf.
    """
    source = os.environ if env is None else env
    pid = source.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(source.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment in the protocol.
    return " ".join(text.splitlines())
