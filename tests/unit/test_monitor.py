"""The monitor's sampling: one place for every consumer, network counters kept monotonic."""

from __future__ import annotations

from typing import cast

from boincd_containers.host.cgroups import CgroupGone, CgroupReader, CgroupSample, MemoryUsage
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.registry import Registry
from boincd_containers.tasks.state import TaskKey, TaskState
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


KEY = TaskKey("proj", "r_1")


def rig() -> tuple[Monitor, FakeReader, TaskRecord]:
    registry = Registry(FakeEngine(), "me")
    record = TaskRecord("r_1", "proj", container_id="c1", state="running", pid=42)
    registry.store.add(record)
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
    assert (monitor.latest(KEY).rx_bytes, monitor.latest(KEY).tx_bytes) == (1000, 50)
    # Reconnected: a new interface counts from zero.
    reader.net["c1"] = (300, 7)
    monitor.tick()
    assert (monitor.latest(KEY).rx_bytes, monitor.latest(KEY).tx_bytes) == (1300, 57)
    reader.net["c1"] = (400, 9)
    monitor.tick()
    assert (monitor.latest(KEY).rx_bytes, monitor.latest(KEY).tx_bytes) == (1400, 59)


def test_a_new_container_for_the_result_counts_from_its_own_zero() -> None:
    monitor, reader, record = rig()
    reader.net["c1"] = (1000, 50)
    monitor.tick()
    record.container_id = "c2"
    reader.net["c2"] = (10, 1)
    monitor.tick()
    assert (monitor.latest(KEY).rx_bytes, monitor.latest(KEY).tx_bytes) == (10, 1)


def test_last_figures_are_kept_after_exit_and_dropped_with_the_task() -> None:
    monitor, reader, record = rig()
    reader.net["c1"] = (1000, 50)
    monitor.tick()
    reader.gone.add("c1")
    record.state = "exited"
    monitor.tick()
    assert monitor.latest(KEY).rx_bytes == 1000
    monitor.registry.store.drop(monitor.registry.get("r_1"))
    monitor.tick()
    assert KEY not in monitor.samples
    assert monitor.latest(KEY).rx_bytes == 0


async def test_a_tick_reads_in_a_thread_while_the_loop_answers_requests() -> None:
    import asyncio
    import threading

    registry = Registry(FakeEngine(), "me")
    for n in range(16):
        registry.store.add(
            TaskRecord(f"r_{n}", "proj", container_id=f"c{n}", state=TaskState.RUNNING, pid=100 + n)
        )
    answered = threading.Event()

    class SlowReader(FakeReader):
        def sample(self, container_id: str, pid: int) -> CgroupSample:
            # Blocks until a request was answered: on the event loop this would
            # never happen (the wait times out and the test fails).
            assert answered.wait(timeout=5), "the tick held the event loop"
            return super().sample(container_id, pid)

    monitor = Monitor(registry, cast(CgroupReader, SlowReader()))
    ticking = asyncio.ensure_future(monitor.tick_in_thread())
    await asyncio.sleep(0.01)
    assert monitor.samples == {}  # stored on the loop, all at once, after the reads
    answered.set()  # a request served while the tick runs
    await ticking
    assert len(monitor.samples) == 16
    assert monitor.ticks == 1
