"""What a GPU assignment adds to a container create request, and AMD/Intel inventory.

NVIDIA cards go in by UUID, never by count (`Count: N` always means cards
0..N-1, whatever BOINC assigned). On Docker that is a device request for the
`nvidia` driver; on Podman's Docker-compatible API it must be a CDI device
request, because that API joins each `HostConfig.Devices` entry into one
`host:container:perms` string, which breaks a CDI name (Podman only honours
`DeviceRequests` with `Driver: "cdi"`, since 5.4; containers/podman#25171).

AMD and Intel cards have no container toolkit to lean on: the container
gets the card's DRM render node (and /dev/kfd for AMD ROCm), found through
/sys/class/drm, plus the node's group so it can open it with every
capability dropped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from boincd_containers.host.gpu.allocator import GpuAssignment
from boincd_containers.host.gpu.backend import (
    GpuDevice,
    GpuProcess,
    GpuUnavailable,
    Vendor,
    normalize_pci_bus_id,
)

EngineKind = Literal["docker", "podman"]

# PCI vendor ids in /sys/bus/pci/devices/*/vendor.
_PCI_VENDORS: dict[str, Vendor] = {"0x10de": "nvidia", "0x1002": "amd", "0x8086": "intel"}

# NVIDIA's CDI spec (nvidia-ctk cdi generate) names each card by index and by UUID;
# the UUID is the name that cannot drift.
CDI_NVIDIA_KIND = "nvidia.com/gpu"

# A task's first card is the container's card 0, for CUDA and OpenCL alike.
_IN_CONTAINER_NUMBERS = {"gpu_device_num": "0", "gpu_opencl_dev_index": "0"}


@dataclass(frozen=True)
class GpuContainerConfig:
    """The GPU part of a container create request (Docker Engine API shapes).

    `devices` is `HostConfig.Devices`, `device_requests` is
    `HostConfig.DeviceRequests`, `group_add` is `HostConfig.GroupAdd`.
    `cdi_devices` repeats the CDI names for callers of Podman's own
    (libpod) API, whose `devices: [{"path": name}]` takes them on any 4.x.

    `init_data_overrides`: the container sees only its own cards, numbered
    from 0, so the `gpu_device_num` BOINC wrote for the host (say 1) names
    no card inside; the app must read these values instead.
    """

    env: dict[str, str]
    device_requests: list[dict[str, Any]] = field(default_factory=list)
    devices: list[dict[str, str]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    group_add: list[str] = field(default_factory=list)
    cdi_devices: tuple[str, ...] = ()
    init_data_overrides: dict[str, str] = field(default_factory=dict)

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """A copy of a Docker `POST /containers/create` body with this config merged in.

        Our GPU variables replace same-named ones already in `Env`: an image
        or job default of `NVIDIA_VISIBLE_DEVICES=all` must not survive.
        """
        out = dict(body)
        env = [e for e in out.get("Env") or [] if e.split("=", 1)[0] not in self.env]
        out["Env"] = env + [f"{k}={v}" for k, v in self.env.items()]
        if self.labels:
            out["Labels"] = {**(out.get("Labels") or {}), **self.labels}
        host = dict(out.get("HostConfig") or {})
        if self.device_requests:
            host["DeviceRequests"] = [*(host.get("DeviceRequests") or []), *self.device_requests]
        if self.devices:
            host["Devices"] = [*(host.get("Devices") or []), *self.devices]
        if self.group_add:
            groups = list(host.get("GroupAdd") or [])
            host["GroupAdd"] = groups + [g for g in self.group_add if g not in groups]
        out["HostConfig"] = host
        return out


def gpu_container_config(
    assignment: GpuAssignment | None,
    *,
    engine: EngineKind = "docker",
    nvidia_cdi: bool | None = None,
    sys_root: Path = Path("/sys"),
    dev_root: Path = Path("/dev"),
    stat: Callable[[str], os.stat_result] = os.stat,
) -> GpuContainerConfig:
    """The GPU settings for a task's container; `assignment` None means a CPU task.

    `nvidia_cdi` forces (True) or forbids (False) CDI device requests for
    NVIDIA; by default Podman gets CDI and Docker the `nvidia` driver.
    Raises GpuUnavailable when an AMD/Intel card's render node is missing.
    """
    # CUDA base images set NVIDIA_VISIBLE_DEVICES=all; "void" tells the NVIDIA
    # runtime to act like runc (no card, no driver files) for everyone else.
    if assignment is None:
        return GpuContainerConfig(env={"NVIDIA_VISIBLE_DEVICES": "void"})
    if assignment.vendor == "nvidia":
        use_cdi = nvidia_cdi if nvidia_cdi is not None else engine == "podman"
        return _nvidia_config(assignment, use_cdi)
    return _drm_config(assignment, sys_root, dev_root, stat)


def _nvidia_config(assignment: GpuAssignment, use_cdi: bool) -> GpuContainerConfig:
    uuids = list(assignment.uuids)
    visible = ",".join(uuids)
    env = {
        "NVIDIA_VISIBLE_DEVICES": visible,
        # UUIDs mean the same card inside and outside the container, so this
        # pins CUDA to our cards even if the engine exposed more.
        "CUDA_VISIBLE_DEVICES": visible,
    }
    if assignment.share < 1:
        # Only effective where the volunteer runs an MPS control daemon the
        # container can reach; otherwise CUDA ignores them. Ordinals are the
        # container's own (0..n-1), not the host's.
        percent = max(1, min(100, round(assignment.share * 100)))
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(percent)
        budget_mib = assignment.memory_budget_bytes // (1024 * 1024)
        if budget_mib > 0:
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = ",".join(
                f"{i}={budget_mib}M" for i in range(len(uuids))
            )
    cdi_names = tuple(f"{CDI_NVIDIA_KIND}={u}" for u in uuids)
    if use_cdi:
        request = {"Driver": "cdi", "DeviceIDs": list(cdi_names), "Capabilities": [["cdi"]]}
    else:
        request = {"Driver": "nvidia", "DeviceIDs": uuids, "Capabilities": [["gpu"]]}
    return GpuContainerConfig(
        env=env,
        device_requests=[request],
        labels=assignment.labels(),
        cdi_devices=cdi_names,
        init_data_overrides=dict(_IN_CONTAINER_NUMBERS),
    )


def _drm_config(
    assignment: GpuAssignment,
    sys_root: Path,
    dev_root: Path,
    stat: Callable[[str], os.stat_result],
) -> GpuContainerConfig:
    nodes = {n.pci_bus_id: n for n in find_render_nodes(sys_root, dev_root)}
    paths: list[str] = []
    if assignment.vendor == "amd":
        # ROCm opens /dev/kfd first; OpenCL apps on amdgpu need it too.
        paths.append(str(dev_root / "kfd"))
    for uuid in assignment.uuids:
        node = nodes.get(_bus_of_uuid(uuid))
        if node is None:
            raise GpuUnavailable(
                f"The render node of GPU {uuid} was not found under "
                f"{sys_root / 'class' / 'drm'}; is its driver loaded?"
            )
        paths.append(node.path)
    groups: list[str] = []
    for path in paths:
        try:
            gid = str(stat(path).st_gid)
        except OSError as exc:
            raise GpuUnavailable(f"GPU device {path} is missing ({exc.strerror}).") from exc
        # With cap-drop ALL, even root in the container needs the node's
        # group (usually "render" or "video") to open it.
        if gid != "0" and gid not in groups:
            groups.append(gid)
    return GpuContainerConfig(
        env={"NVIDIA_VISIBLE_DEVICES": "void"},
        devices=[
            {"PathOnHost": p, "PathInContainer": p, "CgroupPermissions": "rwm"} for p in paths
        ],
        labels=assignment.labels(),
        group_add=groups,
        init_data_overrides=dict(_IN_CONTAINER_NUMBERS),
    )


# -- /sys/class/drm ---------------------------------------------------------------


@dataclass(frozen=True)
class RenderNode:
    path: str  # /dev/dri/renderD128
    pci_bus_id: str
    vendor: Vendor | None
    sys_device: Path


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _pci_slot(device_dir: Path) -> str:
    for line in _read(device_dir / "uevent").splitlines():
        key, _, value = line.partition("=")
        if key == "PCI_SLOT_NAME" and value:
            return normalize_pci_bus_id(value)
    # The `device` link of a drm node points at the PCI device directory.
    return normalize_pci_bus_id(device_dir.resolve().name)


def find_render_nodes(
    sys_root: Path = Path("/sys"), dev_root: Path = Path("/dev")
) -> list[RenderNode]:
    """The DRM render nodes of PCI GPUs, in PCI bus order."""
    drm = sys_root / "class" / "drm"
    try:
        entries = sorted(drm.iterdir())
    except OSError:
        return []  # no DRM at all: no GPU of this kind
    nodes: list[RenderNode] = []
    for entry in entries:
        if not entry.name.startswith("renderD"):
            continue
        device_dir = entry / "device"
        vendor_id = _read(device_dir / "vendor").lower()
        nodes.append(
            RenderNode(
                path=str(dev_root / "dri" / entry.name),
                pci_bus_id=_pci_slot(device_dir),
                vendor=_PCI_VENDORS.get(vendor_id),
                sys_device=device_dir,
            )
        )
    nodes.sort(key=lambda n: n.pci_bus_id)
    return nodes


def _bus_of_uuid(uuid: str) -> str:
    # DrmBackend ids are "<VENDOR>-<pci bus id>"; see DrmBackend.devices.
    _, _, bus = uuid.partition("-")
    return normalize_pci_bus_id(bus)


def _int_or(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default


class DrmBackend:
    """AMD and Intel cards from sysfs; NVIDIA's render nodes are left to NVML.

    BOINC numbers AMD and Intel cards in OpenCL order; PCI bus order within
    a vendor is the best stand-in there is without an OpenCL library.
    """

    def __init__(self, sys_root: Path = Path("/sys"), dev_root: Path = Path("/dev")) -> None:
        self.sys_root = sys_root
        self.dev_root = dev_root

    @property
    def vendors(self) -> frozenset[Vendor]:
        return frozenset({"amd", "intel"})

    def devices(self) -> list[GpuDevice]:
        found: list[GpuDevice] = []
        per_vendor: dict[Vendor, int] = {}
        for node in find_render_nodes(self.sys_root, self.dev_root):
            vendor = node.vendor
            if vendor is None or vendor == "nvidia":
                continue
            d = node.sys_device
            busy = _read(d / "gpu_busy_percent")
            product = _read(d / "product_name") or f"{vendor.upper()} {_read(d / 'device')}"
            found.append(
                GpuDevice(
                    index=len(found),
                    uuid=f"{vendor.upper()}-{node.pci_bus_id}",
                    name=product,
                    vendor=vendor,
                    # amdgpu reports VRAM; Intel's i915 has no such file: 0 = unknown.
                    memory_total_bytes=_int_or(_read(d / "mem_info_vram_total"), 0),
                    memory_used_bytes=_int_or(_read(d / "mem_info_vram_used"), 0),
                    utilisation_percent=int(busy) if busy.isdigit() else None,
                    pci_bus_id=node.pci_bus_id,
                    boinc_num=per_vendor.get(vendor, 0),
                )
            )
            per_vendor[vendor] = per_vendor.get(vendor, 0) + 1
        return found

    def processes(self, uuid: str) -> list[GpuProcess]:
        # sysfs has no per-process view; memory budgets are not watched here.
        return []

    def close(self) -> None:
        return None
