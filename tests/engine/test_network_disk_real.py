"""What the BOINC client cannot see, on the real dockerd: a task's network traffic and
switch, its writable layer against its disk bound, and its working set.

Network traffic stays on this machine: the test creates an `--internal` network
(no route out) with a busybox httpd on it, and names it as the daemon's
`network_name`, which a job with `network = true` gets.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.shim.client import DaemonError
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess, docker
from boincd_containers.testing.names import RUN_ID

pytestmark = pytest.mark.docker

MiB = 1 << 20
BLOB_BYTES = 200_000


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def internal_network(test_image: str) -> Iterator[str]:
    name = f"bd-int-{uuid.uuid4().hex[:10]}"
    docker("network", "create", "--internal", name)
    try:
        yield name
    finally:
        docker("network", "rm", name, check=False)


@pytest.fixture
def web_server(internal_network: str) -> Iterator[str]:
    """A busybox httpd serving a blob on the internal network; yields its address."""
    name = f"bd-web-{uuid.uuid4().hex[:10]}"
    script = (
        f"mkdir -p /www && head -c {BLOB_BYTES} /dev/zero > /www/blob && "
        "exec httpd -f -p 8000 -h /www"
    )
    docker(
        "run", "-d", "--name", name, "--network", internal_network, TEST_IMAGE, "sh", "-c", script
    )
    try:
        data = json.loads(docker("inspect", name))[0]
        yield data["NetworkSettings"]["Networks"][internal_network]["IPAddress"]
    finally:
        docker("rm", "-f", name, check=False)


@pytest.fixture
def net_daemon(short_tmp: Path, internal_network: str) -> Iterator[DaemonProcess]:
    """The real daemon whose network tasks go on the test's internal network."""
    (short_tmp / "config.toml").write_text(
        f'relist_interval_s = 5.0\nnetwork_name = "{internal_network}"\n'
    )
    process = DaemonProcess(short_tmp)
    try:
        yield process.start()
    finally:
        # Before the network fixture removes the network: nothing may still use it.
        process.kill()
        process.cleanup_engine_objects()


def start_task(
    daemon: DaemonProcess, slot_base: Path, result: str, command: str, **extra: Any
) -> dict[str, Any]:
    slot = slot_base / result
    slot.mkdir()
    body = {
        "result": result,
        "project": f"test.example.org_proj_{RUN_ID}",
        "slot_dir": str(slot),
        "image": TEST_IMAGE,
        "command": ["sh", "-c", command],
        "memory_bytes": 256 * MiB,
        **extra,
    }
    daemon.request("POST", "/v1/tasks", body)
    wait_for(
        f"{result} created",
        lambda: daemon.request("GET", f"/v1/tasks/{result}")["state"] in ("created", "failed"),
    )
    task: dict[str, Any] = daemon.request("POST", f"/v1/tasks/{result}/start")
    assert task["state"] == "running", task
    return task


def task(daemon: DaemonProcess, result: str) -> dict[str, Any]:
    found: dict[str, Any] = daemon.request("GET", f"/v1/tasks/{result}")
    return found


def networks_of(container_id: str) -> list[str]:
    data = json.loads(docker("inspect", container_id))[0]
    return sorted(data["NetworkSettings"]["Networks"] or {})


def test_network_counters_grow_and_the_switch_disconnects_and_reconnects(
    net_daemon: DaemonProcess, web_server: str, internal_network: str, short_tmp: Path
) -> None:
    fetch = (
        f"while true; do wget -q -O /dev/null http://{web_server}:8000/blob "
        "&& echo ok >> /app/fetched; sleep 0.2; done"
    )
    started = start_task(net_daemon, short_tmp, "net_0", fetch, network=True)
    cid, pid = started["container_id"], started["pid"]
    assert networks_of(cid) == [internal_network]

    # Counters grow with the traffic: each fetch receives the blob and sends a request.
    first = wait_for(
        "traffic counted",
        lambda: (
            (t := task(net_daemon, "net_0"))["rx_bytes"] > BLOB_BYTES and t["tx_bytes"] > 0 and t
        ),
    )
    wait_for(
        "counters growing",
        lambda: task(net_daemon, "net_0")["rx_bytes"] >= first["rx_bytes"] + BLOB_BYTES,
    )

    # BOINC suspends network activity: the shim asks for a disconnect.
    off = net_daemon.request("POST", "/v1/tasks/net_0/network", {"connected": False})
    assert off["network_connected"] is False
    assert networks_of(cid) == []
    before = wait_for(
        "a sample after the disconnect",
        lambda: (t := task(net_daemon, "net_0"))["sampled_at"] > time.time() - 0.5 and t,
    )
    # The interface and its kernel counters are gone; the task's counters are not.
    assert before["rx_bytes"] >= first["rx_bytes"] + BLOB_BYTES
    fetched = (short_tmp / "net_0" / "fetched").read_text().count("ok")

    # Network allowed again: reconnected, same container, same process, traffic resumes.
    on = net_daemon.request("POST", "/v1/tasks/net_0/network", {"connected": True})
    assert on["network_connected"] is True
    assert networks_of(cid) == [internal_network]
    after = wait_for(
        "traffic after reconnecting",
        lambda: (
            (t := task(net_daemon, "net_0"))["rx_bytes"] >= before["rx_bytes"] + BLOB_BYTES and t
        ),
    )
    assert (short_tmp / "net_0" / "fetched").read_text().count("ok") > fetched
    assert (after["state"], after["container_id"], after["pid"]) == ("running", cid, pid)
    assert after["tx_bytes"] >= before["tx_bytes"]


def test_a_task_without_network_stays_off_the_network(
    net_daemon: DaemonProcess, short_tmp: Path
) -> None:
    started = start_task(net_daemon, short_tmp, "nonet_0", "sleep 300")
    assert networks_of(started["container_id"]) == ["none"]
    # Asked to connect anyway: a clear refusal, not a 200 that did nothing.
    with pytest.raises(DaemonError) as refused:
        net_daemon.request("POST", "/v1/tasks/nonet_0/network", {"connected": True})
    assert refused.value.status == 409
    assert "did not ask for one" in refused.value.message
    assert networks_of(started["container_id"]) == ["none"]


@pytest.fixture
def daemon_plain(short_tmp: Path, test_image: str) -> Iterator[DaemonProcess]:
    process = DaemonProcess(short_tmp)
    try:
        yield process.start()
    finally:
        process.kill()
        process.cleanup_engine_objects()


def test_writing_past_the_disk_bound_into_the_writable_layer_stops_the_task(
    daemon_plain: DaemonProcess, short_tmp: Path
) -> None:
    bound = 8 * MiB
    # /fill is in the container's writable layer, outside the slot: BOINC cannot see it.
    start_task(
        daemon_plain,
        short_tmp,
        "disk_big",
        "dd if=/dev/zero of=/fill bs=1M count=16 && sleep 300",
        disk_bytes=bound,
    )
    small = start_task(
        daemon_plain,
        short_tmp,
        "disk_small",
        "dd if=/dev/zero of=/fill bs=1M count=1 && echo done > /app/out && sleep 300",
        disk_bytes=64 * MiB,
    )
    stopped = wait_for(
        "the task over its bound stopped",
        lambda: (t := task(daemon_plain, "disk_big"))["state"] == "exited" and t,
    )
    limit = stopped["limit_exceeded"]
    assert limit["kind"] == "disk"
    match = re.fullmatch(r"disk limit exceeded: (\d+) bytes of (\d+)", limit["message"])
    assert match is not None, limit
    assert int(match.group(2)) == bound
    assert int(match.group(1)) >= 16 * MiB
    assert stopped["exit_code"] == 137
    assert stopped["interrupted"] is False  # never to be started again
    assert stopped["writable_bytes"] >= 16 * MiB

    # The task under its bound was measured in the same pass and keeps running;
    # its writable layer is what the engine itself reports, to the byte.
    under = wait_for(
        "the small task measured",
        lambda: (
            (t := task(daemon_plain, "disk_small"))["disk_sampled_at"]
            and (short_tmp / "disk_small" / "out").exists()
            and t["disk_sampled_at"] > (short_tmp / "disk_small" / "out").stat().st_mtime
            and t
        ),
    )
    assert under["state"] == "running"
    assert under["limit_exceeded"] is None
    size_rw = json.loads(docker("inspect", "--size", small["container_id"]))[0]["SizeRw"]
    assert under["writable_bytes"] == size_rw
    assert size_rw >= MiB
    assert under["slot_bytes"] == len("done\n")
    # dd reports on stderr: its log counts too.
    assert under["disk_used_bytes"] == size_rw + len("done\n") + under["log_bytes"]
    assert under["disk_bound_bytes"] == 64 * MiB
    status = daemon_plain.request("GET", "/v1/status")
    assert status["task_disk"]["writable_bytes"] >= size_rw + 16 * MiB

    # The reason survives a daemon restart.
    daemon_plain.stop()
    daemon_plain.start()
    assert task(daemon_plain, "disk_big")["limit_exceeded"] == limit


def _memory_cgroup(pid: int) -> Path:
    """The container's memory cgroup from the kernel's own view of the process."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    for line in lines:
        if line.startswith("0::"):
            return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    raise AssertionError(f"no memory cgroup for pid {pid}")


def _cgroup_working_set(cgroup: Path) -> int:
    stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
    if (cgroup / "memory.usage_in_bytes").exists():
        usage = int((cgroup / "memory.usage_in_bytes").read_text())
        inactive = int(stat["total_inactive_file"])
    else:
        usage = int((cgroup / "memory.current").read_text())
        inactive = int(stat["inactive_file"])
    return max(usage - inactive, 0)


def test_working_set_matches_the_cgroup(daemon_plain: DaemonProcess, short_tmp: Path) -> None:
    # About 40 MB held by the container's init itself, then idle.
    # (`sleep` not last: the shell would exec it and drop its memory.)
    hold = "x=$(head -c 40000000 /dev/zero | tr '\\0' a); echo held > /app/held; sleep 300; :"
    started = start_task(daemon_plain, short_tmp, "mem_0", hold)
    held = wait_for("memory held", lambda: (short_tmp / "mem_0" / "held").exists())
    assert held
    since = time.time()
    reported = wait_for(
        "a sample after the allocation",
        lambda: (t := task(daemon_plain, "mem_0"))["sampled_at"] > since and t,
    )
    own = _cgroup_working_set(_memory_cgroup(started["pid"]))
    assert own > 40_000_000
    assert abs(reported["wss_bytes"] - own) <= own * 0.10
