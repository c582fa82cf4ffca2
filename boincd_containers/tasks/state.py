"""A task's state and its identity: the values the API, the metrics and the log
carry.

`TaskState` is a `StrEnum`: each member is the very string the API has always
answered (`"running"`...), so JSON output and comparisons with strings stay the
same; code names the members instead of spelling the strings.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple


class TaskState(StrEnum):
    # The daemon's own states, before and after the container.
    PREPARING = "preparing"  # image pull, load or build, then create (in the background)
    WAITING = "waiting"  # preparation failed for a retryable cause: the next create retries
    FAILED = "failed"  # preparation failed for good
    REMOVED = "removed"  # the record left the store: its container is gone
    # The container's, as the engine reports it (TaskRecord.apply_inspect).
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"
    # Passing states some engines report (Docker, Podman) on the way to another.
    RESTARTING = "restarting"
    REMOVING = "removing"
    STOPPING = "stopping"
    UNKNOWN = "unknown"

    @classmethod
    def from_engine(cls, status: str) -> TaskState:
        """The state of an engine's container `Status` (already lower case)."""
        if status in ("configured", "created"):
            return cls.CREATED
        if status in ("exited", "dead", "stopped"):
            return cls.EXITED
        try:
            return cls(status)
        except ValueError:
            return cls.UNKNOWN


# States in which the container has processes (a pid).
LIVE_STATES = frozenset({TaskState.RUNNING, TaskState.PAUSED})
# States of a record whose preparation ended without a container.
UNPREPARED_STATES = frozenset({TaskState.FAILED, TaskState.WAITING})


class TaskKey(NamedTuple):
    """A task's identity: BOINC result names are unique per project, not per host."""

    project: str
    result: str

    def __str__(self) -> str:
        # Neither name may hold a "/" (job.spec.check_name): one string, unambiguous,
        # for the state files keyed by task.
        return f"{self.project}/{self.result}"

    @classmethod
    def parse(cls, text: str) -> TaskKey:
        """The key `str()` wrote (used where a task must be named by one string: the
        state files, the GPU allocator's holders)."""
        project, _, result = text.partition("/")
        return cls(project, result)
