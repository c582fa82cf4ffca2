"""`boincd-containers serve`: the daemon on its Unix socket, until SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import grp
import os
import signal
import socket
from pathlib import Path

from aiohttp import web

from . import sdnotify
from .api import make_app
from .errors import BoincdError
from .log import get_logger
from .service import Daemon
from .settings import Settings

log = get_logger(__name__)


class SocketInUse(BoincdError):
    code = "socket_in_use"


def prepare_socket_path(path: Path) -> None:
    """Create the parent dir; remove a stale socket, but never steal a live daemon's."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            path.unlink(missing_ok=True)  # stale: its daemon died without cleaning up
            return
        raise SocketInUse(f"cannot check socket {path}: {exc}") from None
    finally:
        probe.close()
    raise SocketInUse(f"another daemon is already serving on {path}")


def secure_socket(path: Path, group: str | None) -> None:
    """0660 and the configured group: the BOINC user can reach it, others cannot."""
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise BoincdError(f"socket group {group!r} does not exist") from None
    os.chown(path, -1, gid)
    os.chmod(path, 0o660)


async def _watchdog() -> None:
    """Tell systemd we are alive, at half its WatchdogSec, while the loop turns."""
    interval = sdnotify.watchdog_interval()
    if interval is None:
        return
    while True:
        sdnotify.watchdog()
        await asyncio.sleep(interval / 2)


async def run(settings: Settings) -> None:
    daemon = Daemon(settings)
    app = make_app(daemon)
    socket_path = Path(settings.socket)
    prepare_socket_path(socket_path)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.UnixSite(runner, str(socket_path))
        await site.start()
        secure_socket(socket_path, settings.socket_group)
        log.info("listening", socket=str(socket_path))
        sdnotify.ready("serving on " + str(socket_path))
        async with asyncio.TaskGroup() as group:
            watchdog = group.create_task(_watchdog())
            await stop.wait()
            watchdog.cancel()
        sdnotify.stopping()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await runner.cleanup()
        socket_path.unlink(missing_ok=True)  # noqa: ASYNC240 - shutdown, nothing else runs
        log.info("daemon stopped")
