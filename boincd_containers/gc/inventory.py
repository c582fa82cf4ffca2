"""The image cache's disk: exact accounting, the budget, and eviction.

It answers `GET /v1/images` and `POST /v1/images/evict` (daemon/routes.py),
gives the `images`, `volumes` and `containers` fields of `GET /v1/status`, and
runs one background loop (started by daemon/app.py).

Accounting (accounting.DiskAccount) covers every image in the engine, ours or
not, so `images.total_bytes` equals Docker's `/system/df` LayersSize to the
byte. It is kept current from the engine's image events (pull, load, tag,
untag, delete, import...): each burst of events costs one `GET /images/json`
and an inspect + history for each image not seen before; `/system/df` is
never called. The list is also compared periodically, since events can be
lost. Writable layers of our containers and our labelled volumes are measured
by the engine and the file system, on their own slower period.

Eviction keeps the images the daemon brought within `image_cache_budget_bytes`
(the distinct layers of those images), least recently used first, never an
image a container uses or a task is about to use, never one it did not bring.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Collection
from typing import Any

from boincd_containers.core.errors import BoincdError, NotFound, Unavailable
from boincd_containers.core.log import get_logger
from boincd_containers.core.settings import Settings
from boincd_containers.engine.protocols import InventoryEngine, LayersEngine
from boincd_containers.images.accounting import (
    DiskAccount,
    ImageData,
    fetch_image_data,
    normalize_id,
)
from boincd_containers.images.cache import ImageCache
from boincd_containers.images.eviction import EvictionReport, plan_eviction
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.registry import Registry

log = get_logger(__name__)

# Without a configured budget, the cache may grow into this share of the disk
# that was free (plus what the cache already held) when the engine was first seen.
DEFAULT_BUDGET_SHARE = 0.5
_SIZES_EVERY_S = 60.0  # writable layers and volumes: the engine walks directories


class Inventory:
    """The accounting, the pins, the budget and the loop that keeps them current."""

    def __init__(
        self, engine: InventoryEngine, registry: Registry, images: ImageCache, settings: Settings
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.images = images
        self.settings = settings
        self.account = DiskAccount()
        self.synced = False  # the account has matched the engine at least once
        self.error: str | None = "not synced yet"
        self.budget_bytes = settings.image_cache_budget_bytes
        self.last_eviction: EvictionReport | None = None
        self.container_images: dict[str, str] = {}  # our container id -> image id
        self._volume_names: set[str] = set()
        self._dirty = asyncio.Event()  # image events arrived: compare the list
        self._evict = asyncio.Event()  # an image was brought or freed: check the budget
        self._sync_lock = asyncio.Lock()
        self._evict_lock = asyncio.Lock()
        self._sizes_at = 0.0
        # Containers whose exit was heard: their layer is final, measure each now.
        self._stopped: set[str] = set()
        self._stopped_wake = asyncio.Event()
        # When a container was created or last measured alone: a list taken
        # before that moment knows less of it than the account does.
        self._fresh_at: dict[str, float] = {}
        self._backoff = 0.5  # reconnect delay; back to short once synced
        self._images_key: tuple[Any, ...] | None = None
        self._images_view: dict[str, Any] = {}
        # The attribution last given to the account, and the account's version then.
        self._attributed: tuple[dict[str, set[str]], int] | None = None

    # -- keeping the account current ---------------------------------------------

    async def sync_images(self) -> None:
        """Make the account list exactly the engine's images (`GET /images/json`)."""
        async with self._sync_lock:
            listed = {normalize_id(str(i["Id"])): i for i in await self.engine.images.list()}
            for usage in self.account.images():
                if usage.id not in listed:
                    self.account.remove_image(usage.id)
            new: list[ImageData] = []
            for image_id in sorted(set(listed) - {u.id for u in self.account.images()}):
                try:
                    new.append(await fetch_image_data(_LayerSource(self.engine), image_id))
                except NotFound:
                    continue  # removed meanwhile: its delete event brings us back here
            # Fewer layers first: bases settle the sizes of shared layers (see accounting).
            for data in sorted(new, key=lambda d: (len(d.diff_ids), d.id)):
                self.account.add_image(data)
            for image_id, summary in listed.items():
                record = self.account.record(image_id)
                tags = tuple(t for t in summary.get("RepoTags") or () if t != "<none>:<none>")
                if record is not None and record.refs != tags:
                    self.account.set_refs(image_id, tags)  # tag and untag change no layer

    async def sync_sizes(self) -> None:
        """Writable layers of our containers, and our labelled volumes."""
        owner = self.registry.owner_labels
        listed_at = time.monotonic()
        containers = await self.engine.containers.list(owner, size=True)
        seen = set()
        for summary in containers:
            cid = str(summary["Id"])
            seen.add(cid)
            if self._fresh_at.get(cid, -1.0) < listed_at:
                self.account.set_container(cid, summary.get("SizeRw"))
            self.container_images[cid] = normalize_id(str(summary.get("ImageID", "")))
        for cid in set(self.container_images) - seen:
            if self._fresh_at.get(cid, -1.0) < listed_at:
                self._forget_container(cid)
        volumes = await self.engine.volumes.list(owner)
        names = {str(v["Name"]) for v in volumes}
        for gone in self._volume_names - names:
            self.account.remove_volume(gone)
        for volume in volumes:
            size = await asyncio.to_thread(_tree_size, str(volume.get("Mountpoint") or ""))
            self.account.set_volume(str(volume["Name"]), size)
        self._volume_names = names
        self._sizes_at = time.monotonic()

    async def measure_container(self, cid: str) -> None:
        """One container's writable layer, now (its final size once it has stopped)."""
        started = time.monotonic()
        try:
            data = await self.engine.containers.inspect(cid, size=True)
        except NotFound:
            self._forget_container(cid)
            return
        except BoincdError as exc:  # the next periodic measurement will do
            log.debug("container size not measured", container=cid[:12], error=str(exc))
            return
        self.account.set_container(cid, data.get("SizeRw"))
        self._fresh_at[cid] = started

    def _forget_container(self, cid: str) -> None:
        self.account.remove_container(cid)
        self.container_images.pop(cid, None)
        self._fresh_at.pop(cid, None)
        self._stopped.discard(cid)

    def on_container_event(self, event: dict[str, Any]) -> None:
        """Registry listener: our containers come and go between size measurements."""
        actor = event.get("Actor") or {}
        cid = str(actor.get("ID") or "")
        image = normalize_id(str((actor.get("Attributes") or {}).get("image") or ""))
        action = event.get("Action")
        if action == "create" and cid:
            self.account.set_container(cid, 0)
            self._fresh_at[cid] = time.monotonic()
            if image:
                self.container_images[cid] = image
        elif action == "die" and cid:
            self._stopped.add(cid)
            self._stopped_wake.set()
        elif action == "destroy" and cid:
            gone = self.container_images.get(cid) or image
            self._forget_container(cid)
            if gone:
                self.images.records.touch(gone)  # used until now: the LRU clock starts here
            self._evict.set()

    def on_image_event(self, event: dict[str, Any]) -> None:
        self._dirty.set()

    def wake_eviction(self) -> None:
        """An image was brought, or the disk filled up: check the budget now."""
        self._evict.set()

    # -- pins and budget ---------------------------------------------------------

    def pinned(self) -> set[str]:
        """Images a container of ours uses or a task is about to use."""
        ids = {normalize_id(i) for i in self.images.leases.values()}
        ids |= {normalize_id(r.image_id) for r in self.registry.tasks.values() if r.image_id}
        ids |= {i for i in self.container_images.values() if i}
        return ids

    def ours(self) -> set[str]:
        return {i for i in self.images.brought if i in self.account}

    def cache_bytes(self) -> int:
        sizes = self.account.layer_sizes
        chains: set[str] = set()
        for image_id in self.ours():
            record = self.account.record(image_id)
            if record is not None:
                chains.update(layer.chain_id for layer in record.layers)
        return sum(sizes[c] for c in chains)

    def candidates(self, pinned: Collection[str]) -> list[str]:
        """Our unpinned images, least recently used first."""
        records = self.images.brought
        ids = [i for i in self.ours() if i not in pinned]
        return sorted(
            ids,
            key=lambda i: (
                float(records[i].get("last_used") or 0.0),
                float(records[i].get("brought_at") or 0.0),
                i,
            ),
        )

    def decide_budget(self) -> None:
        """The default budget, once: half the disk free under the engine's data root."""
        if self.budget_bytes is not None:
            return
        root = self.engine.info.data_root if self.engine.info else ""
        for path in (root, self.settings.state_dir):
            try:
                free = shutil.disk_usage(path).free if path else None
            except OSError:
                continue
            if free is not None:
                self.budget_bytes = self.cache_bytes() + int(free * DEFAULT_BUDGET_SHARE)
                log.info("image cache budget", budget_bytes=self.budget_bytes, disk=path)
                return

    async def evict(
        self, *, dry_run: bool = False, budget_bytes: int | None = None
    ) -> EvictionReport:
        """Remove least-recently-used unpinned images the daemon brought until its
        images fit the budget (`budget_bytes` overrides it, e.g. 0 to free all).
        Reports each image removed with the exact bytes its removal freed."""
        async with self._evict_lock:
            await self.sync_images()
            await self._forget_vanished()
            budget = self.budget_bytes if budget_bytes is None else budget_bytes
            report = EvictionReport(dry_run, budget, self.cache_bytes())
            pinned = self.pinned()
            self.images.records.in_use(pinned)
            kept: set[str] = set()
            while budget is not None:
                plan = plan_eviction(
                    self.account, self.ours(), self.candidates(pinned | kept), budget
                )
                if not plan:
                    break
                if dry_run:
                    # The same checks the removal makes: what stays is planned around.
                    reasons = {s.image_id: await self.images.why_kept(s.image_id) for s in plan}
                    stays = {i: why for i, why in reasons.items() if why is not None}
                    if stays:
                        kept.update(stays)
                        report.kept += [{**self._item(i, 0), "reason": w} for i, w in stays.items()]
                        continue
                    report.removed = [self._item(s.image_id, s.freed_bytes) for s in plan]
                    report.cache_bytes_after = plan[-1].cache_bytes_after
                    return report
                step = plan[0]
                item = self._item(step.image_id, 0)
                # The engine's delete event must not update the account in between:
                # the bytes freed are the account's total before minus after.
                async with self._sync_lock:
                    before = self.account.total_bytes
                    outcome = await self.images.remove(step.image_id)
                    if outcome.removed:
                        self.account.remove_image(step.image_id)
                    item["freed_bytes"] = before - self.account.total_bytes
                if not outcome.removed:
                    kept.add(step.image_id)
                    report.kept.append({**item, "reason": outcome.reason})
                    continue
                report.removed.append(item)
                log.info("image evicted", **item)
            report.cache_bytes_after = self.cache_bytes()
            if report.removed or report.kept:
                self.last_eviction = report
            self.images.records.save_if_dirty()
            return report

    def _item(self, image_id: str, freed: int) -> dict[str, Any]:
        record = self.account.record(image_id)
        refs = list(self.images.brought.get(image_id, {}).get("refs") or [])
        return {
            "id": image_id,
            "ref": (record.refs[0] if record and record.refs else refs[0] if refs else image_id),
            "freed_bytes": freed,
            "last_used": self.images.records.last_used(image_id),
        }

    async def _forget_vanished(self) -> None:
        """Records of images removed behind our back (by a volunteer) are dropped."""
        for image_id in [i for i in self.images.brought if i not in self.account]:
            try:
                await self.engine.images.inspect(image_id)
            except NotFound:
                if image_id not in self.images.leases.values():
                    self.images.records.forget(image_id)

    # -- the loop -----------------------------------------------------------------

    async def run(self) -> None:
        """Follow image events and keep everything current; reconnect with backoff."""
        while True:
            try:
                if self.engine.info is None:
                    await self.engine.connect()
                since = time.time()
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._follow(since))
                    group.create_task(self._work())
                    group.create_task(self._measure_stopped())
            except* BoincdError as errors:
                self.error = str(errors.exceptions[0])
                log.warning("image inventory paused", error=self.error, retry_in_s=self._backoff)
            except* Exception as errors:
                self.error = f"internal error: {errors.exceptions[0]!r}"
                log.error("image inventory failed", exc_info=errors.exceptions[0])
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, 30.0)

    async def _follow(self, since: float) -> None:
        async for event in self.engine.events.follow_images(since=since):
            self.on_image_event(event)

    async def _work(self) -> None:
        await self.sync_images()
        await self.sync_sizes()
        self.synced, self.error, self._backoff = True, None, 0.5
        self.decide_budget()
        self._evict.set()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow_images())
            group.create_task(self._measure_sizes())

    async def _measure_sizes(self) -> None:
        """Every container's writable layer on its own clock: a stream of image
        events (or a slow eviction) must not hold it back."""
        while True:
            await asyncio.sleep(max(0.0, self._sizes_at + _SIZES_EVERY_S - time.monotonic()))
            await self.sync_sizes()

    async def _measure_stopped(self) -> None:
        """A container that stopped is measured at once: its size is final, and a
        volunteer looking at `ctl status` after a task expects what df says."""
        while True:
            await self._stopped_wake.wait()
            self._stopped_wake.clear()
            while self._stopped:
                await self.measure_container(self._stopped.pop())

    async def _follow_images(self) -> None:
        interval = self.settings.relist_interval_s
        while True:
            waiters = [asyncio.ensure_future(e.wait()) for e in (self._dirty, self._evict)]
            try:
                await asyncio.wait(waiters, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            periodic = not (self._dirty.is_set() or self._evict.is_set())
            if self._dirty.is_set() or periodic:
                self._dirty.clear()
                await self.sync_images()
            if self._evict.is_set() or periodic:
                self._evict.clear()
                await self.evict()

    # -- status -------------------------------------------------------------------

    def _projects_by_image(self) -> dict[str, set[str]]:
        projects: dict[str, set[str]] = {}
        for image_id, record in self.images.brought.items():
            projects.setdefault(image_id, set()).update(record.get("projects") or ())
        for task in self.registry.tasks.values():
            if task.image_id and task.project:
                projects.setdefault(normalize_id(task.image_id), set()).add(task.project)
        return projects

    def images_json(self) -> dict[str, Any]:
        """The `images` section of the status answer. Its bulk (every image with
        its bytes, projects and pins) is kept and recomputed only when what it is
        made of changed: status is asked every second or so, images change rarely."""
        attributed = self._projects_by_image()
        if self._attributed != (attributed, self.account.images_version):
            for usage in self.account.images():
                wanted = frozenset(attributed.get(usage.id, ()))
                if usage.projects != wanted:
                    self.account.set_projects(usage.id, wanted)
            self._attributed = (attributed, self.account.images_version)
        pinned, ours = self.pinned(), self.ours()
        key = (
            self.account.images_version,
            frozenset(pinned),
            frozenset(ours),
            tuple((i, r.get("last_used")) for i, r in self.images.brought.items()),
            tuple(self.images.records.used_at.items()),
            self.budget_bytes,
        )
        if key != self._images_key:
            # A new items list only when they changed: the status answer keeps
            # the list's JSON while it is the same object (daemon/app.py).
            self._images_view = self._images_view_now(pinned, ours)
            self._images_key = key
        return {
            **self._images_view,
            "in_progress": self.images.in_progress(),
            "last_eviction": self.last_eviction.to_json() if self.last_eviction else None,
            "synced": self.synced and self.error is None,
            "error": self.error,
        }

    def _images_view_now(self, pinned: set[str], ours: set[str]) -> dict[str, Any]:
        items = [
            {
                "ref": usage.ref,
                "refs": list(usage.refs),
                "id": usage.id,
                "size_bytes": usage.size_bytes,
                "unique_bytes": usage.unique_bytes,
                "shared_bytes": usage.shared_bytes,
                "projects": sorted(usage.projects),
                "pinned": usage.id in pinned,
                "ours": usage.id in ours,
                "last_used": self.images.records.last_used(usage.id),
                "sizes_from": usage.sizes_from,
            }
            for usage in self.account.images()
        ]
        reclaimable = plan_eviction(self.account, ours, self.candidates(pinned), -1)
        return {
            "total_bytes": self.account.total_bytes,
            "count": len(items),
            "reclaimable_bytes": sum(s.freed_bytes for s in reclaimable),
            "cache_bytes": self.cache_bytes(),
            "budget_bytes": self.budget_bytes,
            "items": items,
            "projects": {
                p.project: {
                    "bytes": p.used_bytes,
                    "unique_bytes": p.exclusive_bytes,
                    "images": p.images,
                }
                for p in self.account.projects()
            },
        }

    # StatusProvider
    def task_fields(self, record: TaskRecord) -> dict[str, Any]:
        return {}  # each task's own disk figures are watch/limits.py's (`writable_bytes`...)

    async def status_fields(self) -> dict[str, Any]:
        totals = self.account.totals()
        return {
            "images": self.images_json(),
            "volumes": {"total_bytes": totals.volumes_bytes, "count": totals.volumes},
            "containers": {"writable_bytes": totals.containers_bytes, "count": totals.containers},
        }


class _LayerSource:
    """accounting.LayerSource over the engine adapter."""

    def __init__(self, engine: LayersEngine) -> None:
        self.engine = engine

    async def image_inspect(self, image_id: str) -> dict[str, Any]:
        return await self.engine.images.inspect(image_id)

    async def image_history(self, image_id: str) -> list[dict[str, Any]]:
        try:
            return await self.engine.images.history(image_id)
        except Unavailable:
            # Docker answers 500 for a config whose history names more layers than
            # it has; if the image is still there, that is the case: fall back.
            await self.engine.images.inspect(image_id)
            return []


def _tree_size(path: str) -> int:
    """Bytes of the regular files under `path`, hard links once (as the engine counts)."""
    if not path or not os.path.isdir(path):
        return 0
    total, seen = 0, set()
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total
