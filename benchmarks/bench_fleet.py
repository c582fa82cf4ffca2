"""A host with many tasks and images: 3. monitoring cost, 5. accounting, 6. memory.

One daemon; 200 images sharing 10 base layers loaded into the engine; 64 tasks
over 4 projects, each container writes a file into its writable layer and then
sleeps. On that state:

* the daemon's CPU over a window at the default 1 Hz sampling, against the same
  daemon idle, and the cost of one monitoring tick over the 64 tasks in-process;
* `GET /v1/status` answer time against `GET /system/df` on the same engine
  state, `images.total_bytes` against df's `LayersSize`, per-project figures;
  `ctl status --json` end to end, process start included;
* the daemon's RSS; then 64 real shims attach to the 64 tasks (as after a BOINC
  client restart) and report each second: daemon CPU and RSS again, the shims'
  own CPU, and each shim's peak RSS when it exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import psutil

from benchmarks import profiling
from benchmarks.bench_start import shim_pyz
from benchmarks.boinc import FakeClient, Slot, launch_shim
from benchmarks.common import (
    BenchError,
    EventLog,
    RawEngine,
    Result,
    Run,
    areap,
    container_event,
    cpu_seconds,
    cpu_window,
    kill_quietly,
    summary,
    timed_calls,
    vm_hwm_bytes,
)
from benchmarks.daemon import BenchDaemon, DaemonApi, daemon
from benchmarks.images import ImageSet, write_image_set

MiB = 2**20


def _command(i: int) -> tuple[str, ...]:
    # 64 KiB .. 1 MiB into the container's own layer, then idle like a task between
    # checkpoints. /tmp is in the image's base layer, so this is SizeRw, not a tmpfs.
    return (
        "sh",
        "-c",
        f"dd if=/dev/urandom of=/tmp/out bs=65536 count={1 + i % 16} 2>/dev/null; exec sleep 3600",
    )


async def bench_fleet(run: Run, result: Result) -> None:
    n_images, n_tasks = run.n(200, 4), run.n(64, 3)
    n_projects, n_bases = run.n(4, 2), run.n(10, 2)
    engine = RawEngine(timeout_s=600)
    client = FakeClient()
    image_set: ImageSet | None = None
    try:
        async with daemon(run, "fleet") as (d, api):
            async with cpu_window(d.ps) as idle:
                await asyncio.sleep(run.seconds(10, 2))
            result.details["daemon_idle"] = idle
            t0 = time.monotonic()
            image_set = await asyncio.to_thread(
                write_image_set,
                run.workdir / "images.tar",
                run.image_repo,
                n_images,
                n_bases,
                run.run_id,
            )
            with image_set.archive.open("rb") as archive:
                await engine.stream("POST", "/images/load", params={"quiet": "1"}, data=archive)
            image_set.archive.unlink()
            result.details["images"] = {
                "count": n_images,
                "bases": n_bases,
                "archive_bytes": image_set.archive_bytes,
                "write_and_load_s": round(time.monotonic() - t0, 2),
            }
            slots = [
                Slot(
                    run.workdir / "fleet",
                    i,
                    project=f"bench_{run.run_id}_p{i % n_projects}",
                    result=f"fleet_{run.run_id}_{i}",
                    image=_image_for(image_set, i, n_projects),
                    command=_command(i),
                    memory_bytes=128 * MiB,
                ).write()
                for i in range(n_tasks)
            ]
            tasks = await _start_fleet(api, slots, result)
            await asyncio.sleep(run.seconds(3, 1))  # the writes finish
            result.details["writes_done_at"] = time.monotonic()
            await _monitoring(run, result, d, tasks)
            await _accounting(run, result, d, api, engine, slots)
            await _with_shims(run, result, d, client, slots)
    finally:
        client.close()
        if image_set is not None:
            await _remove_images(engine, image_set)
        await engine.close()


def _image_for(images: ImageSet, i: int, n_projects: int) -> str:
    # Each project mostly uses its own images; neighbouring projects share bases.
    return images.refs[(i * 7 + i % n_projects) % len(images.refs)]


async def _remove_images(engine: RawEngine, images: ImageSet) -> None:
    sem = asyncio.Semaphore(4)

    async def one(ref: str) -> None:
        async with sem:
            await engine.call("DELETE", f"/images/{ref}", ok404=True)

    await asyncio.gather(*(one(r) for r in images.refs), return_exceptions=True)


async def _start_fleet(api: DaemonApi, slots: list[Slot], result: Result) -> list[dict[str, Any]]:
    t0 = time.monotonic()
    await asyncio.gather(*(api.call("POST", "/v1/tasks", s.request()) for s in slots))
    await asyncio.gather(*(api.wait_state(s.result, ("created", "running")) for s in slots))
    sem = asyncio.Semaphore(8)

    async def start(slot: Slot) -> None:
        async with sem:
            await api.call("POST", f"/v1/tasks/{slot.result}/start")

    await asyncio.gather(*(start(s) for s in slots))
    tasks = await asyncio.gather(*(api.wait_state(s.result, ("running",)) for s in slots))
    result.details["fleet"] = {
        "tasks": len(slots),
        "create_and_start_s": round(time.monotonic() - t0, 2),
    }
    return list(tasks)


def _tick_cost(tasks: list[dict[str, Any]], ticks: int) -> dict[str, Any]:
    """One Monitor.tick over the fleet, in this process: the daemon's 1 Hz work alone."""
    from boincd_containers.tasks.record import TaskRecord
    from boincd_containers.tasks.state import TaskState
    from boincd_containers.watch.monitor import Monitor

    fleet = [
        TaskRecord(
            t["result"],
            t["project"],
            container_id=t["container_id"],
            state=TaskState.RUNNING,
            pid=int(t["pid"]),
        )
        for t in tasks
    ]
    records = {r.key: r for r in fleet}
    monitor = Monitor(SimpleNamespace(tasks=records))  # type: ignore[arg-type]
    monitor.tick()  # resolves every cgroup once, as the daemon did long ago
    durations = []
    for _ in range(ticks):
        t0 = time.perf_counter()
        monitor.tick()
        durations.append((time.perf_counter() - t0) * 1e3)
    sampled = sum(1 for r in records.values() if monitor.latest(r.key).at > 0)
    return {"tick_ms": summary(durations), "tasks": len(records), "sampled": sampled}


async def _monitoring(
    run: Run, result: Result, d: BenchDaemon, tasks: list[dict[str, Any]]
) -> None:
    dockerd = _dockerd()
    d0 = cpu_seconds(dockerd) if dockerd else 0.0
    async with cpu_window(d.ps) as busy:
        await asyncio.sleep(run.seconds(20, 3))
    busy["dockerd_percent_of_one_core"] = (
        100 * (cpu_seconds(dockerd) - d0) / busy["wall_s"] if dockerd else float("nan")
    )
    result.details["daemon_cpu_tasks_no_shims"] = busy
    try:
        tick = await asyncio.to_thread(_tick_cost, tasks, run.n(50, 3))
    except Exception as exc:  # internal API moved: the process-level figure still stands
        tick = {"error": repr(exc)}
    result.details["monitor_tick_in_process"] = tick
    idle = result.details["daemon_idle"]["percent_of_one_core"]
    note = f"idle daemon {idle:.2f} %"
    if "tick_ms" in tick:
        note += f"; one tick over {tick['tasks']} tasks {tick['tick_ms']['p50']:.2f} ms"
    result.claim(
        "monitor.daemon_cpu",
        f"daemon CPU, {len(tasks)} running tasks, 1 Hz sampling, no shims",
        busy["percent_of_one_core"],
        "%",
        goal="≤ 2 % of one core",
        met=busy["percent_of_one_core"] <= 2.0,
        note=note,
    )
    rss = d.ps.memory_info().rss
    result.details["daemon_rss_tasks_no_shims"] = rss
    result.details["daemon_vmhwm_tasks_no_shims"] = vm_hwm_bytes(d.pid)


def _dockerd() -> psutil.Process | None:
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "dockerd":
            return proc
    return None


@asynccontextmanager
async def _static_server(body: bytes) -> AsyncIterator[DaemonApi]:
    """A client of benchmarks/static_server.py serving `body` as is: the floor of
    the status answer (an HTTP server, a Unix socket, the client's decoding)."""
    with tempfile.TemporaryDirectory(prefix="bd-floor-") as tmp:
        body_file, socket_path = Path(tmp) / "status.json", str(Path(tmp) / "s.sock")
        body_file.write_bytes(body)
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.static_server", socket_path, str(body_file)
        )
        api = DaemonApi(socket_path)
        try:
            deadline = time.monotonic() + 30
            while True:  # until it answers
                try:
                    await api.call("GET", "/")
                    break
                except aiohttp.ClientError:
                    if time.monotonic() > deadline or server.returncode is not None:
                        raise BenchError("the static answer server did not start") from None
                    await asyncio.sleep(0.05)
            yield api
        finally:
            await api.close()
            server.terminate()
            await server.wait()


async def _status_and_floor_times(
    n: int, api: DaemonApi
) -> tuple[list[float], list[float], dict[str, Any]]:
    """`GET /v1/status` from the daemon and the same bytes from the floor server,
    one after the other n times, so that the host's load falls on both alike."""
    first: dict[str, Any] = await api.call("GET", "/v1/status")
    async with _static_server(json.dumps(first).encode()) as floor:
        ours, static, last = [], [], first
        for _ in range(n):
            t0 = time.perf_counter()
            last = await api.call("GET", "/v1/status")
            t1 = time.perf_counter()
            await floor.call("GET", "/v1/status")
            ours.append(t1 - t0)
            static.append(time.perf_counter() - t1)
    return ours, static, last


async def _accounting(
    run: Run, result: Result, d: BenchDaemon, api: DaemonApi, engine: RawEngine, slots: list[Slot]
) -> None:
    status = await _settled_status(api, engine, timeout_s=run.seconds(60, 20))
    df_times, df = await timed_calls(run.n(5, 1), lambda: engine.call("GET", "/system/df"))
    df = df or {}
    status_times, floor_times, status = await _status_and_floor_times(run.n(200, 5), api)
    size = len(json.dumps(status).encode())
    images_times: list[float] = []
    if await api.call("GET", "/v1/images", ok404=True) is not None:
        images_times, _ = await timed_calls(run.n(50, 2), lambda: api.call("GET", "/v1/images"))
    if run.profile_dir is not None:
        # Where a status answer's time goes: py-spy on the daemon under a steady stream.
        async with profiling.sampling(d.pid, run.profile_dir / "daemon-status.txt") as prof:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                await api.call("GET", "/v1/status")
        result.details["profile_daemon_status"] = prof
    df_after = await engine.call("GET", "/system/df")
    st, dt = summary(status_times, 5), summary(df_times, 4)
    ft = summary(floor_times, 5)
    images: dict[str, Any] = status.get("images") or {}
    ours = {s.project for s in slots}
    ours_rw = sum(
        int(c.get("SizeRw") or 0)
        for c in df.get("Containers") or []
        if (c.get("Labels") or {}).get("org.boinc.containers.owner") == d.instance_id
    )
    result.details["accounting"] = {
        "status_s": st,
        "system_df_s": dt,
        "images_endpoint_s": summary(images_times, 5),
        "status_json_bytes": size,
        "static_answer_s": ft,
        "status_keys": sorted(status),
        "df_layers_size": df.get("LayersSize"),
        "df_layers_size_after": df_after.get("LayersSize"),
        "df_images": len(df.get("Images") or []),
        "df_our_containers_size_rw": ours_rw,
        "status_images": {k: v for k, v in images.items() if k != "items"},
        "status_volumes": status.get("volumes"),
        "status_containers": status.get("containers"),
    }
    pending = "images" not in status
    note = "" if not pending else "status has no `images` yet (inventory not in the daemon)"
    result.claim(
        "accounting.status_p95",
        "`GET /v1/status` answer time (p95)",
        st["p95"] * 1e3,
        "ms",
        goal="p95 ≤ 5 ms and ≤ 25 % of df",
        baseline=dt["p50"] * 1e3,
        baseline_what="`GET /system/df` (p50)",
        met=st["p95"] <= 0.005 and st["p95"] <= 0.25 * dt["p50"],
        note=f"p50 {st['p50'] * 1e3:.1f} ms; {size / 1024:.0f} KiB of JSON"
        + (f"; {note}" if note else ""),
    )
    result.claim(
        "accounting.status_floor",
        "the same bytes from a bare aiohttp app on a Unix socket, same client, "
        "each call right after one of ours (p95)",
        ft["p95"] * 1e3,
        "ms",
        baseline=st["p95"] * 1e3,
        baseline_what="our `GET /v1/status` (p95)",
        note=f"p50 {ft['p50'] * 1e3:.1f} ms; the HTTP server, the socket and the client "
        "decoding the JSON, with none of the daemon's work",
    )
    total = None if pending else images.get("total_bytes")
    layers = {df.get("LayersSize"), df_after.get("LayersSize")}
    result.claim(
        "accounting.equal_bytes",
        "`images.total_bytes` = df `LayersSize`",
        None if total is None else total / MiB,
        "MiB",
        goal="equal to the byte",
        baseline=(df.get("LayersSize") or 0) / MiB,
        baseline_what="df LayersSize",
        met=None if total is None else total in layers,
        note="pending: no `images` in status" if pending else f"{total} vs {sorted(layers)} bytes",
    )
    projects = {} if pending else (images.get("projects") or {})
    have = sorted(p for p in ours if p in projects)
    result.details["accounting"]["our_projects"] = {p: projects[p] for p in have}
    result.claim(
        "accounting.per_project",
        "per-project bytes (df cannot give them)",
        None if pending else float(len(have)),
        f"of {len(ours)} projects",
        goal="every project",
        met=None if pending else len(have) == len(ours),
    )
    await _writable_running(run, result, d, api, engine, len(slots))
    await _writable_exited(run, result, d, api, engine)
    await _ctl(run, result, d)


async def _our_size_rw(engine: RawEngine, d: BenchDaemon) -> dict[str, int]:
    """df's `SizeRw` of each of this daemon's containers."""
    df = await engine.call("GET", "/system/df")
    return {
        str(c["Id"]): int(c.get("SizeRw") or 0)
        for c in df.get("Containers") or []
        if (c.get("Labels") or {}).get("org.boinc.containers.owner") == d.instance_id
    }


async def _writable_running(
    run: Run, result: Result, d: BenchDaemon, api: DaemonApi, engine: RawEngine, n: int
) -> None:
    """Running containers' layers: measured at least once a minute (the engine walks
    each layer's files), so status reaches df within ~60 s of the writes."""
    written_at = result.details.pop("writes_done_at")
    deadline = written_at + run.seconds(75, 3)
    while True:
        df_rw = sum((await _our_size_rw(engine, d)).values())
        writable = ((await api.call("GET", "/v1/status")).get("containers") or {}).get(
            "writable_bytes"
        )
        if writable == df_rw or time.monotonic() > deadline:
            break
        await asyncio.sleep(1.0)
    after = time.monotonic() - written_at
    result.claim(
        "accounting.containers_rw",
        f"writable layers of the {n} running task containers (files they wrote),"
        f" status = df {after:.0f} s after the writes",
        None if writable is None else writable / MiB,
        "MiB",
        goal="= df `SizeRw`, within 60 s",
        baseline=df_rw / MiB,
        baseline_what="df SizeRw of the same containers",
        met=None if writable is None else writable == df_rw,
        note=f"looked for {run.seconds(75, 3):.0f} s at most after the writes",
    )
    result.details["accounting"]["containers_rw_s_after_writes"] = round(after, 1)


async def _writable_exited(
    run: Run, result: Result, d: BenchDaemon, api: DaemonApi, engine: RawEngine
) -> None:
    """A task container that exits is measured at once: from its `die` event until
    status's `containers.writable_bytes` counts its final layer as df does."""
    k = run.n(4, 1)
    slots = [
        Slot(
            run.workdir / "fleet-exit",
            i,
            project=f"bench_{run.run_id}_exit",
            result=f"fleet_{run.run_id}_exit{i}",
            image="boincd-test/busybox:latest",
            command=("sh", "-c", f"dd if=/dev/zero of=/tmp/out bs=65536 count={4 + i}; sleep 1"),
            memory_bytes=64 * MiB,
        ).write()
        for i in range(k)
    ]
    lags: list[float] = []
    met = True
    async with EventLog(engine, ("container",)) as events:
        await asyncio.gather(*(api.call("POST", "/v1/tasks", s.request()) for s in slots))
        tasks = await asyncio.gather(*(api.wait_state(s.result, ("created",)) for s in slots))
        before = ((await api.call("GET", "/v1/status")).get("containers") or {}).get(
            "writable_bytes"
        ) or 0
        t0_ns = time.time_ns()
        for s in slots:
            await api.call("POST", f"/v1/tasks/{s.result}/start")
        ids = [str(t["container_id"]) for t in tasks]
        dies = [
            await events.wait(container_event("die", cid=cid), after_ns=t0_ns, timeout_s=60)
            for cid in ids
        ]
        last_die = max(e.time_ns for e in dies) / 1e9
        rw = await _our_size_rw(engine, d)
        exited = sum(rw.get(cid, 0) for cid in ids)
        deadline = time.time() + run.seconds(10, 5)
        while True:
            writable = ((await api.call("GET", "/v1/status")).get("containers") or {}).get(
                "writable_bytes"
            ) or 0
            # Equal to df, or (running ones not measured again yet) up by the exits.
            if writable in (sum(rw.values()), before + exited):
                lags.append(time.time() - last_die)
                break
            if time.time() > deadline:
                met = False
                break
            await asyncio.sleep(0.02)
    for s in slots:
        await api.call("DELETE", f"/v1/tasks/{s.result}")
    lag = lags[0] if lags else None
    result.claim(
        "accounting.containers_rw_exit",
        f"a task container's final writable layer in `GET /v1/status` after its exit"
        f" ({k} containers, {exited / MiB:.2f} MiB; from the last `die` event)",
        lag,
        "s",
        goal="≤ 2 s, = df `SizeRw`",
        met=met and lag is not None and lag <= 2.0,
        note="" if met else f"not equal within {run.seconds(10, 5):.0f} s",
    )


async def _settled_status(api: DaemonApi, engine: RawEngine, timeout_s: float) -> dict[str, Any]:
    """Give the daemon's inventory time to take in the load (it follows events):
    until its total equals df's, or the deadline (then the claim says so)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status: dict[str, Any] = await api.call("GET", "/v1/status")
        images = status.get("images")
        if images is None:
            return status
        df = await engine.call("GET", "/system/df")
        if images.get("total_bytes") == df.get("LayersSize") or time.monotonic() > deadline:
            return status
        await asyncio.sleep(1.0)


async def _ctl(run: Run, result: Result, d: BenchDaemon) -> None:
    exe = Path(sys.executable).with_name("boincd-containers")
    env = {**os.environ, "BOINCD_SOCKET": d.socket}
    floor, ctl = [], []
    for _ in range(run.n(20, 2)):
        t0 = time.perf_counter()
        await asyncio.to_thread(subprocess.run, [sys.executable, "-c", "pass"], check=True)
        floor.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        done = await asyncio.to_thread(
            subprocess.run,
            [str(exe), "ctl", "status", "--json"],
            env=env,
            capture_output=True,
        )
        ctl.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise BenchError(f"ctl status --json failed: {done.stderr.decode()[-500:]}")
        json.loads(done.stdout)  # one JSON object, as the contract says
    if run.profile_dir is not None:
        traced = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-X", "importtime", str(exe), "ctl", "status", "--json"],
            env=env,
            capture_output=True,
        )
        stderr = traced.stderr.decode(errors="replace")
        result.details["profile_ctl_imports_ms"] = profiling.import_times(stderr)
        stats = run.profile_dir / "ctl.pstats"
        await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "cProfile",
                "-o",
                str(stats),
                str(exe),
                "ctl",
                "status",
                "--json",
            ],
            env=env,
            capture_output=True,
        )
        result.details["profile_ctl_cumulative_ms"] = profiling.pstats_top(stats)
    c, f = summary(ctl, 4), summary(floor, 4)
    result.details["ctl_status_json_s"] = c
    result.details["python_start_s"] = f
    result.claim(
        "accounting.ctl_status",
        "`ctl status --json` end to end, process start included (p95)",
        c["p95"] * 1e3,
        "ms",
        goal="≤ 100 ms",
        met=c["p95"] <= 0.100,
        baseline=f["p50"] * 1e3,
        baseline_what="`python -c pass` (p50)",
        note=f"p50 {c['p50'] * 1e3:.0f} ms",
    )


async def _with_shims(
    run: Run, result: Result, d: BenchDaemon, client: FakeClient, slots: list[Slot]
) -> None:
    pyz = shim_pyz(run)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for slot in slots:
            client.attach(slot)
            procs.append(launch_shim(pyz, slot, d.socket))
        await _all_reporting(client, slots, procs, timeout_s=120)
        shims = [psutil.Process(p.pid) for p in procs]
        s0 = sum(cpu_seconds(p) for p in shims)
        async with cpu_window(d.ps) as busy:
            if run.profile_dir is None:
                await asyncio.sleep(run.seconds(20, 3))
            else:
                out = run.profile_dir / "daemon-shims.txt"
                async with profiling.sampling(d.pid, out, rate=200) as prof:
                    await asyncio.sleep(run.seconds(20, 3))
                result.details["profile_daemon_with_shims"] = prof
        busy["shims_percent_of_one_core_each"] = (
            100 * (sum(cpu_seconds(p) for p in shims) - s0) / busy["wall_s"] / len(shims)
        )
        result.details["daemon_cpu_tasks_with_shims"] = busy
        rss = d.ps.memory_info().rss
        result.details["daemon_rss_with_shims"] = rss
        peaks = [float(vm_hwm_bytes(p.pid)) for p in procs]
        await asyncio.gather(*(client.asend(s, "<abort/>") for s in slots))
        codes = await asyncio.gather(*(areap(p, 120) for p in procs))
    finally:
        for proc in procs:
            kill_quietly(proc)
        for slot in slots:
            client.detach(slot)
    bad = [(s.result, code) for s, code in zip(slots, codes, strict=True) if code != 194]
    if bad:
        raise BenchError(f"shims did not exit 194 after abort: {bad[:5]}")
    result.details["shim_peak_rss_fleet_bytes"] = summary(peaks, 0)
    no_shims = result.details["daemon_rss_tasks_no_shims"]
    result.claim(
        "monitor.daemon_cpu_shims",
        f"daemon CPU, {len(slots)} tasks with their shims polling",
        busy["percent_of_one_core"],
        "%",
        note=f"each shim {busy['shims_percent_of_one_core_each']:.2f} % of a core",
    )
    result.claim(
        "memory.daemon_rss",
        f"daemon RSS with {len(slots)} tasks and their shims",
        rss / MiB,
        "MiB",
        goal="≤ 60 MB",
        met=rss <= 60 * 10**6,
        note=f"{no_shims / MiB:.1f} MiB before the shims attached",
    )
    result.claim(
        "memory.shim_peak_fleet",
        f"shim peak RSS, max of {len(peaks)} long-running shims",
        max(peaks) / MiB,
        "MiB",
        goal="≤ 15 MB",
        met=max(peaks) <= 15 * 10**6,
        note=f"median {summary(peaks, 0)['p50'] / MiB:.1f} MiB",
    )


async def _all_reporting(
    client: FakeClient, slots: list[Slot], procs: list[subprocess.Popen[bytes]], timeout_s: float
) -> None:
    """Every shim attached and sent app_status at least once (it saw its container)."""
    deadline = time.monotonic() + timeout_s
    while True:
        dead = [s for s, p in zip(slots, procs, strict=True) if p.poll() is not None]
        if dead:
            raise BenchError(f"a shim exited early:\n{dead[0].stderr_tail()}")
        waiting = [s for s in slots if "<other_pid>" not in client.last_status(s)]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{len(waiting)} shims never reported:\n{waiting[0].stderr_tail()}")
        await asyncio.sleep(0.5)
