"""Garbage collection on the real dockerd: what goes, what stays, and the bytes it frees."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.core import labels as L
from boincd_containers.shim.client import DaemonError
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess, docker
from boincd_containers.testing.names import RUN_ID

pytestmark = pytest.mark.docker

PROJECT = f"test.example.org_gc_{RUN_ID}"


# -- helpers (the fault tests use them too) ---------------------------------------------


def boinc_slot(base: Path, index: int, result: str) -> Path:
    """A slot dir as the BOINC client leaves it while the task is live."""
    slot = base / "slots" / str(index)
    slot.mkdir(parents=True)
    write_init_data(slot, result)
    return slot


def write_init_data(slot: Path, result: str) -> None:
    (slot / "init_data.xml").write_text(
        f"<app_init_data>\n<result_name>{result}</result_name>\n</app_init_data>\n"
    )


def task_body(slot: Path, result: str, **extra: Any) -> dict[str, Any]:
    return {
        "result": result,
        "project": PROJECT,
        "slot_dir": str(slot),
        "image": TEST_IMAGE,
        "command": ["sh", "-c", "trap 'exit 143' TERM; while true; do sleep 0.2; done"],
        "ncpus": 0.5,
        "memory_bytes": 64 * 2**20,
        **extra,
    }


def wait_until(what: str, check: Any, timeout: float = 60.0, daemon: Any = None) -> Any:
    """Poll `check()` until it returns something truthy (a deadline, not a timing claim)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            log = daemon.log() if daemon is not None else ""
            raise AssertionError(f"timed out waiting for {what}\n{log}")
        time.sleep(0.05)


def prepared(daemon: DaemonProcess, body: dict[str, Any]) -> dict[str, Any]:
    daemon.request("POST", "/v1/tasks", body)

    def ready() -> dict[str, Any] | None:
        task: dict[str, Any] = daemon.request("GET", f"/v1/tasks/{body['result']}")
        return task if task["state"] not in ("preparing",) else None

    task: dict[str, Any] = wait_until(f"{body['result']} prepared", ready, daemon=daemon)
    assert task["state"] == "created", task
    return task


def owned_containers(instance_id: str) -> dict[str, str]:
    """result label -> container id, for every container with this owner label."""
    out = docker(
        "ps",
        "-a",
        "--filter",
        f"label={L.OWNER}={instance_id}",
        "--no-trunc",
        "--format",
        f'{{{{.ID}}}} {{{{.Label "{L.RESULT}"}}}}',
    )
    pairs = [line.split(" ", 1) for line in out.splitlines() if line.strip()]
    results = [p[1] for p in pairs]
    assert len(results) == len(set(results)), f"two containers for one result: {out}"
    return {p[1]: p[0] for p in pairs}


def full_id(ref: str) -> str:
    return docker("inspect", "--format", "{{.Id}}", ref)


def engine_snapshot() -> dict[str, Any]:
    """Everything a GC could change: containers (and states), volumes, images."""
    return {
        "containers": sorted(docker("ps", "-a", "--format", "{{.ID}} {{.State}}").splitlines()),
        "volumes": sorted(docker("volume", "ls", "-q").splitlines()),
        "images": sorted(docker("images", "-q", "--no-trunc").splitlines()),
    }


def ctl(daemon: DaemonProcess, *args: str, rc: int = 0) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "boincd_containers", "ctl", *args],
        env={**os.environ, "BOINCD_SOCKET": daemon.socket},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == rc, done.stderr
    return json.loads(done.stdout) if "--json" in args else done.stdout


def gc_daemon(base: Path, **settings: float) -> DaemonProcess:
    values = {"relist_interval_s": 5.0, "gc_interval_s": 0.0, "gc_grace_s": 0.0, **settings}
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.toml").write_text("".join(f"{k} = {v}\n" for k, v in values.items()))
    return DaemonProcess(base)


@pytest.fixture
def foreign(short_tmp: Path, test_image: str) -> Iterator[dict[str, str]]:
    """A volunteer's own objects, and objects of another daemon instance: all with
    everything that would make them garbage if they were ours."""
    tag = uuid.uuid4().hex[:8]
    gone_slot = str(short_tmp / "slots" / "999")  # never exists: "slot gone" if it were ours
    made: dict[str, str] = {}
    try:
        made["image"] = f"boincd-test/foreign:{tag}"
        docker("tag", test_image, made["image"])
        made["volume"] = docker("volume", "create", f"foreign-{tag}")
        made["container"] = docker(
            "create",
            "--network",
            "none",
            "--name",
            f"boinc__{PROJECT}__foreign_{tag}",
            "--label",
            f"{L.RESULT}=foreign_{tag}",
            "--label",
            f"{L.SLOT}={gone_slot}",
            "-v",
            f"{made['volume']}:/v",
            made["image"],
            "true",
        )
        other = ["--label", f"{L.OWNER}=another-instance-{tag}"]
        made["other_volume"] = docker("volume", "create", *other, f"other-{tag}")
        made["other_container"] = docker(
            "create",
            "--network",
            "none",
            *other,
            "--label",
            f"{L.RESULT}=other_{tag}",
            "--label",
            f"{L.SLOT}={gone_slot}",
            made["image"],
            "true",
        )
        for key in ("container", "other_container"):
            docker("start", made[key])
            docker("wait", made[key])
        yield made
    finally:
        for key in ("container", "other_container"):
            if key in made:
                docker("rm", "-f", made[key], check=False)
        for key in ("volume", "other_volume"):
            if key in made:
                docker("volume", "rm", "-f", made[key], check=False)
        if "image" in made:
            docker("rmi", made["image"], check=False)


def assert_foreign_intact(made: dict[str, str]) -> None:
    for key in ("container", "other_container"):
        assert docker("inspect", "--format", "{{.State.Status}}", made[key]) == "exited"
    for key in ("volume", "other_volume"):
        assert docker("volume", "inspect", "--format", "{{.Name}}", made[key]) == made[key]
    assert docker("image", "inspect", "--format", "{{.Id}}", made["image"]).startswith("sha256:")


# -- tests ------------------------------------------------------------------------------


def test_slot_dir_deleted_container_collected_after_grace(
    short_tmp: Path, test_image: str, foreign: dict[str, str]
) -> None:
    daemon = gc_daemon(short_tmp / "d", gc_interval_s=0.3, gc_grace_s=1.0)
    try:
        daemon.start()
        keep_slot = boinc_slot(short_tmp, 0, "gcslot_keep")
        gone_slot = boinc_slot(short_tmp, 1, "gcslot_gone")
        keep = prepared(daemon, task_body(keep_slot, "gcslot_keep"))
        gone = prepared(daemon, task_body(gone_slot, "gcslot_gone"))
        for result in ("gcslot_keep", "gcslot_gone"):
            assert daemon.request("POST", f"/v1/tasks/{result}/start")["state"] == "running"
        shutil.rmtree(gone_slot)  # BOINC reset the project

        wait_until(
            "the container of the deleted slot collected",
            lambda: "gcslot_gone" not in owned_containers(daemon.instance_id),
            daemon=daemon,
        )
        with pytest.raises(DaemonError) as info:
            daemon.request("GET", "/v1/tasks/gcslot_gone")
        assert info.value.status == 404
        assert docker("ps", "-aq", "--filter", f"id={gone['container_id']}") == ""
        # The live task stays, running, and the GC says what it did.
        assert owned_containers(daemon.instance_id) == {"gcslot_keep": keep["container_id"]}
        assert daemon.request("GET", "/v1/tasks/gcslot_keep")["state"] == "running"
        status = daemon.request("GET", "/v1/status")["gc"]
        assert status["last_run"] is not None
        assert status["error"] is None
        assert "is gone" in daemon.log()
        assert_foreign_intact(foreign)
    finally:
        daemon.kill()
        daemon.cleanup_engine_objects()


def test_dry_run_changes_nothing_and_the_real_run_frees_the_bytes_it_reported(
    short_tmp: Path, volume_image: str, foreign: dict[str, str]
) -> None:
    daemon = gc_daemon(short_tmp / "d")
    volume = f"boincd-test-gc-{uuid.uuid4().hex[:8]}"
    try:
        daemon.start()
        owner = daemon.instance_id
        # A finished task: it wrote 100000 bytes to its writable layer and 30000 to
        # its anonymous volume, exited, and BOINC cleaned its slot out.
        done_slot = boinc_slot(short_tmp, 0, "gcdone_0")
        write = "head -c 100000 /dev/zero > /big; head -c 30000 /dev/zero > /scratch/f"
        done = prepared(
            daemon,
            task_body(done_slot, "gcdone_0", image=volume_image, command=["sh", "-c", write]),
        )
        daemon.request("POST", "/v1/tasks/gcdone_0/start")
        assert daemon.request("POST", "/v1/tasks/gcdone_0/wait?timeout=60")["exit_code"] == 0
        (done_slot / "init_data.xml").unlink()
        anonymous = [
            m["Name"]
            for m in json.loads(docker("inspect", done["container_id"]))[0]["Mounts"]
            if m["Type"] == "volume"
        ]
        assert len(anonymous) == 1
        # A live task not started yet (kept), and one paused by a shim that quit (kept).
        live = prepared(daemon, task_body(boinc_slot(short_tmp, 1, "gclive_0"), "gclive_0"))
        quit_slot = boinc_slot(short_tmp, 2, "gcquit_0")
        quit_task = prepared(daemon, task_body(quit_slot, "gcquit_0"))
        daemon.request("POST", "/v1/tasks/gcquit_0/start")
        daemon.request("POST", "/v1/tasks/gcquit_0/detach")
        # A labelled volume no container uses, with 50000 bytes in it.
        docker("volume", "create", "--label", f"{L.OWNER}={owner}", volume)
        docker(
            "run", "--rm", "--network", "none", "-v", f"{volume}:/v", TEST_IMAGE,
            "sh", "-c", "head -c 50000 /dev/zero > /v/f",
        )  # fmt: skip

        before = engine_snapshot()
        dry = ctl(daemon, "gc", "--dry-run", "--json")
        assert engine_snapshot() == before
        assert daemon.request("GET", "/v1/tasks/gcdone_0")["state"] == "exited"
        assert dry["dry_run"] is True
        expected = {
            ("container", f"boincd__{PROJECT}__gcdone_0", 100000),
            ("volume", anonymous[0], 30000),
            ("volume", volume, 50000),
        }
        assert {(r["kind"], r["name"], r["bytes"]) for r in dry["removed"]} == expected
        assert dry["freed_bytes"] == 180000
        assert "would remove 3 object(s)" in ctl(daemon, "gc", "--dry-run")

        real = daemon.request("POST", "/v1/gc")
        assert real["dry_run"] is False
        assert {(r["kind"], r["name"], r["bytes"]) for r in real["removed"]} == expected
        assert real["freed_bytes"] == 180000
        reasons = {r["name"]: r["reason"] for r in real["removed"]}
        assert "cleaned out slot dir" in reasons[f"boincd__{PROJECT}__gcdone_0"]
        assert docker("ps", "-aq", "--filter", f"id={done['container_id']}") == ""
        for name in (anonymous[0], volume):
            assert docker("volume", "ls", "-q", "--filter", f"name=^{name}$") == ""
        assert owned_containers(owner) == {
            "gclive_0": live["container_id"],
            "gcquit_0": quit_task["container_id"],
        }
        assert daemon.request("GET", "/v1/tasks/gcquit_0")["state"] == "paused"
        # Nothing left to collect: a second pass removes nothing.
        assert daemon.request("POST", "/v1/gc")["removed"] == []
        assert_foreign_intact(foreign)
    finally:
        daemon.kill()
        daemon.cleanup_engine_objects()
        docker("volume", "rm", "-f", volume, check=False)


def test_a_shim_that_keeps_asking_keeps_its_task_and_a_silent_one_loses_it(
    short_tmp: Path, test_image: str
) -> None:
    """The lease: not seen for `shim_lease_s` (the BOINC client is gone for good) →
    collected, whatever the slot says; each GET of the task renews it. The lease
    survives a daemon restart (leases.json)."""
    daemon = gc_daemon(short_tmp / "d", gc_grace_s=2.0, shim_lease_s=4.0)
    try:
        daemon.start()
        for i, result in enumerate(("lease_polled", "lease_silent")):
            prepared(daemon, task_body(boinc_slot(short_tmp, i, result), result))
            daemon.request("POST", f"/v1/tasks/{result}/start")
        # SIGTERM: the daemon saves last-seen times on the way out.
        daemon.stop()
        daemon.start()
        saved = json.loads((Path(daemon.state_dir) / "leases.json").read_text())
        # By task, "project/result" (tasks/state.py TaskKey).
        assert {key.rpartition("/")[2] for key in saved} == {"lease_polled", "lease_silent"}

        def silent_collected() -> bool:
            daemon.request("GET", "/v1/tasks/lease_polled")  # the polling shim
            report = daemon.request("POST", "/v1/gc")
            assert all(r["result"] != "lease_polled" for r in report["removed"]), report
            return "lease_silent" not in owned_containers(daemon.instance_id)

        wait_until("the silent task's lease to run out", silent_collected, daemon=daemon)
        assert set(owned_containers(daemon.instance_id)) == {"lease_polled"}
        assert "BOINC client is gone" in daemon.log()
    finally:
        daemon.kill()
        daemon.cleanup_engine_objects()
