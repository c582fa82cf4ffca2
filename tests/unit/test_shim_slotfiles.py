"""Slot files are read with a cap and never block: FIFOs, devices and huge files are refused."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from boincd_containers.shim.client import DaemonClient
from boincd_containers.shim.initdata import parse_init_data
from boincd_containers.shim.jobfile import JobSpec
from boincd_containers.shim.runner import Runner
from boincd_containers.shim.slotfiles import (
    SlotFileError,
    read_fraction_done,
    read_slot_file,
    regular_file_mtime,
)

T = TypeVar("T")
# Far above what a refusal takes; only a read that blocks gets near it.
BLOCKED_S = 20.0


def within(fifo: Path | None, call: Callable[[], T]) -> T:
    """Run ``call`` in a thread; if it blocks (on ``fifo``), unblock it and fail.

    A read that blocks on a FIFO would hang the whole test run: opening the
    FIFO's other end lets the stuck thread go before the test fails.
    """
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(("ok", call()))
        except BaseException as exc:
            result.append(("raised", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BLOCKED_S)
    if thread.is_alive():
        if fifo is not None:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        thread.join(BLOCKED_S)
        pytest.fail("the read blocked")
    kind, value = result[0]
    if kind == "raised":
        raise value
    return value  # type: ignore[no-any-return]


def test_reads_a_regular_file_and_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"hello")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    assert read_slot_file(tmp_path / "f", 5) == b"hello"
    assert read_slot_file(tmp_path / "link", 5) == b"hello"


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_slot_file(tmp_path / "absent", 10)
    (tmp_path / "dangling").symlink_to(tmp_path / "absent")
    with pytest.raises(FileNotFoundError):
        read_slot_file(tmp_path / "dangling", 10)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SlotFileError, match=r"fifo is a FIFO \(named pipe\), not a regular file"):
        within(fifo, lambda: read_slot_file(fifo, 10, name="fifo"))


def test_symlink_to_dev_zero_is_refused(tmp_path: Path) -> None:
    (tmp_path / "zero").symlink_to("/dev/zero")
    with pytest.raises(SlotFileError, match="a character device, not a regular file"):
        read_slot_file(tmp_path / "zero", 10)


def test_directory_and_symlink_loop_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SlotFileError, match="a directory"):
        read_slot_file(tmp_path, 10)
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(SlotFileError, match=r"cannot read .*loop: Too many levels"):
        read_slot_file(tmp_path / "loop", 10)


def test_nul_in_the_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SlotFileError, match="NUL"):
        read_slot_file(f"{tmp_path}/a\0b", 10)


def test_the_cap(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100)
    assert read_slot_file(tmp_path / "f", 100) == b"x" * 100
    with pytest.raises(SlotFileError, match="larger than 99 bytes"):
        read_slot_file(tmp_path / "f", 99, name="f")


def test_a_file_that_reports_size_zero_is_still_capped(tmp_path: Path) -> None:
    # /proc files are regular files of size 0 with contents: the cap is on what is read.
    (tmp_path / "status").symlink_to("/proc/self/status")
    assert b"VmRSS" in read_slot_file(tmp_path / "status", 1 << 20)
    with pytest.raises(SlotFileError, match="larger than 16 bytes"):
        read_slot_file(tmp_path / "status", 16)


def test_the_opened_file_decides_not_a_stat_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A FIFO swapped in after a check by path: the descriptor's fstat refuses it.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    real_stat = os.stat

    class LooksRegular:
        st_mode = 0o100644
        st_size = 0

    def fake_stat(path: Any, *args: Any, **kwargs: Any) -> Any:
        return LooksRegular() if Path(path) == fifo else real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", fake_stat)
    with pytest.raises(SlotFileError, match="FIFO"):
        within(fifo, lambda: read_slot_file(fifo, 10))


def test_fraction_done(tmp_path: Path) -> None:
    path = tmp_path / "fraction_done"
    assert read_fraction_done(path) is None
    for text, value in [
        ("0.25\n", 0.25),
        ("2", 1.0),
        ("-1", 0.0),
        ("nan", None),
        ("inf", None),
        ("", None),
        ("x", None),
        ("0.5 junk", 0.5),
    ]:
        path.write_text(text)
        assert read_fraction_done(path) == value, text
    path.write_bytes(b"\xff\xfe")
    assert read_fraction_done(path) is None
    path.write_text("0." + "5" * 5000)
    with pytest.raises(SlotFileError, match="larger than"):
        read_fraction_done(path)


def test_checkpoint_mtime_only_of_a_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "ckpt").write_text("x")
    assert regular_file_mtime(tmp_path / "fifo") is None
    assert regular_file_mtime(tmp_path / "absent") is None
    assert regular_file_mtime(tmp_path / "ckpt") == os.stat(tmp_path / "ckpt").st_mtime


def _runner(slot: Path, **job: Any) -> Runner:
    init = parse_init_data(
        "<app_init_data><result_name>r_0</result_name>"
        f"<project_dir>{slot}</project_dir></app_init_data>"
    )
    spec = JobSpec(slot_dir=str(slot), project_dir=None, image="debian:12", **job)
    return Runner(init, spec, None, DaemonClient(str(slot / "none.sock")), slot)  # type: ignore[arg-type]


def test_runner_fraction_done_from_a_fifo_does_not_block(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "fraction_done"
    os.mkfifo(fifo)
    runner = _runner(tmp_path)
    assert within(fifo, runner._fraction_done) is None
    assert within(fifo, runner._fraction_done) is None
    err = capsys.readouterr().err
    assert err.count("fraction done not read: fraction_done is a FIFO") == 1


def test_runner_fraction_done_reads_a_number(tmp_path: Path) -> None:
    (tmp_path / "progress").write_text("0.4\n")
    assert _runner(tmp_path, fraction_done_filename="progress")._fraction_done() == 0.4


def test_runner_checkpoint_of_a_fifo_is_no_checkpoint(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "ckpt")
    runner = _runner(tmp_path, checkpoint_filename="ckpt")
    assert runner._checkpoint_mtime() is None
