"""The engine's event stream: what happens to containers and images, as it happens."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp

from boincd_containers.core.errors import Unavailable
from boincd_containers.engine import compat as engine_compat
from boincd_containers.engine.session import JSON, Session

_STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=None)


class Events:
    def __init__(self, session: Session) -> None:
        self._session = session

    async def follow(
        self, labels: dict[str, str], since: float | None = None
    ) -> AsyncIterator[JSON]:
        """Engine events for our objects, until the stream ends (raise Unavailable then)."""
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        async for event in self._stream("engine events", filters, since):
            yield event

    async def follow_images(self, since: float | None = None) -> AsyncIterator[JSON]:
        """Every image event (pull, load, tag, untag, delete, import...), whoever caused
        it: the disk accounting covers all images, not only ours. Until the stream
        ends (raise Unavailable then)."""
        async for event in self._stream("engine image events", {"type": ["image"]}, since):
            yield event

    async def _stream(
        self, what: str, filters: dict[str, list[str]], since: float | None
    ) -> AsyncIterator[JSON]:
        params = {"filters": json.dumps(filters)}
        if since is not None:
            params["since"] = str(int(since))
        # Left early (reconnect, shutdown), the query closes the stream.
        async with self._session.query(
            what, "events", params=params, timeout=_STREAM_TIMEOUT
        ) as response:
            async for raw_line in response.content:
                if raw_line.strip():
                    yield engine_compat.normalize_event(json.loads(raw_line))
        raise Unavailable(f"{what}: the stream ended")
