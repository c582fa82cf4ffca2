"""Engine sessions: one loop's reset() (a failed re-list) must not cut the calls
and streams other loops have in flight on the same engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from boincd_containers.core.errors import Unavailable
from boincd_containers.engine.adapter import Engine


class FakeDockerApi:
    """Just enough of the Engine API on a Unix socket: version, a failing list, an
    event stream and a slow pull, each fed by the test."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[dict[str, str] | None] = asyncio.Queue()
        self.pull_go = asyncio.Event()
        self.pull_started = asyncio.Event()
        self.list_fails = True
        app = web.Application()
        app.router.add_get("/version", self.version)
        app.router.add_get("/v1.41/containers/json", self.containers)
        app.router.add_get("/v1.41/events", self.event_stream)
        app.router.add_post("/v1.41/images/create", self.pull)
        self.app = app

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"ApiVersion": "1.41", "Version": "20.10.24"})

    async def containers(self, request: web.Request) -> web.Response:
        if self.list_fails:
            return web.json_response({"message": "engine hiccup"}, status=500)
        return web.json_response([])

    async def event_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        while (event := await self.events.get()) is not None:
            await response.write(json.dumps(event).encode() + b"\n")
        await response.write_eof()
        return response

    async def pull(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b'{"status": "Pulling"}\n')
        self.pull_started.set()
        await self.pull_go.wait()
        await response.write(b'{"status": "Downloaded newer image"}\n')
        await response.write_eof()
        return response


@pytest.fixture
async def api(short_tmp: Path) -> AsyncIterator[tuple[FakeDockerApi, str]]:
    fake = FakeDockerApi()
    runner = web.AppRunner(fake.app)
    await runner.setup()
    sock = short_tmp / "docker.sock"
    await web.UnixSite(runner, str(sock)).start()
    yield fake, f"unix://{sock}"
    fake.pull_go.set()
    fake.events.put_nowait(None)
    await runner.cleanup()


async def test_a_reset_leaves_streams_and_calls_in_flight_alone(
    api: tuple[FakeDockerApi, str],
) -> None:
    fake, host = api
    engine = Engine(host, timeout_s=30)
    seen: list[str] = []
    pulled: list[str] = []

    async def follow() -> None:
        try:
            async for event in engine.events.follow({}):
                seen.append(str(event.get("Action")))
        except Unavailable as exc:
            seen.append(exc.message)

    async def pull() -> None:
        await engine.images.pull("proj/app:1", lambda line: pulled.append(str(line["status"])))

    async with asyncio.timeout(30), asyncio.TaskGroup() as group:
        follower = group.create_task(follow())
        puller = group.create_task(pull())
        await fake.pull_started.wait()
        fake.events.put_nowait({"Type": "container", "Action": "start"})
        while not seen:  # noqa: ASYNC110 - the stream's own progress, nothing to await
            await asyncio.sleep(0.01)
        old = engine.session._client

        # Another loop's re-list fails, and it resets the engine, as follow() does.
        with pytest.raises(Unavailable):
            await engine.containers.list({})
        await engine.reset()

        # The stream and the pull go on over the old session...
        fake.events.put_nowait({"Type": "container", "Action": "die"})
        fake.pull_go.set()
        await puller
        assert pulled == ["Pulling", "Downloaded newer image"]
        while len(seen) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        assert seen == ["start", "die"]
        assert old is not None
        assert not old.session.closed
        # ...while new calls get a new one.
        fake.list_fails = False
        assert await engine.containers.list({}) == []
        assert engine.session._client is not old

        # The old session closes with the last call that used it.
        fake.events.put_nowait(None)
        await follower
        assert seen[-1] == "engine events: the stream ended"
    assert old is not None
    assert old.session.closed
    assert engine.session._users == {}
    await engine.close()
    assert engine.session._client is None


async def test_a_reset_with_nothing_in_flight_closes_the_session_at_once(
    api: tuple[FakeDockerApi, str],
) -> None:
    fake, host = api
    fake.list_fails = False
    engine = Engine(host, timeout_s=30)
    await engine.containers.list({})
    old = engine.session._client
    await engine.reset()
    assert old is not None
    assert old.session.closed
    await engine.close()
