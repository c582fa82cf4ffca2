"""BOINC's memory bound where the engine cannot enforce it.

Rootless engines on cgroup v1 cannot give a container a memory limit (the
adapter then creates it without one and labels it `unenforced=memory`). For
those tasks this loop does what the kernel would have done: it sums the
resident memory of the container's processes (/proc, see host/proctree.py; the
cgroup they sit in is shared with the engine and other containers) and, past
the task's `rsc_memory_bound`, kills the container. BOINC's client does the
same for native apps from the same figure (the resident set of the app's
processes).

The reason goes into the disk-limit feature's record of exceeded limits
(watch/limits.py, kind "memory"), saved before the kill, so the task JSON carries
`limit_exceeded` and the shim fails the task with BOINC's own status for it
(EXIT_MEM_LIMIT_EXCEEDED) and a message a volunteer understands.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from boincd_containers.core.log import get_logger
from boincd_containers.core.supervise import repeat
from boincd_containers.host import proctree
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.state import TaskKey, TaskState
from boincd_containers.watch.enforce import Exceeded, stop_for_limit
from boincd_containers.watch.limits import ExceededLog

if TYPE_CHECKING:
    from boincd_containers.engine.protocols import MemoryWatchEngine
    from boincd_containers.tasks.manager import TaskManager
    from boincd_containers.tasks.registry import Registry

log = get_logger(__name__)
MIB = 1024 * 1024


def watched(record: TaskRecord) -> bool:
    """A running task whose memory bound nobody else enforces."""
    return (
        record.state == TaskState.RUNNING
        and record.pid > 0
        and record.memory_bound > 0
        and "memory" in record.unenforced
    )


class MemoryWatch:
    def __init__(
        self,
        engine: MemoryWatchEngine,
        registry: Registry,
        tasks: TaskManager,
        exceeded: ExceededLog,
        proc_root: str = proctree.PROC_ROOT,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.tasks = tasks
        self.exceeded = exceeded
        self.proc_root = proc_root
        self.rss: dict[TaskKey, int] = {}  # last resident bytes of each watched task

    async def run(self, interval_s: float) -> None:
        await repeat(self.check_all, interval_s, "memory watch")

    async def check_all(self) -> None:
        records = [r for r in self.registry.tasks.values() if watched(r)]
        self.rss = {k: v for k, v in self.rss.items() if k in self.registry.tasks}
        if not records:
            return
        # One /proc scan serves every watched task.
        stats = await asyncio.to_thread(proctree.snapshot, self.proc_root)
        for record in records:
            usage = proctree.usage(record.pid, self.proc_root, stats)
            if usage.processes == 0:
                continue  # exited meanwhile: the registry hears it from the engine
            self.rss[record.key] = usage.rss_bytes
            if usage.rss_bytes > record.memory_bound:
                await self.stop(record, usage.rss_bytes)

    async def stop(self, record: TaskRecord, used: int) -> None:
        def exceeded(record: TaskRecord) -> Exceeded:
            bound = record.memory_bound
            message = (
                f"memory limit exceeded: {used / MIB:.1f} MiB in use, BOINC allows this task "
                f"{bound / MIB:.1f} MiB (this engine cannot limit a container's memory, so "
                "boincd-containers stopped it)"
            )
            return Exceeded("memory", message, used, bound, time.time())

        # watched(): not paused, exited or removed while we looked.
        await stop_for_limit(
            self.engine, self.registry, self.tasks, self.exceeded, record, watched, exceeded
        )

    # -- StatusProvider --------------------------------------------------------------

    def task_fields(self, record: TaskRecord) -> dict[str, Any]:
        return {"memory_watched": "memory" in record.unenforced and record.memory_bound > 0}

    async def status_fields(self) -> dict[str, Any]:
        return {}
