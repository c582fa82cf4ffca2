"""Which of the daemon's images to evict, and the report of an eviction.

Pure: it works on the accounting (accounting.DiskAccount) alone, so the same
plan serves a dry run, the real run, and `reclaimable_bytes` in status.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from boincd_containers.images.accounting import DiskAccount


@dataclass(frozen=True, slots=True)
class Step:
    """One image in an eviction plan: the disk bytes its removal frees, and the
    cache's size once it is gone."""

    image_id: str
    freed_bytes: int
    cache_bytes_after: int


@dataclass
class EvictionReport:
    dry_run: bool
    budget_bytes: int | None
    cache_bytes_before: int
    cache_bytes_after: int = 0
    removed: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)
    at: float = field(default_factory=time.time)

    @property
    def freed_bytes(self) -> int:
        return sum(int(r["freed_bytes"]) for r in self.removed)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "at": self.at,
            "budget_bytes": self.budget_bytes,
            "cache_bytes_before": self.cache_bytes_before,
            "cache_bytes_after": self.cache_bytes_after,
            "freed_bytes": self.freed_bytes,
            "removed": self.removed,
            "kept": self.kept,
        }


def plan_eviction(
    account: DiskAccount,
    ours: Collection[str],
    candidates: Iterable[str],
    budget_bytes: int,
) -> list[Step]:
    """Which candidates to remove, in order, until our images fit the budget.

    `ours`: the images the daemon brought (present in `account`); their distinct
    layers are the cache's size. `candidates`: those that may go, least recently
    used first. Each step frees the layers no remaining image uses; a layer a
    foreign image shares stays on disk, but no longer counts against our cache.
    """
    users: dict[str, set[str]] = {}
    sizes = account.layer_sizes
    layers: dict[str, list[str]] = {}
    for usage in account.images():
        record = account.record(usage.id)
        assert record is not None
        layers[usage.id] = [layer.chain_id for layer in record.layers]
        for chain in layers[usage.id]:
            users.setdefault(chain, set()).add(usage.id)
    mine = {i for i in ours if i in layers}
    cache = {c for i in mine for c in layers[i]}

    def cache_bytes() -> int:
        return sum(sizes[c] for c in cache)

    steps: list[Step] = []
    for image_id in candidates:
        if cache_bytes() <= budget_bytes:
            break
        if image_id not in mine:
            continue
        freed = 0
        for chain in set(layers[image_id]):
            users[chain].discard(image_id)
            if not users[chain]:
                freed += sizes[chain]
        mine.discard(image_id)
        cache = {c for i in mine for c in layers[i]}
        steps.append(Step(image_id, freed, cache_bytes()))
    return steps
