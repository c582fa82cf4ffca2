"""The BOINC harness against the real client, with plain scripts as apps (no
containers): what the shim's end-to-end tests rely on."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from boincd_containers.testing.boinc import (
    EXIT_ABORTED_VIA_GUI,
    RESULT_COMPUTE_ERROR,
    RESULT_FILES_UPLOADING,
    BoincClient,
    ClientBinaries,
    FileSpec,
    ResultSpec,
)

# Under each client release (the `boinc_client` fixture): what the shim's tests
# rely on must hold for both.
pytestmark = [pytest.mark.boinc]

# A minimal BOINC app: what boinc_finish(status) leaves behind, without the
# API library. The workunit's command line gives the exit status.
FINISHING_APP = """#!/bin/sh
status="${1:-0}"
echo "app started in $(pwd) with status $status" >&2
tr a-z A-Z < in.txt > out.txt
printf '%s\\n' "$status" > boinc_finish_called
exit "$status"
"""

# Runs until the test creates "release" in the slot, so that a test can act
# on a running task.
WAITING_APP = """#!/bin/sh
while [ ! -e release ]; do sleep 0.1; done
echo released > out.txt
echo 0 > boinc_finish_called
"""

# Logs each heartbeat the client writes into the shared memory: channel 4 of
# boinc_mmap_file (lib/app_ipc.h: 1024-byte channels, flag byte, then text).
HEARTBEAT_APP = """#!{python}
import mmap, os, time
HEARTBEAT = 4 * 1024
with open("boinc_mmap_file", "r+b") as f:
    shm = mmap.mmap(f.fileno(), 0)
with open("heartbeats.log", "a") as log:
    while not os.path.exists("release"):
        if shm[HEARTBEAT]:
            msg = shm[HEARTBEAT + 1:HEARTBEAT + 1024].split(b"\\0", 1)[0]
            shm[HEARTBEAT] = 0
            suspended = b"<network_suspended/>" in msg
            log.write("suspended\\n" if suspended else "available\\n")
            log.flush()
        time.sleep(0.05)
with open("out.txt", "w") as out:
    out.write("done\\n")
with open("boinc_finish_called", "w") as fin:
    fin.write("0\\n")
"""


@pytest.fixture
def make_client(
    tmp_path: Path, boinc_client: ClientBinaries
) -> Iterator[Callable[..., BoincClient]]:
    """Build started clients from an app script's text; all are closed (and
    their apps killed) at teardown, even when the test fails."""
    clients: list[BoincClient] = []

    def make(app_text: str, **kwargs: object) -> BoincClient:
        n = len(clients)
        app = tmp_path / f"app{n}.sh"
        app.write_text(app_text)
        client = BoincClient(
            tmp_path / f"boinc{n}",
            app,
            binaries=boinc_client,
            **kwargs,  # type: ignore[arg-type]
        )
        clients.append(client)
        client.start()
        return client

    try:
        yield make
    finally:
        for client in clients:
            client.close()
            assert client.slot_processes() == [], "an app outlived close()"


def _running(client: BoincClient, result: str) -> Path:
    client.wait_for_task(result, lambda t: t.active_task_state == "EXECUTING", 60, "task executing")
    slot = client.slot_dir(result)
    assert slot is not None
    return slot


def test_app_success_is_reported_and_output_copied(
    make_client: Callable[..., BoincClient],
) -> None:
    spec = ResultSpec("ok_1", inputs=[FileSpec("in.txt", b"science\n")], command_line="0")
    client = make_client(FINISHING_APP, results=[spec])

    task = client.wait_done("ok_1")

    assert task.state == "uploading"  # success; nothing can upload here
    assert task.exit_status == 0
    assert client.output_path("ok_1").read_text() == "SCIENCE\n"
    record = client.wait_final_record("ok_1")
    assert record.state == RESULT_FILES_UPLOADING
    assert record.exit_status == 0
    assert "<stderr_txt>\napp started in " in record.stderr_out
    assert "/slots/" in record.stderr_out
    assert "<message>" not in record.stderr_out


def test_app_failure_status_is_reported(make_client: Callable[..., BoincClient]) -> None:
    spec = ResultSpec("fail_1", inputs=[FileSpec("in.txt", b"x\n")], command_line="7")
    client = make_client(FINISHING_APP, results=[spec])

    task = client.wait_done("fail_1")

    assert task.state == "compute error"
    assert task.exit_status == 7
    record = client.wait_final_record("fail_1")
    assert record.state == RESULT_COMPUTE_ERROR
    assert record.exit_status == 7
    assert record.ready_to_report
    assert "process exited with code 7" in record.stderr_out
    assert "app started in " in record.stderr_out


def test_suspend_resume_and_abort_via_boinccmd(
    make_client: Callable[..., BoincClient],
) -> None:
    client = make_client(WAITING_APP, results=[ResultSpec("wait_1"), ResultSpec("wait_2")])
    slot = _running(client, "wait_1")
    _running(client, "wait_2")
    assert (slot / "init_data.xml").read_text().count("<result_name>wait_1</result_name>") == 1

    client.suspend("wait_1")
    task = client.wait_for_task(
        "wait_1", lambda t: t.active_task_state == "SUSPENDED", 30, "suspended"
    )
    assert task.suspended_via_gui
    assert task.scheduler_state == "preempted"

    client.resume("wait_1")
    client.wait_for_task("wait_1", lambda t: t.active_task_state == "EXECUTING", 30, "resumed")

    client.abort("wait_2")
    aborted = client.wait_done("wait_2")
    assert aborted.state == "aborted"
    assert aborted.exit_status == EXIT_ABORTED_VIA_GUI

    (slot / "release").touch()
    done = client.wait_done("wait_1")
    assert (done.state, done.exit_status) == ("uploading", 0)
    assert client.output_path("wait_1").read_text() == "released\n"


def _heartbeats(slot: Path) -> list[str]:
    try:
        return (slot / "heartbeats.log").read_text().split()
    except FileNotFoundError:
        return []


def test_network_switch_reaches_heartbeat_without_unsigned_apps_ok(
    make_client: Callable[..., BoincClient],
) -> None:
    client = make_client(HEARTBEAT_APP.format(python=sys.executable), unsigned_apps_ok=False)
    slot = _running(client, "result_1")
    client.wait_for(lambda: "available" in _heartbeats(slot), 30, "a plain heartbeat")
    assert not client.network_suspended()

    client.set_network_mode("never")
    seen = len(_heartbeats(slot))
    client.wait_for(
        lambda: "suspended" in _heartbeats(slot)[seen:], 30, "<network_suspended/> heartbeat"
    )
    assert client.network_suspended()

    client.set_network_mode("always")
    seen = len(_heartbeats(slot))
    client.wait_for(lambda: "available" in _heartbeats(slot)[seen:], 30, "a plain heartbeat")

    (slot / "release").touch()
    assert client.wait_done("result_1").exit_status == 0


def test_unsigned_apps_ok_suspends_network_for_good(
    make_client: Callable[..., BoincClient],
) -> None:
    client = make_client(HEARTBEAT_APP.format(python=sys.executable), unsigned_apps_ok=True)
    slot = _running(client, "result_1")
    client.set_network_mode("always")
    seen = len(_heartbeats(slot))
    client.wait_for(lambda: len(_heartbeats(slot)) >= seen + 3, 30, "three more heartbeats")

    assert set(_heartbeats(slot)) == {"suspended"}
    assert client.network_suspended()
