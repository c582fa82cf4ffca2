"""Shared fixtures. Real-engine tests skip without dockerd, except in CI where
BOINCD_REQUIRE_ENGINE=1 turns a missing engine into a failure."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonProcess, ensure_test_image


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
def test_image(docker_engine: str) -> str:
    return ensure_test_image()


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
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(short_tmp: Path, test_image: str) -> Iterator[DaemonProcess]:
    """The real daemon, as a process, on the real dockerd."""
    process = DaemonProcess(short_tmp)
    try:
        yield process.start()
    finally:
        process.kill()
        process.cleanup_engine_objects()
