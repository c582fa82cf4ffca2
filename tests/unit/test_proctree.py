"""A container's process tree from /proc: a fake /proc for the arithmetic, real
processes for the signals."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from boincd_containers.host import proctree

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")


def write_stat(
    root: Path,
    pid: int,
    ppid: int,
    *,
    comm: str = "sh",
    state: str = "S",
    ticks: tuple[int, int, int, int] = (0, 0, 0, 0),
    rss_pages: int = 0,
) -> None:
    """A /proc/PID/stat line: fields after the command are state, ppid, ..., utime
    (14), stime, cutime, cstime (17), ..., rss (24)."""
    fields = [state, str(ppid)] + ["0"] * 9 + [str(t) for t in ticks] + ["0"] * 6
    fields += [str(rss_pages)] + ["0"] * 20
    (root / str(pid)).mkdir()
    (root / str(pid) / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    # 100 ─┬─ 101 ── 103
    #      └─ 102            (200 is another container, 1 the host's init)
    write_stat(tmp_path, 1, 0, comm="init")
    write_stat(tmp_path, 100, 1, ticks=(10, 5, 20, 5), rss_pages=100)
    write_stat(tmp_path, 101, 100, comm="a (weird) name", ticks=(100, 0, 0, 0), rss_pages=50)
    write_stat(tmp_path, 102, 100, state="T", rss_pages=10)
    write_stat(tmp_path, 103, 101, ticks=(0, 60, 0, 0), rss_pages=5)
    write_stat(tmp_path, 200, 1, ticks=(999, 999, 0, 0), rss_pages=999)
    (tmp_path / "self").mkdir()  # not a pid: ignored
    return tmp_path


def test_tree_is_the_root_and_its_descendants_parents_first(proc: Path) -> None:
    pids = [p.pid for p in proctree.tree(100, str(proc))]
    assert pids == [100, 101, 102, 103]
    assert proctree.tree(999, str(proc)) == []


def test_command_names_with_spaces_and_parentheses_parse(proc: Path) -> None:
    stat = proctree.read_stat(101, str(proc))
    assert stat is not None
    assert (stat.ppid, stat.state, stat.cpu_ticks, stat.rss_pages) == (100, "S", 100, 50)
    assert proctree.read_stat(4321, str(proc)) is None


def test_usage_sums_cpu_with_reaped_children_and_resident_memory(proc: Path) -> None:
    usage = proctree.usage(100, str(proc))
    ticks = (10 + 5 + 20 + 5) + 100 + 0 + 60
    assert usage.cpu_time_ns == ticks * 1_000_000_000 // TICK
    assert usage.rss_bytes == (100 + 50 + 10 + 5) * PAGE
    assert usage.processes == 4
    # One snapshot serves several trees.
    stats = proctree.snapshot(str(proc))
    assert proctree.usage(200, str(proc), stats).rss_bytes == 999 * PAGE


def test_stopped_processes_show_as_paused(proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert proctree.is_stopped(102, str(proc))
    assert not proctree.is_stopped(100, str(proc))
    monkeypatch.setattr(proctree, "is_stopped", lambda pid: pid == 102)
    state = {"Running": True, "Paused": False, "Status": "running", "Pid": 102}
    proctree.show_stopped_as_paused(state)
    assert (state["Paused"], state["Status"]) == (True, "paused")
    running = {"Running": True, "Paused": False, "Status": "running", "Pid": 100}
    proctree.show_stopped_as_paused(running)
    assert (running["Paused"], running["Status"]) == (False, "running")


def _states(pid: int) -> list[str]:
    return [p.state for p in proctree.tree(pid)]


def test_freeze_and_thaw_a_real_process_tree() -> None:
    # A shell with a child that keeps forking: every process must end up stopped.
    script = "while true; do sleep 0.05; done & while true; do sleep 0.05; done"
    shell = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(proctree.tree(shell.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proctree.freeze(shell.pid) >= 2
        states = _states(shell.pid)
        assert len(states) >= 3
        assert all(s == "T" for s in states), states
        assert proctree.thaw(shell.pid) >= 2
        deadline = time.monotonic() + 10
        while "T" in _states(shell.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "T" not in _states(shell.pid)
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()


def test_freezing_processes_of_others_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refuse)
    with pytest.raises(proctree.ProcessTreeError, match="as the user of the rootless engine"):
        proctree.freeze(os.getpid())
