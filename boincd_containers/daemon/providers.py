"""What a part of the daemon adds to task views and to the status answer."""

from __future__ import annotations

from typing import Any, Protocol

from boincd_containers.tasks.record import TaskRecord


class StatusProvider(Protocol):
    def task_fields(self, record: TaskRecord) -> dict[str, Any]:
        """Fields merged into one task's JSON (cpu time, memory, GPUs...)."""
        ...

    async def status_fields(self) -> dict[str, Any]:
        """Top-level fields merged into `ctl status --json` (images, volumes, gpus...)."""
        ...
