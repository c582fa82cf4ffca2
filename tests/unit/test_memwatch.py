"""BOINC's memory bound where the engine cannot apply it: watched from /proc,
enforced by a kill, and told to the shim, which fails the task as BOINC would."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import pytest

from boincd_containers.core import labels as L
from boincd_containers.core.settings import Settings
from boincd_containers.images.cache import ImageCache
from boincd_containers.shim.boinc_api import (
    BOINC_FINISH_CALLED_FILE,
    AppChannel,
    ControlMessages,
    StatusReport,
)
from boincd_containers.shim.client import DaemonClient
from boincd_containers.shim.initdata import parse_init_data
from boincd_containers.shim.jobfile import JobSpec
from boincd_containers.shim.runner import Runner
from boincd_containers.tasks.manager import TaskManager
from boincd_containers.tasks.registry import Registry
from boincd_containers.testing.fakes import FakeEngine
from boincd_containers.watch.limits import STATE_FILE, ExceededLog
from boincd_containers.watch.memwatch import MemoryWatch
from tests.unit.test_proctree import write_stat

MiB = 1 << 20
PID = 4242  # FakeEngine's pid of every running container


class Rig:
    def __init__(self, base: Path) -> None:
        self.engine = FakeEngine()
        engine = self.engine
        self.state = base / "state"
        self.proc = base / "proc"
        self.proc.mkdir()
        self.registry = Registry(engine, "me")
        settings = Settings(state_dir=str(self.state))
        self.tasks = TaskManager(
            settings, engine, self.registry, ImageCache(engine, self.state, "me")
        )
        self.exceeded = ExceededLog(self.state / STATE_FILE)
        self.watch = MemoryWatch(engine, self.registry, self.tasks, self.exceeded, str(self.proc))

    async def task(self, result: str, bound: int, unenforced: str = "memory") -> str:
        labels = {L.OWNER: "me", L.RESULT: result, L.PROJECT: "p", L.MEMORY_BOUND: str(bound)}
        if unenforced:
            labels[L.UNENFORCED] = unenforced
        config = {"Image": "boincd-test/busybox:latest", "Labels": labels, "HostConfig": {}}
        cid = await self.engine.containers.create(f"boincd__p__{result}", config)
        await self.engine.containers.start(cid)
        await self.registry.relist()
        return cid

    def resident(self, megabytes: int) -> None:
        """The container's processes: an init and a child sharing the usage."""
        pages = megabytes * MiB // os.sysconf("SC_PAGE_SIZE")
        write_stat(self.proc, PID, 1, rss_pages=pages // 2)
        write_stat(self.proc, PID + 1, PID, rss_pages=pages - pages // 2)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


async def test_past_the_bound_the_container_is_killed_with_the_reason_saved(rig: Rig) -> None:
    cid = await rig.task("big", bound=32 * MiB)
    rig.tasks.detached.add("big")  # a kill of a detached task must not read as the client's
    rig.resident(48)
    await rig.watch.check_all()
    record = rig.registry.get("big")
    assert (record.state, record.exit_code) == ("exited", 137)
    entry = rig.exceeded.get(record.key, cid)
    assert entry is not None
    assert entry["kind"] == "memory"
    assert entry["bound_bytes"] == 32 * MiB
    assert entry["used_bytes"] >= 47 * MiB
    assert "memory limit exceeded: 48.0 MiB in use" in entry["message"]
    assert not rig.registry.store.is_detached(record.key)
    # Saved before the kill: a restarted daemon still knows why.
    assert ExceededLog(rig.state / STATE_FILE).get(record.key, cid) == entry


async def test_under_the_bound_nothing_happens_and_usage_is_kept(rig: Rig) -> None:
    await rig.task("small", bound=32 * MiB)
    rig.resident(16)
    await rig.watch.check_all()
    assert rig.registry.get("small").state == "running"
    assert 15 * MiB <= rig.watch.rss[rig.registry.get("small").key] <= 16 * MiB
    assert rig.exceeded.results() == []


async def test_only_running_tasks_whose_engine_cannot_limit_memory_are_watched(rig: Rig) -> None:
    await rig.task("enforced", bound=8 * MiB, unenforced="")  # the kernel does it
    await rig.task("cpu_only", bound=8 * MiB, unenforced="cpu")
    await rig.task("paused", bound=8 * MiB)
    await rig.tasks.pause("paused")
    await rig.task("unbounded", bound=0)
    rig.resident(48)
    await rig.watch.check_all()
    states = {r: rig.registry.get(r).state for r in ("enforced", "cpu_only", "unbounded")}
    assert states == {"enforced": "running", "cpu_only": "running", "unbounded": "running"}
    assert rig.registry.get("paused").state == "paused"
    assert rig.exceeded.results() == []
    assert rig.watch.task_fields(rig.registry.get("paused")) == {"memory_watched": True}
    assert rig.watch.task_fields(rig.registry.get("enforced")) == {"memory_watched": False}


# -- the shim's side ------------------------------------------------------------------


class Channel:
    def __init__(self) -> None:
        self.polls = 0

    def poll(self) -> ControlMessages:
        self.polls += 1
        if self.polls > 300:
            raise AssertionError("the shim did not finish the task")
        return ControlMessages(heartbeat=True)

    def send_status(self, report: StatusReport) -> bool:
        return True

    def deliver_status(self, report: StatusReport, timeout_s: float) -> bool:
        return True

    def status_consumed(self) -> bool:
        return True


class Daemon:
    """A task that runs a few seconds with a warning, then is stopped past its bound."""

    def __init__(self, warning: str, limit: dict[str, Any]) -> None:
        self.task: dict[str, Any] = {
            "result": "wu_1_0",
            "container_id": "c" * 64,
            "state": "created",
            "pid": 4242,
            "warnings": [warning],
        }
        self.limit = limit
        self.gets = 0

    def request(self, method: str, url: str, body: Any = None, timeout: float | None = None) -> Any:
        url = url.partition("?project=")[0]  # the shim names its project on task URLs
        if url.endswith("/start"):
            self.task["state"] = "running"
        elif method == "GET" and self.task["state"] == "running":
            self.gets += 1
            if self.gets >= 3:
                self.task.update(state="exited", exit_code=137, limit_exceeded=self.limit)
        if "/logs" in url:
            return ""
        return dict(self.task)

    def close(self) -> None:
        pass


def test_the_shim_says_the_warning_once_and_fails_past_the_memory_bound(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    warning = "rootless Podman 4.3.1 cannot limit this task's memory here"
    message = "memory limit exceeded: 48.0 MiB in use, BOINC allows this task 32.0 MiB"
    daemon = Daemon(warning, {"kind": "memory", "message": message})
    init = parse_init_data(
        "<app_init_data><result_name>wu_1_0</result_name><ncpus>1</ncpus>"
        "<project_dir>/p/projects/proj</project_dir></app_init_data>"
    )
    job = JobSpec(slot_dir=str(tmp_path), project_dir=None, image="img")
    runner = Runner(init, job, cast(AppChannel, Channel()), cast(DaemonClient, daemon), tmp_path)
    assert runner.run() == 198  # EXIT_MEM_LIMIT_EXCEEDED, as for a native app
    err = capsys.readouterr().err
    assert err.count(warning) == 1
    assert message in err
    assert (tmp_path / BOINC_FINISH_CALLED_FILE).read_text().splitlines()[:2] == ["198", message]
