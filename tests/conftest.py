"""Shared fixtures. Real-engine tests skip without dockerd, except in CI where
BOINCD_REQUIRE_ENGINE=1 turns a missing engine into a failure.

`engine` is Docker unless a module asks for more with
`pytest.mark.parametrize("engine", ENGINES, indirect=True)` (ENGINES from
boincd_containers/testing/podman.py): then its tests run
once per engine, ids `[docker]` and `[podman]`; Podman is a rootful
`podman system service` the session starts (boincd_containers/testing/podman.py).

`boinc_client` is the BOINC client release (boincd_containers/testing/clients.py): a test that uses
it runs under each, ids `[7.20.5]` and `[8.2.15]`; BOINCD_REQUIRE_BOINC=1 turns
a missing release into a failure."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincd_containers.testing.boinc import ClientBinaries
from boincd_containers.testing.clients import CLIENT_PARAMS, require_client
from boincd_containers.testing.daemon import DaemonProcess, docker
from boincd_containers.testing.podman import (
    DOCKER,
    PodmanService,
    TestEngine,
    daemon_env,
    podman_available,
)


def _docker_up() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def docker_engine() -> str:
    if not _docker_up():
        if os.environ.get("BOINCD_REQUIRE_ENGINE") == "1":
            pytest.fail("dockerd is required (BOINCD_REQUIRE_ENGINE=1) but not reachable")
        pytest.skip("no reachable dockerd")
    return "unix:///var/run/docker.sock"


@pytest.fixture(scope="session")
def engine(request: pytest.FixtureRequest) -> Iterator[TestEngine]:
    """The engine a test runs on: Docker by default, or the parametrized one."""
    kind = getattr(request, "param", "docker")
    if kind == "docker":
        request.getfixturevalue("docker_engine")
        yield DOCKER
        return
    if not podman_available():
        if os.environ.get("BOINCD_REQUIRE_ENGINE") == "1":
            pytest.fail("podman is required (BOINCD_REQUIRE_ENGINE=1) but not installed")
        pytest.skip("podman is not installed")
    service = PodmanService()
    try:
        yield service.start()
    finally:
        service.stop()


@pytest.fixture(scope="session")
def test_image(engine: TestEngine) -> str:
    return engine.ensure_test_image()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """Unix socket paths must stay under ~108 bytes: pytest's tmp_path can be too long."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="bd-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        _unmount_under(path)
        shutil.rmtree(path, ignore_errors=True)


def _unmount_under(path: Path) -> None:
    """A daemon killed by a test leaves its task mount points (host/mounts.py) under its
    state dir: unmount them, deepest first, before removing the test's files."""
    if os.geteuid() != 0:
        return
    from boincd_containers.host.mounts import mounted_paths, unmount

    prefix = f"{path}/"
    for point in sorted((p for p in mounted_paths() if p.startswith(prefix)), reverse=True):
        unmount(point)


@pytest.fixture
def daemon(short_tmp: Path, engine: TestEngine, test_image: str) -> Iterator[DaemonProcess]:
    """The real daemon, as a process, on the real engine (dockerd unless parametrized)."""
    process = DaemonProcess(short_tmp, extra_env=daemon_env(engine), engine=engine)
    try:
        yield process.start()
    finally:
        process.kill()
        process.cleanup_engine_objects()


@pytest.fixture
def volume_image(short_tmp: Path, test_image: str) -> Iterator[str]:
    """An image that declares a VOLUME: each container gets an anonymous volume."""
    tag = f"boincd-test/volume:{uuid.uuid4().hex[:8]}"
    context = short_tmp / "volume-image"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {test_image}\nVOLUME /scratch\n")
    docker("build", "-q", "-t", tag, str(context))
    try:
        yield tag
    finally:
        docker("rmi", "-f", tag, check=False)


@pytest.fixture(scope="session", params=CLIENT_PARAMS)
def boinc_client(request: pytest.FixtureRequest) -> ClientBinaries:
    """The BOINC client release a test runs under: each test using it runs under
    7.20.5 and 8.2.15 (boincd_containers/testing/clients.py), failing where BOINCD_REQUIRE_BOINC=1
    and that release is missing."""
    binaries: ClientBinaries = request.param
    return require_client(binaries)
