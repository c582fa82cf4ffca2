"""Background loops under supervise(): a failure is logged and the loop restarted,
never passed to the TaskGroup (which would cancel the server and its siblings);
and a container that disappears behind the daemon's back gives its GPU share up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from boincd_containers.core import labels as L
from boincd_containers.core.settings import Settings
from boincd_containers.core.supervise import Background, loop_name, running, supervise
from boincd_containers.daemon.app import Daemon, component
from boincd_containers.host.gpu import GpuAllocator
from boincd_containers.host.gpu.fake import FakeGpuBackend
from boincd_containers.tasks.gpus import GpuService
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.registry import Registry
from boincd_containers.testing.fakes import FakeEngine


async def until(check: object, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # type: ignore[operator]  # noqa: ASYNC110 - counters, no event
            await asyncio.sleep(0.005)


async def test_a_failing_loop_is_restarted_and_its_sibling_keeps_running() -> None:
    runs = 0
    ticks = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError(f"bug number {runs}")
        await asyncio.Event().wait()  # healthy from the third run on

    async def sibling() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    async with asyncio.TaskGroup() as group:
        loops = [
            group.create_task(supervise(flaky, first_backoff_s=0.001)),
            group.create_task(supervise(sibling)),
        ]
        await until(lambda: runs == 3)
        before = ticks
        await until(lambda: ticks > before)
        assert not any(loop.done() for loop in loops)
        for loop in loops:
            loop.cancel()
    assert all(loop.cancelled() for loop in loops)


async def test_a_loop_that_returns_is_done_and_not_restarted() -> None:
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    await supervise(once)
    assert runs == 1


def test_loops_have_names_for_the_log() -> None:
    assert loop_name(Registry.follow) == "Registry.follow"  # type: ignore[arg-type]
    assert loop_name(lambda: asyncio.sleep(0)).startswith("tests.unit.test_supervise:")


async def test_the_daemon_survives_a_crashing_monitor(tmp_path: Path) -> None:
    daemon = Daemon(Settings(state_dir=str(tmp_path / "state"), gpu_backend="none"))
    crashes = 0
    ticks = 0

    async def broken_tick() -> None:
        nonlocal crashes
        crashes += 1
        raise ValueError("a bug in the monitor")

    async def sibling() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    daemon.monitor.tick_in_thread = broken_tick  # type: ignore[method-assign]
    lifecycle = component(lambda: daemon.monitor.run(0.001), sibling)(web.Application())
    await anext(lifecycle)
    try:
        await until(lambda: crashes >= 2)
        before = ticks
        await until(lambda: ticks > before)
    finally:
        with pytest.raises(StopAsyncIteration):
            await anext(lifecycle)


async def test_a_container_removed_behind_the_daemons_back_releases_its_gpu() -> None:
    engine = FakeEngine()
    registry = Registry(engine, "me")
    backend = FakeGpuBackend.with_gpus(1)
    gpus = GpuService(GpuAllocator(backend), registry)
    registry.store.on_drop.append(gpus.dropped)
    labels = {L.OWNER: "me", L.RESULT: "r_gpu", L.PROJECT: "proj"}
    cid = await engine.containers.create(
        "boincd__proj__r_gpu", {"Image": "boincd-test/busybox:latest", "Labels": labels,
                                "HostConfig": {}},
    )  # fmt: skip
    gpus.allocator.allocate("proj/r_gpu", "NVIDIA", 0, 0.5)
    record = TaskRecord("r_gpu", "proj", container_id=cid)
    registry.store.add(record)
    await registry.refresh(record)
    assert gpus.allocator.get("proj/r_gpu") is not None

    del engine.containers.by_id[cid]  # `docker rm -f` by someone else; the event was lost
    await registry.relist()
    assert record.key not in registry.tasks
    assert record.state == "removed"
    assert gpus.allocator.get("proj/r_gpu") is None
    assert gpus.allocator.allocated_units(backend.uuid(0)) == 0


async def test_running_keeps_loops_alive_for_the_block_and_ends_them_after() -> None:
    ticks = 0
    crashes = 0

    async def ticking() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    async def crashing() -> None:
        nonlocal crashes
        crashes += 1
        raise ValueError("a bug")

    before = asyncio.all_tasks()
    async with running(ticking, crashing):
        await until(lambda: ticks >= 3 and crashes >= 1)
        started = asyncio.all_tasks() - before - {asyncio.current_task()}
        assert len(started) == 2
    assert all(task.done() for task in started)
    seen = ticks
    await asyncio.sleep(0.01)
    assert ticks == seen, "a loop ran on after its block"


async def test_background_tasks_fail_alone_and_close_cancels_the_rest() -> None:
    background = Background()
    forever = asyncio.Event()

    async def fails() -> None:
        raise ValueError("this one's own failure")

    failing = background.spawn(fails())
    waiting = background.spawn(forever.wait())
    with pytest.raises(ValueError, match="own failure"):
        await failing
    assert not waiting.done(), "a sibling's failure cancelled nothing"
    assert len(background) == 1
    await background.close()
    assert waiting.cancelled()
    assert len(background) == 0
