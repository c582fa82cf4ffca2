"""Task lifecycle, keyed by (project, result).

Every verb is idempotent and runs under the task's lock, so a shim that
retries after a lost answer, an abort and the garbage collector never race.
Records change only through the task store (store.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from boincd_containers.core import labels as L
from boincd_containers.core.errors import BoincdError, Conflict, NotFound
from boincd_containers.core.log import get_logger, task_context
from boincd_containers.core.persist import PersistentSet
from boincd_containers.core.settings import Settings
from boincd_containers.core.supervise import Background
from boincd_containers.engine.protocols import TaskEngine
from boincd_containers.host.mounts import MountTable
from boincd_containers.images.cache import ImageCache
from boincd_containers.job.spec import (
    CheckedPaths,
    HostPaths,
    TaskRequest,
    check_paths,
    container_config,
)
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.registry import Registry
from boincd_containers.tasks.state import UNPREPARED_STATES, TaskKey, TaskState

if TYPE_CHECKING:
    from boincd_containers.tasks.gpus import GpuService

log = get_logger(__name__)

_RECHECK_S = 2.0  # how often a waiter checks the engine itself, in case an event was lost

# Hooks a GPU allocator plugs in: (request) -> (env, device_requests, devices, labels)


class TaskManager:
    def __init__(
        self,
        settings: Settings,
        engine: TaskEngine,
        registry: Registry,
        images: ImageCache,
        gpus: GpuService | None = None,
        on_start: Callable[[TaskRecord], None] | None = None,
    ) -> None:
        self.settings = settings
        # Called once the container runs (the monitor lowers its priority at once,
        # instead of at its next tick).
        self.on_start = on_start
        self.engine = engine
        self.registry = registry
        self.images = images
        self.gpus = gpus
        self.store = registry.store
        self._locks: defaultdict[TaskKey, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._preparing: dict[TaskKey, asyncio.Task[None]] = {}
        self._background = Background()  # the preparations, ended by close()
        # Tasks whose shim quit and left the container paused (store.set_detached).
        self.detached = PersistentSet(Path(settings.state_dir) / "detached.json")
        self.mounts = MountTable(Path(settings.state_dir))
        self.store.detached_marks = self.detached

    @property
    def default_memory_bytes(self) -> int:
        """The memory limit of a task without a bound of BOINC's (core/settings.py)."""
        if self.settings.default_memory_bytes is not None:
            return self.settings.default_memory_bytes
        return int(psutil.virtual_memory().total // 2)

    def _read_only_root(self, request: TaskRequest, uid: int) -> bool:
        """The job's choice, else read-only where the task user is not root inside
        the container: the slot owner's uid (the BOINC user), absent from the
        image's passwd, HOME=/, can write nothing of the image's root but its
        sticky scratch dirs, and those become tmpfs. Where it is root inside (a
        slot owned by root; a rootless engine, whose own user is root inside),
        images write to /root, /var... today: their root stays writable
        (docs/api.md)."""
        if request.read_only_root is not None:
            return request.read_only_root
        info = self.engine.info
        rootless = info is not None and (info.rootless or bool(info.uid_map))
        return uid != 0 and not rootless

    @asynccontextmanager
    async def locked(self, key: TaskKey) -> AsyncIterator[None]:
        """The task's lock; within it, every log line names the task."""
        with task_context(key.project, key.result):
            async with self._locks[key]:
                yield

    def key(self, result: str, project: str | None = None) -> TaskKey:
        """The task a request names: (project, result), or without the project the
        one task of that result (NotFound, or a Conflict when two projects have one)."""
        if project is not None:
            return TaskKey(project, result)
        return self.store.find(result).key

    # -- create-or-attach -------------------------------------------------------

    async def create_or_attach(self, request: TaskRequest, peer_uid: int) -> TaskRecord:
        """Same result, same container, whatever its state; never a duplicate.

        Preparation (image pull, load or build, then create) runs in the
        background so the shim keeps answering the BOINC client meanwhile; the
        shim polls the record until it leaves the "preparing" state.
        """
        paths = check_paths(request, peer_uid)
        try:
            return await self._create_or_attach(request, paths)
        except BaseException:
            paths.close()
            raise

    async def _create_or_attach(self, request: TaskRequest, paths: CheckedPaths) -> TaskRecord:
        key = TaskKey(request.project, request.result)
        async with self.locked(key):
            record = self.store.get(key)
            if record is not None and record.state not in UNPREPARED_STATES:
                self.store.touch(record)
                self.store.set_shim_priority(record, request.priority or record.shim_priority)
                paths.close()
                return record
            existing = await self._find_by_name(request)
            if existing is not None:
                self.store.set_shim_priority(existing, request.priority)
                paths.close()
                return existing
            record = TaskRecord(
                request.result,
                request.project,
                slot_dir=request.slot_dir,
                shim_priority=request.priority,
            )
            self.store.add(record)
            task = self._background.spawn(
                self._prepare(record, request, paths), name=f"prepare {key}"
            )
            self._preparing[key] = task
            task.add_done_callback(lambda _: self._preparing.pop(key, None))
            # Also when cancelled before it ran (an abort at once): its finally never ran.
            task.add_done_callback(lambda _: self._prepared(request.name, paths))
            return record

    async def _find_by_name(self, request: TaskRequest) -> TaskRecord | None:
        """Adopt our container for the task (events may lag), also one made under the
        old name before an upgrade; refuse anyone else's."""
        for name in (request.name, L.legacy_container_name(request.project, request.result)):
            try:
                data = await self.engine.containers.inspect(name)
                break
            except NotFound:
                continue
        else:
            return None
        labels = (data.get("Config") or {}).get("Labels") or {}
        if not L.is_ours(labels, self.registry.instance_id):
            if name != request.name:
                return None  # somebody else's container under the old scheme: not ours
            raise Conflict(
                f"a container named {name} exists and does not belong to this daemon; "
                "it is left alone: remove or rename it to run this task"
            )
        if name != request.name:
            data = await self.registry.rename_legacy(data, request.project, request.result)
        record = TaskRecord(labels.get(L.RESULT, ""), labels.get(L.PROJECT, ""))
        self.registry.apply(record, data)
        self.store.add(record)
        return record

    async def _created_meanwhile(self, request: TaskRequest) -> str | None:
        """Our container for this result that appeared after the lookup: the create
        of a daemon killed while the engine was still at it. None: not ours."""
        try:
            data = await self.engine.containers.inspect(request.name)
        except NotFound:
            return None
        labels = (data.get("Config") or {}).get("Labels") or {}
        if L.is_ours(labels, self.registry.instance_id) and labels.get(L.RESULT) == request.result:
            return str(data["Id"])
        return None

    def _host_paths(self, request: TaskRequest, paths: CheckedPaths) -> HostPaths:
        """Mount points of the checked descriptors (host/mounts.py): what the engine mounts."""
        entries = paths.entries(request)
        where = self.mounts.prepare(request.name, entries)
        project = where[1] if paths.project is not None and request.project_dir_mount else None
        return HostPaths(
            slot=where[0],
            project=project,
            mounts=tuple(where[len(where) - len(paths.sources) :]),
            slot_label=paths.slot.path,
            record=json.dumps([e.to_json() for e, _ in entries], separators=(",", ":")),
        )

    async def _prepare(self, record: TaskRecord, request: TaskRequest, paths: CheckedPaths) -> None:
        def progress(text: str) -> None:
            self.store.set_progress(record, text)

        try:
            image = await self.images.ensure(request, progress, paths=paths)
            config = container_config(
                request,
                image.ref,
                owner_id=self.registry.instance_id,
                uid=paths.owner.uid,
                gid=paths.owner.gid,
                pids_limit=self.settings.pids_limit,
                network_name=self.settings.network_name,
                host_paths=self._host_paths(request, paths),
                default_memory_bytes=self.default_memory_bytes,
                read_only_root=self._read_only_root(request, paths.owner.uid),
                tmp_bytes=self.settings.tmp_size_bytes,
            )
            # From the id resolved now: when the tag moves on, this task keeps its image.
            config["Image"] = image.id
            if self.gpus is not None:
                kind = self.engine.info.kind if self.engine.info else "docker"
                config = await self.gpus.apply(request, config, kind)
            async with self.locked(record.key):
                try:
                    container_id = await self.engine.containers.create(request.name, config)
                except Conflict:
                    adopted = await self._created_meanwhile(request)
                    if adopted is None:
                        raise
                    container_id = adopted
                self.store.set_container(record, container_id)
                self.store.set_progress(record, "")
                await self.registry.refresh(record)
                log.info("task container created", container=container_id[:12])
        except BoincdError as exc:
            # "waiting": a retryable cause (network off, GPU busy, engine down);
            # the next create-or-attach prepares it again.
            if self.gpus is not None:
                self.gpus.release(record.key)
            log.warning("task preparation failed", error=exc.message)
            state = TaskState.WAITING if exc.retryable else TaskState.FAILED
            self.store.set_state(record, state, exc)
        except Exception as exc:  # a bug: report it on the task instead of losing it
            if self.gpus is not None:
                self.gpus.release(record.key)
            log.error("task preparation crashed", exc_info=exc)
            error = BoincdError(f"internal error: {exc!r}")
            self.store.set_state(record, TaskState.FAILED, error)
        finally:
            # The container (if any) pins the image from now on.
            self.images.release(request.name)
            paths.close()
            self.mounts.created(request.name)
            if not record.container_id:
                self.release_mounts(request.name)

    def _prepared(self, name: str, paths: CheckedPaths) -> None:
        paths.close()
        self.mounts.created(name)

    def release_mounts(self, name: str) -> None:
        try:
            self.mounts.release(name)
        except OSError as exc:  # the next GC pass tries again
            log.warning("cannot release task mounts", container=name, error=str(exc))

    # -- verbs ------------------------------------------------------------------

    def _ready(self, key: TaskKey) -> TaskRecord:
        record = self.store.get(key)
        if record is None:
            raise NotFound(f"no task for result {key.result!r} of project {key.project!r}")
        if record.state in UNPREPARED_STATES and record.error is not None:
            raise record.error
        if record.state == TaskState.PREPARING or not record.container_id:
            raise Conflict(
                f"task {key.result} is still being prepared ({record.progress or 'waiting'})",
                retryable=True,
            )
        self.store.touch(record)
        return record

    async def start(self, result: str, project: str | None = None) -> TaskRecord:
        """Run the container: start it, unpause it, or restart it after a host reboot."""
        key = self.key(result, project)
        async with self.locked(key):
            record = self._ready(key)
            await self.registry.refresh(record)
            if record.state == TaskState.CREATED or record.interrupted:
                if record.interrupted:
                    log.info(
                        "restarting an interrupted task",
                        reboot=record.interrupted_by_reboot,
                        engine_restart=record.interrupted_by_engine_restart,
                        killed_while_detached=record.killed_while_detached,
                    )
                await self._ensure_mounts(record)
                await self.engine.containers.start(record.container_id)
                self.store.clear_detached(key)
            elif record.state == TaskState.PAUSED:
                await self.engine.containers.unpause(record.container_id)
            await self.registry.refresh(record)
            if self.on_start is not None and record.state == TaskState.RUNNING:
                self.on_start(record)
            return record

    async def _ensure_mounts(self, record: TaskRecord) -> None:
        """The engine resolves mount sources at start: make sure they are ours."""
        data = await self.engine.containers.inspect(record.container_id)
        name = str(data.get("Name") or "").lstrip("/")
        self.mounts.ensure(name, data)

    async def pause(self, result: str, project: str | None = None) -> TaskRecord:
        key = self.key(result, project)
        async with self.locked(key):
            record = self._ready(key)
            if record.state == TaskState.RUNNING:
                await self.engine.containers.pause(record.container_id)
            return await self.registry.refresh(record)

    async def detach(self, result: str, project: str | None = None) -> TaskRecord:
        """The shim quits: leave the container paused for the next shim, and remember
        it, so that a kill by the client's cleanup is told from the app's own exit."""
        key = self.key(result, project)
        async with self.locked(key):
            record = self._ready(key)
            # Pause first: a state disk that refuses the mark must not leave the
            # container running. The mark is kept in memory all the same (the
            # StateWriteError that follows is retryable and undoes nothing).
            if record.state == TaskState.RUNNING:
                await self.engine.containers.pause(record.container_id)
            await self.registry.refresh(record)
            self.store.set_detached(record)
            return record

    async def resume(self, result: str, project: str | None = None) -> TaskRecord:
        key = self.key(result, project)
        async with self.locked(key):
            record = self._ready(key)
            if record.state == TaskState.PAUSED:
                await self.engine.containers.unpause(record.container_id)
            return await self.registry.refresh(record)

    async def set_network(
        self, result: str, connected: bool, project: str | None = None
    ) -> TaskRecord:
        """Follow BOINC's network switch; a job without network stays at "none"."""
        key = self.key(result, project)
        async with self.locked(key):
            record = self._ready(key)
            if not record.network:
                raise Conflict(
                    f"task {result} has no network to connect or disconnect: its job did "
                    "not ask for one (job.toml `network = true`)"
                )
            network = await self._task_network(record)
            if connected:
                await self.engine.networks.connect(network, record.container_id)
            else:
                await self.engine.networks.disconnect(network, record.container_id)
            return await self.registry.refresh(record)

    async def _task_network(self, record: TaskRecord) -> str:
        """The network the container was created on: `network_name` may have changed
        since (a daemon restarted with another config), the container's has not."""
        data = await self.engine.containers.inspect(record.container_id)
        mode = str((data.get("HostConfig") or {}).get("NetworkMode") or "")
        if mode == "default":  # the engine's alias of its bridge network
            return "bridge"
        if mode in ("", "none", "host") or ":" in mode:  # nothing to connect to
            return self.settings.network_name
        return mode

    async def remove(self, result: str, project: str | None = None) -> None:
        """Kill and remove the container with its volumes; already gone is fine."""
        try:
            key = self.key(result, project)
        except NotFound:
            key = TaskKey("", result)  # no such task: nothing to remove but leftovers
        async with self.locked(key):
            task = self._preparing.get(key)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            record = self.store.get(key)
            if record is not None and record.container_id:
                await self.engine.containers.remove(record.container_id)
                self.release_mounts(L.container_name(record.project, record.result))
            if record is not None:
                self.store.drop(record)  # its on_drop hooks release its GPU share
            elif self.gpus is not None:
                self.gpus.release(key)
            log.info("task removed")
            self.store.clear_detached(key)  # last: a refused save undoes nothing above

    async def wait(self, result: str, timeout_s: float, project: str | None = None) -> TaskRecord:
        """Return when the task is neither running nor being prepared, or at the timeout.

        Engine events normally wake us; the periodic inspect is for lost events.
        """
        record = self.registry.get(result, project)
        deadline = time.monotonic() + timeout_s
        while record.state in (TaskState.PREPARING, TaskState.RUNNING):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(record.changed.wait(), min(remaining, _RECHECK_S))
            except TimeoutError:
                if record.container_id:
                    await self.registry.refresh(record)
        self.store.touch(record)
        return record

    async def close(self) -> None:
        await self._background.close()
