"""The daemon's view of its task containers, rebuilt from engine labels.

Labels are the truth: on start the registry lists the engine's containers that
carry our owner label, then follows engine events, and re-lists periodically
because events can be lost (engine restarts, dropped streams).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psutil

from boincd_containers.core import labels as L
from boincd_containers.core.errors import BoincdError, NotFound
from boincd_containers.core.log import get_logger
from boincd_containers.engine.protocols import RegistryEngine
from boincd_containers.host.priority import Priority

log = get_logger(__name__)

# Exit codes of a process ended by a signal at host shutdown (SIGKILL, SIGTERM)
# or by the engine losing it (255); an app's own failure rarely looks like these.
_SHUTDOWN_EXIT_CODES = {137, 143, 255}
# The longest an engine's start-up may take to stop the containers a dead engine
# left running (Docker: each container's stop timeout, 10 s by default, all at once).
ENGINE_RESTORE_S = 120.0
# How engines name SIGKILL in "kill" events: the daemon's own kills, not a stop.
_SIGKILL = ("9", "KILL", "SIGKILL")


def _event_time(event: dict[str, Any]) -> float:
    if event.get("timeNano"):
        return int(event["timeNano"]) / 1e9
    return float(event.get("time") or time.time())


def parse_engine_time(text: str) -> float:
    """Engine timestamps have nanoseconds; Python wants at most microseconds."""
    if not text or text.startswith("0001-01-01"):
        return 0.0
    text = text.rstrip("Z")
    if "." in text:
        head, frac = text.split(".", 1)
        frac = "".join(ch for ch in frac if ch.isdigit())[:6]
        text = f"{head}.{frac}"
    return datetime.fromisoformat(text + "+00:00").timestamp()


@dataclass
class TaskRecord:
    result: str
    project: str
    container_id: str = ""
    name: str = ""
    # preparing, waiting (retryable cause), created, running, paused, exited, failed
    state: str = "preparing"
    pid: int = 0
    exit_code: int | None = None
    oom_killed: bool = False
    finished_at: float = 0.0
    slot_dir: str = ""
    project_dir: str = ""
    image: str = ""
    image_id: str = ""
    network: bool = False
    network_connected: bool = False
    disk_bound: int = 0
    memory_bound: int = 0
    gpus: list[str] = field(default_factory=list)
    gpu_usage: float = 0.0
    # Limits the engine could not apply (rootless on cgroup v1), and why, in words.
    unenforced: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: BoincdError | None = None
    progress: str = ""
    last_seen: float = field(default_factory=time.time)
    # Left paused by a shim that quit: see `interrupted`.
    detached: bool = False
    # When the engine's process started (EngineInfo.started_at) and when this run
    # of the container began: see `interrupted_by_reboot` and `stopped_by_engine`.
    engine_started_at: float = 0.0
    # When this daemon first had an answer from that engine process (EngineInfo).
    engine_answered_at: float = 0.0
    started_at: float = 0.0
    # When the daemon lost the engine while this container ran (its event stream
    # broke); 0 once the container is seen running after that (it survived).
    engine_lost_at: float = 0.0
    # When the engine sent the container a stop signal (a "kill" event, not SIGKILL).
    stop_signalled_at: float = 0.0
    # The priority its processes are held to: the one its shim last asked for, else
    # the one it was created with (labels).
    shim_priority: Priority | None = None
    created_priority: Priority | None = None
    # The container port its web graphics are served on (0: none); the host side
    # is webgraphics.py's.
    web_graphics_port: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def priority(self) -> Priority | None:
        return self.shim_priority or self.created_priority

    def notify(self) -> None:
        """Wake everyone waiting for a state change, then re-arm."""
        self.changed.set()
        self.changed = asyncio.Event()

    @property
    def interrupted_by_reboot(self) -> bool:
        """Exited by a signal in an earlier boot, or before the engine last started
        (Docker without live-restore stops every container when it shuts down, e.g.
        for a package upgrade); not by the kernel's OOM killer.

        After a reboot every container of an unfinished task is found exited; an
        app that really finished did so with its own status, not a signal.
        """
        return (
            self.state == "exited"
            and 0 < self.finished_at < max(psutil.boot_time(), self.engine_started_at)
            and (self.exit_code or 0) in _SHUTDOWN_EXIT_CODES
            and not self.oom_killed
        )

    @property
    def interrupted_by_engine_restart(self) -> bool:
        """Stopped by the engine's own start-up: Docker without live-restore stops,
        when it starts again, every container that an engine which died (SIGKILL,
        a crash, the OOM killer) left running, and answers its API only then.

        This run of the container began under an earlier engine process, and it
        ended between that engine's start and its first answer; or the daemon
        saw the engine go away while the container ran and found it exited on
        its return (an engine whose process start is unknown: a remote one).
        """
        if not (
            self.state == "exited"
            and (self.exit_code or 0) in _SHUTDOWN_EXIT_CODES
            and not self.oom_killed
            and self.finished_at > 0
        ):
            return False
        if self.engine_lost_at > 0 and self.finished_at >= self.engine_lost_at:
            return True
        start = self.engine_started_at
        if start <= 0 or not 0 < self.started_at < start:
            return False
        ready = start + ENGINE_RESTORE_S
        if self.engine_answered_at > 0:
            ready = min(ready, self.engine_answered_at)
        return start <= self.finished_at <= ready

    @property
    def killed_while_detached(self) -> bool:
        """SIGKILLed after its shim quit: the BOINC client's cleanup, not the app.

        A client that shuts down reads no more app_status after <quit/>, so the
        shim cannot withdraw other_pid; the client then SIGKILLs the container's
        init when it cleans up (on cgroup v1 the kill waits, pending, until the
        container is unpaused).
        """
        return (
            self.detached
            and self.state == "exited"
            and self.exit_code == 137
            and not self.oom_killed
        )

    @property
    def stopped_by_engine(self) -> bool:
        """Exited after the engine sent it a stop signal in this run: the engine
        shutting down (its events arrive before it goes), or a person's `docker
        stop`. The daemon's own kills are SIGKILLs and are not counted."""
        return (
            self.state == "exited"
            and self.stop_signalled_at >= self.started_at > 0
            and not self.oom_killed
        )

    @property
    def interrupted(self) -> bool:
        """The task did not finish: start the container again (the app resumes
        from its own checkpoint files in the slot)."""
        return (
            self.interrupted_by_reboot
            or self.interrupted_by_engine_restart
            or self.killed_while_detached
            or self.stopped_by_engine
        )

    def apply_inspect(self, data: dict[str, Any]) -> None:
        state = data.get("State") or {}
        config = data.get("Config") or {}
        labels = config.get("Labels") or {}
        self.container_id = str(data.get("Id", self.container_id))
        self.name = str(data.get("Name", self.name)).lstrip("/")
        status = str(state.get("Status", "")).lower()
        if state.get("Paused"):
            status = "paused"
        elif state.get("Running"):
            status = "running"
        elif status in ("configured", "created"):
            status = "created"
        elif status in ("exited", "dead", "stopped"):
            status = "exited"
        self.state = status or self.state
        self.pid = int(state.get("Pid") or 0) if self.state in ("running", "paused") else 0
        self.exit_code = int(state.get("ExitCode", 0)) if self.state == "exited" else None
        self.oom_killed = bool(state.get("OOMKilled", False))
        self.finished_at = parse_engine_time(str(state.get("FinishedAt", "")))
        self.started_at = parse_engine_time(str(state.get("StartedAt", "")))
        if self.state in ("running", "paused", "created"):
            self.engine_lost_at = 0.0  # it outlived the outage, or runs anew
        self.slot_dir = labels.get(L.SLOT, self.slot_dir)
        self.project_dir = labels.get(L.PROJECT_DIR, self.project_dir)
        self.image = labels.get(L.IMAGE, self.image)
        self.image_id = str(data.get("Image", self.image_id))
        self.network = labels.get(L.NETWORK) == "1"
        networks = ((data.get("NetworkSettings") or {}).get("Networks")) or {}
        self.network_connected = any(name != "none" for name in networks)
        self.disk_bound = int(labels.get(L.DISK_BOUND) or 0)
        self.memory_bound = int(labels.get(L.MEMORY_BOUND) or 0)
        self.gpus = [g for g in labels.get(L.GPUS, "").split(",") if g]
        self.gpu_usage = float(labels.get(L.GPU_USAGE) or 0.0)
        self.unenforced = [x for x in labels.get(L.UNENFORCED, "").split(",") if x]
        self.warnings = [w for w in labels.get(L.WARNINGS, "").split("\n") if w]
        self.created_priority = Priority.from_labels(labels)
        port = labels.get(L.WEB_GRAPHICS_PORT, "")
        ok = port.isascii() and port.isdigit() and 0 < int(port) < 65536
        self.web_graphics_port = int(port) if ok else 0
        self.error = None
        self.notify()

    def to_json(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "project": self.project,
            "container_id": self.container_id,
            "name": self.name,
            "state": self.state,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "oom_killed": self.oom_killed,
            "interrupted": self.interrupted,
            "detached": self.detached,
            "slot_dir": self.slot_dir,
            "image": self.image,
            "image_id": self.image_id,
            "network": self.network,
            "network_connected": self.network_connected,
            "gpus": self.gpus,
            "gpu_usage": self.gpu_usage,
            "progress": self.progress,
            "priority": self.priority.to_json() if self.priority else None,
            "warnings": list(self.warnings),
            "error": self.error.to_json()["error"] if self.error else None,
        }


class Registry:
    """Task records keyed by BOINC result name."""

    def __init__(self, engine: RegistryEngine, instance_id: str) -> None:
        self.engine = engine
        self.instance_id = instance_id
        self.tasks: dict[str, TaskRecord] = {}
        self.engine_error: str | None = "not connected yet"
        # Results whose shim quit and left the container paused (kept by TaskManager).
        self.detached: Container[str] = frozenset()
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        # Called for each container adopted on a re-list (GPU shares are rebuilt so).
        self.on_adopt: list[Callable[[TaskRecord, dict[str, str]], None]] = []
        # Called for each record dropped because its container is gone, whoever
        # removed it (a person's `docker rm -f` too): GPU shares are released so.
        self.on_drop: list[Callable[[TaskRecord], None]] = []
        # Called after the first re-list of each connection to the engine.
        self.on_connect: list[Callable[[], Awaitable[None]]] = []

    @property
    def owner_labels(self) -> dict[str, str]:
        return {L.OWNER: self.instance_id}

    def get(self, result: str) -> TaskRecord:
        try:
            return self.tasks[result]
        except KeyError:
            raise NotFound(f"no task for result {result!r}") from None

    def by_container(self, container_id: str) -> TaskRecord | None:
        for record in self.tasks.values():
            if record.container_id == container_id:
                return record
        return None

    async def relist(self) -> None:
        """Make the view equal to the engine's: adopt ours, drop what is gone."""
        containers = await self.engine.containers.list(self.owner_labels)
        seen: set[str] = set()
        for summary in containers:
            labels = summary.get("Labels") or {}
            if not L.is_ours(labels, self.instance_id) or L.RESULT not in labels:
                continue
            try:
                data = await self.engine.containers.inspect(summary["Id"])
            except NotFound:
                continue
            result = labels[L.RESULT]
            record = self.tasks.get(result) or TaskRecord(result, labels.get(L.PROJECT, ""))
            if L.is_legacy_name(str(data.get("Name", ""))):
                data = await self.rename_legacy(data, record.project, result)
            self.apply(record, data)
            if result not in self.tasks:
                for hook in self.on_adopt:
                    hook(record, labels)
            self.tasks[result] = record
            seen.add(result)
        for result, record in list(self.tasks.items()):
            if result not in seen and record.container_id and record.state != "preparing":
                # Absent from the list, but perhaps created after the list was
                # taken: only the engine's own "no such container" drops a record.
                await self.refresh(record)
        self.engine_error = None

    async def rename_legacy(
        self, data: dict[str, Any], project: str, result: str
    ) -> dict[str, Any]:
        """Give a container made under the old `boinc__` name its `boincd__` name, so
        that a BOINC 8.2 client's start-up cleanup leaves it alone; the inspect
        answer after the rename (the one given when the rename fails)."""
        old, new = str(data.get("Name", "")).lstrip("/"), L.container_name(project, result)
        try:
            await self.engine.containers.rename(str(data["Id"]), new)
            data = await self.engine.containers.inspect(str(data["Id"]))
        except BoincdError as exc:
            log.warning(
                "cannot rename a container to its new name", old=old, new=new, error=str(exc)
            )
            return data
        log.info("renamed a container made under the old name", old=old, new=new)
        return data

    def apply(self, record: TaskRecord, data: dict[str, Any]) -> None:
        """Take an inspect answer, with what only the registry knows."""
        record.detached = record.result in self.detached
        info = self.engine.info
        record.engine_started_at = info.started_at if info else 0.0
        record.engine_answered_at = info.answered_at if info else 0.0
        record.apply_inspect(data)

    async def refresh(self, record: TaskRecord) -> TaskRecord:
        try:
            data = await self.engine.containers.inspect(record.container_id)
            self.apply(record, data)
        except NotFound:
            record.state = "removed"
            record.notify()
            if self.tasks.get(record.result) is record:
                del self.tasks[record.result]
                for hook in self.on_drop:
                    try:
                        hook(record)
                    except Exception as exc:  # one hook's bug must not keep the rest
                        log.error("task drop hook failed", result=record.result, exc_info=exc)
        return record

    async def handle_event(self, event: dict[str, Any]) -> None:
        if event.get("Type") != "container":
            return
        actor = event.get("Actor") or {}
        attributes = actor.get("Attributes") or {}
        if attributes.get(L.OWNER) != self.instance_id:
            return  # the engine filter should ensure this; never act on others' objects
        for listener in self.listeners:
            listener(event)
        result = attributes.get(L.RESULT, "")
        record = self.tasks.get(result)
        if record is None:
            record = TaskRecord(
                result, attributes.get(L.PROJECT, ""), container_id=actor.get("ID", "")
            )
            if event.get("Action") == "destroy":
                return
            self.tasks[result] = record
        if record.container_id and record.container_id != actor.get("ID"):
            return  # an event about an older container of the same result
        if not record.container_id and event.get("Action") == "destroy":
            # A container this record never had: the engine undoing a create that
            # failed half-way (a full disk). Taking it would drop the record.
            return
        record.container_id = str(actor.get("ID", record.container_id))
        if event.get("Action") == "kill" and attributes.get("signal") not in (None, *_SIGKILL):
            # Seen before the exit it causes, and only from the engine: remember it
            # now, in case the engine (shutting down) answers nothing more.
            record.stop_signalled_at = _event_time(event)
        await self.refresh(record)

    async def follow(self, relist_interval_s: float) -> None:
        """Follow events forever; re-list on every (re)connect and periodically."""
        backoff = 0.5
        while True:
            try:
                await self.engine.connect()
                since = time.time()
                await self.relist()
                for hook in self.on_connect:
                    await hook()
                backoff = 0.5
                log.info("engine connected", engine=self.engine.info and self.engine.info.kind)
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._periodic_relist(relist_interval_s))
                    async for event in self.engine.events.follow(self.owner_labels, since=since):
                        await self.handle_event(event)
            except* BoincdError as group_error:
                self.engine_error = str(group_error.exceptions[0])
                log.warning("engine unavailable", error=self.engine_error, retry_in_s=backoff)
            except* Exception as group_error:
                # A bug must not stop the daemon from following the engine for good.
                self.engine_error = f"internal error: {group_error.exceptions[0]!r}"
                log.error("event loop failed", exc_info=group_error.exceptions[0])
            self._mark_engine_lost()
            await self.engine.reset()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def _mark_engine_lost(self) -> None:
        """The engine went away (or its stream broke): what ran may be stopped by
        its return (see TaskRecord.interrupted_by_engine_restart)."""
        now = time.time()
        for record in self.tasks.values():
            if record.state in ("running", "paused") and not record.engine_lost_at:
                record.engine_lost_at = now

    async def _periodic_relist(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.relist()
