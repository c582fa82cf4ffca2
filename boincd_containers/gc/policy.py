"""What garbage collection decides from, and what it reports (gc/collector.py runs it).

Pure rules over facts (the slot dir BOINC keeps for a task, when a shim last
asked about it) so that they can be read, and tested, on their own; and the
last-seen times that must survive a daemon restart.
"""

from __future__ import annotations

import enum
import json
import os
import re
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import unescape

from boincd_containers.core.errors import StateWriteError
from boincd_containers.core.log import get_logger
from boincd_containers.core.persist import write_json_off_loop
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.state import TaskKey
from boincd_containers.tasks.store import TaskStore

log = get_logger(__name__)

LEASE_SAVE_S = 30.0  # how often last-seen times are saved (and how stale they may be)
_RESULT_NAME = re.compile(r"<result_name>\s*([^<]*?)\s*</result_name>")


class SlotState(enum.Enum):
    OURS = "ours"  # init_data.xml names this task's result: BOINC still has the task
    GONE = "gone"  # the slot dir no longer exists (its parent does)
    OTHER = "other"  # init_data.xml names another result: BOINC reused the slot
    EMPTY = "empty"  # no init_data.xml: BOINC cleaned the slot out, the task is over
    UNKNOWN = "unknown"  # no slot label, slots/ itself missing (unmounted?), unreadable


def slot_state(slot_dir: str, result: str) -> tuple[SlotState, str]:
    """What BOINC's slot dir says about a task; the second item names the other result."""
    if not slot_dir:
        return SlotState.UNKNOWN, ""
    slot = Path(slot_dir)
    # os.stat, not Path.is_dir(): that says False on "permission denied" too, and
    # a slot we may not read is not a slot that is gone.
    try:
        mode = os.stat(slot).st_mode
    except FileNotFoundError:
        try:
            parent_there = stat.S_ISDIR(os.stat(slot.parent).st_mode)
        except OSError:
            parent_there = False
        # A missing slots/ dir may be a data disk not mounted yet: say nothing.
        return (SlotState.GONE if parent_there else SlotState.UNKNOWN), ""
    except OSError:
        return SlotState.UNKNOWN, ""
    if not stat.S_ISDIR(mode):
        return SlotState.UNKNOWN, ""
    try:
        text = (slot / "init_data.xml").read_text(errors="replace")
    except FileNotFoundError:
        return SlotState.EMPTY, ""
    except OSError:
        return SlotState.UNKNOWN, ""
    match = _RESULT_NAME.search(text)
    if match is None:
        # Being written right now, or not BOINC's: no conclusion from it.
        return SlotState.UNKNOWN, ""
    name = unescape(match.group(1))
    return (SlotState.OURS, "") if name == result else (SlotState.OTHER, name)


@dataclass(frozen=True, slots=True)
class ContainerFacts:
    """What the verdict on one task container rests on (all times in seconds)."""

    slot: SlotState
    slot_dir: str
    other_result: str = ""
    idle_s: float = 0.0  # since a shim last asked about the task
    slot_changed_for_s: float = 0.0  # since this pass's slot state was first noticed


def container_verdict(facts: ContainerFacts, grace_s: float, lease_s: float) -> str | None:
    """Why the container must go, or None to keep it."""
    if facts.idle_s < grace_s:
        return None  # its shim is active: never collected
    if facts.slot_changed_for_s >= grace_s:
        if facts.slot is SlotState.GONE:
            return f"slot dir {facts.slot_dir} is gone (BOINC reset or detached the project)"
        if facts.slot is SlotState.OTHER:
            return f"slot dir {facts.slot_dir} now holds result {facts.other_result}"
        if facts.slot is SlotState.EMPTY:
            return f"task finished: BOINC cleaned out slot dir {facts.slot_dir}"
    if facts.idle_s >= lease_s:
        return (
            f"no shim asked about the task for {_duration(facts.idle_s)} "
            f"(lease {_duration(lease_s)}): the BOINC client is gone"
        )
    return None


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def parse_time(text: str) -> float | None:
    """Engine timestamps: RFC 3339 with up to nanoseconds and any offset; None if not one."""
    if not text or text.startswith("0001-01-01"):
        return None
    text = text.strip().replace("Z", "+00:00")
    match = re.fullmatch(r"(.*?)(\.\d+)?([+-]\d\d:?\d\d)?", text)
    if match is None:
        return None
    head, frac, offset = match.group(1), match.group(2) or "", match.group(3) or "+00:00"
    try:
        return datetime.fromisoformat(head + frac[:7] + offset).timestamp()
    except ValueError:
        return None


# -- the report ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Removal:
    kind: str  # "container" or "volume"
    name: str
    reason: str
    bytes: int
    id: str = ""
    result: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "reason": self.reason,
            "bytes": self.bytes,
            "id": self.id,
            "result": self.result,
        }


@dataclass
class GcReport:
    dry_run: bool
    removed: list[Removal] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    at: float = field(default_factory=time.time)

    @property
    def freed_bytes(self) -> int:
        return sum(r.bytes for r in self.removed)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "removed": [r.to_json() for r in self.removed],
            "freed_bytes": self.freed_bytes,
            "errors": self.errors,
            "at": self.at,
        }


# -- last-seen times that survive a restart -------------------------------------------


class LeaseBook:
    """When a shim last asked about each task, saved atomically in the state dir:
    by str(TaskKey), or by result alone as daemons before that key saved it."""

    def __init__(self, path: Path, store: TaskStore) -> None:
        self.path = path
        self.store = store
        self.seen: dict[str, float] = {}
        self._saved: dict[str, float] = {}
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                self.seen = {str(k): float(v) for k, v in loaded.items()}
        except (OSError, ValueError, TypeError):
            pass  # none yet, or unreadable: every lease starts now (the safe side)
        self._saved = dict(self.seen)

    def saved(self, key: TaskKey) -> float | None:
        """The task's saved last-seen time, if any."""
        saved = self.seen.get(str(key))
        return self.seen.get(key.result) if saved is None else saved

    def restore(self, record: TaskRecord, labels: dict[str, str]) -> None:
        """TaskStore.on_adopt hook: an adopted task keeps its saved last-seen time."""
        saved = self.saved(record.key)
        if saved is not None and saved < record.last_seen:
            self.store.touch(record, saved)

    def update(self, records: Iterable[TaskRecord], complete: bool) -> None:
        """Take the records' times; `complete`: the records are all there is (drop the rest)."""
        current = {str(rec.key): rec.last_seen for rec in records if rec.container_id}
        if complete:
            self.seen = current
        else:
            self.seen.update(current)

    async def save_if_changed(self, granularity_s: float = LEASE_SAVE_S) -> None:
        changed = set(self.seen) != set(self._saved) or any(
            abs(self.seen[r] - self._saved[r]) >= granularity_s for r in self.seen
        )
        if not changed:
            return
        try:
            # Saved every LEASE_SAVE_S: the fsync must not hold up the event loop.
            await write_json_off_loop(self.path, self.seen, sort_keys=True)
        except StateWriteError as exc:
            # A full or read-only disk must not stop the daemon; leases then restart
            # at the next start, which only ever delays a collection.
            log.warning("cannot save shim last-seen times", path=str(self.path), error=exc.message)
            return
        self._saved = dict(self.seen)
