"""No root anywhere: rootless Podman and the daemon both run as an unprivileged user.

The user is `boinctest` (scripts/setup.sh --test creates it with an /etc/subuid
range); its Podman service listens on the usual rootless socket, which the
daemon must find by itself (no DOCKER_HOST). On cgroup v1 rootless containers
get no cgroup of their own: no limits, no freezer. Then the daemon says so on
the task, pauses with signals, and enforces BOINC's memory bound by watching.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.host import proctree
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess
from boincd_containers.testing.names import RUN_ID
from boincd_containers.testing.podman import (
    PodmanService,
    TestEngine,
    User,
    podman_available,
    rootless_user,
)

pytestmark = [pytest.mark.podman]

CGROUP_V1 = not Path("/sys/fs/cgroup/cgroup.controllers").exists()
PROJECT = f"rootless.example.org_proj_{RUN_ID}"


def _missing(reason: str) -> None:
    if os.environ.get("BOINCD_REQUIRE_ENGINE") == "1":
        pytest.fail(f"{reason} (BOINCD_REQUIRE_ENGINE=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def rootless() -> Iterator[tuple[User, TestEngine]]:
    """A rootless Podman service of the test user, with the test image in its store."""
    if os.geteuid() != 0:
        pytest.skip("switching to the test user needs root")
    if not podman_available() or shutil.which("setpriv") is None:
        _missing("podman and setpriv are needed for the rootless tests")
    user = rootless_user()
    if user is None:
        _missing("no user boinctest with a /etc/subuid range: run scripts/setup.sh --test")
        raise AssertionError("unreachable")
    service = PodmanService(user)
    try:
        engine = service.start()
        engine.ensure_test_image()
        yield user, engine
    finally:
        service.stop()


def user_python(user: User) -> tuple[str, dict[str, str]]:
    """An interpreter the user can run with this checkout and its dependencies.

    The tests' own (a venv) may live where the user cannot read, e.g. under
    /root; then the system's Python of the same version with the venv's
    packages on PYTHONPATH."""
    repo = str(Path(__file__).resolve().parents[2])
    site = next((p for p in sys.path if p.endswith("site-packages") and sys.prefix in p), "")
    env = {"PYTHONPATH": os.pathsep.join(p for p in (repo, site) if p)}
    check = "import aiohttp, aiodocker, boincd_containers.daemon.server"
    for python in (sys.executable, f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"):
        argv = ["env", f"PYTHONPATH={env['PYTHONPATH']}", python, "-c", check]
        done = subprocess.run(user.command(argv), capture_output=True, timeout=60, cwd="/")
        if done.returncode == 0:
            return python, env
    raise AssertionError(f"no Python that {user.name} can run with this checkout's packages")


@pytest.fixture
def rootless_daemon(
    rootless: tuple[User, TestEngine], short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DaemonProcess]:
    """The daemon as the test user: state and socket in a directory of that user."""
    user, engine = rootless
    monkeypatch.delenv("DOCKER_HOST", raising=False)  # it must find the engine itself
    base = short_tmp / "daemon"
    base.mkdir()
    os.chown(base, user.uid, user.gid)
    python, python_env = user_python(user)
    env = {k: v for k, v in user.env().items() if k != "PATH"} | python_env
    process = DaemonProcess(
        base,
        extra_env=env,
        engine=engine,
        argv_prefix=["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups"],
        python=python,
    )
    try:
        yield process.start()
    finally:
        process.kill()
        process.cleanup_engine_objects()


def make_slot(base: Path, user: User, name: str) -> Path:
    """A slot dir of the BOINC user, here the engine's own user."""
    slot = base / name
    slot.mkdir()
    os.chown(slot, user.uid, user.gid)
    return slot


def task_body(slot: Path, result: str, command: str, **extra: Any) -> dict[str, Any]:
    return {
        "result": result,
        "project": PROJECT,
        "slot_dir": str(slot),
        "image": TEST_IMAGE,
        "command": ["sh", "-c", command],
        "ncpus": 1.0,
        "memory_bytes": 64 * 2**20,
        **extra,
    }


def wait_for(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def real_uids(pid: int) -> set[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("Uid:"))
    return {int(v) for v in line.split()[1:]}


def ctl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "boincd_containers", "ctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "BOINCD_SOCKET": daemon.socket},
    )


def test_daemon_finds_its_users_podman_and_reports_rootless(
    rootless_daemon: DaemonProcess, rootless: tuple[User, TestEngine]
) -> None:
    user, _ = rootless
    assert rootless_daemon.proc is not None
    assert real_uids(rootless_daemon.proc.pid) == {user.uid}, "the daemon must not run as root"
    engine = rootless_daemon.request("GET", "/v1/status")["engine"]
    assert engine["kind"] == "podman"
    assert engine["rootless"] is True
    assert engine["host"] == f"unix://{user.runtime_dir}/podman/podman.sock"

    status = ctl(rootless_daemon, "status")
    assert status.returncode == 0, status.stderr
    assert "podman" in status.stdout.splitlines()[0]
    assert "rootless" in status.stdout.splitlines()[0]
    doctor = ctl(rootless_daemon, "doctor", "--json")
    findings = {f["id"]: f for f in json.loads(doctor.stdout)["findings"]}
    assert "rootless" in findings["engine.reachable"]["title"]
    if CGROUP_V1:
        assert findings["cgroup.version"]["severity"] == "warning"
        assert "rootless Podman" in findings["cgroup.version"]["title"]


def test_task_lifecycle_pause_resume_exit_codes_and_remove(
    rootless_daemon: DaemonProcess, rootless: tuple[User, TestEngine], short_tmp: Path
) -> None:
    user, engine = rootless
    slot = make_slot(short_tmp, user, "slot")
    command = "echo started > /app/out; while [ ! -e /app/stop ]; do sleep 0.1; done; exit 7"
    rootless_daemon.request("POST", "/v1/tasks", task_body(slot, "rl_life", command))
    task = rootless_daemon.wait_task("rl_life", {"created", "failed"}, timeout=60)
    assert task["state"] == "created", task
    if CGROUP_V1:
        # What the engine could not do is said where the volunteer and project look.
        assert any("cannot limit" in w for w in task["warnings"]), task["warnings"]
        assert task["memory_watched"] is True

    task = rootless_daemon.request("POST", "/v1/tasks/rl_life/start")
    assert task["state"] == "running"
    pid = task["pid"]
    wait_for(lambda: (slot / "out").exists(), "the app's first output")
    # In-container root is the unprivileged user: it owns what the app writes.
    assert (slot / "out").stat().st_uid == user.uid
    assert all(0 not in real_uids(p.pid) for p in proctree.tree(pid))
    # No cgroup of its own: the figures come from its processes, not a shared cgroup.
    wait_for(
        lambda: rootless_daemon.request("GET", "/v1/tasks/rl_life")["memory_bytes"] > 0,
        "the task's memory sampled",
    )

    assert rootless_daemon.request("POST", "/v1/tasks/rl_life/pause")["state"] == "paused"
    processes = proctree.tree(pid)
    assert processes, "the container's processes are gone"
    assert all(p.state == "T" for p in processes), processes
    assert rootless_daemon.request("GET", "/v1/tasks/rl_life")["state"] == "paused"
    # Pausing twice is fine, as on any engine.
    assert rootless_daemon.request("POST", "/v1/tasks/rl_life/pause")["state"] == "paused"

    assert rootless_daemon.request("POST", "/v1/tasks/rl_life/resume")["state"] == "running"
    assert all(p.state != "T" for p in proctree.tree(pid))

    (slot / "stop").touch()
    done = rootless_daemon.request("POST", "/v1/tasks/rl_life/wait?timeout=60")
    assert (done["state"], done["exit_code"]) == ("exited", 7)
    cid = done["container_id"]
    rootless_daemon.request("DELETE", "/v1/tasks/rl_life")
    assert engine.cli("ps", "-aq", "--filter", f"id={cid}") == ""

    ok_slot = make_slot(short_tmp, user, "slot_ok")
    rootless_daemon.request("POST", "/v1/tasks", task_body(ok_slot, "rl_ok", "exit 0"))
    rootless_daemon.wait_task("rl_ok", {"created", "failed"}, timeout=60)
    rootless_daemon.request("POST", "/v1/tasks/rl_ok/start")
    done = rootless_daemon.request("POST", "/v1/tasks/rl_ok/wait?timeout=60")
    assert (done["state"], done["exit_code"]) == ("exited", 0)
    rootless_daemon.request("DELETE", "/v1/tasks/rl_ok")
    assert (
        engine.cli(
            "ps",
            "-aq",
            "--filter",
            f"label=org.boinc.containers.project={PROJECT}",
            "--filter",
            "label=org.boinc.containers.result=rl_ok",
        )
        == ""
    )


def test_memory_bound_is_enforced_by_watching_when_the_engine_cannot(
    rootless_daemon: DaemonProcess, rootless: tuple[User, TestEngine], short_tmp: Path
) -> None:
    user, _ = rootless
    slot = make_slot(short_tmp, user, "slot")
    # Holds about 80 MB in the shell's memory, well past the 32 MiB bound (a loop
    # last: a shell whose last command is `sleep` becomes it, freeing `x`).
    command = (
        "x=$(head -c 80000000 /dev/zero | tr '\\0' a); echo held > /app/held; "
        "while true; do sleep 1; done"
    )
    body = task_body(slot, "rl_mem", command, memory_bytes=32 * 2**20)
    rootless_daemon.request("POST", "/v1/tasks", body)
    task = rootless_daemon.wait_task("rl_mem", {"created", "failed"}, timeout=60)
    if not task["memory_watched"]:
        pytest.skip("this engine limits memory itself here (cgroup v2 with delegation)")
    rootless_daemon.request("POST", "/v1/tasks/rl_mem/start")
    done = rootless_daemon.wait_task("rl_mem", {"exited"}, timeout=60)
    assert done["exit_code"] == 137
    limit = done["limit_exceeded"]
    assert limit["kind"] == "memory"
    assert limit["bound_bytes"] == 32 * 2**20
    assert limit["used_bytes"] > 32 * 2**20
    assert "memory limit exceeded" in limit["message"]


def test_image_accounting_from_the_layers(
    rootless_daemon: DaemonProcess, rootless: tuple[User, TestEngine]
) -> None:
    _, engine = rootless
    image_id = engine.api(f"/images/{TEST_IMAGE}/json")["Id"]
    items: list[dict[str, Any]] = []

    def listed() -> bool:
        nonlocal items
        images = rootless_daemon.request("GET", "/v1/status").get("images") or {}
        items = [i for i in images.get("items") or [] if i.get("id") == image_id]
        return bool(items)

    wait_for(listed, "the test image in the daemon's image accounting")
    # Podman's own /system/df says 0 for the layers; ours come from the layers.
    assert items[0]["size_bytes"] > 0
    layers = engine.api(f"/images/{image_id}/json")["RootFS"]["Layers"]
    assert len(layers) == 1
    assert items[0]["unique_bytes"] + items[0]["shared_bytes"] == items[0]["size_bytes"]
