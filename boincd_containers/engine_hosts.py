"""Where the engine is: explicit host, then the Docker socket, then Podman's.

Standard library only: `ctl doctor` uses it without loading the daemon's stack.
"""

from __future__ import annotations

import os
from pathlib import Path

DOCKER_SOCKET = "/var/run/docker.sock"
PODMAN_ROOTFUL_SOCKET = "/run/podman/podman.sock"


def candidate_hosts(docker_host: str | None, environ: dict[str, str] | None = None) -> list[str]:
    """Engine URLs in the order we try them.

    An explicit host wins. Otherwise the usual Docker socket, then the rootless
    Podman socket of this user, then the rootful Podman socket (DESIGN).
    """
    env = dict(os.environ) if environ is None else environ
    if docker_host:
        return [docker_host]
    if env.get("DOCKER_HOST"):
        return [env["DOCKER_HOST"]]
    runtime_dir = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    paths = [DOCKER_SOCKET, f"{runtime_dir}/podman/podman.sock", PODMAN_ROOTFUL_SOCKET]
    return ["unix://" + p for p in paths]


def _usable_socket(url: str) -> bool:
    if not url.startswith("unix://"):
        return True
    path = url[len("unix://") :]
    return Path(path).is_socket() and os.access(path, os.R_OK | os.W_OK)


def pick_host(docker_host: str | None) -> str:
    """The first candidate we could talk to; the first candidate when none exists yet."""
    candidates = candidate_hosts(docker_host)
    for url in candidates:
        if _usable_socket(url):
            return url
    return candidates[0]
