"""What every benchmark shares: the run's identity and cleanup, statistics, claims,
a raw Engine API client (the baseline), an engine event log, and the machine's facts.

Timings that compare two paths are taken against the engine's own event clock
(`timeNano` of `start`, `pause`, `unpause`, `pull` events): the same end point
for the daemon path and for the baseline, however each got there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent
TEST_IMAGE = "boincd-test/busybox:latest"
# Raw containers of the baselines carry this label with the run id; nothing else is touched.
BENCH_LABEL = "org.boinc.containers.benchmark"
OWNER_LABEL = "org.boinc.containers.owner"


def docker_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        raise SystemExit("DOCKER_HOST must be a local unix socket: cgroups are read on this host")
    return host.removeprefix("unix://")


class BenchError(Exception):
    """Something did not work (as opposed to being slow): the run exits non-zero."""


@dataclass
class Run:
    """One invocation of the suite: its id, scratch dir and size knobs."""

    smoke: bool
    workdir: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    # Where --profile leaves py-spy's raw stacks; None: no profiling.
    profile_dir: Path | None = None
    # Where the results go; daemon logs are kept there for a post-mortem.
    out_dir: Path | None = None

    def n(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full

    def seconds(self, full: float, smoke: float) -> float:
        return smoke if self.smoke else full

    def name(self, *parts: object) -> str:
        """A container/image name no other engineer's run can collide with."""
        return "-".join(["bdbench", self.run_id, *(str(p) for p in parts)])

    @property
    def image_repo(self) -> str:
        return f"boincd-bench-{self.run_id}"


# -- statistics ---------------------------------------------------------------------


def summary(values: Sequence[float], digits: int = 4) -> dict[str, Any]:
    """n, p50, p95 (nearest rank), min, max, mean; empty input gives n = 0."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(0.95 * len(ordered) + 0.5) - 1))
    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), digits),
        "p95": round(ordered[rank], digits),
        "min": round(ordered[0], digits),
        "max": round(ordered[-1], digits),
        "mean": round(statistics.fmean(ordered), digits),
    }


@dataclass
class Claim:
    """One line of the results table: a figure, its baseline and its goal.

    `met` is None where there is no goal, or where the figure is pending (a
    feature not in the daemon yet): the table says so instead of guessing.
    """

    key: str
    what: str
    value: float | None
    unit: str
    goal: str = ""
    met: bool | None = None
    baseline: float | None = None
    baseline_what: str = ""
    note: str = ""
    # BOINC's docker_wrapper's figure for the same measure, same run, same unit.
    docker_wrapper: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def docker_wrapper_ratio(self) -> float | None:
        if self.value is None or not self.docker_wrapper:
            return None
        return self.value / self.docker_wrapper

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "what": self.what,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_what": self.baseline_what,
            "ratio": None if self.ratio is None else float(f"{self.ratio:.4g}"),
            "goal": self.goal,
            "met": self.met,
            "note": self.note,
            "docker_wrapper": self.docker_wrapper,
            "docker_wrapper_ratio": None
            if self.docker_wrapper_ratio is None
            else float(f"{self.docker_wrapper_ratio:.4g}"),
        }


@dataclass
class Result:
    name: str
    claims: list[Claim] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    # 1-min load average when the group started and ended: the host is shared.
    load: tuple[float, float] | None = None

    def claim(self, *args: Any, **kwargs: Any) -> Claim:
        c = Claim(*args, **kwargs)
        self.claims.append(c)
        return c

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": round(self.seconds, 1),
            "load_1m": None if self.load is None else [round(x, 2) for x in self.load],
            "error": self.error,
            "claims": [c.to_json() for c in self.claims],
            "details": self.details,
        }


# -- the raw Engine API: the baseline, and cleanup ------------------------------------


class RawEngine:
    """Docker Engine API over its Unix socket with plain aiohttp, as a tool without
    the daemon would use it. Keep-alive connections, like aiodocker in the daemon."""

    def __init__(self, timeout_s: float = 300.0) -> None:
        connector = aiohttp.UnixConnector(path=docker_socket(), limit=100)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)
        )

    async def close(self) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, *, ok404: bool = False, **kwargs: Any) -> Any:
        async with self.session.request(method, f"http://docker{path}", **kwargs) as resp:
            body = await resp.read()
            if resp.status == 404 and ok404:
                return None
            if resp.status >= 400:
                raise BenchError(f"engine {method} {path}: {resp.status} {body[:300]!r}")
            if not body:
                return None
            if "json" in resp.headers.get("Content-Type", ""):
                try:
                    return json.loads(body)
                except ValueError:
                    # Streaming answers (pull, load) are JSON lines.
                    return [json.loads(line) for line in body.splitlines() if line.strip()]
            return body

    async def stream(self, method: str, path: str, **kwargs: Any) -> list[dict[str, Any]]:
        """A streaming call (pull, load) read to its end; an error line raises."""
        lines: list[dict[str, Any]] = []
        async with self.session.request(method, f"http://docker{path}", **kwargs) as resp:
            if resp.status >= 400:
                raise BenchError(f"engine {method} {path}: {resp.status} {await resp.text()}")
            async for raw in resp.content:
                if raw.strip():
                    line = json.loads(raw)
                    if "error" in line:
                        raise BenchError(f"engine {method} {path}: {line['error']}")
                    lines.append(line)
        return lines

    async def version(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.call("GET", "/version")
        return data

    async def containers(self, label: str) -> list[dict[str, Any]]:
        filters = json.dumps({"label": [label]})
        found: list[dict[str, Any]] = await self.call(
            "GET", "/containers/json", params={"all": "1", "filters": filters}
        )
        return found

    async def remove_labelled(self, label: str) -> int:
        """Remove every container carrying `label` (key=value): ours only, by construction."""
        found = await self.containers(label)
        sem = asyncio.Semaphore(8)

        async def one(cid: str) -> None:
            async with sem:
                await self.call("DELETE", f"/containers/{cid}?force=1&v=1", ok404=True)

        await asyncio.gather(*(one(c["Id"]) for c in found), return_exceptions=True)
        return len(found)

    async def remove_images_with_prefix(self, prefix: str) -> int:
        """Remove images whose every tag starts with `prefix` (this run's repository)."""
        images = await self.call("GET", "/images/json") or []
        removed = 0
        for image in images:
            tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]
            if tags and all(t.startswith(prefix) for t in tags):
                for tag in tags:
                    with contextlib.suppress(BenchError):
                        await self.call("DELETE", f"/images/{tag}", ok404=True)
                removed += 1
        return removed


# -- engine events ---------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    type: str
    action: str
    actor_id: str
    attributes: dict[str, str]
    time_ns: int  # the engine's clock (CLOCK_REALTIME on this host)


class EventLog:
    """Follows the engine's event stream for the run's duration, so that a waiter can
    ask "when did the engine say X" after the fact, with the engine's own timestamp."""

    def __init__(self, engine: RawEngine, types: Sequence[str] = ("container", "image")) -> None:
        self.engine = engine
        self.types = list(types)
        self.events: list[Event] = []
        self._new = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> EventLog:
        self._task = asyncio.create_task(self._follow())
        await asyncio.wait_for(self._ready.wait(), 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _follow(self) -> None:
        filters = json.dumps({"type": self.types})
        params = {"filters": filters, "since": str(int(time.time()) - 1)}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self.engine.session.get(
            "http://docker/events", params=params, timeout=timeout
        ) as resp:
            self._ready.set()
            async for raw in resp.content:
                if not raw.strip():
                    continue
                data = json.loads(raw)
                actor = data.get("Actor") or {}
                event = Event(
                    type=str(data.get("Type", "")),
                    action=str(data.get("Action", data.get("status", ""))),
                    actor_id=str(actor.get("ID", data.get("id", ""))),
                    attributes=dict(actor.get("Attributes") or {}),
                    time_ns=int(data.get("timeNano") or int(data.get("time", 0)) * 10**9),
                )
                async with self._new:
                    self.events.append(event)
                    self._new.notify_all()

    def find(self, match: Callable[[Event], bool], after_ns: int = 0) -> Event | None:
        for event in self.events:
            if event.time_ns >= after_ns and match(event):
                return event
        return None

    async def wait(
        self, match: Callable[[Event], bool], *, after_ns: int = 0, timeout_s: float = 60.0
    ) -> Event:
        async def found() -> Event:
            async with self._new:
                while True:
                    event = self.find(match, after_ns)
                    if event is not None:
                        return event
                    await self._new.wait()

        try:
            return await asyncio.wait_for(found(), timeout_s)
        except TimeoutError:
            raise BenchError(f"no matching engine event within {timeout_s:.0f} s") from None


T = TypeVar("T")


async def timed_calls(n: int, call: Callable[[], Awaitable[T]]) -> tuple[list[float], T | None]:
    """Await `call()` n times in a row: each call's seconds, and the last answer."""
    times: list[float] = []
    last: T | None = None
    for _ in range(n):
        t0 = time.perf_counter()
        last = await call()
        times.append(time.perf_counter() - t0)
    return times, last


def container_event(
    action: str, *, name: str | None = None, cid: str | None = None
) -> Callable[[Event], bool]:
    def match(event: Event) -> bool:
        if event.type != "container" or event.action != action:
            return False
        if cid is not None and event.actor_id != cid:
            return False
        return name is None or event.attributes.get("name") == name

    return match


# -- processes -------------------------------------------------------------------------


async def areap(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """Wait for a child without blocking the event loop; its exit code.

    (Its ru_maxrss from wait4() would not do for a peak RSS: the kernel carries
    the parent's high-water mark across fork+exec, so a child of a 40 MB parent
    "peaks" at 40 MB. `vm_hwm_bytes` reads the exec'd program's own.)
    """
    deadline = time.monotonic() + timeout_s
    while True:
        code = proc.poll()
        if code is not None:
            return code
        if time.monotonic() > deadline:
            raise BenchError(f"process {proc.args!r} did not exit within {timeout_s:.0f} s")
        await asyncio.sleep(0.02)


def kill_quietly(proc: subprocess.Popen[bytes]) -> None:
    if proc.returncode is None and proc.poll() is None:
        proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(10)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def vm_hwm_bytes(pid: int) -> int:
    """Peak resident set size so far (VmHWM) of a live process: the high-water mark
    of its address space since exec, so read just before it exits it is its peak."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.asynccontextmanager
async def cpu_window(process: psutil.Process) -> AsyncIterator[dict[str, float]]:
    """CPU a process used over the block, as a percentage of one core."""
    out: dict[str, float] = {}
    c0, t0 = cpu_seconds(process), time.monotonic()
    yield out
    c1, t1 = cpu_seconds(process), time.monotonic()
    out["cpu_s"] = c1 - c0
    out["wall_s"] = t1 - t0
    out["percent_of_one_core"] = 100.0 * (c1 - c0) / (t1 - t0)


# -- the machine -----------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return ""
    return done.stdout.strip()


async def machine_facts(engine: RawEngine) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    from boincd_containers.host.cgroups import CgroupError, cgroup_mode

    try:
        mode: str = cgroup_mode()
    except CgroupError:
        mode = "none"
    info = await engine.call("GET", "/info")
    ver = await engine.version()
    try:
        ours = version("boincd-containers")
    except PackageNotFoundError:
        ours = "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_bytes": psutil.virtual_memory().total,
        "kernel": platform.release(),
        "cgroup": f"v{2 if mode == 'unified' else 1} ({mode})",
        "python": platform.python_version(),
        "engine": f"Docker {ver.get('Version')} (API {ver.get('ApiVersion')})",
        "storage_driver": info.get("Driver"),
        "boincd_containers": ours,
        "git": (_git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if dirty else ""),
        # Other engineers' and CI's work shares these 2 cores: say how busy it was.
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "containers_running_at_start": int(info.get("ContainersRunning") or 0),
        "images_at_start": int(info.get("Images") or 0),
        "argv": sys.argv[1:],
    }
