"""The engine as a whole: what it is (connect) and what its disk holds (df)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from boincd_containers.core.errors import BoincdError
from boincd_containers.engine import compat as engine_compat
from boincd_containers.engine.hosts import identify, is_podman
from boincd_containers.engine.info import EngineInfo
from boincd_containers.engine.process import engine_process_started_at
from boincd_containers.engine.session import JSON, Session


async def connect(session: Session) -> EngineInfo:
    """Reach the engine and learn what it is (session.info); raises Unavailable
    when it is down."""
    # Unversioned, and the API version taken from it: the session would
    # otherwise ask /version once more itself, and Podman answers it slowly.
    version = await session.call("engine version", "version", versioned=False)
    answered_at = time.time()
    session.use_api_version(str(version.get("ApiVersion") or ""))
    info = await session.call("engine info", "info")
    libpod = None
    if is_podman(version):
        # Podman's compatible /info hides rootless mode and claims limits it
        # cannot apply; its own /libpod/info tells both.
        with contextlib.suppress(BoincdError):
            libpod = await session.call("engine details", "libpod/info")
    identity = identify(version, info, libpod)
    limits, freezer = engine_compat.engine_limits(identity.kind == "podman", info, libpod)
    uid_map, gid_map = engine_compat.id_maps(libpod)
    # Podman has no engine process that containers depend on (conmon keeps
    # them; its API service comes and goes): only Docker's start matters.
    started_at = 0.0
    if identity.kind == "docker":
        started_at = await asyncio.to_thread(engine_process_started_at, session.host)
    previous = session.info
    if previous is not None and started_at and previous.started_at == started_at:
        answered_at = previous.answered_at  # the same engine process as before
    session.info = EngineInfo(
        kind=identity.kind,
        version=str(version.get("Version", "")),
        api_version=str(version.get("ApiVersion", "")),
        rootless=identity.rootless,
        cgroup_version=str(info.get("CgroupVersion", "")),
        cgroup_driver=str(info.get("CgroupDriver", "")),
        host=session.host,
        data_root=str(info.get("DockerRootDir", "")),
        limits=limits,
        freezer=freezer,
        uid_map=uid_map,
        gid_map=gid_map,
        started_at=started_at,
        answered_at=answered_at,
    )
    return session.info


async def disk_usage(session: Session) -> JSON:
    """`docker system df`: images, containers, volumes and build cache, sized."""
    result: JSON = await session.call("disk usage", "system/df", timeout=300)
    return result
