"""Hold every process of a task's container at the priority the client gave the task.

Why: the BOINC client suspends all computing while processes that are not its
apps use more CPU than the volunteer allows ("CPU is busy", 25 % by default),
and it leaves out of that sum any process at idle priority: nice 19 on Linux
(lib/procinfo.cpp `procinfo_non_boinc`, lib/procinfo_unix.cpp
`is_low_priority`). It starts a CPU task's main program, here the shim, at nice
19 and SCHED_IDLE (client/app_start.cpp `get_priority`, `process_priority` in
cc_config); GPU tasks, tasks with fewer than one CPU and wrapper app versions
run higher, at nice 10 by default. A container's processes descend from the
engine, not from the shim, so they start at the engine's priority; the daemon
lowers them to the shim's, as the client would have done to a native app, at
start and at every monitor tick (apps fork and spawn threads; nice values and
scheduling policies belong to each thread).

Only ever lowered: a process the app itself put lower still stays there.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from boincd_containers.core import labels as L
from boincd_containers.core.log import get_logger

log = get_logger(__name__)

IDLE_NICE = 19  # what the client gives CPU tasks, and what it leaves out of its load sum
_SCHED_IDLE = getattr(os, "SCHED_IDLE", None)
_LOWER_POLICIES = frozenset(
    p for p in (getattr(os, "SCHED_OTHER", None), getattr(os, "SCHED_BATCH", None)) if p is not None
)


@dataclass(frozen=True, slots=True)
class Priority:
    nice: int
    idle: bool = False  # SCHED_IDLE, as the client sets it for nice-19 tasks on Linux

    def __post_init__(self) -> None:
        if not 0 <= self.nice <= IDLE_NICE:
            raise ValueError(f"nice must be 0..{IDLE_NICE}, not {self.nice}")

    @property
    def is_idle(self) -> bool:
        """Below the client's notice: not counted as another program's load."""
        return self.nice >= IDLE_NICE

    def labels(self) -> dict[str, str]:
        return {L.NICE: str(self.nice), L.SCHED_IDLE: "1" if self.idle else "0"}

    @classmethod
    def from_labels(cls, labels: dict[str, str]) -> Priority | None:
        """None for a container made before priorities were kept."""
        try:
            return cls(int(labels[L.NICE]), labels.get(L.SCHED_IDLE) == "1")
        except (KeyError, ValueError):
            return None

    def to_json(self) -> dict[str, object]:
        return {"nice": self.nice, "idle": self.idle}


@dataclass(slots=True)
class HoldResult:
    threads: int = 0
    changed: int = 0
    denied: int = 0


def hold(thread_ids: Iterable[int], priority: Priority) -> HoldResult:
    """Lower each thread to `priority` where it runs higher; threads that are gone
    are skipped (they exit between the listing and the call)."""
    result = HoldResult()
    for tid in thread_ids:
        result.threads += 1
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < priority.nice:
                os.setpriority(os.PRIO_PROCESS, tid, priority.nice)
                result.changed += 1
            if (
                priority.idle
                and _SCHED_IDLE is not None
                and os.sched_getscheduler(tid) in _LOWER_POLICIES
            ):
                os.sched_setscheduler(tid, _SCHED_IDLE, os.sched_param(0))
                result.changed += 1
        except ProcessLookupError:
            continue
        except PermissionError:
            # A daemon that is not root may not lower others' processes (rootless
            # engines map the container's users to other uids).
            result.denied += 1
    return result


def thread_ids_of(pids: Iterable[int], proc_root: str = "/proc") -> list[int]:
    """Every thread of these processes, from /proc/PID/task."""
    tids: list[int] = []
    for pid in pids:
        try:
            tids.extend(int(name) for name in os.listdir(f"{proc_root}/{pid}/task"))
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            continue
    return tids
