"""Volumes: the named ones the daemon's tasks use, listed by label."""

from __future__ import annotations

import contextlib

from boincd_containers.core.errors import NotFound
from boincd_containers.engine.session import JSON, JSONList, Session, label_filters


class Volumes:
    def __init__(self, session: Session) -> None:
        self._session = session

    async def list(self, labels: dict[str, str]) -> JSONList:
        result = await self._session.call("list volumes", "volumes", params=label_filters(labels))
        return list(result.get("Volumes") or [])

    async def inspect(self, name: str) -> JSON:
        result: JSON = await self._session.call(f"inspect volume {name}", f"volumes/{name}")
        return result

    async def remove(self, name: str) -> None:
        """An already gone volume is fine."""
        with contextlib.suppress(NotFound):
            await self._session.call(f"remove volume {name}", f"volumes/{name}", "DELETE")
