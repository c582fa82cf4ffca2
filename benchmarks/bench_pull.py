"""4. Single-flight: N concurrent tasks asking for one image not yet here.

A local registry (Debian's docker-registry on 127.0.0.1) serves one image with
a 32 MiB layer. Each round, with the image removed from the engine first:

* one pull with the raw Engine API (`POST /images/create`): the baseline;
* N concurrent raw pulls: what N naive clients would cost the registry;
* one task through the daemon; N concurrent tasks through the daemon.

"Image ready" is the engine's `pull` event; the registry's access log counts
pulls (manifest requests by tag, see boincd_containers/testing/local_registry.py).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from benchmarks import profiling
from benchmarks.boinc import Slot
from benchmarks.common import BenchError, EventLog, RawEngine, Result, Run, summary
from benchmarks.daemon import DaemonApi, daemon
from boincd_containers.testing.local_registry import (
    LocalRegistry,
    busybox_rootfs_tar,
    import_image,
    local_registry,
    push_image,
)

MiB = 2**20


def _pulled(ref: str) -> Any:
    def match(event: Any) -> bool:
        return bool(event.type == "image" and event.action == "pull" and event.actor_id == ref)

    return match


class _Rounds:
    def __init__(
        self,
        run: Run,
        engine: RawEngine,
        events: EventLog,
        api: DaemonApi,
        registry: LocalRegistry,
        repo: str,
        ref: str,
    ) -> None:
        self.run, self.engine, self.events, self.api = run, engine, events, api
        self.registry, self.repo, self.ref = registry, repo, ref
        self.counter = 0

    async def _drop_image(self) -> None:
        await self.engine.call("DELETE", f"/images/{self.ref}", ok404=True)

    async def _raw_pull(self) -> None:
        name, tag = self.ref.rsplit(":", 1)
        await self.engine.stream("POST", "/images/create", params={"fromImage": name, "tag": tag})

    async def raw(self, n: int) -> dict[str, float]:
        await self._drop_image()
        pulls0 = self.registry.pulls(self.repo)
        t0 = time.time_ns()
        await asyncio.gather(*(self._raw_pull() for _ in range(n)))
        t_done = time.time_ns()
        ready = await self.events.wait(_pulled(self.ref), after_ns=t0)
        return {
            "ready_s": (ready.time_ns - t0) / 1e9,
            "all_done_s": (t_done - t0) / 1e9,
            "pulls": self.registry.pulls(self.repo) - pulls0,
        }

    async def daemon(self, n: int) -> dict[str, float]:
        await self._drop_image()
        slots = []
        for _ in range(n):
            self.counter += 1
            slots.append(
                Slot(
                    self.run.workdir / "pull",
                    self.counter,
                    project=f"bench_{self.run.run_id}",
                    result=f"pull_{self.run.run_id}_{self.counter}",
                    image=self.ref,
                    command=("true",),
                ).write()
            )
        pulls0 = self.registry.pulls(self.repo)
        t0 = time.time_ns()
        try:
            await asyncio.gather(*(self.api.call("POST", "/v1/tasks", s.request()) for s in slots))
            await asyncio.gather(*(self.api.wait_state(s.result, ("created",), 300) for s in slots))
            t_done = time.time_ns()
        finally:
            await asyncio.gather(
                *(self.api.call("DELETE", f"/v1/tasks/{s.result}") for s in slots),
                return_exceptions=True,
            )
        ready = await self.events.wait(_pulled(self.ref), after_ns=t0)
        return {
            "ready_s": (ready.time_ns - t0) / 1e9,
            "all_created_s": (t_done - t0) / 1e9,
            "pulls": self.registry.pulls(self.repo) - pulls0,
        }


async def bench_pull(run: Run, result: Result) -> None:
    rounds, n = run.n(3, 1), run.n(32, 4)
    repo = f"bench-{run.run_id}/pull"
    engine = RawEngine(timeout_s=600)
    try:
        (run.workdir / "registry").mkdir(parents=True, exist_ok=True)
        with local_registry(run.workdir / "registry") as registry:
            local = f"{run.image_repo}/pull:src"
            rootfs = busybox_rootfs_tar(run.run_id, {"data/blob": os.urandom(run.n(32, 4) * MiB)})
            await asyncio.to_thread(import_image, local, rootfs)
            try:
                ref = await asyncio.to_thread(push_image, registry, local, repo)
            finally:
                await engine.call("DELETE", f"/images/{local}", ok404=True)
            try:
                async with EventLog(engine, ("image",)) as events, daemon(run, "pull") as (d, api):
                    r = _Rounds(run, engine, events, api, registry, repo, ref)
                    samples: dict[str, list[dict[str, float]]] = {
                        k: [] for k in ("raw1", "rawN", "d1", "dN")
                    }
                    for _ in range(rounds):
                        samples["raw1"].append(await r.raw(1))
                        samples["rawN"].append(await r.raw(n))
                        samples["d1"].append(await r.daemon(1))
                        samples["dN"].append(await r.daemon(n))
                    if run.profile_dir is not None:
                        # One more round of N, sampled: what the daemon does meanwhile.
                        out = run.profile_dir / "daemon-pull.txt"
                        async with profiling.sampling(d.pid, out, rate=1000) as prof:
                            await r.daemon(n)
                        result.details["profile_daemon_pull"] = prof
            finally:
                await engine.call("DELETE", f"/images/{ref}", ok404=True)
    finally:
        await engine.close()
    _report(result, samples, n)


def _report(result: Result, samples: dict[str, list[dict[str, float]]], n: int) -> None:
    def s(kind: str, key: str) -> dict[str, Any]:
        return summary([x[key] for x in samples[kind]])

    details = {
        "requests": n,
        "raw_one_pull_ready_s": s("raw1", "ready_s"),
        f"raw_{n}_concurrent_pulls_ready_s": s("rawN", "ready_s"),
        f"raw_{n}_concurrent_pulls_all_done_s": s("rawN", "all_done_s"),
        f"raw_{n}_concurrent_pulls_registry_pulls": [x["pulls"] for x in samples["rawN"]],
        "daemon_one_task_ready_s": s("d1", "ready_s"),
        "daemon_one_task_created_s": s("d1", "all_created_s"),
        f"daemon_{n}_tasks_ready_s": s("dN", "ready_s"),
        f"daemon_{n}_tasks_all_created_s": s("dN", "all_created_s"),
        f"daemon_{n}_tasks_registry_pulls": [x["pulls"] for x in samples["dN"]],
    }
    result.details["single_flight"] = details
    pulls = max(x["pulls"] for x in samples["dN"])
    raw_pulls = max(x["pulls"] for x in samples["rawN"])
    result.claim(
        "pull.count",
        f"{n} concurrent tasks for one absent image: registry pulls",
        float(pulls),
        "pulls",
        goal="1",
        met=pulls == 1,
        baseline=float(raw_pulls),
        baseline_what=f"{n} concurrent raw API pulls",
    )
    ready, one = s("dN", "ready_s")["p50"], s("raw1", "ready_s")["p50"]
    created, one_task = s("dN", "all_created_s")["p50"], s("d1", "all_created_s")["p50"]
    result.claim(
        "pull.wall",
        f"{n} concurrent tasks: image ready for all (p50)",
        ready,
        "s",
        goal="≤ 1.2x one pull",
        met=ready <= 1.2 * one,
        baseline=one,
        baseline_what="one raw API pull",
        note=f"all {n} containers created {created:.2f} s, one task {one_task:.2f} s",
    )
    if pulls < 1:
        raise BenchError("the daemon created its tasks without pulling the image")
