"""The real daemon process on the real engines (Docker and rootful Podman):
lifecycle, limits, restarts, ownership."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.core import labels as L
from boincd_containers.shim.client import DaemonError
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess
from boincd_containers.testing.names import RUN_ID
from boincd_containers.testing.podman import ENGINES, TestEngine, daemon_env

PROJECT = f"test.example.org_proj_{RUN_ID}"

pytestmark = [pytest.mark.docker, pytest.mark.parametrize("engine", ENGINES, indirect=True)]


def make_slot(base: Path, name: str = "slot") -> Path:
    slot = base / name
    slot.mkdir()
    return slot


def task_body(slot: Path, result: str, **extra: Any) -> dict[str, Any]:
    return {
        "result": result,
        "project": PROJECT,
        "slot_dir": str(slot),
        "image": TEST_IMAGE,
        "command": ["sh", "-c", "sleep 300"],
        "ncpus": 1.5,
        "memory_bytes": 64 * 2**20,
        **extra,
    }


def created(daemon: DaemonProcess, slot: Path, result: str, **extra: Any) -> dict[str, Any]:
    daemon.request("POST", "/v1/tasks", task_body(slot, result, **extra))
    return daemon.wait_task(result, {"created", "failed", "waiting"})


def test_container_gets_limits_labels_mounts_and_user(
    daemon: DaemonProcess, engine: TestEngine, short_tmp: Path
) -> None:
    slot = make_slot(short_tmp)
    project = short_tmp / "project"
    project.mkdir()
    os.chown(slot, 4321, 4322)
    task = created(daemon, slot, "limits_0", project_dir=str(project), project_dir_mount="/project")
    assert task["state"] == "created", task
    data = engine.inspect(task["container_id"])
    host = data["HostConfig"]
    assert data["Name"] == f"/boincd__{PROJECT}__limits_0"
    assert host["NanoCpus"] == 1_500_000_000
    assert host["Memory"] == 64 * 2**20
    assert host["PidsLimit"] == 4096
    if engine.kind == "docker":
        assert host["CapDrop"] == ["ALL"]
    else:
        # Podman spells out its default capabilities instead; what is left is none.
        caps = engine.cli("inspect", "--format", "{{json .EffectiveCaps}}", task["container_id"])
        assert json.loads(caps) in ([], None)
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["NetworkMode"] == "none"
    assert data["Config"]["User"] == "4321:4322"
    labels = data["Config"]["Labels"]
    assert labels[L.OWNER] == daemon.instance_id
    assert labels[L.RESULT] == "limits_0"
    assert labels[L.PROJECT] == PROJECT
    assert labels[L.SLOT] == str(slot.resolve())
    mounts = {m["Destination"]: m for m in data["Mounts"]}
    # The daemon's own mount point of the checked slot (host/mounts.py), never the
    # BOINC user's path, which the engine would resolve again at start.
    source = mounts["/app"]["Source"]
    assert source.startswith(f"{daemon.state_dir}/mounts/"), source
    assert os.stat(source).st_ino == slot.stat().st_ino
    assert mounts["/app"]["RW"] is True
    assert mounts["/project"]["RW"] is False


def test_lifecycle_pause_unpause_exit_and_remove(
    daemon: DaemonProcess, engine: TestEngine, short_tmp: Path
) -> None:
    slot = make_slot(short_tmp)
    cmd = [
        "sh",
        "-c",
        "echo started > /app/out; while [ ! -e /app/stop ]; do sleep 0.1; done; exit 7",
    ]
    task = created(daemon, slot, "life_0", command=cmd)
    cid = task["container_id"]
    assert daemon.request("POST", "/v1/tasks/life_0/start")["state"] == "running"
    assert daemon.request("POST", "/v1/tasks/life_0/pause")["state"] == "paused"
    assert engine.inspect(cid)["State"]["Paused"] is True
    assert daemon.request("POST", "/v1/tasks/life_0/resume")["state"] == "running"
    assert engine.inspect(cid)["State"]["Paused"] is False
    (slot / "stop").touch()
    done = daemon.request("POST", "/v1/tasks/life_0/wait?timeout=30")
    assert done["state"] == "exited"
    assert done["exit_code"] == 7
    assert (slot / "out").read_text() == "started\n"
    daemon.request("DELETE", "/v1/tasks/life_0")
    assert engine.cli("ps", "-aq", "--filter", f"id={cid}") == ""


def test_kill_and_remove_leaves_no_container_and_no_volume(
    daemon: DaemonProcess, engine: TestEngine, short_tmp: Path
) -> None:
    # An image that declares a VOLUME gets an anonymous volume: it must go with the container.
    tag = f"boincd-test/with-volume:{uuid.uuid4().hex[:8]}"
    context = short_tmp / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {TEST_IMAGE}\nVOLUME /scratch\n")
    engine.cli("build", "-q", "-t", tag, str(context))
    try:
        slot = make_slot(short_tmp)
        task = created(daemon, slot, "vol_0", image=tag)
        daemon.request("POST", "/v1/tasks/vol_0/start")
        volumes = [
            m["Name"]
            for m in engine.inspect(task["container_id"])["Mounts"]
            if m["Type"] == "volume"
        ]
        assert len(volumes) == 1
        daemon.request("DELETE", "/v1/tasks/vol_0")
        assert engine.cli("ps", "-aq", "--filter", f"id={task['container_id']}") == ""
        assert engine.cli("volume", "ls", "-q", "--filter", f"name={volumes[0]}") == ""
    finally:
        engine.cli("rmi", "-f", tag, check=False)


def test_create_or_attach_twice_gives_one_container(
    daemon: DaemonProcess, engine: TestEngine, short_tmp: Path
) -> None:
    slot = make_slot(short_tmp)
    first = created(daemon, slot, "twice_0")
    second = daemon.request("POST", "/v1/tasks", task_body(slot, "twice_0"))
    assert second["container_id"] == first["container_id"]
    label = f"label={L.RESULT}=twice_0"
    mine = f"label={L.PROJECT}={PROJECT}"
    assert len(engine.cli("ps", "-aq", "--filter", label, "--filter", mine).split()) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_restarted_daemon_rebuilds_state_and_controls_the_container(
    daemon: DaemonProcess, engine: TestEngine, short_tmp: Path, sig: int
) -> None:
    slot = make_slot(short_tmp)
    task = created(daemon, slot, "restart_0")
    daemon.request("POST", "/v1/tasks/restart_0/start")
    daemon.stop(sig)
    # The task's container outlives the daemon, whichever way it ended.
    assert engine.inspect(task["container_id"])["State"]["Running"] is True
    daemon.start()
    again = daemon.request("GET", "/v1/tasks/restart_0")
    assert again["container_id"] == task["container_id"]
    assert again["state"] == "running"
    assert daemon.request("POST", "/v1/tasks/restart_0/pause")["state"] == "paused"
    assert engine.inspect(task["container_id"])["State"]["Paused"] is True
    attached = daemon.request("POST", "/v1/tasks", task_body(slot, "restart_0"))
    assert attached["container_id"] == task["container_id"]


def test_a_foreign_container_is_never_touched(
    daemon: DaemonProcess, engine: TestEngine, short_tmp: Path
) -> None:
    name = f"boincd__{PROJECT}__foreign_0"
    try:
        foreign = engine.cli("run", "-d", "--name", name, TEST_IMAGE, "sleep", "300")
        slot = make_slot(short_tmp)
        with pytest.raises(DaemonError) as info:
            daemon.request("POST", "/v1/tasks", task_body(slot, "foreign_0"))
        assert info.value.status == 409
        assert "does not belong to this daemon" in info.value.message
        status = daemon.request("GET", "/v1/status")
        assert all(t["container_id"] != foreign for t in status["tasks"])
        # Removal is idempotent, so this succeeds: but it must not reach the foreign container.
        daemon.request("DELETE", "/v1/tasks/foreign_0")
        assert engine.inspect(foreign)["State"]["Running"] is True
    finally:
        # By name: a run that failed after creating the container leaves it too.
        engine.force_remove(name)


def test_missing_image_fails_the_task_clearly(daemon: DaemonProcess, short_tmp: Path) -> None:
    slot = make_slot(short_tmp)
    # Nothing listens on port 1: the registry is unreachable, which may pass
    # (the task waits and is prepared again), unlike an image that does not exist.
    task = created(daemon, slot, "noimg_0", image="127.0.0.1:1/nothing/here:1")
    assert task["state"] == "waiting"
    assert task["error"]["code"] == "unavailable"
    assert task["error"]["retryable"] is True
    assert "127.0.0.1:1/nothing/here" in task["error"]["message"]
    assert task["container_id"] == ""


def _as_nobody(socket_path: str, method: str) -> int:
    """Speak HTTP on the socket as uid nobody and return the status code."""
    script = (
        "import sys; from boincd_containers.shim.client import DaemonClient, DaemonError\n"
        "c = DaemonClient(sys.argv[1])\n"
        "try:\n"
        "    c.request(sys.argv[2], '/v1/tasks' if sys.argv[2] == 'GET' else '/v1/tasks/x/pause')\n"
        "    print(200)\n"
        "except DaemonError as e:\n"
        "    print(e.status)\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            sys_executable(),
            "-c",
            script,
            socket_path,
            method,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": root},
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def sys_executable() -> str:
    import sys

    return sys.executable


def test_peer_credentials_let_others_read_but_not_change(
    short_tmp: Path, engine: TestEngine, test_image: str
) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is missing")
    # Everyone must be able to reach the socket and the interpreter for this test.
    process = DaemonProcess(short_tmp, extra_env=daemon_env(engine), engine=engine)
    process.config.write_text('socket_group = "nogroup"\n')
    try:
        process.start()
        os.chmod(process.socket, 0o666)
        for path in (short_tmp, Path(process.socket).parent):
            path.chmod(0o755)
        assert _as_nobody(process.socket, "GET") == 200
        assert _as_nobody(process.socket, "POST") == 403
    finally:
        process.kill()
        process.cleanup_engine_objects()
