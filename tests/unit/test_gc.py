"""Garbage collection rules and the collector, against the in-memory engine."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from boincd_containers.core import labels as L
from boincd_containers.core.errors import NotFound, Unavailable
from boincd_containers.core.settings import Settings
from boincd_containers.gc.collector import Collector
from boincd_containers.gc.policy import (
    ContainerFacts,
    LeaseBook,
    SlotState,
    container_verdict,
    parse_time,
    slot_state,
)
from boincd_containers.images.cache import ImageCache
from boincd_containers.job.spec import parse_request
from boincd_containers.tasks.manager import TaskManager
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.registry import Registry
from boincd_containers.tasks.state import TaskKey
from boincd_containers.tasks.store import TaskStore
from boincd_containers.testing.fakes import JSON, FakeContainers, FakeEngine, JSONList

GRACE, LEASE = 100.0, 1000.0
LONG_AGO = "2000-01-01T00:00:00Z"


def results(registry: Registry) -> set[str]:
    return {key.result for key in registry.tasks}


def init_data(slot: Path, result: str) -> Path:
    slot.mkdir(parents=True, exist_ok=True)
    (slot / "init_data.xml").write_text(
        f"<app_init_data>\n<result_name>{result}</result_name>\n</app_init_data>\n"
    )
    return slot


# -- slot states --------------------------------------------------------------------------


def test_slot_state_reads_what_boinc_left(tmp_path: Path) -> None:
    slots = tmp_path / "slots"
    slot = init_data(slots / "0", "r_1")
    assert slot_state(str(slot), "r_1") == (SlotState.OURS, "")
    assert slot_state(str(slot), "r_0") == (SlotState.OTHER, "r_1")
    (slot / "init_data.xml").unlink()
    assert slot_state(str(slot), "r_1") == (SlotState.EMPTY, "")
    slot.rmdir()
    assert slot_state(str(slot), "r_1") == (SlotState.GONE, "")


def test_slot_state_concludes_nothing_it_cannot_know(tmp_path: Path) -> None:
    # The whole slots/ dir missing: perhaps a data disk not mounted yet.
    assert slot_state(str(tmp_path / "unmounted" / "slots" / "0"), "r")[0] is SlotState.UNKNOWN
    assert slot_state("", "r")[0] is SlotState.UNKNOWN
    half = tmp_path / "slots" / "1"
    half.mkdir(parents=True)
    (half / "init_data.xml").write_text("<app_init_data>\n<major_version>7")
    assert slot_state(str(half), "r")[0] is SlotState.UNKNOWN
    not_a_dir = tmp_path / "slots" / "2"
    not_a_dir.write_text("")
    assert slot_state(str(not_a_dir), "r")[0] is SlotState.UNKNOWN


@pytest.mark.parametrize("denied", ["slot", "init_data"])
def test_a_slot_we_may_not_read_is_not_a_slot_that_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, denied: str
) -> None:
    slot = init_data(tmp_path / "slots" / "0", "r")
    real_stat, real_read = os.stat, Path.read_text

    def stat(path: Any, *args: Any, **kwargs: Any) -> Any:
        if denied == "slot" and Path(path) == slot:
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    def read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        if denied == "init_data" and self.name == "init_data.xml":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(Path, "read_text", read_text)
    assert slot_state(str(slot), "r")[0] is SlotState.UNKNOWN


def test_slot_state_unescapes_xml(tmp_path: Path) -> None:
    slot = tmp_path / "slots" / "0"
    slot.mkdir(parents=True)
    (slot / "init_data.xml").write_text("<result_name> a&amp;b_0 </result_name>")
    assert slot_state(str(slot), "a&b_0")[0] is SlotState.OURS


# -- verdicts -------------------------------------------------------------------------------


def facts(slot: SlotState, idle: float, changed: float = 0.0) -> ContainerFacts:
    return ContainerFacts(slot, "/b/slots/0", "r_9", idle_s=idle, slot_changed_for_s=changed)


@pytest.mark.parametrize("slot", list(SlotState))
def test_an_active_shim_keeps_its_task_whatever_the_slot_says(slot: SlotState) -> None:
    assert container_verdict(facts(slot, idle=GRACE - 1, changed=10 * LEASE), GRACE, LEASE) is None


@pytest.mark.parametrize(
    ("slot", "words"),
    [
        (SlotState.GONE, "is gone"),
        (SlotState.OTHER, "now holds result r_9"),
        (SlotState.EMPTY, "cleaned out"),
    ],
)
def test_a_task_boinc_is_done_with_goes_after_the_grace(slot: SlotState, words: str) -> None:
    assert container_verdict(facts(slot, idle=GRACE, changed=GRACE - 1), GRACE, LEASE) is None
    reason = container_verdict(facts(slot, idle=GRACE, changed=GRACE), GRACE, LEASE)
    assert reason is not None
    assert words in reason


@pytest.mark.parametrize("slot", [SlotState.OURS, SlotState.UNKNOWN])
def test_a_live_or_unknown_slot_goes_only_with_the_lease(slot: SlotState) -> None:
    assert container_verdict(facts(slot, idle=LEASE - 1, changed=LEASE), GRACE, LEASE) is None
    reason = container_verdict(facts(slot, idle=LEASE), GRACE, LEASE)
    assert reason is not None
    assert "BOINC client is gone" in reason


def test_parse_time_takes_engine_timestamps() -> None:
    assert parse_time("2024-01-02T03:04:05Z") == 1704164645.0
    assert parse_time("2024-01-02T03:04:05.123456789Z") == pytest.approx(1704164645.123456)
    assert parse_time("2024-01-02T04:04:05+01:00") == 1704164645.0
    assert parse_time("2024-01-02T03:04:05.5-00:30") == 1704166445.5
    assert parse_time("0001-01-01T00:00:00Z") is None
    assert parse_time("yesterday") is None
    assert parse_time("") is None


# -- lease book -------------------------------------------------------------------------------


async def test_lease_book_survives_a_restart_and_only_ever_moves_back(tmp_path: Path) -> None:
    path = tmp_path / "leases.json"
    book = LeaseBook(path, TaskStore())
    records = {
        "a": TaskRecord("a", "p", container_id="c1", last_seen=1000.0),
        "b": TaskRecord("b", "p", container_id="c2", last_seen=2000.0),
        "prep": TaskRecord("prep", "p"),  # no container: nothing to lease
    }
    book.update(records.values(), complete=True)
    await book.save_if_changed()
    assert json.loads(path.read_text()) == {"p/a": 1000.0, "p/b": 2000.0}
    assert not path.with_suffix(".tmp").exists()

    again = LeaseBook(path, TaskStore())
    adopted = TaskRecord("a", "p", container_id="c1")  # last_seen: now
    again.restore(adopted, {})
    assert adopted.last_seen == 1000.0
    fresher = TaskRecord("b", "p", container_id="c2", last_seen=1500.0)
    again.restore(fresher, {})
    assert fresher.last_seen == 1500.0
    # Incomplete views (engine down) keep what they do not mention.
    again.update([records["a"]], complete=False)
    assert set(again.seen) == {"p/a", "p/b"}
    again.update([records["a"]], complete=True)
    assert set(again.seen) == {"p/a"}


def test_lease_book_reads_the_times_saved_by_result_alone(tmp_path: Path) -> None:
    path = tmp_path / "leases.json"
    path.write_text(json.dumps({"a": 1000.0}))  # a daemon before the (project, result) key
    book = LeaseBook(path, TaskStore())
    adopted = TaskRecord("a", "p", container_id="c1")
    book.restore(adopted, {})
    assert adopted.last_seen == 1000.0
    book.update([adopted], complete=True)
    assert book.seen == {"p/a": 1000.0}


async def test_lease_book_saves_only_real_changes_and_survives_a_bad_disk(tmp_path: Path) -> None:
    path = tmp_path / "leases.json"
    book = LeaseBook(path, TaskStore())
    book.seen = {"a": 1000.0}
    await book.save_if_changed(granularity_s=30)
    mtime = path.stat().st_mtime_ns
    book.seen = {"a": 1010.0}
    await book.save_if_changed(granularity_s=30)
    assert path.stat().st_mtime_ns == mtime  # 10 s: not worth a write
    book.seen = {"a": 1040.0}
    (tmp_path / "leases.tmp").mkdir()  # the write cannot happen
    await book.save_if_changed(granularity_s=30)  # logged, not raised
    assert json.loads(path.read_text()) == {"a": 1000.0}
    path.write_text("{not json")
    assert LeaseBook(path, TaskStore()).seen == {}


# -- the collector on the fake engine ---------------------------------------------------------


class GcContainers(FakeContainers):
    """Containers with mounts and writable-layer sizes; removed with their
    anonymous volumes."""

    def __init__(self, engine: GcEngine) -> None:
        super().__init__(engine)
        self.fake = engine

    async def create(self, name: str, config: JSON) -> str:
        cid = await super().create(name, config)
        self.by_id[cid]["Mounts"] = []
        return cid

    async def inspect(self, ref: str, *, size: bool = False) -> JSON:
        data = dict(await super().inspect(ref))
        if size:
            data["SizeRw"] = self.fake.sizes.get(data["Id"], 0)
        return data

    async def list(self, labels: dict[str, str], *, size: bool = False) -> JSONList:
        listed = await super().list(labels)
        for item in listed:
            item["Mounts"] = self.by_id[item["Id"]].get("Mounts", [])
        return listed

    async def remove(self, ref: str) -> None:
        try:
            data = self.get(ref)
        except NotFound:
            return
        for mount in data.get("Mounts", []):
            if len(mount["Name"]) == 64:  # anonymous: `rm -v` takes it
                self.fake.volumes.by_name.pop(mount["Name"], None)
        await super().remove(ref)


class GcEngine(FakeEngine):
    """FakeEngine plus what the collector needs: sizes, mounts, volumes, system df."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[str, int] = {}  # container id or volume name -> bytes
        self.containers: GcContainers = GcContainers(self)

    def mount_volume(
        self, cid: str, name: str, size: int, labels: dict[str, str] | None = None
    ) -> None:
        self.volumes.by_name[name] = {"Name": name, "Labels": labels or {}, "CreatedAt": LONG_AGO}
        self.sizes[name] = size
        self.containers.by_id[cid]["Mounts"].append({"Type": "volume", "Name": name})

    async def system_df(self) -> JSON:
        self.check()
        return {
            "Volumes": [
                {"Name": n, "UsageData": {"Size": self.sizes.get(n, 0), "RefCount": 0}}
                for n in self.volumes.by_name
            ]
        }


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, tmp_path: Path, instance: str = "me") -> None:
        self.tmp = tmp_path
        self.engine = GcEngine()
        self.settings = Settings(
            state_dir=str(tmp_path / "state"), gc_grace_s=GRACE, shim_lease_s=LEASE
        )
        self.state_dir = Path(self.settings.state_dir)
        self.state_dir.mkdir(exist_ok=True)
        engine = self.engine
        self.registry = Registry(engine, instance)
        self.registry.engine_error = None
        self.images = ImageCache(engine, self.state_dir, instance)
        self.tasks = TaskManager(self.settings, engine, self.registry, self.images)
        self.released: list[str] = []
        self.registry.store.on_drop.append(lambda record: self.released.append(record.result))
        self.collector = Collector(self.settings, engine, self.registry, self.tasks, self.state_dir)
        self.clock = Clock()
        self.collector.clock = self.clock

    async def task(self, result: str, slot_index: int, *, start: bool = True) -> TaskRecord:
        slot = init_data(self.tmp / "slots" / str(slot_index), result)
        request = parse_request(
            {
                "result": result,
                "project": "proj",
                "slot_dir": str(slot),
                "image": "boincd-test/busybox:latest",
            }
        )
        record = await self.tasks.create_or_attach(request, 0)
        async with asyncio.timeout(5):
            while record.state == "preparing":
                await record.changed.wait()
        if start:
            await self.tasks.start(result)
        self.seen(record)
        return record

    def seen(self, record: TaskRecord) -> None:
        """A shim asks about the task now (on the collector's clock)."""
        record.last_seen = self.clock.now

    def slot(self, index: int) -> Path:
        return self.tmp / "slots" / str(index)

    def age(self, seconds: float) -> None:
        """Time passes and no shim asks about anything."""
        self.clock.now += seconds


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(tmp_path)
    yield rig
    await rig.tasks.close()
    await rig.images.close()


def removed(report: Any) -> set[tuple[str, str]]:
    return {(r.kind, r.result or r.name) for r in report.removed}


async def test_a_finished_task_goes_after_the_grace_with_its_bytes(rig: Rig) -> None:
    record = await rig.task("done_0", 0)
    rig.engine.sizes[record.container_id] = 12345
    rig.engine.mount_volume(record.container_id, "a" * 64, 777)  # anonymous
    rig.engine.mount_volume(record.container_id, "named-data", 555)  # named: stays
    rig.engine.exit(record.container_id, 0)
    await rig.registry.refresh(record)
    (rig.slot(0) / "init_data.xml").unlink()  # BOINC cleaned the slot out

    rig.age(GRACE)  # the shim is long gone, but the clean-out is news
    assert (await rig.collector.collect()).removed == []
    rig.age(GRACE)
    report = await rig.collector.collect()
    assert [(r.kind, r.name, r.bytes) for r in report.removed] == [
        ("container", "boincd__proj__done_0", 12345),
        ("volume", "a" * 64, 777),
    ]
    assert report.freed_bytes == 13122
    assert rig.engine.containers.by_id == {}
    assert "done_0" not in results(rig.registry)
    assert record.state == "removed"
    assert rig.released == ["done_0"]
    assert set(rig.engine.volumes.by_name) == {"named-data"}


async def test_dry_run_reports_the_same_and_changes_nothing(rig: Rig) -> None:
    record = await rig.task("gone_0", 0)
    rig.engine.sizes[record.container_id] = 42
    keep = await rig.task("keep_0", 1)
    (rig.slot(0) / "init_data.xml").unlink()
    os.rmdir(rig.slot(0))
    await rig.collector.collect()  # notices the slot is gone
    rig.age(GRACE)
    before = json.dumps(rig.engine.containers.by_id, sort_keys=True, default=str)
    calls = len(rig.engine.calls)

    dry = await rig.collector.collect(dry_run=True)
    assert dry.dry_run
    assert [(r.kind, r.result, r.bytes) for r in dry.removed] == [("container", "gone_0", 42)]
    assert json.dumps(rig.engine.containers.by_id, sort_keys=True, default=str) == before
    assert len(rig.engine.calls) == calls  # no verb at all, only reads
    assert results(rig.registry) == {"gone_0", "keep_0"}
    assert rig.collector.last is None or rig.collector.last.removed == []

    real = await rig.collector.collect()
    assert [(r.kind, r.result, r.bytes) for r in real.removed] == [("container", "gone_0", 42)]
    assert results(rig.registry) == {"keep_0"}
    assert keep.container_id in rig.engine.containers.by_id


async def test_a_dry_run_alone_never_starts_the_grace(rig: Rig) -> None:
    await rig.task("gone_0", 0)
    (rig.slot(0) / "init_data.xml").unlink()
    rig.age(GRACE)
    assert (await rig.collector.collect(dry_run=True)).removed == []
    rig.age(GRACE)
    assert (await rig.collector.collect(dry_run=True)).removed == []  # still not noticed
    assert (await rig.collector.collect()).removed == []  # noticed now
    rig.age(GRACE)
    assert removed(await rig.collector.collect()) == {("container", "gone_0")}


async def test_an_active_shim_is_never_collected(rig: Rig) -> None:
    record = await rig.task("busy_0", 0)
    os.remove(rig.slot(0) / "init_data.xml")
    for _ in range(5):
        rig.age(GRACE)
        record.last_seen = rig.clock.now - 1  # the shim asks every second
        assert (await rig.collector.collect()).removed == []
    assert record.container_id in rig.engine.containers.by_id


async def test_the_decision_is_made_again_under_the_results_lock(rig: Rig) -> None:
    """A shim attaching while the collector waits for the lock wins: never a race."""
    record = await rig.task("race_0", 0)
    (rig.slot(0) / "init_data.xml").unlink()
    await rig.collector.collect()
    rig.age(2 * GRACE)
    async with rig.tasks.locked(TaskKey("proj", "race_0")):
        pass_ = asyncio.ensure_future(rig.collector.collect())
        await asyncio.sleep(0.05)
        assert not pass_.done()  # waiting for the lock
        record.last_seen = rig.clock.now  # the shim's create-or-attach, under the lock
        init_data(rig.slot(0), "race_0")
    assert (await pass_).removed == []
    assert record.container_id in rig.engine.containers.by_id


async def test_the_lease_collects_a_task_whose_client_is_gone(rig: Rig) -> None:
    record = await rig.task("old_0", 0)
    await rig.tasks.detach("old_0")  # paused, slot intact: BOINC still has it
    rig.seen(record)
    rig.age(LEASE - 1)
    assert (await rig.collector.collect()).removed == []
    rig.age(1)
    report = await rig.collector.collect()
    assert removed(report) == {("container", "old_0")}
    assert "lease" in report.removed[0].reason
    assert record.container_id not in rig.engine.containers.by_id
    assert not rig.registry.store.is_detached(TaskKey("proj", "old_0"))


async def test_volumes_without_a_container_go_foreign_and_used_ones_stay(rig: Rig) -> None:
    record = await rig.task("vol_0", 0)
    ours = {L.OWNER: "me"}
    rig.engine.mount_volume(record.container_id, "ours-in-use", 10, ours)
    rig.engine.volumes.by_name["ours-free"] = {
        "Name": "ours-free",
        "Labels": ours,
        "CreatedAt": LONG_AGO,
    }
    rig.engine.sizes["ours-free"] = 2048
    rig.engine.volumes.by_name["young"] = {
        "Name": "young",
        "Labels": ours,
        "CreatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rig.clock.now)),
    }
    # No creation time: its age counts from when the collector first saw it.
    rig.engine.volumes.by_name["timeless"] = {"Name": "timeless", "Labels": ours, "CreatedAt": ""}
    rig.engine.volumes.by_name["volunteers"] = {
        "Name": "volunteers",
        "Labels": {},
        "CreatedAt": LONG_AGO,
    }
    rig.engine.volumes.by_name["other-daemon"] = {
        "Name": "other-daemon",
        "Labels": {L.OWNER: "someone-else"},
        "CreatedAt": LONG_AGO,
    }
    dry = await rig.collector.collect(dry_run=True)
    assert [(r.kind, r.name, r.bytes) for r in dry.removed] == [("volume", "ours-free", 2048)]
    assert "ours-free" in rig.engine.volumes.by_name
    report = await rig.collector.collect()
    assert [(r.kind, r.name, r.bytes) for r in report.removed] == [("volume", "ours-free", 2048)]
    assert set(rig.engine.volumes.by_name) == {
        "ours-in-use",
        "young",
        "timeless",
        "volunteers",
        "other-daemon",
    }
    rig.age(GRACE)
    assert [r.name for r in (await rig.collector.collect()).removed] == ["young", "timeless"]
    assert set(rig.engine.volumes.by_name) == {"ours-in-use", "volunteers", "other-daemon"}


async def test_foreign_containers_are_never_judged(rig: Rig) -> None:
    gone = str(rig.tmp / "slots" / "9")
    (rig.tmp / "slots").mkdir(exist_ok=True)
    for owner in ({}, {L.OWNER: "someone-else"}):
        cid = await rig.engine.containers.create(
            f"boincd__proj__x{len(owner)}",
            {
                "Image": "boincd-test/busybox:latest",
                "Labels": {**owner, L.RESULT: f"x{len(owner)}", L.SLOT: gone},
                "HostConfig": {},
            },
        )
        rig.engine.exit(cid, 0)
    rig.age(10 * LEASE)
    await rig.collector.collect()
    rig.age(10 * LEASE)
    assert (await rig.collector.collect()).removed == []
    assert len(rig.engine.containers.by_id) == 2


async def test_reboot_keeps_unfinished_tasks_and_collects_finished_ones(rig: Rig) -> None:
    """After a reboot every container is found exited by a signal: the ones whose
    slot BOINC still holds are started again, the others collected."""
    unfinished = await rig.task("unfinished_0", 0)
    finished = await rig.task("finished_0", 1)
    for record in (unfinished, finished):
        rig.engine.exit(record.container_id, 143)
        rig.engine.containers.by_id[record.container_id]["State"]["FinishedAt"] = (
            "2000-01-01T00:00:00Z"
        )
        await rig.registry.refresh(record)
        assert record.interrupted
    (rig.slot(1) / "init_data.xml").unlink()
    await rig.collector.collect()
    rig.age(GRACE)
    assert removed(await rig.collector.collect()) == {("container", "finished_0")}
    assert (await rig.tasks.start("unfinished_0")).state == "running"


async def test_failed_records_of_vanished_shims_are_forgotten(rig: Rig) -> None:
    request = parse_request(
        {
            "result": "bad_0",
            "project": "proj",
            "slot_dir": str(init_data(rig.slot(0), "bad_0")),
            "image": "missing/app:1",
        }
    )
    record = await rig.tasks.create_or_attach(request, 0)
    async with asyncio.timeout(5):
        while record.state == "preparing":
            await record.changed.wait()
    assert record.state == "failed"
    rig.seen(record)
    await rig.collector.collect()
    assert "bad_0" in results(rig.registry)
    rig.age(GRACE)
    await rig.collector.collect(dry_run=True)
    assert "bad_0" in results(rig.registry)
    assert (await rig.collector.collect()).removed == []  # nothing in the engine
    assert "bad_0" not in results(rig.registry)


async def test_no_collection_without_the_engine(rig: Rig) -> None:
    rig.registry.engine_error = "engine events: engine unreachable"
    with pytest.raises(Unavailable, match="needs the engine"):
        await rig.collector.collect()


async def test_an_engine_that_goes_away_mid_pass_ends_the_pass(rig: Rig) -> None:
    await rig.task("t_0", 0)
    rig.engine.down = True
    with pytest.raises(Unavailable):
        await rig.collector.collect()


async def test_status_and_task_fields(rig: Rig) -> None:
    record = await rig.task("s_0", 0)
    fields = (await rig.collector.status_fields())["gc"]
    assert fields["last_run"] is None
    assert fields["grace_s"] == GRACE
    await rig.collector.collect()
    fields = (await rig.collector.status_fields())["gc"]
    assert fields["last_run"] == rig.clock.now
    assert rig.collector.task_fields(record) == {"last_seen": record.last_seen}


class StubInventory:
    """The image inventory's eviction, as the collector sees it."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    async def evict(self, *, dry_run: bool = False) -> Any:
        self.calls.append(dry_run)
        removed = [{"id": "sha256:" + "e" * 64, "ref": "reg/app:1", "freed_bytes": 4096}]
        return SimpleNamespace(removed=removed, kept=[])


async def test_images_past_the_cache_rules_are_the_inventorys_call(rig: Rig) -> None:
    inventory = StubInventory()
    rig.collector.inventory = cast(Any, inventory)
    dry = await rig.collector.collect(dry_run=True)
    real = await rig.collector.collect()
    assert inventory.calls == [True, False]  # the dry run asks for a dry eviction
    for report in (dry, real):
        assert [(r.kind, r.name, r.bytes) for r in report.removed] == [("image", "reg/app:1", 4096)]
        assert report.freed_bytes == 4096
