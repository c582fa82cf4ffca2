"""The daemon's side of GPUs: allocation at create, release at remove, restore
after a restart, and the `gpus` part of status. The allocator itself lives in
the gpu package; this module turns its errors into the daemon's family."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from boincd_containers.core.errors import BadRequest, BoincdError, ResourceBusy, Unavailable
from boincd_containers.host.gpu import (
    GpuAllocator,
    GpuBusy,
    GpuError,
    GpuUnavailable,
    gpu_container_config,
)
from boincd_containers.job.spec import TaskRequest
from boincd_containers.tasks.registry import Registry, TaskRecord
from boincd_containers.tasks.state import TaskKey


def _translate(exc: GpuError) -> BoincdError:
    if isinstance(exc, GpuBusy):
        return ResourceBusy(exc.message)
    if isinstance(exc, GpuUnavailable):
        return Unavailable(exc.message, retryable=exc.retryable)
    return BadRequest(exc.message)


def holder(key: TaskKey) -> str:
    """The allocator's name for a task's holding: "project/result", as result names
    are unique per project only (neither name holds a "/")."""
    return str(key)


def _shown(share: dict[str, Any]) -> dict[str, Any]:
    """A share as the API shows it: its task's result and project apart."""
    project, _, result = str(share.get("result", "")).partition("/")
    return {**share, "result": result, "project": project}


class GpuService:
    def __init__(
        self, allocator: GpuAllocator, registry: Registry, timeout_s: float = 10.0
    ) -> None:
        self.allocator = allocator
        self.registry = registry
        # How long status waits for the GPU inventory before it answers with the
        # last one (the backends have their own deadline per driver call).
        self.timeout_s = timeout_s
        self._last: dict[str, Any] = {"devices": [], "shares": [], "errors": []}

    async def apply(
        self, request: TaskRequest, body: dict[str, Any], engine_kind: str
    ) -> dict[str, Any]:
        """The create body with the task's GPUs (or, for a CPU task, none at all)."""
        assignment = None
        if request.gpu is not None:
            gpu = request.gpu
            try:
                # NVML calls block for milliseconds: keep them off the event loop.
                assignment = await asyncio.to_thread(
                    self.allocator.allocate,
                    holder(TaskKey(request.project, request.result)),
                    gpu.type,
                    gpu.device_num,
                    gpu.usage,
                )
            except GpuError as exc:
                raise _translate(exc) from exc
        if engine_kind == "podman":
            return gpu_container_config(assignment, engine="podman").apply(body)
        return gpu_container_config(assignment, engine="docker").apply(body)

    def release(self, key: TaskKey) -> None:
        self.allocator.release(holder(key))

    def dropped(self, record: TaskRecord) -> None:
        """Registry hook: the container is gone, however it went; so is its share."""
        self.allocator.release(holder(record.key))

    def restore(self, record: TaskRecord, labels: dict[str, str]) -> None:
        # A card that is gone: the task fails on its own and is collected later.
        with contextlib.suppress(GpuError):
            self.allocator.restore_from_labels(holder(record.key), labels)

    def task_fields(self, record: TaskRecord) -> dict[str, Any]:
        return {}

    async def status_fields(self) -> dict[str, Any]:
        return {"gpus": await self.snapshot()}

    async def snapshot(self) -> dict[str, Any]:
        containers = {
            holder(r.key): r.container_id for r in self.registry.tasks.values() if r.container_id
        }
        if not self.allocator.backends:
            # No GPU inventory to ask (most hosts): no driver call, no thread.
            return self._shown(self.allocator.snapshot(containers).to_dict())
        try:
            snap = await asyncio.wait_for(
                asyncio.to_thread(self.allocator.snapshot, containers), self.timeout_s
            )
        except TimeoutError:
            # The thread ends on its own (each driver call has a deadline); the
            # answer cannot wait for it.
            stale = dict(self._last)
            stale["errors"] = [
                *stale.get("errors", []),
                f"the GPU inventory did not answer within {self.timeout_s:g} s: "
                "showing what was last known",
            ]
            return stale
        data = self._shown(snap.to_dict())
        self._last = data
        return data

    @staticmethod
    def _shown(data: dict[str, Any]) -> dict[str, Any]:
        """The snapshot as the API shows it: results and projects, not holders."""
        devices = [
            {**d, "tasks": [str(t).partition("/")[2] for t in d.get("tasks", [])]}
            for d in data.get("devices", [])
        ]
        shares = [_shown(s) for s in data.get("shares", [])]
        return {**data, "devices": devices, "shares": shares}
