"""Networks a task container joins and leaves (BOINC's network suspension)."""

from __future__ import annotations

from boincd_containers.core.errors import BoincdError, Conflict
from boincd_containers.engine.session import Session


class Networks:
    def __init__(self, session: Session) -> None:
        self._session = session

    async def connect(self, network: str, ref: str) -> None:
        """Connect a container; one connected already is fine."""
        try:
            await self._session.call(
                f"connect {ref} to {network}",
                f"networks/{network}/connect",
                "POST",
                body={"Container": ref},
            )
        except (Conflict, BoincdError) as exc:
            if "already exists" not in exc.message and "already connected" not in exc.message:
                raise

    async def disconnect(self, network: str, ref: str) -> None:
        """Disconnect a container; one not connected is fine."""
        try:
            await self._session.call(
                f"disconnect {ref} from {network}",
                f"networks/{network}/disconnect",
                "POST",
                body={"Container": ref, "Force": True},
            )
        except BoincdError as exc:
            # Podman refuses any network verb on a container created with network
            # "none" ("invalid network mode"): it is connected to nothing already.
            if "not connected" not in exc.message and "invalid network mode" not in exc.message:
                raise
