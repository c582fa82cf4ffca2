"""Task lifecycle, keyed by BOINC result name.

Every verb is idempotent and runs under the result's lock, so a shim that
retries after a lost answer, an abort and the garbage collector never race.
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
from boincd_containers.core.log import get_logger
from boincd_containers.core.persist import PersistentSet
from boincd_containers.core.settings import Settings
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
from boincd_containers.tasks.registry import Registry, TaskRecord

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
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._preparing: dict[str, asyncio.Task[None]] = {}
        self.detached = PersistentSet(Path(settings.state_dir) / "detached.json")
        self.mounts = MountTable(Path(settings.state_dir))
        registry.detached = self.detached

    @property
    def default_memory_bytes(self) -> int:
        """The memory limit of a task without a bound of BOINC's (settings.py)."""
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
    async def locked(self, result: str) -> AsyncIterator[None]:
        async with self._locks[result]:
            yield

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
        async with self.locked(request.result):
            record = self.registry.tasks.get(request.result)
            if record is not None and record.project != request.project:
                # One task per result name for now: the other project's task is not
                # this one. Retryable: this one can run once that one is done.
                raise Conflict(
                    f"result {request.result!r} is already a task of project "
                    f"{record.project!r}; this task of project {request.project!r} waits",
                    retryable=True,
                )
            if record is not None and record.state not in ("failed", "waiting"):
                record.last_seen = time.time()
                record.shim_priority = request.priority or record.shim_priority
                paths.close()
                return record
            existing = await self._find_by_name(request)
            if existing is not None:
                existing.shim_priority = request.priority
                paths.close()
                return existing
            record = TaskRecord(
                request.result,
                request.project,
                slot_dir=request.slot_dir,
                shim_priority=request.priority,
            )
            self.registry.tasks[request.result] = record
            task = asyncio.ensure_future(self._prepare(record, request, paths))
            self._preparing[request.result] = task
            task.add_done_callback(lambda _: self._preparing.pop(request.result, None))
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
        self.registry.tasks[record.result] = record
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
        """Mount points of the checked descriptors (mounts.py): what the engine mounts."""
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
            record.progress = text

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
            async with self.locked(request.result):
                try:
                    container_id = await self.engine.containers.create(request.name, config)
                except Conflict:
                    adopted = await self._created_meanwhile(request)
                    if adopted is None:
                        raise
                    container_id = adopted
                record.container_id = container_id
                record.progress = ""
                await self.registry.refresh(record)
                log.info(
                    "task container created", result=request.result, container=container_id[:12]
                )
        except BoincdError as exc:
            # "waiting": a retryable cause (network off, GPU busy, engine down);
            # the next create-or-attach prepares it again.
            record.state, record.error = ("waiting" if exc.retryable else "failed"), exc
            if self.gpus is not None:
                self.gpus.release(request.result)
            log.warning("task preparation failed", result=request.result, error=exc.message)
            record.notify()
        except Exception as exc:  # a bug: report it on the task instead of losing it
            record.state, record.error = "failed", BoincdError(f"internal error: {exc!r}")
            if self.gpus is not None:
                self.gpus.release(request.result)
            log.error("task preparation crashed", result=request.result, exc_info=exc)
            record.notify()
        finally:
            # The container (if any) pins the image from now on.
            self.images.release(request.result)
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

    def _ready(self, result: str) -> TaskRecord:
        record = self.registry.get(result)
        if record.state in ("failed", "waiting") and record.error is not None:
            raise record.error
        if record.state == "preparing" or not record.container_id:
            raise Conflict(
                f"task {result} is still being prepared ({record.progress or 'waiting'})",
                retryable=True,
            )
        record.last_seen = time.time()
        return record

    async def start(self, result: str) -> TaskRecord:
        """Run the container: start it, unpause it, or restart it after a host reboot."""
        async with self.locked(result):
            record = self._ready(result)
            await self.registry.refresh(record)
            if record.state == "created" or record.interrupted:
                if record.interrupted:
                    log.info(
                        "restarting an interrupted task",
                        result=result,
                        reboot=record.interrupted_by_reboot,
                        engine_restart=record.interrupted_by_engine_restart,
                        killed_while_detached=record.killed_while_detached,
                    )
                await self._ensure_mounts(record)
                await self.engine.containers.start(record.container_id)
                self.detached.discard(result)
            elif record.state == "paused":
                await self.engine.containers.unpause(record.container_id)
            await self.registry.refresh(record)
            if self.on_start is not None and record.state == "running":
                self.on_start(record)
            return record

    async def _ensure_mounts(self, record: TaskRecord) -> None:
        """The engine resolves mount sources at start: make sure they are ours."""
        data = await self.engine.containers.inspect(record.container_id)
        name = str(data.get("Name") or "").lstrip("/")
        self.mounts.ensure(name, data)

    async def pause(self, result: str) -> TaskRecord:
        async with self.locked(result):
            record = self._ready(result)
            if record.state == "running":
                await self.engine.containers.pause(record.container_id)
            return await self.registry.refresh(record)

    async def detach(self, result: str) -> TaskRecord:
        """The shim quits: leave the container paused for the next shim, and remember
        it, so that a kill by the client's cleanup is told from the app's own exit."""
        async with self.locked(result):
            record = self._ready(result)
            # Pause first: a state disk that refuses the mark must not leave the
            # container running. The mark is kept in memory all the same (the
            # StateWriteError that follows is retryable and undoes nothing).
            if record.state == "running":
                await self.engine.containers.pause(record.container_id)
            await self.registry.refresh(record)
            record.detached = True
            self.detached.add(result)
            return record

    async def resume(self, result: str) -> TaskRecord:
        async with self.locked(result):
            record = self._ready(result)
            if record.state == "paused":
                await self.engine.containers.unpause(record.container_id)
            return await self.registry.refresh(record)

    async def set_network(self, result: str, connected: bool) -> TaskRecord:
        """Follow BOINC's network switch; a job without network stays at "none"."""
        async with self.locked(result):
            record = self._ready(result)
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

    async def remove(self, result: str) -> None:
        """Kill and remove the container with its volumes; already gone is fine."""
        async with self.locked(result):
            task = self._preparing.get(result)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            record = self.registry.tasks.pop(result, None)
            if record is not None and record.container_id:
                await self.engine.containers.remove(record.container_id)
                self.release_mounts(L.container_name(record.project, record.result))
            if self.gpus is not None:
                self.gpus.release(result)
            if record is not None:
                record.state = "removed"
                record.notify()
            log.info("task removed", result=result)
            self.detached.discard(result)  # last: a refused save undoes nothing above

    async def wait(self, result: str, timeout_s: float) -> TaskRecord:
        """Return when the task is neither running nor being prepared, or at the timeout.

        Engine events normally wake us; the periodic inspect is for lost events.
        """
        record = self.registry.get(result)
        deadline = time.monotonic() + timeout_s
        while record.state in ("preparing", "running"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(record.changed.wait(), min(remaining, _RECHECK_S))
            except TimeoutError:
                if record.container_id:
                    await self.registry.refresh(record)
        record.last_seen = time.time()
        return record

    async def close(self) -> None:
        tasks = list(self._preparing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
