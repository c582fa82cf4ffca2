"""Disk limits: measuring what a task writes outside its slot, and stopping it past its bound."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.core.settings import Settings
from boincd_containers.images.cache import ImageCache
from boincd_containers.job.spec import parse_request
from boincd_containers.tasks.manager import TaskManager
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.registry import Registry
from boincd_containers.testing.fakes import FakeContainers, FakeEngine
from boincd_containers.watch.limits import STATE_FILE, DiskLimits, tree_bytes

MiB = 1 << 20


# -- tree_bytes ------------------------------------------------------------------


def test_tree_bytes_counts_apparent_sizes_and_hard_links_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 1000)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "b").write_bytes(b"y" * 24)
    os.link(tmp_path / "a", tmp_path / "sub" / "a_again")
    (tmp_path / "link").symlink_to("a")  # the link itself: len("a") bytes, not its target
    with (tmp_path / "sparse").open("wb") as fh:
        fh.truncate(5 * MiB)  # BOINC's dir_size counts st_size; so do we
    assert tree_bytes(str(tmp_path)) == 1000 + 24 + 1 + 5 * MiB


def test_tree_bytes_of_a_missing_dir_is_none(tmp_path: Path) -> None:
    assert tree_bytes(str(tmp_path / "nope")) is None
    assert tree_bytes(str(tmp_path)) == 0


# -- the feature on a fake engine ---------------------------------------------------


class SizeContainers(FakeContainers):
    def __init__(self, engine: SizeEngine) -> None:
        super().__init__(engine)
        self.fake = engine

    async def inspect(self, ref: str, *, size: bool = False) -> dict[str, Any]:
        data = dict(await super().inspect(ref))
        fake = self.fake
        if data["Id"] in fake.upper:
            data["GraphDriver"] = {"Name": "overlay2", "Data": {"UpperDir": fake.upper[data["Id"]]}}
        if size:
            fake.size_calls += 1
            data["SizeRw"] = fake.size_rw.get(data["Id"], 0)
        return data


class SizeEngine(FakeEngine):
    """Adds what the limits feature reads: GraphDriver and SizeRw."""

    def __init__(self) -> None:
        super().__init__()
        self.upper: dict[str, str] = {}
        self.size_rw: dict[str, int] = {}
        self.size_calls = 0
        self.containers: SizeContainers = SizeContainers(self)


class Rig:
    def __init__(self, engine: SizeEngine, base: Path) -> None:
        self.engine = engine
        self.base = base
        self.state = base / "state"
        self.registry = Registry(engine, "me")
        self.registry.engine_error = None
        self.images = ImageCache(engine, self.state, "me")
        settings = Settings(state_dir=str(self.state))
        self.tasks = TaskManager(settings, engine, self.registry, self.images)
        self.limits = self.new_limits()

    def new_limits(self) -> DiskLimits:
        """A DiskLimits as a restarted daemon would build it."""
        return DiskLimits(self.engine, self.registry, self.tasks, self.state)

    async def running(self, result: str, disk_bytes: int, upper: bool = True) -> TaskRecord:
        slot = self.base / f"slot_{result}"
        slot.mkdir()
        req = parse_request(
            {
                "result": result,
                "project": "proj",
                "slot_dir": str(slot),
                "image": "boincd-test/busybox:latest",
                "disk_bytes": disk_bytes,
            }
        )
        await self.tasks.create_or_attach(req, 0)
        record = self.registry.get(result)
        async with asyncio.timeout(5):
            while record.state == "preparing":
                await record.changed.wait()
        if upper:
            upper_dir = self.base / f"upper_{result}"
            upper_dir.mkdir()
            self.engine.upper[record.container_id] = str(upper_dir)
        await self.tasks.start(result)
        assert record.state == "running"
        return record

    def upper(self, record: TaskRecord) -> Path:
        return Path(self.engine.upper[record.container_id])


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(SizeEngine(), tmp_path)
    yield rig
    await rig.tasks.close()
    await rig.images.close()


async def test_usage_adds_writable_layer_and_slot_and_stays_under_the_bound(rig: Rig) -> None:
    record = await rig.running("r_ok", disk_bytes=10 * MiB)
    (rig.upper(record) / "data").write_bytes(b"w" * 3000)
    (Path(record.slot_dir) / "out.txt").write_bytes(b"s" * 500)
    await rig.limits.check_all()
    fields = rig.limits.task_fields(record)
    assert fields["writable_bytes"] == 3000
    assert fields["slot_bytes"] == 500
    assert fields["disk_used_bytes"] == 3500
    assert fields["disk_bound_bytes"] == 10 * MiB
    assert fields["limit_exceeded"] is None
    assert record.state == "running"
    status = await rig.limits.status_fields()
    assert status["task_disk"]["writable_bytes"] == 3000
    assert status["task_disk"]["count"] == 1


async def test_past_the_bound_the_container_is_killed_with_the_reason_saved(rig: Rig) -> None:
    record = await rig.running("r_big", disk_bytes=1 * MiB)
    (rig.upper(record) / "fill").write_bytes(b"\0" * (MiB + 100))
    (Path(record.slot_dir) / "out.txt").write_bytes(b"s" * 10)
    rig.tasks.detached.add("r_big")  # re-attached after a quit: must not read as "interrupted"
    await rig.limits.check_all()
    assert record.state == "exited"
    assert record.exit_code == 137
    assert not record.interrupted
    limit = rig.limits.task_fields(record)["limit_exceeded"]
    used = MiB + 110
    assert limit["kind"] == "disk"
    assert limit["message"] == f"disk limit exceeded: {used} bytes of {MiB}"
    assert (limit["used_bytes"], limit["bound_bytes"]) == (used, MiB)
    saved = json.loads((rig.state / STATE_FILE).read_text())
    assert saved[str(record.key)]["message"] == limit["message"]
    # A restarted daemon still tells the shim why the container died.
    again = rig.new_limits()
    assert again.task_fields(record)["limit_exceeded"] == limit


async def test_only_running_tasks_are_stopped_and_a_zero_bound_is_no_limit(rig: Rig) -> None:
    paused = await rig.running("r_paused", disk_bytes=100)
    unbounded = await rig.running("r_free", disk_bytes=0)
    await rig.tasks.pause("r_paused")
    for record in (paused, unbounded):
        (rig.upper(record) / "fill").write_bytes(b"\0" * 1000)
    await rig.limits.check_all()
    assert paused.state == "paused"
    assert unbounded.state == "running"
    assert rig.limits.task_fields(paused)["disk_used_bytes"] == 1000
    assert rig.limits.task_fields(paused)["limit_exceeded"] is None
    # Resumed, it is checked again and stopped.
    await rig.tasks.resume("r_paused")
    await rig.limits.check_all()
    assert paused.state == "exited"
    assert rig.limits.task_fields(paused)["limit_exceeded"]["kind"] == "disk"


async def test_without_an_upper_dir_the_engine_is_asked(rig: Rig) -> None:
    record = await rig.running("r_engine", disk_bytes=10 * MiB, upper=False)
    rig.engine.size_rw[record.container_id] = 4242
    await rig.limits.check_all()
    assert rig.limits.task_fields(record)["writable_bytes"] == 4242
    assert rig.engine.size_calls == 1
    assert rig.limits.usage[record.key].method == "engine"


async def test_stopped_containers_are_measured_once(rig: Rig) -> None:
    record = await rig.running("r_done", disk_bytes=10 * MiB, upper=False)
    rig.engine.exit(record.container_id, 0)
    await rig.registry.refresh(record)
    await rig.limits.check_all()
    await rig.limits.check_all()
    assert rig.engine.size_calls == 1


async def test_a_removed_task_is_forgotten_and_its_entry_pruned(rig: Rig) -> None:
    record = await rig.running("r_gone", disk_bytes=100)
    (rig.upper(record) / "fill").write_bytes(b"\0" * 1000)
    await rig.limits.check_all()
    assert rig.limits.exceeded.results() == [str(record.key)]
    await rig.tasks.remove("r_gone")
    await rig.limits.check_all()
    assert rig.limits.usage == {}
    assert rig.limits.exceeded.results() == []
    assert json.loads((rig.state / STATE_FILE).read_text()) == {}


async def test_a_new_container_of_the_same_result_starts_clean(rig: Rig) -> None:
    record = await rig.running("r_same", disk_bytes=100)
    (rig.upper(record) / "fill").write_bytes(b"\0" * 1000)
    await rig.limits.check_all()
    old = record.container_id
    record.container_id = "another"
    assert rig.limits.task_fields(record)["limit_exceeded"] is None
    assert rig.limits.task_fields(record)["writable_bytes"] is None
    record.container_id = old
    assert rig.limits.task_fields(record)["limit_exceeded"] is not None
