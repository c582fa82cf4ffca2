"""BOINC's memory bound where the engine cannot enforce it.

Rootless engines on cgroup v1 cannot give a container a memory limit (the
adapter then creates it without one and labels it `unenforced=memory`). For
those tasks this loop does what the kernel would have done: it sums the
resident memory of the container's processes (/proc, see proctree.py; the
cgroup they sit in is shared with the engine and other containers) and, past
the task's `rsc_memory_bound`, kills the container. BOINC's client does the
same for native apps from the same figure (the resident set of the app's
processes).

The reason goes into the disk-limit feature's record of exceeded limits
(limits.py, kind "memory"), saved before the kill, so the task JSON carries
`limit_exceeded` and the shim fails the task with BOINC's own status for it
(EXIT_MEM_LIMIT_EXCEEDED) and a message a volunteer understands.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from boincd_containers.core.errors import BoincdError, StateWriteError
from boincd_containers.core.log import get_logger
from boincd_containers.host import proctree
from boincd_containers.tasks.registry import TaskRecord
from boincd_containers.watch.limits import LIMITS, ExceededLog

if TYPE_CHECKING:
    from boincd_containers.daemon.service import Daemon
    from boincd_containers.engine.protocols import MemoryWatchEngine
    from boincd_containers.tasks.manager import TaskManager
    from boincd_containers.tasks.registry import Registry

log = get_logger(__name__)
MIB = 1024 * 1024


def watched(record: TaskRecord) -> bool:
    """A running task whose memory bound nobody else enforces."""
    return (
        record.state == "running"
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
        self.rss: dict[str, int] = {}  # last resident bytes of each watched task

    async def run(self, interval_s: float) -> None:
        while True:
            try:
                await self.check_all()
            except BoincdError as exc:
                log.warning("memory watch pass failed", error=exc.message)
            except Exception as exc:  # a bug must not end the daemon's other loops
                log.error("memory watch pass crashed", exc_info=exc)
            await asyncio.sleep(interval_s)

    async def check_all(self) -> None:
        records = [r for r in self.registry.tasks.values() if watched(r)]
        self.rss = {r: v for r, v in self.rss.items() if r in self.registry.tasks}
        if not records:
            return
        # One /proc scan serves every watched task.
        stats = await asyncio.to_thread(proctree.snapshot, self.proc_root)
        for record in records:
            usage = proctree.usage(record.pid, self.proc_root, stats)
            if usage.processes == 0:
                continue  # exited meanwhile: the registry hears it from the engine
            self.rss[record.result] = usage.rss_bytes
            if usage.rss_bytes > record.memory_bound:
                await self.stop(record, usage.rss_bytes)

    async def stop(self, record: TaskRecord, used: int) -> None:
        async with self.tasks.locked(record.result):
            container_id, bound = record.container_id, record.memory_bound
            if not watched(record):
                return  # paused, exited or removed while we looked
            message = (
                f"memory limit exceeded: {used / MIB:.1f} MiB in use, BOINC allows this task "
                f"{bound / MIB:.1f} MiB (this engine cannot limit a container's memory, so "
                "boincd-containers stopped it)"
            )
            # Saved before the kill: a crash in between must not lose the reason.
            self.exceeded.set(
                record.result,
                {
                    "kind": "memory",
                    "message": message,
                    "container_id": container_id,
                    "used_bytes": used,
                    "bound_bytes": bound,
                    "at": time.time(),
                },
            )
            # A SIGKILLed container of a detached task reads as the client's
            # cleanup, which the daemon restarts; this one must stay dead. A state
            # disk that refuses the save keeps it in memory: the kill goes on.
            with contextlib.suppress(StateWriteError):
                self.tasks.detached.discard(record.result)
            log.warning(
                "stopping a task past its memory bound",
                result=record.result,
                used_bytes=used,
                bound_bytes=bound,
            )
            await self.engine.containers.kill(container_id)
            await self.registry.refresh(record)

    # -- StatusProvider --------------------------------------------------------------

    def task_fields(self, record: TaskRecord) -> dict[str, Any]:
        return {"memory_watched": "memory" in record.unenforced and record.memory_bound > 0}

    async def status_fields(self) -> dict[str, Any]:
        return {}


def attach(daemon: Daemon, app: web.Application) -> None:
    """Feature hook (api.FEATURES, after `limits`, whose record of exceeded limits
    this shares so that one `limit_exceeded` field tells the shim either reason)."""
    watch = MemoryWatch(daemon.engine, daemon.registry, daemon.tasks, app[LIMITS].exceeded)
    daemon.extra_status.append(watch)
    daemon.loops.append(lambda: watch.run(daemon.settings.sample_interval_s))
