"""Network, disk and memory under the real BOINC client, the real daemon and dockerd.

What the client cannot measure itself must still reach it or be enforced: the
container's traffic (app_status `bytes_sent`/`bytes_received`), BOINC's network
switch (`boinccmd --set_network_mode never/always` → disconnect/reconnect), the
disk bound past the slot dir (the writable layer), and the container's memory
(the client counts it through `other_pid`; 7.20 does not parse an app's `<wss>`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincd_containers import labels as L
from boincd_containers.shim.pyz import build_pyz
from tests.boinc_harness import (
    EXIT_DISK_LIMIT_EXCEEDED,
    RESULT_COMPUTE_ERROR,
    BoincClient,
    FileSpec,
    ResultSpec,
    Task,
    boinc_available,
)
from tests.daemon_harness import TEST_IMAGE, DaemonProcess, docker

pytestmark = [
    pytest.mark.boinc,
    pytest.mark.docker,
    pytest.mark.skipif(
        not boinc_available() and os.environ.get("BOINCD_REQUIRE_BOINC") != "1",
        reason="needs the real BOINC client (apt-get install boinc-client)",
    ),
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


@pytest.fixture
def clients(short_tmp: Path) -> Iterator[list[BoincClient]]:
    made: list[BoincClient] = []
    try:
        yield made
    finally:
        for client in made:
            client.close()


def start_client(
    made: list[BoincClient],
    base: Path,
    shim: Path,
    daemon: DaemonProcess,
    job: str,
    spec: ResultSpec,
    **kwargs: object,
) -> BoincClient:
    client = BoincClient(
        base / f"boinc{len(made)}",
        shim,
        results=[spec],
        app_files=[FileSpec("job.toml", job.encode())],
        env={**os.environ, "BOINCD_SOCKET": daemon.socket},
        **kwargs,  # type: ignore[arg-type]
    )
    made.append(client)
    client.start()
    return client


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
    clients: list[BoincClient],
    short_tmp: Path,
    shim_pyz: Path,
    net_daemon: DaemonProcess,
    internal_network: str,
    web_server: str,
) -> None:
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
        ResultSpec("net_1"),
        unsigned_apps_ok=False,
    )
    data = client.wait_for(
        lambda: (c := container("net_1")) and c["State"]["Running"] and c,  # type: ignore[index]
        60,
        "the task's container running",
    )
    cid, pid = data["Id"], data["State"]["Pid"]
    assert networks(data) == [internal_network]
    # The client's own view of the task (app_status), not only the daemon's.
    first = client.wait_for_task(
        "net_1", lambda t: bytes_received(t) > BLOB_BYTES, 60, "the client counting traffic"
    )

    client.set_network_mode("never")
    client.wait_for(lambda: networks(container("net_1")) == [], 30, "container disconnected")
    client.wait_for(
        lambda: (t := client.task("net_1")) is not None and bytes_received(t) > 0,
        30,
        "the task still reporting",
    )
    during = client.task("net_1")
    assert during is not None
    assert bytes_received(during) >= bytes_received(first)  # the counters did not fall back

    client.set_network_mode("always")
    client.wait_for(
        lambda: networks(container("net_1")) == [internal_network], 30, "container reconnected"
    )
    client.wait_for_task(
        "net_1",
        lambda t: bytes_received(t) >= bytes_received(during) + BLOB_BYTES,
        60,
        "traffic after reconnecting",
    )
    # The same container and process ran throughout.
    again = container("net_1")
    assert again is not None
    assert (again["Id"], again["State"]["Pid"]) == (cid, pid)  # type: ignore[index]

    slot = client.slot_dir("net_1")
    assert slot is not None
    (slot / "release").touch()
    task = client.wait_done("net_1", timeout=90)
    assert (task.state, task.exit_status) == ("uploading", 0)
    stderr = client.wait_final_record("net_1").stderr_out
    assert "network disconnected" in stderr
    assert "network reconnected" in stderr


def test_writing_past_the_disk_bound_fails_the_task_with_the_message(
    clients: list[BoincClient], short_tmp: Path, shim_pyz: Path, daemon: DaemonProcess
) -> None:
    # /fill is in the writable layer: the client's own slot dir check cannot see it.
    job = job_toml("dd if=/dev/zero of=/fill bs=1M count=16 && sleep 300")
    client = start_client(
        clients, short_tmp, shim_pyz, daemon, job, ResultSpec("disk_1", rsc_disk_bound=8 * MiB)
    )
    task = client.wait_done("disk_1", timeout=120)
    assert task.state == "compute error"
    assert task.exit_status == EXIT_DISK_LIMIT_EXCEEDED
    record = client.wait_final_record("disk_1")
    assert record.state == RESULT_COMPUTE_ERROR
    match = re.search(r"disk limit exceeded: (\d+) bytes of (\d+)", record.stderr_out)
    assert match is not None, record.stderr_out
    assert int(match.group(1)) >= 16 * MiB
    assert int(match.group(2)) == 8 * MiB
    client.wait_for(lambda: containers_of("disk_1") == [], 30, "container removed")


def test_the_client_counts_the_containers_memory_through_other_pid(
    clients: list[BoincClient], short_tmp: Path, shim_pyz: Path, daemon: DaemonProcess
) -> None:
    # About 40 MB held by the container's init (`:` last, or the shell would exec
    # the loop's last command and drop it). The shim alone is far smaller.
    hold = (
        "x=$(head -c 40000000 /dev/zero | tr '\\0' a); "
        f"while [ ! -e {RELEASE} ]; do sleep 0.2; done; echo done > out.txt; :"
    )
    client = start_client(clients, short_tmp, shim_pyz, daemon, job_toml(hold), ResultSpec("mem_1"))
    # The client measures every 10 s and smooths; allow it a few rounds.
    client.wait_for_task(
        "mem_1", lambda t: working_set_mb(t) >= 40, 90, "the client seeing the container's memory"
    )
    slot = client.slot_dir("mem_1")
    assert slot is not None
    (slot / "release").touch()
    task = client.wait_done("mem_1", timeout=90)
    assert (task.state, task.exit_status) == ("uploading", 0)
