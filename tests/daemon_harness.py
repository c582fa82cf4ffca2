"""Run the real daemon as a subprocess on a temporary socket, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from boincd_containers.shim.client import DaemonClient, DaemonUnreachable

TEST_IMAGE = "boincd-test/busybox:latest"


class EngineCli(Protocol):
    """The engine's command line (tests/podman_harness.py TestEngine): docker or podman."""

    def cli(self, *args: str, check: bool = True) -> str: ...

    def inspect(self, container_id: str) -> dict[str, Any]: ...


def docker(*args: str, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def ensure_test_image(name: str = TEST_IMAGE) -> str:
    """A busybox image made from local files: no registry is reachable here."""
    if subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0:
        return name
    busybox = Path("/bin/busybox")
    script = (
        'set -e; d=$(mktemp -d); mkdir -p "$d/bin" "$d/tmp"; cp /bin/busybox "$d/bin/"; '
        'for c in $("$d/bin/busybox" --list); do ln -sf busybox "$d/bin/$c"; done; '
        f'tar -C "$d" -c . | docker import -c \'CMD ["/bin/sh"]\' - {name}; rm -rf "$d"'
    )
    if not busybox.exists():
        raise RuntimeError("/bin/busybox is missing: apt-get install busybox-static")
    subprocess.run(["bash", "-c", script], check=True, capture_output=True, timeout=120)
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

    def wait_task(self, result: str, states: set[str], timeout: float = 30) -> dict[str, Any]:
        """Poll the task until its state is one of `states`; fail with the daemon's log."""
        deadline = time.monotonic() + timeout
        task: dict[str, Any] = {}
        while time.monotonic() < deadline:
            task = self.request("GET", f"/v1/tasks/{result}")
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
        """Unmount the daemon's task mount points (mounts.py): a killed daemon leaves
        them, and removing the test dir would otherwise reach into the slots."""
        root = Path(self.state_dir) / "mounts"
        if root.is_dir() and os.geteuid() == 0:
            from boincd_containers.mounts import MountTable

            table = MountTable(Path(self.state_dir))
            for name in os.listdir(root):
                table.release(name)


def container_state(container_id: str, engine: EngineCli | None = None) -> dict[str, Any]:
    if engine is not None:
        return engine.inspect(container_id)
    data: dict[str, Any] = json.loads(docker("inspect", container_id))[0]
    return data
