"""A hung GPU driver (an NVML call that never returns) must not hang the daemon:
each driver call has a deadline, status answers with the last known cards and
says why, a task asking for a GPU meanwhile waits (retryable), and release()
is never held up behind the stuck call."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincd_containers.core.errors import Unavailable
from boincd_containers.core.settings import Settings
from boincd_containers.daemon.app import Daemon
from boincd_containers.host.gpu import GpuAllocator, GpuTimeout, TimedBackend
from boincd_containers.host.gpu.fake import FakeGpuBackend
from boincd_containers.job.spec import parse_request
from boincd_containers.tasks.gpus import GpuService
from boincd_containers.tasks.registry import Registry
from boincd_containers.testing.fakes import FakeEngine


@pytest.fixture
def fake() -> Iterator[FakeGpuBackend]:
    backend = FakeGpuBackend.with_gpus(2)
    yield backend
    if backend.hang is not None:
        backend.hang.set()  # let the stuck thread end


def test_a_hung_call_times_out_and_the_next_ones_fail_fast(fake: FakeGpuBackend) -> None:
    timed = TimedBackend(fake, timeout_s=0.05)
    assert [d.uuid for d in timed.devices()] == [fake.uuid(0), fake.uuid(1)]
    fake.hang = threading.Event()
    with pytest.raises(GpuTimeout) as info:
        timed.devices()
    assert info.value.retryable
    assert "did not answer" in info.value.message
    calls = fake.calls
    with pytest.raises(GpuTimeout):
        timed.processes(fake.uuid(0))  # no second thread on the stuck driver
    assert fake.calls == calls
    fake.hang.set()
    fake.hang = None
    while True:  # the stuck call returns in its own time; then calls go through again
        try:
            assert len(timed.devices()) == 2
            break
        except GpuTimeout:
            continue
    assert timed.uuid(1) == fake.uuid(1)  # the fake's own controls stay reachable


def test_release_is_not_held_up_by_an_allocation_stuck_in_the_driver(
    fake: FakeGpuBackend,
) -> None:
    allocator = GpuAllocator(TimedBackend(fake, timeout_s=30))
    allocator.allocate("r_a", "NVIDIA", 0, 0.5)
    fake.hang = threading.Event()
    fake.entered.clear()
    failure: list[BaseException] = []

    def allocate() -> None:
        try:
            allocator.allocate("r_b", "NVIDIA", 1, 0.5)
        except GpuTimeout as exc:
            failure.append(exc)

    worker = threading.Thread(target=allocate)
    worker.start()
    fake.entered.wait()
    # The allocation is inside the driver now; the event loop's calls still pass.
    assert allocator.release("r_a") is not None
    assert [a.result for a in allocator.assignments()] == []
    fake.hang.set()
    worker.join()
    assert not failure
    assert allocator.get("r_b") is not None


async def test_status_answers_with_the_last_known_cards_while_the_driver_hangs(
    fake: FakeGpuBackend, tmp_path: Path
) -> None:
    daemon = Daemon(Settings(state_dir=str(tmp_path / "state"), gpu_backend="none"))
    daemon.gpus = GpuService(
        GpuAllocator(TimedBackend(fake, timeout_s=0.05)), daemon.registry, timeout_s=30
    )
    daemon.status_providers = [daemon.monitor, daemon.gpus]
    first = (await daemon.status())["gpus"]
    assert [d["uuid"] for d in first["devices"]] == [fake.uuid(0), fake.uuid(1)]
    assert first["errors"] == []

    fake.hang = threading.Event()
    for _ in range(2):  # the first call meets the hang, the next one the stuck thread
        gpus = (await daemon.status())["gpus"]
        assert [d["uuid"] for d in gpus["devices"]] == [fake.uuid(0), fake.uuid(1)]
        assert any("did not answer" in e for e in gpus["errors"]), gpus["errors"]


async def test_status_does_not_wait_past_its_own_deadline(fake: FakeGpuBackend) -> None:
    """Even a backend without a deadline of its own cannot hold status up."""

    service = GpuService(GpuAllocator(fake), Registry(FakeEngine(), "me"), 0.05)
    known = await service.snapshot()
    fake.hang = threading.Event()
    try:
        stale = await service.snapshot()
    finally:
        fake.hang.set()  # the loop's executor thread must end before the loop closes
    assert stale["devices"] == known["devices"]
    assert stale["errors"][-1].startswith("the GPU inventory did not answer")


async def test_a_gpu_task_waits_while_the_driver_hangs(
    fake: FakeGpuBackend, tmp_path: Path
) -> None:
    slot = tmp_path / "slot"
    slot.mkdir()
    request = parse_request(
        {
            "result": "r_gpu",
            "project": "proj",
            "slot_dir": str(slot),
            "image": "boincd-test/busybox:latest",
            "gpu": {"type": "NVIDIA", "device_num": 0, "usage": 1.0},
        }
    )

    from boincd_containers.tasks.registry import Registry

    service = GpuService(
        GpuAllocator(TimedBackend(fake, timeout_s=0.05)),
        Registry(FakeEngine(), "me"),
    )
    fake.hang = threading.Event()
    with pytest.raises(Unavailable) as info:
        await asyncio.wait_for(service.apply(request, {"HostConfig": {}}, "docker"), 30)
    assert info.value.retryable
