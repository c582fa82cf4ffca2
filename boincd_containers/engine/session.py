"""The connection to the engine, and the one query every resource sends over it.

A Session finds the engine (hosts.pick_host), holds an aiodocker client for
it, and hands each call the client that is current when it starts, for as long
as it runs: reset() retires a client without cutting the calls, pulls and event
streams still on it. `query` is the only way to the engine: it builds the URL,
sends the request through the client's public `session` (aiohttp), and turns
every engine and transport error into the daemon's family (core.errors), so no
resource module sees an aiodocker or aiohttp exception.

aiodocker is used for what it is good at, making the connector for any engine
URL (unix, tcp with TLS, ssh, npipe) and the Docker context rules; its request
helpers (`_query`, `_query_json`) are private, so the request is ours, made the
way they make it: the API version in the path, JSON unless told otherwise, a
4xx/5xx answer's `message` raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError

from boincd_containers.core.errors import (
    BadRequest,
    BoincdError,
    Conflict,
    ImageError,
    NotFound,
    Unavailable,
)
from boincd_containers.engine import compat as engine_compat
from boincd_containers.engine.hosts import pick_host
from boincd_containers.engine.info import EngineInfo

JSON = dict[str, Any]
# A list of engine objects. An alias: in the resource classes `list` is a verb.
JSONList = list[JSON]

DISK_FULL = "no space left on device"


def disk_full(message: str) -> Unavailable:
    """ENOSPC anywhere in the engine: retryable, the volunteer can free space."""
    return Unavailable(
        f"{message} (the disk of the container engine is full: free some space, "
        "the task is retried)",
        retryable=True,
    )


def translate(exc: BaseException, what: str) -> BoincdError:
    """Engine errors → our family. 5xx and transport errors are worth a retry."""
    if isinstance(exc, DockerError):
        message = f"{what}: {exc.message}"
        if DISK_FULL in message.lower():
            return disk_full(message)
        reclassified = engine_compat.reclassify(exc.status, message)
        if reclassified is not None:
            return reclassified  # Podman's 500s that mean "not found" or "conflict"
        if exc.status == 404:
            return NotFound(message)
        if exc.status == 409:
            return Conflict(message)
        if exc.status == 400:
            return BadRequest(message)
        if exc.status in (401, 403):
            return ImageError(message)
        return Unavailable(message, retryable=exc.status >= 500)
    if isinstance(exc, aiohttp.ClientError | OSError | asyncio.TimeoutError):
        return Unavailable(f"{what}: engine unreachable ({exc or type(exc).__name__})")
    return BoincdError(f"{what}: {exc}")


def label_filters(labels: Mapping[str, str]) -> dict[str, str]:
    """The `filters` query of a list that keeps only objects with these labels."""
    return {"filters": json.dumps({"label": [f"{k}={v}" for k, v in labels.items()]})}


async def _error_message(response: aiohttp.ClientResponse) -> str:
    """The `message` of an engine's error answer (its body when not JSON)."""
    body = await response.read()
    text = body.decode("utf-8", "replace")
    if response.headers.get("content-type", "") == "application/json":
        with contextlib.suppress(ValueError, AttributeError):
            return str(json.loads(text).get("message", text))
    return text


async def _parse(response: aiohttp.ClientResponse) -> Any:
    """An answer's body: JSON when it says so, else text; None when empty (a 204,
    or a 304 "already in that state": the verbs are idempotent)."""
    body = await response.read()
    if not body:
        return None
    if "json" in response.headers.get("content-type", ""):
        return json.loads(body)
    return body.decode("utf-8", "replace")


class Session:
    """The current engine client, reconnected lazily: the engine may come and go."""

    def __init__(self, docker_host: str | None = None, timeout_s: float = 60.0) -> None:
        self._configured_host = docker_host
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=5)
        self._client: aiodocker.Docker | None = None
        # Calls in flight on each client: a client that reset() retired is
        # closed only when its last call ends, so one loop's reset never cuts
        # another's pull, event stream or request.
        self._users: dict[aiodocker.Docker, int] = {}
        # The last engine seen (system.connect learns it); None while it has
        # never answered. Containers read it to adapt creates to the engine.
        self.info: EngineInfo | None = None
        self.host = ""

    def _docker(self) -> aiodocker.Docker:
        if self._client is None:
            self.host = pick_host(self._configured_host)
            self._client = aiodocker.Docker(url=self.host, timeout=self.timeout)
        return self._client

    @contextlib.asynccontextmanager
    async def _held(self) -> AsyncIterator[aiodocker.Docker]:
        """The current client, held for one call (or one stream) however long it takes."""
        docker = self._docker()
        self._users[docker] = self._users.get(docker, 0) + 1
        try:
            yield docker
        finally:
            self._users[docker] -= 1
            if self._users[docker] == 0:
                del self._users[docker]
                if docker is not self._client:  # retired by reset() meanwhile
                    with contextlib.suppress(Exception):
                        await docker.close()

    def use_api_version(self, api_version: str) -> None:
        """The API version the engine named (unversioned /version): the current
        client asks no more. Podman answers /version slowly (it runs dpkg-query
        or rpm for each of its components), so it is asked once per client."""
        docker = self._docker()
        if docker.api_version == "auto" and api_version:
            docker.api_version = f"v{api_version}"

    async def close(self) -> None:
        """Close every client, also those still in use (shutdown)."""
        clients = set(self._users)
        if self._client is not None:
            clients.add(self._client)
        self._client = None
        self._users.clear()
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()

    async def reset(self) -> None:
        """Find and negotiate the engine again at the next call. Calls in flight keep
        their client until they end (then it closes): one loop that lost the engine
        must not cut every other pull, event stream and request with it."""
        client, self._client = self._client, None
        if client is not None and not self._users.get(client):
            await client.close()

    @contextlib.asynccontextmanager
    async def query(
        self,
        what: str,
        path: str,
        method: str = "GET",
        *,
        params: Mapping[str, str] | None = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        versioned: bool = True,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The engine's answer to one request, to read inside the `with` (a stream
        as long as it lasts); released at its end. An error answer, a lost
        connection or a timeout, also while the body is read, raises our error
        for `what` (translate). `timeout`: the session's when None."""
        try:
            async with self._held() as docker:
                base = await self._base(docker, versioned)
                response = await self._send(
                    docker,
                    method,
                    f"{base}/{path}",
                    params=params,
                    data=data,
                    headers=headers,
                    timeout=timeout or self.timeout,
                )
                async with response:
                    yield response
        except (TimeoutError, DockerError, aiohttp.ClientError, OSError) as exc:
            raise translate(exc, what) from exc

    async def call(
        self,
        what: str,
        path: str,
        method: str = "GET",
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        timeout: float | None = None,
        versioned: bool = True,
    ) -> Any:
        """One request with a JSON `body` (or none) and its parsed answer."""
        data = json.dumps(body).encode() if body is not None else None
        async with self.query(
            what,
            path,
            method,
            params=params,
            data=data,
            timeout=aiohttp.ClientTimeout(total=timeout) if timeout else None,
            versioned=versioned,
        ) as response:
            return await _parse(response)

    async def _base(self, docker: aiodocker.Docker, versioned: bool) -> str:
        """The URL the path goes under: with the API version, negotiated first
        when nobody has yet (as aiodocker does before its first call)."""
        if not versioned:
            return docker.docker_host
        if docker.api_version == "auto":
            response = await self._send(
                docker, "GET", f"{docker.docker_host}/version", timeout=self.timeout
            )
            async with response:
                version = await _parse(response)
            docker.api_version = f"v{version['ApiVersion']}"
        return f"{docker.docker_host}/{docker.api_version}"

    async def _send(
        self,
        docker: aiodocker.Docker,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        try:
            response = await docker.session.request(
                method,
                url,
                params=params,
                data=data,
                headers={"Content-Type": "application/json", **(headers or {})},
                timeout=timeout,
            )
        except TimeoutError:
            raise  # also aiohttp's, which are connection errors too: as aiodocker does
        except aiohttp.ClientConnectionError as exc:
            raise DockerError(
                900, f"Cannot connect to Docker Engine via {self.host} [{exc}]"
            ) from exc
        if response.status // 100 in (4, 5):
            try:
                message = await _error_message(response)
            finally:
                response.release()
            raise DockerError(response.status, message)
        return response
