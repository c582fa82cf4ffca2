"""What a GPU assignment puts into a container create request."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boincd_containers.host.gpu.allocator import LABEL_GPU_USAGE, LABEL_GPUS, GpuAllocator
from boincd_containers.host.gpu.backend import GpuUnavailable
from boincd_containers.host.gpu.container import (
    DrmBackend,
    find_render_nodes,
    gpu_container_config,
)
from boincd_containers.host.gpu.fake import GIB, FakeGpuBackend

RENDER_GID = 993


def _fake_stat(path: str) -> os.stat_result:
    if not path.startswith("/dev/"):
        raise FileNotFoundError(2, "No such file or directory", path)
    # mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime
    return os.stat_result((0o20660, 1, 1, 1, 0, RENDER_GID, 0, 0, 0, 0))


def _drm_card(
    sys_root: Path, node: str, vendor_id: str, bus: str, extra: dict[str, str] | None = None
) -> None:
    device = sys_root / "class" / "drm" / node / "device"
    device.mkdir(parents=True)
    (device / "vendor").write_text(vendor_id + "\n")
    (device / "device").write_text("0x73bf\n")
    (device / "uevent").write_text(f"DRIVER=x\nPCI_SLOT_NAME={bus}\n")
    for name, value in (extra or {}).items():
        (device / name).write_text(value + "\n")


@pytest.fixture
def sys_root(tmp_path: Path) -> Path:
    root = tmp_path / "sys"
    _drm_card(
        root,
        "renderD128",
        "0x1002",
        "0000:03:00.0",
        {
            "mem_info_vram_total": str(16 * GIB),
            "mem_info_vram_used": str(GIB),
            "gpu_busy_percent": "7",
        },
    )
    _drm_card(root, "renderD129", "0x10de", "0000:01:00.0")  # NVIDIA: NVML's job
    _drm_card(root, "renderD130", "0x1002", "0000:0a:00.0", {"mem_info_vram_total": str(8 * GIB)})
    _drm_card(root, "renderD131", "0x8086", "0000:00:02.0")
    (root / "class" / "drm" / "card0").mkdir()  # primary nodes are not used
    return root


def test_cpu_task_hides_every_nvidia_gpu() -> None:
    config = gpu_container_config(None)
    assert config.env == {"NVIDIA_VISIBLE_DEVICES": "void"}
    assert config.device_requests == []
    assert config.devices == []
    assert config.labels == {}
    assert config.init_data_overrides == {}


def test_nvidia_on_docker_by_uuid_never_count() -> None:
    backend = FakeGpuBackend.with_gpus(2, memory_total_bytes=8 * GIB)
    assignment = GpuAllocator(backend).allocate("r1", "NVIDIA", 1, 0.5)
    uuid = backend.uuid(1)

    config = gpu_container_config(assignment, engine="docker")

    assert config.device_requests == [
        {"Driver": "nvidia", "DeviceIDs": [uuid], "Capabilities": [["gpu"]]}
    ]
    assert "Count" not in config.device_requests[0]
    assert config.devices == []
    assert config.env["NVIDIA_VISIBLE_DEVICES"] == uuid
    assert config.env["CUDA_VISIBLE_DEVICES"] == uuid
    assert config.env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    # Ordinal 0: inside the container the card is the first and only one.
    assert config.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=4096M"
    assert config.labels == {LABEL_GPUS: uuid, LABEL_GPU_USAGE: "0.5"}
    # BOINC said card 1; inside the container it is card 0.
    assert config.init_data_overrides == {"gpu_device_num": "0", "gpu_opencl_dev_index": "0"}


def test_nvidia_on_podman_uses_cdi_device_requests() -> None:
    backend = FakeGpuBackend.with_gpus(1)
    assignment = GpuAllocator(backend).allocate("r1", "NVIDIA", 0, 1.0)
    uuid = backend.uuid(0)

    config = gpu_container_config(assignment, engine="podman")

    assert config.device_requests == [
        {"Driver": "cdi", "DeviceIDs": [f"nvidia.com/gpu={uuid}"], "Capabilities": [["cdi"]]}
    ]
    # Podman's compat API mangles CDI names in HostConfig.Devices.
    assert config.devices == []
    assert config.cdi_devices == (f"nvidia.com/gpu={uuid}",)
    assert config.env["NVIDIA_VISIBLE_DEVICES"] == uuid
    # A whole card: no MPS limits.
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in config.env
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in config.env


def test_cdi_can_be_forced_on_docker() -> None:
    backend = FakeGpuBackend.with_gpus(1)
    assignment = GpuAllocator(backend).allocate("r1", "NVIDIA", 0, 1.0)
    config = gpu_container_config(assignment, engine="docker", nvidia_cdi=True)
    assert config.device_requests[0]["Driver"] == "cdi"


def test_multi_gpu_task_lists_every_uuid() -> None:
    backend = FakeGpuBackend.with_gpus(2)
    assignment = GpuAllocator(backend).allocate("r1", "NVIDIA", 0, 2.0)
    config = gpu_container_config(assignment)
    both = f"{backend.uuid(0)},{backend.uuid(1)}"
    assert config.env["NVIDIA_VISIBLE_DEVICES"] == both
    assert config.device_requests[0]["DeviceIDs"] == [backend.uuid(0), backend.uuid(1)]


def test_apply_overrides_image_defaults_and_keeps_the_rest() -> None:
    backend = FakeGpuBackend.with_gpus(1)
    config = gpu_container_config(GpuAllocator(backend).allocate("r1", "NVIDIA", 0, 0.5))
    body = {
        "Image": "x",
        "Env": ["NVIDIA_VISIBLE_DEVICES=all", "FOO=1"],
        "Labels": {"org.boinc.containers.result": "r1"},
        "HostConfig": {"Memory": 1, "DeviceRequests": None},
    }
    out = config.apply(body)
    assert "NVIDIA_VISIBLE_DEVICES=all" not in out["Env"]
    assert f"NVIDIA_VISIBLE_DEVICES={backend.uuid(0)}" in out["Env"]
    assert "FOO=1" in out["Env"]
    assert out["Labels"]["org.boinc.containers.result"] == "r1"
    assert out["Labels"][LABEL_GPUS] == backend.uuid(0)
    assert out["HostConfig"]["Memory"] == 1
    assert out["HostConfig"]["DeviceRequests"][0]["Driver"] == "nvidia"
    assert body["Env"] == ["NVIDIA_VISIBLE_DEVICES=all", "FOO=1"]  # input untouched


def test_cpu_config_apply_on_a_cuda_image() -> None:
    out = gpu_container_config(None).apply({"Env": None})
    assert out["Env"] == ["NVIDIA_VISIBLE_DEVICES=void"]
    assert "DeviceRequests" not in out["HostConfig"]


def test_render_nodes_in_pci_order(sys_root: Path) -> None:
    nodes = find_render_nodes(sys_root, Path("/dev"))
    assert [(n.path, n.pci_bus_id, n.vendor) for n in nodes] == [
        ("/dev/dri/renderD131", "0000:00:02.0", "intel"),
        ("/dev/dri/renderD129", "0000:01:00.0", "nvidia"),
        ("/dev/dri/renderD128", "0000:03:00.0", "amd"),
        ("/dev/dri/renderD130", "0000:0a:00.0", "amd"),
    ]


def test_render_node_bus_id_from_the_device_link(tmp_path: Path) -> None:
    pci = tmp_path / "sys" / "devices" / "pci0000:00" / "0000:05:00.0"
    pci.mkdir(parents=True)
    (pci / "vendor").write_text("0x1002\n")
    node = tmp_path / "sys" / "class" / "drm" / "renderD128"
    node.mkdir(parents=True)
    (node / "device").symlink_to(pci)
    (found,) = find_render_nodes(tmp_path / "sys")
    assert found.pci_bus_id == "0000:05:00.0"


def test_no_drm_means_no_cards(tmp_path: Path) -> None:
    assert find_render_nodes(tmp_path) == []
    assert DrmBackend(tmp_path).devices() == []


def test_drm_backend_inventory(sys_root: Path) -> None:
    devices = DrmBackend(sys_root).devices()
    assert [(d.vendor, d.boinc_num, d.pci_bus_id) for d in devices] == [
        ("intel", 0, "0000:00:02.0"),
        ("amd", 0, "0000:03:00.0"),
        ("amd", 1, "0000:0a:00.0"),
    ]
    amd0 = devices[1]
    assert amd0.uuid == "AMD-0000:03:00.0"
    assert amd0.memory_total_bytes == 16 * GIB
    assert amd0.memory_used_bytes == GIB
    assert amd0.utilisation_percent == 7
    assert devices[0].memory_total_bytes == 0  # unknown for Intel
    assert DrmBackend(sys_root).processes(amd0.uuid) == []


def test_amd_task_gets_kfd_and_its_own_render_node(sys_root: Path) -> None:
    alloc = GpuAllocator(DrmBackend(sys_root))
    assignment = alloc.allocate("r1", "ATI", 1, 0.5)
    assert assignment.memory_budget_bytes == 4 * GIB

    config = gpu_container_config(assignment, sys_root=sys_root, stat=_fake_stat)

    assert [d["PathOnHost"] for d in config.devices] == ["/dev/kfd", "/dev/dri/renderD130"]
    assert all(d["CgroupPermissions"] == "rwm" for d in config.devices)
    assert config.group_add == [str(RENDER_GID)]
    assert config.device_requests == []
    assert config.env == {"NVIDIA_VISIBLE_DEVICES": "void"}
    assert config.labels[LABEL_GPUS] == "AMD-0000:0a:00.0"
    out = config.apply({"HostConfig": {"GroupAdd": [str(RENDER_GID)]}})
    assert out["HostConfig"]["GroupAdd"] == [str(RENDER_GID)]


def test_intel_task_gets_only_the_render_node(sys_root: Path) -> None:
    assignment = GpuAllocator(DrmBackend(sys_root)).allocate("r1", "intel_gpu", 0, 1.0)
    config = gpu_container_config(assignment, sys_root=sys_root, stat=_fake_stat)
    assert [d["PathOnHost"] for d in config.devices] == ["/dev/dri/renderD131"]


def test_vanished_render_node_is_unavailable(sys_root: Path, tmp_path: Path) -> None:
    assignment = GpuAllocator(DrmBackend(sys_root)).allocate("r1", "ATI", 0, 1.0)
    with pytest.raises(GpuUnavailable, match="render node"):
        gpu_container_config(assignment, sys_root=tmp_path / "empty", stat=_fake_stat)
