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
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.registry import Registry
from boincd_containers.tasks.state import TaskKey


def _translate(exc: GpuError) -> BoincdError:
    if isinstance(exc, GpuBusy):
        return ResourceBusy(exc.message)
    if isinstance(exc, GpuUnavailable):
        return Unavailable(exc.message, retryable=exc.retryable)
    return BadRequest(exc.message)


def _shown(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The allocator's snapshot as the API shows it. The allocator holds shares per
    task, named `str(TaskKey)`: result names are unique per project only."""
    devices = [
        {**d, "tasks": [TaskKey.parse(str(t)).result for t in d.get("tasks", [])]}
        for d in snapshot.get("devices", [])
    ]
    shares = []
    for share in snapshot.get("shares", []):
        task = TaskKey.parse(str(share.get("result", "")))
        shares.append({**share, "result": task.result, "project": task.project})
    return {**snapshot, "devices": devices, "shares": shares}


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
                    str(TaskKey(request.project, request.result)),
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
        self.allocator.release(str(key))

    def dropped(self, record: TaskRecord) -> None:
        """TaskStore.on_drop hook: the container is gone, however it went; so is its share."""
        self.allocator.release(str(record.key))

    def restore(self, record: TaskRecord, labels: dict[str, str]) -> None:
        # A card that is gone: the task fails on its own and is collected later.
        with contextlib.suppress(GpuError):
            self.allocator.restore_from_labels(str(record.key), labels)

    def task_fields(self, record: TaskRecord) -> dict[str, Any]:
        return {}

    async def status_fields(self) -> dict[str, Any]:
        return {"gpus": await self.snapshot()}

    async def snapshot(self) -> dict[str, Any]:
        containers = {
            str(r.key): r.container_id for r in self.registry.tasks.values() if r.container_id
        }
        if not self.allocator.snapshot_asks_a_driver():
            # No GPU inventory to ask now (most hosts): no thread. ask_drivers=False
            # holds even if a share was taken since the question.
            snap = self.allocator.snapshot(containers, ask_drivers=False)
            return _shown(snap.to_dict())
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
        data = _shown(snap.to_dict())
        self._last = data
        return data
