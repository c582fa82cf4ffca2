"""Disk limits the BOINC client cannot see: what a task writes inside its container.

The client measures a task's slot dir against ``rsc_disk_bound`` and aborts the
task past it (EXIT_DISK_LIMIT_EXCEEDED). What the app writes anywhere else in
the container, its writable layer and anonymous volumes, is invisible to it, and
so is its output, which the engine keeps in log files. So this feature measures,
per task, slot dir + writable layer + anonymous volumes + log and, past the
bound, kills the container and marks the task ``limit_exceeded`` {``kind``,
``message``, ...}; the shim then fails the task with that message, as the client
does for native apps.

Sizes are apparent sizes (``st_size``, hard links once), as the client's
``dir_size`` and the engine's ``SizeRw`` count them. The writable layer is read
straight from the storage driver's upper dir when the engine names one
(overlay2: ``GraphDriver.Data.UpperDir``) and this process can read it; else
the engine is asked (``inspect?size=true``), which walks the same files itself.
The log is the file the engine names (``LogPath``: Docker's json-file, Podman's
k8s-file) and its rotated siblings (``LogPath.1``...); the engine keeps it within
its size options (taskspec.log_config) whatever this loop does, and counted here
it stops a task that floods its output as one that fills its slot. A pass walks
every task's files, so it runs every ``DISK_INTERVAL_S`` at most, and further
apart when walking costs more (a bounded share of a core).

What was exceeded is saved in the state dir before the kill: a daemon restarted
in between still tells the shim why its container died.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boincd_containers.core.errors import NotFound, StateWriteError
from boincd_containers.core.log import get_logger
from boincd_containers.core.persist import write_json
from boincd_containers.core.supervise import repeat
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.state import LIVE_STATES, TaskKey, TaskState
from boincd_containers.watch.enforce import Exceeded, stop_for_limit

if TYPE_CHECKING:
    from boincd_containers.engine.protocols import LimitsEngine
    from boincd_containers.tasks.manager import TaskManager
    from boincd_containers.tasks.registry import Registry

log = get_logger(__name__)

# BOINC checks a slot dir every 60 s by default (the `disk_interval` preference);
# a writable layer fills no faster than a slot dir, so every 10 s is plenty.
DISK_INTERVAL_S = 10.0
# A pass may take at most this share of wall time: one that walked for 2 s
# waits 40 s before the next.
MAX_DUTY = 0.05
STATE_FILE = "limits.json"
_MEASURED_STATES = (TaskState.RUNNING, TaskState.PAUSED, TaskState.CREATED, TaskState.EXITED)


def tree_bytes(root: str) -> int | None:
    """Apparent size of the files under ``root``, each hard-linked inode once.

    None when ``root`` does not exist. Files that vanish during the walk (the
    app is writing meanwhile) are skipped; an unreadable root raises OSError.
    """
    total = 0
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            entries = os.scandir(path)
        except (FileNotFoundError, NotADirectoryError):
            if path == root:
                return None
            continue
        except PermissionError:
            if path == root:
                raise
            log.debug("unreadable directory left out of a disk measurement", path=path)
            continue
        with entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += st.st_size
    return total


def log_bytes(log_path: str) -> int:
    """Apparent size of a container's log file and its rotated siblings
    (``PATH.1``, ``PATH.2.gz``, Podman's ``PATH.tmp``); 0 when there is none."""
    directory, name = os.path.split(log_path)
    total = 0
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return 0
    with entries:
        for entry in entries:
            if entry.name != name and not entry.name.startswith(name + "."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


@dataclass(frozen=True, slots=True)
class DiskUsage:
    container_id: str
    state: str  # the task's state when measured: a stopped container is measured once
    writable_bytes: int
    volume_bytes: int
    slot_bytes: int
    at: float
    method: str  # "upper_dir" or "engine" (inspect with size)
    log_bytes: int = 0  # the engine's files of the container's output

    @property
    def total_bytes(self) -> int:
        return self.writable_bytes + self.volume_bytes + self.slot_bytes + self.log_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "writable_bytes": self.writable_bytes,
            "volume_bytes": self.volume_bytes,
            "slot_bytes": self.slot_bytes,
            "log_bytes": self.log_bytes,
            "disk_used_bytes": self.total_bytes,
            "disk_sampled_at": self.at,
        }


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where a container keeps its writes on the host (fixed for its life)."""

    upper_dir: str | None
    volume_dirs: tuple[str, ...]
    log_path: str | None = None
    # Inspected once started: Docker names LogPath only then.
    final: bool = True


class ExceededLog:
    """task → what it exceeded, saved as JSON on every change (write, fsync, rename).

    Keyed by str(TaskKey); entries a daemon saved before that key are keyed by
    result alone, and still read (each names its container)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            loaded = {}
        self._items: dict[str, dict[str, Any]] = (
            {str(k): v for k, v in loaded.items() if isinstance(v, dict)}
            if isinstance(loaded, dict)
            else {}
        )

    def get(self, key: TaskKey, container_id: str) -> dict[str, Any] | None:
        """The entry for this container of the task (a new container starts clean)."""
        item = self._items.get(str(key)) or self._items.get(key.result)
        if item is None or item.get("container_id") != container_id:
            return None
        return item

    def results(self) -> list[str]:
        """The tasks of the entries, as saved: str(TaskKey), or a result (older entries)."""
        return list(self._items)

    def set(self, key: TaskKey, item: dict[str, Any]) -> None:
        self._items[str(key)] = item
        self._items.pop(key.result, None)
        self._save()

    def discard(self, name: str) -> None:
        if self._items.pop(name, None) is not None:
            self._save()

    def _save(self) -> None:
        # Never raises: every writer is a limit's kill, which must go on. The entry
        # stays in memory (the task JSON carries it) and the next change saves all.
        try:
            write_json(self.path, self._items, sort_keys=True)
        except StateWriteError as exc:
            log.warning("cannot save the exceeded limits", error=exc.message)


class DiskLimits:
    """Measures every task's disk use and stops the tasks past their bound."""

    def __init__(
        self,
        engine: LimitsEngine,
        registry: Registry,
        tasks: TaskManager,
        state_dir: Path,
        interval_s: float = DISK_INTERVAL_S,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.tasks = tasks
        self.interval_s = interval_s
        self.usage: dict[TaskKey, DiskUsage] = {}
        self.exceeded = ExceededLog(state_dir / STATE_FILE)
        self._layouts: dict[str, _Layout] = {}
        self.passes = 0

    # -- the loop ----------------------------------------------------------------

    async def run(self) -> None:
        await repeat(self.check_all, self.interval_s, "disk limits", max_duty=MAX_DUTY)

    async def check_all(self) -> None:
        """One pass: measure each task that may have changed, enforce, forget the gone."""
        for record in list(self.registry.tasks.values()):
            if not record.container_id or record.state not in _MEASURED_STATES:
                continue
            last = self.usage.get(record.key)
            if (
                record.state not in LIVE_STATES
                and last is not None
                and (last.container_id, last.state) == (record.container_id, record.state)
            ):
                continue  # a stopped container writes nothing more
            try:
                usage = await self.measure(record)
            except NotFound:
                continue  # removed meanwhile: the registry drops it on its event
            self.usage[record.key] = usage
            await self.enforce(record, usage)
        self._forget_gone()
        self.passes += 1

    def _forget_gone(self) -> None:
        live = self.registry.tasks
        for key in list(self.usage):
            if key not in live:
                del self.usage[key]
        ids = {r.container_id for r in live.values()}
        for cid in list(self._layouts):
            if cid not in ids:
                del self._layouts[cid]
        # Only against a complete view: right after a start the registry has
        # not listed the engine yet and would look empty.
        if self.registry.engine_error is None:
            names = {str(k) for k in live} | {k.result for k in live}
            for name in self.exceeded.results():
                if name not in names:
                    self.exceeded.discard(name)

    # -- measuring ---------------------------------------------------------------

    async def _layout(self, container_id: str) -> _Layout:
        layout = self._layouts.get(container_id)
        if layout is None or not layout.final:
            data = await self.engine.containers.inspect(container_id)
            driver = data.get("GraphDriver") or {}
            upper = (driver.get("Data") or {}).get("UpperDir")
            volumes = tuple(
                str(m["Source"])
                for m in data.get("Mounts") or []
                if m.get("Type") == "volume" and m.get("Source")
            )
            log_path = str(data.get("LogPath") or "") or None
            status = str((data.get("State") or {}).get("Status") or "")
            final = log_path is not None or status not in ("created", "configured", "")
            layout = _Layout(str(upper) if upper else None, volumes, log_path, final)
            self._layouts[container_id] = layout
        return layout

    async def measure(self, record: TaskRecord) -> DiskUsage:
        container_id, state = record.container_id, record.state
        layout = await self._layout(container_id)
        writable: int | None = None
        method = "upper_dir"
        if layout.upper_dir is not None:
            try:
                writable = await asyncio.to_thread(tree_bytes, layout.upper_dir)
            except OSError as exc:
                log.debug("upper dir unreadable, asking the engine", error=str(exc))
        if writable is None:
            # No upper dir of ours to read (another storage driver, a remote or
            # rootless engine): the engine walks the same files for SizeRw.
            method = "engine"
            data = await self.engine.containers.inspect(container_id, size=True)
            writable = int(data.get("SizeRw") or 0)
        volumes = 0
        for path in layout.volume_dirs:
            try:
                size = await asyncio.to_thread(tree_bytes, path)
                volumes += size or 0
            except OSError as exc:
                log.debug("volume unreadable, left out", path=path, error=str(exc))
        slot = 0
        if record.slot_dir:
            try:
                slot_size = await asyncio.to_thread(tree_bytes, record.slot_dir)
                slot = slot_size or 0
            except OSError as exc:
                log.debug("slot dir unreadable, left out", path=record.slot_dir, error=str(exc))
        logs = 0
        if layout.log_path is not None:
            try:
                logs = await asyncio.to_thread(log_bytes, layout.log_path)
            except OSError as exc:
                log.debug("log unreadable, left out", path=layout.log_path, error=str(exc))
        return DiskUsage(container_id, state, writable, volumes, slot, time.time(), method, logs)

    # -- enforcing ---------------------------------------------------------------

    async def enforce(self, record: TaskRecord, usage: DiskUsage) -> None:
        bound = record.disk_bound
        if bound <= 0 or usage.total_bytes <= bound or record.state != TaskState.RUNNING:
            return

        def still_over(record: TaskRecord) -> bool:
            # The task may have moved on while we walked its files.
            return record.state == TaskState.RUNNING and record.container_id == usage.container_id

        def exceeded(record: TaskRecord) -> Exceeded:
            return Exceeded(
                "disk",
                f"disk limit exceeded: {usage.total_bytes} bytes of {bound}",
                usage.total_bytes,
                bound,
                usage.at,
                {
                    "writable_bytes": usage.writable_bytes,
                    "volume_bytes": usage.volume_bytes,
                    "slot_bytes": usage.slot_bytes,
                    "log_bytes": usage.log_bytes,
                },
            )

        await stop_for_limit(
            self.engine, self.registry, self.tasks, self.exceeded, record, still_over, exceeded
        )

    # -- StatusProvider ------------------------------------------------------------

    def task_fields(self, record: TaskRecord) -> dict[str, Any]:
        usage = self.usage.get(record.key)
        fields: dict[str, Any] = {
            "writable_bytes": None,
            "volume_bytes": None,
            "slot_bytes": None,
            "log_bytes": None,
            "disk_used_bytes": None,
            "disk_sampled_at": None,
        }
        if usage is not None and usage.container_id == record.container_id:
            fields.update(usage.to_json())
        fields["disk_bound_bytes"] = record.disk_bound or None
        exceeded = self.exceeded.get(record.key, record.container_id)
        fields["limit_exceeded"] = (
            None if exceeded is None else {k: v for k, v in exceeded.items() if k != "container_id"}
        )
        return fields

    async def status_fields(self) -> dict[str, Any]:
        usages = list(self.usage.values())
        return {
            "task_disk": {
                "count": len(usages),
                "writable_bytes": sum(u.writable_bytes for u in usages),
                "volume_bytes": sum(u.volume_bytes for u in usages),
                "slot_bytes": sum(u.slot_bytes for u in usages),
                "log_bytes": sum(u.log_bytes for u in usages),
                "total_bytes": sum(u.total_bytes for u in usages),
            }
        }
