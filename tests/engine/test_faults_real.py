"""Faults on the real engine: the daemon SIGKILLed at random points of the task
lifecycle, the engine stopped (or SIGKILLed) and restarted mid-task, the engine
down when the daemon starts, the engine's disk full, the daemon's state disk full.

The engine restarts and the full disk use a second dockerd of this test's own
(its own socket, data root on a small tmpfs, exec root, no bridge, no iptables),
never the system one: other tests use that one at the same time.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from boincd_containers.core import labels as L
from boincd_containers.shim.client import DaemonError, DaemonUnreachable
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess, docker
from boincd_containers.testing.local_registry import (
    busybox_rootfs_tar,
    import_image,
    local_registry,
    push_image,
    registry_available,
)
from tests.engine.test_gc_real import (
    boinc_slot,
    ctl,
    owned_containers,
    prepared,
    task_body,
    wait_until,
)

pytestmark = pytest.mark.docker

# At least 20 in CI; BOINCD_FAULT_ROUNDS=500 for a long run.
ROUNDS = int(os.environ.get("BOINCD_FAULT_ROUNDS", "20"))
LIVE_TASKS = 4
# What a shim may do next, from what it last wanted, and what each verb wants.
NEXT = {
    "created": ["start", "remove"],
    "running": ["pause", "detach", "remove"],
    "paused": ["resume", "start", "remove"],
}
WANT = {"start": "running", "pause": "paused", "detach": "paused", "resume": "running"}


# -- the daemon killed at random points ---------------------------------------------------


@dataclass
class Shim:
    """What a shim wants of its task; it drives the daemon there after every restart."""

    result: str
    slot: Path
    body: dict[str, Any]
    want: str = "created"  # created, running, paused, removed
    container_id: str = ""
    volumes: set[str] = field(default_factory=set)


def call(daemon: DaemonProcess, method: str, url: str, body: Any = None) -> Any:
    """A shim's call: retried while the daemon says "try again" (still preparing,
    engine busy), like the shim does."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return daemon.request(method, url, body)
        except DaemonError as exc:
            # 409 without retryable: the engine was still removing a container when
            # the daemon died ("removal already in progress"); the shim retries it.
            if time.monotonic() > deadline or not (exc.retryable or exc.status == 409):
                raise AssertionError(f"{method} {url}: {exc.message}\n{daemon.log()}") from exc
        time.sleep(0.05)


def drive(daemon: DaemonProcess, shim: Shim) -> None:
    """Bring the task to what the shim wants, as the shim's loop does."""
    if shim.want == "removed":
        call(daemon, "DELETE", f"/v1/tasks/{shim.result}")
        return
    task = call(daemon, "POST", "/v1/tasks", shim.body)  # create-or-attach

    def prepared() -> Any:
        nonlocal task
        task = call(daemon, "GET", f"/v1/tasks/{shim.result}")
        if task["state"] in ("failed", "waiting", "removed"):
            task = call(daemon, "POST", "/v1/tasks", shim.body)
        return task["state"] in ("created", "running", "paused", "exited")

    wait_until(f"{shim.result} prepared", prepared, daemon=daemon)
    if shim.want in ("running", "paused"):
        call(daemon, "POST", f"/v1/tasks/{shim.result}/start")
    if shim.want == "paused":
        call(daemon, "POST", f"/v1/tasks/{shim.result}/pause")


def engine_state(container_id: str) -> str:
    return docker("inspect", "--format", "{{.State.Status}}", container_id)


def volumes_of(container_id: str) -> set[str]:
    names = docker(
        "inspect", "--format", '{{range .Mounts}}{{if eq .Type "volume"}}{{.Name}} {{end}}{{end}}',
        container_id,
    )  # fmt: skip
    return set(names.split())


def check(daemon: DaemonProcess, shims: dict[str, Shim]) -> None:
    """Nothing lost, nothing leaked, nothing duplicated; the view is the engine's."""
    engine = owned_containers(daemon.instance_id)
    view = {
        t["result"]: t["container_id"]
        for t in daemon.request("GET", "/v1/tasks")["tasks"]
        if t["container_id"]
    }
    assert view == engine, f"daemon view {view} != engine {engine}\n{daemon.log()}"
    for shim in shims.values():
        if shim.want == "removed":
            assert shim.result not in engine, f"{shim.result} leaked"
            for volume in shim.volumes:
                assert docker("volume", "ls", "-q", "--filter", f"name=^{volume}$") == "", volume
            continue
        assert shim.result in engine, f"{shim.result} lost\n{daemon.log()}"
        cid = engine[shim.result]
        if shim.container_id:
            assert cid == shim.container_id, f"{shim.result} got a second container"
        shim.container_id = cid
        shim.volumes |= volumes_of(cid)
        want = {"created": "created", "running": "running", "paused": "paused"}[shim.want]
        assert engine_state(cid) == want, f"{shim.result}: {engine_state(cid)}, want {want}"


@pytest.fixture
def pull_refs(short_tmp: Path, test_image: str) -> Iterator[list[str]]:
    """Images only the local registry has: each task that uses one makes a real pull."""
    if not registry_available():
        if os.environ.get("BOINCD_REQUIRE_ENGINE") == "1":
            pytest.fail("docker-registry is required in CI (scripts/setup.sh installs it)")
        yield []
        return
    tag = uuid.uuid4().hex[:8]
    refs: list[str] = []
    with local_registry() as registry:
        try:
            for i in range(3):
                local = f"boincd-test/faults-pull-{i}:{tag}"
                import_image(local, busybox_rootfs_tar(f"{tag}-{i}"))
                refs.append(push_image(registry, local, f"faults-{i}", tag))
                docker("rmi", local)
            yield refs
        finally:
            for ref in refs:
                docker("rmi", "-f", ref, check=False)
            for i in range(3):
                docker("rmi", "-f", f"boincd-test/faults-pull-{i}:{tag}", check=False)


@pytest.mark.timeout(120 + 10 * ROUNDS)
def test_sigkill_at_random_lifecycle_points_loses_and_leaks_nothing(
    short_tmp: Path, volume_image: str, pull_refs: list[str]
) -> None:
    seed = int(os.environ.get("BOINCD_FAULT_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    archive = short_tmp / "image.tar"
    docker("save", "-o", str(archive), volume_image)
    base = short_tmp / "d"
    base.mkdir()
    # A collector that runs all the time, with almost no grace: it must still never
    # take a live task (their slots say BOINC has them).
    (base / "config.toml").write_text(
        "relist_interval_s = 2.0\ngc_interval_s = 0.2\ngc_grace_s = 0.5\n"
    )
    daemon = DaemonProcess(base)
    shims: dict[str, Shim] = {}
    pulls = list(pull_refs)
    counter = 0
    points: dict[str, int] = {}
    try:
        daemon.start()
        for round_no in range(ROUNDS):
            live = [s for s in shims.values() if s.want != "removed"]
            if len(live) < LIVE_TASKS and (not live or rng.random() < 0.4):
                action = "create"
            else:
                shim = rng.choice(live)
                action = rng.choice(NEXT[shim.want])
            if action == "create":
                result = f"fault_{counter}"
                slot = boinc_slot(short_tmp, counter, result)
                source: dict[str, Any] = {"image": volume_image}
                kind = rng.random()
                if kind < 0.3 and pulls:
                    source = {"image": pulls.pop()}
                    action = "create (pull)"
                elif kind < 0.6:
                    shutil.copy(archive, slot / "image.tar")
                    source = {"image_archive": "image.tar"}
                    action = "create (load)"
                counter += 1
                shim = Shim(result, slot, task_body(slot, result, **source))
                shims[result] = shim
                request: tuple[str, str, Any] = ("POST", "/v1/tasks", shim.body)
            elif action == "remove":
                shim.want = "removed"
                # BOINC cleans the slot out when the task ends for good.
                (shim.slot / "init_data.xml").unlink()
                request = ("DELETE", f"/v1/tasks/{shim.result}", None)
            else:
                shim.want = WANT[action]
                request = ("POST", f"/v1/tasks/{shim.result}/{action}", None)
            points[action] = points.get(action, 0) + 1

            def send(request: tuple[str, str, Any] = request) -> None:
                with contextlib.suppress(DaemonError, DaemonUnreachable):
                    daemon.request(*request)

            sender = threading.Thread(target=send)
            sender.start()
            time.sleep(rng.uniform(0.0, 0.3))
            daemon.stop(signal.SIGKILL)
            sender.join(60)
            daemon.start()
            for each in shims.values():
                drive(daemon, each)
            check(daemon, shims)
            print(f"round {round_no}: {action} {shim.result} -> {shim.want}")
        for shim in shims.values():
            shim.want = "removed"
            drive(daemon, shim)
        check(daemon, shims)
        assert owned_containers(daemon.instance_id) == {}
        label = f"label={L.OWNER}={daemon.instance_id}"
        assert docker("volume", "ls", "-q", "--filter", label) == ""
        print(f"seed {seed}, {ROUNDS} kills: {points}")
    except BaseException:
        print(f"BOINCD_FAULT_SEED={seed} reproduces this run")
        raise
    finally:
        daemon.kill()
        daemon.cleanup_engine_objects()


# -- a second dockerd of our own: stopped, restarted, its disk filled -------------------


class SecondEngine:
    """A dockerd on its own socket, data root on a small tmpfs, no bridge, no iptables,
    in a network namespace of its own: a dockerd started with --bridge=none deletes
    the host's docker0, which would break the system dockerd's bridge network."""

    def __init__(self, size_mb: int = 96) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bd-eng-", dir="/tmp"))

        self.data = self.root / "data"
        self.data.mkdir()
        self.host = f"unix://{self.root / 'docker.sock'}"
        self.proc: subprocess.Popen[bytes] | None = None
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(self.data)],
            check=True,
            capture_output=True,
        )

    def cli(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            ["docker", *args],
            env={**os.environ, "DOCKER_HOST": self.host},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} (second engine): {done.stderr.strip()}")
        return done.stdout.strip()

    def up(self) -> bool:
        return self.cli("version", "--format", "{{.Server.Version}}", check=False) != ""

    def start(self) -> None:
        with (self.root / "dockerd.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    # unshare, not `ip netns exec`, which would remount /sys and
                    # hide the cgroup mounts dockerd needs.
                    "unshare",
                    "--net",
                    "dockerd",
                    f"--host={self.host}",
                    f"--data-root={self.data}",
                    f"--exec-root={self.root / 'exec'}",
                    f"--pidfile={self.root / 'dockerd.pid'}",
                    "--bridge=none",
                    "--iptables=false",
                    "--ip6tables=false",
                ],
                stdout=log,
                stderr=log,
            )
        wait_until("the second dockerd", self.up, timeout=60)

    def stop(self) -> None:
        """SIGTERM, as a service manager does: dockerd stops every container first."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no container is stopped on the
        way down (their shims keep them running until the next dockerd starts)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None
        # Its own containerd dies with it (a parent-death signal); but a zombie that
        # no init reaps (as in a container) still reads as running to the next
        # dockerd, which would wait for it forever: forget its pid.
        pidfile = self.root / "exec" / "containerd" / "containerd.pid"
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(pidfile.read_text().strip())

            def gone() -> bool:
                try:
                    return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    return True

            wait_until("the dead dockerd's containerd to end", gone, timeout=60)
            pidfile.unlink()

    def destroy(self) -> None:
        self.stop()
        # Containers a dead dockerd left to their shims (if it never came back).
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if cmdline and "containerd-shim" in cmdline[0] and str(self.root) in " ".join(cmdline):
                with contextlib.suppress(psutil.Error):
                    for child in proc.children(recursive=True):
                        child.kill()
                    proc.kill()
        # Whatever dockerd left mounted under its roots (overlays, netns), deepest first.
        mounts = [
            line.split()[1]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(str(self.root))
        ]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def owned(self, instance_id: str) -> dict[str, str]:
        out = self.cli(
            "ps", "-a", "--no-trunc", "--filter", f"label={L.OWNER}={instance_id}",
            "--format", f'{{{{.ID}}}} {{{{.Label "{L.RESULT}"}}}}',
        )  # fmt: skip
        return {line.split()[1]: line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def second_engine(docker_engine: str, test_image: str) -> Iterator[SecondEngine]:
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        if os.environ.get("BOINCD_REQUIRE_ENGINE") == "1":
            pytest.fail("a second dockerd needs the dockerd binary and root")
        pytest.skip("a second dockerd needs the dockerd binary and root")
    engine = SecondEngine()
    try:
        engine.start()
        image = subprocess.run(["docker", "save", test_image], capture_output=True, check=True)
        loaded = subprocess.run(
            ["docker", "load"],
            input=image.stdout,
            env={**os.environ, "DOCKER_HOST": engine.host},
            capture_output=True,
            check=True,
        )
        assert test_image in loaded.stdout.decode()
        yield engine
    finally:
        engine.destroy()


def engine_daemon(base: Path, engine: SecondEngine, expect_down: bool = False) -> DaemonProcess:
    base.mkdir(parents=True, exist_ok=True)
    # Re-listing an hour apart: whatever the daemon learns meanwhile, it learns from events.
    (base / "config.toml").write_text(
        f'docker_host = "{engine.host}"\n'
        "relist_interval_s = 3600.0\ngc_interval_s = 0.0\ngc_grace_s = 0.0\n"
    )
    return DaemonProcess(base, {"BOINCD_EXPECT_ENGINE_DOWN": "1"} if expect_down else None)


def reachable(daemon: DaemonProcess) -> bool:
    return bool(daemon.request("GET", "/v1/status")["engine"]["reachable"])


def progress_lines(slot: Path) -> int:
    try:
        return len((slot / "progress").read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_engine_down_at_start_then_restarted_mid_task_the_task_goes_on(
    second_engine: SecondEngine, short_tmp: Path
) -> None:
    engine = second_engine
    engine.stop()
    daemon = engine_daemon(short_tmp / "d", engine, expect_down=True)
    try:
        # The engine is down: the daemon starts anyway and says so.
        daemon.start()
        status = daemon.request("GET", "/v1/status")["engine"]
        assert status["reachable"] is False
        assert status["error"]
        # ctl says so, and exits 5: no task can run (README's exit codes).
        assert re.search(r"engine:?\s+unavailable", ctl(daemon, "status", rc=5))
        slot_a = boinc_slot(short_tmp, 0, "restart_a")
        slot_b = boinc_slot(short_tmp, 1, "restart_b")
        work = "trap 'exit 143' TERM; while true; do echo x >> /app/progress; sleep 0.2; done"
        body_a = task_body(slot_a, "restart_a", command=["sh", "-c", work])
        with pytest.raises(DaemonError) as info:
            daemon.request("POST", "/v1/tasks", body_a)
        assert info.value.status == 503
        assert info.value.retryable

        # The engine comes: the daemon connects by itself (backoff), the shim's retry works.
        engine.start()
        wait_until("the daemon to reach the engine", lambda: reachable(daemon), daemon=daemon)
        a = prepared(daemon, body_a)
        prepared(daemon, task_body(slot_b, "restart_b"))
        for result in ("restart_a", "restart_b"):
            assert daemon.request("POST", f"/v1/tasks/{result}/start")["state"] == "running"
        wait_until("task a working", lambda: progress_lines(slot_a) > 0)

        # The engine restarts (a package upgrade): without live-restore it stops every
        # container on the way down.
        engine.stop()
        wait_until("the daemon to notice", lambda: not reachable(daemon), daemon=daemon)
        (slot_b / "init_data.xml").unlink()  # meanwhile BOINC finished task b
        engine.start()
        wait_until("the daemon to reconnect", lambda: reachable(daemon), daemon=daemon)
        task = daemon.request("GET", "/v1/tasks/restart_a")
        assert task["state"] == "exited"
        assert task["interrupted"] is True, task  # not finished: the shim starts it again
        assert daemon.request("POST", "/v1/tasks/restart_a/start")["state"] == "running"
        assert daemon.request("GET", "/v1/tasks/restart_a")["container_id"] == a["container_id"]
        lines = progress_lines(slot_a)
        wait_until("task a working again", lambda: progress_lines(slot_a) > lines)

        # Events flow again: a change made behind the daemon's back shows at once.
        engine.cli("pause", a["container_id"])
        wait_until(
            "the pause seen through events",
            lambda: daemon.request("GET", "/v1/tasks/restart_a")["state"] == "paused",
            daemon=daemon,
        )
        assert daemon.request("POST", "/v1/tasks/restart_a/resume")["state"] == "running"

        # Task b is over for BOINC: collected; task a stays.
        report = daemon.request("POST", "/v1/gc")
        assert [(r["kind"], r["result"]) for r in report["removed"]] == [("container", "restart_b")]
        assert set(engine.owned(daemon.instance_id)) == {"restart_a"}

        # Both down at once: the daemon SIGKILLed, the engine restarted meanwhile. No
        # event was seen; the engine's start time tells the stop from a real exit.
        daemon.kill()
        engine.stop()
        engine.start()
        daemon.start()
        wait_until("the daemon to reach the engine", lambda: reachable(daemon), daemon=daemon)
        task = daemon.request("GET", "/v1/tasks/restart_a")
        assert task["state"] == "exited"
        assert task["interrupted"] is True, task
        assert daemon.request("POST", "/v1/tasks/restart_a/start")["state"] == "running"
        lines = progress_lines(slot_a)
        wait_until("task a working once more", lambda: progress_lines(slot_a) > lines)
    finally:
        daemon.kill()
        if engine.proc is None:
            engine.start()
        for cid in engine.owned(daemon.instance_id).values():
            engine.cli("rm", "-fv", cid, check=False)


def settled(daemon: DaemonProcess, body: dict[str, Any]) -> dict[str, Any] | None:
    try:
        task: dict[str, Any] = daemon.request("GET", f"/v1/tasks/{body['result']}")
    except DaemonError as exc:
        raise AssertionError(f"{exc.message}\n{daemon.log()}") from exc
    return None if task["state"] == "preparing" else task


def fill(path: Path) -> None:
    """Write zeros until the file system says it is full."""
    chunk = b"\0" * (1 << 20)
    with path.open("wb") as fh:
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError as exc:
            if exc.errno != 28:  # ENOSPC
                raise


def test_a_full_engine_disk_gives_clear_errors_and_no_half_objects(
    second_engine: SecondEngine, short_tmp: Path
) -> None:
    engine = second_engine
    daemon = engine_daemon(short_tmp / "d", engine)
    filler = engine.data / "filler"
    tag = f"boincd-test/full-disk:{uuid.uuid4().hex[:8]}"
    try:
        daemon.start()
        docker("tag", TEST_IMAGE, tag)
        slot_load = boinc_slot(short_tmp, 1, "full_load")
        docker("save", "-o", str(slot_load / "image.tar"), tag)
        docker("rmi", tag)
        images = engine.cli("images", "-q", "--no-trunc")
        body_create = task_body(boinc_slot(short_tmp, 0, "full_create"), "full_create")
        body_load = task_body(slot_load, "full_load", image_archive="image.tar")
        body_load.pop("image")
        fill(filler)
        for body in (body_create, body_load):
            daemon.request("POST", "/v1/tasks", body)
            task = wait_until(
                f"{body['result']} to give up for now",
                lambda b=body: settled(daemon, b),
                daemon=daemon,
            )
            assert task["state"] == "waiting", task  # retryable: the shim asks again later
            assert task["error"]["retryable"] is True
            assert "no space left on device" in task["error"]["message"]
            assert "disk of the container engine is full" in task["error"]["message"]
        # Nothing half-made: no container, no new image.
        assert engine.cli("ps", "-aq") == ""
        assert engine.cli("images", "-q", "--no-trunc") == images
        filler.unlink()
        # Space again: the shims' next create-or-attach goes through.
        for body in (body_create, body_load):
            assert prepared(daemon, body)["state"] == "created"
            assert daemon.request("POST", f"/v1/tasks/{body['result']}/start")["state"] == "running"
        assert set(engine.owned(daemon.instance_id)) == {"full_create", "full_load"}
    finally:
        filler.unlink(missing_ok=True)
        daemon.kill()
        for cid in engine.owned(daemon.instance_id).values():
            engine.cli("rm", "-fv", cid, check=False)
        engine.cli("rmi", tag, check=False)
        docker("rmi", tag, check=False)


def test_engine_sigkilled_and_restarted_mid_task_the_same_container_runs_on(
    second_engine: SecondEngine, short_tmp: Path
) -> None:
    """dockerd SIGKILLed (a crash, the OOM killer): the next dockerd stops, as it
    starts, every container the dead one left running (no live-restore here), and
    their exit 137/143 is no failure of the app: the shim starts the same
    container again and the app goes on from its slot."""
    engine = second_engine
    daemon = engine_daemon(short_tmp / "d", engine)
    work = "trap 'exit 143' TERM; while true; do echo x >> /app/progress; sleep 0.2; done"
    slot = boinc_slot(short_tmp, 0, "crash_a")
    body = task_body(slot, "crash_a", command=["sh", "-c", work])
    try:
        daemon.start()
        first = prepared(daemon, body)
        assert daemon.request("POST", "/v1/tasks/crash_a/start")["state"] == "running"
        wait_until("the task working", lambda: progress_lines(slot) > 0)

        for daemon_too in (False, True):
            if daemon_too:
                daemon.kill()  # no event, no record: the engine's start time must tell
            engine.kill()
            if not daemon_too:
                wait_until("the daemon to notice", lambda: not reachable(daemon), daemon=daemon)
            engine.start()
            if daemon_too:
                daemon.start()
            wait_until("the daemon to reconnect", lambda: reachable(daemon), daemon=daemon)
            state = engine.cli("inspect", "--format", "{{.State.Status}}", first["container_id"])
            assert state == "exited"  # stopped by the new engine as it started
            task = wait_until(
                "the task seen exited",
                lambda: (
                    (t := daemon.request("GET", "/v1/tasks/crash_a"))["state"] == "exited" and t
                ),
                daemon=daemon,
            )
            assert task["interrupted"] is True, (daemon_too, task)
            assert task["error"] is None
            # What the shim does with an interrupted task: start it again.
            again = daemon.request("POST", "/v1/tasks/crash_a/start")
            assert again["state"] == "running", again
            assert again["container_id"] == first["container_id"]
            lines = progress_lines(slot)
            wait_until("the task working again", lambda n=lines: progress_lines(slot) > n)
            assert daemon.request("GET", "/v1/tasks/crash_a")["state"] == "running"
        assert set(engine.owned(daemon.instance_id)) == {"crash_a"}
    finally:
        daemon.kill()
        if engine.proc is None:
            engine.start()
        for cid in engine.owned(daemon.instance_id).values():
            engine.cli("rm", "-fv", cid, check=False)


@pytest.fixture
def small_state_dir(short_tmp: Path) -> Iterator[Path]:
    """The daemon's state dir on a tmpfs of its own (256 KiB), unmounted after."""
    state = short_tmp / "d" / "state"
    state.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0750", "tmpfs", str(state)],
        check=True,
        capture_output=True,
    )
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False, capture_output=True)


def test_a_full_state_disk_still_pauses_at_quit_and_still_enforces_limits(
    second_engine: SecondEngine, short_tmp: Path, small_state_dir: Path
) -> None:
    engine = second_engine
    daemon = engine_daemon(short_tmp / "d", engine)
    assert daemon.state_dir == str(small_state_dir)
    slot_quit = boinc_slot(short_tmp, 0, "full_quit")
    slot_big = boinc_slot(short_tmp, 1, "full_big")
    filler = small_state_dir / "filler"
    try:
        daemon.start()
        quitting = prepared(daemon, task_body(slot_quit, "full_quit"))
        big_work = "sleep 1; head -c 4194304 /dev/zero > /app/fill; sleep 300"
        prepared(
            daemon,
            task_body(slot_big, "full_big", command=["sh", "-c", big_work], disk_bytes=1 << 20),
        )
        for result in ("full_quit", "full_big"):
            assert daemon.request("POST", f"/v1/tasks/{result}/start")["state"] == "running"
        fill(filler)

        # <quit/>: the container is paused all the same, and the answer says why
        # the mark could not be saved, as a retryable error (the shim exits as usual).
        with pytest.raises(DaemonError) as info:
            daemon.request("POST", "/v1/tasks/full_quit/detach")
        assert info.value.status == 503, info.value.message
        assert info.value.code == "state_write_failed"
        assert info.value.retryable
        assert "No space left on device" in info.value.message
        assert engine_state_of(engine, quitting["container_id"]) == "paused"
        task = daemon.request("GET", "/v1/tasks/full_quit")
        assert (task["state"], task["detached"]) == ("paused", True)

        # The disk bound is still enforced, its reason kept in memory.
        stopped = wait_until(
            "the task over its disk bound stopped",
            lambda: (t := daemon.request("GET", "/v1/tasks/full_big"))["state"] == "exited" and t,
            timeout=120,
            daemon=daemon,
        )
        assert stopped["exit_code"] == 137
        assert stopped["limit_exceeded"]["kind"] == "disk", stopped
        assert stopped["interrupted"] is False

        # Space again: the next start resumes the quit task, and the daemon answers
        # as before.
        filler.unlink()
        assert daemon.request("POST", "/v1/tasks/full_quit/start")["state"] == "running"
        assert daemon.request("GET", "/v1/status")["engine"]["reachable"] is True
    finally:
        filler.unlink(missing_ok=True)
        daemon.kill()
        for cid in engine.owned(daemon.instance_id).values():
            engine.cli("rm", "-fv", cid, check=False)


def engine_state_of(engine: SecondEngine, container_id: str) -> str:
    return engine.cli("inspect", "--format", "{{.State.Status}}", container_id)
