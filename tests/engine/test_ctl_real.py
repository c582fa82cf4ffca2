"""`boincd-containers ctl` against the real daemon on the real dockerd: tables on a
terminal, one JSON object with `--json`, clear exits when the daemon cannot be
reached; `/metrics` of the same daemon; `ctl doctor --json` on this host."""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.cli.ctl import EXIT_NO_PERMISSION, EXIT_NOT_RUNNING
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess, docker
from boincd_containers.testing.names import RUN_ID
from tests.unit.test_metrics import parse_exposition, value_of

pytestmark = pytest.mark.docker

PROJECT = f"test.example.org_ctl_{RUN_ID}"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Done:
    rc: int
    out: str
    err: str


def ctl(socket_path: str, *args: str, tty: bool = False, timeout: float = 60) -> Done:
    """Run `boincd-containers ctl ARGS`; with tty=True its stdout is a pseudo-terminal,
    so ctl sees a person at a terminal (isatty) exactly as in real use."""
    cmd = [sys.executable, "-m", "boincd_containers", "ctl", *args]
    env = {**os.environ, "BOINCD_SOCKET": socket_path}
    if not tty:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        return Done(done.returncode, done.stdout, done.stderr)
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE
        )
        os.close(follower)
        follower = -1
        chunks: list[bytes] = []
        deadline = time.monotonic() + timeout
        # Read while it runs: a full pty buffer would block ctl forever.
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the terminal's last writer closed it
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
        err = proc.stderr.read().decode() if proc.stderr else ""
        rc = proc.wait(timeout)
        if proc.stderr:
            proc.stderr.close()
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    # The terminal turns each \n into \r\n.
    return Done(rc, b"".join(chunks).decode().replace("\r\n", "\n"), err)


def one_json_object(text: str) -> dict[str, Any]:
    """json.loads refuses anything after the object: exactly one, nothing else."""
    data = json.loads(text)
    assert isinstance(data, dict), text[:200]
    return data


def wait_for(daemon: DaemonProcess, result: str, states: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    task: dict[str, Any] = {}
    while time.monotonic() < deadline:
        task = daemon.request("GET", f"/v1/tasks/{result}")
        if task["state"] in states:
            return task
        time.sleep(0.1)
    raise AssertionError(f"{result} stayed {task.get('state')}\n{daemon.log()}")


@pytest.fixture
def busy(daemon: DaemonProcess, short_tmp: Path) -> DaemonProcess:
    """The real daemon with one running and one created task; its samples taken."""
    for result in ("ctl_run_0", "ctl_new_0"):
        slot = short_tmp / result
        slot.mkdir()
        daemon.request(
            "POST",
            "/v1/tasks",
            {
                "result": result,
                "project": PROJECT,
                "slot_dir": str(slot),
                "image": TEST_IMAGE,
                "command": ["sh", "-c", "sleep 300"],
                "memory_bytes": 64 * 2**20,
            },
        )
        wait_for(daemon, result, {"created"})
    daemon.request("POST", "/v1/tasks/ctl_run_0/start")
    deadline = time.monotonic() + 30
    while daemon.request("GET", "/v1/tasks/ctl_run_0").get("memory_bytes", 0) <= 0:
        assert time.monotonic() < deadline, "the monitor never sampled the running task"
        time.sleep(0.1)
    return daemon


def engine_version() -> str:
    return docker("version", "--format", "{{.Server.Version}}")


def busybox_id() -> str:
    # Other tests may tag the same image under other names: match by id.
    return docker("image", "inspect", "-f", "{{.Id}}", TEST_IMAGE)


# -- on a terminal ---------------------------------------------------------------------


def test_status_on_a_terminal_is_tables_with_human_sizes(busy: DaemonProcess) -> None:
    done = ctl(busy.socket, "status", tty=True)
    assert done.rc == 0, done.err
    out = done.out
    assert f"engine   docker {engine_version()}, rootful" in out
    header = next(line for line in out.splitlines() if line.startswith("PROJECT  "))
    for column in ("RESULT", "STATE", "CPU", "MEMORY", "GPU", "CONTAINER"):
        assert column in header
    running = next(line for line in out.splitlines() if "ctl_run_0" in line)
    assert PROJECT in running
    assert "running" in running
    assert "MiB" in running or "KiB" in running  # memory in human units, not raw bytes
    assert "created" in next(line for line in out.splitlines() if "ctl_new_0" in line)
    # Image disk and volumes (the inventory feature's part of status).
    assert "images   " in out
    assert "on disk" in out
    assert "volumes  " in out
    assert "GPUs     none found" in out
    assert "{" not in out  # not JSON
    assert done.err == ""


def test_tasks_images_gpus_on_a_terminal(busy: DaemonProcess) -> None:
    tasks = ctl(busy.socket, "tasks", tty=True)
    assert tasks.rc == 0, tasks.err
    assert "ctl_run_0" in tasks.out
    assert "ctl_new_0" in tasks.out
    assert tasks.out.splitlines()[0].startswith("PROJECT")

    images = ctl(busy.socket, "images", tty=True)
    assert images.rc == 0, images.err
    assert "on disk" in images.out
    row = next(
        line
        for line in images.out.splitlines()
        if busybox_id().removeprefix("sha256:")[:12] in line
    )
    assert PROJECT in row
    assert "yes" in row  # in use by the tasks
    assert images.out.splitlines()[1].startswith("IMAGE")

    gpus = ctl(busy.socket, "gpus", tty=True)
    assert gpus.rc == 0, gpus.err
    assert "GPUs     none found" in gpus.out


# -- as JSON ---------------------------------------------------------------------------


def test_status_json_has_the_fields_the_contract_names(busy: DaemonProcess) -> None:
    for tty in (False, True):
        done = ctl(busy.socket, "status", "--json", tty=tty)
        assert done.rc == 0, done.err
        status = one_json_object(done.out)
        assert status["engine"]["kind"] == "docker"
        assert status["engine"]["version"] == engine_version()
        tasks = {t["result"]: t for t in status["tasks"]}
        assert set(tasks) == {"ctl_run_0", "ctl_new_0"}
        for task in tasks.values():
            for key in ("result", "project", "container_id", "state", "cpu_time_s"):
                assert key in task, key
            assert isinstance(task["memory_bytes"], int)
            assert task["gpus"] == []
            assert task["project"] == PROJECT
        running = tasks["ctl_run_0"]
        assert running["state"] == "running"
        assert running["memory_bytes"] > 0
        assert (
            docker("inspect", "-f", "{{.Id}}", running["container_id"]) == running["container_id"]
        )
        images = status["images"]
        assert images["count"] >= 1
        assert images["total_bytes"] > 0
        mine = next(i for i in images["items"] if i["id"] == busybox_id())
        assert TEST_IMAGE in mine.get("refs", [mine["ref"]])
        for key in ("id", "size_bytes", "unique_bytes", "shared_bytes", "projects", "pinned"):
            assert key in mine, key
        assert mine["pinned"] is True  # live tasks use it
        assert mine["size_bytes"] == mine["unique_bytes"] + mine["shared_bytes"]
        assert isinstance(status["volumes"]["total_bytes"], int)
        assert isinstance(status["volumes"]["count"], int)


def test_tasks_images_gpus_json(busy: DaemonProcess) -> None:
    tasks = one_json_object(ctl(busy.socket, "tasks", "--json").out)
    assert {t["result"] for t in tasks["tasks"]} == {"ctl_run_0", "ctl_new_0"}
    images = one_json_object(ctl(busy.socket, "images", "--json").out)
    assert busybox_id() in {i["id"] for i in images["items"]}
    assert images["total_bytes"] > 0
    gpus = one_json_object(ctl(busy.socket, "gpus", "--json").out)
    assert gpus["devices"] == []
    assert gpus["shares"] == []


# -- /metrics of the same daemon ----------------------------------------------------------


def test_metrics_of_the_real_daemon(busy: DaemonProcess) -> None:
    text = busy.request("GET", "/metrics")
    samples, types = parse_exposition(text)
    assert value_of(samples, "boincd_engine_up") == 1
    assert value_of(samples, "boincd_tasks", state="running") == 1
    assert value_of(samples, "boincd_tasks", state="created") == 1
    labels = {"result": "ctl_run_0", "project": PROJECT}
    assert value_of(samples, "boincd_task_memory_bytes", **labels) > 0
    assert value_of(samples, "boincd_task_cpu_seconds_total", **labels) >= 0
    assert types["boincd_task_cpu_seconds_total"] == "counter"
    status = busy.request("GET", "/v1/status")
    assert value_of(samples, "boincd_images_bytes") == status["images"]["total_bytes"]


# -- when the daemon cannot be reached ---------------------------------------------------------


def test_no_daemon_is_a_clear_message_and_exit_3(short_tmp: Path) -> None:
    missing = str(short_tmp / "nothing.sock")
    for args in (("status",), ("status", "--json"), ("gpus", "--json")):
        done = ctl(missing, *args)
        assert done.rc == EXIT_NOT_RUNNING, done
        if "--json" in args:  # scripts still get one JSON object, saying why
            assert json.loads(done.out)["error"]["code"] == "not_running"
        else:
            assert done.out == ""
        assert "the daemon is not running" in done.err
        assert missing in done.err
        assert "Traceback" not in done.err
    # A socket file left by a daemon that died: nobody listens.
    stale = short_tmp / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))
    sock.close()
    done = ctl(str(stale), "status")
    assert done.rc == EXIT_NOT_RUNNING, done
    assert "not running" in done.err


def test_socket_not_permitted_is_exit_4(daemon: DaemonProcess) -> None:
    """As `nobody` (not in the socket's group): EACCES, a hint, exit 4. ctl is
    standard library only, so Debian's own python3 runs it without the venv."""
    assert os.stat(daemon.socket).st_mode & 0o777 == 0o660
    done = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
            "-m",
            "boincd_containers",
            "ctl",
            "status",
            "--json",
        ],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "BOINCD_SOCKET": daemon.socket},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_NO_PERMISSION, done
    assert json.loads(done.stdout)["error"]["code"] == "permission_denied"
    assert "no permission to use the daemon socket" in done.stderr
    assert "root" in done.stderr  # what to do about it
    assert "Traceback" not in done.stderr


# -- doctor on this host -------------------------------------------------------------------------


def test_doctor_json_on_this_host(daemon: DaemonProcess) -> None:
    done = ctl(daemon.socket, "doctor", "--json")
    report = one_json_object(done.out)
    findings = {f["id"]: f for f in report["findings"]}
    for finding in findings.values():
        assert finding["severity"] in ("ok", "info", "warning", "error"), finding
        assert finding["title"]
        if finding["severity"] == "error":
            assert finding["fix"], finding  # every blocker says what to do
    # The daemon is asked first, and the engine facts are its own.
    assert findings["daemon.reachable"]["severity"] == "ok"
    assert report["daemon"]["socket"] == daemon.socket
    engine = findings["engine.reachable"]
    assert engine["severity"] == "ok"
    assert engine["title"].startswith("The daemon uses Docker ")
    assert engine_version() in engine["title"]
    assert "rootful" in engine["title"]
    assert findings["cgroup.version"]["severity"] == "ok"
    # Exit status: non-zero exactly when something blocks tasks.
    assert report["ok"] == all(f["severity"] != "error" for f in findings.values())
    assert done.rc == (0 if report["ok"] else 1), done
    assert report["recommendation"]["runtime"] == "native-docker"


def test_gc_dry_run_on_a_terminal_and_as_json(busy: DaemonProcess) -> None:
    done = ctl(busy.socket, "gc", "--dry-run", tty=True)
    assert done.rc == 0, done.err
    assert done.out.startswith("would remove ")
    report = one_json_object(ctl(busy.socket, "gc", "--dry-run", "--json").out)
    assert report["dry_run"] is True
    # Live tasks with their slot dirs: nothing of theirs is garbage.
    assert not [r for r in report["removed"] if r.get("result") in ("ctl_run_0", "ctl_new_0")]
    assert {t["result"] for t in busy.request("GET", "/v1/tasks")["tasks"]} == {
        "ctl_run_0",
        "ctl_new_0",
    }
