"""GPU inventory, assignment and sharing between concurrent BOINC tasks.

Nothing here imports a vendor library at import time: `NvmlBackend` loads
pynvml on first use, so CPU-only hosts never touch the NVIDIA driver.
"""

from boincd_containers.host.gpu.allocator import (
    LABEL_GPU_USAGE,
    LABEL_GPUS,
    GpuAllocator,
    GpuAssignment,
    cgroup_container_id,
    parse_gpu_labels,
    usage_by_container,
)
from boincd_containers.host.gpu.backend import (
    GpuBackend,
    GpuBusy,
    GpuDevice,
    GpuError,
    GpuProcess,
    GpuRequestError,
    GpuSnapshot,
    GpuTimeout,
    GpuUnavailable,
    TimedBackend,
    Vendor,
    normalize_gpu_type,
)
from boincd_containers.host.gpu.container import (
    DrmBackend,
    GpuContainerConfig,
    gpu_container_config,
)
from boincd_containers.host.gpu.nvml import NvmlBackend


def default_backends() -> list[GpuBackend]:
    """The host's real inventories; cheap to build, nothing is probed until used."""
    return [NvmlBackend(), DrmBackend()]


__all__ = [
    "LABEL_GPUS",
    "LABEL_GPU_USAGE",
    "DrmBackend",
    "GpuAllocator",
    "GpuAssignment",
    "GpuBackend",
    "GpuBusy",
    "GpuContainerConfig",
    "GpuDevice",
    "GpuError",
    "GpuProcess",
    "GpuRequestError",
    "GpuSnapshot",
    "GpuTimeout",
    "GpuUnavailable",
    "NvmlBackend",
    "TimedBackend",
    "Vendor",
    "cgroup_container_id",
    "default_backends",
    "gpu_container_config",
    "normalize_gpu_type",
    "parse_gpu_labels",
    "usage_by_container",
]
