"""The daemon object: its parts, their start-up and their ordered shutdown."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from boincd_containers.core.errors import BoincdError
from boincd_containers.core.log import get_logger
from boincd_containers.core.persist import write_text
from boincd_containers.core.settings import Settings, SettingsError
from boincd_containers.core.supervise import supervise
from boincd_containers.daemon.peercred import writer_uids
from boincd_containers.daemon.providers import StatusProvider
from boincd_containers.engine.adapter import Engine
from boincd_containers.host.gpu import GpuAllocator, GpuBackend, TimedBackend, default_backends
from boincd_containers.images.cache import ImageCache
from boincd_containers.tasks.gpus import GpuService
from boincd_containers.tasks.manager import TaskManager
from boincd_containers.tasks.registry import Registry, TaskRecord
from boincd_containers.watch.monitor import Monitor
from boincd_containers.watch.webgraphics import WebGraphics

log = get_logger(__name__)


class Feature(Protocol):
    """A part of the daemon with its own routes, status fields and loops."""

    def attach(self, daemon: Daemon, app: web.Application) -> None: ...


def load_instance_id(state_dir: Path) -> str:
    """The owner label value: stable across restarts, unique per daemon installation."""
    path = state_dir / "instance_id"
    try:
        existing = path.read_text().strip()
        if existing:
            return existing
    except FileNotFoundError:
        pass
    new_id = uuid.uuid4().hex
    write_text(path, new_id + "\n")
    return new_id


def gpu_backends(choice: str) -> list[GpuBackend]:
    """The GPU inventories the `gpu_backend` setting names (see settings.py)."""
    if choice == "auto":
        return default_backends()
    if choice == "none":
        return []
    kind, _, count = choice.partition(":")
    if kind == "fake" and count.isdigit():
        # Pretend NVIDIA cards: lets GPU task creation be tested on hosts without a GPU.
        from boincd_containers.host.gpu.fake import FakeGpuBackend

        return [FakeGpuBackend.with_gpus(int(count))]
    raise SettingsError(f"setting 'gpu_backend': {choice!r} is not one of auto, none, fake:N")


def _version() -> str:
    try:
        return package_version("boincd-containers")
    except PackageNotFoundError:
        return "0+unknown"


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.instance_id = load_instance_id(self.state_dir)
        self.version = _version()
        self.engine = Engine(settings.docker_host, settings.engine_timeout_s)
        self.registry = Registry(self.engine, self.instance_id)
        self.images = ImageCache(
            self.engine,
            self.state_dir,
            self.instance_id,
            tag_refresh_interval_s=settings.tag_refresh_interval_s,
            pull_stall_s=settings.pull_stall_s,
        )
        self.monitor = Monitor(self.registry)
        backends = [
            TimedBackend(b, settings.gpu_timeout_s) for b in gpu_backends(settings.gpu_backend)
        ]
        self.gpus = GpuService(GpuAllocator(backends), self.registry, settings.gpu_timeout_s)
        self.registry.on_adopt.append(self.gpus.restore)
        self.registry.on_drop.append(self.gpus.dropped)
        self.registry.on_connect.append(self.images.adopt_legacy_tags)
        self.tasks = TaskManager(
            settings,
            self.engine,
            self.registry,
            self.images,
            self.gpus,
            on_start=self.monitor.hold_priority,
        )
        self.web_graphics = WebGraphics(self.registry)
        self.extra_status: list[StatusProvider] = [self.monitor, self.gpus, self.web_graphics]
        # Background loops of the features attached to this daemon (gc, inventory...):
        # each runs supervised (supervise.py) inside the lifecycle's TaskGroup, and
        # is cancelled at shutdown.
        self.loops: list[Callable[[], Coroutine[Any, Any, None]]] = [
            lambda: self.registry.follow(self.settings.relist_interval_s),
            lambda: self.monitor.run(self.settings.sample_interval_s),
            self.web_graphics.run,
        ]
        self.writer_uids = writer_uids(settings.boinc_user)

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: background loops live exactly as long as the app."""
        async with asyncio.TaskGroup() as group:
            # Supervised: one loop's failure is logged and the loop restarted; left
            # to the TaskGroup it would cancel the server and every other loop.
            loops = [group.create_task(supervise(make)) for make in self.loops]
            log.info("daemon started", instance_id=self.instance_id, socket=self.settings.socket)
            yield
            # Ordered shutdown: stop taking work, stop loops, then let go of the
            # engine. Task containers keep running: they belong to their tasks.
            log.info("daemon stopping")
            for loop in loops:
                loop.cancel()
        await self.tasks.close()
        await self.images.close()
        await self.engine.close()
        self.gpus.allocator.close()

    def task_json(self, record: TaskRecord) -> dict[str, Any]:
        data = record.to_json()
        for provider in self.extra_status:
            data.update(provider.task_fields(record))
        return data

    async def engine_json(self) -> dict[str, Any]:
        info = self.engine.info
        return {
            "kind": info.kind if info else None,
            "version": info.version if info else None,
            "api_version": info.api_version if info else None,
            "rootless": info.rootless if info else None,
            "host": info.host if info else None,
            "reachable": self.registry.engine_error is None,
            "error": self.registry.engine_error,
        }

    async def status(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "daemon": {"version": self.version, "instance_id": self.instance_id},
            "engine": await self.engine_json(),
            "tasks": [self.task_json(r) for r in self.registry.tasks.values()],
        }
        for provider in self.extra_status:
            try:
                data.update(await provider.status_fields())
            except BoincdError as exc:
                data.setdefault("errors", []).append(exc.message)
        return data
