"""The daemon's GPU shares are held per task, (project, result): result names
are unique per project only."""

from __future__ import annotations

from pathlib import Path

from boincd_containers.host.gpu import GpuAllocator
from boincd_containers.host.gpu.fake import FakeGpuBackend
from boincd_containers.job.spec import TaskRequest, parse_request
from boincd_containers.tasks.gpus import GpuService
from boincd_containers.tasks.registry import Registry
from boincd_containers.tasks.state import TaskKey
from boincd_containers.testing.fakes import FakeEngine


def _request(tmp_path: Path, project: str) -> TaskRequest:
    slot = tmp_path / project
    slot.mkdir()
    return parse_request(
        {
            "result": "r_same",
            "project": project,
            "slot_dir": str(slot),
            "image": "boincd-test/busybox:latest",
            "gpu": {"type": "NVIDIA", "device_num": 0, "usage": 0.5},
        }
    )


async def test_two_projects_tasks_of_one_result_name_hold_two_shares(tmp_path: Path) -> None:
    backend = FakeGpuBackend.with_gpus(1)
    service = GpuService(GpuAllocator(backend), Registry(FakeEngine(), "me"))
    card = backend.uuid(0)
    await service.apply(_request(tmp_path, "proj_a"), {"HostConfig": {}}, "docker")
    half = service.allocator.allocated_units(card)
    await service.apply(_request(tmp_path, "proj_b"), {"HostConfig": {}}, "docker")
    # The second task got a half of its own, not the first one's again.
    assert half > 0
    assert service.allocator.allocated_units(card) == 2 * half
    shares = (await service.snapshot())["shares"]
    assert sorted((s["project"], s["result"]) for s in shares) == [
        ("proj_a", "r_same"),
        ("proj_b", "r_same"),
    ]
    service.release(TaskKey("proj_a", "r_same"))
    left = (await service.snapshot())["shares"]
    assert [(s["project"], s["result"]) for s in left] == [("proj_b", "r_same")]
    service.allocator.close()
