"""host/cgroups.py against real Docker containers: the figures move when the container
works, agree with the Engine API's own stats, and a stopped container reads as gone."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from boincd_containers.host.cgroups import CgroupGone, CgroupReader, MemoryUsage

pytestmark = pytest.mark.docker

IMAGE = "boincd-test/busybox:latest"
MIB = 1 << 20


def _socket_path() -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return host.removeprefix("unix://")


def _docker(*args: str) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def _docker_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "docker CLI not installed"
    if not os.environ.get("DOCKER_HOST", "unix://").startswith("unix://"):
        return "DOCKER_HOST is not a local socket: its cgroups are not on this host"
    try:
        _docker("version", "--format", "{{.Server.Version}}")
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"docker engine not reachable: {exc}"
    try:
        _docker("image", "inspect", IMAGE)
    except RuntimeError:
        return f"test image {IMAGE} missing"
    return None


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=60)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(self._path)


def _engine_stats(cid: str) -> dict[str, Any]:
    conn = _UnixHTTPConnection(_socket_path())
    try:
        conn.request("GET", f"/containers/{cid}/stats?stream=false")
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body
        stats: dict[str, Any] = json.loads(body)
        return stats
    finally:
        conn.close()


@pytest.fixture(scope="module")
def docker_ready() -> None:
    reason = _docker_unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def start_container(docker_ready: None) -> Iterator[Any]:
    """Starts busybox containers running ``sleep``; removes them whatever happens."""
    created: list[str] = []

    def start(*extra: str) -> tuple[str, int]:
        name = f"boincd-test-cgroups-{uuid.uuid4().hex[:12]}"
        created.append(name)
        cid = _docker("run", "-d", "--name", name, *extra, IMAGE, "sleep", "600")
        pid = int(_docker("inspect", "--format", "{{.State.Pid}}", cid))
        return cid, pid

    try:
        yield start
    finally:
        for name in created:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)


def test_resolves_the_container_own_cgroup(start_container: Any) -> None:
    cid, pid = start_container("--network", "none")
    cg = CgroupReader().get(cid, pid)
    assert cg.dedicated
    assert cid in cg.cpu_dir
    assert cg.memory_dir is not None
    assert cid in cg.memory_dir
    assert cg.cpu_dir.startswith("/sys/fs/cgroup/")


def test_cpu_time_grows_and_matches_the_engine(start_container: Any) -> None:
    cid, pid = start_container("--network", "none")
    reader = CgroupReader()
    before = reader.cpu_time_ns(cid, pid)
    # An exec'd process joins the container's cgroup, so its CPU is the container's.
    _docker("exec", cid, "sh", "-c", "yes > /dev/null & p=$!; sleep 1; kill $p")
    after = reader.cpu_time_ns(cid, pid)
    assert after > before

    # The container is idle again (only sleep), so the engine's figure, read from the
    # same counter, falls between two of ours.
    ours_before = reader.cpu_time_ns(cid, pid)
    engine = _engine_stats(cid)["cpu_stats"]["cpu_usage"]["total_usage"]
    ours_after = reader.cpu_time_ns(cid, pid)
    assert ours_before <= engine <= ours_after


def _engine_working_set(stats: dict[str, Any]) -> int:
    # How `docker stats` and the kubelet derive it: usage less inactive file cache
    # (total_inactive_file on v1, inactive_file on v2).
    mem = stats["memory_stats"]
    inactive = mem["stats"].get("total_inactive_file", mem["stats"].get("inactive_file", 0))
    return max(int(mem["usage"]) - int(inactive), 0)


def test_memory_grows_and_matches_the_engine(start_container: Any) -> None:
    cid, pid = start_container("--network", "none", "--memory", "256m")
    reader = CgroupReader()
    assert reader.memory_limit(cid, pid) == 256 * MIB
    before = reader.memory(cid, pid)

    # tmpfs pages are shared memory, charged to the container and never "inactive
    # file", so they count fully in the working set.
    _docker("exec", cid, "sh", "-c", "head -c 33554432 /dev/zero > /dev/shm/fill")
    after = reader.memory(cid, pid)
    assert isinstance(after, MemoryUsage)
    assert after.usage_bytes - before.usage_bytes >= 30 * MIB
    assert after.working_set_bytes - before.working_set_bytes >= 30 * MIB
    assert after.working_set_bytes == after.usage_bytes - after.inactive_file_bytes

    engine = _engine_working_set(_engine_stats(cid))
    ours = reader.memory(cid, pid).working_set_bytes
    # Both read the same files a moment apart in an idle container: a page or two of
    # difference at most, far below the 32 MiB written.
    assert abs(engine - ours) <= MIB


def test_pids_current(start_container: Any) -> None:
    cid, pid = start_container("--network", "none", "--pids-limit", "64")
    assert CgroupReader().pids_current(cid, pid) == 1  # just sleep


def test_net_dev(start_container: Any) -> None:
    none_cid, none_pid = start_container("--network", "none")
    bridge_cid, bridge_pid = start_container()
    reader = CgroupReader()
    assert reader.net_dev(none_cid, none_pid) == (0, 0)  # only loopback
    rx, tx = reader.net_dev(bridge_cid, bridge_pid)
    assert rx >= 0
    assert tx >= 0


def test_stopped_container_reads_as_gone(start_container: Any) -> None:
    cid, pid = start_container("--network", "none")
    reader = CgroupReader()
    cg = reader.get(cid, pid)
    assert cg.cpu_time_ns() >= 0
    _docker("kill", cid)
    _docker("wait", cid)
    with pytest.raises(CgroupGone):
        cg.cpu_time_ns()
    with pytest.raises(CgroupGone):
        cg.memory()
    with pytest.raises(CgroupGone):
        reader.sample(cid, pid)
    stopped_pid = int(_docker("inspect", "--format", "{{.State.Pid}}", cid))
    with pytest.raises(CgroupGone):
        reader.get(cid, stopped_pid)
