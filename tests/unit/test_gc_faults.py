"""Fault tolerance on the in-memory engine: engine restarts, a daemon killed mid-create,
a full disk. (The same faults on the real dockerd: tests/engine/test_faults_real.py.)"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiodocker.exceptions import DockerError

from boincd_containers.core import labels as L
from boincd_containers.core.errors import NotFound, Unavailable
from boincd_containers.core.settings import Settings
from boincd_containers.engine.process import engine_process_started_at, process_started_at
from boincd_containers.engine.session import translate
from boincd_containers.images.cache import ImageCache
from boincd_containers.job.spec import parse_request
from boincd_containers.tasks.manager import TaskManager
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.registry import Registry
from boincd_containers.testing.fakes import FakeContainers, FakeEngine

STARTED = "2030-01-01T00:00:00.000000001Z"


class Rig:
    def __init__(self, engine: FakeEngine, state: Path) -> None:
        self.engine = engine
        self.registry = Registry(engine, "me")
        self.images = ImageCache(engine, state, "me")
        self.tasks = TaskManager(Settings(state_dir=str(state)), engine, self.registry, self.images)

    async def running(self, slot: Path, result: str = "r_0") -> TaskRecord:
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
        await self.tasks.start(result)
        self.engine.containers.by_id[record.container_id]["State"]["StartedAt"] = STARTED
        await self.registry.refresh(record)
        return record


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(FakeEngine(), tmp_path)
    yield rig
    await rig.tasks.close()
    await rig.images.close()


async def until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for a condition no event announces (a deadline, not a timing claim)."""
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - plain attributes, nothing to wait on
            await asyncio.sleep(0.01)


def kill_event(record: TaskRecord, signal: str, at: float) -> dict[str, Any]:
    return {
        "Type": "container",
        "Action": "kill",
        "Actor": {
            "ID": record.container_id,
            "Attributes": {
                L.OWNER: "me",
                L.PROJECT: record.project,
                L.RESULT: record.result,
                "signal": signal,
            },
        },
        "time": int(at),
        "timeNano": int(at * 1e9),
    }


# -- an engine that shuts down stops our containers: not a finished task ----------------


async def test_a_stop_signal_from_the_engine_makes_the_exit_an_interruption(
    rig: Rig, tmp_path: Path
) -> None:
    record = await rig.running(slot_dir(tmp_path))
    started = record.started_at
    await rig.registry.handle_event(kill_event(record, "15", started + 5))
    rig.engine.exit(record.container_id, 143)
    await rig.registry.refresh(record)
    assert record.stopped_by_engine
    assert record.interrupted
    assert record.to_json()["interrupted"] is True
    # Started again: that stop belongs to the previous run.
    assert (await rig.tasks.start("r_0")).state == "running"
    rig.engine.containers.by_id[record.container_id]["State"]["StartedAt"] = "2030-01-01T00:01:00Z"
    rig.engine.exit(record.container_id, 143)
    await rig.registry.refresh(record)
    assert not record.interrupted


@pytest.mark.parametrize("signal", ["9", "KILL", "SIGKILL"])
async def test_the_daemons_own_sigkill_is_not_an_interruption(
    rig: Rig, tmp_path: Path, signal: str
) -> None:
    """watch/limits.py stops a task over its disk bound with SIGKILL: it must stay dead."""
    record = await rig.running(slot_dir(tmp_path))
    await rig.registry.handle_event(kill_event(record, signal, record.started_at + 5))
    rig.engine.exit(record.container_id, 137)
    await rig.registry.refresh(record)
    assert not record.interrupted


async def test_an_exit_before_the_engine_last_started_is_an_interruption(
    rig: Rig, tmp_path: Path
) -> None:
    """Docker without live-restore, restarted while the daemon was down too: no
    event was seen, but the container exited before the engine's process began."""
    record = await rig.running(slot_dir(tmp_path))
    state = rig.engine.containers.by_id[record.container_id]["State"]
    rig.engine.exit(record.container_id, 143)
    state["FinishedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    info = await rig.engine.connect()
    await rig.registry.refresh(record)
    assert not record.interrupted  # the engine's start is unknown (0.0): only the boot counts
    rig.engine.info = type(info)(**{**_fields(info), "started_at": time.time() - 30})
    await rig.registry.refresh(record)
    assert record.interrupted_by_reboot
    assert (await rig.tasks.start("r_0")).state == "running"
    # An app's own exit after the engine started is its own.
    rig.engine.exit(record.container_id, 143)
    state["FinishedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time()))
    await rig.registry.refresh(record)
    assert not record.interrupted


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1e6):06d}Z"


async def test_a_container_the_engine_stopped_as_it_started_again_is_an_interruption(
    rig: Rig, tmp_path: Path
) -> None:
    """dockerd SIGKILLed, then started again: without live-restore it stops, before
    it answers, each container the dead engine left running (measured: SIGTERM,
    10 s, SIGKILL: exit 137 between the new process's start and its first answer)."""
    record = await rig.running(slot_dir(tmp_path))
    state = rig.engine.containers.by_id[record.container_id]["State"]
    now = time.time()
    state["StartedAt"] = _iso(now - 600)  # under the engine that died
    info = await rig.engine.connect()
    rig.engine.info = type(info)(
        **{**_fields(info), "started_at": now - 20, "answered_at": now - 5}
    )
    rig.engine.exit(record.container_id, 137)
    state["FinishedAt"] = _iso(now - 9)  # during the new engine's start-up
    await rig.registry.refresh(record)
    assert record.interrupted_by_engine_restart
    assert not record.interrupted_by_reboot
    assert record.to_json()["interrupted"] is True
    # Out of the OOM killer's hands, it is the app's own.
    state["OOMKilled"] = True
    await rig.registry.refresh(record)
    assert not record.interrupted
    state["OOMKilled"] = False
    # Ended after the engine answered: no start-up stopped it.
    state["FinishedAt"] = _iso(now - 1)
    await rig.registry.refresh(record)
    assert not record.interrupted
    # Started again under the new engine, its later exit is its own.
    state["FinishedAt"] = _iso(now - 9)
    assert (await rig.tasks.start("r_0")).state == "running"
    state["StartedAt"] = _iso(now - 4)
    rig.engine.exit(record.container_id, 137)
    state["FinishedAt"] = _iso(now - 2)
    await rig.registry.refresh(record)
    assert not record.interrupted


async def test_the_engine_seen_going_away_makes_an_exit_on_its_return_an_interruption(
    rig: Rig, tmp_path: Path
) -> None:
    """Without the engine's start time (a remote engine): the daemon saw the engine
    go while the container ran, and found it exited with a stop signal's status."""
    record = await rig.running(slot_dir(tmp_path))
    state = rig.engine.containers.by_id[record.container_id]["State"]
    follower = asyncio.ensure_future(rig.registry.follow(3600))
    try:
        await until(lambda: rig.registry.engine_error is None)
        rig.engine.down = True
        rig.engine.events_queue.put_nowait({"Type": "container"})  # the stream breaks
        await until(lambda: rig.registry.engine_error is not None)
        assert record.engine_lost_at > 0
        rig.engine.down = False
        rig.engine.exit(record.container_id, 137)
        state["FinishedAt"] = _iso(time.time())
        await until(lambda: rig.registry.engine_error is None)
        await rig.registry.refresh(record)
        assert record.state == "exited"
        assert record.interrupted_by_engine_restart
        assert (await rig.tasks.start("r_0")).state == "running"
        assert record.engine_lost_at == 0.0
        # Another outage it survives: its later exit is its own.
        rig.engine.down = True
        rig.engine.events_queue.put_nowait({"Type": "container"})
        await until(lambda: record.engine_lost_at > 0)
        rig.engine.down = False
        await until(lambda: rig.registry.engine_error is None and record.engine_lost_at == 0)
        rig.engine.exit(record.container_id, 137)
        state["FinishedAt"] = _iso(time.time())
        await rig.registry.refresh(record)
        assert not record.interrupted
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


def slot_dir(base: Path) -> Path:
    slot = base / "slot"
    slot.mkdir()
    return slot


def _fields(info: Any) -> dict[str, Any]:
    return {name: getattr(info, name) for name in info.__dataclass_fields__}


def test_engine_process_start_is_found_from_its_socket(tmp_path: Path) -> None:
    path = tmp_path / "engine.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        server.listen(1)
        started = engine_process_started_at(f"unix://{path}")
        assert started == pytest.approx(process_started_at(os.getpid()), abs=0.05)  # two reads
        # psutil's figure rests on whole-second boot times: never later than ours.
        assert psutil.Process(os.getpid()).create_time() <= started + 0.01
    finally:
        server.close()
    assert engine_process_started_at(f"unix://{tmp_path / 'nothing.sock'}") == 0.0
    assert engine_process_started_at("tcp://127.0.0.1:2375") == 0.0


# -- the engine goes away and comes back ------------------------------------------------


async def test_follow_reconnects_and_resubscribes_after_the_engine_returns(
    rig: Rig, tmp_path: Path
) -> None:
    record = await rig.running(slot_dir(tmp_path))
    follower = asyncio.ensure_future(rig.registry.follow(3600))
    try:
        await until(lambda: rig.registry.engine_error is None)
        rig.engine.down = True
        rig.engine.events_queue.put_nowait({"Type": "container"})  # the stream breaks
        await until(lambda: rig.registry.engine_error is not None)
        assert "down" in rig.registry.engine_error
        rig.engine.down = False
        await until(lambda: rig.registry.engine_error is None)
        # Only an event can tell this (the periodic re-list is an hour away).
        rig.engine.exit(record.container_id, 0)
        async with asyncio.timeout(10):
            while record.state != "exited":
                await record.changed.wait()
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


# -- a daemon killed while the engine was creating the container --------------------------


class LateCreateContainers(FakeContainers):
    def __init__(self, engine: LateCreateEngine) -> None:
        super().__init__(engine)
        self.fake = engine

    async def inspect(self, ref: str, *, size: bool = False) -> dict[str, Any]:
        late = self.fake.late
        if late is not None and ref == late["name"]:
            self.fake.late = None
            self.fake.misses += 1
            await super().create(late["name"], late["config"])
            raise NotFound(f"no such container: {ref}")
        return await super().inspect(ref, size=size)


class LateCreateEngine(FakeEngine):
    """The lookup by name misses a container an earlier daemon's create is still
    making; it exists by the time our own create runs."""

    def __init__(self) -> None:
        super().__init__()
        self.late: dict[str, Any] | None = None
        self.misses = 0
        self.containers: LateCreateContainers = LateCreateContainers(self)


async def test_a_container_created_by_a_killed_daemon_is_adopted_not_duplicated(
    tmp_path: Path,
) -> None:
    engine = LateCreateEngine()
    rig = Rig(engine, tmp_path)
    slot = tmp_path / "slot"
    slot.mkdir()
    body = {
        "result": "r_0",
        "project": "proj",
        "slot_dir": str(slot),
        "image": "boincd-test/busybox:latest",
    }
    labels = {L.OWNER: "me", L.RESULT: "r_0", L.PROJECT: "proj", L.SLOT: str(slot)}
    engine.late = {
        "name": "boincd__proj__r_0",
        "config": {"Image": "boincd-test/busybox:latest", "Labels": labels, "HostConfig": {}},
    }
    try:
        record = await rig.tasks.create_or_attach(parse_request(body), 0)
        async with asyncio.timeout(5):
            while record.state == "preparing":
                await record.changed.wait()
        assert engine.misses == 1
        assert record.state == "created", record.error
        assert list(engine.containers.by_id) == [record.container_id]
    finally:
        await rig.tasks.close()
        await rig.images.close()


async def test_a_foreign_container_that_appears_meanwhile_is_still_refused(
    tmp_path: Path,
) -> None:
    engine = LateCreateEngine()
    rig = Rig(engine, tmp_path)
    slot = tmp_path / "slot"
    slot.mkdir()
    engine.late = {
        "name": "boincd__proj__r_0",
        "config": {"Image": "boincd-test/busybox:latest", "Labels": {}, "HostConfig": {}},
    }
    try:
        record = await rig.tasks.create_or_attach(
            parse_request(
                {
                    "result": "r_0",
                    "project": "proj",
                    "slot_dir": str(slot),
                    "image": "boincd-test/busybox:latest",
                }
            ),
            0,
        )
        async with asyncio.timeout(5):
            while record.state == "preparing":
                await record.changed.wait()
        assert record.state == "failed"
        assert "already in use" in str(record.error)
        assert len(engine.containers.by_id) == 1  # the foreign one, untouched
    finally:
        await rig.tasks.close()
        await rig.images.close()


# -- a full disk -----------------------------------------------------------------------------


def test_a_full_engine_disk_is_a_clear_retryable_error() -> None:
    exc = DockerError(
        500,
        {"message": "mkdir /var/lib/docker/overlay2/abc/diff: no space left on device"},
    )
    error = translate(exc, "create container boinc__p__r")
    assert isinstance(error, Unavailable)
    assert error.retryable
    assert "create container boinc__p__r" in error.message
    assert "disk of the container engine is full" in error.message


class FullDiskContainers(FakeContainers):
    async def create(self, name: str, config: dict[str, Any]) -> str:
        raise translate(
            DockerError(500, {"message": "write /var/lib/docker/x: no space left on device"}),
            f"create container {name}",
        )


class FullDiskEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.containers: FullDiskContainers = FullDiskContainers(self)


async def test_a_full_disk_leaves_the_task_waiting_and_nothing_half_made(tmp_path: Path) -> None:
    engine = FullDiskEngine()
    rig = Rig(engine, tmp_path)
    slot = tmp_path / "slot"
    slot.mkdir()
    request = parse_request(
        {
            "result": "r_0",
            "project": "proj",
            "slot_dir": str(slot),
            "image": "boincd-test/busybox:latest",
        }
    )
    try:
        record = await rig.tasks.create_or_attach(request, 0)
        async with asyncio.timeout(5):
            while record.state == "preparing":
                await record.changed.wait()
        assert record.state == "waiting"  # retried by the next create-or-attach
        assert record.error is not None
        assert record.error.retryable
        assert "no space left on device" in record.error.message
        assert engine.containers.by_id == {}
    finally:
        await rig.tasks.close()
        await rig.images.close()
