"""Network, disk and memory under the real BOINC client, the real daemon and dockerd.

What the client cannot measure itself must still reach it or be enforced: the
container's traffic (app_status `bytes_sent`/`bytes_received`), BOINC's network
switch (`boinccmd --set_network_mode never/always` → disconnect/reconnect), the
disk bound past the slot dir (the writable layer), and the container's memory
(app_status `<wss>`).

Each runs under both client releases, and what differs is tested as each does
it: 8.2.14 and later no longer read `<bytes_sent>`/`<bytes_received>` (boinccmd
then shows no "bytes sent" line: the traffic is checked in the daemon's
figures), and 7.20 does not read `<wss>` (it measures the shim's own processes,
which the container's are not: they are children of the engine).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincd_containers.core import labels as L
from boincd_containers.shim.client import DaemonError
from boincd_containers.shim.pyz import build_pyz
from boincd_containers.testing.boinc import (
    EXIT_DISK_LIMIT_EXCEEDED,
    RESULT_COMPUTE_ERROR,
    BoincClient,
    ClientBinaries,
    ResultSpec,
    Task,
    start_shim_client,
)
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess, docker
from boincd_containers.testing.names import unique

pytestmark = [
    pytest.mark.boinc,
    pytest.mark.docker,
]

MiB = 1 << 20
BLOB_BYTES = 200_000


@pytest.fixture(scope="module")
def shim_pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pyz(tmp_path_factory.mktemp("pyz") / "boincd-shim.pyz", sys.executable)


@pytest.fixture
def internal_network(test_image: str) -> Iterator[str]:
    """No route out of this machine: the traffic stays between two test containers."""
    name = f"bd-int-{uuid.uuid4().hex[:10]}"
    docker("network", "create", "--internal", name)
    try:
        yield name
    finally:
        docker("network", "rm", name, check=False)


@pytest.fixture
def web_server(internal_network: str) -> Iterator[str]:
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
    (short_tmp / "config.toml").write_text(
        f'relist_interval_s = 5.0\nnetwork_name = "{internal_network}"\n'
    )
    process = DaemonProcess(short_tmp)
    try:
        yield process.start()
    finally:
        process.kill()
        process.cleanup_engine_objects()


@dataclasses.dataclass
class Clients:
    """The clients a test starts, all under its client release; closed at the
    end even when the test fails."""

    binaries: ClientBinaries
    made: list[BoincClient] = dataclasses.field(default_factory=list)


@pytest.fixture
def clients(boinc_client: ClientBinaries) -> Iterator[Clients]:
    made = Clients(boinc_client)
    try:
        yield made
    finally:
        for client in made.made:
            client.close()


def start_client(
    made: Clients,
    base: Path,
    shim: Path,
    daemon: DaemonProcess,
    job: str,
    spec: ResultSpec,
    **kwargs: object,
) -> BoincClient:
    return start_shim_client(
        made.made, base, shim, daemon.socket, made.binaries, job.encode(), [spec], **kwargs
    )


def job_toml(command: str, **extra: str) -> str:
    lines = [f'image = "{TEST_IMAGE}"', f"command = ['sh', '-c', {command!r}]"]
    return "\n".join(lines + [f"{k} = {v}" for k, v in extra.items()]) + "\n"


def containers_of(result: str) -> list[str]:
    return docker("ps", "-aq", "--no-trunc", "--filter", f"label={L.RESULT}={result}").split()


def container(result: str) -> dict[str, object] | None:
    ids = containers_of(result)
    if len(ids) != 1:
        return None
    data: dict[str, object] = json.loads(docker("inspect", ids[0]))[0]
    return data


def networks(data: dict[str, object] | None) -> list[str]:
    settings = (data or {}).get("NetworkSettings") or {}
    return sorted(settings.get("Networks") or {})  # type: ignore[union-attr]


def bytes_received(task: Task) -> float:
    """From boinccmd's "bytes sent: S received: R" line: what the shim reported."""
    match = re.search(r"received: (\d+)", task.fields.get("bytes sent", ""))
    return float(match.group(1)) if match else 0.0


def working_set_mb(task: Task) -> float:
    match = re.match(r"(\d+) MB", task.fields.get("working set size", ""))
    return float(match.group(1)) if match else 0.0


RELEASE = "/app/release"


def test_traffic_reaches_the_client_and_its_network_switch_moves_the_container(
    clients: Clients,
    short_tmp: Path,
    shim_pyz: Path,
    net_daemon: DaemonProcess,
    internal_network: str,
    web_server: str,
) -> None:
    result = unique("net")
    fetch = (
        f"while [ ! -e {RELEASE} ]; do wget -q -O /dev/null http://{web_server}:8000/blob; "
        "sleep 0.2; done; echo done > out.txt"
    )
    # Without --unsigned_apps_ok the client leaves the network switch to boinccmd.
    client = start_client(
        clients,
        short_tmp,
        shim_pyz,
        net_daemon,
        job_toml(fetch, network="true"),
        ResultSpec(result),
        unsigned_apps_ok=False,
    )
    data = client.wait_for(
        lambda: (c := container(result)) and c["State"]["Running"] and c,  # type: ignore[index]
        60,
        "the task's container running",
    )
    cid, pid = data["Id"], data["State"]["Pid"]
    assert networks(data) == [internal_network]
    binaries = client.binaries

    def traffic() -> float:
        """Bytes the container received: the client's own figure (app_status)
        where it reads one, else the daemon's."""
        if binaries.reads_bytes_transferred:
            task = client.task(result)
            return bytes_received(task) if task is not None else 0.0
        return float(net_daemon.request("GET", f"/v1/tasks/{result}").get("rx_bytes") or 0)

    first = client.wait_for(lambda: traffic() > BLOB_BYTES and traffic(), 60, "traffic counted")

    client.set_network_mode("never")
    client.wait_for(lambda: networks(container(result)) == [], 30, "container disconnected")
    client.wait_for(lambda: traffic() > 0, 30, "the task still reporting")
    during = traffic()
    assert during >= first  # the counters did not fall back

    client.set_network_mode("always")
    client.wait_for(
        lambda: networks(container(result)) == [internal_network], 30, "container reconnected"
    )
    client.wait_for(lambda: traffic() >= during + BLOB_BYTES, 60, "traffic after reconnecting")
    if not binaries.reads_bytes_transferred:
        # The shim reported the bytes all along; this client drops them.
        task = client.task(result)
        assert task is not None
        assert "bytes sent" not in task.fields, task.fields
    # The same container and process ran throughout.
    again = container(result)
    assert again is not None
    assert (again["Id"], again["State"]["Pid"]) == (cid, pid)  # type: ignore[index]

    slot = client.slot_dir(result)
    assert slot is not None
    (slot / "release").touch()
    task = client.wait_done(result, timeout=90)
    assert (task.state, task.exit_status) == ("uploading", 0)
    stderr = client.wait_final_record(result).stderr_out
    assert "network disconnected" in stderr
    assert "network reconnected" in stderr


def test_writing_past_the_disk_bound_fails_the_task_with_the_message(
    clients: Clients, short_tmp: Path, shim_pyz: Path, daemon: DaemonProcess
) -> None:
    result = unique("disk")
    # /fill is in the writable layer: the client's own slot dir check cannot see it.
    job = job_toml("dd if=/dev/zero of=/fill bs=1M count=16 && sleep 300")
    client = start_client(
        clients, short_tmp, shim_pyz, daemon, job, ResultSpec(result, rsc_disk_bound=8 * MiB)
    )
    task = client.wait_done(result, timeout=120)
    assert task.state == "compute error"
    assert task.exit_status == EXIT_DISK_LIMIT_EXCEEDED
    record = client.wait_final_record(result)
    assert record.state == RESULT_COMPUTE_ERROR
    match = re.search(r"disk limit exceeded: (\d+) bytes of (\d+)", record.stderr_out)
    assert match is not None, record.stderr_out
    assert int(match.group(1)) >= 16 * MiB
    assert int(match.group(2)) == 8 * MiB
    client.wait_for(lambda: containers_of(result) == [], 30, "container removed")


HOLD = 40_000_000
# boinccmd's "MB" are MiB (lib/gui_rpc_client_print.cpp: / MEGA, 2^20).
HOLD_MB = HOLD // MiB


def test_the_client_sees_the_containers_memory_where_it_reads_wss(
    clients: Clients, short_tmp: Path, shim_pyz: Path, daemon: DaemonProcess
) -> None:
    result = unique("mem")
    # HOLD bytes held by the container's init (`:` last, or the shell would exec
    # the loop's last command and drop it). The shim alone is far smaller.
    hold = (
        f"x=$(head -c {HOLD} /dev/zero | tr '\\0' a); "
        f"while [ ! -e {RELEASE} ]; do sleep 0.2; done; echo done > out.txt; :"
    )
    client = start_client(clients, short_tmp, shim_pyz, daemon, job_toml(hold), ResultSpec(result))

    def container_memory() -> float:
        try:
            return float(daemon.request("GET", f"/v1/tasks/{result}").get("memory_bytes") or 0)
        except DaemonError:  # no task yet
            return 0.0

    client.wait_for(lambda: container_memory() >= HOLD, 90, "the container holding its memory")
    if client.version >= (8, 2):
        # <wss> from app_status; the client measures every 10 s and smooths.
        client.wait_for_task(
            result,
            lambda t: working_set_mb(t) >= HOLD_MB,
            90,
            "the client seeing the container's memory",
        )
    else:
        # 7.20 measures the shim's process tree only: without other_pid (which
        # costs the task its container at a client shutdown) it cannot see the
        # container's memory. Two of its 10 s measurements, both the shim's.
        seen = [
            working_set_mb(
                client.wait_for_task(result, lambda t: working_set_mb(t) > 0, 60, "a measurement")
            )
        ]
        later = client.wait_for_task(
            result,
            lambda t: (t.elapsed_time or 0) >= 25,
            90,
            "two more of the client's memory measurements",
        )
        seen.append(working_set_mb(later))
        assert max(seen) < HOLD_MB, f"7.20 counted the container's memory: {seen} MB"
    slot = client.slot_dir(result)
    assert slot is not None
    (slot / "release").touch()
    task = client.wait_done(result, timeout=90)
    assert (task.state, task.exit_status) == ("uploading", 0)
