"""The one wiring point: every component built once, hooked up in one place,
started bottom-up and torn down in reverse."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiohttp import web

from boincd_containers.core.settings import Settings
from boincd_containers.daemon import keys
from boincd_containers.daemon.app import Daemon, make_app
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.state import TaskState
from boincd_containers.testing.fakes import FakeEngine
from boincd_containers.watch.monitor import Sample


def _daemon(tmp_path: Path) -> tuple[Daemon, FakeEngine]:
    engine = FakeEngine()
    settings = Settings(state_dir=str(tmp_path / "state"), gpu_backend="none", gc_interval_s=0)
    return Daemon(settings, engine=engine), engine


def test_the_engine_is_passed_in_and_shared_by_every_component(tmp_path: Path) -> None:
    daemon, engine = _daemon(tmp_path)
    users = [daemon.registry, daemon.images, daemon.tasks, daemon.limits, daemon.memwatch]
    users += [daemon.inventory, daemon.collector]
    assert all(part.engine is engine for part in users)
    assert daemon.collector.inventory is daemon.inventory
    assert daemon.memwatch.exceeded is daemon.limits.exceeded


def test_hooks_are_registered_once(tmp_path: Path) -> None:
    daemon, _ = _daemon(tmp_path)
    assert daemon.registry.store is daemon.store
    assert daemon.store.on_adopt == [daemon.gpus.restore, daemon.collector.leases.restore]
    assert daemon.store.on_drop == [daemon.gpus.dropped]
    assert daemon.registry.listeners == [daemon.inventory.on_container_event]
    assert daemon.images.on_change == [daemon.inventory.wake_eviction]


def test_every_route_is_served_and_components_have_typed_keys(tmp_path: Path) -> None:
    daemon, _ = _daemon(tmp_path)
    app = make_app(daemon)
    paths = {r.resource.canonical for r in app.router.routes() if r.resource}
    for path in ("/v1/status", "/v1/tasks/{result}", "/v1/images", "/v1/gc", "/metrics"):
        assert path in paths
    assert app[keys.DAEMON] is daemon
    assert app[keys.INVENTORY] is daemon.inventory
    assert app[keys.COLLECTOR] is daemon.collector


async def test_components_stop_in_reverse_order_and_no_loop_outlives_the_app(
    tmp_path: Path,
) -> None:
    daemon, _ = _daemon(tmp_path)
    closed: list[str] = []

    def recording(name: str, close: object) -> object:
        async def wrapper() -> None:
            closed.append(name)
            await close()  # type: ignore[operator]

        return wrapper

    # Before make_app, which takes each component's close.
    daemon.engine.close = recording("engine", daemon.engine.close)  # type: ignore[method-assign]
    daemon.images.close = recording("images", daemon.images.close)  # type: ignore[method-assign]
    daemon.tasks.close = recording("tasks", daemon.tasks.close)  # type: ignore[method-assign]
    before = asyncio.all_tasks()
    runner = web.AppRunner(make_app(daemon))
    await runner.setup()
    await asyncio.sleep(0.05)
    started = asyncio.all_tasks() - before
    assert len(started) >= 8, "every component's loops run while the app runs"
    await runner.cleanup()
    assert closed == ["tasks", "images", "engine"]
    assert all(task.done() for task in started)


async def test_the_status_answer_is_json_of_status_and_follows_every_change(
    tmp_path: Path,
) -> None:
    daemon, _ = _daemon(tmp_path)
    records = []
    for i in range(3):
        record = TaskRecord(result=f"r{i}", project="https://p.example/")
        record.state = TaskState.RUNNING
        records.append(daemon.store.add(record))
        daemon.monitor.samples[record.key] = Sample(1.0, float(i), 100, 50, 0, 0)

    async def answer() -> dict[str, object]:
        text = await daemon.status_text()
        assert text == json.dumps(await daemon.status())
        decoded: dict[str, object] = json.loads(text)
        return decoded

    assert len((await answer())["tasks"]) == 3  # type: ignore[arg-type]
    kept = len(daemon.status_parts)  # the three tasks and the image list
    daemon.store.set_progress(records[1], "halfway")
    daemon.monitor.samples[records[2].key] = Sample(2.0, 9.5, 200, 50, 0, 0)
    tasks = {t["result"]: t for t in (await answer())["tasks"]}  # type: ignore[attr-defined]
    assert tasks["r1"]["progress"] == "halfway"
    assert tasks["r2"]["cpu_time_s"] == 9.5
    daemon.store.drop(records[0])
    assert [t["result"] for t in (await answer())["tasks"]] == ["r1", "r2"]  # type: ignore[attr-defined]
    assert len(daemon.status_parts) == kept - 1, "a dropped task's part is forgotten"
