"""`boincd-containers serve`: the daemon on its Unix socket, until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import grp
import json
import os
import signal
import socket
import sys
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_request import BaseRequest

from boincd_containers.core.errors import BoincdError
from boincd_containers.core.log import get_logger
from boincd_containers.core.settings import Settings
from boincd_containers.daemon import sdnotify
from boincd_containers.daemon.app import Daemon, make_app
from boincd_containers.daemon.routes import http_error_body

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


class JsonErrorHandler(web.RequestHandler):
    """aiohttp's connection handler, with its own error answers in JSON.

    What the HTTP parser refuses (a bad request line, bad or oversized headers,
    garbage bytes) never reaches the app or its middleware: aiohttp answers it
    from `handle_error` in plain text. Likewise an error aiohttp raises before
    the middleware runs (an unknown `Expect` header: 417) is sent as its own
    text/plain HTTPException through `finish_response`. Both public hooks are
    overridden to answer the same status with the API's JSON error body
    (tests/unit/test_server.py pins their signatures and behaviour).
    """

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # The middleware answers every error it sees with a json_response, never
        # an HTTPException: one reaching here was raised by aiohttp itself.
        if isinstance(resp, web.HTTPException) and resp.status >= 400 and not resp.prepared:
            resp = _json_error(resp.status, resp.text or resp.reason, resp)
        return await super().finish_response(request, resp, start_time)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            # Only a bug gets here (the middleware answers every app error):
            # log it, and tell the client nothing about it.
            log.error("request failed in the HTTP layer", status=status, exc_info=exc)
            text = "internal error; see the daemon's log"
        else:
            # A client's malformed bytes: not worth more than a debug line.
            log.debug("bad HTTP request", status=status, error=str(exc or message))
            text = f"bad HTTP request: {message or exc or status}"
        response = _json_error(status, text)
        response.force_close()
        return response


def _json_error(status: int, message: str, like: web.HTTPException | None = None) -> web.Response:
    body = json.dumps(http_error_body(status, message[:500])).encode()
    response = web.Response(status=status, body=body, content_type="application/json")
    if like is not None and "Allow" in like.headers:  # 405 says which methods
        response.headers["Allow"] = like.headers["Allow"]
    return response


def protocol_factory(runner: web.AppRunner, **handler_args: Any) -> partial[JsonErrorHandler]:
    """What the Unix socket server makes for each connection (instead of UnixSite's
    default handler): the runner's request handling, with JSON parser errors."""
    server = runner.server
    if server is None:
        raise RuntimeError("the runner is not set up")
    # No access log, as AppRunner(access_log=None) had: a line per request is
    # noise on a socket a shim polls each second (aiohttp takes None here).
    options: dict[str, Any] = {"access_log": None, **handler_args}
    return partial(JsonErrorHandler, server, loop=asyncio.get_running_loop(), **options)


async def _watchdog() -> None:
    """Tell systemd we are alive, at half its WatchdogSec, while the loop turns."""
    interval = sdnotify.watchdog_interval()
    if interval is None:
        return
    while True:
        sdnotify.watchdog()
        await asyncio.sleep(interval / 2)


PROCESS_NAME = b"boincd-containers"  # the kernel keeps 15 bytes of it


def name_the_process() -> None:
    """Name the daemon's process for the kernel (`comm`, as ps and /proc show it).

    The BOINC client counts every process whose name holds "boinc" as its own
    when it adds up other programs' CPU load, to suspend computing when that is
    over the volunteer's limit (lib/procinfo_unix.cpp `is_boinc_app`). The
    daemon works only for BOINC's tasks; started as `python -m ...` it would be
    counted against them."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(PROCESS_NAME), 0, 0, 0)


_PR_SET_NAME = 15


async def run(settings: Settings) -> None:
    name_the_process()
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
    listener: asyncio.AbstractServer | None = None
    try:
        listener = await loop.create_unix_server(protocol_factory(runner), str(socket_path))
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
        if listener is not None:
            listener.close()  # no new connections; runner.cleanup() ends the open ones
        await runner.cleanup()
        socket_path.unlink(missing_ok=True)  # noqa: ASYNC240 - shutdown, nothing else runs
        log.info("daemon stopped")
