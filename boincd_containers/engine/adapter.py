"""The one adapter between the daemon and the container engine (Docker or Podman).

Shaped as aiodocker is, one object per resource over one shared query:

    engine.containers   create, inspect, list, start, pause, kill, remove, logs...
    engine.images       inspect, history, list, tag, remove, pull, load, build
    engine.volumes      list, inspect, remove
    engine.networks     connect, disconnect
    engine.events       follow (our objects), follow_images (every image)

and, for the engine as a whole, connect() (what it is: `info`), system_df(),
reset() and close(). Everything engine-specific lives in this package: finding
the engine (hosts), the API version and the errors (session), how Docker and
Podman differ (compat). Nothing else imports aiodocker, and the rest of the
daemon never asks which engine it has. Components name what they use of it in
protocols.py.
"""

from __future__ import annotations

from boincd_containers.engine import system
from boincd_containers.engine.containers import Containers
from boincd_containers.engine.events import Events
from boincd_containers.engine.images import Images
from boincd_containers.engine.info import EngineInfo
from boincd_containers.engine.networks import Networks
from boincd_containers.engine.session import JSON, Session
from boincd_containers.engine.volumes import Volumes


class Engine:
    """The engine's resources over one session. Reconnects lazily: the engine may
    come and go."""

    def __init__(
        self,
        docker_host: str | None = None,
        timeout_s: float = 60.0,
        *,
        session: Session | None = None,
    ) -> None:
        self.session = session or Session(docker_host, timeout_s)
        self.containers = Containers(self.session)
        self.images = Images(self.session)
        self.volumes = Volumes(self.session)
        self.networks = Networks(self.session)
        self.events = Events(self.session)

    @property
    def info(self) -> EngineInfo | None:
        """The last engine seen; None while it has never answered."""
        return self.session.info

    @property
    def host(self) -> str:
        """The engine URL in use ("" before the first call)."""
        return self.session.host

    async def connect(self) -> EngineInfo:
        """Reach the engine and learn what it is; raises Unavailable when it is down."""
        return await system.connect(self.session)

    async def system_df(self) -> JSON:
        """`docker system df`: images, containers, volumes and build cache, sized."""
        return await system.disk_usage(self.session)

    async def reset(self) -> None:
        """Find and negotiate the engine again at the next call; calls in flight
        keep their connection until they end."""
        await self.session.reset()

    async def close(self) -> None:
        """Close every connection, also those still in use (shutdown)."""
        await self.session.close()
