"""Inventory logic on the fake engine: the account follows the engine, eviction
is LRU within the budget, pins and foreign images are safe, freed bytes exact."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from boincd_containers.core.settings import Settings
from boincd_containers.gc.inventory import Inventory
from boincd_containers.images.accounting import DiskAccount, HistoryEntry, ImageData
from boincd_containers.images.cache import ImageCache
from boincd_containers.images.eviction import Step, plan_eviction
from boincd_containers.job.spec import parse_request
from boincd_containers.tasks.manager import TaskManager
from boincd_containers.tasks.registry import Registry
from boincd_containers.testing.fake_images import ImageEngine, layer

BASE = layer("base", 1000)
A, B, C = "reg.example/a:1", "reg.example/b:1", "reg.example/c:1"


class Rig:
    def __init__(self, engine: ImageEngine, state: Path, budget: int | None) -> None:
        self.engine = engine
        self.state = state
        settings = Settings(state_dir=str(state), image_cache_budget_bytes=budget)
        self.registry = Registry(engine, "me")
        self.images = ImageCache(engine, state, "me")
        self.tasks = TaskManager(settings, engine, self.registry, self.images)
        self.inventory = Inventory(engine, self.registry, self.images, settings)
        self.images.on_change.append(self.inventory.wake_eviction)
        self.registry.listeners.append(self.inventory.on_container_event)

    async def run_task(self, result: str, image: str) -> str:
        """A task whose container uses `image`; returns the image id."""
        slot = self.state / f"slot-{result}"
        slot.mkdir(exist_ok=True)
        body = {"result": result, "project": f"proj-{result}", "slot_dir": str(slot)}
        record = await self.tasks.create_or_attach(parse_request({**body, "image": image}), 0)
        async with asyncio.timeout(5):
            while record.state == "preparing":
                await record.changed.wait()
        assert record.state == "created", record.error
        return record.image_id

    async def use(self, result: str, image: str) -> str:
        """A task that used `image` and is gone again."""
        image_id = await self.run_task(result, image)
        await self.tasks.remove(result)
        return image_id

    def set_last_used(self, order: list[str]) -> None:
        for n, image_id in enumerate(order):
            self.images.brought[image_id]["last_used"] = 1000.0 + n


@pytest.fixture
def engine() -> ImageEngine:
    fake = ImageEngine()
    fake.push(A, [BASE, layer("a", 100)])
    fake.push(B, [BASE, layer("b", 200)])
    fake.push(C, [BASE, layer("c", 300)])
    return fake


@pytest.fixture
async def rig(engine: ImageEngine, tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(engine, tmp_path, budget=1500)
    yield rig
    await rig.tasks.close()
    await rig.images.close()


async def test_the_account_follows_the_engine_layer_by_layer(rig: Rig, engine: ImageEngine) -> None:
    busybox = 2_000_000
    await rig.use("r_a", A)
    await rig.use("r_b", B)
    await rig.inventory.sync_images()
    assert rig.inventory.account.total_bytes == busybox + 1000 + 100 + 200
    by_ref = {u.ref: u for u in rig.inventory.account.images()}
    assert (by_ref[A].size_bytes, by_ref[A].unique_bytes, by_ref[A].shared_bytes) == (
        1100,
        100,
        1000,
    )
    # Tags change names, not layers; deletes drop exactly the unique layers.
    engine.tag(by_ref[A].id, "volunteer/copy:1")
    await engine.images.remove(by_ref[B].id)
    await rig.inventory.sync_images()
    assert rig.inventory.account.total_bytes == busybox + 1000 + 100
    assert rig.inventory.account.image_usage(by_ref[A].id).refs == (A, "volunteer/copy:1")


async def test_eviction_is_lru_skips_pins_and_foreign_and_reports_exact_bytes(
    rig: Rig, engine: ImageEngine
) -> None:
    foreign = engine.add_image("volunteer/own:1", [BASE, layer("own", 5000)])
    a = await rig.run_task("r_a", A)  # keeps running: pinned
    b = await rig.use("r_b", B)
    c = await rig.use("r_c", C)
    rig.set_last_used([a, b, c])  # a is the oldest, but pinned
    report = await rig.inventory.evict()
    # Ours: base + a + b + c = 1600 > 1500; b is the least recently used unpinned one.
    assert report.cache_bytes_before == 1600
    assert [(r["id"], r["freed_bytes"]) for r in report.removed] == [(b, 200)]
    assert report.cache_bytes_after == 1400
    assert set(engine.store) >= {a, c, foreign}
    assert b not in engine.store

    # The task on a ends: a was used last now. A lower budget takes c, then a;
    # the base layer stays on disk for the foreign image, so a frees only its own.
    await rig.tasks.remove("r_a")
    rig.images.records.touch(a)
    report = await rig.inventory.evict(budget_bytes=1000)
    assert [(r["id"], r["freed_bytes"]) for r in report.removed] == [(c, 300), (a, 100)]
    assert report.cache_bytes_after == 0
    assert foreign in engine.store
    assert rig.images.brought == {}
    assert rig.inventory.account.total_bytes == 2_000_000 + 1000 + 5000


async def test_a_dry_run_removes_nothing_and_shows_the_plan(rig: Rig, engine: ImageEngine) -> None:
    a, b = await rig.use("r_a", A), await rig.use("r_b", B)
    rig.set_last_used([b, a])
    before = set(engine.store)
    report = await rig.inventory.evict(dry_run=True, budget_bytes=0)
    assert [(r["id"], r["freed_bytes"]) for r in report.removed] == [(b, 200), (a, 1100)]
    assert (report.cache_bytes_before, report.cache_bytes_after) == (1300, 0)
    assert set(engine.store) == before
    assert rig.inventory.last_eviction is None


async def test_the_dry_run_keeps_what_the_real_run_keeps(rig: Rig, engine: ImageEngine) -> None:
    a, b = await rig.use("r_a", A), await rig.use("r_b", B)
    rig.set_last_used([b, a])
    engine.tag(b, "volunteer/mine:1")  # the volunteer tagged it: theirs too now
    dry = await rig.inventory.evict(dry_run=True, budget_bytes=0)
    real = await rig.inventory.evict(budget_bytes=0)
    assert [r["id"] for r in dry.removed] == [r["id"] for r in real.removed] == [a]
    assert [k["id"] for k in dry.kept] == [k["id"] for k in real.kept] == [b]
    assert "volunteer/mine:1" in dry.kept[0]["reason"]


async def test_the_images_view_is_kept_until_what_it_shows_changes(
    rig: Rig, engine: ImageEngine
) -> None:
    await rig.use("r_a", A)
    await rig.inventory.sync_images()
    first, again = rig.inventory.images_json(), rig.inventory.images_json()
    assert again["items"] is first["items"]  # nothing changed: not recomputed
    await rig.run_task("r_b", B)  # a new image, pinned by its container
    await rig.inventory.sync_images()
    now = rig.inventory.images_json()
    assert now["items"] is not first["items"]
    pinned = {i["ref"]: i["pinned"] for i in now["items"]}
    assert pinned[B] is True
    assert pinned[A] is False
    await rig.tasks.remove("r_b")
    assert {i["ref"]: i["pinned"] for i in rig.inventory.images_json()["items"]}[B] is False


async def test_pins_are_rebuilt_after_a_restart_from_the_containers(
    engine: ImageEngine, tmp_path: Path
) -> None:
    first = Rig(engine, tmp_path, budget=0)
    a = await first.run_task("r_a", A)
    await first.tasks.close()
    # A new daemon: same state dir and instance, nothing in memory.
    again = Rig(engine, tmp_path, budget=0)
    await again.registry.relist()
    await again.inventory.sync_sizes()
    assert a in again.inventory.pinned()
    report = await again.inventory.evict()
    assert report.removed == []
    assert a in engine.store
    await again.tasks.remove("r_a")
    again.inventory.container_images.clear()
    report = await again.inventory.evict()
    assert [r["id"] for r in report.removed] == [a]
    await again.tasks.close()


async def test_a_container_the_registry_missed_still_pins_its_image(
    rig: Rig, engine: ImageEngine
) -> None:
    a = await rig.use("r_a", A)
    # Between two lists: an image in use by a container the inventory knows of
    # only, or by anyone's container, is refused by the cache itself.
    cid = await engine.containers.create("someone", {"Image": a, "Labels": {}, "HostConfig": {}})
    report = await rig.inventory.evict(budget_bytes=0)
    assert report.removed == []
    assert report.kept == [{**report.kept[0], "id": a, "reason": "a container uses it"}]
    await engine.containers.remove(cid)


async def test_status_fields_attribute_projects_pins_and_reclaimable_bytes(
    rig: Rig, engine: ImageEngine
) -> None:
    a = await rig.run_task("r_a", A)
    b = await rig.use("r_b", B)
    await rig.inventory.sync_images()
    fields = await rig.inventory.status_fields()
    images = fields["images"]
    items = {i["id"]: i for i in images["items"]}
    assert images["count"] == 3
    assert images["total_bytes"] == 2_000_000 + 1000 + 100 + 200
    assert (items[a]["pinned"], items[a]["ours"], items[a]["projects"]) == (
        True,
        True,
        ["proj-r_a"],
    )
    assert (items[b]["pinned"], items[b]["projects"]) == (False, ["proj-r_b"])
    assert items[b]["last_used"] is not None
    busybox = engine.images.by_ref["boincd-test/busybox:latest"]["Id"]
    assert (items[busybox]["ours"], items[busybox]["pinned"]) == (False, False)
    assert images["reclaimable_bytes"] == 200  # b alone; the base stays for a
    assert images["projects"]["proj-r_a"] == {"bytes": 1100, "unique_bytes": 100, "images": 1}
    assert images["projects"]["proj-r_b"] == {"bytes": 1200, "unique_bytes": 200, "images": 1}
    assert images["cache_bytes"] == 1300
    assert images["budget_bytes"] == 1500
    assert fields["volumes"] == {"total_bytes": 0, "count": 0}


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 (a plain condition, no event to wait on)
            await asyncio.sleep(0.01)


async def test_the_loops_follow_events_and_evict_what_was_brought(
    engine: ImageEngine, tmp_path: Path
) -> None:
    rig = Rig(engine, tmp_path, budget=0)
    loops = [
        asyncio.ensure_future(rig.inventory.run()),
        asyncio.ensure_future(rig.registry.follow(60)),
    ]
    try:
        await eventually(lambda: rig.inventory.synced)
        # Someone else's image: the account sees it, the eviction leaves it.
        other = engine.add_image("volunteer/x:1", [layer("x", 42)])
        await eventually(lambda: other in rig.inventory.account)
        # Ours, in use: stays; once its task is gone, evicted on its own (budget 0).
        a = await rig.run_task("r_a", A)
        await eventually(lambda: a in rig.inventory.account)
        assert a in engine.store
        await rig.tasks.remove("r_a")
        await eventually(lambda: a not in engine.store)
        assert other in engine.store
        assert rig.inventory.last_eviction is not None
        assert [r["id"] for r in rig.inventory.last_eviction.removed] == [a]
        assert a not in rig.inventory.account
    finally:
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await rig.tasks.close()


async def test_the_default_budget_is_half_the_free_disk_plus_the_cache(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rig.use("r_a", A)
    await rig.inventory.sync_images()
    rig.inventory.budget_bytes = None
    usage = shutil._ntuple_diskusage(10_000, 4_000, 6_000)  # type: ignore[attr-defined]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    rig.inventory.decide_budget()
    assert rig.inventory.budget_bytes == 1100 + 3_000


async def test_records_of_images_removed_behind_our_back_are_dropped(
    rig: Rig, engine: ImageEngine
) -> None:
    a = await rig.use("r_a", A)
    await rig.inventory.sync_images()
    engine.store.pop(a)  # `docker rmi` by the volunteer
    engine.images.by_ref.pop(A)
    await rig.inventory.evict()
    assert a not in rig.images.brought


async def test_labelled_volumes_are_measured(rig: Rig, engine: ImageEngine, tmp_path: Path) -> None:
    mount = tmp_path / "vol"
    (mount / "d").mkdir(parents=True)
    (mount / "d" / "f").write_bytes(b"x" * 1234)
    (mount / "g").write_bytes(b"y" * 10)
    engine.volumes.by_name = {
        "v1": {"Name": "v1", "Mountpoint": str(mount)},
        "v2": {"Name": "v2", "Mountpoint": ""},
    }
    await rig.inventory.sync_sizes()
    fields = await rig.inventory.status_fields()
    assert fields["volumes"] == {"total_bytes": 1244, "count": 2}
    engine.volumes.by_name = {}
    await rig.inventory.sync_sizes()
    assert (await rig.inventory.status_fields())["volumes"] == {"total_bytes": 0, "count": 0}


def test_plan_counts_shared_layers_once(engine: ImageEngine) -> None:
    def data(image_id: str, layers: list[tuple[str, int]]) -> ImageData:
        made = engine.make(layers)
        return ImageData(
            image_id,
            tuple(made["RootFS"]["Layers"]),
            made["Size"],
            tuple(HistoryEntry(s) for _, s in layers),
        )

    account = DiskAccount()
    for image_id, layers in {
        "x": [BASE, layer("x", 10)],
        "y": [BASE, layer("x", 10), layer("y", 20)],
        "z": [BASE, layer("z", 30)],
    }.items():
        account.add_image(data("sha256:" + image_id * 64, layers))
    x, y, _ = ("sha256:" + c * 64 for c in "xyz")
    plan = plan_eviction(account, {x, y}, [x, y], budget_bytes=0)
    # x's layers all live on in y: removing it frees nothing; y then frees its own
    # and x's; base stays for z (not ours).
    assert [(s.image_id, s.freed_bytes, s.cache_bytes_after) for s in plan] == [
        (x, 0, 1030),
        (y, 30, 0),
    ]
    assert plan_eviction(account, {x, y}, [x, y], budget_bytes=1030) == []  # fits already
    assert plan_eviction(account, {x, y}, [y], budget_bytes=0) == [Step(y, 20, 1010)]


class Loops:
    """The inventory's and the registry's loops, as the daemon runs them."""

    def __init__(self, rig: Rig) -> None:
        self.tasks = [
            asyncio.ensure_future(rig.inventory.run()),
            asyncio.ensure_future(rig.registry.follow(60)),
        ]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_a_stopped_container_is_measured_at_once(
    rig: Rig, engine: ImageEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    loops = Loops(rig)
    try:
        await eventually(lambda: rig.inventory.synced)
        await rig.run_task("r_a", A)
        cid = rig.registry.get("r_a").container_id
        await rig.tasks.start("r_a")
        engine.sizes_rw[cid] = 5000  # written while it ran: the next minute's list would see it
        lists = engine.size_calls.count("list")
        engine.exit(cid, 0)
        await eventually(lambda: rig.inventory.account.container_bytes(cid) == 5000)
        assert engine.size_calls.count("list") == lists  # one inspect, not a list of all
        assert cid in engine.size_calls
        fields = await rig.inventory.status_fields()
        assert fields["containers"] == {"writable_bytes": 5000, "count": 1}
        await rig.tasks.remove("r_a")
        await eventually(lambda: rig.inventory.account.container_bytes(cid) is None)
        assert (await rig.inventory.status_fields())["containers"]["count"] == 0
    finally:
        await loops.close()


async def test_running_containers_are_measured_on_their_clock_while_events_keep_coming(
    rig: Rig, engine: ImageEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boincd_containers.gc.inventory as inventory_module

    monkeypatch.setattr(inventory_module, "_SIZES_EVERY_S", 0.3)
    loops = Loops(rig)
    try:
        await eventually(lambda: rig.inventory.synced)
        await rig.run_task("r_a", A)
        cid = rig.registry.get("r_a").container_id
        await rig.tasks.start("r_a")
        engine.sizes_rw[cid] = 777
        image_id = engine.images.by_ref["boincd-test/busybox:latest"]["Id"]
        async with asyncio.timeout(5):
            while rig.inventory.account.container_bytes(cid) != 777:
                engine.event("tag", image_id)  # a steady stream of image events
                await asyncio.sleep(0.01)
    finally:
        await loops.close()


async def test_a_list_taken_before_an_exit_does_not_undo_its_final_size(
    rig: Rig, engine: ImageEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    await rig.run_task("r_a", A)
    cid = rig.registry.get("r_a").container_id
    engine.sizes_rw[cid] = 100
    gate = asyncio.Event()
    listing = engine.containers.list

    async def slow_list(labels: dict[str, str], *, size: bool = False) -> list[dict[str, object]]:
        found = await listing(labels, size=size)  # taken now, answered later
        await gate.wait()
        return found

    monkeypatch.setattr(engine.containers, "list", slow_list)
    sync = asyncio.ensure_future(rig.inventory.sync_sizes())
    await asyncio.sleep(0.01)
    engine.sizes_rw[cid] = 900  # the task wrote more, then exited
    await rig.inventory.measure_container(cid)
    gate.set()
    await sync
    assert rig.inventory.account.container_bytes(cid) == 900
