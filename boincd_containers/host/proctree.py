"""A container's processes seen from /proc, for engines that cannot do it themselves.

Rootless Podman (and rootless Docker) on cgroup v1 give a container no cgroup of
its own: the engine cannot pause it (no freezer), and the cgroup its processes
sit in is shared with the engine and every other container of the user. What
still works is the process tree: the container's init (the engine's
``State.Pid``) and its descendants; orphans are re-parented to that init,
because it is pid 1 of the container's pid namespace. So pausing becomes
SIGSTOP to every process of the tree, and usage becomes the sum of their
/proc figures. The daemon may signal them: as root, or as the user whose
rootless engine made the container's user namespace (the namespace's owner has
CAP_KILL in it).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

PROC_ROOT = "/proc"
_FREEZE_ROUNDS = 20  # re-scans to catch processes forked while we stopped their parent
_SETTLE_S = 2.0  # how long a SIGSTOP may take to show in /proc
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


class ProcessTreeError(Exception):
    """The tree could not be signalled (permission): not a vanished process."""


@dataclass(frozen=True, slots=True)
class ProcStat:
    pid: int
    state: str
    ppid: int
    cpu_ticks: int  # utime + stime
    children_ticks: int  # cutime + cstime: waited-for children that are gone
    rss_pages: int


@dataclass(frozen=True, slots=True)
class TreeUsage:
    cpu_time_ns: int
    rss_bytes: int
    processes: int


def read_stat(pid: int, proc_root: str = PROC_ROOT) -> ProcStat | None:
    """One process's /proc/PID/stat; None when it is gone."""
    try:
        with open(os.path.join(proc_root, str(pid), "stat"), "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    # The command name may hold spaces and parentheses: fields start after the last ")".
    fields = data[data.rfind(b")") + 2 :].split()
    if len(fields) < 22:
        return None
    return ProcStat(
        pid=pid,
        state=fields[0].decode(),
        ppid=int(fields[1]),
        cpu_ticks=int(fields[11]) + int(fields[12]),
        children_ticks=int(fields[13]) + int(fields[14]),
        rss_pages=int(fields[21]),
    )


def snapshot(proc_root: str = PROC_ROOT) -> dict[int, ProcStat]:
    """Every process now; one snapshot serves the trees of many containers."""
    stats = {}
    for name in os.listdir(proc_root):
        if name.isdigit():
            stat = read_stat(int(name), proc_root)
            if stat is not None:
                stats[stat.pid] = stat
    return stats


def tree(
    root_pid: int, proc_root: str = PROC_ROOT, stats: dict[int, ProcStat] | None = None
) -> list[ProcStat]:
    """The root and its descendants, parents before children; [] when the root is gone."""
    stats = snapshot(proc_root) if stats is None else stats
    if root_pid not in stats:
        return []
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    order, queue = [], [root_pid]
    while queue:
        pid = queue.pop(0)
        order.append(stats[pid])
        queue.extend(sorted(children.get(pid, ())))
    return order


def usage(
    root_pid: int, proc_root: str = PROC_ROOT, stats: dict[int, ProcStat] | None = None
) -> TreeUsage:
    """CPU time (the live processes' own plus their reaped children's) and resident memory."""
    procs = tree(root_pid, proc_root, stats)
    ticks = sum(p.cpu_ticks + p.children_ticks for p in procs)
    return TreeUsage(
        cpu_time_ns=ticks * 1_000_000_000 // _TICK,
        rss_bytes=sum(p.rss_pages for p in procs) * _PAGE,
        processes=len(procs),
    )


def is_stopped(pid: int, proc_root: str = PROC_ROOT) -> bool:
    stat = read_stat(pid, proc_root)
    return stat is not None and stat.state in ("T", "t")


def show_stopped_as_paused(state: object) -> None:
    """Make an engine's State of a container we stopped with SIGSTOP say paused, as
    the engine's own pause would: its init is in state T. Read from /proc each
    time, so a restarted daemon sees the same."""
    if not isinstance(state, dict) or not state.get("Running") or state.get("Paused"):
        return
    pid = int(state.get("Pid") or 0)
    if pid > 0 and is_stopped(pid):
        state["Paused"] = True
        state["Status"] = "paused"


def _signal(pid: int, sig: signal.Signals) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        raise ProcessTreeError(
            f"no permission to send {sig.name} to pid {pid}: the daemon must run as root "
            "or as the user of the rootless engine"
        ) from exc
    return True


def freeze(root_pid: int, proc_root: str = PROC_ROOT) -> int:
    """SIGSTOP the whole tree, parents first, until a scan finds nothing new; the number
    of processes stopped. Returns once they show as stopped (or after a short wait)."""
    stopped: set[int] = set()
    for _ in range(_FREEZE_ROUNDS):
        fresh = [p.pid for p in tree(root_pid, proc_root) if p.pid not in stopped]
        if not fresh:
            break
        for pid in fresh:
            if _signal(pid, signal.SIGSTOP):
                stopped.add(pid)
    deadline = time.monotonic() + _SETTLE_S
    while time.monotonic() < deadline:
        running = [p for p in tree(root_pid, proc_root) if p.state not in ("T", "t", "Z", "X")]
        if not running:
            break
        time.sleep(0.01)
    return len(stopped)


def thaw(root_pid: int, proc_root: str = PROC_ROOT) -> int:
    """SIGCONT the whole tree, children first so a parent wakes to running children."""
    count = 0
    for stat in reversed(tree(root_pid, proc_root)):
        count += _signal(stat.pid, signal.SIGCONT)
    return count
