"""Run the real daemon as a subprocess on a temporary socket, for end-to-end tests."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from boincd_containers.shim.client import DaemonClient, DaemonUnreachable

TEST_IMAGE = "boincd-test/busybox:latest"


class EngineCli(Protocol):
    """The engine's command line (testing/podman.py TestEngine): docker or podman."""

    def cli(self, *args: str, check: bool = True) -> str: ...

    def inspect(self, container_id: str) -> dict[str, Any]: ...


def docker(*args: str, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


BUSYBOX = Path("/bin/busybox")  # Debian busybox-static: no shared libraries needed
_MTIME = 1_700_000_000  # fixed, so the same busybox always gives the same layer


def busybox_rootfs(busybox: Path = BUSYBOX) -> bytes:
    """A root filesystem tar: busybox and a symlink to it for each of its applets.

    `busybox --list` names `busybox` itself; linking that name too would make the
    binary a symlink to itself, and no command would run in the image.
    """
    if not busybox.exists():
        raise RuntimeError(f"{busybox} is missing: apt-get install busybox-static")
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("bin", "tmp"):
            info = tarfile.TarInfo(name)
            info.type, info.mtime = tarfile.DIRTYPE, _MTIME
            info.mode = 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        data = busybox.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode, info.mtime = len(data), 0o755, _MTIME
        tar.addfile(info, io.BytesIO(data))
        for applet in sorted(set(applets) - {"busybox"}):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mtime = tarfile.SYMTYPE, "busybox", _MTIME
            tar.addfile(info)
    return buf.getvalue()


def build_busybox_image(
    name: str,
    cmd: list[str],
    check: list[str],
    *,
    expect: str = "",
    labels: dict[str, str] | None = None,
) -> str:
    """Build `name` from local files (no registry is reachable here) and return its id.

    `cmd` is the image's default command. The image is built under a temporary
    tag and must run `check` (the default command when empty) with exit 0,
    network none, and `expect` in its output, before `name` is moved onto it: a
    broken build never replaces a working image, and `name` never disappears
    while other test sessions use it.
    """
    tmp = f"boincd-test/building:{uuid.uuid4().hex[:12]}"
    changes = [f"CMD {json.dumps(cmd)}", *(f"LABEL {k}={v}" for k, v in (labels or {}).items())]
    done = subprocess.run(
        ["docker", "import", *(f"--change={c}" for c in changes), "-", tmp],
        input=busybox_rootfs(),
        capture_output=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"docker import failed: {done.stderr.decode(errors='replace')}")
    try:
        run = subprocess.run(
            ["docker", "run", "--rm", "--network", "none", tmp, *check],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if run.returncode != 0 or expect not in run.stdout:
            raise RuntimeError(
                f"the freshly built {name} does not run {check or cmd}: "
                f"exit {run.returncode}: {run.stdout.strip()} {run.stderr.strip()}"
            )
        docker("tag", tmp, name)
        return docker("image", "inspect", "--format", "{{.Id}}", name)
    finally:
        docker("rmi", tmp, check=False)  # the tag only: `name` keeps the image


def rebuild_test_image(name: str = TEST_IMAGE) -> str:
    """Build the busybox test image anew, whatever is there (a fresh machine each run).

    The image it replaces is removed unless a container still uses it.
    """
    old = docker("image", "inspect", "--format", "{{.Id}}", name, check=False)
    new = build_busybox_image(name, ["/bin/sh"], ["sh", "-c", "true"])
    if old and old != new:
        docker("rmi", old, check=False)
    return new


def ensure_test_image(name: str = TEST_IMAGE) -> str:
    """The busybox test image, built if absent (`tests/prepare_images.py` rebuilds it)."""
    if subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode != 0:
        rebuild_test_image(name)
    return name


class DaemonProcess:
    def __init__(
        self,
        base: Path,
        extra_env: dict[str, str] | None = None,
        engine: EngineCli | None = None,
        argv_prefix: list[str] | None = None,
        python: str | None = None,
    ) -> None:
        self.base = base
        self.socket = str(base / "run" / "boincd.sock")
        self.state_dir = str(base / "state")
        self.config = base / "config.toml"
        if not self.config.exists():
            self.config.write_text("relist_interval_s = 5.0\n")
        self.log_path = base / "daemon.log"
        self.extra_env = extra_env or {}
        # The engine the tests check and clean up with (docker's CLI by default), and
        # what runs the daemon (e.g. setpriv, to run it as an unprivileged user).
        self.engine = engine
        self.argv_prefix = argv_prefix or []
        self.python = python or sys.executable
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "BOINCD_SOCKET": self.socket,
            "BOINCD_STATE_DIR": self.state_dir,
            "BOINCD_CONFIG": str(self.config),
            "BOINCD_LOG_JSON": "1",
            **self.extra_env,
        }

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.argv_prefix, self.python, "-m", "boincd_containers", "serve"],
            env=self.env,
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited at start:\n{self.log()}")
            try:
                status = self.request("GET", "/v1/status")
                if status["engine"]["reachable"] or "BOINCD_EXPECT_ENGINE_DOWN" in self.extra_env:
                    return self
            except DaemonUnreachable:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not come up in {timeout} s:\n{self.log()}")

    def client(self, timeout: float = 30.0) -> DaemonClient:
        return DaemonClient(self.socket, timeout=timeout)

    def request(self, method: str, url: str, body: Any = None) -> Any:
        client = self.client()
        try:
            return client.request(method, url, body)
        finally:
            client.close()

    def wait_task(
        self, result: str, states: set[str], timeout: float = 30, *, project: str | None = None
    ) -> dict[str, Any]:
        """Poll the task (of `project`, when given) until its state is one of
        `states`; fail with the daemon's log."""
        deadline = time.monotonic() + timeout
        task: dict[str, Any] = {}
        path = f"/v1/tasks/{result}" + (f"?project={project}" if project else "")
        while time.monotonic() < deadline:
            task = self.request("GET", path)
            if task["state"] in states:
                return task
            time.sleep(0.05)
        raise AssertionError(
            f"task {result} stayed {task.get('state')}, wanted {states}\n{self.log()}"
        )

    @property
    def instance_id(self) -> str:
        return (Path(self.state_dir) / "instance_id").read_text().strip()

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-5000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def cleanup_engine_objects(self) -> None:
        """Remove whatever this daemon instance created, even if a test failed midway."""
        try:
            owner = self.instance_id
        except OSError:
            return
        label = f"label=org.boinc.containers.owner={owner}"
        cli = self.engine.cli if self.engine is not None else docker
        ids = cli("ps", "-aq", "--filter", label, check=False).split()
        if ids:
            cli("rm", "-fv", *ids, check=False)
        volumes = cli("volume", "ls", "-q", "--filter", label, check=False).split()
        if volumes:
            cli("volume", "rm", "-f", *volumes, check=False)
        self.release_mounts()

    def release_mounts(self) -> None:
        """Unmount the daemon's task mount points (host/mounts.py): a killed daemon leaves
        them, and removing the test dir would otherwise reach into the slots."""
        root = Path(self.state_dir) / "mounts"
        if root.is_dir() and os.geteuid() == 0:
            from boincd_containers.host.mounts import MountTable

            table = MountTable(Path(self.state_dir))
            for name in os.listdir(root):
                table.release(name)


def container_state(container_id: str, engine: EngineCli | None = None) -> dict[str, Any]:
    if engine is not None:
        return engine.inspect(container_id)
    data: dict[str, Any] = json.loads(docker("inspect", container_id))[0]
    return data
