"""Task lifecycle logic against the in-memory engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.core import labels as L
from boincd_containers.core.errors import Conflict, ImageError, NotFound
from boincd_containers.core.settings import Settings
from boincd_containers.images.cache import ImageCache
from boincd_containers.job.spec import parse_request
from boincd_containers.tasks.manager import TaskManager
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.registry import Registry
from boincd_containers.testing.fakes import FakeEngine


class Rig:
    def __init__(self, engine: FakeEngine, state: Path, instance: str = "me") -> None:
        self.engine = engine
        self.registry = Registry(engine, instance)
        self.images = ImageCache(engine, state, instance)
        self.tasks = TaskManager(Settings(), engine, self.registry, self.images)

    async def ready(self, result: str) -> TaskRecord:
        record = self.registry.get(result)
        async with asyncio.timeout(5):
            while record.state == "preparing":
                await record.changed.wait()
        return record


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    engine = FakeEngine()
    rig = Rig(engine, tmp_path)
    yield rig
    await rig.tasks.close()
    await rig.images.close()


def request(
    slot: Path, result: str = "r_0", image: str = "boincd-test/busybox:latest", **kw: Any
) -> Any:
    slot.mkdir(exist_ok=True)
    return parse_request(
        {"result": result, "project": "proj", "slot_dir": str(slot), "image": image, **kw}
    )


async def test_create_or_attach_is_idempotent(rig: Rig, tmp_path: Path) -> None:
    req = request(tmp_path / "slot")
    first = await rig.tasks.create_or_attach(req, 0)
    second = await rig.tasks.create_or_attach(req, 0)
    assert first is second
    record = await rig.ready("r_0")
    assert record.state == "created"
    again = await rig.tasks.create_or_attach(req, 0)
    assert again.container_id == record.container_id
    assert [c for c in rig.engine.calls if c[0] == "create"] == [("create", "boincd__proj__r_0")]


async def test_verbs_drive_the_container(rig: Rig, tmp_path: Path) -> None:
    await rig.tasks.create_or_attach(request(tmp_path / "slot"), 0)
    await rig.ready("r_0")
    assert (await rig.tasks.start("r_0")).state == "running"
    assert (await rig.tasks.pause("r_0")).state == "paused"
    assert (await rig.tasks.pause("r_0")).state == "paused"  # idempotent
    assert (await rig.tasks.resume("r_0")).state == "running"
    record = rig.registry.get("r_0")
    rig.engine.exit(record.container_id, 3)
    waited = await rig.tasks.wait("r_0", 5)
    assert waited.state == "exited"
    assert waited.exit_code == 3
    await rig.tasks.remove("r_0")
    assert rig.engine.containers.by_id == {}
    with pytest.raises(NotFound):
        rig.registry.get("r_0")
    await rig.tasks.remove("r_0")  # removing twice is fine


async def test_sixteen_concurrent_tasks_share_one_pull(rig: Rig, tmp_path: Path) -> None:
    rig.engine.pull_delay = 0.05
    reqs = [request(tmp_path / f"s{i}", f"r_{i}", image="reg/app:1") for i in range(16)]
    await asyncio.gather(*(rig.tasks.create_or_attach(r, 0) for r in reqs))
    records = [await rig.ready(f"r_{i}") for i in range(16)]
    assert {r.state for r in records} == {"created"}
    assert [c for c in rig.engine.calls if c[0] == "pull"] == [("pull", "reg/app:1")]
    assert rig.images.operations == 1


async def test_a_failed_pull_fails_every_waiter_with_the_same_error(
    rig: Rig, tmp_path: Path
) -> None:
    reqs = [request(tmp_path / f"s{i}", f"r_{i}", image="missing/app:1") for i in range(3)]
    await asyncio.gather(*(rig.tasks.create_or_attach(r, 0) for r in reqs))
    records = [await rig.ready(f"r_{i}") for i in range(3)]
    assert {r.state for r in records} == {"failed"}
    assert all(
        isinstance(r.error, ImageError) and "manifest unknown" in r.error.message for r in records
    )
    with pytest.raises(ImageError):
        await rig.tasks.start("r_0")
    assert rig.engine.containers.by_id == {}  # nothing half-created


async def test_a_foreign_container_with_our_name_is_refused_and_left_alone(
    rig: Rig, tmp_path: Path
) -> None:
    foreign = await rig.engine.containers.create(
        "boincd__proj__r_0", {"Image": "boincd-test/busybox:latest", "Labels": {}, "HostConfig": {}}
    )
    with pytest.raises(Conflict, match="does not belong to this daemon"):
        await rig.tasks.create_or_attach(request(tmp_path / "slot"), 0)
    assert foreign in rig.engine.containers.by_id


async def test_registry_rebuilds_from_labels_and_ignores_other_owners(tmp_path: Path) -> None:
    engine = FakeEngine()
    first = Rig(engine, tmp_path / "a")
    (tmp_path / "a").mkdir()
    await first.tasks.create_or_attach(request(tmp_path / "slot"), 0)
    record = await first.ready("r_0")
    await first.tasks.start("r_0")
    other = Rig(engine, tmp_path / "a", instance="someone-else")
    # A new daemon with the same instance id sees the task as it is.
    restarted = Rig(engine, tmp_path / "a")
    await restarted.registry.relist()
    again = restarted.registry.get("r_0")
    assert again.container_id == record.container_id
    assert again.state == "running"
    assert again.slot_dir == str((tmp_path / "slot").resolve())
    # One with another instance id sees nothing of ours.
    await other.registry.relist()
    assert other.registry.tasks == {}
    await first.tasks.close()


async def test_events_keep_the_view_current(rig: Rig, tmp_path: Path) -> None:
    await rig.tasks.create_or_attach(request(tmp_path / "slot"), 0)
    record = await rig.ready("r_0")
    await rig.tasks.start("r_0")
    follower = asyncio.ensure_future(rig.registry.follow(60))
    try:
        rig.engine.exit(record.container_id, 0)
        async with asyncio.timeout(5):
            while record.state != "exited":
                await record.changed.wait()
        assert record.exit_code == 0
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


def test_reboot_interrupted_exit_is_told_from_a_real_exit() -> None:
    record = TaskRecord("r", "p", state="exited", exit_code=137, finished_at=1.0)
    assert record.interrupted_by_reboot
    assert record.interrupted
    record.oom_killed = True
    assert not record.interrupted_by_reboot
    finished = TaskRecord("r", "p", state="exited", exit_code=0, finished_at=1.0)
    assert not finished.interrupted_by_reboot
    import time

    this_boot = TaskRecord("r", "p", state="exited", exit_code=137, finished_at=time.time())
    assert not this_boot.interrupted_by_reboot


async def test_start_restarts_a_container_interrupted_by_reboot(rig: Rig, tmp_path: Path) -> None:
    await rig.tasks.create_or_attach(request(tmp_path / "slot"), 0)
    record = await rig.ready("r_0")
    await rig.tasks.start("r_0")
    data = rig.engine.containers.by_id[record.container_id]
    rig.engine.exit(record.container_id, 143)
    data["State"]["FinishedAt"] = "2000-01-01T00:00:00.123456789Z"
    started = await rig.tasks.start("r_0")
    assert started.state == "running"
    assert data["Config"]["Labels"][L.RESULT] == "r_0"


async def test_relist_keeps_a_task_created_after_the_list_was_taken(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rig.tasks.create_or_attach(request(tmp_path / "slot"), 0)
    record = await rig.ready("r_0")

    async def stale_list(labels: dict[str, str], *, size: bool = False) -> list[dict[str, Any]]:
        return []  # the engine's answer from just before the create

    monkeypatch.setattr(rig.engine.containers, "list", stale_list)
    await rig.registry.relist()
    assert rig.registry.get("r_0") is record
    assert record.state == "created"
    # A container that is really gone is dropped.
    del rig.engine.containers.by_id[record.container_id]
    await rig.registry.relist()
    with pytest.raises(NotFound):
        rig.registry.get("r_0")


def project_request(slot: Path, project: str, result: str = "r_same") -> Any:
    slot.mkdir(exist_ok=True)
    return parse_request(
        {
            "result": result,
            "project": project,
            "slot_dir": str(slot),
            "image": "boincd-test/busybox:latest",
        }
    )


async def test_two_projects_tasks_of_the_same_result_run_at_once(rig: Rig, tmp_path: Path) -> None:
    # Result names are unique per project, not per host: two tasks, two containers.
    a = await rig.tasks.create_or_attach(project_request(tmp_path / "a", "proj_a"), 0)
    b = await rig.tasks.create_or_attach(project_request(tmp_path / "b", "proj_b"), 0)
    assert a is not b
    for record in (a, b):
        async with asyncio.timeout(5):
            while record.state == "preparing":
                await record.changed.wait()
    assert (await rig.tasks.start("r_same", "proj_a")).state == "running"
    assert (await rig.tasks.start("r_same", "proj_b")).state == "running"
    assert a.container_id != b.container_id
    assert {c[1] for c in rig.engine.calls if c[0] == "create"} == {
        "boincd__proj_a__r_same",
        "boincd__proj_b__r_same",
    }
    assert rig.registry.get("r_same", "proj_b") is b
    # Without the project the name is ambiguous: a conflict that names both.
    with pytest.raises(Conflict) as info:
        rig.registry.get("r_same")
    assert "'proj_a'" in info.value.message
    assert "'proj_b'" in info.value.message
    assert not info.value.retryable
    with pytest.raises(Conflict):
        await rig.tasks.pause("r_same")
    # Each verb takes the task its project names, and only that one.
    assert (await rig.tasks.pause("r_same", "proj_a")).state == "paused"
    assert b.state == "running"
    await rig.tasks.remove("r_same", "proj_b")
    assert b.state == "removed"
    assert a.state == "paused"
    assert b.container_id not in rig.engine.containers.by_id
    assert a.container_id in rig.engine.containers.by_id
    # One task of that result left: the project may be left out again.
    assert rig.registry.get("r_same") is a
    assert (await rig.tasks.resume("r_same")).state == "running"
    with pytest.raises(NotFound):
        rig.registry.get("r_same", "proj_b")
