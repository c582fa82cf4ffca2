"""The engine adapter on real rootful Podman: the same verbs and errors as on Docker.

Podman serves the Docker API but answers differently where it matters to a
daemon that must be idempotent: 500 instead of 409 for state conflicts, its own
event names, capabilities spelled out. Each test here would fail on the
adapter without engine_compat's corrections.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from boincd_containers.core.errors import Conflict, NotFound
from boincd_containers.engine.adapter import Engine
from boincd_containers.testing.daemon import TEST_IMAGE
from boincd_containers.testing.podman import TestEngine

pytestmark = [pytest.mark.podman, pytest.mark.parametrize("engine", ["podman"], indirect=True)]

OWNER = "org.boinc.containers.owner"


@pytest.fixture
async def adapter(engine: TestEngine, test_image: str) -> AsyncIterator[Engine]:
    client = Engine(engine.host)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def owner(engine: TestEngine) -> Iterator[str]:
    """A unique owner label; everything carrying it is removed after the test."""
    value = f"podman-test-{uuid.uuid4().hex[:12]}"
    yield value
    ids = engine.cli("ps", "-aq", "--filter", f"label={OWNER}={value}", check=False).split()
    if ids:
        engine.cli("rm", "-f", *ids, check=False)


def body(owner: str, command: str, **host: Any) -> dict[str, Any]:
    return {
        "Image": TEST_IMAGE,
        "Cmd": ["sh", "-c", command],
        "Labels": {OWNER: owner},
        "HostConfig": {"NetworkMode": "none", **host},
    }


async def test_connect_knows_rootful_podman_and_its_limits(adapter: Engine) -> None:
    info = await adapter.connect()
    assert (info.kind, info.rootless) == ("podman", False)
    assert info.limits == frozenset({"cpu", "memory", "pids"})
    assert info.freezer is True
    assert info.uid_map == ()


async def test_verbs_are_idempotent_and_errors_classified(adapter: Engine, owner: str) -> None:
    await adapter.connect()
    name = f"bd_{owner}"
    cid = await adapter.containers.create(name, body(owner, "sleep 300"))
    with pytest.raises(Conflict):  # Podman: 500 "that name is already in use"
        await adapter.containers.create(name, body(owner, "sleep 300"))
    with pytest.raises(NotFound):
        await adapter.containers.start(f"{name}_missing")
    await adapter.containers.start(cid)
    await adapter.containers.pause(cid)
    await adapter.containers.pause(cid)  # Podman: 500 "is already paused"
    assert (await adapter.containers.inspect(cid))["State"]["Paused"] is True
    await adapter.containers.unpause(cid)
    await adapter.containers.unpause(cid)  # Podman: 500 "is not paused"
    await adapter.containers.kill(cid)
    assert await adapter.containers.wait(cid, timeout=60) == 137
    await adapter.containers.kill(cid)  # Podman: 500 "can only kill running containers"
    # Network "none": Podman refuses network verbs ("invalid network mode"); nothing to undo.
    await adapter.networks.disconnect("bridge", cid)
    await adapter.containers.remove(cid)
    await adapter.containers.remove(cid)
    with pytest.raises(NotFound):
        await adapter.containers.inspect(cid)


async def test_limits_and_user_are_applied_and_logs_demultiplexed(
    adapter: Engine, owner: str, short_tmp: Path
) -> None:
    await adapter.connect()
    config = body(
        owner,
        "echo out; echo err >&2",
        NanoCpus=500_000_000,
        Memory=64 * 2**20,
        MemorySwap=64 * 2**20,
        PidsLimit=100,
    )
    config["User"] = "4321:4322"
    cid = await adapter.containers.create(f"bd_{owner}", config)
    data = await adapter.containers.inspect(cid)
    host = data["HostConfig"]
    assert (host["NanoCpus"], host["Memory"], host["PidsLimit"]) == (500_000_000, 64 * 2**20, 100)
    assert data["Config"]["User"] == "4321:4322"  # rootful: no namespace to map into
    assert "org.boinc.containers.unenforced" not in data["Config"]["Labels"]
    await adapter.containers.start(cid)
    assert await adapter.containers.wait(cid, timeout=60) == 0
    assert sorted((await adapter.containers.logs(cid, 10)).split()) == ["err", "out"]


async def test_events_follow_our_label_with_dockers_action_names(
    adapter: Engine, owner: str
) -> None:
    await adapter.connect()
    seen: list[dict[str, Any]] = []

    async def follow() -> None:
        # aclosing: the stream's connection is closed when we stop reading, not at GC.
        events = cast(
            AsyncGenerator[dict[str, Any], None],
            adapter.events.follow({OWNER: owner}, since=time.time() - 1),
        )
        async with contextlib.aclosing(events):
            async for event in events:
                seen.append(event)
                if event.get("Action") == "destroy":
                    return

    follower = asyncio.create_task(follow())
    try:
        await asyncio.sleep(0.5)  # the stream is open before the first event
        cid = await adapter.containers.create(f"bd_{owner}", body(owner, "exit 3"))
        await adapter.containers.start(cid)
        assert await adapter.containers.wait(cid, timeout=60) == 3
        await adapter.containers.remove(cid)
        await asyncio.wait_for(follower, 30)
    finally:
        follower.cancel()
    actions = [e["Action"] for e in seen]
    assert {"create", "start", "die", "destroy"} <= set(actions), actions
    assert all(e["Actor"]["Attributes"][OWNER] == owner for e in seen)
    assert all(e["Actor"]["ID"] == cid for e in seen)
    die = next(e for e in seen if e["Action"] == "die")
    assert die["Actor"]["Attributes"]["exitCode"] == "3"
