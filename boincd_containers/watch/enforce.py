"""Stopping a task past a limit the BOINC client cannot see: one routine for the
disk limit (watch/limits.py) and the memory limit (watch/memwatch.py).

Under the task's lock, once the limit's own check says the task is still past
it: the reason is saved first (a daemon that crashes before the kill still tells
the shim why its container died), the task's detached mark is dropped (a
SIGKILLed container of a detached task reads as the client's cleanup, which the
daemon restarts; this one must stay dead), then the container is killed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from boincd_containers.core.log import get_logger
from boincd_containers.tasks.record import TaskRecord

if TYPE_CHECKING:
    from boincd_containers.engine.protocols import MemoryWatchEngine
    from boincd_containers.tasks.manager import TaskManager
    from boincd_containers.tasks.registry import Registry
    from boincd_containers.watch.limits import ExceededLog

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Exceeded:
    """What a task exceeded: its `limit_exceeded` entry (task JSON, limits.json)."""

    kind: str  # "disk", "memory"
    message: str
    used_bytes: int
    bound_bytes: int
    at: float
    # The limit's own figures (the disk limit's parts of the total).
    details: dict[str, int] = field(default_factory=dict)

    def entry(self, container_id: str) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "container_id": container_id,
            "used_bytes": self.used_bytes,
            "bound_bytes": self.bound_bytes,
            **self.details,
            "at": self.at,
        }


async def stop_for_limit(
    engine: MemoryWatchEngine,
    registry: Registry,
    tasks: TaskManager,
    exceeded_log: ExceededLog,
    record: TaskRecord,
    still_over: Callable[[TaskRecord], bool],
    exceeded: Callable[[TaskRecord], Exceeded],
) -> bool:
    """Stop the task for `exceeded` unless, under its lock, `still_over` says it
    moved on meanwhile (paused, exited, another container); True when stopped."""
    async with tasks.locked(record.key):
        if not still_over(record):
            return False
        what = exceeded(record)
        container_id = record.container_id
        # Saved before the kill: a crash in between must not lose the reason.
        exceeded_log.set(record.key, what.entry(container_id))
        # A state disk that refuses the save keeps it in memory: the kill goes on.
        registry.store.clear_detached(record.key, strict=False)
        log.warning(
            f"stopping a task past its {what.kind} bound",
            used_bytes=what.used_bytes,
            bound_bytes=what.bound_bytes,
            **what.details,
        )
        await engine.containers.kill(container_id)
        await registry.refresh(record)
        return True
