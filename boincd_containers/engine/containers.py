"""Containers: the lifecycle verbs of a task container, its logs, and how the
engine's refusals of them are told apart (for good, or worth a retry)."""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncGenerator
from dataclasses import replace

import aiohttp

from boincd_containers.core.errors import (
    BoincdError,
    Conflict,
    EngineRefused,
    NotFound,
    Unavailable,
)
from boincd_containers.engine import compat as engine_compat
from boincd_containers.engine.session import DISK_FULL, JSON, JSONList, Session, label_filters
from boincd_containers.engine.streams import LOG_BYTES_MAX, LOG_TAIL_MAX, Demultiplexer, TailBuffer
from boincd_containers.host import proctree

# Log reads at once: each holds up to LOG_BYTES_MAX, so this bounds their memory.
LOG_READERS_MAX = 4
_LOG_TIMEOUT = aiohttp.ClientTimeout(total=300, sock_connect=5, sock_read=60)
_LOG_WRITE_BLOCK = 64 * 1024
_WAIT_FOREVER_S = 10 * 365 * 24 * 3600.0

# The OCI runtime refusing a container (runc, crun): the same config fails the
# same way every time (a mount over /proc, a bad working dir), unless the cause
# is the host's passing state, named by these.
_OCI_REFUSAL = ("oci runtime", "oci permission denied", "oci not found")
_TRANSIENT = (
    "resource temporarily unavailable",
    "cannot allocate memory",
    "device or resource busy",
    "too many open files",
    "timeout",
    "timed out",
    "connection refused",
    "transport is closing",
    "interrupted system call",
    DISK_FULL,
)


def refused_for_good(exc: Unavailable) -> EngineRefused | None:
    """A create or start the OCI runtime refused, for a cause that cannot pass: the
    task fails with the engine's message. None: worth a retry after all."""
    lowered = exc.message.lower()
    if any(m in lowered for m in _OCI_REFUSAL) and not any(m in lowered for m in _TRANSIENT):
        return EngineRefused(exc.message)
    return None


class Containers:
    def __init__(self, session: Session) -> None:
        self._session = session
        self._log_readers = asyncio.Semaphore(LOG_READERS_MAX)

    async def create(self, name: str, config: JSON) -> str:
        """Create; on a rootless engine the slot owner is mapped into its user
        namespace, and limits it cannot apply are left out and named in labels
        (`unenforced`, `warnings`) that the task JSON and the shim pass on."""
        info = self._session.info
        if info is not None:
            engine_compat.adapt_create(
                config, info.description, info.limits, info.uid_map, info.gid_map
            )
            engine_compat.adapt_log_config(config, podman=info.kind == "podman")
        try:
            created = await self._session.call(
                f"create container {name}",
                "containers/create",
                "POST",
                params={"name": name},
                body=config,
            )
        except Unavailable as exc:
            refused = refused_for_good(exc)
            if refused is None:
                raise
            raise refused from exc
        return str(created["Id"])

    async def inspect(self, ref: str, *, size: bool = False) -> JSON:
        params = {"size": "true"} if size else None
        result: JSON = await self._session.call(
            f"inspect container {ref}", f"containers/{ref}/json", params=params
        )
        info = self._session.info
        if info is not None and not info.freezer:
            proctree.show_stopped_as_paused(result.get("State"))
        return result

    async def list(self, labels: dict[str, str], *, size: bool = False) -> JSONList:
        """Every container (running or not) with these labels."""
        params = {"all": "true", **label_filters(labels)}
        if size:
            params["size"] = "true"
        result: JSONList = await self._session.call(
            "list containers", "containers/json", params=params
        )
        return result

    async def rename(self, ref: str, name: str) -> None:
        await self._session.call(
            f"rename container {ref} to {name}",
            f"containers/{ref}/rename",
            "POST",
            params={"name": name},
        )

    async def start(self, ref: str) -> None:
        try:
            await self._session.call(f"start container {ref}", f"containers/{ref}/start", "POST")
        except Unavailable as exc:
            refused = refused_for_good(exc)
            if refused is None:
                raise
            raise refused from exc

    async def pause(self, ref: str) -> None:
        info = self._session.info
        if info is not None and not info.freezer:
            await self._signal_tree(ref, freeze=True)
            return
        try:
            await self._session.call(f"pause container {ref}", f"containers/{ref}/pause", "POST")
        except Conflict as exc:
            if "already paused" not in exc.message:
                raise
        except BoincdError as exc:
            if not engine_compat.cannot_freeze(exc.message):
                raise
            # No freezer for this container (rootless on cgroup v1): from now on
            # pause by signals, and show it as paused in inspect.
            if self._session.info is not None:
                self._session.info = replace(self._session.info, freezer=False)
            await self._signal_tree(ref, freeze=True)

    async def unpause(self, ref: str) -> None:
        info = self._session.info
        if info is not None and not info.freezer:
            await self._signal_tree(ref, freeze=False)  # paused by us, with SIGSTOP
            return
        try:
            await self._session.call(
                f"unpause container {ref}", f"containers/{ref}/unpause", "POST"
            )
        except BoincdError as exc:
            # Docker answers 500 "is not paused", Podman 500 "... not paused, can't
            # unpause": idempotent either way.
            if "not paused" not in exc.message:
                raise

    async def _signal_tree(self, ref: str, *, freeze: bool) -> None:
        """Pause or resume every process of the container with SIGSTOP/SIGCONT."""
        verb = "pause" if freeze else "unpause"
        data = await self._session.call(f"{verb} container {ref}", f"containers/{ref}/json")
        state = data.get("State") or {}
        pid = int(state.get("Pid") or 0)
        if not state.get("Running") or pid <= 0:
            if freeze:
                raise Conflict(f"pause container {ref}: it is not running")
            return
        try:
            if freeze:
                await asyncio.to_thread(proctree.freeze, pid)
            elif any(p.state in ("T", "t") for p in proctree.tree(pid)):
                await asyncio.to_thread(proctree.thaw, pid)
        except proctree.ProcessTreeError as exc:
            raise BoincdError(f"{verb} container {ref}: {exc}") from exc

    async def kill(self, ref: str, signal: str = "KILL") -> None:
        """Signal the container; one that is not running is fine."""
        try:
            await self._session.call(
                f"kill container {ref}", f"containers/{ref}/kill", "POST", params={"signal": signal}
            )
        except Conflict as exc:
            # Docker: "is not running"; Podman: "can only kill running containers".
            if "not running" not in exc.message and "only kill running" not in exc.message:
                raise

    async def remove(self, ref: str) -> None:
        """Force-remove with its anonymous volumes; an already gone container is fine."""
        try:
            await self._session.call(
                f"remove container {ref}",
                f"containers/{ref}",
                "DELETE",
                params={"force": "true", "v": "true"},
            )
        except NotFound:
            pass
        except Conflict as exc:
            # The engine is at it already: a daemon killed mid-remove asked first.
            if "already in progress" not in exc.message:
                raise

    async def wait(self, ref: str, timeout: float | None = None) -> int:
        """Until the container exits; its exit code."""
        result = await self._session.call(
            f"wait for container {ref}",
            f"containers/{ref}/wait",
            "POST",
            timeout=timeout or _WAIT_FOREVER_S,
        )
        return int(result.get("StatusCode", -1))

    async def logs(self, ref: str, tail_lines: int) -> str:
        """The last lines of the container's stdout and stderr, demultiplexed,
        at most LOG_BYTES_MAX bytes of them."""
        parts = [chunk async for chunk in self.stream_logs(ref, tail_lines)]
        return b"".join(parts).decode("utf-8")

    async def stream_logs(
        self, ref: str, tail_lines: int, max_bytes: int = LOG_BYTES_MAX
    ) -> AsyncGenerator[bytes, None]:
        """The end of the container's output: its last `tail_lines` lines (at most
        LOG_TAIL_MAX), of which the last `max_bytes` bytes, as valid UTF-8.

        The engine's stream is read chunk by chunk and only its end is kept, so
        a reader of a huge log costs the daemon about `max_bytes` and never
        blocks the loop; LOG_READERS_MAX readers at a time bound the total.
        Output left out is announced in a first line. Engine errors come before
        the first chunk.
        """
        tail_lines = max(0, min(tail_lines, LOG_TAIL_MAX))
        params = {"stdout": "1", "stderr": "1", "tail": str(tail_lines)}
        async with self._log_readers:
            kept = TailBuffer(max_bytes)
            demux = Demultiplexer()
            # Decoded as it comes, invalid bytes as U+FFFD (readers such as the
            # shim decode strictly), so that the cap counts what is returned.
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            async with self._session.query(
                f"logs of container {ref}",
                f"containers/{ref}/logs",
                params=params,
                timeout=_LOG_TIMEOUT,
            ) as response:
                async for chunk in response.content.iter_chunked(64 * 1024):
                    kept.add(decoder.decode(demux.feed(chunk)).encode())
            kept.add(decoder.decode(demux.close(), final=True).encode())
            # One piece (at most max_bytes) written in blocks, not one small
            # write per network chunk.
            text = b"".join(kept.chunks())
            kept.clear()
            if kept.dropped:
                yield (
                    f"[... {kept.dropped} bytes of earlier output left out: "
                    f"a log read returns at most {max_bytes} bytes ...]\n"
                ).encode()
            for start in range(0, len(text), _LOG_WRITE_BLOCK):
                yield text[start : start + _LOG_WRITE_BLOCK]
