"""`ctl doctor` against the real engine with no daemon running: it lists the containers
of ours still under the old name boinc__, tells this instance's from another's, and
reports the BOINC client installed here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincd_containers import labels as L
from tests.daemon_harness import docker

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
