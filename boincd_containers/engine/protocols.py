"""What each component uses of the engine, as small structural types.

A component asks for the Protocol below that names the calls it makes, not for
Engine: the real Engine satisfies every one, and so do the test fakes
(testing/fakes.py, testing/fake_images.py), which mypy checks against them
(testing/conformance.py). The resource protocols (`…Containers`, `…Images`)
are pieces of engine.containers, engine.images...; the engine protocols
(`…Engine`) are what one component holds. Resources are read-only properties
here, so that an engine whose `containers` is a subclass still fits.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from boincd_containers.engine.images import ProgressCallback
from boincd_containers.engine.info import EngineInfo
from boincd_containers.engine.session import JSON, JSONList

# -- pieces of engine.containers ----------------------------------------------------


class ListsContainers(Protocol):
    async def list(self, labels: dict[str, str], *, size: bool = False) -> JSONList: ...


class InspectsContainers(Protocol):
    async def inspect(self, ref: str, *, size: bool = False) -> JSON: ...


class KillsContainers(Protocol):
    async def kill(self, ref: str, signal: str = "KILL") -> None: ...


class RemovesContainers(Protocol):
    async def remove(self, ref: str) -> None: ...


class ReadsContainers(ListsContainers, InspectsContainers, Protocol):
    """List and inspect."""


class RunsContainers(InspectsContainers, RemovesContainers, Protocol):
    """The lifecycle of one task's container."""

    async def create(self, name: str, config: JSON) -> str: ...
    async def start(self, ref: str) -> None: ...
    async def pause(self, ref: str) -> None: ...
    async def unpause(self, ref: str) -> None: ...


class AdoptsContainers(ReadsContainers, Protocol):
    """What the registry does: list, inspect, and rename a legacy name."""

    async def rename(self, ref: str, name: str) -> None: ...


class WatchesContainers(InspectsContainers, KillsContainers, Protocol):
    """Look at a running container, and kill one past its limit."""


class CollectsContainers(ReadsContainers, RemovesContainers, Protocol):
    """Find leftovers and remove them."""


# -- pieces of engine.images ----------------------------------------------------------


class InspectsImages(Protocol):
    async def inspect(self, ref: str) -> JSON: ...


class ReadsLayers(InspectsImages, Protocol):
    """An image and its layers' history (accounting.LayerSource over the engine)."""

    async def history(self, ref: str) -> JSONList: ...


class ListsImages(Protocol):
    async def list(self, labels: dict[str, str] | None = None) -> JSONList: ...


class InventoriesImages(ReadsLayers, ListsImages, Protocol):
    """Every image, its layers and their sizes."""


class StoresImages(InspectsImages, ListsImages, Protocol):
    """Bring images in (pull, load, build), name and remove them."""

    async def tag(self, ref: str, new_ref: str) -> None: ...
    async def remove(self, ref: str) -> JSONList: ...
    async def pull(self, ref: str, progress: ProgressCallback | None = None) -> None: ...
    async def load(
        self,
        tarball: Path | BinaryIO,
        progress: ProgressCallback | None = None,
        *,
        name: str | None = None,
    ) -> list[str]: ...
    async def build(
        self,
        context_tar: bytes | AsyncIterable[bytes],
        tag: str,
        labels: dict[str, str],
        buildargs: dict[str, str],
        progress: ProgressCallback | None = None,
        *,
        network: bool = True,
    ) -> None: ...


# -- engine.volumes, engine.networks, engine.events -------------------------------------


class ListsVolumes(Protocol):
    async def list(self, labels: dict[str, str]) -> JSONList: ...


class CollectsVolumes(ListsVolumes, Protocol):
    async def inspect(self, name: str) -> JSON: ...
    async def remove(self, name: str) -> None: ...


class JoinsNetworks(Protocol):
    async def connect(self, network: str, ref: str) -> None: ...
    async def disconnect(self, network: str, ref: str) -> None: ...


class FollowsEvents(Protocol):
    def follow(self, labels: dict[str, str], since: float | None = None) -> AsyncIterator[JSON]: ...


class FollowsImageEvents(Protocol):
    def follow_images(self, since: float | None = None) -> AsyncIterator[JSON]: ...


# -- what each component holds ------------------------------------------------------------


@runtime_checkable
class KnowsEngine(Protocol):
    """The engine as connect() last found it."""

    @property
    def info(self) -> EngineInfo | None: ...


@runtime_checkable
class ConnectsEngine(KnowsEngine, Protocol):
    async def connect(self) -> EngineInfo: ...


@runtime_checkable
class ImageCacheEngine(Protocol):
    """images.cache.ImageCache: brings, names and removes images; sees which
    containers use them."""

    @property
    def images(self) -> StoresImages: ...
    @property
    def containers(self) -> ListsContainers: ...


@runtime_checkable
class RegistryEngine(ConnectsEngine, Protocol):
    """tasks.registry.Registry: lists and follows our containers, reconnects."""

    @property
    def containers(self) -> AdoptsContainers: ...
    @property
    def events(self) -> FollowsEvents: ...
    async def reset(self) -> None: ...


@runtime_checkable
class TaskEngine(KnowsEngine, Protocol):
    """tasks.manager.TaskManager: one task's container, start to end."""

    @property
    def containers(self) -> RunsContainers: ...
    @property
    def networks(self) -> JoinsNetworks: ...


@runtime_checkable
class LimitsEngine(Protocol):
    """watch.limits.DiskLimits: sizes of a task's container; kills one too big."""

    @property
    def containers(self) -> WatchesContainers: ...


@runtime_checkable
class MemoryWatchEngine(Protocol):
    """watch.memwatch.MemoryWatch: kills a container past its memory limit."""

    @property
    def containers(self) -> KillsContainers: ...


@runtime_checkable
class DiskUsageEngine(Protocol):
    """gc.collector's volume sizes: `docker system df`."""

    async def system_df(self) -> JSON: ...


@runtime_checkable
class CollectorEngine(DiskUsageEngine, Protocol):
    """gc.collector.Collector: leftover containers and volumes, removed (and
    their sizes, for the report)."""

    @property
    def containers(self) -> CollectsContainers: ...
    @property
    def volumes(self) -> CollectsVolumes: ...


@runtime_checkable
class LayersEngine(Protocol):
    """gc.inventory's accounting.LayerSource: an image and its layers."""

    @property
    def images(self) -> ReadsLayers: ...


@runtime_checkable
class InventoryEngine(ConnectsEngine, Protocol):
    """gc.inventory.Inventory: every image, our containers and volumes, sized,
    kept current by image events."""

    @property
    def images(self) -> InventoriesImages: ...
    @property
    def containers(self) -> ReadsContainers: ...
    @property
    def volumes(self) -> ListsVolumes: ...
    @property
    def events(self) -> FollowsImageEvents: ...
