"""The engine sync: the daemon's view of its task containers, rebuilt from engine labels.

Labels are the truth: on start the registry lists the engine's containers that
carry our owner label, then follows engine events, and re-lists periodically
because events can be lost (engine restarts, dropped streams). What it learns
goes into the task store (store.py), the one owner of the records.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from boincd_containers.core import labels as L
from boincd_containers.core.errors import BoincdError, NotFound
from boincd_containers.core.log import get_logger
from boincd_containers.engine.protocols import RegistryEngine
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.state import TaskKey, TaskState
from boincd_containers.tasks.store import TaskStore

log = get_logger(__name__)

# How engines name SIGKILL in "kill" events: the daemon's own kills, not a stop.
_SIGKILL = ("9", "KILL", "SIGKILL")


def _event_time(event: dict[str, Any]) -> float:
    if event.get("timeNano"):
        return int(event["timeNano"]) / 1e9
    return float(event.get("time") or time.time())


class Registry:
    """Follows the engine and keeps the task store (its `store`) equal to it."""

    def __init__(
        self, engine: RegistryEngine, instance_id: str, store: TaskStore | None = None
    ) -> None:
        self.engine = engine
        self.instance_id = instance_id
        self.store = store if store is not None else TaskStore()
        self.engine_error: str | None = "not connected yet"
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        # Called after the first re-list of each connection to the engine.
        self.on_connect: list[Callable[[], Awaitable[None]]] = []

    @property
    def tasks(self) -> Mapping[TaskKey, TaskRecord]:
        """The store's records, read-only: every change goes through the store."""
        return self.store.tasks

    @property
    def owner_labels(self) -> dict[str, str]:
        return L.owned_by(self.instance_id)

    def get(self, result: str, project: str | None = None) -> TaskRecord:
        return self.store.find(result, project)

    def by_container(self, container_id: str) -> TaskRecord | None:
        return self.store.by_container(container_id)

    async def relist(self) -> None:
        """Make the view equal to the engine's: adopt ours, drop what is gone."""
        containers = await self.engine.containers.list(self.owner_labels)
        seen: set[TaskKey] = set()
        for summary in containers:
            labels = summary.get("Labels") or {}
            if not L.is_ours(labels, self.instance_id) or L.RESULT not in labels:
                continue
            try:
                data = await self.engine.containers.inspect(summary["Id"])
            except NotFound:
                continue
            key = TaskKey(labels.get(L.PROJECT, ""), labels[L.RESULT])
            record = self.store.get(key) or TaskRecord(key.result, key.project)
            if L.is_legacy_name(str(data.get("Name", ""))):
                data = await self.rename_legacy(data, record.project, record.result)
            self.apply(record, data)
            if key not in self.store:
                self.store.adopt(record, labels)
            seen.add(key)
        for key, record in list(self.tasks.items()):
            if key not in seen and record.container_id and record.state != TaskState.PREPARING:
                # Absent from the list, but perhaps created after the list was
                # taken: only the engine's own "no such container" drops a record.
                await self.refresh(record)
        self.engine_error = None

    async def rename_legacy(
        self, data: dict[str, Any], project: str, result: str
    ) -> dict[str, Any]:
        """Give a container made under the old `boinc__` name its `boincd__` name, so
        that a BOINC 8.2 client's start-up cleanup leaves it alone; the inspect
        answer after the rename (the one given when the rename fails)."""
        old, new = str(data.get("Name", "")).lstrip("/"), L.container_name(project, result)
        try:
            await self.engine.containers.rename(str(data["Id"]), new)
            data = await self.engine.containers.inspect(str(data["Id"]))
        except BoincdError as exc:
            log.warning(
                "cannot rename a container to its new name", old=old, new=new, error=str(exc)
            )
            return data
        log.info("renamed a container made under the old name", old=old, new=new)
        return data

    def apply(self, record: TaskRecord, data: dict[str, Any]) -> None:
        """Take an inspect answer, with what only the daemon knows."""
        info = self.engine.info
        self.store.apply_inspect(
            record,
            data,
            engine_started_at=info.started_at if info else 0.0,
            engine_answered_at=info.answered_at if info else 0.0,
        )

    async def refresh(self, record: TaskRecord) -> TaskRecord:
        try:
            data = await self.engine.containers.inspect(record.container_id)
            self.apply(record, data)
        except NotFound:
            self.store.drop(record)
        return record

    async def handle_event(self, event: dict[str, Any]) -> None:
        if event.get("Type") != "container":
            return
        actor = event.get("Actor") or {}
        attributes = actor.get("Attributes") or {}
        if attributes.get(L.OWNER) != self.instance_id:
            return  # the engine filter should ensure this; never act on others' objects
        for listener in self.listeners:
            listener(event)
        key = TaskKey(attributes.get(L.PROJECT, ""), attributes.get(L.RESULT, ""))
        record = self.store.get(key)
        if record is None:
            record = TaskRecord(key.result, key.project, container_id=actor.get("ID", ""))
            if event.get("Action") == "destroy":
                return
            self.store.add(record)
        if record.container_id and record.container_id != actor.get("ID"):
            return  # an event about an older container of the same result
        if not record.container_id and event.get("Action") == "destroy":
            # A container this record never had: the engine undoing a create that
            # failed half-way (a full disk). Taking it would drop the record.
            return
        self.store.set_container(record, str(actor.get("ID", record.container_id)))
        if event.get("Action") == "kill" and attributes.get("signal") not in (None, *_SIGKILL):
            # Seen before the exit it causes, and only from the engine: remember it
            # now, in case the engine (shutting down) answers nothing more.
            self.store.stop_signalled(record, _event_time(event))
        await self.refresh(record)

    async def follow(self, relist_interval_s: float) -> None:
        """Follow events forever; re-list on every (re)connect and periodically."""
        backoff = 0.5
        while True:
            try:
                await self.engine.connect()
                since = time.time()
                await self.relist()
                for hook in self.on_connect:
                    await hook()
                backoff = 0.5
                log.info("engine connected", engine=self.engine.info and self.engine.info.kind)
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._periodic_relist(relist_interval_s))
                    async for event in self.engine.events.follow(self.owner_labels, since=since):
                        await self.handle_event(event)
            except* BoincdError as group_error:
                self.engine_error = str(group_error.exceptions[0])
                log.warning("engine unavailable", error=self.engine_error, retry_in_s=backoff)
            except* Exception as group_error:
                # A bug must not stop the daemon from following the engine for good.
                self.engine_error = f"internal error: {group_error.exceptions[0]!r}"
                log.error("event loop failed", exc_info=group_error.exceptions[0])
            self._mark_engine_lost()
            await self.engine.reset()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def _mark_engine_lost(self) -> None:
        """The engine went away (or its stream broke): what ran may be stopped by
        its return (see TaskRecord.interrupted_by_engine_restart)."""
        self.store.engine_lost(time.time())

    async def _periodic_relist(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.relist()
