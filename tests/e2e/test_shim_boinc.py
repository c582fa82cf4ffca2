"""boincd-shim under the real BOINC client, with the real daemon, on Docker and on
rootful Podman."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.core import labels as L
from boincd_containers.shim.pyz import build_pyz
from boincd_containers.testing.boinc import (
    EXIT_ABORTED_VIA_GUI,
    RESULT_COMPUTE_ERROR,
    RESULT_FILES_UPLOADING,
    BoincClient,
    ClientBinaries,
    FileSpec,
    ResultSpec,
    start_shim_client,
)
from boincd_containers.testing.clients import ENGINE_CLIENT_MATRIX
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess
from boincd_containers.testing.names import unique
from boincd_containers.testing.podman import TestEngine

pytestmark = [
    pytest.mark.boinc,
    pytest.mark.docker,
    pytest.mark.parametrize(("engine", "boinc_client"), ENGINE_CLIENT_MATRIX, indirect=True),
]


@pytest.fixture(scope="module")
def shim_pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shim as a project would ship it: one .pyz as the app's main program."""
    return build_pyz(tmp_path_factory.mktemp("pyz") / "boincd-shim.pyz", sys.executable)


def job_toml(command: str, **extra: str) -> bytes:
    lines = [f'image = "{TEST_IMAGE}"', f"command = ['sh', '-c', {command!r}]"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def make_client(
    short_tmp: Path, daemon: DaemonProcess, shim_pyz: Path, boinc_client: ClientBinaries
) -> Iterator[Callable[..., BoincClient]]:
    clients: list[BoincClient] = []

    def make(job: bytes, results: list[ResultSpec], **kwargs: Any) -> BoincClient:
        return start_shim_client(
            clients, short_tmp, shim_pyz, daemon.socket, boinc_client, job, results, **kwargs
        )

    try:
        yield make
    finally:
        for client in clients:
            client.close()


def containers_of(engine: TestEngine, result: str) -> list[str]:
    return engine.cli("ps", "-aq", "--no-trunc", "--filter", f"label={L.RESULT}={result}").split()


def wait_container(
    client: BoincClient,
    engine: TestEngine,
    result: str,
    what: str,
    check: Callable[[dict[str, Any]], bool],
) -> str:
    def probe() -> str | None:
        ids = containers_of(engine, result)
        return ids[0] if len(ids) == 1 and check(engine.inspect(ids[0])["State"]) else None

    found: str = client.wait_for(probe, 60, what)
    return found


def test_task_computes_reports_cpu_and_fraction_and_succeeds(
    make_client: Callable[..., BoincClient], engine: TestEngine
) -> None:
    result = unique("burn")
    # Burn CPU for a few seconds with fraction done at 0.25, then write the output.
    command = (
        "echo 0.25 > fraction_done; end=$(($(date +%s)+6)); "
        "while [ $(date +%s) -lt $end ]; do :; done; "
        "tr a-z A-Z < in.txt > out.txt; echo 1 > fraction_done"
    )
    spec = ResultSpec(result, inputs=[FileSpec("in.txt", b"science\n")])
    # BOINC's default: suspend when non-BOINC CPU load is above 25 %. The
    # container's load must count as the task's own (other_pid).
    client = make_client(job_toml(command), [spec], prefs={"suspend_cpu_usage": 25})
    running = client.wait_for_task(
        result,
        lambda t: (t.fraction_done or 0) >= 0.25 and (t.current_cpu_time or 0) > 1.0,
        60,
        "fraction done and CPU time reported",
    )
    assert running.fraction_done == pytest.approx(0.25)
    task = client.wait_done(result, timeout=90)
    assert (task.state, task.exit_status) == ("uploading", 0)
    assert client.output_path(result).read_text() == "SCIENCE\n"
    record = client.wait_final_record(result)
    assert record.state == RESULT_FILES_UPLOADING
    assert (task.final_cpu_time or 0) > 2.0
    busy = [m for m in client.messages() if "CPU is busy" in m.body]
    assert busy == [], "the container's own load made the client suspend it"
    client.wait_for(lambda: containers_of(engine, result) == [], 30, "container removed")


def test_nonzero_exit_fails_the_task_with_that_status(
    make_client: Callable[..., BoincClient], engine: TestEngine
) -> None:
    result = unique("fail")
    client = make_client(job_toml("echo 'the app says why' >&2; exit 7"), [ResultSpec(result)])
    task = client.wait_done(result, timeout=90)
    assert task.state == "compute error"
    assert task.exit_status == 7
    record = client.wait_final_record(result)
    assert record.state == RESULT_COMPUTE_ERROR
    assert "the app says why" in record.stderr_out
    assert "container exited with status 7" in record.stderr_out


def test_bad_job_file_fails_clearly(
    make_client: Callable[..., BoincClient], engine: TestEngine
) -> None:
    result = unique("badjob")
    client = make_client(b"image = 42\nbogus = true\n", [ResultSpec(result)])
    task = client.wait_done(result, timeout=60)
    assert task.state == "compute error"
    record = client.wait_final_record(result)
    assert "job.toml" in record.stderr_out
    assert "Traceback" not in record.stderr_out
    assert containers_of(engine, result) == []


WAIT_FOR_RELEASE = "while [ ! -e /app/release ]; do sleep 0.2; done; echo released > out.txt"


def test_suspend_resume_quit_and_reattach(
    make_client: Callable[..., BoincClient], engine: TestEngine
) -> None:
    result = unique("wait")
    client = make_client(job_toml(WAIT_FOR_RELEASE), [ResultSpec(result)])
    cid = wait_container(client, engine, result, "container running", lambda s: s["Running"])

    client.suspend(result)
    wait_container(client, engine, result, "container paused", lambda s: s["Paused"])
    client.resume(result)
    wait_container(client, engine, result, "container unpaused", lambda s: not s["Paused"])

    # Client stops (<quit/> to the shim): the container stays, paused, not killed.
    client.stop()
    state = engine.inspect(cid)["State"]
    assert state["Paused"] is True
    assert state["Running"] is True

    # Client restarts: the new shim attaches to the same container and resumes it.
    client.start()
    again = wait_container(
        client, engine, result, "same container resumed", lambda s: not s["Paused"]
    )
    assert again == cid
    slot = client.slot_dir(result)
    assert slot is not None
    (slot / "release").touch()
    task = client.wait_done(result, timeout=60)
    assert (task.state, task.exit_status) == ("uploading", 0)
    assert client.output_path(result).read_text() == "released\n"


def test_abort_removes_the_container(
    make_client: Callable[..., BoincClient], engine: TestEngine
) -> None:
    result = unique("abort")
    client = make_client(job_toml(WAIT_FOR_RELEASE), [ResultSpec(result)])
    wait_container(client, engine, result, "container running", lambda s: s["Running"])
    client.abort(result)
    task = client.wait_done(result)
    assert task.state == "aborted"
    assert task.exit_status == EXIT_ABORTED_VIA_GUI
    client.wait_for(lambda: containers_of(engine, result) == [], 30, "container removed")


def test_client_killed_then_restarted_attaches_to_the_running_container(
    make_client: Callable[..., BoincClient], engine: TestEngine
) -> None:
    result = unique("crash")
    client = make_client(job_toml(WAIT_FOR_RELEASE), [ResultSpec(result)])
    cid = wait_container(client, engine, result, "container running", lambda s: s["Running"])
    client.kill()
    client.start()
    slot = client.slot_dir(result)
    client.wait_for(lambda: client.slot_dir(result) is not None, 30, "task restarted")
    assert containers_of(engine, result) == [cid]
    slot = client.slot_dir(result)
    assert slot is not None
    (slot / "release").touch()
    task = client.wait_done(result, timeout=60)
    assert (task.state, task.exit_status) == ("uploading", 0)
