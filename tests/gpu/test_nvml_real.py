"""The NVML backend against the real driver; skipped on hosts without an NVIDIA GPU."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from boincd_containers.host.gpu.allocator import GpuAllocator
from boincd_containers.host.gpu.container import gpu_container_config
from boincd_containers.host.gpu.nvml import NvmlBackend, cuda_pci_order


def _nvml_loadable() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _nvml_loadable(),
    reason="no NVIDIA driver here: libnvidia-ml.so.1 cannot be loaded",
)


@pytest.fixture
def backend() -> Iterator[NvmlBackend]:
    nvml = NvmlBackend()
    yield nvml
    nvml.close()


def test_inventory_matches_the_driver(backend: NvmlBackend) -> None:
    devices = backend.devices()
    assert devices, "NVML loads but reports no GPU"
    for d in devices:
        assert d.uuid.startswith(("GPU-", "MIG-"))
        assert d.memory_total_bytes > 0
        assert 0 <= d.memory_used_bytes <= d.memory_total_bytes
        assert d.pci_bus_id.count(":") == 2
    assert sorted(d.boinc_num for d in devices) == list(range(len(devices)))
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert {line.strip() for line in out.splitlines() if line.strip()} == {
            d.uuid for d in devices
        }


def test_cuda_order_names_the_same_cards(backend: NvmlBackend) -> None:
    order = cuda_pci_order()
    if order is None:
        pytest.skip("libcuda.so.1 is not usable here, BOINC numbers fall back to NVML order")
    assert set(order) == {d.pci_bus_id for d in backend.devices()}


def test_process_lists_can_be_read(backend: NvmlBackend) -> None:
    for d in backend.devices():
        for proc in backend.processes(d.uuid):
            assert proc.pid > 0


def test_two_half_tasks_share_the_first_card(backend: NvmlBackend) -> None:
    alloc = GpuAllocator(backend)
    first = alloc.allocate("real_a", "NVIDIA", 0, 0.5)
    second = alloc.allocate("real_b", "NVIDIA", 0, 0.5)
    assert first.uuids == second.uuids
    assert first.memory_budget_bytes > 0
    config = gpu_container_config(first)
    assert config.env["NVIDIA_VISIBLE_DEVICES"] == first.uuids[0]
    snap = alloc.snapshot({})
    assert any(s.device.uuid == first.uuids[0] and s.allocated == 1.0 for s in snap.devices)
