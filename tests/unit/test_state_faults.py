"""A state dir that refuses writes (disk full, read-only): every save fails as a
retryable error of the daemon's family, nothing is lost in memory, a `<quit/>`
still pauses the container, and limits still kill. (The same on a real full
tmpfs with the real engine: tests/engine/test_faults_real.py.)"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from boincd_containers.core import persist
from boincd_containers.core.errors import BoincdError, StateWriteError
from boincd_containers.core.persist import PersistentSet, write_json
from boincd_containers.images.records import ImageRecords
from boincd_containers.watch.limits import STATE_FILE
from tests.unit.test_limits import Rig, SizeEngine

MiB = 1 << 20


class StateDisk:
    """Makes every fsync in core/persist.py fail as a full disk would, while `full`."""

    def __init__(self) -> None:
        self.full = False
        self.failures = 0
        self._fsync = os.fsync

    def fsync(self, fd: int) -> None:
        if self.full:
            self.failures += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._fsync(fd)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> StateDisk:
    state_disk = StateDisk()
    monkeypatch.setattr(persist.os, "fsync", state_disk.fsync)
    return state_disk


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(SizeEngine(), tmp_path)
    yield rig
    await rig.tasks.close()
    await rig.images.close()


def test_a_refused_write_is_a_retryable_error_and_leaves_the_old_file(
    tmp_path: Path, disk: StateDisk
) -> None:
    path = tmp_path / "state.json"
    write_json(path, {"a": 1})
    disk.full = True
    with pytest.raises(StateWriteError) as info:
        write_json(path, {"a": 2})
    assert isinstance(info.value, BoincdError)
    assert info.value.retryable is True
    assert info.value.http_status == 503
    assert "No space left on device" in info.value.message
    assert json.loads(path.read_text()) == {"a": 1}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_state_dir_that_is_no_dir_is_the_same_clean_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StateWriteError):
        write_json(tmp_path / "file" / "state.json", [])


def test_a_persistent_set_keeps_its_change_in_memory_and_saves_it_later(
    tmp_path: Path, disk: StateDisk
) -> None:
    path = tmp_path / "set.json"
    items = PersistentSet(path)
    items.add("a")
    disk.full = True
    with pytest.raises(StateWriteError):
        items.add("b")
    with pytest.raises(StateWriteError):
        items.discard("a")
    assert list(items) == ["b"]  # the daemon acts on what it was told
    assert json.loads(path.read_text()) == ["a"]
    disk.full = False
    items.add("c")  # the next change saves everything
    assert json.loads(path.read_text()) == ["b", "c"]
    assert not items.dirty


def test_image_records_stay_dirty_until_saved(tmp_path: Path, disk: StateDisk) -> None:
    records = ImageRecords(tmp_path / "images.json")
    disk.full = True
    with pytest.raises(StateWriteError):
        records.bring("sha256:" + "a" * 64, "proj/app:1", "pull")
    assert records.dirty
    disk.full = False
    records.save_if_dirty()
    assert "proj/app:1" in (tmp_path / "images.json").read_text()


async def test_quit_on_a_full_state_disk_still_pauses_the_container(
    rig: Rig, disk: StateDisk
) -> None:
    record = await rig.running("r_quit", disk_bytes=0)
    disk.full = True
    with pytest.raises(StateWriteError) as info:
        await rig.tasks.detach("r_quit")
    assert info.value.retryable  # the shim exits as for any quit, nothing failed
    assert record.state == "paused"
    assert record.detached
    assert str(record.key) in rig.tasks.detached
    # The client's cleanup SIGKILLs it now: still told from the app's own exit.
    await rig.engine.containers.kill(record.container_id)
    await rig.registry.refresh(record)
    assert record.interrupted
    disk.full = False
    rig.tasks.detached.flush()
    assert json.loads((rig.state / "detached.json").read_text()) == [str(record.key)]


async def test_a_full_state_disk_does_not_stop_the_disk_limit_kill(
    rig: Rig, disk: StateDisk
) -> None:
    record = await rig.running("r_big", disk_bytes=1 * MiB)
    rig.tasks.detached.add("r_big")  # re-attached after a quit
    (rig.upper(record) / "fill").write_bytes(b"\0" * (2 * MiB))
    disk.full = True
    await rig.limits.check_all()
    assert disk.failures >= 1
    assert record.state == "exited"
    assert not record.interrupted  # the detached mark is gone, in memory at least
    assert rig.limits.task_fields(record)["limit_exceeded"]["kind"] == "disk"
    assert not (rig.state / STATE_FILE).exists()
    disk.full = False
    await rig.tasks.remove("r_big")
    assert "r_big" not in json.loads((rig.state / "detached.json").read_text())


async def test_remove_on_a_full_state_disk_removes_first(rig: Rig, disk: StateDisk) -> None:
    record = await rig.running("r_rm", disk_bytes=0)
    rig.tasks.detached.add("r_rm")
    disk.full = True
    with pytest.raises(StateWriteError):
        await rig.tasks.remove("r_rm")
    assert record.state == "removed"
    assert rig.engine.containers.by_id == {}
    assert "r_rm" not in rig.tasks.detached
