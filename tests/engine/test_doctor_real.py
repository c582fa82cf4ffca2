"""`ctl doctor` against the real engine. With no daemon running: tasks cannot run, and
it says how to start the daemon with a command this host has; it still lists the
containers of ours under the old name boinc__, tells this instance's from another's,
and reports the BOINC client installed here. Beside a real daemon (root), run as root
and as uid nobody: the daemon's side decides whether tasks can run, and a user who
cannot open Docker's socket is told so without "tasks cannot run"."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincd_containers.core import labels as L
from boincd_containers.testing.daemon import DaemonProcess, docker

pytestmark = pytest.mark.docker


@pytest.fixture
def containers(test_image: str) -> Iterator[dict[str, str]]:
    """Created (never started) containers: ours old and new name, another instance's."""
    run = uuid.uuid4().hex[:8]
    mine, other = uuid.uuid4().hex, uuid.uuid4().hex
    made = {
        "ours_old": (f"boinc__doctor_{run}__r_1", mine),
        "ours_new": (f"boincd__doctor_{run}__r_2", mine),
        "theirs_old": (f"boinc__doctor_{run}__r_3", other),
    }
    created: list[str] = []
    try:
        for name, owner in made.values():
            docker(
                "create",
                "--name",
                name,
                "--label",
                f"{L.OWNER}={owner}",
                "--label",
                f"{L.PROJECT}=doctor_{run}",
                "--label",
                f"{L.RESULT}={name.rsplit('__', 1)[1]}",
                test_image,
                "true",
            )
            created.append(name)
        yield {key: name for key, (name, _) in made.items()} | {"instance_id": mine}
    finally:
        for name in created:
            docker("rm", "-f", name, check=False)


def doctor(state_dir: Path, tmp_path: Path) -> dict[str, object]:
    env = {
        **os.environ,
        "BOINCD_SOCKET": str(tmp_path / "no-daemon.sock"),  # facts come from the engine
        "BOINCD_STATE_DIR": str(state_dir),
    }
    done = subprocess.run(
        [sys.executable, "-m", "boincd_containers", "ctl", "doctor", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode in (0, 1), done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    return report


def findings(report: dict[str, object]) -> dict[str, dict[str, str]]:
    return {f["id"]: f for f in report["findings"]}  # type: ignore[attr-defined]


def test_old_name_containers_of_this_instance_and_another(
    containers: dict[str, str], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "instance_id").write_text(containers["instance_id"] + "\n")
    report = doctor(state, tmp_path)
    found = findings(report)
    ours = found["containers.old_name"]
    # Only ours carry this fresh instance id; other runs' containers may share the engine.
    assert ours["title"].startswith("1 container(s) of boincd-containers")
    assert containers["ours_old"] + " (created; task r_1 of doctor_" in ours["detail"]
    assert "containers.old_name_other" in found
    listed = {c["name"]: c for c in report["old_name_containers"]}  # type: ignore[attr-defined]
    assert listed[containers["ours_old"]]["owner"] == containers["instance_id"]
    assert listed[containers["theirs_old"]]["state"] == "created"
    assert containers["ours_new"] not in listed


def test_without_an_instance_id_every_labelled_old_name_counts(
    containers: dict[str, str], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    report = doctor(state, tmp_path)
    assert "instance id is unknown" in findings(report)["containers.old_name"]["title"]
    assert "containers.old_name_other" not in findings(report)
    listed = {c["name"] for c in report["old_name_containers"]}  # type: ignore[attr-defined]
    assert {containers["ours_old"], containers["theirs_old"]} <= listed
    assert containers["ours_new"] not in listed
    assert not (state / "instance_id").exists()  # doctor reads the id, never makes one


def test_reports_the_installed_boinc_client(tmp_path: Path, docker_engine: str) -> None:
    if not Path("/usr/bin/boinc").is_file():
        pytest.skip("no BOINC client at /usr/bin/boinc")
    out = subprocess.run(
        ["/usr/bin/boinc", "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    expected = re.match(r"\d+\.\d+\.\d+", out)
    assert expected, out
    report = doctor(tmp_path, tmp_path)
    client = report["boinc_client"]
    assert isinstance(client, dict)
    assert expected.group(0) in [c["version"] for c in client["clients"]]
    assert findings(report)["boinc.client"]["severity"] == "ok"


# -- the daemon's side first ---------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def run_doctor(
    socket: str, *, as_nobody: bool = False, env: dict[str, str] | None = None, text: bool = False
) -> subprocess.CompletedProcess[str]:
    prefix = NOBODY if as_nobody else []
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "boincd_containers", "ctl", "doctor"]
        + ([] if text else ["--json"]),
        env={
            **os.environ,
            "BOINCD_SOCKET": socket,
            "PYTHONPATH": str(REPO),
            "BOINCD_CONFIG": os.devnull,
            **(env or {}),
        },
        cwd="/",  # nobody may not enter the test's folders
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode in (0, 1), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done


@pytest.fixture
def root_daemon(short_tmp: Path, docker_engine: str, test_image: str) -> Iterator[DaemonProcess]:
    """A root daemon set up as the installer does: its socket belongs to the BOINC
    user's group, so that user's shims may open it."""
    try:
        pwd.getpwnam("boinc")
    except KeyError:
        pytest.skip("no user boinc (install boinc-client)")
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    process = DaemonProcess(short_tmp)
    process.config.write_text('socket_group = "boinc"\nboinc_user = "boinc"\n')
    try:
        yield process.start()
    finally:
        process.kill()
        process.cleanup_engine_objects()


def by_id(report: dict[str, object]) -> dict[str, dict[str, str]]:
    return findings(report)


def test_as_root_without_a_daemon_tasks_cannot_run(tmp_path: Path, docker_engine: str) -> None:
    socket = str(tmp_path / "no-daemon.sock")
    done = run_doctor(socket)
    report = json.loads(done.stdout)
    daemon = by_id(report)["daemon.reachable"]
    assert daemon["severity"] == "error"
    assert daemon["title"] == f"Tasks cannot run: no daemon on boincd-containers' socket {socket}"
    assert done.returncode == 1
    assert report["ok"] is False
    assert report["tasks_can_run"] is False
    assert report["daemon"]["answered"] is False
    if not Path("/run/systemd/system").exists():  # as here: systemctl is installed, unusable
        assert "systemctl" not in daemon["fix"]
        assert f"serve --socket {socket}" in daemon["fix"]
    text = run_doctor(socket, text=True).stdout
    assert text.rstrip().endswith("tasks cannot run until the errors are fixed.")


def test_as_root_beside_a_daemon_its_engine_decides(root_daemon: DaemonProcess) -> None:
    done = run_doctor(root_daemon.socket)
    report = json.loads(done.stdout)
    found = by_id(report)
    daemon = found["daemon.reachable"]
    assert daemon["severity"] == "ok"
    assert daemon["title"].startswith("boincd-containers ")
    assert f"answers on boincd-containers' socket {root_daemon.socket}" in daemon["title"]
    assert report["daemon"]["instance_id"] == root_daemon.instance_id
    assert found["daemon.access"]["severity"] == "ok"  # root may change things
    assert found["daemon.boinc_socket"]["severity"] == "ok"
    engine = found["engine.reachable"]
    assert engine["severity"] == "ok"
    assert engine["title"].startswith("The daemon uses Docker ")
    assert "at Docker's socket /var/run/docker.sock" in engine["title"]
    assert found["user.engine"]["severity"] == "ok"
    assert report["tasks_can_run"] is report["ok"]
    assert done.returncode == (0 if report["ok"] else 1)
    # DOCKER_HOST in doctor's shell is not the daemon's: said, and not mistaken for it.
    elsewhere = json.loads(
        run_doctor(root_daemon.socket, env={"DOCKER_HOST": "unix:///nowhere/docker.sock"}).stdout
    )
    note = by_id(elsewhere)["engine.docker_host"]
    assert note["severity"] == "info"
    assert "DOCKER_HOST here is unix:///nowhere/docker.sock" in note["title"]
    assert by_id(elsewhere)["engine.reachable"]["severity"] == "ok"


def test_as_nobody_beside_a_root_daemon(root_daemon: DaemonProcess) -> None:
    os.chmod(root_daemon.socket, 0o666)  # nobody may read, as _as_nobody in test_daemon_real
    done = run_doctor(root_daemon.socket, as_nobody=True)
    report = json.loads(done.stdout)
    found = by_id(report)
    assert found["daemon.reachable"]["severity"] == "ok"
    access = found["daemon.access"]
    assert access["severity"] == "info"
    assert "may read but not change" in access["title"]
    assert "uid 65534" in access["title"]
    assert found["engine.reachable"]["severity"] == "ok"
    assert found["engine.reachable"]["title"].startswith("The daemon uses Docker ")
    user = found["user.engine"]
    assert user["severity"] == "info"
    assert "cannot open Docker's socket /var/run/docker.sock" in user["title"]
    assert "engine.permission" not in found
    assert report["user"]["uid"] == 65534
    assert done.returncode == (0 if report["ok"] else 1)
    text = run_doctor(root_daemon.socket, as_nobody=True, text=True).stdout
    assert "the daemon socket" not in text
    assert "tasks cannot run" not in text.lower()


def test_as_nobody_who_may_not_open_the_daemons_socket(root_daemon: DaemonProcess) -> None:
    # 0660, group boinc: nobody is not in it, so doctor cannot ask the daemon.
    done = run_doctor(root_daemon.socket, as_nobody=True)
    report = json.loads(done.stdout)
    found = by_id(report)
    denied = found["daemon.permission"]
    assert denied["severity"] == "warning"
    assert f"may not open boincd-containers' socket {root_daemon.socket}" in denied["title"]
    assert "group boinc" in denied["fix"]
    assert "engine.permission" not in found
    assert found["user.engine"]["severity"] == "info"
    assert report["tasks_can_run"] is None
    assert done.returncode == 0
    text = run_doctor(root_daemon.socket, as_nobody=True, text=True).stdout
    assert "tasks cannot run" not in text.lower()
    assert text.rstrip().endswith("doctor could not ask the daemon whether tasks can run.")
