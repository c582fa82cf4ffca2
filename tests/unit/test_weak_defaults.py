"""Defaults that hold without the job asking: a memory and a CPU limit always, a
read-only root (with a bounded writable /tmp) where the task user is not root
inside, and an engine refusal that no retry can fix failing the task at once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import psutil
import pytest
from aiodocker.exceptions import DockerError

from boincd_containers.core.errors import EngineRefused, Unavailable
from boincd_containers.core.settings import Settings
from boincd_containers.engine.adapter import Engine
from boincd_containers.engine.info import EngineInfo
from boincd_containers.engine.session import Session, translate
from boincd_containers.images.cache import ImageCache
from boincd_containers.job.spec import (
    MIN_MEMORY_BYTES,
    MIN_NANO_CPUS,
    TaskRequest,
    container_config,
    parse_request,
)
from boincd_containers.tasks.manager import TaskManager
from boincd_containers.tasks.registry import Registry
from boincd_containers.testing.fakes import FakeEngine

MiB = 1 << 20


def request(tmp_path: Path, **extra: Any) -> TaskRequest:
    return parse_request(
        {
            "result": "r_0",
            "project": "proj",
            "slot_dir": str(tmp_path),
            "image": "boincd-test/busybox:latest",
            **extra,
        }
    )


def host_config(req: TaskRequest, **options: Any) -> dict[str, Any]:
    config = container_config(
        req, "img", owner_id="me", uid=1000, gid=1000, pids_limit=9, network_name="bridge",
        **options,
    )  # fmt: skip
    host: dict[str, Any] = config["HostConfig"]
    return host


def test_a_task_without_a_memory_bound_gets_the_default_limit(tmp_path: Path) -> None:
    host = host_config(request(tmp_path), default_memory_bytes=300 * MiB)
    assert host["Memory"] == host["MemorySwap"] == 300 * MiB
    bounded = host_config(request(tmp_path, memory_bytes=64 * MiB), default_memory_bytes=300 * MiB)
    assert bounded["Memory"] == 64 * MiB  # BOINC's own bound wins
    tiny = host_config(request(tmp_path, memory_bytes=1))
    assert tiny["Memory"] == MIN_MEMORY_BYTES


def test_the_cpu_limit_stays_within_what_the_engine_takes(tmp_path: Path) -> None:
    assert host_config(request(tmp_path, ncpus=1e-9))["NanoCpus"] == MIN_NANO_CPUS
    assert host_config(request(tmp_path, ncpus=0.5))["NanoCpus"] == 500_000_000
    cpus = os.cpu_count() or 1
    assert host_config(request(tmp_path, ncpus=cpus * 100.0))["NanoCpus"] == cpus * 10**9


def test_a_read_only_root_gets_a_bounded_writable_tmp(tmp_path: Path) -> None:
    host = host_config(
        request(tmp_path, memory_bytes=64 * MiB), read_only_root=True, tmp_bytes=512 * MiB
    )
    assert host["ReadonlyRootfs"] is True
    # Bounded by the memory limit too: tmpfs pages count in it.
    options = f"rw,nosuid,nodev,mode=1777,size={64 * MiB}"
    assert host["Tmpfs"] == {"/tmp": options, "/var/tmp": options}
    writable = host_config(request(tmp_path), read_only_root=False)
    assert writable["ReadonlyRootfs"] is False
    assert "Tmpfs" not in writable


@pytest.fixture
def manager(tmp_path: Path) -> TaskManager:
    engine = FakeEngine()
    registry = Registry(engine, "me")
    images = ImageCache(engine, tmp_path / "state", "me")
    settings = Settings(state_dir=str(tmp_path / "state"), default_memory_bytes=123 * MiB)
    return TaskManager(settings, engine, registry, images)


def test_the_root_is_read_only_by_default_only_where_the_task_user_is_not_root(
    manager: TaskManager, tmp_path: Path
) -> None:
    assert manager.default_memory_bytes == 123 * MiB
    plain = request(tmp_path)
    assert plain.read_only_root is None  # the job said nothing
    assert manager._read_only_root(plain, uid=1000) is True
    assert manager._read_only_root(plain, uid=0) is False  # root inside: /root, /var...
    assert manager._read_only_root(request(tmp_path, read_only_root=False), uid=1000) is False
    assert manager._read_only_root(request(tmp_path, read_only_root=True), uid=0) is True
    engine = cast(FakeEngine, manager.engine)
    engine.info = EngineInfo("podman", "4.3.1", "1.41", True, "1", "cgroupfs", "x", "/")
    assert manager._read_only_root(plain, uid=1000) is False  # rootless: root inside


def test_half_the_hosts_ram_when_no_default_is_set(tmp_path: Path) -> None:
    engine = FakeEngine()
    registry = Registry(engine, "me")
    images = ImageCache(engine, tmp_path, "me")
    tasks = TaskManager(Settings(state_dir=str(tmp_path)), engine, registry, images)
    assert tasks.default_memory_bytes == psutil.virtual_memory().total // 2


# -- engine refusals -------------------------------------------------------------

OCI_PROC = (
    "failed to create shim task: OCI runtime create failed: runc create failed: unable to "
    'start container process: error during container init: error mounting "/slot" to rootfs '
    'at "/proc": "/var/lib/docker/overlay2/x/merged/proc" cannot be mounted because it is not '
    "of type proc: unknown"
)


class RefusingSession(Session):
    """A query that answers as dockerd did here."""

    def __init__(self, message: str) -> None:
        super().__init__("unix:///nonexistent")
        self.message = message

    async def call(self, what: str, path: str, method: str = "GET", **_: Any) -> Any:
        raise translate(DockerError(500, {"message": self.message}), what)


def RefusingEngine(message: str) -> Engine:
    """The real adapter's verbs over that query."""
    return Engine(session=RefusingSession(message))


async def test_an_oci_refusal_at_start_or_create_is_final_with_the_engines_words() -> None:
    engine = RefusingEngine(OCI_PROC)
    with pytest.raises(EngineRefused) as started:
        await engine.containers.start("abc")
    with pytest.raises(EngineRefused) as created:
        await engine.containers.create("boincd__p__r", {"HostConfig": {}})
    for info in (started, created):
        assert info.value.retryable is False
        assert info.value.http_status == 422
        assert "cannot be mounted because it is not of type proc" in info.value.message


@pytest.mark.parametrize(
    "message",
    [
        "OCI runtime create failed: fork/exec: resource temporarily unavailable: unknown",
        "OCI runtime create failed: write /sys/fs/cgroup/x: no space left on device",
        "Cannot connect to the containerd socket: connection refused",
    ],
)
async def test_a_refusal_that_may_pass_stays_retryable(message: str) -> None:
    with pytest.raises(Unavailable) as info:
        await RefusingEngine(message).containers.start("abc")
    assert info.value.retryable is True
