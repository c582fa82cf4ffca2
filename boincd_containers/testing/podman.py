"""Engines for the real-engine tests: Docker, and Podman served by the tests themselves.

Each test session that needs Podman starts its own `podman system service` on a
private socket (rootful as root, or rootless as an unprivileged user) and stops
it at the end; nothing has to run before the tests but `scripts/setup.sh --test`
(packages, the test user and its /etc/subuid range). The service reads its own
containers.conf (CONTAINERS_CONF): on hosts whose hard limits are below Podman's
default ulimits (nofile 1048576) containers start only with ulimits inside them.

The engine's command line (`docker`, or `podman --url SOCKET`, which talks to
that same service) is what tests use to check the engine's state themselves.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.shim.client import DaemonClient
from boincd_containers.testing.daemon import TEST_IMAGE, ensure_test_image

# Modules whose tests run on both engines:
#   pytestmark = [pytest.mark.parametrize("engine", ENGINES, indirect=True)]
ENGINES = ["docker", pytest.param("podman", marks=pytest.mark.podman)]
ROOTLESS_USER = "boinctest"  # created by scripts/setup.sh --test, with a subuid range
_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class TestEngine:
    """One engine under test: where it listens and the CLI that talks to it."""

    kind: str  # "docker" or "podman"
    host: str  # unix://PATH
    cli_prefix: tuple[str, ...]
    rootless: bool = False

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __str__(self) -> str:
        return f"{'rootless ' if self.rootless else ''}{self.kind}"

    @property
    def socket(self) -> str:
        return self.host.removeprefix("unix://")

    def cli(
        self, *args: str, check: bool = True, stdin: bytes | None = None, timeout: float = 120
    ) -> str:
        done = subprocess.run(
            [*self.cli_prefix, *args], capture_output=True, input=stdin, timeout=timeout
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(self.cli_prefix)} {' '.join(args)} failed: "
                f"{done.stderr.decode(errors='replace').strip()}"
            )
        return done.stdout.decode(errors="replace").strip()

    def force_remove(self, *refs: str) -> None:
        """Remove containers now, whatever they run. Podman's `rm -f` would first stop
        with the container's stop timeout (10 s for containers its CLI made)."""
        fast = ("--time", "0") if self.kind == "podman" else ()
        self.cli("rm", "-f", *fast, *refs, check=False)

    def api(self, path: str) -> Any:
        """GET on the engine's Docker-compatible API, what the daemon itself reads
        (Podman's CLI prints its own, different, inspect format)."""
        client = DaemonClient(self.socket, timeout=60)
        try:
            return client.request("GET", path)
        finally:
            client.close()

    def inspect(self, container_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self.api(f"/containers/{container_id}/json")
        return data

    def has_image(self, name: str) -> bool:
        return (
            subprocess.run(
                [*self.cli_prefix, "image", "inspect", name], capture_output=True, timeout=60
            ).returncode
            == 0
        )

    def image_id(self, name: str) -> str | None:
        """The image's id without its `sha256:` prefix, None when absent."""
        out = self.cli("image", "inspect", "--format", "{{.Id}}", name, check=False)
        return out.removeprefix("sha256:") or None

    def ensure_test_image(self, name: str = TEST_IMAGE) -> str:
        """The busybox test image in this engine's store: built into Docker from local
        files, then copied into Podman (`podman load` reads `docker save` archives).
        A copy whose id differs from Docker's (an older build) is replaced."""
        ensure_test_image(name)
        if self.kind == "docker" or self.image_id(name) == DOCKER.image_id(name):
            return name
        self.cli("rmi", "-f", name, check=False)
        archive = subprocess.run(["docker", "save", name], capture_output=True, check=True).stdout
        self.cli("load", stdin=archive, timeout=300)
        return name

    def remove_image(self, name: str) -> None:
        """Untag `name` here (what a fresh machine lacks); layers other images use stay."""
        self.cli("rmi", "-f", name, check=False)


DOCKER = TestEngine("docker", "unix:///var/run/docker.sock", ("docker",))


def podman_available() -> bool:
    return shutil.which("podman") is not None


def _ulimits() -> list[str]:
    """Podman's default ulimits clipped to this host's hard limits (else no container
    starts: "setrlimit RLIMIT_NOFILE: operation not permitted")."""
    out = []
    for name, which, default in (
        ("nofile", resource.RLIMIT_NOFILE, 1048576),
        ("nproc", resource.RLIMIT_NPROC, 4096),
    ):
        hard = resource.getrlimit(which)[1]
        value = default if hard == resource.RLIM_INFINITY else min(hard, default)
        out.append(f"{name}={value}:{value}")
    return out


def containers_conf() -> str:
    return "[containers]\ndefault_ulimits = [" + ", ".join(f'"{u}"' for u in _ulimits()) + "]\n"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def named(cls, name: str) -> User:
        entry = pwd.getpwnam(name)
        return cls(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    @property
    def runtime_dir(self) -> Path:
        return Path(f"/run/user/{self.uid}")

    def command(self, argv: list[str]) -> list[str]:
        """argv run as this user (no root anywhere in that process tree)."""
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "--reset-env",
            *argv,
        ]

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            **extra,
        }


def rootless_user() -> User | None:
    """The test user, if it exists with a subordinate id range (setup.sh makes both)."""
    try:
        user = User.named(ROOTLESS_USER)
    except KeyError:
        return None
    ranges = Path("/etc/subuid").read_text() if Path("/etc/subuid").exists() else ""
    if not any(line.split(":")[0] in (user.name, str(user.uid)) for line in ranges.split()):
        return None
    return user


class PodmanService:
    """`podman system service --time=0` on a private socket, stopped with the tests.

    Rootful by default; with a `user`, rootless as that user, on the usual
    rootless socket `$XDG_RUNTIME_DIR/podman/podman.sock` (what the daemon finds
    by itself). Rootless Podman keeps a "pause process" holding its user
    namespace after the service ends; the one this service started is ended too.
    """

    def __init__(self, user: User | None = None) -> None:
        self.user = user
        self.base = Path(tempfile.mkdtemp(prefix="bd-podman-"))
        self.base.chmod(0o755)
        self.conf = self.base / "containers.conf"
        self.log_path = self.base / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._made_runtime_dir = False
        self._pause_pid_before: int | None = None
        if user is None:
            self.socket = str(self.base / "podman.sock")
        else:
            self.socket = str(user.runtime_dir / "podman" / "podman.sock")

    @property
    def engine(self) -> TestEngine:
        host = "unix://" + self.socket
        return TestEngine("podman", host, ("podman", "--url", host), rootless=self.user is not None)

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def start(self) -> TestEngine:
        self.conf.write_text(containers_conf())
        self.conf.chmod(0o644)
        argv = ["podman", "system", "service", "--time=0", "unix://" + self.socket]
        if self.user is None:
            env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        else:
            self._prepare_runtime_dir(self.user)
            env = self.user.env(CONTAINERS_CONF=str(self.conf))
            argv = self.user.command(["env", *(f"{k}={v}" for k, v in env.items()), *argv])
        log = self.log_path.open("ab")
        try:
            # Its own session: stop() ends the service and whatever it forked, no more.
            self.proc = subprocess.Popen(
                argv, env=env, stdout=log, stderr=log, cwd="/", start_new_session=True
            )
        finally:
            log.close()
        self._wait_ready()
        return self.engine

    def _prepare_runtime_dir(self, user: User) -> None:
        runtime = user.runtime_dir
        if not runtime.exists():
            runtime.mkdir(mode=0o700, parents=True)
            os.chown(runtime, user.uid, user.gid)
            self._made_runtime_dir = True
        (runtime / "podman").mkdir(exist_ok=True)
        os.chown(runtime / "podman", user.uid, user.gid)
        self._pause_pid_before = self._pause_pid()
        if Path(self.socket).exists():
            raise RuntimeError(
                f"{self.socket} exists: another rootless Podman service of {user.name} is "
                "running; stop it first"
            )

    def _pause_pid(self) -> int | None:
        if self.user is None:
            return None
        try:
            return int((self.user.runtime_dir / "libpod/tmp/pause.pid").read_text())
        except (OSError, ValueError):
            return None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"podman system service exited at start:\n{self.log()}")
            done = subprocess.run(
                [*self.engine.cli_prefix, "version", "--format", "{{.Server.Version}}"],
                capture_output=True,
                timeout=30,
            )
            if done.returncode == 0:
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"podman system service did not answer in time:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        pause = self._pause_pid()
        if pause is not None and pause != self._pause_pid_before:
            # Ours: it would keep the user namespace (and its processes' memory) alive.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pause, signal.SIGKILL)
        if self.proc is not None:
            # Only a socket this service made: after a failed start it can be
            # another session's.
            Path(self.socket).unlink(missing_ok=True)
        if self._made_runtime_dir and self.user is not None:
            shutil.rmtree(self.user.runtime_dir, ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)


def daemon_env(engine: TestEngine) -> dict[str, str]:
    """Environment for a daemon on `engine`: Docker is found the usual way, the
    tests' private Podman socket has to be named."""
    return {} if engine.kind == "docker" else {"DOCKER_HOST": engine.host}
