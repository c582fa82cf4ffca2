"""One sampling loop for every consumer (shim, ctl, /metrics): CPU time, memory,
network bytes per task, read from cgroup and /proc files, never the engine's
stats API (about 2 s per call here, against about 30 µs for the files)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from .cgroups import CgroupError, CgroupGone, CgroupReader
from .log import get_logger
from .registry import Registry, TaskRecord

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


class Monitor:
    def __init__(self, registry: Registry, reader: CgroupReader | None = None) -> None:
        self.registry = registry
        self.reader = reader or CgroupReader()
        # Kept after a container stops: its last figures are its final ones.
        self.samples: dict[str, Sample] = {}
        self.ticks = 0

    def sample(self, record: TaskRecord) -> Sample | None:
        """Read one task's figures now; None when it has no live cgroup."""
        if not record.pid or not record.container_id:
            return None
        try:
            cg = self.reader.sample(record.container_id, record.pid)
            rx, tx = self.reader.net_dev(record.container_id, record.pid)
        except CgroupGone:
            return None
        except CgroupError as exc:
            log.debug("cannot sample task", result=record.result, error=str(exc))
            return None
        sample = Sample(
            at=time.time(),
            cpu_time_s=cg.cpu_time_ns / 1e9,
            memory_bytes=cg.memory.usage_bytes,
            wss_bytes=cg.memory.working_set_bytes,
            rx_bytes=rx,
            tx_bytes=tx,
        )
        self.samples[record.result] = sample
        return sample

    def tick(self) -> None:
        for record in list(self.registry.tasks.values()):
            if record.state in ("running", "paused"):
                self.sample(record)
        for result in list(self.samples):
            if result not in self.registry.tasks:
                del self.samples[result]
        self.ticks += 1

    async def run(self, interval_s: float) -> None:
        while True:
            self.tick()
            await asyncio.sleep(interval_s)

    def latest(self, result: str) -> Sample:
        return self.samples.get(result, _EMPTY)

    # StatusProvider
    def task_fields(self, record: TaskRecord) -> dict[str, Any]:
        return self.latest(record.result).to_json()

    async def status_fields(self) -> dict[str, Any]:
        return {}
