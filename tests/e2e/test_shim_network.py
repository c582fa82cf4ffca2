"""Pulls respect BOINC's network switch: while the client has network activity
suspended, a task whose image must be pulled waits and says so; it runs once
the network is back. Real client (without --unsigned_apps_ok, which would
suspend the network for good), real daemon, real dockerd, local registry."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincd_containers.shim.pyz import build_pyz
from boincd_containers.testing.boinc import BoincClient, ClientBinaries, FileSpec, ResultSpec
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess, docker
from boincd_containers.testing.local_registry import LocalRegistry, local_registry, push_image
from boincd_containers.testing.names import unique

pytestmark = [
    pytest.mark.boinc,
    pytest.mark.docker,
]


@pytest.fixture
def registry(short_tmp: Path) -> Iterator[LocalRegistry]:
    (short_tmp / "registry").mkdir()
    with local_registry(short_tmp / "registry") as reg:
        yield reg


def test_pull_waits_while_the_client_suspends_network(
    short_tmp: Path, daemon: DaemonProcess, registry: LocalRegistry, boinc_client: ClientBinaries
) -> None:
    result = unique("netwait")
    repo = f"boincd-e2e/netwait-{uuid.uuid4().hex[:8]}"
    remote = push_image(registry, TEST_IMAGE, repo, "1")
    job = (f'image = "{remote}"\ncommand = ["sh", "-c", "echo pulled > out.txt"]\n').encode()
    client = BoincClient(
        short_tmp / "boinc",
        build_pyz(short_tmp / "shim.pyz", sys.executable),
        results=[ResultSpec(result)],
        app_files=[FileSpec("job.toml", job)],
        env={**os.environ, "BOINCD_SOCKET": daemon.socket},
        unsigned_apps_ok=False,
        binaries=boinc_client,
    )
    # Network off from the first moment, as a volunteer on a metered link has it
    # (client_state.xml's user_network_request; 3 = RUN_MODE_NEVER).
    state = client.client_state_path.read_text()
    client.client_state_path.write_text(
        state.replace(
            "<client_state>", "<client_state>\n<user_network_request>3</user_network_request>", 1
        )
    )
    try:
        client.start()
        assert client.network_suspended()
        slot = client.wait_for(lambda: client.slot_dir(result), 60, "task started")

        def stderr() -> str:
            path = slot / "stderr.txt"
            return path.read_text() if path.exists() else ""

        client.wait_for(lambda: "network" in stderr() and "waits" in stderr(), 60, "wait message")
        status = daemon.request("GET", f"/v1/tasks/{result}")
        assert status["state"] == "waiting"
        assert status["error"]["code"] == "network_suspended"
        assert registry.pulls(repo) == 0

        client.set_network_mode("always")
        task = client.wait_done(result, timeout=90)
        assert (task.state, task.exit_status) == ("uploading", 0)
        assert client.output_path(result).read_text() == "pulled\n"
        assert registry.pulls(repo) == 1
    finally:
        client.close()
        docker("rmi", "-f", remote, check=False)
