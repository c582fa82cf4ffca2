"""The one wiring point: every part of the daemon, built in dependency order.

`Daemon` builds each component from the ones below it (the engine first, which
tests pass in), registers every hook between them here and nowhere else, and
lists what each contributes to status answers. `make_app` then gives the aiohttp
application one cleanup context per component, in the same order: aiohttp
starts them in order and tears them down in reverse, so no component outlives
one it uses, and each component's loops stop before the parts they use close.
docs/architecture.md draws the layers.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from aiohttp import web

from boincd_containers.core.errors import BoincdError
from boincd_containers.core.jsontext import KeptJSON
from boincd_containers.core.log import get_logger
from boincd_containers.core.persist import write_text
from boincd_containers.core.settings import Settings, SettingsError
from boincd_containers.core.supervise import LoopFactory, running
from boincd_containers.daemon import keys, routes
from boincd_containers.daemon.peercred import writer_uids
from boincd_containers.daemon.providers import StatusProvider
from boincd_containers.engine.adapter import Engine
from boincd_containers.gc.collector import Collector
from boincd_containers.gc.inventory import Inventory
from boincd_containers.host.gpu import GpuAllocator, GpuBackend, TimedBackend, default_backends
from boincd_containers.images.cache import ImageCache
from boincd_containers.tasks.gpus import GpuService
from boincd_containers.tasks.manager import TaskManager
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.registry import Registry
from boincd_containers.tasks.store import TaskStore
from boincd_containers.watch.limits import DiskLimits
from boincd_containers.watch.memwatch import MemoryWatch
from boincd_containers.watch.monitor import Monitor
from boincd_containers.watch.webgraphics import WebGraphics

log = get_logger(__name__)

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


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
    """The GPU inventories the `gpu_backend` setting names (see core/settings.py)."""
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


def component(
    *loops: LoopFactory, close: Callable[[], Awaitable[None]] | None = None
) -> CleanupContext:
    """A component's cleanup context: its loops run (supervised) while the app
    runs; at teardown they are cancelled and awaited, then the component closes."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        async with running(*loops):
            yield
        if close is not None:
            await close()

    return context


class Daemon:
    """Every component, each built from those above it in this constructor."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.instance_id = load_instance_id(self.state_dir)
        self.version = _version()
        self.writer_uids = writer_uids(settings.boinc_user)

        self.engine = engine or Engine(settings.docker_host, settings.engine_timeout_s)
        # The only way a task record is added, changed or dropped.
        self.store = TaskStore()
        self.registry = Registry(self.engine, self.instance_id, self.store)
        self.images = ImageCache(
            self.engine,
            self.state_dir,
            self.instance_id,
            tag_refresh_interval_s=settings.tag_refresh_interval_s,
            pull_stall_s=settings.pull_stall_s,
        )
        backends = [
            TimedBackend(b, settings.gpu_timeout_s) for b in gpu_backends(settings.gpu_backend)
        ]
        self.gpus = GpuService(GpuAllocator(backends), self.registry, settings.gpu_timeout_s)
        self.monitor = Monitor(self.registry)
        self.tasks = TaskManager(
            settings,
            self.engine,
            self.registry,
            self.images,
            self.gpus,
            on_start=self.monitor.hold_priority,
        )
        self.web_graphics = WebGraphics(self.registry)
        self.limits = DiskLimits(self.engine, self.registry, self.tasks, self.state_dir)
        # One record of exceeded limits: one `limit_exceeded` field tells the
        # shim either reason.
        self.memwatch = MemoryWatch(self.engine, self.registry, self.tasks, self.limits.exceeded)
        self.inventory = Inventory(self.engine, self.registry, self.images, settings)
        self.collector = Collector(
            settings,
            self.engine,
            self.registry,
            self.tasks,
            self.state_dir,
            self.inventory,
        )

        # Hooks between components: the only place one learns of another's events.
        self.registry.on_connect.append(self.images.adopt_legacy_tags)
        self.store.on_adopt.append(self.gpus.restore)
        self.store.on_adopt.append(self.collector.leases.restore)
        self.store.on_drop.append(self.gpus.dropped)
        self.registry.listeners.append(self.inventory.on_container_event)
        self.images.on_change.append(self.inventory.wake_eviction)

        # What each part adds to a task's JSON and to the status answer, in this order.
        self.status_providers: list[StatusProvider] = [
            self.monitor,
            self.gpus,
            self.web_graphics,
            self.limits,
            self.memwatch,
            self.inventory,
            self.collector,
        ]
        # The status answer's parts that rarely change, with their JSON text.
        self.status_parts = KeptJSON()

    def cleanup_contexts(self) -> list[CleanupContext]:
        """One per component, bottom up: started in this order, torn down in reverse."""
        settings = self.settings
        return [
            component(close=self.engine.close),
            component(close=self._close_gpus),
            component(lambda: self.registry.follow(settings.relist_interval_s)),
            component(close=self.images.close),
            component(lambda: self.monitor.run(settings.sample_interval_s)),
            component(close=self.tasks.close),
            component(self.web_graphics.run),
            component(self.limits.run),
            component(lambda: self.memwatch.run(settings.sample_interval_s)),
            component(self.inventory.run),
            component(self.collector.run_periodically, self.collector.keep_leases),
            self._announce,
        ]

    async def _close_gpus(self) -> None:
        self.gpus.allocator.close()

    async def _announce(self, app: web.Application) -> AsyncIterator[None]:
        log.info("daemon started", instance_id=self.instance_id, socket=self.settings.socket)
        yield
        # Ordered shutdown follows: loops stop, then the engine is let go of.
        # Task containers keep running: they belong to their tasks.
        log.info("daemon stopping")

    def task_json(self, record: TaskRecord) -> dict[str, Any]:
        data = record.to_json()
        for provider in self.status_providers:
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
        for provider in self.status_providers:
            try:
                data.update(await provider.status_fields())
            except BoincdError as exc:
                data.setdefault("errors", []).append(exc.message)
        return data

    async def status_text(self) -> str:
        """`GET /v1/status`'s body: status() as JSON, with each part that did not
        change since the last answer (a task between samples, the image list)
        taken as it was encoded then. Status is asked often, by every `ctl` and
        monitoring tool, while 64 tasks' figures change once a second."""
        data = await self.status()
        parts = self.status_parts
        names: list[object] = [("task", t["project"], t["result"]) for t in data["tasks"]]
        data["tasks"] = [parts.keep(name, t) for name, t in zip(names, data["tasks"], strict=True)]
        images = data.get("images")
        if isinstance(images, dict) and isinstance(images.get("items"), list):
            images["items"] = parts.keep("images.items", images["items"])
            names.append("images.items")
        parts.retain(set(names))
        return parts.dumps(data)


def make_app(daemon: Daemon) -> web.Application:
    """The HTTP application: the daemon's routes, its components under typed keys,
    and their cleanup contexts."""
    app = web.Application(
        middlewares=[routes.errors_and_auth], client_max_size=routes.MAX_BODY_BYTES
    )
    app[keys.DAEMON] = daemon
    app[keys.INVENTORY] = daemon.inventory
    app[keys.COLLECTOR] = daemon.collector
    app.add_routes(routes.routes)
    app.cleanup_ctx.extend(daemon.cleanup_contexts())
    return app
