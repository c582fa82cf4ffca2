"""The fakes are engines: mypy checks here that the real Engine and each fake
satisfy the Protocol of every component they stand in for (engine/protocols.py).
Nothing runs this module for its effect; tests/unit/test_engine_protocols.py
imports it and checks the same at run time."""

from __future__ import annotations

from boincd_containers.engine import protocols as P
from boincd_containers.engine.adapter import Engine
from boincd_containers.testing.fake_images import ImageEngine
from boincd_containers.testing.fakes import FakeEngine

# Every component's Protocol; the fakes' (and Engine's) fit is checked by mypy below.
COMPONENT_PROTOCOLS: tuple[type, ...] = (
    P.ImageCacheEngine,
    P.RegistryEngine,
    P.TaskEngine,
    P.LimitsEngine,
    P.MemoryWatchEngine,
    P.CollectorEngine,
    P.DiskUsageEngine,
    P.LayersEngine,
    P.InventoryEngine,
)


def _engines_fit(engine: Engine | FakeEngine | ImageEngine) -> None:
    """Type-checked, never called: each assignment fails mypy if the real engine or
    a fake (mypy checks each member of the union) lacks a call its component
    makes, or makes it with another signature. ImageEngine is a FakeEngine whose
    resources are subclasses: still the same shapes."""
    image_cache: P.ImageCacheEngine = engine
    registry: P.RegistryEngine = engine
    tasks: P.TaskEngine = engine
    limits: P.LimitsEngine = engine
    memwatch: P.MemoryWatchEngine = engine
    collector: P.CollectorEngine = engine
    disk_usage: P.DiskUsageEngine = engine
    layers: P.LayersEngine = engine
    inventory: P.InventoryEngine = engine
    del image_cache, registry, tasks, limits, memwatch, collector, disk_usage, layers, inventory
