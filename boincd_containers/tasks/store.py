"""The task store: the one owner of the daemon's task records.

Every record is added, changed and dropped here, and nowhere else: the engine
sync (tasks/registry.py), the task verbs (manager.py), the limits (watch/) and the
garbage collector (gc/) all go through it. The rest of the daemon only reads.
Dropping a record is one routine, whoever drops it (an abort, a collection, a
person's `docker rm -f`): the record ends "removed", its waiters wake, and the
`on_drop` hooks let go of what the task held (its GPU share, its detached mark,
its figures).

Records are keyed by (project, result), `TaskKey`: BOINC result names are unique
per project, not per host, so two projects' tasks of the same result name are
two tasks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from boincd_containers.core.errors import BoincdError, Conflict, NotFound, StateWriteError
from boincd_containers.core.log import get_logger
from boincd_containers.core.persist import PersistentSet
from boincd_containers.host.priority import Priority
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.state import TaskKey, TaskState

log = get_logger(__name__)


def detached_in(marks: Container[str], key: TaskKey) -> bool:
    """Whether the saved marks name this task: by key, or by result alone as
    daemons before the (project, result) key saved them."""
    return str(key) in marks or key.result in marks


class TaskStore:
    """Task records by (project, result); the only way in or out."""

    def __init__(self) -> None:
        self._tasks: dict[TaskKey, TaskRecord] = {}
        # The tasks whose shim quit and left the container paused, saved in the
        # state dir (TaskManager opens the file); by str(TaskKey).
        self.detached_marks: PersistentSet | None = None
        # Called for each container adopted on a re-list (GPU shares are rebuilt so).
        self.on_adopt: list[Callable[[TaskRecord, dict[str, str]], None]] = []
        # Called for each record dropped, whoever removed its container (a person's
        # `docker rm -f` too): what the task held is let go of so.
        self.on_drop: list[Callable[[TaskRecord], None]] = []

    # -- reading -------------------------------------------------------------------

    @property
    def tasks(self) -> Mapping[TaskKey, TaskRecord]:
        """A read-only view of the records."""
        return MappingProxyType(self._tasks)

    def __iter__(self) -> Iterator[TaskRecord]:
        return iter(list(self._tasks.values()))

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, key: object) -> bool:
        return key in self._tasks

    def get(self, key: TaskKey) -> TaskRecord | None:
        return self._tasks.get(key)

    def current(self, record: TaskRecord) -> bool:
        """Whether `record` is the store's record of its task (not an older one)."""
        return self._tasks.get(record.key) is record

    def with_result(self, result: str) -> list[TaskRecord]:
        return [r for r in self._tasks.values() if r.result == result]

    def find(self, result: str, project: str | None = None) -> TaskRecord:
        """The task of `result`, of `project` when given; without it, the one task of
        that result name, or a Conflict naming the projects that have one."""
        if project is not None:
            record = self._tasks.get(TaskKey(project, result))
            if record is None:
                raise NotFound(f"no task for result {result!r} of project {project!r}")
            return record
        found = self.with_result(result)
        if not found:
            raise NotFound(f"no task for result {result!r}")
        if len(found) > 1:
            projects = ", ".join(repr(r.project) for r in sorted(found, key=lambda r: r.project))
            raise Conflict(
                f"result {result!r} is a task of more than one project ({projects}): "
                "name the project (?project=)"
            )
        return found[0]

    def by_container(self, container_id: str) -> TaskRecord | None:
        for record in self._tasks.values():
            if record.container_id == container_id:
                return record
        return None

    # -- adding ----------------------------------------------------------------------

    def add(self, record: TaskRecord) -> TaskRecord:
        """Make `record` the record of its task (a new task, or a new preparation of
        one whose last failed)."""
        self._tasks[record.key] = record
        return record

    def adopt(self, record: TaskRecord, labels: dict[str, str]) -> TaskRecord:
        """Add the record of a container found in the engine, then run the on_adopt
        hooks (they rebuild what the task held from its labels)."""
        self._tasks[record.key] = record
        for hook in self.on_adopt:
            hook(record, labels)
        return record

    # -- changing --------------------------------------------------------------------

    def set_state(
        self, record: TaskRecord, state: TaskState, error: BoincdError | None = None
    ) -> None:
        """A state the daemon decides (the engine's come with apply_inspect)."""
        record.state, record.error = state, error
        record.notify()

    def touch(self, record: TaskRecord, at: float | None = None) -> None:
        """A shim asked about its task (its lease, gc/policy.py): at `at`, else now."""
        record.last_seen = time.time() if at is None else at

    def set_progress(self, record: TaskRecord, text: str) -> None:
        record.progress = text

    def set_container(self, record: TaskRecord, container_id: str) -> None:
        record.container_id = container_id

    def set_shim_priority(self, record: TaskRecord, priority: Priority | None) -> None:
        """The priority the task's shim asks for (None: the one it was created with)."""
        record.shim_priority = priority

    def stop_signalled(self, record: TaskRecord, at: float) -> None:
        record.stop_signalled_at = at

    def engine_lost(self, at: float) -> None:
        """The engine went away: what ran may be stopped by its return."""
        for record in self._tasks.values():
            if record.state in (TaskState.RUNNING, TaskState.PAUSED) and not record.engine_lost_at:
                record.engine_lost_at = at

    def apply_inspect(
        self,
        record: TaskRecord,
        data: dict[str, Any],
        engine_started_at: float,
        engine_answered_at: float,
    ) -> None:
        """Take an engine's inspect answer, with what only the daemon knows."""
        record.detached = self.is_detached(record.key)
        record.engine_started_at = engine_started_at
        record.engine_answered_at = engine_answered_at
        record.apply_inspect(data)

    # -- detached --------------------------------------------------------------------

    def is_detached(self, key: TaskKey) -> bool:
        marks = self.detached_marks
        return marks is not None and detached_in(marks, key)

    def set_detached(self, record: TaskRecord) -> None:
        """The shim quit and left the container paused: remember it, so that a kill
        by the client's cleanup is told from the app's own exit. Marked in memory
        even when the save fails (StateWriteError, retryable, undoes nothing)."""
        record.detached = True
        if self.detached_marks is not None:
            self.detached_marks.add(str(record.key))

    def clear_detached(self, key: TaskKey, *, strict: bool = True) -> None:
        """Forget the task's detached mark (its record's too); `strict=False`: a state
        disk that refuses the save keeps it in memory and this goes on."""
        record = self._tasks.get(key)
        if record is not None:
            record.detached = False
        marks = self.detached_marks
        if marks is None:
            return
        try:
            marks.discard(str(key))
            if key.result in marks:  # saved by a daemon before the (project, result) key
                marks.discard(key.result)
        except StateWriteError:
            if strict:
                raise

    # -- dropping --------------------------------------------------------------------

    def drop(self, record: TaskRecord) -> bool:
        """The task is over (its container gone, or never made): the record leaves
        the store, ends "removed", wakes its waiters, and the on_drop hooks let go of
        what it held. False, with nothing done but the state, when the store's
        record of the task is another one (a newer container's)."""
        dropped = self._tasks.get(record.key) is record
        if dropped:
            del self._tasks[record.key]
        record.state = TaskState.REMOVED
        record.notify()
        if not dropped:
            return False
        self.clear_detached(record.key, strict=False)
        for hook in self.on_drop:
            try:
                hook(record)
            except Exception as exc:  # one hook's bug must not keep the rest
                log.error("task drop hook failed", exc_info=exc)
        return True

    def drop_key(self, key: TaskKey) -> TaskRecord | None:
        """Drop the task's record, if there is one."""
        record = self._tasks.get(key)
        if record is not None:
            self.drop(record)
        return record
