"""GPU allocation and sharing, driven by the fake backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boincd_containers.host.gpu.allocator import (
    LABEL_GPU_USAGE,
    LABEL_GPUS,
    GpuAllocator,
    cgroup_container_id,
    parse_gpu_labels,
    usage_by_container,
)
from boincd_containers.host.gpu.backend import (
    GpuBusy,
    GpuRequestError,
    GpuUnavailable,
    normalize_gpu_type,
    normalize_pci_bus_id,
)
from boincd_containers.host.gpu.fake import GIB, FakeGpuBackend

CID_A = "a" * 64
CID_B = "b" * 64


@pytest.fixture
def two_gpus() -> FakeGpuBackend:
    return FakeGpuBackend.with_gpus(2, memory_total_bytes=8 * GIB)


def test_four_half_tasks_share_two_gpus_two_by_two(two_gpus: FakeGpuBackend) -> None:
    alloc = GpuAllocator(two_gpus)
    got = {
        "r1": alloc.allocate("r1", "NVIDIA", 0, 0.5),
        "r2": alloc.allocate("r2", "NVIDIA", 0, 0.5),
        "r3": alloc.allocate("r3", "NVIDIA", 1, 0.5),
        "r4": alloc.allocate("r4", "NVIDIA", 1, 0.5),
    }
    gpu0, gpu1 = two_gpus.uuid(0), two_gpus.uuid(1)
    assert got["r1"].uuids == got["r2"].uuids == (gpu0,)
    assert got["r3"].uuids == got["r4"].uuids == (gpu1,)
    for a in got.values():
        assert a.share == 0.5
        assert a.memory_budget_bytes == 4 * GIB
        assert a.vendor == "nvidia"
    assert alloc.allocated_units(gpu0) == alloc.allocated_units(gpu1) == 1_000_000


def test_boinc_device_number_is_honoured_not_inventory_index() -> None:
    # CUDA numbers the cards the other way round from NVML here.
    backend = FakeGpuBackend.with_gpus(2, boinc_order=[1, 0])
    alloc = GpuAllocator(backend)
    assert alloc.allocate("r0", "NVIDIA", 0, 1.0).uuids == (backend.uuid(1),)
    assert alloc.allocate("r1", "nvidia", 1, 1.0).uuids == (backend.uuid(0),)


def test_oversubscription_is_refused_not_moved(two_gpus: FakeGpuBackend) -> None:
    alloc = GpuAllocator(two_gpus)
    alloc.allocate("r1", "NVIDIA", 0, 0.5)
    alloc.allocate("r2", "NVIDIA", 0, 0.5)
    with pytest.raises(GpuBusy) as info:
        alloc.allocate("r3", "NVIDIA", 0, 0.5)
    err = info.value
    assert err.retryable
    assert "r1" in err.message
    assert "r2" in err.message
    assert "GPU 0" in err.message
    # The free card was not used instead, and the refused task holds nothing.
    assert alloc.allocated_units(two_gpus.uuid(1)) == 0
    assert alloc.get("r3") is None


def test_allocation_is_idempotent_per_result(two_gpus: FakeGpuBackend) -> None:
    alloc = GpuAllocator(two_gpus)
    first = alloc.allocate("r1", "NVIDIA", 0, 0.5)
    again = alloc.allocate("r1", "NVIDIA", 0, 0.5)
    assert again == first
    # Counted once: another half still fits.
    alloc.allocate("r2", "NVIDIA", 0, 0.5)


def test_release_frees_the_share_and_is_idempotent(two_gpus: FakeGpuBackend) -> None:
    alloc = GpuAllocator(two_gpus)
    alloc.allocate("r1", "NVIDIA", 0, 1.0)
    released = alloc.release("r1")
    assert released is not None
    assert released.uuids == (two_gpus.uuid(0),)
    assert alloc.release("r1") is None
    assert alloc.allocate("r2", "NVIDIA", 0, 1.0).uuids == (two_gpus.uuid(0),)


def test_thirds_written_by_boinc_fit_one_card(two_gpus: FakeGpuBackend) -> None:
    alloc = GpuAllocator(two_gpus)
    for i in range(3):
        alloc.allocate(f"r{i}", "NVIDIA", 0, 0.333333)
    with pytest.raises(GpuBusy):
        alloc.allocate("r3", "NVIDIA", 0, 0.01)


def test_restore_after_restart_rebuilds_shares(two_gpus: FakeGpuBackend) -> None:
    before = GpuAllocator(two_gpus)
    labels = {r: before.allocate(r, "NVIDIA", 0, 0.5).labels() for r in ("r1", "r2")}
    assert labels["r1"] == {LABEL_GPUS: two_gpus.uuid(0), LABEL_GPU_USAGE: "0.5"}

    after = GpuAllocator(two_gpus)  # a fresh daemon
    for result, lab in labels.items():
        restored = after.restore_from_labels(result, lab)
        assert restored is not None
        assert restored.memory_budget_bytes == 4 * GIB
    with pytest.raises(GpuBusy):
        after.allocate("r3", "NVIDIA", 0, 0.5)
    # The restored task's own create-or-attach gets its assignment back.
    assert after.allocate("r1", "NVIDIA", 0, 0.5).uuids == (two_gpus.uuid(0),)


def test_restore_while_driver_is_down_still_books_the_card(two_gpus: FakeGpuBackend) -> None:
    uuid = two_gpus.uuid(0)
    two_gpus.fail_with = GpuUnavailable("driver down")
    alloc = GpuAllocator(two_gpus)
    restored = alloc.restore("r1", [uuid], 1.0)
    assert restored is not None
    assert restored.vendor == "nvidia"
    assert restored.devices == ()
    two_gpus.fail_with = None
    with pytest.raises(GpuBusy):
        alloc.allocate("r2", "NVIDIA", 0, 0.5)


def test_restore_ignores_cpu_and_unreadable_labels(two_gpus: FakeGpuBackend) -> None:
    alloc = GpuAllocator(two_gpus)
    assert alloc.restore_from_labels("cpu", {"org.boinc.containers.result": "cpu"}) is None
    assert alloc.restore_from_labels("bad", {LABEL_GPUS: "GPU-x", LABEL_GPU_USAGE: "lots"}) is None
    assert alloc.restore("none", [], 0.5) is None
    assert alloc.assignments() == []


def test_backend_failure_is_gpu_unavailable(two_gpus: FakeGpuBackend) -> None:
    two_gpus.fail_with = GpuUnavailable("NVIDIA GPU unavailable: GPU is lost")
    with pytest.raises(GpuUnavailable, match="GPU is lost"):
        GpuAllocator(two_gpus).allocate("r1", "NVIDIA", 0, 0.5)


def test_missing_device_number_is_unavailable_not_moved(two_gpus: FakeGpuBackend) -> None:
    with pytest.raises(GpuUnavailable, match="GPU 5") as info:
        GpuAllocator(two_gpus).allocate("r1", "NVIDIA", 5, 0.5)
    assert info.value.retryable


def test_no_card_of_the_vendor(two_gpus: FakeGpuBackend) -> None:
    with pytest.raises(GpuUnavailable, match="AMD"):
        GpuAllocator(two_gpus).allocate("r1", "ATI", 0, 1.0)


def test_bad_requests_are_not_retryable(two_gpus: FakeGpuBackend) -> None:
    alloc = GpuAllocator(two_gpus)
    with pytest.raises(GpuRequestError) as info:
        alloc.allocate("r1", "apple_gpu", 0, 1.0)
    assert not info.value.retryable
    with pytest.raises(GpuRequestError):
        alloc.allocate("r1", "NVIDIA", 0, 0.0)


def test_gpu_type_names() -> None:
    assert normalize_gpu_type("NVIDIA") == "nvidia"
    assert normalize_gpu_type("CUDA") == "nvidia"
    assert normalize_gpu_type("ATI") == "amd"
    assert normalize_gpu_type("amd") == "amd"
    assert normalize_gpu_type("intel_gpu") == "intel"


def test_pci_bus_id_spellings_agree() -> None:
    assert normalize_pci_bus_id("00000000:01:00.0") == "0000:01:00.0"
    assert normalize_pci_bus_id("0000:0A:00.0") == "0000:0a:00.0"
    assert normalize_pci_bus_id("01:00.0") == "0000:01:00.0"


def test_multi_gpu_task_takes_whole_free_cards() -> None:
    backend = FakeGpuBackend.with_gpus(3)
    alloc = GpuAllocator(backend)
    alloc.allocate("small", "NVIDIA", 0, 0.5)
    big = alloc.allocate("big", "NVIDIA", 2, 2.0)
    assert big.uuids == (backend.uuid(2), backend.uuid(1))
    assert big.share == 1.0
    with pytest.raises(GpuBusy, match="2 whole"):
        alloc.allocate("big2", "NVIDIA", -1, 2.0)


def test_other_vendor_cards_are_numbered_separately() -> None:
    amd = FakeGpuBackend.with_gpus(1, vendor="amd", memory_total_bytes=4 * GIB)
    nvidia = FakeGpuBackend.with_gpus(1)
    alloc = GpuAllocator([nvidia, amd])
    a = alloc.allocate("r1", "ATI", 0, 1.0)
    n = alloc.allocate("r2", "NVIDIA", 0, 1.0)
    assert a.vendor == "amd"
    assert a.memory_budget_bytes == 4 * GIB
    assert n.uuids == (nvidia.uuid(0),)


def test_parse_gpu_labels() -> None:
    assert parse_gpu_labels({LABEL_GPUS: "GPU-a,GPU-b", LABEL_GPU_USAGE: "2"}) == (
        ["GPU-a", "GPU-b"],
        2.0,
    )
    assert parse_gpu_labels({LABEL_GPUS: ""}) is None
    assert parse_gpu_labels({LABEL_GPUS: "GPU-a", LABEL_GPU_USAGE: "-1"}) is None


def _write_cgroup(root: Path, pid: int, text: str) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "cgroup").write_text(text)


def test_cgroup_container_id_for_docker_and_podman(tmp_path: Path) -> None:
    _write_cgroup(tmp_path, 10, f"0::/system.slice/docker-{CID_A}.scope\n")
    _write_cgroup(tmp_path, 11, f"12:memory:/docker/{CID_B}\n11:pids:/docker/{CID_B}\n")
    _write_cgroup(
        tmp_path,
        12,
        f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID_A}.scope/container\n",
    )
    _write_cgroup(tmp_path, 13, "0::/user.slice/user-1000.slice/session-2.scope\n")
    assert cgroup_container_id(10, tmp_path) == CID_A
    assert cgroup_container_id(11, tmp_path) == CID_B
    assert cgroup_container_id(12, tmp_path) == CID_A
    assert cgroup_container_id(13, tmp_path) is None
    assert cgroup_container_id(99, tmp_path) is None  # exited


def test_usage_by_container_sums_processes(two_gpus: FakeGpuBackend) -> None:
    gpu0 = two_gpus.uuid(0)
    two_gpus.add_process(gpu0, 100, 1 * GIB)
    two_gpus.add_process(gpu0, 101, 2 * GIB)
    two_gpus.add_process(gpu0, 200, None)  # memory not reported
    two_gpus.add_process(gpu0, 300, 5 * GIB)  # a desktop app, no container
    owners = {100: CID_A, 101: CID_A, 200: CID_B}
    assert usage_by_container(two_gpus, owners.get) == {
        CID_A: {gpu0: 3 * GIB},
        CID_B: {gpu0: 0},
    }


def test_snapshot_reports_budgets_and_over_budget(two_gpus: FakeGpuBackend) -> None:
    alloc = GpuAllocator(two_gpus)
    alloc.allocate("r1", "NVIDIA", 0, 0.5)
    alloc.allocate("r2", "NVIDIA", 0, 0.5)
    gpu0 = two_gpus.uuid(0)
    two_gpus.add_process(gpu0, 100, 1 * GIB)
    two_gpus.add_process(gpu0, 200, 5 * GIB)
    owners = {100: CID_A, 200: CID_B}
    snap = alloc.snapshot({"r1": CID_A[:12], "r2": CID_B}, pid_to_container=owners.get)

    shares = {s.result: s for s in snap.shares}
    assert shares["r1"].budget_bytes == 4 * GIB
    assert shares["r1"].used_bytes == 1 * GIB
    assert not shares["r1"].over_budget
    assert shares["r2"].used_bytes == 5 * GIB
    assert shares["r2"].over_budget
    card0 = snap.devices[0]
    assert card0.allocated == 1.0
    assert set(card0.tasks) == {"r1", "r2"}

    doc = json.loads(json.dumps(snap.to_dict()))
    assert doc["shares"][1]["over_budget"] is True
    assert doc["devices"][1]["free"] == 1.0
    text = snap.render_text()
    assert "OVER BUDGET" in text
    assert "r1" in text
    assert gpu0 in text


def test_snapshot_without_containers_does_not_measure(two_gpus: FakeGpuBackend) -> None:
    alloc = GpuAllocator(two_gpus)
    alloc.allocate("r1", "NVIDIA", 0, 0.5)
    (share,) = alloc.snapshot().shares
    assert share.used_bytes is None
    assert not share.over_budget


def test_snapshot_survives_a_broken_backend(two_gpus: FakeGpuBackend) -> None:
    alloc = GpuAllocator(two_gpus)
    two_gpus.fail_with = GpuUnavailable("NVIDIA GPU unavailable: driver not loaded")
    snap = alloc.snapshot({})
    assert snap.devices == ()
    assert snap.errors == ("NVIDIA GPU unavailable: driver not loaded",)
    assert "No GPUs found." in snap.render_text()


def test_snapshot_hides_a_driver_that_is_not_installed(two_gpus: FakeGpuBackend) -> None:
    two_gpus.fail_with = GpuUnavailable("no libnvidia-ml", absent=True)
    assert GpuAllocator(two_gpus).snapshot().errors == ()


def test_close_closes_backends(two_gpus: FakeGpuBackend) -> None:
    GpuAllocator(two_gpus).close()
    assert two_gpus.closed
