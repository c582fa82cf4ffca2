"""testing/local_registry.py works: push to a local registry, pull back through the
engine, and count pulls from the registry's access log."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincd_containers.testing.local_registry import (
    LocalRegistry,
    busybox_rootfs_tar,
    import_image,
    local_registry,
    push_image,
    registry_available,
)

PREFIX = "boincd-acct-test"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[LocalRegistry]:
    if not registry_available():
        pytest.skip("Debian docker-registry is not installed")
    with local_registry(tmp_path) as reg:
        yield reg
    assert reg.process.poll() is not None  # stopped


@pytest.fixture
def pushed(registry: LocalRegistry, docker_engine: str) -> Iterator[tuple[str, str]]:
    """A fresh image pushed as `<registry>/<repo>:v1`, then removed locally so
    that pulls must fetch it. Yields (remote ref, image id)."""
    uid = uuid.uuid4().hex[:12]
    local, repo = f"{PREFIX}/reg-{uid}:1", f"{PREFIX}/reg-{uid}"
    image_id = import_image(local, busybox_rootfs_tar(uid))
    remote = registry.ref(repo, "v1")
    try:
        assert push_image(registry, local, repo, "v1") == remote
        assert _cli("docker", "rmi", local).returncode == 0
        yield remote, image_id
    finally:
        for ref in (remote, local):
            _cli("docker", "rmi", ref)  # whichever still exists


@pytest.mark.docker
def test_push_then_pulls_are_counted(registry: LocalRegistry, pushed: tuple[str, str]) -> None:
    remote, image_id = pushed
    repo = remote.split("/", 1)[1].rsplit(":", 1)[0]
    # Pushing counts as no pull, and the push tag is gone again.
    assert (registry.pulls(), registry.manifest_gets()) == (0, 0)
    assert _cli("docker", "image", "inspect", remote).returncode != 0

    assert _cli("docker", "pull", "-q", remote).returncode == 0
    inspect = _cli("docker", "image", "inspect", "--format", "{{.Id}}", remote)
    assert inspect.stdout.strip() == image_id
    assert (registry.pulls(repo), registry.manifest_gets(repo)) == (1, 1)
    assert registry.blob_gets(repo) == 2  # the config and the one layer

    # Pulling what is present is still a pull, but downloads nothing.
    assert _cli("docker", "pull", "-q", remote).returncode == 0
    assert (registry.pulls(repo), registry.manifest_gets(repo)) == (2, 1)
    assert registry.blob_gets(repo) == 2
    assert registry.pulls("other/repo") == 0


@pytest.mark.podman
@pytest.mark.docker
def test_podman_pulls_are_counted(registry: LocalRegistry, pushed: tuple[str, str]) -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    remote, image_id = pushed
    try:
        pull = _cli("podman", "pull", "-q", "--tls-verify=false", remote)
        assert pull.returncode == 0, pull.stderr
        assert pull.stdout.strip() == image_id.removeprefix("sha256:")
        assert (registry.pulls(), registry.manifest_gets()) == (1, 1)
    finally:
        _cli("podman", "rmi", remote)  # the ref is unique to this test
