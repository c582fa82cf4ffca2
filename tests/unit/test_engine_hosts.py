"""Finding the engine (DESIGN order, first usable socket) and telling what it is."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from boincd_containers.engine import hosts as engine_hosts
from boincd_containers.engine.hosts import candidate_hosts, identify, pick_host, usable_socket


@pytest.fixture
def sockets(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Docker's and rootful Podman's well-known paths moved under a temp dir."""
    monkeypatch.setattr(engine_hosts, "DOCKER_SOCKET", str(short_tmp / "docker.sock"))
    monkeypatch.setattr(engine_hosts, "PODMAN_ROOTFUL_SOCKET", str(short_tmp / "podman.sock"))
    (short_tmp / "user" / "podman").mkdir(parents=True)
    return short_tmp


def listen(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    return server


def stale(path: Path) -> None:
    """A socket file whose engine has gone: bound, then closed."""
    listen(path).close()


def test_explicit_host_wins_then_docker_host() -> None:
    env = {"DOCKER_HOST": "unix:///env.sock", "XDG_RUNTIME_DIR": "/run/user/7"}
    assert candidate_hosts("tcp://h:2375", env) == ["tcp://h:2375"]
    assert candidate_hosts(None, env) == ["unix:///env.sock"]


def test_default_order_is_docker_then_own_rootless_podman_then_rootful_podman() -> None:
    hosts = candidate_hosts(None, {"XDG_RUNTIME_DIR": "/run/user/7"})
    assert hosts == [
        "unix://" + engine_hosts.DOCKER_SOCKET,
        "unix:///run/user/7/podman/podman.sock",
        "unix://" + engine_hosts.PODMAN_ROOTFUL_SOCKET,
    ]


def test_without_xdg_runtime_dir_the_users_run_dir_is_used() -> None:
    assert engine_hosts.rootless_podman_socket({}, uid=1234) == "/run/user/1234/podman/podman.sock"


def test_the_first_socket_that_answers_is_picked(sockets: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(sockets / "user")}
    rootless = sockets / "user" / "podman" / "podman.sock"
    # Nothing yet: the first candidate, so errors name the usual place.
    assert pick_host(None, env) == "unix://" + str(sockets / "docker.sock")
    stale(sockets / "docker.sock")  # a dockerd that stopped left its socket behind
    servers = [listen(rootless), listen(sockets / "podman.sock")]
    try:
        assert not usable_socket("unix://" + str(sockets / "docker.sock"))
        assert pick_host(None, env) == "unix://" + str(rootless)
        (sockets / "docker.sock").unlink()
        servers.append(listen(sockets / "docker.sock"))
        assert pick_host(None, env) == "unix://" + str(sockets / "docker.sock")
    finally:
        for server in servers:
            server.close()


def test_a_socket_we_may_not_write_is_skipped(sockets: Path) -> None:
    server = listen(sockets / "docker.sock")
    try:
        (sockets / "docker.sock").chmod(0o600)
        assert usable_socket("unix://" + str(sockets / "docker.sock"))
        (sockets / "docker.sock").chmod(0o000)
        # Root may open anything; everyone else is told no by the mode bits.
        assert usable_socket("unix://" + str(sockets / "docker.sock")) == (os.geteuid() == 0)
    finally:
        server.close()


def test_remote_hosts_are_taken_as_given() -> None:
    assert usable_socket("tcp://192.0.2.1:2375")
    assert pick_host("ssh://me@host") == "ssh://me@host"


PODMAN_VERSION = {"Components": [{"Name": "Podman Engine", "Version": "4.3.1"}]}
DOCKER_VERSION = {"Components": [{"Name": "Engine", "Version": "20.10.24"}]}


def test_docker_rootless_shows_in_security_options() -> None:
    info = {"SecurityOptions": ["name=seccomp,profile=default", "name=rootless"]}
    assert identify(DOCKER_VERSION, info) == engine_hosts.EngineIdentity("docker", True)
    assert identify(DOCKER_VERSION, {}) == engine_hosts.EngineIdentity("docker", False)


def test_podman_rootless_shows_only_in_libpod_info() -> None:
    # Measured with Podman 4.3.1 rootless: the compatible /info does not say it.
    info = {"SecurityOptions": ["name=seccomp,profile=default"]}
    libpod = {"host": {"security": {"rootless": True}}}
    assert identify(PODMAN_VERSION, info, libpod) == engine_hosts.EngineIdentity("podman", True)
    rootful = {"host": {"security": {"rootless": False}}}
    assert identify(PODMAN_VERSION, info, rootful).rootless is False
    assert identify(PODMAN_VERSION, info, None).kind == "podman"
