"""The shim when its daemon dies: the container keeps running and the task
completes once the daemon is back; past a limit, a BOINC temporary exit."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincd_containers.core import labels as L
from boincd_containers.shim.pyz import build_pyz
from boincd_containers.testing.boinc import BoincClient, ClientBinaries, FileSpec, ResultSpec
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess, container_state, docker
from boincd_containers.testing.names import unique

pytestmark = [
    pytest.mark.boinc,
    pytest.mark.docker,
]

JOB = (
    f'image = "{TEST_IMAGE}"\n'
    "command = ['sh', '-c', "
    "'while [ ! -e /app/release ]; do sleep 0.2; done; echo released > out.txt']\n"
).encode()


@pytest.fixture
def client_factory(
    short_tmp: Path, daemon: DaemonProcess, boinc_client: ClientBinaries
) -> Iterator[tuple[list[BoincClient], ClientBinaries]]:
    clients: list[BoincClient] = []
    try:
        yield clients, boinc_client
    finally:
        for client in clients:
            client.close()


def start_client(
    base: Path,
    daemon: DaemonProcess,
    result: str,
    factory: tuple[list[BoincClient], ClientBinaries],
    **env: str,
) -> BoincClient:
    clients, binaries = factory
    pyz = build_pyz(base / "shim.pyz", sys.executable)
    client = BoincClient(
        base / "boinc",
        pyz,
        results=[ResultSpec(result)],
        app_files=[FileSpec("job.toml", JOB)],
        env={**os.environ, "BOINCD_SOCKET": daemon.socket, **env},
        binaries=binaries,
    )
    clients.append(client)
    client.start()
    return client


def running_container(client: BoincClient, result: str) -> str:
    def probe() -> str | None:
        ids = docker("ps", "-q", "--no-trunc", "--filter", f"label={L.RESULT}={result}").split()
        return ids[0] if ids and container_state(ids[0])["State"]["Running"] else None

    found: str = client.wait_for(probe, 60, "container running")
    return found


def test_daemon_killed_mid_task_then_back_the_task_completes(
    short_tmp: Path, daemon: DaemonProcess, client_factory: tuple[list[BoincClient], ClientBinaries]
) -> None:
    result = unique("resil")
    client = start_client(short_tmp, daemon, result, client_factory)
    cid = running_container(client, result)
    daemon.stop(signal.SIGKILL)
    # The container does not depend on the daemon.
    assert container_state(cid)["State"]["Running"] is True
    slot = client.slot_dir(result)
    assert slot is not None
    client.wait_for(
        lambda: "waiting for the daemon" in (slot / "stderr.txt").read_text(),
        30,
        "the shim notices the daemon is gone",
    )
    (slot / "release").touch()
    daemon.start()
    task = client.wait_done(result, timeout=90)
    assert (task.state, task.exit_status) == ("uploading", 0)
    assert client.output_path(result).read_text() == "released\n"
    record = client.wait_final_record(result)
    assert "waiting for the daemon" in record.stderr_out
    assert "the daemon is back" in record.stderr_out


def test_daemon_gone_too_long_means_a_temporary_exit(
    short_tmp: Path, daemon: DaemonProcess, client_factory: tuple[list[BoincClient], ClientBinaries]
) -> None:
    result = unique("resil")
    client = start_client(short_tmp, daemon, result, client_factory, BOINCD_SHIM_UNREACHABLE_S="3")
    cid = running_container(client, result)
    daemon.stop(signal.SIGKILL)
    client.wait_for(
        lambda: any("postponed" in m.body and result in m.body for m in client.messages()),
        60,
        "the client postpones the task after the shim's temporary exit",
    )
    messages = [m.body for m in client.messages() if "postponed" in m.body]
    assert any("unreachable" in m for m in messages), messages
    # Nothing was lost: the container is still there for the next attempt.
    assert container_state(cid)["State"]["Running"] is True
