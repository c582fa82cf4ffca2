"""Garbage collection: what finished tasks, reset projects and vanished clients leave behind.

A task container is removed only when the BOINC side of its task is over, told
by the slot dir the container was made for (BOINC's own record of the task):

- the slot dir is gone (BOINC deleted it: project reset or detached, client
  restarted without the task),
- it holds another result's `init_data.xml` (BOINC reused the slot),
- it holds no `init_data.xml` at all (BOINC cleans a slot out when its task
  ends for good; a live task's slot always has it, even across reboots),

and that has been so for `gc_grace_s`; or when no shim has asked about the task
for `shim_lease_s` (the client is gone for good). Nothing is removed while its
shim is active: a shim asks about its task every second, and a task seen within
the grace period is always kept; so is, after a reboot, every container whose
slot still holds its task (the shim starts it again). Labelled volumes that no
container uses are removed once older than the grace period, and unpinned
images past the cache rules by the image inventory's eviction. Objects without
this daemon's owner label, or with another instance's, are never touched.

Every removal takes the result's lock (TaskManager.locked), so a create-or-attach,
an abort and a collection of the same task never interleave; the decision is
made again under the lock from a fresh inspect. A dry run decides the same way
and changes nothing.

When the shim was last seen is saved in the state dir (leases.json, write then
rename), so a daemon restart does not restart every lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boincd_containers.core import labels as L
from boincd_containers.core.errors import BoincdError, NotFound, Unavailable
from boincd_containers.core.log import get_logger
from boincd_containers.core.supervise import repeat
from boincd_containers.gc.policy import (
    LEASE_SAVE_S,
    ContainerFacts,
    GcReport,
    LeaseBook,
    Removal,
    SlotState,
    container_verdict,
    parse_time,
    slot_state,
)
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.state import UNPREPARED_STATES, TaskKey

if TYPE_CHECKING:
    from boincd_containers.core.settings import Settings
    from boincd_containers.engine.protocols import CollectorEngine, DiskUsageEngine
    from boincd_containers.gc.inventory import Inventory
    from boincd_containers.tasks.manager import TaskManager
    from boincd_containers.tasks.registry import Registry

log = get_logger(__name__)

_ANONYMOUS_VOLUME = re.compile(r"[0-9a-f]{64}")


# -- the collector ----------------------------------------------------------------------


class Collector:
    def __init__(
        self,
        settings: Settings,
        engine: CollectorEngine,
        registry: Registry,
        tasks: TaskManager,
        state_dir: Path,
        inventory: Inventory | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = registry
        self.tasks = tasks
        self.inventory = inventory
        self.store = registry.store
        self.leases = LeaseBook(state_dir / "leases.json", self.store)
        self._one_at_a_time = asyncio.Lock()
        # Container id -> (slot state, when first seen so): the grace counts from then.
        self._noticed: dict[str, tuple[SlotState, float]] = {}
        # Volume name -> when first seen, for engines that give no creation time.
        self._volume_seen: dict[str, float] = {}
        self.last: GcReport | None = None
        self.last_error: str | None = None
        self.freed_total = 0
        self.clock: Callable[[], float] = time.time  # tests turn it forward

    # -- one pass ---------------------------------------------------------------

    async def collect(self, dry_run: bool = False) -> GcReport:
        async with self._one_at_a_time:
            if self.registry.engine_error is not None:
                raise Unavailable(
                    f"garbage collection needs the engine: {self.registry.engine_error}"
                )
            report = GcReport(dry_run, at=self.clock())
            sizes = _VolumeSizes(self.engine)
            containers = await self.engine.containers.list(self.registry.owner_labels)
            present: set[str] = set()
            for summary in containers:
                labels = summary.get("Labels") or {}
                if not L.is_ours(labels, self.registry.instance_id) or L.RESULT not in labels:
                    continue  # not a task container of ours: never ours to judge
                present.add(str(summary["Id"]))
                try:
                    await self._container(summary, labels, report, sizes)
                except Unavailable:
                    raise
                except BoincdError as exc:
                    report.errors.append(exc.message)
            if not dry_run:
                for cid in set(self._noticed) - present:
                    del self._noticed[cid]
                await self._stale_mounts()
            await self._volumes(report, sizes)
            await self._images(report)
            if not dry_run:
                await self._forget_failed(report.at)
                self.last = report
                self.freed_total += report.freed_bytes
            return report

    def _last_seen(self, key: TaskKey, container_id: str, now: float) -> float:
        record = self.store.get(key)
        if record is not None and record.container_id == container_id:
            return record.last_seen
        # Not in the view (yet): the saved time, else "just now", the safe side.
        saved = self.leases.saved(key)
        return now if saved is None else saved

    def _facts(
        self, data: dict[str, Any], key: TaskKey, now: float, dry_run: bool
    ) -> ContainerFacts:
        cid = str(data.get("Id", ""))
        labels = (data.get("Config") or {}).get("Labels") or {}
        slot_dir = str(labels.get(L.SLOT, ""))
        state, other = slot_state(slot_dir, key.result)
        since = now
        if state in (SlotState.GONE, SlotState.OTHER, SlotState.EMPTY):
            noticed = self._noticed.get(cid)
            if noticed is not None and noticed[0] is state:
                since = noticed[1]
            elif not dry_run:
                self._noticed[cid] = (state, now)
        elif not dry_run:
            self._noticed.pop(cid, None)
        return ContainerFacts(
            slot=state,
            slot_dir=slot_dir,
            other_result=other,
            idle_s=now - self._last_seen(key, cid, now),
            slot_changed_for_s=now - since,
        )

    async def _container(
        self, summary: dict[str, Any], labels: dict[str, str], report: GcReport, sizes: _VolumeSizes
    ) -> None:
        cid, result = str(summary["Id"]), labels[L.RESULT]
        key = TaskKey(labels.get(L.PROJECT, ""), result)
        grace, lease = self.settings.gc_grace_s, self.settings.shim_lease_s
        async with self.tasks.locked(key):
            try:
                # Decided again under the lock, from the engine's current word.
                data = await self.engine.containers.inspect(cid)
                reason = container_verdict(
                    self._facts(data, key, self.clock(), report.dry_run), grace, lease
                )
                if reason is None:
                    return
                data = await self.engine.containers.inspect(cid, size=True)
            except NotFound:
                return  # removed meanwhile (its shim finished, or an abort)
            name = str(data.get("Name", cid)).lstrip("/")
            volumes = [
                str(m.get("Name"))
                for m in data.get("Mounts") or []
                if m.get("Type") == "volume" and m.get("Name")
            ]
            removal = Removal("container", name, reason, int(data.get("SizeRw") or 0), cid, result)
            if report.dry_run:
                report.removed.append(removal)
                # `rm -v` takes the anonymous ones (random 64-hex names) with it.
                for volume in volumes:
                    if _ANONYMOUS_VOLUME.fullmatch(volume):
                        report.removed.append(await self._volume_removal(volume, name, sizes))
                return
            vol_removals = [await self._volume_removal(v, name, sizes) for v in volumes]
            await self.engine.containers.remove(cid)
            self.tasks.release_mounts(name)
            report.removed.append(removal)
            log.info("collected task container", container=cid[:12], reason=reason)
            for volume, vol_removal in zip(volumes, vol_removals, strict=True):
                try:
                    await self.engine.volumes.inspect(volume)
                except NotFound:
                    report.removed.append(vol_removal)  # went with its container
            self._forget_task(key, cid)

    async def _stale_mounts(self) -> None:
        """Unmount the mount points (host/mounts.py) of containers gone without us: a
        daemon killed mid-task, a container removed by hand. Kept while any
        container of that name exists, ours or not."""
        live = {
            str(n).lstrip("/")
            for c in await self.engine.containers.list({})
            for n in c.get("Names") or []
        }
        self.tasks.mounts.sweep(live)

    async def _volume_removal(self, volume: str, container: str, sizes: _VolumeSizes) -> Removal:
        return Removal(
            "volume", volume, f"anonymous volume of container {container}", await sizes.get(volume)
        )

    def _forget_task(self, key: TaskKey, container_id: str) -> None:
        """What TaskManager.remove forgets, for a container removed here: the store
        drops the record, its on_drop hooks release its GPU share."""
        record = self.store.get(key)
        if record is not None and record.container_id == container_id:
            self.store.drop(record)
        self._noticed.pop(container_id, None)

    async def _volumes(self, report: GcReport, sizes: _VolumeSizes) -> None:
        volumes = [
            v
            for v in await self.engine.volumes.list(self.registry.owner_labels)
            if L.is_ours(v.get("Labels") or {}, self.registry.instance_id)
        ]
        if not volumes:
            return
        # Used by any container at all, ours or not: in use is in use.
        in_use = {
            str(m.get("Name"))
            for c in await self.engine.containers.list({})
            for m in c.get("Mounts") or []
            if m.get("Type") == "volume"
        }
        now = self.clock()
        if not report.dry_run:
            self._volume_seen = {
                v["Name"]: self._volume_seen.get(v["Name"], now) for v in volumes if "Name" in v
            }
        for volume in volumes:
            name = str(volume.get("Name", ""))
            created = parse_time(str(volume.get("CreatedAt", "")))
            if created is None:
                created = self._volume_seen.get(name, now)
            if not name or name in in_use or now - created < self.settings.gc_grace_s:
                continue
            if await sizes.ref_count(name) > 0:
                continue
            volume_labels = volume.get("Labels") or {}
            result = volume_labels.get(L.RESULT, "")
            removal = Removal(
                "volume",
                name,
                "labelled volume that no container uses",
                await sizes.get(name),
                result=result,
            )
            if report.dry_run:
                report.removed.append(removal)
                continue
            key = TaskKey(volume_labels.get(L.PROJECT, ""), result)
            lock = self.tasks.locked(key) if result else contextlib.nullcontext()
            async with lock:
                try:
                    await self.engine.volumes.remove(name)
                except BoincdError as exc:  # taken into use meanwhile: kept
                    report.errors.append(exc.message)
                    continue
            report.removed.append(removal)
            log.info("collected volume", volume=name)

    async def _images(self, report: GcReport) -> None:
        """Unpinned images past the cache rules: the image inventory decides (LRU under
        its budget, never a pinned or foreign image); containers go first, so the
        images of the tasks just collected are no longer pinned."""
        if self.inventory is None:
            return
        try:
            eviction = await self.inventory.evict(dry_run=report.dry_run)
        except BoincdError as exc:  # the containers' part of the report still stands
            report.errors.append(exc.message)
            return
        for item in eviction.removed:
            report.removed.append(
                Removal(
                    "image",
                    str(item.get("ref") or item.get("id")),
                    "least recently used image the daemon brought, over the image cache budget",
                    int(item.get("freed_bytes") or 0),
                    str(item.get("id") or ""),
                )
            )

    async def _forget_failed(self, now: float) -> None:
        """Failed records whose shim went away: nothing in the engine, just memory."""
        for record in self.store:
            if record.container_id or record.state not in UNPREPARED_STATES:
                continue
            if now - record.last_seen < self.settings.gc_grace_s:
                continue
            async with self.tasks.locked(record.key):
                if self.store.current(record) and not record.container_id:
                    self.store.drop(record)

    # -- loops ------------------------------------------------------------------

    async def run_periodically(self) -> None:
        """Collect every gc_interval_s; the first pass waits one interval, so that
        after a restart every live shim has asked about its task again."""
        interval = self.settings.gc_interval_s
        if interval <= 0:
            return  # periodic collection off; `ctl gc` still works
        await repeat(self._periodic_pass, interval, "garbage collection", wait_first=True)

    async def _periodic_pass(self) -> None:
        """One collection; its failure is kept for status (`last_error`)."""
        try:
            report = await self.collect()
        except BoincdError as exc:
            self.last_error = exc.message
            raise
        except Exception as exc:
            self.last_error = f"internal error: {exc!r}"
            raise
        self.last_error = None
        if report.removed or report.errors:
            log.info(
                "garbage collected",
                removed=len(report.removed),
                freed_bytes=report.freed_bytes,
                errors=report.errors,
            )

    async def keep_leases(self) -> None:
        """Save last-seen times now and then, and once more at shutdown."""
        try:
            while True:
                await asyncio.sleep(LEASE_SAVE_S)
                await self._save_leases()
        finally:
            await self._save_leases()

    async def _save_leases(self) -> None:
        self.leases.update(self.store, complete=self.registry.engine_error is None)
        await self.leases.save_if_changed()

    # -- StatusProvider -----------------------------------------------------------

    def task_fields(self, record: TaskRecord) -> dict[str, Any]:
        return {"last_seen": record.last_seen}

    async def status_fields(self) -> dict[str, Any]:
        last = self.last
        return {
            "gc": {
                "interval_s": self.settings.gc_interval_s,
                "grace_s": self.settings.gc_grace_s,
                "shim_lease_s": self.settings.shim_lease_s,
                "last_run": last.at if last else None,
                "last_removed": len(last.removed) if last else 0,
                "last_freed_bytes": last.freed_bytes if last else 0,
                "freed_bytes_total": self.freed_total,
                "error": self.last_error,
            }
        }


class _VolumeSizes:
    """Volume sizes from `GET /system/df`, fetched at most once per pass and only when
    a volume is about to go: the call is slow, the answer exact."""

    def __init__(self, engine: DiskUsageEngine) -> None:
        self.engine = engine
        self._usage: dict[str, dict[str, Any]] | None = None

    async def _load(self) -> dict[str, dict[str, Any]]:
        if self._usage is None:
            try:
                df = await self.engine.system_df()
            except BoincdError as exc:
                log.warning("volume sizes unknown", error=exc.message)
                df = {}
            self._usage = {
                str(v.get("Name")): v.get("UsageData") or {} for v in df.get("Volumes") or []
            }
        return self._usage

    async def get(self, name: str) -> int:
        size = (await self._load()).get(name, {}).get("Size")
        return int(size) if isinstance(size, int | float) and size > 0 else 0

    async def ref_count(self, name: str) -> int:
        count = (await self._load()).get(name, {}).get("RefCount")
        return int(count) if isinstance(count, int | float) and count > 0 else 0
