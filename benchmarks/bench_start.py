"""1. Task start and 2. suspend/resume latency, shim + daemon against the bare engine.

Task start: from the moment the shim process is spawned in its slot (as the
BOINC client spawns it) to the engine's `start` event of the task container,
against the same container made with two raw Engine API calls (create, start)
and with `docker run -d` (a process per action, as BOINC's docker_wrapper
does). The three are interleaved, so that background load hits them alike.

Suspend/resume: from the moment `<suspend/>` (`<resume/>`) is written into the
slot's process-control channel to the engine's `pause` (`unpause`) event; the
engine's own share is shown by raw `POST /containers/{id}/pause` on a container
made alike.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import profiling
from benchmarks.boinc import FakeClient, Slot, launch_shim
from benchmarks.common import (
    BENCH_LABEL,
    TEST_IMAGE,
    BenchError,
    EventLog,
    RawEngine,
    Result,
    Run,
    areap,
    container_event,
    kill_quietly,
    summary,
    vm_hwm_bytes,
)
from benchmarks.daemon import DaemonApi, daemon

SLEEPER = ("sleep", "3600")


def shim_pyz(run: Run) -> Path:
    """The shim as a project ships it: one .pyz, the app version's main program."""
    from boincd_containers.shim.pyz import build_pyz

    path = run.workdir / "boincd-shim.pyz"
    if not path.exists():
        build_pyz(path, sys.executable)
    return path


def raw_body(run: Run, slot: Slot) -> dict[str, Any]:
    """What the daemon asks the engine for, made by hand: same image, command,
    bind mount, limits and lock-down, so both paths cost the engine the same."""
    return {
        "Image": slot.image,
        "Cmd": list(slot.command),
        "WorkingDir": "/app",
        "User": "0:0",
        "Env": [f"BOINC_RESULT={slot.result}"],
        "Labels": {BENCH_LABEL: run.run_id},
        "HostConfig": {
            "Mounts": [{"Type": "bind", "Source": str(slot.dir), "Target": "/app"}],
            "NanoCpus": int(slot.ncpus * 1e9),
            "PidsLimit": 4096,
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "NetworkMode": "none",
            "Memory": slot.memory_bytes,
            "MemorySwap": slot.memory_bytes,
            "RestartPolicy": {"Name": "no"},
        },
    }


def cli_args(run: Run, name: str, slot: Slot) -> list[str]:
    return [
        "docker",
        "run",
        "-d",
        "--name",
        name,
        "--label",
        f"{BENCH_LABEL}={run.run_id}",
        "--network",
        "none",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--pids-limit",
        "4096",
        "--cpus",
        f"{slot.ncpus:g}",
        "--memory",
        str(slot.memory_bytes),
        "--memory-swap",
        str(slot.memory_bytes),
        "-v",
        f"{slot.dir}:/app",
        "-w",
        "/app",
        "--user",
        "0:0",
        slot.image,
        *slot.command,
    ]


def result_label(result: str) -> str:
    return f"org.boinc.containers.result={result}"


def _task_started(result: str) -> Any:
    def match(event: Any) -> bool:
        return bool(
            event.type == "container"
            and event.action == "start"
            and event.attributes.get("org.boinc.containers.result") == result
        )

    return match


class _Starts:
    def __init__(self, run: Run, engine: RawEngine, events: EventLog, client: FakeClient) -> None:
        self.run = run
        self.engine = engine
        self.events = events
        self.client = client
        self.counter = 0
        self.shim_rss: list[int] = []

    def slot(self, kind: str, command: tuple[str, ...] = SLEEPER) -> Slot:
        self.counter += 1
        return Slot(
            self.run.workdir / "start",
            self.counter,
            project=f"bench_{self.run.run_id}",
            result=f"{kind}_{self.run.run_id}_{self.counter}",
            image=TEST_IMAGE,
            command=command,
        ).write()

    async def shim(self, pyz: Path, socket: str) -> dict[str, float]:
        slot = self.slot("start")
        self.client.attach(slot)
        t0 = time.time_ns()
        proc = launch_shim(pyz, slot, socket)
        try:
            started = await self.events.wait(_task_started(slot.result), after_ns=t0)
            created = self.events.find(
                lambda e: (
                    e.type == "container"
                    and e.action == "create"
                    and e.attributes.get("org.boinc.containers.result") == slot.result
                ),
                t0,
            )
            rss = vm_hwm_bytes(proc.pid)
            await self.client.asend(slot, "<abort/>")
            code = await areap(proc, 60)
            if code != 194:  # EXIT_ABORTED_BY_CLIENT
                raise BenchError(f"shim exited {code} after abort:\n{slot.stderr_tail()}")
            self.shim_rss.append(rss)
        finally:
            kill_quietly(proc)
            self.client.detach(slot)
        return {
            "start_s": (started.time_ns - t0) / 1e9,
            "create_s": (created.time_ns - t0) / 1e9 if created else float("nan"),
        }

    async def raw(self) -> dict[str, float]:
        slot = self.slot("raw")
        body = raw_body(self.run, slot)
        name = self.run.name("start", self.counter)
        t0 = time.time_ns()
        created = await self.engine.call(
            "POST", "/containers/create", params={"name": name}, json=body
        )
        cid = created["Id"]
        try:
            t_created = time.time_ns()
            await self.engine.call("POST", f"/containers/{cid}/start")
            started = await self.events.wait(container_event("start", cid=cid), after_ns=t0)
        finally:
            await self.engine.call("DELETE", f"/containers/{cid}?force=1&v=1", ok404=True)
        return {"start_s": (started.time_ns - t0) / 1e9, "create_s": (t_created - t0) / 1e9}

    async def cli(self) -> dict[str, float]:
        slot = self.slot("cli")
        name = self.run.name("cli", self.counter)
        t0 = time.time_ns()
        proc = await asyncio.create_subprocess_exec(
            *cli_args(self.run, name, slot),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        t_exit = time.time_ns()
        try:
            if proc.returncode != 0:
                raise BenchError(f"docker run failed: {err.decode().strip()}")
            started = await self.events.wait(container_event("start", name=name), after_ns=t0)
        finally:
            await self.engine.call("DELETE", f"/containers/{name}?force=1&v=1", ok404=True)
        return {"start_s": (started.time_ns - t0) / 1e9, "cli_exit_s": (t_exit - t0) / 1e9}


async def bench_start(run: Run, result: Result) -> None:
    """Measures 1 (task start) and 2 (suspend/resume latency)."""
    pyz = shim_pyz(run)
    engine = RawEngine()
    client = FakeClient()
    try:
        async with (
            EventLog(engine, types=("container",)) as events,
            daemon(run, "start") as (
                d,
                api,
            ),
        ):
            starts = _Starts(run, engine, events, client)
            await _task_start(run, result, starts, pyz, d.socket, api)
            await _suspend_resume(run, result, starts, pyz, d.socket, api)
    finally:
        client.close()
        await engine.remove_labelled(f"{BENCH_LABEL}={run.run_id}")
        await engine.close()


async def _task_start(
    run: Run, result: Result, starts: _Starts, pyz: Path, socket: str, api: DaemonApi
) -> None:
    rounds = run.n(10, 1)
    warmup = 0 if run.smoke else 2
    samples: dict[str, list[dict[str, float]]] = {"shim": [], "raw": [], "cli": []}
    for i in range(rounds + warmup):
        shim = await starts.shim(pyz, socket)
        raw = await starts.raw()
        cli = await starts.cli()
        if i >= warmup:  # the first rounds warm page cache and the engine's image data
            samples["shim"].append(shim)
            samples["raw"].append(raw)
            samples["cli"].append(cli)
    shim_s = summary([s["start_s"] for s in samples["shim"]])
    raw_s = summary([s["start_s"] for s in samples["raw"]])
    cli_s = summary([s["start_s"] for s in samples["cli"]])
    result.details["task_start"] = {
        "shim_to_running_s": shim_s,
        "shim_to_container_created_s": summary([s["create_s"] for s in samples["shim"]]),
        "raw_api_create_plus_start_s": raw_s,
        "raw_api_create_call_s": summary([s["create_s"] for s in samples["raw"]]),
        "docker_run_cli_s": cli_s,
        "docker_run_cli_process_exit_s": summary([s["cli_exit_s"] for s in samples["cli"]]),
    }
    result.claim(
        "start.shim_vs_raw",
        "task start: shim spawn → container running (p50)",
        shim_s["p50"],
        "s",
        goal="≤ 1.10x raw API",
        baseline=raw_s["p50"],
        baseline_what="raw Engine API create+start",
        met=shim_s["p50"] <= 1.10 * raw_s["p50"],
    )
    result.claim(
        "start.cli",
        "task start: `docker run -d` via the CLI (p50)",
        cli_s["p50"],
        "s",
        baseline=raw_s["p50"],
        baseline_what="raw Engine API create+start",
    )
    rss = starts.shim_rss
    if rss:
        result.details["shim_peak_rss_start_bytes"] = summary([float(r) for r in rss], 0)
    if run.profile_dir is not None:
        result.details["profile_shim"] = await asyncio.to_thread(_profile_shim, run, pyz)


def _profile_shim(run: Run, pyz: Path) -> dict[str, Any]:
    """What the shim spends before it can talk to the daemon: its imports (it imports
    everything up front, then stops at the missing init_data.xml of an empty dir)."""
    empty = run.workdir / "empty-slot"
    empty.mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(pyz)], cwd=empty, capture_output=True, text=True
    )
    return {
        "imports_ms": profiling.import_times(done.stderr),
        "module_peak_rss_kib": profiling.module_rss(),
    }


async def _suspend_resume(
    run: Run, result: Result, starts: _Starts, pyz: Path, socket: str, api: DaemonApi
) -> None:
    cycles = run.n(20, 2)
    slot = starts.slot("suspend")
    starts.client.attach(slot)
    t0 = time.time_ns()
    proc = launch_shim(pyz, slot, socket)
    pause: list[float] = []
    unpause: list[float] = []
    try:
        await starts.events.wait(_task_started(slot.result), after_ns=t0)
        task = await api.wait_state(slot.result, ("running",))
        cid = task["container_id"]
        await asyncio.sleep(1.5)  # past the shim's first status round
        rng = random.Random(run.run_id)
        for _ in range(cycles):
            # Random gaps: the client's messages do not arrive in step with the shim's tick.
            await asyncio.sleep(rng.uniform(0.2, 0.6))
            at = await starts.client.asend(slot, "<suspend/>")
            ev = await starts.events.wait(container_event("pause", cid=cid), after_ns=at)
            pause.append((ev.time_ns - at) / 1e9)
            await asyncio.sleep(rng.uniform(0.2, 0.6))
            at = await starts.client.asend(slot, "<resume/>")
            ev = await starts.events.wait(container_event("unpause", cid=cid), after_ns=at)
            unpause.append((ev.time_ns - at) / 1e9)
        status = starts.client.last_status(slot)
        rss = vm_hwm_bytes(proc.pid)
        await starts.client.asend(slot, "<abort/>")
        code = await areap(proc, 60)
        if code != 194:
            raise BenchError(f"shim exited {code} after abort:\n{slot.stderr_tail()}")
        starts.shim_rss.append(rss)
    finally:
        kill_quietly(proc)
        starts.client.detach(slot)
    engine_pause, engine_unpause, stale = await _raw_pause(run, starts, cycles)
    p, u = summary(pause), summary(unpause)
    result.details["suspend_resume"] = {
        "suspend_to_paused_s": p,
        "resume_to_running_s": u,
        "raw_api_pause_s": summary(engine_pause),
        "raw_api_unpause_s": summary(engine_unpause),
        "raw_api_already_paused_after_unpause": stale,
        "last_app_status": status,
    }
    result.claim(
        "suspend.p95",
        "`<suspend/>` → engine reports paused (p95)",
        p["p95"],
        "s",
        goal="p95 ≤ 0.3 s",
        met=p["p95"] <= 0.3,
        baseline=summary(engine_pause)["p95"],
        baseline_what="raw API pause call → paused (p95)",
        note=f"p50 {p['p50']:.3f} s",
    )
    result.claim(
        "resume.p95",
        "`<resume/>` → engine reports running (p95)",
        u["p95"],
        "s",
        goal="p95 ≤ 0.3 s",
        met=u["p95"] <= 0.3,
        baseline=summary(engine_unpause)["p95"],
        baseline_what="raw API unpause call → running (p95)",
        note=f"p50 {u['p50']:.3f} s",
    )
    peak = max(starts.shim_rss)
    result.claim(
        "memory.shim_peak",
        "shim peak RSS (max over all shims of this group)",
        peak / 2**20,
        "MiB",
        goal="≤ 15 MB",
        met=peak <= 15 * 10**6,
        note="VmHWM of each shim just before it exits",
    )


async def _raw_pause(
    run: Run, starts: _Starts, cycles: int
) -> tuple[list[float], list[float], int]:
    """The engine's own pause/unpause latency, with the same random gaps as the shim's
    cycles. Returns the two latency lists and how often the engine said "already
    paused" right after an unpause (Docker 20.10 can apply containerd's late
    "paused" event after the "resumed" one; seen here with back-to-back calls)."""
    slot = starts.slot("rawpause")
    created = await starts.engine.call(
        "POST",
        "/containers/create",
        params={"name": run.name("pause")},
        json=raw_body(run, slot),
    )
    cid = created["Id"]
    pause: list[float] = []
    unpause: list[float] = []
    stale = 0
    rng = random.Random(run.run_id + "raw")
    try:
        await starts.engine.call("POST", f"/containers/{cid}/start")
        for _ in range(cycles):
            await asyncio.sleep(rng.uniform(0.2, 0.6))
            at = time.time_ns()
            try:
                await starts.engine.call("POST", f"/containers/{cid}/pause")
            except BenchError as exc:
                if "already paused" not in str(exc):
                    raise
                stale += 1
                await starts.engine.call("POST", f"/containers/{cid}/unpause")
                continue
            ev = await starts.events.wait(container_event("pause", cid=cid), after_ns=at)
            pause.append((ev.time_ns - at) / 1e9)
            await asyncio.sleep(rng.uniform(0.2, 0.6))
            at = time.time_ns()
            await starts.engine.call("POST", f"/containers/{cid}/unpause")
            ev = await starts.events.wait(container_event("unpause", cid=cid), after_ns=at)
            unpause.append((ev.time_ns - at) / 1e9)
    finally:
        await starts.engine.call("DELETE", f"/containers/{cid}?force=1&v=1", ok404=True)
    return pause, unpause, stale
