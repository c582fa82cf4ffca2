"""7. Throughput: 100 short tasks, 2 at a time (a 2-core host), end to end.

Each task writes one line into its slot and exits 0. Through shim + daemon:
the shim is spawned in a fresh slot and the task counts when the shim has
exited 0 with `boinc_finish_called` saying 0 and the output in the slot. Raw:
create, start, wait and remove with the Engine API. CLI: `docker run --rm`,
one process per task, as BOINC's docker_wrapper spawns them.

Each task's time is split at the engine's `start` and `die` events: getting it
running, running it, and noticing the exit and cleaning up. For the shim the
last part is split again where `boinc_finish_called` is written.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks.bench_start import cli_args, raw_body, shim_pyz
from benchmarks.boinc import FakeClient, Slot, launch_shim
from benchmarks.common import (
    TEST_IMAGE,
    BenchError,
    Event,
    EventLog,
    RawEngine,
    Result,
    Run,
    areap,
    container_event,
    kill_quietly,
    summary,
)
from benchmarks.daemon import daemon

COMMAND = ("sh", "-c", "echo done > /app/out")
WORKERS = 2
Phases = dict[str, float]


class _Tasks:
    def __init__(self, run: Run) -> None:
        self.run = run
        self.counter = 0

    def slot(self, kind: str) -> Slot:
        self.counter += 1
        return Slot(
            self.run.workdir / "throughput",
            self.counter,
            project=f"bench_{self.run.run_id}",
            result=f"{kind}_{self.run.run_id}_{self.counter}",
            image=TEST_IMAGE,
            command=COMMAND,
        ).write()


class _Kind:
    """One way of running tasks; its blocks' wall times and phases add up."""

    def __init__(self, one: Callable[[], Awaitable[Phases]]) -> None:
        self.one = one
        self.wall = 0.0
        self.phases: list[Phases] = []

    async def block(self, n: int) -> None:
        """n tasks, WORKERS at a time."""
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                self.phases.append(await self.one())

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(WORKERS)))
        self.wall += time.perf_counter() - t0

    def summary(self) -> dict[str, Any]:
        n = len(self.phases)
        keys = self.phases[0].keys() if self.phases else ()
        return {
            "tasks": n,
            "wall_s": round(self.wall, 2),
            "tasks_per_min": round(60 * n / self.wall, 1) if self.wall else 0.0,
            **{f"{k}_s": summary([p[k] for p in self.phases]) for k in keys},
        }


def _check_output(slot: Slot, what: str) -> None:
    out = slot.dir / "out"
    if not out.exists() or out.read_text().strip() != "done":
        raise BenchError(f"{what}: the task's output is missing from its slot {slot.dir}")


def _by_result(action: str, result: str) -> Callable[[Event], bool]:
    def match(event: Event) -> bool:
        return (
            event.type == "container"
            and event.action == action
            and event.attributes.get("org.boinc.containers.result") == result
        )

    return match


def _split(t0: int, start: Event, die: Event, end: int) -> Phases:
    return {
        "task": (end - t0) / 1e9,
        "to_running": (start.time_ns - t0) / 1e9,
        "running": (die.time_ns - start.time_ns) / 1e9,
        "exit_to_done": (end - die.time_ns) / 1e9,
    }


async def bench_throughput(run: Run, result: Result) -> None:
    n = run.n(100, 4)
    pyz: Path = shim_pyz(run)
    tasks = _Tasks(run)
    engine = RawEngine()
    client = FakeClient()
    try:
        async with (
            EventLog(engine, types=("container",)) as events,
            daemon(run, "throughput") as (d, _api),
        ):

            async def shim_task() -> Phases:
                slot = tasks.slot("tp")
                client.attach(slot)
                t0 = time.time_ns()
                proc = launch_shim(pyz, slot, d.socket)
                try:
                    code = await areap(proc, 120)
                    end = time.time_ns()
                finally:
                    kill_quietly(proc)
                    client.detach(slot)
                if code != 0 or slot.finish_status() != 0:
                    raise BenchError(f"shim task failed ({code}):\n{slot.stderr_tail()}")
                _check_output(slot, "shim")
                start = await events.wait(_by_result("start", slot.result), after_ns=t0)
                die = await events.wait(_by_result("die", slot.result), after_ns=t0)
                finished = os.stat(slot.dir / "boinc_finish_called").st_mtime_ns
                return {
                    **_split(t0, start, die, end),
                    "exit_to_finish_file": (finished - die.time_ns) / 1e9,
                }

            async def raw_task() -> Phases:
                slot = tasks.slot("raw")
                t0 = time.time_ns()
                created = await engine.call(
                    "POST",
                    "/containers/create",
                    params={"name": run.name("tp", tasks.counter)},
                    json=raw_body(run, slot),
                )
                cid = created["Id"]
                try:
                    await engine.call("POST", f"/containers/{cid}/start")
                    waited = await engine.call("POST", f"/containers/{cid}/wait")
                finally:
                    await engine.call("DELETE", f"/containers/{cid}?v=1&force=1", ok404=True)
                end = time.time_ns()
                if waited.get("StatusCode") != 0:
                    raise BenchError(f"raw task exited {waited}")
                _check_output(slot, "raw API")
                start = await events.wait(container_event("start", cid=cid), after_ns=t0)
                die = await events.wait(container_event("die", cid=cid), after_ns=t0)
                return _split(t0, start, die, end)

            async def cli_task() -> Phases:
                slot = tasks.slot("cli")
                name = run.name("tpcli", tasks.counter)
                args = cli_args(run, name, slot)
                args[args.index("-d")] = "--rm"
                t0 = time.time_ns()
                proc = await asyncio.create_subprocess_exec(
                    *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
                )
                _, err = await proc.communicate()
                end = time.time_ns()
                if proc.returncode != 0:
                    raise BenchError(f"docker run failed: {err.decode().strip()}")
                _check_output(slot, "docker run")
                start = await events.wait(container_event("start", name=name), after_ns=t0)
                die = await events.wait(container_event("die", name=name), after_ns=t0)
                return _split(t0, start, die, end)

            # The three take turns in blocks, so that the load of whatever else runs on
            # the host falls on all three alike. Fewer CLI tasks: its cost per task is
            # plain after a few dozen, and the suite must stay within minutes.
            kinds = _Kind(shim_task), _Kind(raw_task), _Kind(cli_task)
            blocks = run.n(10, 1)
            for _ in range(blocks):
                await kinds[0].block(n // blocks)
                await kinds[1].block(n // blocks)
                await kinds[2].block(run.n(40, 2) // blocks)
            shim, raw, cli = (k.summary() for k in kinds)
    finally:
        client.close()
        await engine.close()
    result.details["throughput"] = {
        "shim_daemon": shim,
        "raw_api": raw,
        "docker_cli": cli,
        "workers": WORKERS,
    }
    result.claim(
        "throughput.shim",
        f"{n} short tasks, {WORKERS} at a time, shim + daemon",
        float(shim["tasks_per_min"]),
        "tasks/min",
        baseline=float(raw["tasks_per_min"]),
        baseline_what="raw Engine API",
        note=f"docker run --rm {cli['tasks_per_min']} tasks/min; per shim task (p50): "
        f"running after {shim['to_running_s']['p50']:.2f} s, exit noticed and "
        f"boinc_finish_called written {shim['exit_to_finish_file_s']['p50']:.2f} s "
        f"after the container's exit, shim gone {shim['exit_to_done_s']['p50']:.2f} s after it",
    )
