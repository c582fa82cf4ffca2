"""GPU inventory interface: the data every backend reports and the errors it raises.

Backends (NVML, sysfs DRM, the test fake) hide behind `GpuBackend` so the
allocator and the daemon never import a vendor library themselves: a host
without GPUs, or without the NVIDIA driver, must run CPU tasks untouched.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

Vendor = Literal["nvidia", "amd", "intel"]

VENDORS: tuple[Vendor, ...] = ("nvidia", "amd", "intel")

# How each vendor is named to a volunteer (error messages, `ctl gpus`).
VENDOR_NAMES: dict[Vendor, str] = {"nvidia": "NVIDIA", "amd": "AMD", "intel": "Intel"}

# BOINC's `gpu_type` strings (lib/common_defs.h GPU_TYPE_*, plus the "CUDA"
# of very old clients and the vendor names people write in app_config.xml).
_GPU_TYPES: dict[str, Vendor] = {
    "nvidia": "nvidia",
    "cuda": "nvidia",
    "ati": "amd",
    "amd": "amd",
    "intel_gpu": "intel",
    "intel": "intel",
}


class GpuError(Exception):
    """Root of GPU errors; `retryable` tells the shim to exit temporarily (BOINC retries)."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable


class GpuUnavailable(GpuError):
    """The GPU or its driver cannot be used right now; the message is for a volunteer.

    `absent` marks a vendor stack that is simply not installed (no NVIDIA
    library on an AMD-only host): normal, worth mentioning only to a task
    that needs it.
    """

    retryable = True

    def __init__(
        self, message: str, *, retryable: bool | None = None, absent: bool = False
    ) -> None:
        super().__init__(message, retryable=retryable)
        self.absent = absent


class GpuBusy(GpuError):
    """The GPU BOINC assigned has no share left; the task must wait, never move elsewhere."""

    retryable = True


class GpuRequestError(GpuError):
    """The task asked for something no retry can give (unknown GPU type, bad usage)."""

    retryable = False


@dataclass(frozen=True)
class GpuDevice:
    """One GPU as the inventory sees it.

    `index` is the backend's own index (NVML's, PCI bus order); `boinc_num` is
    the number the BOINC client gives the same card in `gpu_device_num`, which
    for NVIDIA is a CUDA ordinal and may differ from the NVML index.
    """

    index: int
    uuid: str
    name: str
    vendor: Vendor
    memory_total_bytes: int
    memory_used_bytes: int
    utilisation_percent: int | None
    pci_bus_id: str = ""
    boinc_num: int = -1

    def label(self) -> str:
        return f"{VENDOR_NAMES[self.vendor]} GPU {self.boinc_num} ({self.name}, {self.uuid})"


@dataclass(frozen=True)
class GpuProcess:
    """A process holding a context on a GPU; memory is None where the driver cannot tell."""

    pid: int
    used_memory_bytes: int | None


@runtime_checkable
class GpuBackend(Protocol):
    """Inventory of one family of GPUs.

    Methods raise `GpuUnavailable` (never a vendor exception) when the driver
    or the device cannot be queried.
    """

    @property
    def vendors(self) -> frozenset[Vendor]: ...

    def devices(self) -> Sequence[GpuDevice]: ...

    def processes(self, uuid: str) -> Sequence[GpuProcess]: ...

    def close(self) -> None: ...


class GpuTimeout(GpuUnavailable):
    """A driver call that did not answer in time (a hung GPU or driver)."""


class TimedBackend:
    """Runs each call of a backend in a thread of its own, with a deadline.

    A hung driver (an NVML call that never returns: a lost GPU, a driver
    reload) must not hang whoever asked, `GET /v1/status` included. The call
    is left to its daemon thread; until it returns, every further call fails
    at once with the same news instead of piling more threads on the stuck
    driver. Attributes the wrapper lacks (a fake's test controls) are the
    backend's own.
    """

    def __init__(self, backend: GpuBackend, timeout_s: float) -> None:
        self.backend = backend
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._stuck: tuple[str, concurrent.futures.Future[Any]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    @property
    def vendors(self) -> frozenset[Vendor]:
        return self.backend.vendors

    def _news(self, what: str) -> str:
        names = "/".join(VENDOR_NAMES[v] for v in sorted(self.backend.vendors))
        return (
            f"{names} GPU driver did not answer {what} within {self.timeout_s:g} s "
            "(a hung GPU or driver; a reboot may be needed); showing what was last known"
        )

    def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if self._stuck is not None:
                stuck_what, stuck = self._stuck
                if not stuck.done():
                    raise GpuTimeout(self._news(stuck_what))
                self._stuck = None
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, whatever it is
                future.set_exception(exc)

        # A daemon thread, not a pool's: a call that never returns must not keep
        # the daemon from exiting.
        threading.Thread(target=call, name=f"gpu {what}", daemon=True).start()
        try:
            return future.result(self.timeout_s)
        except concurrent.futures.TimeoutError:
            with self._lock:
                self._stuck = (what, future)
            raise GpuTimeout(self._news(what)) from None

    def devices(self) -> Sequence[GpuDevice]:
        result: Sequence[GpuDevice] = self._run("for its cards", self.backend.devices)
        return result

    def processes(self, uuid: str) -> Sequence[GpuProcess]:
        result: Sequence[GpuProcess] = self._run(
            f"for the processes on {uuid}", lambda: self.backend.processes(uuid)
        )
        return result

    def close(self) -> None:
        # Nothing more to do with a driver that does not answer.
        with contextlib.suppress(GpuUnavailable):
            self._run("at shutdown", self.backend.close)


def normalize_gpu_type(gpu_type: str) -> Vendor:
    """Map BOINC's `gpu_type` from init_data.xml to our vendor name."""
    vendor = _GPU_TYPES.get(gpu_type.strip().lower())
    if vendor is None:
        known = ", ".join(sorted({"NVIDIA", "ATI", "intel_gpu"}))
        raise GpuRequestError(
            f"This task asks for a GPU of type {gpu_type!r}, which boincd-containers "
            f"cannot give to a container (supported: {known})."
        )
    return vendor


def normalize_pci_bus_id(bus_id: str) -> str:
    """Bring NVML's `00000000:01:00.0`, CUDA's and sysfs' forms to `0000:01:00.0`.

    Different libraries pad the PCI domain differently; matching a card across
    NVML, CUDA and /sys needs one spelling.
    """
    text = bus_id.strip().lower()
    parts = text.split(":")
    if len(parts) == 3:
        domain, bus, rest = parts
        try:
            return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{rest}"
        except ValueError:
            return text
    if len(parts) == 2:  # no domain: the first one is implied
        bus, rest = parts
        try:
            return f"0000:{int(bus, 16):02x}:{rest}"
        except ValueError:
            return text
    return text


# -- what `ctl gpus` shows -------------------------------------------------------


@dataclass(frozen=True)
class GpuDeviceStatus:
    """A card with the part of it the daemon's tasks hold."""

    device: GpuDevice
    allocated: float
    tasks: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        d = self.device
        return {
            "index": d.index,
            "boinc_num": d.boinc_num,
            "uuid": d.uuid,
            "name": d.name,
            "vendor": d.vendor,
            "pci_bus_id": d.pci_bus_id,
            "memory_total_bytes": d.memory_total_bytes,
            "memory_used_bytes": d.memory_used_bytes,
            "utilisation_percent": d.utilisation_percent,
            "allocated": round(self.allocated, 6),
            "free": round(max(0.0, 1.0 - self.allocated), 6),
            "tasks": list(self.tasks),
        }


@dataclass(frozen=True)
class GpuShareStatus:
    """One task's share: its budget, and the GPU memory its container uses now.

    `used_bytes` is None when it was not measured; `budget_bytes` is 0 when
    the card's memory is unknown, and then nothing counts as over budget.
    """

    result: str
    vendor: Vendor
    uuids: tuple[str, ...]
    boinc_nums: tuple[int, ...]
    usage: float
    share: float
    budget_bytes: int
    used_bytes: int | None
    over_budget: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "vendor": self.vendor,
            "gpus": list(self.uuids),
            "boinc_nums": list(self.boinc_nums),
            "usage": self.usage,
            "share": self.share,
            "budget_bytes": self.budget_bytes,
            "used_bytes": self.used_bytes,
            "over_budget": self.over_budget,
        }


@dataclass(frozen=True)
class GpuSnapshot:
    devices: tuple[GpuDeviceStatus, ...]
    shares: tuple[GpuShareStatus, ...]
    errors: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "devices": [d.to_dict() for d in self.devices],
            "shares": [s.to_dict() for s in self.shares],
            "errors": list(self.errors),
        }

    def render_text(self) -> str:
        lines: list[str] = []
        if self.devices:
            rows = [["GPU", "NAME", "UUID", "MEMORY USED", "UTIL", "SHARED", "TASKS"]]
            for status in self.devices:
                d = status.device
                rows.append(
                    [
                        f"{VENDOR_NAMES[d.vendor]} {d.boinc_num}",
                        d.name,
                        d.uuid,
                        f"{format_bytes(d.memory_used_bytes)} / "
                        f"{format_bytes(d.memory_total_bytes)}",
                        "-" if d.utilisation_percent is None else f"{d.utilisation_percent}%",
                        f"{status.allocated:.0%}",
                        str(len(status.tasks)),
                    ]
                )
            lines.extend(_table(rows))
        else:
            lines.append("No GPUs found.")
        if self.shares:
            lines.append("")
            rows = [["TASK", "GPU", "USAGE", "BUDGET", "USED", ""]]
            for s in self.shares:
                nums = ",".join(str(n) for n in s.boinc_nums) or ",".join(s.uuids)
                rows.append(
                    [
                        s.result,
                        f"{VENDOR_NAMES[s.vendor]} {nums}",
                        f"{s.usage:g}",
                        format_bytes(s.budget_bytes) if s.budget_bytes else "-",
                        "-" if s.used_bytes is None else format_bytes(s.used_bytes),
                        "OVER BUDGET" if s.over_budget else "",
                    ]
                )
            lines.extend(_table(rows))
        for error in self.errors:
            lines.append(f"warning: {error}")
        return "\n".join(lines) + "\n"


def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # unreachable; keeps mypy sure of the return


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
