"""ImageCache logic on the fake engine: single flight, leases, tag refresh,
what counts as brought, safe removal, build clean-up, records on disk."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.core import labels as L
from boincd_containers.core.errors import ImageError, NetworkSuspended, Unavailable
from boincd_containers.images.cache import ImageCache, Removal
from boincd_containers.images.sources import base_images
from boincd_containers.job.spec import TaskRequest, parse_request
from boincd_containers.testing.fake_images import ImageEngine, layer

APP = "reg.example/app:1"


@pytest.fixture
def engine() -> ImageEngine:
    fake = ImageEngine()
    fake.push(APP, [layer("base", 1000), layer("app1", 300)])
    return fake


@pytest.fixture
async def cache(engine: ImageEngine, tmp_path: Path) -> AsyncIterator[ImageCache]:
    images = ImageCache(engine, tmp_path, "me")
    yield images
    await images.close()


def req(
    tmp_path: Path, result: str = "r_0", files: dict[str, str] | None = None, **kw: Any
) -> TaskRequest:
    slot = tmp_path / f"slot-{result}"
    slot.mkdir(exist_ok=True)
    for name, text in (files or {}).items():
        (slot / name).write_text(text)
    body = {"result": result, "project": "proj", "slot_dir": str(slot), **kw}
    if not any(k in kw for k in ("image_archive", "build")):
        body.setdefault("image", APP)
    return parse_request(body)


async def test_sixteen_concurrent_ensures_share_one_pull_and_its_progress(
    cache: ImageCache, engine: ImageEngine, tmp_path: Path
) -> None:
    engine.pull_delay = 0.05
    seen: dict[str, list[str]] = {f"r_{i}": [] for i in range(16)}
    resolved = await asyncio.gather(*(cache.ensure(req(tmp_path, r), seen[r].append) for r in seen))
    assert engine.pulls == [APP]
    assert cache.operations == 1
    assert {r.id for r in resolved} == {engine.images.by_ref[APP]["Id"]}
    assert {r.ref for r in resolved} == {APP}
    # Each task holds the image until its container (its name) exists.
    assert set(cache.leases) == {req(tmp_path, r).name for r in seen}
    # Every waiter saw the pull's progress, not only the first.
    assert all(any("2 of 2 layers" in line for line in lines) for lines in seen.values())
    assert cache.brought[resolved[0].id]["refs"] == [APP]
    assert cache.brought[resolved[0].id]["projects"] == ["proj"]


async def test_status_shows_a_pull_in_flight_with_its_waiters(
    cache: ImageCache, engine: ImageEngine, tmp_path: Path
) -> None:
    engine.pull_delay = 0.2
    waiters = [
        asyncio.ensure_future(cache.ensure(req(tmp_path, f"r_{i}"), lambda _: None))
        for i in range(3)
    ]
    async with asyncio.timeout(5):
        while not engine.pulls:  # noqa: ASYNC110 (the fake has no event for it)
            await asyncio.sleep(0.01)
    assert cache.in_progress() == [{"what": f"pull:{APP}", "progress": "", "tasks": 3}]
    await asyncio.gather(*waiters)
    assert cache.in_progress() == []


async def test_a_failed_pull_gives_every_waiter_the_error_and_brings_nothing(
    cache: ImageCache, engine: ImageEngine, tmp_path: Path
) -> None:
    engine.pull_delay = 0.05
    results = await asyncio.gather(
        *(cache.ensure(req(tmp_path, f"r_{i}", image="reg.example/missing:1")) for i in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(r, ImageError) and "no such image" in r.message for r in results)
    assert engine.pulls == ["reg.example/missing:1"]
    assert cache.brought == {}
    assert cache.leases == {}


async def test_an_image_already_here_is_used_as_it_is_and_is_not_ours(
    cache: ImageCache, engine: ImageEngine, tmp_path: Path
) -> None:
    cache.tag_refresh_interval_s = 0  # even so: we never pulled it, so we never refresh it
    for i in range(2):
        resolved = await cache.ensure(req(tmp_path, f"r_{i}", image="boincd-test/busybox"))
        assert resolved.ref == "boincd-test/busybox:latest"
    assert engine.pulls == []
    assert cache.brought == {}


async def test_a_moved_tag_is_picked_up_after_the_interval_and_old_stays_ours(
    cache: ImageCache, engine: ImageEngine, tmp_path: Path
) -> None:
    cache.tag_refresh_interval_s = 3600
    first = await cache.ensure(req(tmp_path, "r_0"))
    engine.push(APP, [layer("base", 1000), layer("app2", 400)])
    # Within the interval the registry is not asked again.
    assert (await cache.ensure(req(tmp_path, "r_1"))).id == first.id
    assert engine.pulls == [APP]
    # Past it, the next task gets the new image; the old one stays ours (evictable later).
    cache.records.tags[APP]["resolved_at"] -= 3600
    second = await cache.ensure(req(tmp_path, "r_2"))
    assert second.id != first.id
    assert second.id == engine.images.by_ref[APP]["Id"]
    assert engine.pulls == [APP, APP]
    assert {first.id, second.id} <= set(cache.brought)
    assert first.id in engine.store  # still there for the task created from it


async def test_a_refresh_that_fails_keeps_using_the_image_here(
    cache: ImageCache, engine: ImageEngine, tmp_path: Path
) -> None:
    first = await cache.ensure(req(tmp_path, "r_0"))
    cache.records.tags[APP]["resolved_at"] = 0.0
    engine.pull_errors[APP] = Unavailable(
        'pull: Get "http://reg.example/v2/": dial tcp: connect: connection refused'
    )
    again = await cache.ensure(req(tmp_path, "r_1"))
    assert again.id == first.id
    # And the registry is asked again only after another interval.
    await cache.ensure(req(tmp_path, "r_2"))
    assert engine.pulls == [APP, APP]


async def test_network_suspended_waits_for_a_pull_but_not_for_an_image_here(
    cache: ImageCache, engine: ImageEngine, tmp_path: Path
) -> None:
    with pytest.raises(NetworkSuspended, match="network activity suspended"):
        await cache.ensure(req(tmp_path, "r_0", allow_fetch=False))
    assert engine.pulls == []
    first = await cache.ensure(req(tmp_path, "r_1"))
    cache.records.tags[APP]["resolved_at"] = 0.0  # stale, but the network is off: use it
    assert (await cache.ensure(req(tmp_path, "r_2", allow_fetch=False))).id == first.id
    assert engine.pulls == [APP]


async def test_while_boinc_suspends_network_a_build_from_local_images_runs_without_it(
    cache: ImageCache, engine: ImageEngine, tmp_path: Path
) -> None:
    local = {"Dockerfile": "FROM boincd-test/busybox AS base\nFROM base\nCOPY . /\n"}
    built = await cache.ensure(req(tmp_path, "r_0", local, build=True, allow_fetch=False))
    assert built.ref.startswith("boincd__proj__")
    assert engine.build_networks == [False]  # its steps had no network

    absent = {"Dockerfile": "FROM reg.example/not-here:1\nCOPY . /\n"}
    with pytest.raises(NetworkSuspended, match="not here"):
        await cache.ensure(req(tmp_path, "r_1", absent, build=True, allow_fetch=False))
    unknown = {"Dockerfile": "ARG BASE\nFROM $BASE\n"}
    with pytest.raises(NetworkSuspended):
        await cache.ensure(req(tmp_path, "r_2", unknown, build=True, allow_fetch=False))
    assert engine.build_networks == [False]  # neither was tried

    engine.offline_fails = True  # a step that fetches: waits for BOINC's network after all
    fetching = {"Dockerfile": "FROM boincd-test/busybox\nRUN wget example.org\n"}
    with pytest.raises(NetworkSuspended, match="without network"):
        await cache.ensure(req(tmp_path, "r_3", fetching, build=True, allow_fetch=False))
    engine.offline_fails = False
    await cache.ensure(req(tmp_path, "r_4", fetching, build=True))
    assert engine.build_networks[-1] is True


async def test_a_stalled_pull_is_given_up_and_an_unreachable_registry_asked_with_backoff(
    engine: ImageEngine, tmp_path: Path
) -> None:
    cache = ImageCache(engine, tmp_path, "me", pull_stall_s=0.2)
    try:
        engine.pull_delay = 5.0  # no data at all: stalled
        with pytest.raises(Unavailable, match="stalled: no data for 0 s"):
            await cache.ensure(req(tmp_path, "r_0"))
        assert engine.pulls == [APP]
        # The next task asks within the backoff: the same answer, no second pull.
        with pytest.raises(Unavailable, match="stalled"):
            await cache.ensure(req(tmp_path, "r_1"))
        assert engine.pulls == [APP]
        # Past it, the registry is asked again, and its success clears the backoff.
        engine.pull_delay = 0.0
        _, delay, error = cache._pull_backoff[APP]
        cache._pull_backoff[APP] = (0.0, delay, error)  # the backoff is over
        await cache.ensure(req(tmp_path, "r_2"))
        assert engine.pulls == [APP, APP]
        assert cache._pull_backoff == {}
    finally:
        await cache.close()


def test_base_images_of_a_dockerfile() -> None:
    assert base_images("FROM a:1 AS b\nRUN x\nFROM --platform=linux/amd64 b\nFROM scratch\n") == [
        "a:1"
    ]
    assert base_images("from  reg:5000/x@sha256:ab \nFROM c\n") == ["reg:5000/x@sha256:ab", "c"]
    assert base_images("ARG V=1\nFROM img:${V}\n") is None
    assert base_images("RUN true\n") == []


async def test_registry_errors_become_clear_task_errors(
    cache: ImageCache, engine: ImageEngine, tmp_path: Path
) -> None:
    cases = {
        "reg.example/down:1": (
            Unavailable('Get "http://127.0.0.1:1/v2/": dial tcp: connect: connection refused'),
            Unavailable,
            "cannot be reached",
        ),
        "reg.example/private:1": (
            Unavailable('Head "http://r/v2/x/manifests/1": no basic auth credentials'),
            ImageError,
            "wants credentials",
        ),
        "reg.example/full:1": (
            ImageError("write /var/lib/docker/tmp/x: no space left on device"),
            Unavailable,
            "disk full",
        ),
    }
    woken: list[bool] = []
    cache.on_change.append(lambda: woken.append(True))
    for n, (ref, (raised, kind, text)) in enumerate(cases.items()):
        engine.pull_errors[ref] = raised
        with pytest.raises(kind, match=text) as caught:
            await cache.ensure(req(tmp_path, f"r_{n}", image=ref))
        assert caught.value.retryable is (kind is Unavailable)
        assert ref in caught.value.message
    assert woken == [True]  # the full disk asked the eviction to make room
    assert cache.brought == {}
    assert cache.leases == {}


async def test_removal_only_of_ours_and_never_while_used_or_leased(
    cache: ImageCache, engine: ImageEngine, tmp_path: Path
) -> None:
    resolved = await cache.ensure(req(tmp_path, "r_0"))
    # Leased: a task resolved it and is about to create its container.
    outcome = await cache.remove(resolved.id)
    assert (outcome.removed, outcome.reason) == (False, "a task is about to use it")
    cid = await engine.containers.create(
        "boincd__proj__r_0", {"Image": resolved.id, "Labels": {}, "HostConfig": {}}
    )
    cache.release(req(tmp_path, "r_0").name)
    assert (await cache.remove(resolved.id)).reason == "a container uses it"
    await engine.containers.remove(cid)
    # Someone tagged it meanwhile: theirs too now.
    engine.tag(resolved.id, "mine:keep")
    assert (await cache.remove(resolved.id)).reason.startswith("tagged mine:keep")
    engine.store[resolved.id]["RepoTags"].remove("mine:keep")
    engine.images.by_ref.pop("mine:keep")
    foreign = engine.images.by_ref["boincd-test/busybox:latest"]["Id"]
    assert (await cache.remove(foreign)).reason == "not brought by this daemon"
    outcome = await cache.remove(resolved.id)
    assert outcome.removed
    assert resolved.id not in engine.store
    assert foreign in engine.store
    assert resolved.id not in cache.brought
    assert APP not in cache.records.tags  # the next task pulls it again


async def test_an_image_evicted_between_resolve_and_lease_is_fetched_again(
    cache: ImageCache, engine: ImageEngine, tmp_path: Path
) -> None:
    first = await cache.ensure(req(tmp_path, "r_0"))
    cache.release(req(tmp_path, "r_0").name)
    assert (await cache.remove(first.id)).removed
    again = await cache.ensure(req(tmp_path, "r_1"))
    assert again.id == first.id
    assert engine.pulls == [APP, APP]


async def test_an_eviction_woken_by_the_pull_cannot_take_the_image_from_its_waiters(
    cache: ImageCache, engine: ImageEngine, tmp_path: Path
) -> None:
    engine.pull_delay = 0.05
    removals: list[asyncio.Future[Removal]] = []

    def evict_everything() -> None:  # as the inventory does with a budget of 0
        for image_id in list(cache.brought):
            removals.append(asyncio.ensure_future(cache.remove(image_id)))

    cache.on_change.append(evict_everything)
    resolved = await asyncio.gather(*(cache.ensure(req(tmp_path, f"r_{i}")) for i in range(3)))
    outcomes = await asyncio.gather(*removals)
    assert [o.reason for o in outcomes] == ["a task is about to use it"]
    assert engine.pulls == [APP]
    assert resolved[0].id in engine.store


async def test_records_survive_a_restart_and_the_old_format_is_read(
    engine: ImageEngine, tmp_path: Path
) -> None:
    first = ImageCache(engine, tmp_path, "me")
    resolved = await first.ensure(req(tmp_path, "r_0"))
    again = ImageCache(engine, tmp_path, "me")
    assert again.brought == first.brought
    assert again.records.tags[APP]["id"] == resolved.id
    await again.ensure(req(tmp_path, "r_1"))
    assert engine.pulls == [APP]  # the restarted daemon knows it pulled it recently

    old = tmp_path / "old"
    old.mkdir()
    (old / "images.json").write_text(
        json.dumps({APP: {"id": resolved.id, "projects": ["p"], "how": "pull", "brought_at": 5.0}})
    )
    migrated = ImageCache(engine, old, "me")
    assert migrated.brought[resolved.id]["refs"] == [APP]
    assert migrated.records.tags[APP] == {"id": resolved.id, "resolved_at": 5.0}
    (old / "images.json").write_text("{not json")
    assert ImageCache(engine, old, "me").brought == {}


async def test_a_build_is_cached_by_context_and_a_failed_build_leaves_nothing(
    cache: ImageCache, engine: ImageEngine, tmp_path: Path
) -> None:
    dockerfile = {"Dockerfile": "FROM boincd-test/busybox\nCOPY . /\n"}
    noise = {"stderr.txt": "noise that must not change the hash"}
    request = req(tmp_path, "r_0", {**dockerfile, **noise}, build=True)
    built = await cache.ensure(request)
    assert built.ref.startswith("boincd__proj__")
    assert engine.store[built.id]["Config"]["Labels"][L.OWNER] == "me"
    again = req(tmp_path, "r_1", dockerfile, build=True)
    assert (await cache.ensure(again)).id == built.id
    assert [c for c in engine.calls if c[0] == "build"] == [("build", built.ref)]

    # Records lost: our label tells the build is ours.
    cache.records.images.clear()
    third = req(tmp_path, "r_2", dockerfile, build=True)
    await cache.ensure(third)
    assert built.id in cache.brought

    before = set(engine.store)
    engine.build_fails_at = 3
    failing = req(
        tmp_path, "r_3", {"Dockerfile": "FROM boincd-test/busybox\nRUN false\n"}, build=True
    )
    with pytest.raises(ImageError, match="returned 1"):
        await cache.ensure(failing)
    assert set(engine.store) == before  # the committed COPY step was removed again
    assert "r_3" not in cache.leases


async def test_two_projects_tasks_of_one_result_name_hold_their_own_leases(
    cache: ImageCache, engine: ImageEngine, tmp_path: Path
) -> None:
    """Result names are unique per project only: one task's container existing
    must not release the other's hold on the image."""
    mine = req(tmp_path, "r_0")
    theirs = req(tmp_path, "r_0", project="other_proj")
    resolved = await cache.ensure(mine)
    await cache.ensure(theirs)
    assert mine.name != theirs.name
    cache.release(mine.name)
    assert (await cache.remove(resolved.id)).reason == "a task is about to use it"
    cache.release(theirs.name)
    assert (await cache.remove(resolved.id)).removed
