"""A GPU backend that found no card is not asked again at every status answer,
but a card or driver that appears is still seen, and shares are never hidden."""

from __future__ import annotations

import asyncio

import pytest

from boincd_containers.host.gpu import GpuAllocator
from boincd_containers.host.gpu.allocator import IDLE_RECHECK_S
from boincd_containers.host.gpu.backend import GpuError, GpuUnavailable
from boincd_containers.host.gpu.fake import FakeGpuBackend
from boincd_containers.tasks.gpus import GpuService
from boincd_containers.tasks.registry import Registry
from boincd_containers.testing.fakes import FakeEngine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_backend_without_cards_is_asked_again_only_after_the_recheck_time() -> None:
    clock, empty = Clock(), FakeGpuBackend()
    allocator = GpuAllocator(empty, clock=clock)
    assert allocator.snapshot_asks_a_driver()
    assert allocator.snapshot().devices == ()
    assert empty.calls == 1
    assert not allocator.snapshot_asks_a_driver()
    for _ in range(5):
        allocator.snapshot()
    assert empty.calls == 1, "status answers in between did not scan for cards"
    # A card plugged in (or a driver installed) is seen after the recheck time.
    empty._devices = FakeGpuBackend.with_gpus(1)._devices
    clock.now += IDLE_RECHECK_S
    assert allocator.snapshot_asks_a_driver()
    assert [d.device.uuid for d in allocator.snapshot().devices] == [empty.uuid(0)]
    # A backend with cards is asked every time: their memory and processes change.
    allocator.snapshot()
    assert empty.calls == 3
    assert allocator.snapshot_asks_a_driver()


def test_a_driver_that_is_not_installed_rests_too_but_a_broken_one_does_not() -> None:
    clock, backend = Clock(), FakeGpuBackend()
    allocator = GpuAllocator(backend, clock=clock)
    backend.fail_with = GpuUnavailable("no NVML library", absent=True)
    assert list(allocator.snapshot().errors) == []
    allocator.snapshot()
    assert backend.calls == 1
    clock.now += IDLE_RECHECK_S
    backend.fail_with = GpuUnavailable("NVML: unknown error")
    assert list(allocator.snapshot().errors) == ["NVML: unknown error"]
    allocator.snapshot()
    assert backend.calls == 3, "a failing driver is news at every answer"


def test_allocation_always_asks_and_a_held_vendor_is_always_shown() -> None:
    clock, backend = Clock(), FakeGpuBackend.with_gpus(1)
    allocator = GpuAllocator(backend, clock=clock)
    allocator.allocate("r1", "NVIDIA", 0, 0.5)
    backend.remove_device(backend.uuid(0))
    allocator.snapshot()  # no card now: it would rest, but a task holds a share
    calls = backend.calls
    allocator.snapshot()
    assert backend.calls == calls + 1, "a vendor a task holds is asked every time"
    allocator.release("r1")
    allocator.snapshot()  # nothing held: it rests now
    calls = backend.calls
    allocator.snapshot()
    assert backend.calls == calls
    with pytest.raises(GpuError):
        allocator.allocate("r2", "NVIDIA", 0, 0.5)  # asked anew, and no card
    assert backend.calls == calls + 1


async def test_the_service_needs_no_thread_while_every_backend_rests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock, empty = Clock(), FakeGpuBackend()
    service = GpuService(GpuAllocator(empty, clock=clock), Registry(FakeEngine(), "me"))
    threads: list[object] = []
    real = asyncio.to_thread

    async def counting(fn: object, *args: object) -> object:
        threads.append(fn)
        return await real(fn, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "to_thread", counting)
    await service.snapshot()
    await service.snapshot()
    await service.snapshot()
    assert len(threads) == 1, "only the first answer asked the driver, in a thread"
    clock.now += IDLE_RECHECK_S
    await service.snapshot()
    assert len(threads) == 2
    service.allocator.close()


def test_a_share_taken_while_its_backend_rests_makes_the_snapshot_ask_again() -> None:
    clock, backend = Clock(), FakeGpuBackend()
    allocator = GpuAllocator(backend, clock=clock)
    allocator.snapshot()  # no card: it rests
    assert not allocator.snapshot_asks_a_driver()
    backend._devices = FakeGpuBackend.with_gpus(1)._devices  # the card shows up
    allocator.allocate("r1", "NVIDIA", 0, 0.5)  # allocation asks: it is found
    # The snapshot must not run on the event loop now: it asks the driver.
    assert allocator.snapshot_asks_a_driver()
    assert [d.device.uuid for d in allocator.snapshot().devices] == [backend.uuid(0)]


def test_a_snapshot_told_not_to_ask_drivers_never_calls_one() -> None:
    clock, backend = Clock(), FakeGpuBackend.with_gpus(1)
    allocator = GpuAllocator(backend, clock=clock)
    allocator.snapshot()  # cards seen once
    calls = backend.calls
    # As on the event loop after snapshot_asks_a_driver() said no, and a share
    # was taken (in a worker thread) right after: still no driver call.
    snap = allocator.snapshot(ask_drivers=False)
    assert backend.calls == calls
    assert [d.device.uuid for d in snap.devices] == [backend.uuid(0)], "cards as last seen"
