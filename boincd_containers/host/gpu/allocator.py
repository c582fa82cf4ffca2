"""Which task holds which GPU, and how much of it.

BOINC has already decided where a GPU task runs (`gpu_device_num`) and how
much of the card it takes (`gpu_usage`); the allocator honours that, keeps
the shares on one card at most 1 in total, and refuses what does not fit
with a retryable `GpuBusy` instead of quietly moving the task to another
card (which would double-book the card BOINC thinks is free).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from boincd_containers.host.gpu.backend import (
    VENDOR_NAMES,
    GpuBackend,
    GpuBusy,
    GpuDevice,
    GpuDeviceStatus,
    GpuRequestError,
    GpuShareStatus,
    GpuSnapshot,
    GpuTimeout,
    GpuUnavailable,
    Vendor,
    normalize_gpu_type,
)

LABEL_GPUS = "org.boinc.containers.gpus"
LABEL_GPU_USAGE = "org.boinc.containers.gpu_usage"

# Resolves a host pid to the id of the container it runs in (None: not in one).
PidToContainer = Callable[[int], str | None]

# Shares are counted in millionths: BOINC writes gpu_usage with "%f" (six
# decimals), so three tasks at 0.333333 fit one card exactly, with no float drift.
SHARE_UNIT = 1_000_000
# A backend that found no card (no driver installed, no GPU of its kind) is asked
# again by snapshot() only after this long: status is asked several times a
# second, each ask a driver load or a /sys scan in a thread, and a card or driver
# that appears is still seen within it. allocate() and devices() always ask.
IDLE_RECHECK_S = 30.0


def _to_units(usage: float) -> int:
    # At least one unit: a vanishingly small share must still count, or
    # unlimited tasks would fit one card.
    return max(1, round(usage * SHARE_UNIT))


def vendor_of_uuid(uuid: str) -> Vendor | None:
    """The vendor a stored device id belongs to, for restoring without an inventory."""
    upper = uuid.upper()
    if upper.startswith(("GPU-", "MIG-")):
        return "nvidia"
    if upper.startswith("AMD-"):
        return "amd"
    if upper.startswith("INTEL-"):
        return "intel"
    return None


@dataclass(frozen=True)
class GpuAssignment:
    """The GPUs one BOINC result holds.

    `share` is the fraction of each listed card the task holds (BOINC's
    `gpu_usage` up to 1; whole cards above 1); `memory_budget_bytes` is that
    fraction of one card's memory. `devices` lists the cards the inventory
    knows (a card gone since the daemon restarted is in `uuids` only).
    """

    result: str
    vendor: Vendor
    usage: float
    uuids: tuple[str, ...]
    share: float
    memory_budget_bytes: int
    devices: tuple[GpuDevice, ...] = ()

    def labels(self) -> dict[str, str]:
        """Container labels from which `GpuAllocator.restore` rebuilds this after a restart."""
        return {LABEL_GPUS: ",".join(self.uuids), LABEL_GPU_USAGE: repr(float(self.usage))}


def parse_gpu_labels(labels: Mapping[str, str]) -> tuple[list[str], float] | None:
    """(uuids, usage) from a container's labels; None for a CPU task or unreadable labels."""
    raw = labels.get(LABEL_GPUS, "")
    uuids = [u.strip() for u in raw.split(",") if u.strip()]
    if not uuids:
        return None
    try:
        usage = float(labels.get(LABEL_GPU_USAGE, "1"))
    except ValueError:
        return None
    if not math.isfinite(usage) or usage <= 0:
        return None
    return uuids, usage


@dataclass
class _Holding:
    result: str
    vendor: Vendor
    usage: float
    uuids: tuple[str, ...]
    units: int  # share of each card, in SHARE_UNIT


class GpuAllocator:
    """Assignments keyed by BOINC result name; safe to call from several threads."""

    def __init__(
        self,
        backends: GpuBackend | Sequence[GpuBackend],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backends: tuple[GpuBackend, ...] = (
            tuple(backends) if isinstance(backends, Sequence) else (backends,)
        )
        self.clock = clock
        # Re-entrant: allocate() holds it while devices() refreshes the inventory.
        self._lock = threading.RLock()
        self._holdings: dict[str, _Holding] = {}
        self._known: dict[str, GpuDevice] = {}
        # Backends that found no card, by index: when snapshot() asks them again.
        self._idle_until: dict[int, float] = {}

    def snapshot_asks_a_driver(self) -> bool:
        """Whether snapshot() would call a backend now (else it needs no thread)."""
        now = self.clock()
        with self._lock:
            held = {h.vendor for h in self._holdings.values()}
            return not all(self._rests(i, now, held) for i in range(len(self.backends)))

    # -- inventory ---------------------------------------------------------

    def devices(self, vendor: Vendor) -> list[GpuDevice]:
        """Current cards of one vendor in BOINC's numbering; raises GpuUnavailable."""
        found: list[GpuDevice] = []
        for backend in self.backends:
            if vendor in backend.vendors:
                found.extend(d for d in backend.devices() if d.vendor == vendor)
        with self._lock:
            for device in found:
                self._known[device.uuid] = device
        return sorted(found, key=lambda d: (d.boinc_num, d.index))

    def close(self) -> None:
        for backend in self.backends:
            backend.close()

    # -- allocation --------------------------------------------------------

    def allocate(self, result: str, gpu_type: str, device_num: int, usage: float) -> GpuAssignment:
        """Give `result` its share of the card BOINC assigned.

        Idempotent: a result that already holds GPUs gets the same assignment
        back (a re-attached task keeps the card its container was made with).
        Raises GpuBusy (retryable) when the card is full, GpuUnavailable when
        the card or its driver cannot be used, GpuRequestError for a request
        no retry can satisfy.
        """
        held = self.get(result)
        if held is not None:
            return held
        vendor = normalize_gpu_type(gpu_type)
        if not math.isfinite(usage) or usage <= 0:
            raise GpuRequestError(
                f"Task {result} asks for a GPU share of {usage!r}; it must be above 0."
            )
        # The inventory outside the lock: a slow or hung driver must not hold up
        # release() and snapshot(), which the event loop waits for.
        devices = self.devices(vendor)
        with self._lock:
            held_now = self._holdings.get(result)
            if held_now is not None:
                return self._assignment(held_now)
            if not devices:
                raise GpuUnavailable(
                    f"BOINC gave task {result} a {VENDOR_NAMES[vendor]} GPU, but none is "
                    "visible to boincd-containers. Check the GPU driver, then "
                    "`boincd-containers ctl doctor`."
                )
            if usage <= 1:
                chosen = [self._pick_shared(result, vendor, devices, device_num, usage)]
                units = _to_units(usage)
            else:
                chosen = self._pick_whole(result, vendor, devices, device_num, usage)
                units = SHARE_UNIT
            holding = _Holding(
                result=result,
                vendor=vendor,
                usage=usage,
                uuids=tuple(d.uuid for d in chosen),
                units=units,
            )
            self._holdings[result] = holding
            return self._assignment(holding)

    def release(self, result: str) -> GpuAssignment | None:
        """Free what `result` holds; a result holding nothing is fine (idempotent)."""
        with self._lock:
            held = self._holdings.pop(result, None)
            return None if held is None else self._assignment(held)

    def restore(self, result: str, uuids: Sequence[str], usage: float) -> GpuAssignment | None:
        """Re-record an assignment read back from container labels at daemon start.

        Never refuses: the container already has its cards. A card the
        inventory cannot see now (driver down, card removed) still keeps its
        share, so that nothing is double-booked when it comes back.
        """
        ids = tuple(u for u in (x.strip() for x in uuids) if u)
        if not ids or not math.isfinite(usage) or usage <= 0:
            return None
        with self._lock:
            vendor = self._vendor_for(ids)
            if vendor is None:
                return None
            holding = _Holding(
                result=result,
                vendor=vendor,
                usage=usage,
                uuids=ids,
                units=_to_units(usage) if usage <= 1 else SHARE_UNIT,
            )
            self._holdings[result] = holding
            return self._assignment(holding)

    def restore_from_labels(self, result: str, labels: Mapping[str, str]) -> GpuAssignment | None:
        parsed = parse_gpu_labels(labels)
        return None if parsed is None else self.restore(result, *parsed)

    def get(self, result: str) -> GpuAssignment | None:
        with self._lock:
            held = self._holdings.get(result)
            return None if held is None else self._assignment(held)

    def assignments(self) -> list[GpuAssignment]:
        with self._lock:
            return [self._assignment(h) for h in self._holdings.values()]

    def allocated_units(self, uuid: str) -> int:
        with self._lock:
            return self._units_on(uuid)

    # -- internals (lock held) ----------------------------------------------

    def _units_on(self, uuid: str, exclude: str | None = None) -> int:
        return sum(
            h.units for h in self._holdings.values() if uuid in h.uuids and h.result != exclude
        )

    def _holders(self, uuid: str) -> list[_Holding]:
        return [h for h in self._holdings.values() if uuid in h.uuids]

    def _find(self, vendor: Vendor, devices: list[GpuDevice], device_num: int) -> GpuDevice:
        for device in devices:
            if device.boinc_num == device_num:
                return device
        numbers = ", ".join(str(d.boinc_num) for d in devices)
        raise GpuUnavailable(
            f"BOINC assigned {VENDOR_NAMES[vendor]} GPU {device_num}, but the GPUs "
            f"visible now are numbered {numbers}. Was a GPU removed or did its driver "
            "fail? The task will be retried."
        )

    def _pick_shared(
        self,
        result: str,
        vendor: Vendor,
        devices: list[GpuDevice],
        device_num: int,
        usage: float,
    ) -> GpuDevice:
        units = _to_units(usage)
        if device_num < 0:
            # Only a client that assigned no card at all lands here; any card will do.
            for device in devices:
                if self._units_on(device.uuid) + units <= SHARE_UNIT:
                    return device
            raise self._busy(result, devices[0], units)
        device = self._find(vendor, devices, device_num)
        if self._units_on(device.uuid) + units > SHARE_UNIT:
            raise self._busy(result, device, units)
        return device

    def _pick_whole(
        self,
        result: str,
        vendor: Vendor,
        devices: list[GpuDevice],
        device_num: int,
        usage: float,
    ) -> list[GpuDevice]:
        # init_data.xml names only the first card of a multi-GPU task; the
        # rest are the lowest-numbered cards that are entirely free.
        count = math.ceil(usage - 1e-6)
        first = self._find(vendor, devices, device_num) if device_num >= 0 else None
        free = [d for d in devices if self._units_on(d.uuid) == 0]
        if first is not None:
            if first not in free:
                raise self._busy(result, first, SHARE_UNIT)
            free = [first, *(d for d in free if d is not first)]
        if len(free) < count:
            raise GpuBusy(
                f"Task {result} needs {count} whole {VENDOR_NAMES[vendor]} GPUs but only "
                f"{len(free)} are free now; it will be retried when more are free."
            )
        return free[:count]

    def _busy(self, result: str, device: GpuDevice, units: int) -> GpuBusy:
        holders = self._holders(device.uuid)
        held = sum(h.units for h in holders)
        who = ", ".join(f"{h.result} ({h.units / SHARE_UNIT:.0%})" for h in holders)
        return GpuBusy(
            f"{device.label()} has no room for task {result}: it needs "
            f"{units / SHARE_UNIT:.0%} of the GPU, and {held / SHARE_UNIT:.0%} is already "
            f"held by {who or 'other tasks'}. The task will be retried when a share is freed."
        )

    def _vendor_for(self, uuids: tuple[str, ...]) -> Vendor | None:
        if any(u not in self._known for u in uuids):
            # Best effort: budgets need the card's memory, but a driver that is
            # down now must not stop the daemon from starting.
            for backend in self.backends:
                try:
                    for device in backend.devices():
                        self._known[device.uuid] = device
                except GpuUnavailable:
                    continue
        for uuid in uuids:
            if uuid in self._known:
                return self._known[uuid].vendor
        for uuid in uuids:
            vendor = vendor_of_uuid(uuid)
            if vendor is not None:
                return vendor
        return None

    def _assignment(self, held: _Holding) -> GpuAssignment:
        devices = tuple(self._known[u] for u in held.uuids if u in self._known)
        per_card = min(d.memory_total_bytes for d in devices) if devices else 0
        return GpuAssignment(
            result=held.result,
            vendor=held.vendor,
            usage=held.usage,
            uuids=held.uuids,
            share=held.units / SHARE_UNIT,
            memory_budget_bytes=per_card * held.units // SHARE_UNIT,
            devices=devices,
        )

    # -- watching ------------------------------------------------------------

    def _rest(self, index: int, now: float) -> None:
        with self._lock:
            self._idle_until[index] = now + IDLE_RECHECK_S

    def _rests(self, index: int, now: float, held_vendors: set[Vendor]) -> bool:
        """snapshot() leaves out a backend that found no card a moment ago, unless
        a task holds a share of its vendor (its cards are news then). Under _lock."""
        backend = self.backends[index]
        return self._idle_until.get(index, 0.0) > now and not held_vendors & backend.vendors

    def snapshot(
        self,
        result_containers: Mapping[str, str] | None = None,
        pid_to_container: PidToContainer | None = None,
        *,
        ask_drivers: bool = True,
    ) -> GpuSnapshot:
        """Cards, shares and per-task GPU memory for `ctl gpus` and the monitor.

        `result_containers` maps result name to container id; with it, each
        share's used memory is measured from the GPU's process list. Backend
        failures become `errors` lines instead of exceptions: `ctl gpus` must
        still show what it can. `ask_drivers=False` (on the event loop, where
        a driver call must not run): no backend is called; one that would be
        shows its cards as last seen.
        """
        with self._lock:
            held_vendors = {h.vendor for h in self._holdings.values()}
        devices: list[GpuDevice] = []
        errors: list[str] = []
        working: list[GpuBackend] = []
        now = self.clock()
        for i, backend in enumerate(self.backends):
            with self._lock:
                if self._rests(i, now, held_vendors):
                    continue  # it found nothing a moment ago
                if not ask_drivers:
                    devices.extend(d for d in self._known.values() if d.vendor in backend.vendors)
                    continue
            try:
                found = list(backend.devices())
            except GpuTimeout as exc:
                # A hung driver: the cards as last seen, with the news.
                errors.append(exc.message)
                with self._lock:
                    devices.extend(d for d in self._known.values() if d.vendor in backend.vendors)
                continue
            except GpuUnavailable as exc:
                # A driver that is simply not installed is news only if a task uses it.
                if not exc.absent or held_vendors & backend.vendors:
                    errors.append(exc.message)
                else:
                    self._rest(i, now)
                continue
            if found:
                with self._lock:
                    self._idle_until.pop(i, None)
            else:
                self._rest(i, now)
            working.append(backend)
            devices.extend(found)
        with self._lock:
            for device in devices:
                self._known[device.uuid] = device
        devices.sort(key=lambda d: (d.vendor, d.boinc_num, d.index))

        # None: not measured (no container map, or the process lists failed).
        used: dict[str, dict[str, int]] | None = None
        if result_containers is not None:
            resolver = pid_to_container or cgroup_container_id
            by_container: dict[str, dict[str, int]] = {}
            measured = True
            for backend in working:
                try:
                    part = usage_by_container(backend, resolver)
                except GpuUnavailable as exc:
                    errors.append(exc.message)
                    measured = False
                    continue
                for cid, card_use in part.items():
                    by_container.setdefault(cid, {}).update(card_use)
            if measured:
                used = {}
                for result, container in result_containers.items():
                    per_card: dict[str, int] = {}
                    for cid, card_use in by_container.items():
                        # Engines and cgroups may spell the id short or long.
                        if container and (cid.startswith(container) or container.startswith(cid)):
                            for uuid, nbytes in card_use.items():
                                per_card[uuid] = per_card.get(uuid, 0) + nbytes
                    used[result] = per_card

        with self._lock:
            holdings = list(self._holdings.values())
            assignments = {h.result: self._assignment(h) for h in holdings}
        shares = [
            _share_status(assignments[h.result], None if used is None else used.get(h.result))
            for h in holdings
        ]
        cards = [
            GpuDeviceStatus(
                device=d,
                allocated=sum(h.units for h in holdings if d.uuid in h.uuids) / SHARE_UNIT,
                tasks=tuple(h.result for h in holdings if d.uuid in h.uuids),
            )
            for d in devices
        ]
        shares.sort(key=lambda s: s.result)
        return GpuSnapshot(devices=tuple(cards), shares=tuple(shares), errors=tuple(errors))


_CONTAINER_ID = re.compile(r"(?<![0-9a-f])([0-9a-f]{64})(?![0-9a-f])")


def cgroup_container_id(pid: int, proc_root: Path = Path("/proc")) -> str | None:
    """The container id (64 hex digits) in a process's cgroup path, if it runs in one.

    Docker names cgroups `docker-<id>.scope` (systemd) or `/docker/<id>`
    (cgroupfs), Podman `libpod-<id>.scope`; the id is the common part. The
    cgroup v2 line is preferred, the last id on a line wins (nesting).
    """
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return None  # the process ended, or is not ours to read
    lines = text.splitlines()
    lines.sort(key=lambda line: not line.startswith("0::"))
    for line in lines:
        found = _CONTAINER_ID.findall(line)
        if found:
            return str(found[-1])
    return None


def usage_by_container(
    backends: GpuBackend | Sequence[GpuBackend], pid_to_container: PidToContainer
) -> dict[str, dict[str, int]]:
    """GPU memory per container and card: {container_id: {uuid: bytes}}.

    Processes outside any container, and those whose memory the driver does
    not report, are left out (they are nobody's budget).
    """
    every = tuple(backends) if isinstance(backends, Sequence) else (backends,)
    usage: dict[str, dict[str, int]] = {}
    for backend in every:
        for device in backend.devices():
            for proc in backend.processes(device.uuid):
                container = pid_to_container(proc.pid)
                if container is None:
                    continue
                per_card = usage.setdefault(container, {})
                per_card[device.uuid] = per_card.get(device.uuid, 0) + (proc.used_memory_bytes or 0)
    return usage


def _share_status(assignment: GpuAssignment, used: Mapping[str, int] | None) -> GpuShareStatus:
    budget = assignment.memory_budget_bytes
    per_card = dict(used or {})
    # A budget of 0 means the card's memory is unknown (e.g. Intel): nothing to exceed.
    over = budget > 0 and any(per_card.get(u, 0) > budget for u in assignment.uuids)
    return GpuShareStatus(
        result=assignment.result,
        vendor=assignment.vendor,
        uuids=assignment.uuids,
        boinc_nums=tuple(d.boinc_num for d in assignment.devices),
        usage=assignment.usage,
        share=assignment.share,
        budget_bytes=budget * len(assignment.uuids),
        used_bytes=None if used is None else sum(per_card.get(u, 0) for u in assignment.uuids),
        over_budget=over,
    )
