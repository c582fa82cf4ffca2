"""One sampling loop for every consumer (shim, ctl, /metrics): CPU time, memory,
network bytes per task, read from cgroup and /proc files, never the engine's
stats API (about 2 s per call here, against about 30 µs for the files).

Network counters are the task's, not an interface's: disconnecting a container
(BOINC suspended the network) removes its interface and the kernel's counters
with it, and a reconnect starts new ones at zero. The BOINC client adds only
increases of `bytes_sent`/`bytes_received` to its transfer history, so counters
that fell back would hide traffic; they are kept monotonic here instead.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from boincd_containers.core.log import get_logger, task_context
from boincd_containers.host import priority, proctree
from boincd_containers.host.cgroups import CgroupError, CgroupGone, CgroupReader, net_dev
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.registry import Registry
from boincd_containers.tasks.state import LIVE_STATES, TaskKey

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    cpu_time_s: float
    memory_bytes: int
    wss_bytes: int
    rx_bytes: int
    tx_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "cpu_time_s": self.cpu_time_s,
            "memory_bytes": self.memory_bytes,
            "wss_bytes": self.wss_bytes,
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "sampled_at": self.at,
        }


_EMPTY = Sample(0.0, 0.0, 0, 0, 0, 0)


@dataclass(slots=True)
class _NetCounter:
    """Raw interface totals → a task total that never decreases.

    When the raw sum falls (an interface went away), what it had counted is
    carried over; traffic between the last sample and the disconnect (under one
    sampling interval) is the only loss.
    """

    container_id: str = ""
    carried: int = 0
    last_raw: int = 0

    def total(self, container_id: str, raw: int) -> int:
        if container_id != self.container_id:
            # Another container for the same result (recreated): its own counters.
            self.container_id, self.carried, self.last_raw = container_id, 0, 0
        if raw < self.last_raw:
            self.carried += self.last_raw
        self.last_raw = raw
        return self.carried + raw


class Monitor:
    def __init__(self, registry: Registry, reader: CgroupReader | None = None) -> None:
        self.registry = registry
        self.reader = reader or CgroupReader()
        # Kept after a container stops: its last figures are its final ones.
        self.samples: dict[TaskKey, Sample] = {}
        self._rx: dict[TaskKey, _NetCounter] = {}
        self._tx: dict[TaskKey, _NetCounter] = {}
        self.ticks = 0
        self._priority_denied: set[TaskKey] = set()  # tasks already logged

    def _measure(
        self, record: TaskRecord, stats: dict[int, proctree.ProcStat] | None = None
    ) -> Sample | None:
        """Read one task's figures (files only: safe in a worker thread); None when
        it has no live cgroup."""
        if not record.pid or not record.container_id:
            return None
        if record.unenforced:
            return self._sample_processes(record, stats)
        try:
            cg = self.reader.sample(record.container_id, record.pid)
            rx, tx = self.reader.net_dev(record.container_id, record.pid)
        except CgroupGone:
            return None
        except CgroupError as exc:
            log.debug("cannot sample task", error=str(exc))
            return None
        return self._figures(
            record, cg.cpu_time_ns, cg.memory.usage_bytes, cg.memory.working_set_bytes, rx, tx
        )

    def _figures(
        self, record: TaskRecord, cpu_ns: int, memory: int, wss: int, rx: int, tx: int
    ) -> Sample:
        """One task's figures; network counters carry over a disconnect."""
        return Sample(
            at=time.time(),
            cpu_time_s=cpu_ns / 1e9,
            memory_bytes=memory,
            wss_bytes=wss,
            rx_bytes=self._rx.setdefault(record.key, _NetCounter()).total(record.container_id, rx),
            tx_bytes=self._tx.setdefault(record.key, _NetCounter()).total(record.container_id, tx),
        )

    def _sample_processes(
        self, record: TaskRecord, stats: dict[int, proctree.ProcStat] | None = None
    ) -> Sample | None:
        """A container without a cgroup of its own (the engine could not apply its
        limits: rootless on cgroup v1) shares one with the engine and other
        containers; its own figures are the sums over its processes."""
        usage = proctree.usage(record.pid, stats=stats)
        if usage.processes == 0:
            return None
        try:
            rx, tx = net_dev(record.pid)
        except CgroupError:
            rx = tx = 0
        return self._figures(record, usage.cpu_time_ns, usage.rss_bytes, usage.rss_bytes, rx, tx)

    def hold_priority(
        self, record: TaskRecord, stats: dict[int, proctree.ProcStat] | None = None
    ) -> None:
        """Lower the container's threads to its task's priority (host/priority.py)."""
        wanted = record.priority
        if wanted is None or not record.pid or not record.container_id:
            return
        try:
            if record.unenforced:  # no cgroup of its own: its process tree
                pids = [p.pid for p in proctree.tree(record.pid, stats=stats)]
                tids = priority.thread_ids_of(pids)
            else:
                tids = self.reader.thread_ids(record.container_id, record.pid)
        except CgroupError:
            return
        held = priority.hold(tids, wanted)
        if held.denied and record.key not in self._priority_denied:
            self._priority_denied.add(record.key)
            log.warning(
                "cannot lower the container's priority", threads=held.denied, nice=wanted.nice
            )

    def tick(self) -> None:
        self._store(self._visit_all(self._live()))

    async def tick_in_thread(self) -> None:
        """The same tick, its file reads and priority calls in a worker thread:
        over many tasks they take milliseconds, which requests arriving meanwhile
        should not wait for. The records to visit are chosen, and the figures
        stored, on the event loop: the thread touches no shared dict."""
        self._store(await asyncio.to_thread(self._visit_all, self._live()))

    def _visit_all(self, records: list[TaskRecord]) -> list[tuple[TaskKey, Sample]]:
        visited = ((record.key, self._visit(record)) for record in records)
        return [(key, sample) for key, sample in visited if sample is not None]

    def _store(self, fresh: list[tuple[TaskKey, Sample]]) -> None:
        self.samples.update(fresh)
        self._forget_gone()

    def _live(self) -> list[TaskRecord]:
        return [r for r in self.registry.tasks.values() if r.state in LIVE_STATES]

    def _visit(self, record: TaskRecord) -> Sample | None:
        # A container without a cgroup of its own is seen through /proc: one scan
        # serves both its figures and its priority.
        stats = proctree.snapshot() if record.unenforced else None
        with task_context(record.project, record.result):
            sample = self._measure(record, stats)
            self.hold_priority(record, stats)
        return sample

    def _forget_gone(self) -> None:
        for key in list(self.samples):
            if key not in self.registry.tasks:
                del self.samples[key]
                self._rx.pop(key, None)
                self._tx.pop(key, None)
                self._priority_denied.discard(key)
        self.ticks += 1

    async def run(self, interval_s: float) -> None:
        while True:
            await self.tick_in_thread()
            await asyncio.sleep(interval_s)

    def latest(self, key: TaskKey) -> Sample:
        return self.samples.get(key, _EMPTY)

    # StatusProvider
    def task_fields(self, record: TaskRecord) -> dict[str, Any]:
        return self.latest(record.key).to_json()

    async def status_fields(self) -> dict[str, Any]:
        return {}
