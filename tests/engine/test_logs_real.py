"""A task's output on the real engines: its log files bounded on disk, counted in
its disk bound, and read back capped without the daemon holding the log.

On old code: a task's log grew without limit (json-file, no max-size, and on
Podman k8s-file with no log-size-max), a task flooding its output past its
disk bound was never stopped, and `GET /logs?tail=-1` read the whole log into
the daemon's memory.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.core import labels as L
from boincd_containers.engine.streams import LOG_BYTES_MAX
from boincd_containers.job.spec import LOG_FILE_MAX_BYTES, LOG_FILES
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess
from boincd_containers.testing.podman import ENGINES, TestEngine

pytestmark = [pytest.mark.docker, pytest.mark.parametrize("engine", ENGINES, indirect=True)]

MiB = 1 << 20
PROJECT = "test.example.org_proj"
# One log line of the engine past the rotation point, and the JSON or k8s-file
# framing of what is written: what a log may hold beyond its size options.
SLACK = 64 * 1024


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def write_mb(megabytes: int) -> str:
    """Shell that writes `megabytes` MB of output in whole lines of 1000 bytes."""
    line = "$(head -c 999 /dev/zero | tr '\\0' a)"
    return f'yes "{line}" | head -c {megabytes * 1_000_000}'


def start_task(daemon: DaemonProcess, base: Path, result: str, script: str, **extra: Any) -> Any:
    slot = base / result
    slot.mkdir()
    body = {
        "result": result,
        "project": PROJECT,
        "slot_dir": str(slot),
        "image": TEST_IMAGE,
        "command": ["sh", "-c", script],
        "memory_bytes": 256 * MiB,
        **extra,
    }
    daemon.request("POST", "/v1/tasks", body)
    daemon.wait_task(result, {"created"})
    task = daemon.request("POST", f"/v1/tasks/{result}/start")
    assert task["state"] == "running", task
    return task


def log_files_bytes(engine: TestEngine, container_id: str) -> int:
    """What the engine keeps of the container's output on disk: its LogPath and
    the rotated files beside it."""
    path = Path(engine.inspect(container_id)["LogPath"])
    return sum(
        p.stat().st_size
        for p in path.parent.iterdir()
        if p.name == path.name or p.name.startswith(path.name + ".")
    )


def ceiling(file_bytes: int) -> int:
    """The most a log may hold with files of `file_bytes`, on either engine
    (Podman: one file of LOG_FILES times that)."""
    return file_bytes * LOG_FILES + SLACK


def test_a_task_writing_far_more_output_than_its_log_files_keeps_them_bounded(
    daemon: DaemonProcess, engine: TestEngine, short_tmp: Path
) -> None:
    # A bound the log cannot reach: output rotates within its files, the task runs on.
    script = f"{write_mb(100)}; echo END; touch /app/wrote; sleep 300"
    task = start_task(daemon, short_tmp, "chatty_0", script, disk_bytes=1000 * MiB)
    wait_for("100 MB written", lambda: (short_tmp / "chatty_0" / "wrote").exists())
    assert log_files_bytes(engine, task["container_id"]) <= ceiling(LOG_FILE_MAX_BYTES)
    # The end of the output is still there for the shim, through its own client.
    # (`tail` counts the engine's log entries: a line it read in two pieces is
    # two of them, and Podman misplaces the newline of such a line.)
    text = daemon.request("GET", "/v1/tasks/chatty_0/logs?tail=10")
    assert text.endswith("a\nEND\n")
    assert set(text.removesuffix("END\n")) == {"a", "\n"}
    measured = wait_for(
        "the log measured",
        lambda: (t := daemon.request("GET", "/v1/tasks/chatty_0"))["log_bytes"] and t,
    )
    assert 0 < measured["log_bytes"] <= ceiling(LOG_FILE_MAX_BYTES)
    assert measured["state"] == "running"
    assert measured["limit_exceeded"] is None


def test_a_task_whose_output_passes_its_disk_bound_is_stopped(
    daemon: DaemonProcess, engine: TestEngine, short_tmp: Path
) -> None:
    bound = 8 * MiB  # log files of 4 MiB: the log alone can pass the bound
    # 10 MB: past the bound, within the log's ceiling (12 MiB) on both engines, so
    # what is on disk at the next pass is past the bound whenever it comes.
    # (A flood goes on rotating: on Podman its one file empties when full.)
    script = f"{write_mb(10)}; touch /app/wrote; sleep 300"
    task = start_task(daemon, short_tmp, "flood_0", script, disk_bytes=bound)
    stopped = wait_for(
        "the task stopped",
        lambda: (t := daemon.request("GET", "/v1/tasks/flood_0"))["state"] == "exited" and t,
    )
    assert (short_tmp / "flood_0" / "wrote").exists()
    limit = stopped["limit_exceeded"]
    assert limit["kind"] == "disk", stopped
    assert limit["bound_bytes"] == bound
    assert limit["log_bytes"] > bound - limit["slot_bytes"] - limit["writable_bytes"]
    assert limit["message"] == f"disk limit exceeded: {limit['used_bytes']} bytes of {bound}"
    assert stopped["interrupted"] is False  # a limit, never to be started again
    assert log_files_bytes(engine, task["container_id"]) <= ceiling(bound // 2)


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_huge_log_is_served_capped_without_the_daemon_holding_it(
    daemon: DaemonProcess, engine: TestEngine, short_tmp: Path
) -> None:
    # A container made before log files were bounded (an older daemon's): its
    # 100 MB log is adopted with it by its labels.
    result = "legacy_0"
    slot = short_tmp / result
    slot.mkdir()
    driver = "json-file" if engine.kind == "docker" else "k8s-file"
    labels = {
        L.OWNER: daemon.instance_id,
        L.PROJECT: PROJECT,
        L.RESULT: result,
        L.SLOT: str(slot),
    }
    label_args = [a for k, v in labels.items() for a in ("--label", f"{k}={v}")]
    cid = engine.cli(
        "run", "-d", "--name", L.container_name(PROJECT, result), "--log-driver", driver,
        *label_args, "--network", "none", TEST_IMAGE,
        "sh", "-c", f"{write_mb(100)}; echo END-OF-LOG; touch /tmp/done; sleep 300",
    )  # fmt: skip
    try:
        wait_for(
            "the 100 MB log written",
            lambda: engine.cli("exec", cid, "ls", "/tmp/done", check=False) == "/tmp/done",
            timeout=170,
        )
        assert log_files_bytes(engine, cid) >= 100_000_000
        task = wait_for(
            "the container adopted",
            lambda: daemon.request("GET", "/v1/tasks")["tasks"],
        )[0]
        assert task["container_id"] == cid
        pid = daemon.proc.pid if daemon.proc is not None else 0
        daemon.request("GET", f"/v1/tasks/{result}/logs?tail=10")  # the code paths warm
        before = vm_hwm(pid)

        bodies: list[str] = []

        def read(tail: str) -> None:
            bodies.append(daemon.request("GET", f"/v1/tasks/{result}/logs?tail={tail}"))

        readers = [threading.Thread(target=read, args=(t,)) for t in ("-1", "all", "-1")]
        for thread in readers:
            thread.start()
        for thread in readers:
            thread.join(120)
        read("100000000")
        grown = vm_hwm(pid) - before
    finally:
        engine.force_remove(cid)
    assert len(bodies) == 4
    for body in bodies:
        marker, _, rest = body.partition("\n")
        assert marker.startswith("[... "), marker
        assert len(rest.encode()) <= LOG_BYTES_MAX
        # The log's end, whole lines of it (Podman's own answer misplaces a newline
        # where its k8s-file split a line: the bytes are what it sent).
        assert rest.endswith("a\nEND-OF-LOG\n")
        assert set(rest.removesuffix("END-OF-LOG\n")) == {"a", "\n"}
    # Three at once and one more read a log 100 times the cap: the daemon's peak
    # memory grows by a few caps (the old code held the whole log, several times).
    print(f"daemon VmHWM before {before} after {before + grown} grown {grown}")
    assert grown < 16 * LOG_BYTES_MAX, f"VmHWM grew {grown} bytes"
    assert os.path.exists(f"/proc/{pid}")
