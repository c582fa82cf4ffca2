"""A task's record: what the daemon knows of one task and its container.

Records are read by every part of the daemon, and written only through the
task store (store.py), which owns them.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psutil

from boincd_containers.core import labels as L
from boincd_containers.core.errors import BoincdError
from boincd_containers.host.priority import Priority
from boincd_containers.tasks.state import LIVE_STATES, TaskKey, TaskState

# Exit codes of a process ended by a signal at host shutdown (SIGKILL, SIGTERM)
# or by the engine losing it (255); an app's own failure rarely looks like these.
_SHUTDOWN_EXIT_CODES = {137, 143, 255}
# The longest an engine's start-up may take to stop the containers a dead engine
# left running (Docker: each container's stop timeout, 10 s by default, all at once).
ENGINE_RESTORE_S = 120.0


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
    state: TaskState = TaskState.PREPARING
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
    # is watch/webgraphics.py's.
    web_graphics_port: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @functools.cached_property
    def key(self) -> TaskKey:
        # A record's project and result are never changed: it is another task then.
        return TaskKey(self.project, self.result)

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
            self.state == TaskState.EXITED
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
            self.state == TaskState.EXITED
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
            and self.state == TaskState.EXITED
            and self.exit_code == 137
            and not self.oom_killed
        )

    @property
    def stopped_by_engine(self) -> bool:
        """Exited after the engine sent it a stop signal in this run: the engine
        shutting down (its events arrive before it goes), or a person's `docker
        stop`. The daemon's own kills are SIGKILLs and are not counted."""
        return (
            self.state == TaskState.EXITED
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
            self.state = TaskState.PAUSED
        elif state.get("Running"):
            self.state = TaskState.RUNNING
        elif status:
            self.state = TaskState.from_engine(status)
        self.pid = int(state.get("Pid") or 0) if self.state in LIVE_STATES else 0
        self.exit_code = int(state.get("ExitCode", 0)) if self.state == TaskState.EXITED else None
        self.oom_killed = bool(state.get("OOMKilled", False))
        self.finished_at = parse_engine_time(str(state.get("FinishedAt", "")))
        self.started_at = parse_engine_time(str(state.get("StartedAt", "")))
        if self.state in (TaskState.RUNNING, TaskState.PAUSED, TaskState.CREATED):
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
