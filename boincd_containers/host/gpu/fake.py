"""A GPU backend that tests drive: N devices, memory, processes, injected failures."""

from __future__ import annotations

import threading
from dataclasses import replace

from boincd_containers.host.gpu.backend import (
    GpuDevice,
    GpuProcess,
    GpuUnavailable,
    Vendor,
)

GIB = 1024**3


class FakeGpuBackend:
    """In-memory inventory; `fail_with` makes every call raise, as a broken driver would,
    and `hang` makes every call block, as a hung one does."""

    def __init__(self, devices: list[GpuDevice] | None = None) -> None:
        self._devices: list[GpuDevice] = list(devices or [])
        self._processes: dict[str, list[GpuProcess]] = {}
        self.fail_with: GpuUnavailable | None = None
        # Set to a cleared Event: every call blocks until it is set (a hung driver).
        self.hang: threading.Event | None = None
        self.entered = threading.Event()  # set by each call as it starts
        self.closed = False
        self.calls = 0

    @classmethod
    def with_gpus(
        cls,
        count: int,
        *,
        vendor: Vendor = "nvidia",
        memory_total_bytes: int = 8 * GIB,
        name: str = "Fake GPU",
        boinc_order: list[int] | None = None,
    ) -> FakeGpuBackend:
        """`count` alike GPUs; `boinc_order[i]` is the BOINC number of inventory index i."""

        # Ids shaped like the real backends' (NVML UUIDs, DrmBackend's "AMD-<pci>").
        def uuid(i: int) -> str:
            if vendor == "nvidia":
                return f"GPU-{i:08x}-fake-0000-0000-{i:012x}"
            return f"{vendor.upper()}-0000:{i + 1:02x}:00.0"

        devices = [
            GpuDevice(
                index=i,
                uuid=uuid(i),
                name=name,
                vendor=vendor,
                memory_total_bytes=memory_total_bytes,
                memory_used_bytes=0,
                utilisation_percent=0,
                pci_bus_id=f"0000:{i + 1:02x}:00.0",
                boinc_num=boinc_order[i] if boinc_order is not None else i,
            )
            for i in range(count)
        ]
        return cls(devices)

    @property
    def vendors(self) -> frozenset[Vendor]:
        found = {d.vendor for d in self._devices}
        return frozenset(found) if found else frozenset({"nvidia"})

    def _check(self) -> None:
        self.calls += 1
        self.entered.set()
        if self.hang is not None:
            self.hang.wait()
        if self.fail_with is not None:
            raise self.fail_with

    def devices(self) -> list[GpuDevice]:
        self._check()
        return list(self._devices)

    def processes(self, uuid: str) -> list[GpuProcess]:
        self._check()
        return list(self._processes.get(uuid, []))

    def close(self) -> None:
        self.closed = True

    def uuid(self, index: int) -> str:
        return self._devices[index].uuid

    def add_process(self, uuid: str, pid: int, used_memory_bytes: int | None) -> None:
        self._processes.setdefault(uuid, []).append(GpuProcess(pid, used_memory_bytes))

    def clear_processes(self) -> None:
        self._processes.clear()

    def set_memory_used(self, uuid: str, used: int) -> None:
        self._devices = [
            replace(d, memory_used_bytes=used) if d.uuid == uuid else d for d in self._devices
        ]

    def remove_device(self, uuid: str) -> None:
        self._devices = [d for d in self._devices if d.uuid != uuid]
