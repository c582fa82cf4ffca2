"""The BOINC user against the root daemon (issue 15): swapping checked paths for
symbolic links, and racing links into a build context, must never give a task
a root-only file; a big build context must not grow the daemon.

Real dockerd, daemon as root, slot owned by an unprivileged uid. A root-only
(0700) directory holds a readable subdirectory with a readable file: the 0700
directory is all that keeps the BOINC user from it, so any mount of the
subdirectory (what the engine does when it follows a swapped-in link at start)
hands it over. Every test here failed on the code before host/mounts.py/safepath.py.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.core import labels as L
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess, docker

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(os.geteuid() != 0, reason="the daemon must run as root"),
]

USER = 4321
SECRET = "ROOT-ONLY-SECRET-4c1d"
PROJECT = "test.example.org_races"


@pytest.fixture
def vault(short_tmp: Path) -> Path:
    """vault/ (root 0700) / inner/ (0755) / key (0644) and file (0600)."""
    top = short_tmp / "vault"
    top.mkdir()
    top.chmod(0o700)
    inner = top / "inner"
    inner.mkdir()
    inner.chmod(0o755)
    (inner / "key").write_text(SECRET + "\n")
    (inner / "key").chmod(0o644)
    (inner / "file").write_text(SECRET + "\n")
    (inner / "file").chmod(0o600)
    return inner


def make_slot(base: Path, name: str) -> Path:
    slot = base / name
    slot.mkdir()
    (slot / "marker").write_text("the real slot\n")
    for path in (slot, slot / "marker"):
        os.chown(path, USER, USER)
    return slot


def body(slot: Path, result: str, **extra: Any) -> dict[str, Any]:
    return {
        "result": result,
        "project": PROJECT,
        "slot_dir": str(slot),
        "image": TEST_IMAGE,
        "command": ["sh", "-c", "cat /app/key /data/key /ctx/key 2>&1; ls /app"],
        "memory_bytes": 64 * 2**20,
        **extra,
    }


def swap_for_link(path: Path, target: Path) -> Path:
    """What the attacker does: move the checked dir away, a link in its place."""
    moved = path.with_name(path.name + ".moved")
    path.rename(moved)
    path.symlink_to(target)
    return moved


def run_to_exit(daemon: DaemonProcess, result: str) -> str:
    """Start the task, wait for its exit, and return what the container printed."""
    task = daemon.request("POST", f"/v1/tasks/{result}/start")
    done = daemon.request("POST", f"/v1/tasks/{result}/wait?timeout=30")
    assert done["state"] == "exited", (done, daemon.log())
    return docker("logs", task["container_id"])


def remove_built_images(daemon: DaemonProcess) -> None:
    label = f"label={L.OWNER}={daemon.instance_id}"
    ids = docker("images", "-q", "--filter", label, check=False).split()
    if ids:
        docker("rmi", "-f", *set(ids), check=False)


def test_slot_swapped_for_a_link_between_create_and_start(
    daemon: DaemonProcess, short_tmp: Path, vault: Path
) -> None:
    slot = make_slot(short_tmp, "slot")
    daemon.request("POST", "/v1/tasks", body(slot, "swap_slot"))
    task = daemon.wait_task("swap_slot", {"created", "failed", "waiting"})
    assert task["state"] == "created", task
    swap_for_link(slot, vault)
    out = run_to_exit(daemon, "swap_slot")
    assert SECRET not in out
    assert "marker" in out  # it got the slot that was checked


def test_mount_source_swapped_for_a_link_between_create_and_start(
    daemon: DaemonProcess, short_tmp: Path, vault: Path
) -> None:
    slot = make_slot(short_tmp, "slot")
    (slot / "data").mkdir()
    os.chown(slot / "data", USER, USER)
    mounts = [{"source": "data", "target": "/data"}]
    daemon.request("POST", "/v1/tasks", body(slot, "swap_mount", mounts=mounts))
    task = daemon.wait_task("swap_mount", {"created", "failed", "waiting"})
    assert task["state"] == "created", task
    swap_for_link(slot / "data", vault)
    out = run_to_exit(daemon, "swap_mount")
    assert SECRET not in out


class Flipper:
    """Swaps each of `paths` between itself and a link to `target`, as fast as it can."""

    def __init__(self, paths: list[Path], target: Path) -> None:
        self.paths, self.target = paths, target
        self.links = [p.with_name(p.name + ".link") for p in paths]
        for link in self.links:
            link.symlink_to(target)
            os.lchown(link, USER, USER)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pairs = list(zip(self.paths, self.links, strict=True))
        while not self._stop.is_set():
            for path, link in pairs:
                path.rename(path.with_name(path.name + ".moved"))
                link.rename(path)
            time.sleep(0.0005)
            for path, link in pairs:
                path.rename(link)
                path.with_name(path.name + ".moved").rename(path)
            time.sleep(0.0005)

    def __enter__(self) -> Flipper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        for link in self.links:
            link.unlink()


def _create_while_flipping(daemon: DaemonProcess, request: dict[str, Any]) -> dict[str, Any]:
    """POST until the daemon takes it (a link at check time is refused: fine), and
    wait for its container."""
    from boincd_containers.shim.client import DaemonError

    for _ in range(200):
        try:
            daemon.request("POST", "/v1/tasks", request)
            break
        except DaemonError as exc:
            if exc.status not in (400, 403):
                raise
    return daemon.wait_task(request["result"], {"created", "failed", "waiting"}, timeout=120)


def test_slot_swapped_during_a_build_never_mounts_or_builds_the_vault(
    daemon: DaemonProcess, short_tmp: Path, vault: Path
) -> None:
    (vault / "Dockerfile").write_text(f"FROM {TEST_IMAGE}\nCOPY . /ctx/\n")
    ran = 0
    try:
        for attempt in range(6):
            slot = make_slot(short_tmp, f"slot{attempt}")
            # A new context each time: each try builds, none is a cache hit.
            (slot / "Dockerfile").write_text(f"FROM {TEST_IMAGE}\nCOPY . /ctx/\n# {attempt}\n")
            os.chown(slot / "Dockerfile", USER, USER)
            request = body(slot, f"swap_build_{attempt}", image=None, build=True)
            with Flipper([slot], vault):
                task = _create_while_flipping(daemon, request)
            if task["state"] != "created":
                continue  # refused or failed: nothing mounted, nothing to read
            info = json.loads(docker("inspect", "--format", "{{json .}}", task["container_id"]))
            assert info["Config"]["Labels"][L.SLOT] == str(slot)
            source = next(m["Source"] for m in info["Mounts"] if m["Destination"] == "/app")
            assert os.stat(source).st_ino == slot.stat().st_ino
            out = run_to_exit(daemon, request["result"])
            assert SECRET not in out, (attempt, out)
            ran += 1
    finally:
        remove_built_images(daemon)
    print(f"slot swapped during builds: {ran} of 6 tasks built and ran, none saw the vault")
    assert ran > 0  # not refused every time: the races were run


def test_links_racing_into_a_build_context_never_bring_a_root_file(
    daemon: DaemonProcess, short_tmp: Path, vault: Path
) -> None:
    built = 0
    try:
        for attempt in range(6):
            slot = make_slot(short_tmp, f"slot{attempt}")
            (slot / "Dockerfile").write_text(f"FROM {TEST_IMAGE}\nCOPY . /ctx/\n# {attempt}\n")
            # As long as the secret, so that a read of it fits the header's size;
            # many, for many chances to win the race in each build.
            files = [slot / f"f{i:02}" for i in range(40)]
            for path in files:
                path.write_text("x" * (len(SECRET) + 1))
            for path in (slot / "Dockerfile", *files):
                os.chown(path, USER, USER)
            request = body(slot, f"race_ctx_{attempt}", image=None, build=True)
            with Flipper(files, vault / "file"):
                daemon.request("POST", "/v1/tasks", request)
                task = daemon.wait_task(request["result"], {"created", "failed", "waiting"}, 120)
            if task["state"] != "created":
                continue
            image = docker("inspect", "--format", "{{.Image}}", task["container_id"])
            # Read the image as root: whatever the context carried is there.
            seen = docker("run", "--rm", "--user", "0", image, "sh", "-c", "cat /ctx/* 2>&1")
            assert SECRET not in seen, attempt
            built += 1
    finally:
        remove_built_images(daemon)
    print(f"links raced into build contexts: {built} of 6 built, none with the root file")
    assert built > 0


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_500_mb_build_context_is_streamed_not_held(
    daemon: DaemonProcess, short_tmp: Path
) -> None:
    slot = make_slot(short_tmp, "slot")
    tag = uuid.uuid4().hex[:8]
    (slot / "Dockerfile").write_text(f"FROM {TEST_IMAGE}\nCMD true\n# {tag}\n")
    with (slot / "big.bin").open("wb") as fh:
        fh.truncate(500 * 2**20)  # sparse: costs the slot's disk nothing
    for path in (slot / "Dockerfile", slot / "big.bin"):
        os.chown(path, USER, USER)
    assert daemon.proc is not None
    before = _hwm_kib(daemon.proc.pid)
    try:
        daemon.request("POST", "/v1/tasks", body(slot, "big_ctx", image=None, build=True))
        task = daemon.wait_task("big_ctx", {"created", "failed", "waiting"}, timeout=300)
        assert task["state"] == "created", task
        grown_mib = (_hwm_kib(daemon.proc.pid) - before) / 1024
        print(f"daemon VmHWM before {before / 1024:.0f} MiB, growth {grown_mib:.1f} MiB")
        # A few 1 MiB pieces in flight, never the 500 MB (it took 1.1 GB before).
        assert grown_mib < 48, grown_mib
    finally:
        remove_built_images(daemon)
