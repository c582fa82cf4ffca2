"""The monitor's sampling: one place for every consumer, network counters kept monotonic."""

from __future__ import annotations

from typing import cast

from boincd_containers.host.cgroups import CgroupGone, CgroupReader, CgroupSample, MemoryUsage
from boincd_containers.tasks.registry import Registry, TaskRecord
from boincd_containers.testing.fakes import FakeEngine
from boincd_containers.watch.monitor import Monitor


class FakeReader:
    """Kernel figures the test sets; what CgroupReader would read from files."""

    def __init__(self) -> None:
        self.net: dict[str, tuple[int, int]] = {}
        self.gone: set[str] = set()

    def sample(self, container_id: str, pid: int) -> CgroupSample:
        if container_id in self.gone:
            raise CgroupGone(container_id)
        return CgroupSample(
            cpu_time_ns=2_500_000_000,
            memory=MemoryUsage(usage_bytes=300, working_set_bytes=200, inactive_file_bytes=100),
        )

    def net_dev(self, container_id: str, pid: int) -> tuple[int, int]:
        if container_id in self.gone:
            raise CgroupGone(container_id)
        return self.net.get(container_id, (0, 0))


def rig() -> tuple[Monitor, FakeReader, TaskRecord]:
    registry = Registry(FakeEngine(), "me")
    record = TaskRecord("r_1", "proj", container_id="c1", state="running", pid=42)
    registry.tasks["r_1"] = record
    reader = FakeReader()
    return Monitor(registry, cast(CgroupReader, reader)), reader, record


def test_sample_carries_cgroup_figures_to_the_task_json() -> None:
    monitor, reader, record = rig()
    reader.net["c1"] = (1000, 50)
    monitor.tick()
    fields = monitor.task_fields(record)
    assert fields["cpu_time_s"] == 2.5
    assert (fields["memory_bytes"], fields["wss_bytes"]) == (300, 200)
    assert (fields["rx_bytes"], fields["tx_bytes"]) == (1000, 50)


def test_counters_survive_a_disconnect_and_keep_growing_after_reconnect() -> None:
    monitor, reader, _ = rig()
    reader.net["c1"] = (1000, 50)
    monitor.tick()
    # Disconnected: the interface and its counters are gone; only lo remains.
    reader.net["c1"] = (0, 0)
    monitor.tick()
    assert (monitor.latest("r_1").rx_bytes, monitor.latest("r_1").tx_bytes) == (1000, 50)
    # Reconnected: a new interface counts from zero.
    reader.net["c1"] = (300, 7)
    monitor.tick()
    assert (monitor.latest("r_1").rx_bytes, monitor.latest("r_1").tx_bytes) == (1300, 57)
    reader.net["c1"] = (400, 9)
    monitor.tick()
    assert (monitor.latest("r_1").rx_bytes, monitor.latest("r_1").tx_bytes) == (1400, 59)


def test_a_new_container_for_the_result_counts_from_its_own_zero() -> None:
    monitor, reader, record = rig()
    reader.net["c1"] = (1000, 50)
    monitor.tick()
    record.container_id = "c2"
    reader.net["c2"] = (10, 1)
    monitor.tick()
    assert (monitor.latest("r_1").rx_bytes, monitor.latest("r_1").tx_bytes) == (10, 1)


def test_last_figures_are_kept_after_exit_and_dropped_with_the_task() -> None:
    monitor, reader, record = rig()
    reader.net["c1"] = (1000, 50)
    monitor.tick()
    reader.gone.add("c1")
    record.state = "exited"
    monitor.tick()
    assert monitor.latest("r_1").rx_bytes == 1000
    del monitor.registry.tasks["r_1"]
    monitor.tick()
    assert "r_1" not in monitor.samples
    assert monitor.latest("r_1").rx_bytes == 0


async def test_a_tick_over_many_tasks_lets_requests_in_between() -> None:
    import asyncio

    registry = Registry(FakeEngine(), "me")
    for n in range(16):
        registry.tasks[f"r_{n}"] = TaskRecord(
            f"r_{n}", "proj", container_id=f"c{n}", state="running", pid=100 + n
        )
    monitor = Monitor(registry, cast(CgroupReader, FakeReader()))
    order: list[str] = []

    async def request() -> None:
        order.append(f"request after {len(monitor.samples)} samples")

    ticking = asyncio.ensure_future(monitor.tick_yielding())
    await asyncio.sleep(0)
    await request()  # arrives while the tick runs: served before its end
    await ticking
    assert order[0] != "request after 16 samples"
    assert len(monitor.samples) == 16
    assert monitor.ticks == 1
