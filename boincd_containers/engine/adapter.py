"""The one adapter between the daemon and the container engine (Docker or Podman).

Everything engine-specific lives here: finding the engine, negotiating the API
version, and translating engine errors into the daemon's exception family.
Nothing else in the code imports aiodocker. Docker and Podman differ behind the
same API (engine/compat.py says how): this class smooths them over, so the rest
of the daemon never asks which engine it has.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import json
import os
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import aiodocker
import aiohttp
import psutil
from aiodocker.exceptions import DockerError

from boincd_containers.core.errors import (
    BadRequest,
    BoincdError,
    Conflict,
    EngineRefused,
    ImageError,
    NotFound,
    Unavailable,
)
from boincd_containers.engine import compat as engine_compat
from boincd_containers.engine.hosts import identify, is_podman, pick_host
from boincd_containers.host import proctree

JSON = dict[str, Any]
ProgressCallback = Callable[[JSON], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class EngineInfo:
    kind: str  # "docker" or "podman"
    version: str
    api_version: str
    rootless: bool
    cgroup_version: str
    cgroup_driver: str
    host: str
    data_root: str
    # Controllers ("cpu", "memory", "pids") whose limits the engine really applies.
    limits: frozenset[str] = engine_compat.ALL_LIMITS
    # False: no freezer cgroup (rootless on cgroup v1); we pause with SIGSTOP instead.
    freezer: bool = True
    # Rootless Podman's user namespace: host ids → ids inside its containers.
    uid_map: engine_compat.IdMap = ()
    gid_map: engine_compat.IdMap = ()
    # When the engine process started (0.0: unknown). Docker without live-restore
    # stops every container when it shuts down: one that exited before this was
    # interrupted, not finished (see TaskRecord.interrupted_by_reboot).
    started_at: float = 0.0
    # When this daemon first had an answer from that engine process: Docker
    # answers only once it has restored its containers, and without live-restore
    # that means stopping those an engine that died (SIGKILL, crash) left running.
    answered_at: float = 0.0

    @property
    def description(self) -> str:
        """ "rootless Podman 4.3.1": how messages name the engine."""
        name = {"docker": "Docker", "podman": "Podman"}.get(self.kind, self.kind)
        return f"{'rootless ' if self.rootless else ''}{name} {self.version}".strip()


# What one log read returns at most: a reader gets the end of the output, never
# the whole log in the daemon's memory (a task may write gigabytes of it).
LOG_BYTES_MAX = 1 << 20
# Lines one read asks the engine for at most (`tail=all` means this many): the
# engine then reads back only this much of the file, not all of it.
LOG_TAIL_MAX = 10_000
# Log reads at once: each holds up to LOG_BYTES_MAX, so this bounds their memory.
LOG_READERS_MAX = 4
_LOG_TIMEOUT = aiohttp.ClientTimeout(total=300, sock_connect=5, sock_read=60)
_LOG_WRITE_BLOCK = 64 * 1024


def _frame_header(header: bytes) -> bool:
    return header[0] in (0, 1, 2) and header[1:4] == b"\0\0\0"


class Demultiplexer:
    """The payload of a non-TTY log stream, fed in chunks as they arrive.

    The engine frames each write as an 8-byte header (stream, 0, 0, 0, size
    big-endian) and its bytes; chunks of the HTTP stream cut anywhere, inside
    a header or a payload. A stream that does not start with a header (a TTY
    container's) passes through unchanged.
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._left = 0  # payload bytes still to come in the current frame
        self._framed: bool | None = None  # None until the first 8 bytes are in
        self._raw = False

    def feed(self, data: bytes) -> bytes:
        if self._raw:
            return data
        out = bytearray()
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                out += view[pos : pos + take]
                pos += take
                self._left -= take
                continue
            need = 8 - len(self._header)
            self._header += view[pos : pos + need]
            pos += min(need, end - pos)
            if len(self._header) < 8:
                break
            header = bytes(self._header)
            self._header.clear()
            if not _frame_header(header):
                # Not framed (or no longer): the rest goes through as it is
                # rather than being lost.
                self._raw = True
                out += header
                out += view[pos:]
                break
            self._framed = True
            self._left = int.from_bytes(header[4:8], "big")
        return bytes(out)

    def close(self) -> bytes:
        """What is left at the end: a short unframed stream, or nothing."""
        rest, self._header = bytes(self._header), bytearray()
        return rest if self._framed is None else b""


def demultiplex(raw: bytes) -> bytes:
    """Strip the 8-byte frame headers of a non-TTY log stream (stdout and stderr in order)."""
    demux = Demultiplexer()
    return demux.feed(raw) + demux.close()


class TailBuffer:
    """The last `limit` bytes of a stream, in the chunks they came in: memory stays
    about `limit` however long the stream is."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self.dropped = 0  # bytes of the stream's start left out

    def add(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._size += len(data)
        while self._size - len(self._chunks[0]) >= self.limit:
            first = self._chunks.popleft()
            self._size -= len(first)
            self.dropped += len(first)

    def chunks(self) -> list[bytes]:
        """The kept bytes, from a line start (and never inside a UTF-8 sequence)
        when earlier output was left out."""
        chunks = list(self._chunks)
        excess = self._size - self.limit
        if excess > 0:
            chunks[0] = chunks[0][excess:]
            self.dropped += excess
        chunks = [c for c in chunks if c]
        if self.dropped and chunks:
            before = sum(len(c) for c in chunks)
            chunks = _from_a_line_start(chunks)
            self.dropped += before - sum(len(c) for c in chunks)
        return [c for c in chunks if c]

    def clear(self) -> None:
        self._chunks.clear()
        self._size = 0


# How far into the kept bytes the first line may end and still be dropped whole:
# the engines cut lines at 16 KiB, a longer search would drop real output.
_LINE_SEARCH_BYTES = 64 * 1024


def _from_a_line_start(chunks: list[bytes]) -> list[bytes]:
    """Drop the cut line at the start of `chunks`, through its newline; without a
    newline near the start, only the continuation bytes of a cut UTF-8 character."""
    scanned = 0
    for i, chunk in enumerate(chunks):
        newline = chunk.find(b"\n", 0, _LINE_SEARCH_BYTES - scanned)
        if newline >= 0:
            return [chunk[newline + 1 :], *chunks[i + 1 :]]
        scanned += len(chunk)
        if scanned >= _LINE_SEARCH_BYTES:
            break
    first = chunks[0]
    skip = 0
    while skip < min(len(first), 3) and 0x80 <= first[skip] < 0xC0:
        skip += 1
    return [first[skip:], *chunks[1:]]


def log_tail_lines(text: str | None, default: int = 200) -> int:
    """The `tail` of a log request as a line count in 0..LOG_TAIL_MAX; `all` or a
    negative number is LOG_TAIL_MAX. ValueError when it is no number."""
    if text is None or text == "":
        return min(default, LOG_TAIL_MAX)
    if text.strip().lower() == "all":
        return LOG_TAIL_MAX
    lines = int(text)
    return LOG_TAIL_MAX if lines < 0 else min(lines, LOG_TAIL_MAX)


_DISK_FULL = "no space left on device"


def _disk_full(message: str) -> Unavailable:
    """ENOSPC anywhere in the engine: retryable, the volunteer can free space."""
    return Unavailable(
        f"{message} (the disk of the container engine is full: free some space, "
        "the task is retried)",
        retryable=True,
    )


def engine_process_started_at(host: str) -> float:
    """When the process serving a local engine socket started; 0.0 when unknown
    (a remote engine, or its process not ours to see)."""
    if not host.startswith("unix://"):
        return 0.0
    path = os.path.realpath(host[len("unix://") :])
    name = os.path.basename(path)
    try:
        connections = psutil.net_connections("unix")
    except (psutil.Error, OSError):
        return 0.0
    pids = set()
    for conn in connections:
        bound = conn.laddr if isinstance(conn.laddr, str) else ""
        if not conn.pid or os.path.basename(bound) != name or os.path.realpath(bound) != path:
            continue
        pids.add(conn.pid)
    if not pids:
        # /proc/net/unix lists our network namespace only: an engine in its own
        # (e.g. started under `unshare --net`) is found through its processes'.
        pids = _listeners_elsewhere(path, name)
    starts = [start for start in map(process_started_at, pids) if start > 0]
    # With socket activation systemd holds the socket too: the engine is the youngest.
    return max(starts, default=0.0)


def process_started_at(pid: int) -> float:
    """When a process started, to the clock tick; 0.0 when unknown.

    psutil's create_time adds the start to the boot time of /proc/stat, whole
    seconds that drift from the wall clock: measured here, 0.3 s early, which
    put an engine's start after a container it then stopped. The boot clock
    gives the time since the start exactly.
    """
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
        since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)
    except (OSError, ValueError, IndexError, AttributeError):
        with contextlib.suppress(psutil.Error):
            return float(psutil.Process(pid).create_time())
        return 0.0


def _listeners_elsewhere(path: str, name: str) -> set[int]:
    """Pids holding a Unix socket bound to `path`, looked up in every network
    namespace but ours."""
    try:
        own = os.readlink("/proc/self/ns/net")
    except OSError:
        return set()
    namespaces, inodes = {own}, set()
    for pid in psutil.pids():
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/net")
            if namespace in namespaces:
                continue
            namespaces.add(namespace)
            with open(f"/proc/{pid}/net/unix") as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode Path
            bound = fields[7] if len(fields) >= 8 else ""
            if os.path.basename(bound) == name and os.path.realpath(bound) == path:
                inodes.add(f"socket:[{fields[6]}]")
    if not inodes:
        return set()
    holders = set()
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        holders.add(pid)
                        break
    return holders


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
    _DISK_FULL,
)


def _refused_for_good(exc: Unavailable) -> EngineRefused | None:
    """A create or start the OCI runtime refused, for a cause that cannot pass: the
    task fails with the engine's message. None: worth a retry after all."""
    lowered = exc.message.lower()
    if any(m in lowered for m in _OCI_REFUSAL) and not any(m in lowered for m in _TRANSIENT):
        return EngineRefused(exc.message)
    return None


def _translate(exc: BaseException, what: str) -> BoincdError:
    """Engine errors → our family. 5xx and transport errors are worth a retry."""
    if isinstance(exc, DockerError):
        message = f"{what}: {exc.message}"
        if _DISK_FULL in message.lower():
            return _disk_full(message)
        reclassified = engine_compat.reclassify(exc.status, message)
        if reclassified is not None:
            return reclassified  # Podman's 500s that mean "not found" or "conflict"
        if exc.status == 404:
            return NotFound(message)
        if exc.status == 409:
            return Conflict(message)
        if exc.status == 400:
            return BadRequest(message)
        if exc.status in (401, 403):
            return ImageError(message)
        return Unavailable(message, retryable=exc.status >= 500)
    if isinstance(exc, aiohttp.ClientError | OSError | asyncio.TimeoutError):
        return Unavailable(f"{what}: engine unreachable ({exc or type(exc).__name__})")
    return BoincdError(f"{what}: {exc}")


class Engine:
    """Lifecycle verbs over the Engine API. Reconnects lazily: the engine may come and go."""

    def __init__(self, docker_host: str | None = None, timeout_s: float = 60.0) -> None:
        self._configured_host = docker_host
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=5)
        self._client: aiodocker.Docker | None = None
        # Calls in flight on each session: a session that reset() retired is
        # closed only when its last call ends, so one loop's reset never cuts
        # another's pull, event stream or request.
        self._users: dict[aiodocker.Docker, int] = {}
        self._info: EngineInfo | None = None
        self.host = ""
        self._log_readers = asyncio.Semaphore(LOG_READERS_MAX)

    @property
    def info(self) -> EngineInfo | None:
        """The last engine seen; None while it has never answered."""
        return self._info

    async def _docker(self) -> aiodocker.Docker:
        if self._client is None:
            self.host = pick_host(self._configured_host)
            self._client = aiodocker.Docker(url=self.host, timeout=self._timeout)
        return self._client

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[aiodocker.Docker]:
        """The current session, held for one call (or one stream) however long it takes."""
        docker = await self._docker()
        self._users[docker] = self._users.get(docker, 0) + 1
        try:
            yield docker
        finally:
            self._users[docker] -= 1
            if self._users[docker] == 0:
                del self._users[docker]
                if docker is not self._client:  # retired by reset() meanwhile
                    with contextlib.suppress(Exception):
                        await docker.close()

    async def close(self) -> None:
        """Close every session, also those still in use (shutdown)."""
        sessions = set(self._users)
        if self._client is not None:
            sessions.add(self._client)
        self._client = None
        self._users.clear()
        for client in sessions:
            with contextlib.suppress(Exception):
                await client.close()

    async def reset(self) -> None:
        """Find and negotiate the engine again at the next call. Calls in flight keep
        their session until they end (then it closes): one loop that lost the engine
        must not cut every other pull, event stream and request with it."""
        client, self._client = self._client, None
        if client is not None and not self._users.get(client):
            await client.close()

    async def _call(
        self,
        what: str,
        path: str,
        method: str = "GET",
        *,
        params: JSON | None = None,
        body: Any = None,
        timeout: float | None = None,
        raw: bool = False,
        headers: dict[str, str] | None = None,
        versioned: bool = True,
    ) -> Any:
        data = json.dumps(body).encode() if body is not None and not raw else body
        hdrs = headers or ({"Content-Type": "application/json"} if body is not None else None)
        try:
            async with self._session() as docker:
                return await docker._query_json(
                    path,
                    method,
                    params=params,
                    data=data,
                    headers=hdrs,
                    timeout=aiohttp.ClientTimeout(total=timeout) if timeout else self._timeout,
                    versioned_api=versioned,
                )
        except (TimeoutError, DockerError, aiohttp.ClientError, OSError) as exc:
            if isinstance(exc, DockerError) and exc.status == 304:
                return None  # "already in that state": the verbs are idempotent
            raise _translate(exc, what) from exc

    # -- engine ---------------------------------------------------------------

    async def connect(self) -> EngineInfo:
        """Reach the engine and learn what it is; raises Unavailable when it is down."""
        # Unversioned, and the API version taken from it: aiodocker would otherwise
        # ask /version once more itself, and Podman answers /version slowly (it
        # runs dpkg-query or rpm for each of its components).
        version = await self._call("engine version", "version", versioned=False)
        answered_at = time.time()
        docker = await self._docker()
        if docker.api_version == "auto" and version.get("ApiVersion"):
            docker.api_version = f"v{version['ApiVersion']}"
        info = await self._call("engine info", "info")
        libpod = None
        if is_podman(version):
            # Podman's compatible /info hides rootless mode and claims limits it
            # cannot apply; its own /libpod/info tells both.
            with contextlib.suppress(BoincdError):
                libpod = await self._call("engine details", "libpod/info")
        identity = identify(version, info, libpod)
        limits, freezer = engine_compat.engine_limits(identity.kind == "podman", info, libpod)
        uid_map, gid_map = engine_compat.id_maps(libpod)
        # Podman has no engine process that containers depend on (conmon keeps
        # them; its API service comes and goes): only Docker's start matters.
        started_at = 0.0
        if identity.kind == "docker":
            started_at = await asyncio.to_thread(engine_process_started_at, self.host)
        previous = self._info
        if previous is not None and started_at and previous.started_at == started_at:
            answered_at = previous.answered_at  # the same engine process as before
        self._info = EngineInfo(
            kind=identity.kind,
            version=str(version.get("Version", "")),
            api_version=str(version.get("ApiVersion", "")),
            rootless=identity.rootless,
            cgroup_version=str(info.get("CgroupVersion", "")),
            cgroup_driver=str(info.get("CgroupDriver", "")),
            host=self.host,
            data_root=str(info.get("DockerRootDir", "")),
            limits=limits,
            freezer=freezer,
            uid_map=uid_map,
            gid_map=gid_map,
            started_at=started_at,
            answered_at=answered_at,
        )
        return self._info

    async def system_df(self) -> JSON:
        result: JSON = await self._call("disk usage", "system/df", timeout=300)
        return result

    # -- containers -----------------------------------------------------------

    async def create_container(self, name: str, config: JSON) -> str:
        """Create; on a rootless engine the slot owner is mapped into its user
        namespace, and limits it cannot apply are left out and named in labels
        (`unenforced`, `warnings`) that the task JSON and the shim pass on."""
        info = self._info
        if info is not None:
            engine_compat.adapt_create(
                config, info.description, info.limits, info.uid_map, info.gid_map
            )
            engine_compat.adapt_log_config(config, podman=info.kind == "podman")
        try:
            created = await self._call(
                f"create container {name}",
                "containers/create",
                "POST",
                params={"name": name},
                body=config,
            )
        except Unavailable as exc:
            refused = _refused_for_good(exc)
            if refused is None:
                raise
            raise refused from exc
        return str(created["Id"])

    async def inspect_container(self, ref: str, *, size: bool = False) -> JSON:
        params = {"size": "true"} if size else None
        result: JSON = await self._call(
            f"inspect container {ref}", f"containers/{ref}/json", params=params
        )
        if self._info is not None and not self._info.freezer:
            proctree.show_stopped_as_paused(result.get("State"))
        return result

    async def list_containers(self, labels: dict[str, str], *, size: bool = False) -> list[JSON]:
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        params: JSON = {"all": "true", "filters": json.dumps(filters)}
        if size:
            params["size"] = "true"
        result: list[JSON] = await self._call("list containers", "containers/json", params=params)
        return result

    async def rename_container(self, ref: str, name: str) -> None:
        await self._call(
            f"rename container {ref} to {name}",
            f"containers/{ref}/rename",
            "POST",
            params={"name": name},
        )

    async def start_container(self, ref: str) -> None:
        try:
            await self._call(f"start container {ref}", f"containers/{ref}/start", "POST")
        except Unavailable as exc:
            refused = _refused_for_good(exc)
            if refused is None:
                raise
            raise refused from exc

    async def pause_container(self, ref: str) -> None:
        if self._info is not None and not self._info.freezer:
            await self._signal_tree(ref, freeze=True)
            return
        try:
            await self._call(f"pause container {ref}", f"containers/{ref}/pause", "POST")
        except Conflict as exc:
            if "already paused" not in exc.message:
                raise
        except BoincdError as exc:
            if not engine_compat.cannot_freeze(exc.message):
                raise
            # No freezer for this container (rootless on cgroup v1): from now on
            # pause by signals, and show it as paused in inspect.
            if self._info is not None:
                self._info = replace(self._info, freezer=False)
            await self._signal_tree(ref, freeze=True)

    async def unpause_container(self, ref: str) -> None:
        if self._info is not None and not self._info.freezer:
            await self._signal_tree(ref, freeze=False)  # paused by us, with SIGSTOP
            return
        try:
            await self._call(f"unpause container {ref}", f"containers/{ref}/unpause", "POST")
        except BoincdError as exc:
            # Docker answers 500 "is not paused", Podman 500 "... not paused, can't
            # unpause": idempotent either way.
            if "not paused" not in exc.message:
                raise

    async def _signal_tree(self, ref: str, *, freeze: bool) -> None:
        """Pause or resume every process of the container with SIGSTOP/SIGCONT."""
        verb = "pause" if freeze else "unpause"
        data = await self._call(f"{verb} container {ref}", f"containers/{ref}/json")
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

    async def kill_container(self, ref: str, signal: str = "KILL") -> None:
        try:
            await self._call(
                f"kill container {ref}", f"containers/{ref}/kill", "POST", params={"signal": signal}
            )
        except Conflict as exc:
            # Docker: "is not running"; Podman: "can only kill running containers".
            if "not running" not in exc.message and "only kill running" not in exc.message:
                raise

    async def remove_container(self, ref: str) -> None:
        """Force-remove with its anonymous volumes; an already gone container is fine."""
        try:
            await self._call(
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

    async def wait_container(self, ref: str, timeout: float | None = None) -> int:
        result = await self._call(
            f"wait for container {ref}",
            f"containers/{ref}/wait",
            "POST",
            timeout=timeout or 10 * 365 * 24 * 3600.0,
        )
        return int(result.get("StatusCode", -1))

    async def container_logs(self, ref: str, tail_lines: int) -> str:
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
            try:
                async with (
                    self._session() as docker,
                    docker._query(
                        f"containers/{ref}/logs", "GET", params=params, timeout=_LOG_TIMEOUT
                    ) as response,
                ):
                    async for chunk in response.content.iter_chunked(64 * 1024):
                        kept.add(decoder.decode(demux.feed(chunk)).encode())
            except (TimeoutError, DockerError, aiohttp.ClientError, OSError) as exc:
                raise _translate(exc, f"logs of container {ref}") from exc
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

    async def connect_network(self, network: str, ref: str) -> None:
        try:
            await self._call(
                f"connect {ref} to {network}",
                f"networks/{network}/connect",
                "POST",
                body={"Container": ref},
            )
        except (Conflict, BoincdError) as exc:
            if "already exists" not in exc.message and "already connected" not in exc.message:
                raise

    async def disconnect_network(self, network: str, ref: str) -> None:
        try:
            await self._call(
                f"disconnect {ref} from {network}",
                f"networks/{network}/disconnect",
                "POST",
                body={"Container": ref, "Force": True},
            )
        except BoincdError as exc:
            # Podman refuses any network verb on a container created with network
            # "none" ("invalid network mode"): it is connected to nothing already.
            if "not connected" not in exc.message and "invalid network mode" not in exc.message:
                raise

    # -- images ---------------------------------------------------------------

    async def inspect_image(self, ref: str) -> JSON:
        result: JSON = await self._call(f"inspect image {ref}", f"images/{ref}/json")
        return result

    async def image_history(self, ref: str) -> list[JSON]:
        result: list[JSON] = await self._call(f"image history {ref}", f"images/{ref}/history")
        return result

    async def list_images(self, labels: dict[str, str] | None = None) -> list[JSON]:
        params = None
        if labels:
            filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
            params = {"filters": json.dumps(filters)}
        result: list[JSON] = await self._call("list images", "images/json", params=params)
        return result

    async def tag_image(self, ref: str, new_ref: str) -> None:
        repo, _, tag = new_ref.rpartition(":")
        await self._call(
            f"tag image {ref} as {new_ref}",
            f"images/{ref}/tag",
            "POST",
            params={"repo": repo, "tag": tag},
        )

    async def remove_image(self, ref: str) -> list[JSON]:
        try:
            result: list[JSON] = await self._call(f"remove image {ref}", f"images/{ref}", "DELETE")
        except NotFound:
            return []
        return result or []

    async def pull_image(self, ref: str, progress: ProgressCallback | None = None) -> None:
        """Pull and follow the progress stream; the stream's own error lines become ImageError."""
        last = ref.rsplit("/", 1)[-1]
        # `repo@sha256:...` goes whole in fromImage; an empty tag would pull every tag.
        image, _, tag = ref.rpartition(":") if ":" in last and "@" not in last else (ref, "", "")
        params = {"fromImage": image, "tag": tag} if tag else {"fromImage": ref}
        await self._stream(f"pull {ref}", "images/create", params=params, progress=progress)

    async def load_image(
        self,
        tarball: Path | BinaryIO,
        progress: ProgressCallback | None = None,
        *,
        name: str | None = None,
    ) -> list[str]:
        """`docker load` of a tarball (a path, or a file opened by the caller, read
        from where it stands); returns the image ids/refs the engine reports."""
        loaded: list[str] = []
        name = name or (tarball.name if isinstance(tarball, Path) else "archive")

        async def collect(line: JSON) -> None:
            stream = str(line.get("stream", ""))
            for prefix in ("Loaded image ID: ", "Loaded image: "):
                if stream.startswith(prefix):
                    loaded.append(stream[len(prefix) :].strip())
            if progress is not None:
                maybe = progress(line)
                if maybe is not None:
                    await maybe

        # The open file, not its bytes: aiohttp streams it (reading in a worker
        # thread), so a multi-GB archive never sits in the daemon's memory.
        with contextlib.ExitStack() as stack:
            fh = stack.enter_context(tarball.open("rb")) if isinstance(tarball, Path) else tarball
            await self._stream(
                f"load {name}",
                "images/load",
                method="POST",
                params={"quiet": "1"},
                body=fh,
                headers={"Content-Type": "application/x-tar"},
                progress=collect,
            )
        return loaded

    async def build_image(
        self,
        context_tar: bytes | AsyncIterable[bytes],
        tag: str,
        labels: dict[str, str],
        buildargs: dict[str, str],
        progress: ProgressCallback | None = None,
        *,
        network: bool = True,
    ) -> None:
        """`docker build`; the context as bytes or, for any real one, an async
        iterable of pieces, sent as they come (chunked): never whole in memory.
        Without `network`, its steps run with none (BOINC suspended network use)."""
        params = {
            "t": tag,
            "labels": json.dumps(labels),
            "buildargs": json.dumps(buildargs),
            "rm": "1",
            "forcerm": "1",
        }
        if not network:
            params["networkmode"] = "none"
        await self._stream(
            f"build {tag}",
            "build",
            method="POST",
            params=params,
            body=context_tar,
            headers={"Content-Type": "application/x-tar"},
            progress=progress,
        )

    async def _stream(
        self,
        what: str,
        path: str,
        *,
        method: str = "POST",
        params: JSON | None = None,
        body: bytes | BinaryIO | AsyncIterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        try:
            async with (
                self._session() as docker,
                docker._query(
                    path,
                    method,
                    params=params,
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
                ) as response,
            ):
                async for raw_line in response.content:
                    if not raw_line.strip():
                        continue
                    try:
                        line = json.loads(raw_line)
                    except json.JSONDecodeError:
                        continue
                    if line.get("error") or line.get("errorDetail"):
                        detail = line.get("errorDetail") or {}
                        message = f"{what}: {detail.get('message') or line.get('error')}"
                        if _DISK_FULL in message.lower():
                            raise _disk_full(message)
                        raise ImageError(message)
                    if progress is not None:
                        maybe = progress(line)
                        if maybe is not None:
                            await maybe
        except (TimeoutError, DockerError, aiohttp.ClientError, OSError) as exc:
            err = _translate(exc, what)
            if isinstance(err, NotFound | BadRequest):
                raise ImageError(err.message) from exc
            raise err from exc

    # -- volumes --------------------------------------------------------------

    async def list_volumes(self, labels: dict[str, str]) -> list[JSON]:
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        result = await self._call(
            "list volumes", "volumes", params={"filters": json.dumps(filters)}
        )
        return list(result.get("Volumes") or [])

    async def inspect_volume(self, name: str) -> JSON:
        result: JSON = await self._call(f"inspect volume {name}", f"volumes/{name}")
        return result

    async def remove_volume(self, name: str) -> None:
        with contextlib.suppress(NotFound):
            await self._call(f"remove volume {name}", f"volumes/{name}", "DELETE")

    # -- events ---------------------------------------------------------------

    async def events(
        self, labels: dict[str, str], since: float | None = None
    ) -> AsyncIterator[JSON]:
        """Engine events for our objects, until the stream ends (raise Unavailable then)."""
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        async for event in self._event_stream("engine events", filters, since):
            yield event

    async def image_events(self, since: float | None = None) -> AsyncIterator[JSON]:
        """Every image event (pull, load, tag, untag, delete, import...), whoever caused
        it: the disk accounting covers all images, not only ours. Until the stream
        ends (raise Unavailable then)."""
        async for event in self._event_stream("engine image events", {"type": ["image"]}, since):
            yield event

    async def _event_stream(
        self, what: str, filters: dict[str, list[str]], since: float | None
    ) -> AsyncIterator[JSON]:
        params: JSON = {"filters": json.dumps(filters)}
        if since is not None:
            params["since"] = str(int(since))
        try:
            async with (
                self._session() as docker,
                docker._query(
                    "events",
                    "GET",
                    params=params,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=None),
                ) as response,
                response,
            ):
                # The second `response`: aiodocker leaves closing it to us, and an
                # event stream is left early (reconnect, shutdown): close it then.
                async for raw_line in response.content:
                    if raw_line.strip():
                        yield engine_compat.normalize_event(json.loads(raw_line))
        except (TimeoutError, DockerError, aiohttp.ClientError, OSError) as exc:
            raise _translate(exc, what) from exc
        raise Unavailable(f"{what}: the stream ended")
