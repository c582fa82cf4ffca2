"""The NVML backend against a fake `pynvml` module: inventory, processes, failures."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from boincd_containers.host.gpu.allocator import GpuAllocator
from boincd_containers.host.gpu.backend import GpuUnavailable
from boincd_containers.host.gpu.nvml import NvmlBackend, cuda_pci_order

GIB = 1024**3


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


class FakeNotSupported(FakeNVMLError):
    def __init__(self) -> None:
        super().__init__(3)


class FakeLibraryMismatch(Exception):
    pass


@dataclass
class FakeCard:
    uuid: str
    name: str
    bus_id: str
    total: int
    used: int = 0
    util: int | None = 10
    compute: list[tuple[int, int | None]] = field(default_factory=list)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)


class FakeNvml:
    """State behind the fake module; `fail` maps a function name to the error it raises."""

    def __init__(self, cards: list[FakeCard], as_bytes: bool = False) -> None:
        self.cards = cards
        self.as_bytes = as_bytes
        self.fail: dict[str, BaseException] = {}
        self.init_calls = 0
        self.shutdown_calls = 0

    def _maybe_fail(self, name: str) -> None:
        if name in self.fail:
            raise self.fail[name]

    def _str(self, text: str) -> str | bytes:
        return text.encode() if self.as_bytes else text

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        ns = types.SimpleNamespace

        def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                self._maybe_fail(name)
                return fn(*args)

            return call

        def init() -> None:
            self.init_calls += 1

        def shutdown() -> None:
            self.shutdown_calls += 1

        def by_uuid(uuid: str) -> FakeCard:
            for card in self.cards:
                if card.uuid == uuid:
                    return card
            raise FakeNVMLError(6)

        def util(card: FakeCard) -> Any:
            if card.util is None:
                raise FakeNotSupported()
            return ns(gpu=card.util, memory=0)

        functions: dict[str, Callable[..., Any]] = {
            "nvmlInit": init,
            "nvmlShutdown": shutdown,
            "nvmlDeviceGetCount": lambda: len(self.cards),
            "nvmlDeviceGetHandleByIndex": lambda i: self.cards[i],
            "nvmlDeviceGetHandleByUUID": by_uuid,
            "nvmlDeviceGetUUID": lambda c: self._str(c.uuid),
            "nvmlDeviceGetName": lambda c: self._str(c.name),
            "nvmlDeviceGetMemoryInfo": lambda c: ns(
                total=c.total, used=c.used, free=c.total - c.used
            ),
            "nvmlDeviceGetUtilizationRates": util,
            "nvmlDeviceGetPciInfo": lambda c: ns(busId=c.bus_id.encode()),
            "nvmlDeviceGetComputeRunningProcesses": lambda c: [
                ns(pid=p, usedGpuMemory=m) for p, m in c.compute
            ],
            "nvmlDeviceGetGraphicsRunningProcesses": lambda c: [
                ns(pid=p, usedGpuMemory=m) for p, m in c.graphics
            ],
        }
        for name, fn in functions.items():
            setattr(mod, name, wrap(name, fn))
        mod.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
        mod.NVMLError_NotSupported = FakeNotSupported  # type: ignore[attr-defined]
        mod.NVMLLibraryMismatchError = FakeLibraryMismatch  # type: ignore[attr-defined]
        return mod


def _cards() -> list[FakeCard]:
    return [
        FakeCard("GPU-aaaa", "NVIDIA GeForce GTX 1060", "00000000:01:00.0", 6 * GIB, GIB),
        FakeCard("GPU-bbbb", "NVIDIA GeForce RTX 3080", "00000000:02:00.0", 10 * GIB, util=None),
    ]


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    state = FakeNvml(_cards())
    monkeypatch.setitem(sys.modules, "pynvml", state.module())
    return state


def test_devices_from_nvml(nvml: FakeNvml) -> None:
    devices = NvmlBackend(cuda_order=None).devices()
    assert [(d.index, d.uuid, d.name, d.boinc_num) for d in devices] == [
        (0, "GPU-aaaa", "NVIDIA GeForce GTX 1060", 0),
        (1, "GPU-bbbb", "NVIDIA GeForce RTX 3080", 1),
    ]
    first, second = devices
    assert first.vendor == "nvidia"
    assert first.memory_total_bytes == 6 * GIB
    assert first.memory_used_bytes == GIB
    assert first.utilisation_percent == 10
    assert first.pci_bus_id == "0000:01:00.0"
    assert second.utilisation_percent is None  # not supported on this board
    assert nvml.init_calls == 1


def test_old_pynvml_returning_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    state = FakeNvml(_cards(), as_bytes=True)
    monkeypatch.setitem(sys.modules, "pynvml", state.module())
    assert NvmlBackend(cuda_order=None).devices()[0].uuid == "GPU-aaaa"


def test_boinc_numbers_follow_cuda_order(nvml: FakeNvml) -> None:
    # CUDA puts the faster card (second on the bus) first, as by default.
    backend = NvmlBackend(cuda_order=lambda: ["0000:02:00.0", "0000:01:00.0"])
    by_uuid = {d.uuid: d.boinc_num for d in backend.devices()}
    assert by_uuid == {"GPU-bbbb": 0, "GPU-aaaa": 1}
    assignment = GpuAllocator(backend).allocate("r1", "NVIDIA", 0, 1.0)
    assert assignment.uuids == ("GPU-bbbb",)


def test_unusable_cuda_order_falls_back_to_nvml_order(nvml: FakeNvml) -> None:
    for order in (None, [], ["0000:01:00.0"], ["0000:01:00.0", "0000:09:00.0"]):
        backend = NvmlBackend(cuda_order=lambda o=order: o)  # type: ignore[misc]
        assert [d.boinc_num for d in backend.devices()] == [0, 1]


def test_cuda_order_is_probed_once_per_set_of_cards(nvml: FakeNvml) -> None:
    calls: list[int] = []

    def order() -> list[str]:
        calls.append(1)
        return ["0000:01:00.0", "0000:02:00.0"]

    backend = NvmlBackend(cuda_order=order)
    backend.devices()
    backend.devices()
    assert len(calls) == 1
    nvml.cards.pop()
    backend.devices()
    assert len(calls) == 2


def test_processes_merge_compute_and_graphics(nvml: FakeNvml) -> None:
    card = nvml.cards[0]
    card.compute = [(100, GIB), (101, None)]
    card.graphics = [(100, 512), (102, 2 * GIB)]
    procs = NvmlBackend(cuda_order=None).processes("GPU-aaaa")
    assert [(p.pid, p.used_memory_bytes) for p in procs] == [
        (100, GIB),
        (101, None),
        (102, 2 * GIB),
    ]


def test_missing_library_is_unavailable_and_retried(nvml: FakeNvml) -> None:
    nvml.fail["nvmlInit"] = FakeNVMLError(12)
    backend = NvmlBackend(cuda_order=None)
    with pytest.raises(GpuUnavailable, match=r"libnvidia-ml\.so\.1") as info:
        backend.devices()
    assert info.value.absent
    assert not info.value.retryable
    del nvml.fail["nvmlInit"]  # the volunteer installed the driver
    assert len(backend.devices()) == 2


def test_missing_pynvml_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(GpuUnavailable, match="nvidia-ml-py") as info:
        NvmlBackend(cuda_order=None).devices()
    assert info.value.absent


@pytest.mark.parametrize(
    ("code", "words", "retryable"),
    [
        (9, "kernel driver is not loaded", True),
        (4, "permission denied", False),
        (15, "stopped responding", True),
        (18, "different versions", True),
        (999, "NVML error", True),
    ],
)
def test_nvml_errors_become_gpu_unavailable(
    nvml: FakeNvml, code: int, words: str, retryable: bool
) -> None:
    nvml.fail["nvmlDeviceGetMemoryInfo"] = FakeNVMLError(code)
    with pytest.raises(GpuUnavailable, match=words) as info:
        NvmlBackend(cuda_order=None).devices()
    assert info.value.retryable is retryable
    assert info.value.message.startswith("NVIDIA GPU unavailable: ")


def test_lost_gpu_forces_a_fresh_init(nvml: FakeNvml) -> None:
    backend = NvmlBackend(cuda_order=None)
    backend.devices()
    nvml.fail["nvmlDeviceGetCount"] = FakeNVMLError(15)
    with pytest.raises(GpuUnavailable):
        backend.devices()
    assert nvml.shutdown_calls == 1
    del nvml.fail["nvmlDeviceGetCount"]
    backend.devices()
    assert nvml.init_calls == 2


def test_unknown_uuid_keeps_the_session(nvml: FakeNvml) -> None:
    backend = NvmlBackend(cuda_order=None)
    with pytest.raises(GpuUnavailable):
        backend.processes("GPU-gone")
    assert nvml.shutdown_calls == 0


def test_library_mismatch_error_is_translated(nvml: FakeNvml) -> None:
    nvml.fail["nvmlDeviceGetComputeRunningProcesses"] = FakeLibraryMismatch("too old")
    with pytest.raises(GpuUnavailable, match="too old"):
        NvmlBackend(cuda_order=None).processes("GPU-aaaa")


def test_allocation_through_a_failing_nvml(nvml: FakeNvml) -> None:
    nvml.fail["nvmlInit"] = FakeNVMLError(9)
    with pytest.raises(GpuUnavailable, match="reboot"):
        GpuAllocator(NvmlBackend(cuda_order=None)).allocate("r1", "NVIDIA", 0, 0.5)


def test_close_shuts_nvml_down_once(nvml: FakeNvml) -> None:
    backend = NvmlBackend(cuda_order=None)
    backend.close()  # never initialised: nothing to shut down
    backend.devices()
    backend.close()
    backend.close()
    assert nvml.shutdown_calls == 1


def test_failing_shutdown_is_ignored(nvml: FakeNvml) -> None:
    backend = NvmlBackend(cuda_order=None)
    backend.devices()
    nvml.fail["nvmlShutdown"] = FakeNVMLError(1)
    backend.close()


def test_cuda_order_ignored_under_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert cuda_pci_order() is None


def test_importing_the_package_does_not_load_pynvml() -> None:
    # CPU tasks must not depend on the NVIDIA stack being importable.
    code = (
        "import sys, boincd_containers.host.gpu as g; "
        "g.default_backends(); "
        "assert 'pynvml' not in sys.modules, 'pynvml imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
