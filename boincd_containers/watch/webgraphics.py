"""Web graphics: one container port of a task, reachable from this host on 127.0.0.1 only.

BOINC's docker_wrapper publishes ``web_graphics_guest_port`` with ``docker run
-p HOST:GUEST``, which binds every interface of the host and needs the
container on a bridge network; ``boinc_get_port`` picks HOST by binding port 0
on 127.0.0.1 (lib/network.cpp), so the kernel takes it from
``net.ipv4.ip_local_port_range``. Here the container keeps the network its job
asked for (``none`` by default: measured on Docker 20.10, an ``--internal``
network publishes nothing, so any engine publishing would give the task a
route out). Instead the daemon listens on 127.0.0.1, on a port the kernel picks
the same way (and keeps bound: no race with another program), and relays each
connection to 127.0.0.1:GUEST *inside the container's own network namespace*:
a socket created by a thread that has entered that namespace (setns(2))
belongs to it for good. The app reaches nothing new, no other host or
container reaches the app, and it works the same on Docker and Podman, also
while BOINC has the task's network disconnected. It needs CAP_SYS_ADMIN (a
root daemon); a daemon without it says so in the task's JSON, and the shim in
stderr.txt.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from boincd_containers.core.log import get_logger, task_context
from boincd_containers.core.supervise import repeat
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.registry import Registry
from boincd_containers.tasks.state import TaskKey, TaskState

log = get_logger(__name__)

LISTEN_HOST = "127.0.0.1"
CLONE_NEWNET = 0x40000000
CONNECT_TIMEOUT_S = 10.0
# Per task: a browser opens a handful; a local program opening thousands must
# not use up the daemon's file descriptors.
MAX_CONNECTIONS = 64
_CHUNK = 65536
# A paused container would take the connection and answer only once resumed:
# the browser is told at once instead.
_SERVING_STATES = (TaskState.RUNNING,)
_HEAD_MAX = 65536
_NOT_NOW_S = 5.0

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# (record, guest port) -> streams connected to the app: the netns relay by default,
# a plain local connection in unit tests.
Opener = Callable[[TaskRecord, int], Awaitable[Streams]]


class GraphicsUnavailable(OSError):
    """The container's network namespace cannot be entered."""


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def socket_in_netns(pid: int, container_id: str) -> socket.socket:
    """A TCP socket in the network namespace of ``pid``, the container's init.

    Made by a thread of its own, which enters the namespace and ends: setns()
    changes only the calling thread, and no thread of the daemon's pools is
    ever left in a container's namespace. The namespace file is opened first
    and the pid checked to still be the container's (its cgroup names the
    container id) while that file pins the namespace: a pid reused after the
    container died leads nowhere else.
    """
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            out["error"] = exc
            return
        try:
            with open(f"/proc/{pid}/cgroup", encoding="ascii", errors="replace") as f:
                if container_id not in f.read():
                    out["error"] = ProcessLookupError(
                        errno.ESRCH, f"pid {pid} is no longer the container's"
                    )
                    return
            _setns(fd)
            out["socket"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            out["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=work, name="boincd-netns", daemon=True)
    thread.start()
    thread.join()
    error = out.get("error")
    if isinstance(error, PermissionError):
        raise GraphicsUnavailable(
            errno.EPERM,
            "the daemon may not enter the container's network namespace (setns needs "
            "CAP_SYS_ADMIN: run the daemon as root, with the systemd unit shipped)",
        )
    if error is not None:
        raise error
    sock: socket.socket = out["socket"]
    return sock


def can_enter_netns() -> str | None:
    """None if this process may enter network namespaces, else why not.

    Entering our own namespace changes nothing and is checked like any other.
    """
    try:
        socket_in_netns(os.getpid(), "").close()
    except OSError as exc:
        return str(exc.strerror or exc)
    return None


async def open_in_container(record: TaskRecord, guest_port: int) -> Streams:
    """Connect to 127.0.0.1:guest_port as seen from inside the container."""
    sock = await asyncio.to_thread(socket_in_netns, record.pid, record.container_id)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", guest_port))
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


@dataclass
class _Listener:
    key: TaskKey
    guest_port: int
    container_id: str
    server: asyncio.AbstractServer
    host_port: int
    connections: set[asyncio.Task[Any]] = field(default_factory=set)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(_CHUNK):
        writer.write(data)
        await writer.drain()
    # Half-close: an HTTP/1.0 client may end its request so and still wait for the answer.
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


async def _not_now(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, why: str) -> None:
    """Answer a browser that the graphics cannot be shown now, and why.

    The request is read first: closing a socket with unread data resets the
    connection, and the browser would show its own error instead of ours.
    """
    with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _NOT_NOW_S)
        page = f"<!DOCTYPE html><title>BOINC task graphics</title><p>{why}</p>\n".encode()
        writer.write(
            b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Retry-After: 10\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(page) + page
        )
        await writer.drain()
    await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class WebGraphics:
    """The 127.0.0.1 listeners of the tasks whose job has web graphics."""

    def __init__(
        self,
        registry: Registry,
        *,
        opener: Opener = open_in_container,
        host: str = LISTEN_HOST,
    ) -> None:
        self.registry = registry
        self.opener = opener
        self.host = host
        self._listeners: dict[TaskKey, _Listener] = {}
        # Why a task's graphics cannot be reached, once known (no CAP_SYS_ADMIN...).
        self._errors: dict[TaskKey, str] = {}
        self._probe: Callable[[], str | None] | None = (
            can_enter_netns if opener is open_in_container else None
        )
        self._cannot: str | None = None

    def _wanted(self) -> dict[TaskKey, TaskRecord]:
        return {
            key: record
            for key, record in self.registry.tasks.items()
            if record.web_graphics_port
            and record.container_id
            and record.state not in (TaskState.REMOVED, TaskState.FAILED)
        }

    async def sync(self) -> None:
        """Listen for each task with web graphics; stop for tasks that are gone."""
        wanted = self._wanted()
        for key, listener in list(self._listeners.items()):
            record = wanted.get(key)
            if (
                record is None
                or record.container_id != listener.container_id
                or record.web_graphics_port != listener.guest_port
            ):
                await self._stop(key)
        for key, record in wanted.items():
            if key not in self._listeners:
                with task_context(key.project, key.result):
                    await self._listen(record)

    async def _listen(self, record: TaskRecord) -> None:
        key = record.key
        if self._probe is not None:
            # Once: whether this daemon may enter a container's namespace at all.
            self._cannot = await asyncio.to_thread(self._probe)
            self._probe = None
            if self._cannot:
                log.warning("web graphics unavailable", error=self._cannot)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with task_context(key.project, key.result):
                await self._relay(key, reader, writer)

        try:
            # Port 0: the kernel picks a free one, as boinc_get_port does; it stays
            # bound for as long as the task lives, so nothing else can take it.
            server = await asyncio.start_server(handle, self.host, 0)
        except OSError as exc:
            self._errors[key] = f"cannot listen on {self.host}: {exc.strerror or exc}"
            log.warning("web graphics: cannot listen", error=str(exc))
            return
        port = int(server.sockets[0].getsockname()[1])
        self._listeners[key] = _Listener(
            key, record.web_graphics_port, record.container_id, server, port
        )
        if self._cannot:
            self._errors[key] = self._cannot
        log.info(
            "web graphics listening",
            url=self.url(port),
            guest_port=record.web_graphics_port,
        )

    async def _stop(self, key: TaskKey) -> None:
        listener = self._listeners.pop(key, None)
        self._errors.pop(key, None)
        if listener is None:
            return
        listener.server.close()
        for task in list(listener.connections):
            task.cancel()
        await asyncio.gather(*listener.connections, return_exceptions=True)
        await listener.server.wait_closed()

    async def _relay(
        self, key: TaskKey, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        listener = self._listeners.get(key)
        task = asyncio.current_task()
        record = self.registry.tasks.get(key)
        if listener is None or task is None or len(listener.connections) >= MAX_CONNECTIONS:
            await _close(writer)
            return
        if record is None or record.state not in _SERVING_STATES or record.pid <= 0:
            state = "gone" if record is None else record.state
            why = {
                "paused": "The task is suspended; its graphics come back when it runs again.",
                "created": "The task has not started yet.",
            }.get(state, f"The task is not running ({state}).")
            listener.connections.add(task)
            try:
                await _not_now(reader, writer, why)
            finally:
                listener.connections.discard(task)
            return
        listener.connections.add(task)
        inner: asyncio.StreamWriter | None = None
        try:
            try:
                inner_reader, inner_writer = await asyncio.wait_for(
                    self.opener(record, listener.guest_port), CONNECT_TIMEOUT_S
                )
                inner = inner_writer
            except GraphicsUnavailable as exc:
                if self._errors.get(key) != exc.strerror:
                    log.warning("web graphics unavailable", error=exc.strerror)
                self._errors[key] = str(exc.strerror)
                await _not_now(
                    reader, writer, f"The task's graphics cannot be shown: {exc.strerror}"
                )
                return
            except (OSError, TimeoutError) as exc:
                # The app does not listen (yet), or the container just stopped.
                log.debug("web graphics: cannot reach the app", error=str(exc))
                why = (
                    "The task's graphics are not served (yet): nothing answers on port "
                    f"{listener.guest_port} in its container."
                )
                await _not_now(reader, writer, why)
                return
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(_pipe(reader, inner_writer))
                    group.create_task(_pipe(inner_reader, writer))
            except* OSError as exc:  # one side went away: close the other
                log.debug("web graphics connection ended", error=str(exc))
        finally:
            listener.connections.discard(task)
            if inner is not None:
                await _close(inner)
            await _close(writer)

    def url(self, host_port: int) -> str:
        # An address, not "localhost" (docker_wrapper's choice): only the IPv4
        # loopback is listened on, and "localhost" may resolve to ::1 first.
        return f"http://{self.host}:{host_port}/"

    def task_fields(self, record: TaskRecord) -> dict[str, Any]:
        if not record.web_graphics_port:
            return {"web_graphics": None}
        listener = self._listeners.get(record.key)
        host_port = listener.host_port if listener is not None else None
        return {
            "web_graphics": {
                "guest_port": record.web_graphics_port,
                "host_port": host_port,
                "url": self.url(host_port) if host_port else None,
                "error": self._errors.get(record.key),
            }
        }

    async def status_fields(self) -> dict[str, Any]:
        return {}

    async def run(self, interval_s: float = 0.5) -> None:
        try:
            await repeat(self.sync, interval_s, "web graphics")
        finally:
            await self.close()

    async def close(self) -> None:
        for key in list(self._listeners):
            await self._stop(key)
