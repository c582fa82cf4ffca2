"""Where the engine is, and what it is (Docker or Podman, rootful or rootless).

Standard library only: `ctl doctor` uses it without loading the daemon's stack.

Order (DESIGN): an explicit host (`--docker-host`/`DOCKER_HOST`, then the
config file's `docker_host`, merged by settings), else the usual Docker socket,
then the Podman socket of the daemon's own user (rootless), then the rootful
Podman socket. Among those defaults the first one the daemon can actually use
wins: the socket exists, we may read and write it, and something listens. So a
root daemon on a Docker host keeps Docker, a Docker socket left behind by a
stopped dockerd does not hide a running Podman, and a daemon running as the
BOINC user (no access to the root-equivalent Docker socket) finds its own
rootless Podman without any setting.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOCKER_SOCKET = "/var/run/docker.sock"
PODMAN_ROOTFUL_SOCKET = "/run/podman/podman.sock"
_PROBE_TIMEOUT_S = 1.0


def rootless_podman_socket(environ: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """`$XDG_RUNTIME_DIR/podman/podman.sock`, where `podman.socket --user` listens."""
    env = os.environ if environ is None else environ
    runtime_dir = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid() if uid is None else uid}"
    return f"{runtime_dir}/podman/podman.sock"


def candidate_hosts(docker_host: str | None, environ: Mapping[str, str] | None = None) -> list[str]:
    """Engine URLs in the order we try them (see the module docstring)."""
    env = os.environ if environ is None else environ
    if docker_host:
        return [docker_host]
    if env.get("DOCKER_HOST"):
        return [env["DOCKER_HOST"]]
    paths = [DOCKER_SOCKET, rootless_podman_socket(env), PODMAN_ROOTFUL_SOCKET]
    # Root's "rootless" socket is the rootful one under another name: try it once.
    unique = list(dict.fromkeys(paths))
    return ["unix://" + p for p in unique]


def usable_socket(url: str) -> bool:
    """A Unix socket we may open and where something accepts connections.

    Non-Unix hosts (tcp://, ssh://) are the volunteer's explicit choice: usable.
    """
    if not url.startswith("unix://"):
        return True
    path = url[len("unix://") :]
    try:
        if not Path(path).is_socket() or not os.access(path, os.R_OK | os.W_OK):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT_S)
    try:
        probe.connect(path)
    except OSError:
        return False  # a stale socket file: its engine is gone
    finally:
        probe.close()
    return True


def pick_host(docker_host: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The first candidate we can use; the first candidate when none is usable yet
    (its error message then names the place a volunteer expects)."""
    candidates = candidate_hosts(docker_host, environ)
    for url in candidates:
        if usable_socket(url):
            return url
    return candidates[0]


@dataclass(frozen=True, slots=True)
class EngineIdentity:
    kind: str  # "docker" or "podman"
    rootless: bool


def is_podman(version: Mapping[str, Any]) -> bool:
    """Podman's /version names a "Podman Engine" component; Docker's does not."""
    components = " ".join(str(c.get("Name", "")) for c in version.get("Components") or [])
    return "podman" in (components + " " + str(version.get("Platform", ""))).lower()


def identify(
    version: Mapping[str, Any],
    info: Mapping[str, Any],
    libpod_info: Mapping[str, Any] | None = None,
) -> EngineIdentity:
    """Kind and mode from the answers of /version, /info and (Podman) /libpod/info.

    Docker lists "name=rootless" in /info SecurityOptions. Podman 4's compatible
    /info does not (measured with 4.3.1, rootless): only its own /libpod/info
    says so, in host.security.rootless.
    """
    podman = is_podman(version)
    rootless = "rootless" in " ".join(str(o) for o in info.get("SecurityOptions") or [])
    if podman and libpod_info is not None:
        security = (libpod_info.get("host") or {}).get("security") or {}
        rootless = rootless or bool(security.get("rootless"))
    return EngineIdentity("podman" if podman else "docker", rootless)
