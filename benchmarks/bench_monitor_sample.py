"""One monitoring sample per container: cgroup files versus the Engine API stats call.

Starts N idle busybox containers, then times
  * a cgroup sample (cpu time + memory usage/working set) through CgroupReader,
    with the cgroup already resolved (the daemon's hot path), and the one-off resolution;
  * ``GET /containers/{id}/stats?stream=false`` (what a stats-based monitor calls), and the
    same with ``one-shot=true`` (API >= 1.41, skips the second CPU sample);
  * one monitoring tick over all N containers each way (API calls made concurrently).
Prints one JSON object; removes its containers whatever happens. Part of the suite
(`python -m benchmarks`); alone:

    .venv/bin/python -m benchmarks.bench_monitor_sample [--containers N] [--stats-calls K]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from typing import Any

import aiohttp

from benchmarks.common import Result, Run
from boincd_containers.host.cgroups import CgroupReader, cgroup_mode

IMAGE = "boincd-test/busybox:latest"
LABEL = "org.boinc.containers.benchmark"


def _socket_path() -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        sys.exit("DOCKER_HOST must be a local unix socket: cgroups are read on this host")
    return host.removeprefix("unix://")


def _summary(values: list[float], unit: str) -> dict[str, Any]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return {
        "unit": unit,
        "n": len(values),
        "median": round(statistics.median(ordered), 3),
        "p95": round(p95, 3),
        "min": round(ordered[0], 3),
        "max": round(ordered[-1], 3),
    }


async def _api(session: aiohttp.ClientSession, method: str, path: str, **kwargs: Any) -> Any:
    async with session.request(method, f"http://docker{path}", **kwargs) as resp:
        body = await resp.read()
        if resp.status >= 400:
            raise RuntimeError(f"{method} {path}: {resp.status} {body[:200]!r}")
        return json.loads(body) if body else None


async def _start(session: aiohttp.ClientSession, run_id: str, index: int) -> tuple[str, int]:
    spec = {
        "Image": IMAGE,
        "Cmd": ["sleep", "3600"],
        "Labels": {LABEL: run_id},
        "HostConfig": {"NetworkMode": "none"},
    }
    name = f"boincd-bench-{run_id}-{index}"
    created = await _api(session, "POST", f"/containers/create?name={name}", json=spec)
    cid: str = created["Id"]
    await _api(session, "POST", f"/containers/{cid}/start")
    info = await _api(session, "GET", f"/containers/{cid}/json")
    return cid, int(info["State"]["Pid"])


async def _remove_all(session: aiohttp.ClientSession, run_id: str) -> None:
    # By label rather than by the ids we got back: a container created just before
    # an interruption is removed too.
    filters = json.dumps({"label": [f"{LABEL}={run_id}"]})
    found = await _api(session, "GET", "/containers/json", params={"all": "1", "filters": filters})
    await asyncio.gather(
        *(_api(session, "DELETE", f"/containers/{c['Id']}?force=1") for c in found),
        return_exceptions=True,
    )


def _time_cgroups(containers: list[tuple[str, int]], samples: int) -> dict[str, Any]:
    resolve_us: list[float] = []
    sample_us: list[float] = []
    tick_us: list[float] = []
    reader = CgroupReader()
    for cid, pid in containers:
        # Resolution cost, on fresh readers so that nothing is cached.
        for _ in range(20):
            fresh = CgroupReader()
            t0 = time.perf_counter_ns()
            fresh.get(cid, pid)
            resolve_us.append((time.perf_counter_ns() - t0) / 1e3)
        cg = reader.get(cid, pid)
        for _ in range(samples):
            t0 = time.perf_counter_ns()
            cg.sample()
            sample_us.append((time.perf_counter_ns() - t0) / 1e3)
    for _ in range(samples):
        t0 = time.perf_counter_ns()
        for cid, pid in containers:
            reader.sample(cid, pid)
        tick_us.append((time.perf_counter_ns() - t0) / 1e3)
    return {
        "resolve": _summary(resolve_us, "us"),
        "sample": _summary(sample_us, "us"),
        "tick_all_containers": _summary(tick_us, "us"),
    }


async def _time_stats(
    session: aiohttp.ClientSession, containers: list[tuple[str, int]], calls: int, one_shot: bool
) -> dict[str, Any]:
    params = {"stream": "false"}
    if one_shot:
        params["one-shot"] = "true"
    per_call_ms: list[float] = []
    for cid, _ in containers:
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            await _api(session, "GET", f"/containers/{cid}/stats", params=params)
            per_call_ms.append((time.perf_counter_ns() - t0) / 1e6)
    tick_ms: list[float] = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        await asyncio.gather(
            *(
                _api(session, "GET", f"/containers/{cid}/stats", params=params)
                for cid, _ in containers
            )
        )
        tick_ms.append((time.perf_counter_ns() - t0) / 1e6)
    return {
        "call": _summary(per_call_ms, "ms"),
        "tick_all_containers_concurrent": _summary(tick_ms, "ms"),
    }


async def measure(containers_n: int, samples: int, stats_calls: int) -> dict[str, Any]:
    """Everything above, on `containers_n` fresh containers, as one JSON-able dict."""
    run_id = uuid.uuid4().hex[:8]
    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.UnixConnector(path=_socket_path())
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        try:
            version = await _api(session, "GET", "/version")
            containers = [await _start(session, run_id, i) for i in range(containers_n)]
            cg = _time_cgroups(containers, samples)
            stats = await _time_stats(session, containers, stats_calls, one_shot=False)
            one_shot = await _time_stats(session, containers, stats_calls, one_shot=True)
        finally:
            await _remove_all(session, run_id)

    sample_ms = cg["sample"]["median"] / 1e3
    return {
        "benchmark": "monitor_sample",
        "host": {
            "engine": f"Docker {version['Version']} (API {version['ApiVersion']})",
            "cgroup_mode": cgroup_mode(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "containers": containers_n,
        "cgroup": cg,
        "stats_api_stream_false": stats,
        "stats_api_one_shot": one_shot,
        "ratio_median_stats_call_over_cgroup_sample": round(stats["call"]["median"] / sample_ms),
        "ratio_median_one_shot_call_over_cgroup_sample": round(
            one_shot["call"]["median"] / sample_ms
        ),
    }


async def bench_monitor_sample(run: Run, result: Result) -> None:
    """Part of 3: the cost of one sample, cgroup files against the stats API."""
    data = await measure(run.n(2, 1), run.n(2000, 200), run.n(2, 1))
    result.details["monitor_sample"] = data
    cg_us = data["cgroup"]["sample"]["median"]
    stats_ms = data["stats_api_stream_false"]["call"]["median"]
    one_shot_ms = data["stats_api_one_shot"]["call"]["median"]
    ratio = stats_ms * 1e3 / cg_us
    result.claim(
        "monitor.sample",
        "one sample from cgroup files (cpu + memory, median)",
        cg_us,
        "µs",
        baseline=stats_ms * 1e3,
        baseline_what="one stats API call, stream=false",
        goal="≥ 1000x cheaper",
        met=ratio >= 1000,
        note=f"stats one-shot=true {one_shot_ms:.0f} ms; "
        f"resolving a cgroup once {data['cgroup']['resolve']['median']:.0f} µs",
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--containers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2000, help="cgroup samples per container")
    parser.add_argument("--stats-calls", type=int, default=3, help="API calls per container")
    args = parser.parse_args()
    print(json.dumps(await measure(args.containers, args.samples, args.stats_calls), indent=2))


if __name__ == "__main__":
    asyncio.run(main())
