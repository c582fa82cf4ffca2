"""NVIDIA inventory over NVML (the `nvidia-ml-py` package, imported as `pynvml`).

`pynvml` is imported on first use, never at module import: a host without the
NVIDIA driver must run CPU tasks without even trying to load libnvidia-ml.
Every NVML failure leaves this module as `GpuUnavailable` with a message a
volunteer can act on.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import ModuleType
from typing import Any

from boincd_containers.host.gpu.backend import (
    GpuDevice,
    GpuProcess,
    GpuUnavailable,
    Vendor,
    normalize_pci_bus_id,
)

_PREFIX = "NVIDIA GPU unavailable: "

# NVML error codes (nvml.h) whose cause a volunteer can fix, with the advice.
# Codes are used, not pynvml's generated class names, so that a fake module
# in tests and future pynvml releases agree.
_ADVICE: dict[int, tuple[str, bool]] = {
    # code: (message, retryable)
    3: ("this GPU or driver does not support the query (NVML: Not Supported).", False),
    4: (
        "permission denied while querying the GPU (NVML: Insufficient Permissions); "
        "run boincd-containers as root.",
        False,
    ),
    9: (
        "the NVIDIA kernel driver is not loaded (NVML: Driver Not Loaded); "
        "if the driver was just installed or updated, reboot.",
        True,
    ),
    12: (
        "the NVIDIA management library libnvidia-ml.so.1 was not found "
        "(NVML: Library Not Found); install or repair the NVIDIA driver.",
        False,
    ),
    15: ("the GPU stopped responding (NVML: GPU is lost); a reboot is usually needed.", True),
    16: ("the GPU needs a reset (NVML: GPU requires restart); reboot the computer.", True),
    18: (
        "the NVIDIA driver library and kernel module have different versions "
        "(driver updated without a reboot); reboot the computer.",
        True,
    ),
}

# Codes after which the NVML session is useless until initialised again.
_RESET_CODES = frozenset({1, 9, 15, 16, 18})

CudaOrder = Callable[[], Sequence[str] | None]


def _load_pynvml() -> ModuleType:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise GpuUnavailable(
            _PREFIX + "the Python package nvidia-ml-py (pynvml) is not installed.",
            retryable=False,
            absent=True,
        ) from exc


def _text(value: object) -> str:
    # pynvml returns str in recent releases and bytes in older ones.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _translate(exc: BaseException) -> GpuUnavailable:
    code = getattr(exc, "value", None)
    if isinstance(code, int) and code in _ADVICE:
        message, retryable = _ADVICE[code]
        return GpuUnavailable(_PREFIX + message, retryable=retryable, absent=code == 12)
    if isinstance(exc, OSError):
        return GpuUnavailable(_PREFIX + f"could not load the NVIDIA library ({exc}).")
    return GpuUnavailable(_PREFIX + f"NVML error: {exc}.")


def _nvml_errors(nvml: ModuleType) -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    for name in ("NVMLError", "NVMLLibraryMismatchError"):
        cls = getattr(nvml, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errors.append(cls)
    return tuple(errors)


def cuda_pci_order() -> list[str] | None:
    """PCI bus ids of the CUDA devices in CUDA ordinal order, or None if unknown.

    BOINC's `gpu_device_num` for NVIDIA is the CUDA ordinal the client got from
    `cuDeviceGet(j)` (client/gpu_nvidia.cpp). CUDA orders devices fastest first
    by default, NVML by PCI bus, so on a host with unlike cards the two
    numberings differ; asking libcuda is the only exact mapping. This runs
    cuInit (no context, no GPU memory) in this process.
    """
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        # It would renumber devices here but not in the BOINC client.
        return None
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    try:
        if lib.cuInit(0) != 0:
            return None
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return None
        order: list[str] = []
        for ordinal in range(count.value):
            device = ctypes.c_int(0)
            if lib.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
                return None
            buf = ctypes.create_string_buffer(64)
            if lib.cuDeviceGetPCIBusId(buf, len(buf), device) != 0:
                return None
            order.append(normalize_pci_bus_id(buf.value.decode("ascii", "replace")))
        return order
    except AttributeError:  # a libcuda too old to have these entry points
        return None


class NvmlBackend:
    """NVIDIA GPUs through NVML; initialised on first use, shut down by `close()`."""

    def __init__(self, cuda_order: CudaOrder | None = cuda_pci_order) -> None:
        self._lock = threading.Lock()
        self._nvml: ModuleType | None = None
        self._cuda_order = cuda_order
        # CUDA ordinals are stable while the set of cards is; cache them per set.
        self._boinc_nums: dict[str, int] | None = None
        self._boinc_key: tuple[str, ...] = ()

    @property
    def vendors(self) -> frozenset[Vendor]:
        return frozenset({"nvidia"})

    def _init(self) -> ModuleType:
        if self._nvml is not None:
            return self._nvml
        nvml = _load_pynvml()
        try:
            nvml.nvmlInit()
        except _nvml_errors(nvml) as exc:
            raise _translate(exc) from exc
        self._nvml = nvml
        return nvml

    def _call(self, fn: Callable[[ModuleType], Any]) -> Any:
        with self._lock:
            nvml = self._init()
            try:
                return fn(nvml)
            except _nvml_errors(nvml) as exc:
                if getattr(exc, "value", None) in _RESET_CODES:
                    # A lost GPU or a reloaded driver needs a fresh nvmlInit.
                    self._shutdown_locked()
                raise _translate(exc) from exc

    def devices(self) -> list[GpuDevice]:
        raw: list[GpuDevice] = self._call(self._read_devices)
        with self._lock:
            return self._with_boinc_nums(raw)

    def processes(self, uuid: str) -> list[GpuProcess]:
        def read(nvml: ModuleType) -> list[GpuProcess]:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
            merged: dict[int, int | None] = {}
            # A process drawing and computing shows up in both lists.
            for getter in (
                nvml.nvmlDeviceGetComputeRunningProcesses,
                nvml.nvmlDeviceGetGraphicsRunningProcesses,
            ):
                for proc in getter(handle):
                    pid = int(proc.pid)
                    used = None if proc.usedGpuMemory is None else int(proc.usedGpuMemory)
                    old = merged.get(pid)
                    if pid in merged and (used is None or (old is not None and old >= used)):
                        continue
                    merged[pid] = used
            return [GpuProcess(pid=p, used_memory_bytes=m) for p, m in sorted(merged.items())]

        result: list[GpuProcess] = self._call(read)
        return result

    def close(self) -> None:
        with self._lock:
            self._shutdown_locked()

    def _shutdown_locked(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is None:
            return
        try:
            nvml.nvmlShutdown()
        except _nvml_errors(nvml):
            pass  # nothing to do about a failing shutdown; the handle is gone

    @staticmethod
    def _read_devices(nvml: ModuleType) -> list[GpuDevice]:
        not_supported = getattr(nvml, "NVMLError_NotSupported", None)
        devices: list[GpuDevice] = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            utilisation: int | None
            try:
                utilisation = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception as exc:
                # Some boards (and MIG mode) do not report utilisation: show none.
                if not_supported is None or not isinstance(exc, not_supported):
                    raise
                utilisation = None
            try:
                bus_id = normalize_pci_bus_id(_text(nvml.nvmlDeviceGetPciInfo(handle).busId))
            except Exception as exc:
                if not_supported is None or not isinstance(exc, not_supported):
                    raise
                bus_id = ""
            devices.append(
                GpuDevice(
                    index=index,
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    vendor="nvidia",
                    memory_total_bytes=int(memory.total),
                    memory_used_bytes=int(memory.used),
                    utilisation_percent=utilisation,
                    pci_bus_id=bus_id,
                    boinc_num=index,
                )
            )
        return devices

    def _with_boinc_nums(self, devices: list[GpuDevice]) -> list[GpuDevice]:
        key = tuple(d.pci_bus_id for d in devices)
        if self._boinc_nums is None or key != self._boinc_key:
            self._boinc_key = key
            self._boinc_nums = self._probe_boinc_nums(devices)
        nums = self._boinc_nums
        return [replace(d, boinc_num=nums.get(d.uuid, d.index)) for d in devices]

    def _probe_boinc_nums(self, devices: list[GpuDevice]) -> dict[str, int]:
        # Without libcuda, NVML order is the best guess: it is exact on
        # one-GPU hosts, with alike cards, and under CUDA_DEVICE_ORDER=PCI_BUS_ID.
        order = self._cuda_order() if self._cuda_order is not None else None
        by_bus = {d.pci_bus_id: d.uuid for d in devices if d.pci_bus_id}
        if not order or len(order) != len(devices) or set(order) != set(by_bus):
            return {d.uuid: d.index for d in devices}
        return {by_bus[bus]: ordinal for ordinal, bus in enumerate(order)}
