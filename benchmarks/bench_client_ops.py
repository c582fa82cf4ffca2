"""9. Task control and cost under the real BOINC client: ours beside docker_wrapper.

Same client releases, fake project and data dirs as group 8 (`bench_client`), and
the same image for both wrappers, prepared as each needs it: ours names it in
job.toml, BOINC's docker_wrapper 22 gets it by `image_name` (built from a
Dockerfile whose CMD is the app), or, for the 8-task round, both build it from
the same Dockerfile in the slot. Per client release and wrapper:

* **control** (a task that sleeps): `boinccmd --task ... suspend` → the engine's
  `pause` event, `resume` → `unpause`, `abort` → `destroy` (container gone), each
  from just before boinccmd was started;
* **cost** over a window of the same task (60 s): CPU of the wrapper process
  (self + reaped children: every `docker` CLI process docker_wrapper runs) and
  the peak RSS of the slot's whole process tree, sampled every 0.25 s; for ours,
  also the daemon's CPU over the window (one daemon serves every task);
* **fraction-done freshness**: the benchmark writes the slot's `fraction_done`
  every 0.1 s with a value that encodes the time of writing; once a second
  `boinccmd --get_tasks` shows the client's figure, whose age is now minus the
  time it encodes;
* **CPU-bound task** (30 s of `yes`): wall time (container start → client done)
  and the CPU time the client reports (`final_cpu_time`) against the container's
  cgroup (`cpuacct.usage`, last read before the container went);
* **8 tasks at once**, one Dockerfile: image builds (tag events of this run's
  images) and client start → all 8 containers running.

Nothing here fails on timings; a docker_wrapper round that fails is counted and
left out, as in group 8.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.bench_client import (
    DOCKER_WRAPPER_DIR,
    _build_image,
    _docker_server_version,
    _script,
    _shared,
    clients,
)
from benchmarks.bench_start import shim_pyz
from benchmarks.common import (
    TEST_IMAGE,
    BenchError,
    Event,
    EventLog,
    RawEngine,
    Result,
    Run,
    cpu_seconds,
    summary,
)
from benchmarks.daemon import BenchDaemon, daemon
from boincd_containers.testing.boinc import BoincClient, ClientBinaries, FileSpec, ResultSpec

MiB = 2**20
FRACTION_SCALE_S = 1000.0  # fraction f was written at T0 + f * this
WRAPPERS = ("ours", "docker_wrapper")


@dataclass
class App:
    main: Path
    files: tuple[FileSpec, ...]


@dataclass
class Apps:
    """The app versions each wrapper runs, for each kind of task."""

    run: Run
    wrapper_dir: Path | None
    built: list[str] = field(default_factory=list)

    def _dir(self) -> Path:
        d = self.run.workdir / "client-ops-apps"
        d.mkdir(exist_ok=True)
        return d

    def get(self, wrapper: str, kind: str, command: str, dockerfile: str | None = None) -> App:
        """`command` (sh -c) runs in TEST_IMAGE; with `dockerfile`, both build it."""
        if wrapper == "ours":
            job = "" if dockerfile else f'image = "{TEST_IMAGE}"\n'
            job += "" if dockerfile else f"command = {json.dumps(['sh', '-c', command])}\n"
            files = [FileSpec("job.toml", (job or "# the slot's Dockerfile\n").encode())]
            if dockerfile:
                files.append(FileSpec("Dockerfile", dockerfile.encode()))
            return App(shim_pyz(self.run), tuple(files))
        assert self.wrapper_dir is not None
        version = _docker_server_version()
        main = _script(
            self._dir() / "docker_wrapper.sh",
            "grep -q '<docker_type>' init_data.xml || sed -i "
            f"'s|</host_info>|<docker_version>{version}</docker_version>"
            "<docker_type>1</docker_type></host_info>|' init_data.xml\n"
            'exec ./docker_wrapper "$@"\n',
        )
        binary = FileSpec("docker_wrapper", self.wrapper_dir / "docker_wrapper", executable=True)
        if dockerfile:
            # No image_name: it builds boinc__<project>__<wu> itself, per workunit.
            empty = FileSpec("job.toml", b"# the slot's Dockerfile\n")
            return App(main, (empty, FileSpec("Dockerfile", dockerfile.encode()), binary))
        # Untagged (docker_wrapper greps `docker images` for "NAME "), as in group 8.
        image = f"{self.run.image_repo}-dwops-{kind}"
        if image not in self.built:
            _build_image(image, f"FROM {TEST_IMAGE}\nCMD {json.dumps(['sh', '-c', command])}\n")
            self.built.append(image)
        return App(main, (FileSpec("job.toml", f'image_name = "{image}"\n'.encode()), binary))


def _client(
    run: Run,
    binaries: ClientBinaries,
    app: App,
    results: list[str],
    socket: str,
    *,
    network: bool = False,
) -> BoincClient:
    # `--unsigned_apps_ok` also suspends network activity for good, and both
    # wrappers hold a build back while it is (the build may fetch): off for builds.
    return BoincClient(
        run.workdir / f"ops-{results[0]}",
        app.main,
        project_name=f"bench{run.run_id}",
        results=[ResultSpec(r, outputs=()) for r in results],
        app_files=list(app.files),
        env={**os.environ, "BOINCD_SOCKET": socket},
        binaries=binaries,
        unsigned_apps_ok=not network,
    )


def _named(action: str, result: str) -> Any:
    def match(e: Event) -> bool:
        return bool(
            e.type == "container"
            and e.action == action
            and e.attributes.get("name", "").endswith("__" + result)
        )

    return match


def _of(action: str, cid: str) -> Any:
    def match(e: Event) -> bool:
        return e.type == "container" and e.action == action and e.actor_id == cid

    return match


async def _close(client: BoincClient) -> None:
    await asyncio.to_thread(client.close)
    shutil.rmtree(client.dir, ignore_errors=True)


def _root_pid(client: BoincClient) -> int | None:
    """The app's main process: the client's child in the slot (shim or docker_wrapper)."""
    if client.proc is None:
        return None
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(client.proc.pid).children():
            with contextlib.suppress(psutil.Error):
                if child.cwd().startswith(str(client.dir / "slots")):
                    return int(child.pid)
    return None


def _cpu_with_children(pid: int) -> float:
    """utime + stime + cutime + cstime: the process and the children it has reaped."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class Sampler:
    """Every 0.25 s: the slot's process tree (pids seen, summed RSS, its peak)."""

    def __init__(self, client: BoincClient) -> None:
        self.client = client
        self.peak_rss = 0
        self.pids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            total = 0
            for pid in self.client.slot_processes():
                with contextlib.suppress(psutil.Error):
                    total += psutil.Process(pid).memory_info().rss
                    self.pids.add(pid)
            self.peak_rss = max(self.peak_rss, total)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class FractionWriter:
    """Writes the slot's fraction_done every 0.1 s: the value says when it was written."""

    def __init__(self, slot: Path) -> None:
        self.slot = slot
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            value = (time.time() - self.t0) / FRACTION_SCALE_S
            tmp = self.slot / "fraction_done.tmp"
            with contextlib.suppress(OSError):
                tmp.write_text(f"{value:.6f}\n")
                os.replace(tmp, self.slot / "fraction_done")

    def age(self, fraction: float) -> float:
        return time.time() - (self.t0 + fraction * FRACTION_SCALE_S)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


async def _control(
    run: Run,
    binaries: ClientBinaries,
    wrapper: str,
    apps: Apps,
    d: BenchDaemon,
    events: EventLog,
) -> dict[str, Any]:
    tag = binaries.version.replace(".", "")
    result = f"ops_ctl_{wrapper}_{tag}".lower()
    client = _client(run, binaries, apps.get(wrapper, "ctl", "sleep 3600"), [result], d.socket)
    out: dict[str, Any] = {"suspend_s": [], "resume_s": [], "fraction_age_s": []}
    try:
        t0_ns = time.time_ns()
        await asyncio.to_thread(client.start)
        started = await events.wait(_named("start", result), after_ns=t0_ns, timeout_s=120)
        cid = started.actor_id
        slot = client.dir / "slots" / "0"
        writer = FractionWriter(slot)
        sampler = Sampler(client)
        root = _root_pid(client)
        try:
            await asyncio.sleep(2)  # settled: first exchanges with the client done
            window = run.seconds(60, 5)
            c0 = _cpu_with_children(root) if root else 0.0
            d0, w0 = cpu_seconds(d.ps), time.monotonic()
            end = w0 + window
            while time.monotonic() < end:
                await asyncio.sleep(1.0)
                task = await asyncio.to_thread(client.task, result)
                fraction = task.fraction_done if task else None
                if fraction:  # 0 until the wrapper has passed the file on
                    out["fraction_age_s"].append(writer.age(fraction))
            wall = time.monotonic() - w0
            if root:
                out["wrapper_cpu_percent"] = 100 * (_cpu_with_children(root) - c0) / wall
                with contextlib.suppress(OSError):
                    out["wrapper_vm_hwm_bytes"] = _vm_hwm(root)
            if wrapper == "ours":
                out["daemon_cpu_percent"] = 100 * (cpu_seconds(d.ps) - d0) / wall
        finally:
            writer.close()
            sampler.close()
        out["tree_peak_rss_bytes"] = sampler.peak_rss
        out["tree_pids_seen"] = len(sampler.pids)
        for _ in range(run.n(3, 1)):
            for op, action, key in (
                ("suspend", "pause", "suspend_s"),
                ("resume", "unpause", "resume_s"),
            ):
                at = time.time_ns()
                await asyncio.to_thread(client.boinccmd, "--task", client.master_url, result, op)
                ev = await events.wait(_of(action, cid), after_ns=at, timeout_s=60)
                out[key].append((ev.time_ns - at) / 1e9)
                await asyncio.sleep(1.0)
        at = time.time_ns()
        await asyncio.to_thread(client.abort, result)
        gone = await events.wait(_of("destroy", cid), after_ns=at, timeout_s=120)
        out["abort_to_gone_s"] = (gone.time_ns - at) / 1e9
    finally:
        await _close(client)
    return out


def _vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _final_cpu_time(state_file: Path, result: str) -> tuple[int, float, float] | None:
    """(state, final_cpu_time, file mtime) of the result as last saved."""
    try:
        with open(state_file, "rb") as f:
            mtime = os.fstat(f.fileno()).st_mtime
            root = ET.fromstring(f.read())
    except (OSError, ET.ParseError):
        return None
    for r in root.iter("result"):
        if r.findtext("name") == result:
            return int(r.findtext("state") or 0), float(r.findtext("final_cpu_time") or 0), mtime
    return None


def _cgroup_cpu_s(cid: str) -> float | None:
    for base in ("/sys/fs/cgroup/cpuacct/docker", "/sys/fs/cgroup/cpu,cpuacct/docker"):
        with contextlib.suppress(OSError, ValueError):
            return int(Path(base, cid, "cpuacct.usage").read_text()) / 1e9
    with contextlib.suppress(OSError, ValueError):  # cgroup v2, systemd driver
        text = Path(f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat").read_text()
        return int(text.split()[1]) / 1e6
    return None


async def _cpu_task(
    run: Run,
    binaries: ClientBinaries,
    wrapper: str,
    apps: Apps,
    d: BenchDaemon,
    events: EventLog,
) -> dict[str, Any]:
    tag = binaries.version.replace(".", "")
    result = f"ops_cpu_{wrapper}_{tag}".lower()
    seconds = run.seconds(30, 3)
    command = f"yes > /dev/null & sleep {seconds:g}; kill $!"
    client = _client(
        run, binaries, apps.get(wrapper, f"cpu{seconds:g}", command), [result], d.socket
    )
    out: dict[str, Any] = {"work_s": seconds}
    try:
        t0_ns = time.time_ns()
        t0 = time.time()
        await asyncio.to_thread(client.start)
        started = await events.wait(_named("start", result), after_ns=t0_ns, timeout_s=120)
        cgroup = 0.0
        deadline = time.monotonic() + seconds + 120
        while True:
            now = _cgroup_cpu_s(started.actor_id)
            if now is not None:
                cgroup = now
            state = _final_cpu_time(client.client_state_path, result)
            if state is not None and state[0] > 2:
                if state[0] not in (4, 5):  # a compute error: say why, keep the figures
                    out["stderr_tail"] = client.diagnostics()[-800:]
                break
            if time.monotonic() > deadline or not client.running:
                raise BenchError(f"{wrapper}: CPU task not done\n{client.diagnostics()}")
            await asyncio.sleep(0.1)
        died = events.find(_of("die", started.actor_id), after_ns=t0_ns)
        out.update(
            state=state[0],
            reported_cpu_s=state[1],
            cgroup_cpu_s=cgroup,
            client_start_to_done_s=state[2] - t0,
            container_start_to_done_s=state[2] - started.time_ns / 1e9,
            container_ran_s=None if died is None else (died.time_ns - started.time_ns) / 1e9,
        )
    finally:
        await _close(client)
    return out


async def _many(
    run: Run,
    binaries: ClientBinaries,
    wrapper: str,
    apps: Apps,
    d: BenchDaemon,
    events: EventLog,
) -> dict[str, Any]:
    tag = binaries.version.replace(".", "")
    n = run.n(8, 2)
    results = [f"ops_many_{wrapper}_{tag}_{i}".lower() for i in range(n)]
    # A label per round: each round builds its image anew (ours would reuse the last).
    dockerfile = (
        f"FROM {TEST_IMAGE}\nLABEL bench.round={wrapper}{tag}\nRUN echo built > /built\n"
        'CMD ["sh", "-c", "sleep 3600"]\n'
    )
    app = apps.get(wrapper, "many", "", dockerfile)
    client = _client(run, binaries, app, results, d.socket, network=True)
    marker = f"bench{run.run_id}"
    out: dict[str, Any] = {"tasks": n}
    try:
        t0_ns = time.time_ns()
        await asyncio.to_thread(client.start)
        starts = [
            await events.wait(_named("start", r), after_ns=t0_ns, timeout_s=run.seconds(300, 120))
            for r in results
        ]
        out["client_start_to_all_running_s"] = (max(e.time_ns for e in starts) - t0_ns) / 1e9
        out["client_start_to_first_running_s"] = (min(e.time_ns for e in starts) - t0_ns) / 1e9
        tags = {
            e.attributes.get("name", "")
            for e in events.events
            if e.type == "image"
            and e.action == "tag"
            and e.time_ns >= t0_ns
            and marker in e.attributes.get("name", "")
        }
        out["images_built"] = len(tags)
        for r in results:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(client.abort, r)
    finally:
        await _close(client)
    return out


def _remove_images(run: Run, d: BenchDaemon | None, built: list[str]) -> None:
    """This run's images: docker_wrapper's (by project name), ours (by owner label)."""
    found = subprocess.run(
        ["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout.split()
    names = [n for n in found if f"bench{run.run_id}" in n]
    names += [f"{b}:latest" for b in built]
    if d is not None:
        with contextlib.suppress(OSError):
            owner = d.instance_id
            names += subprocess.run(
                ["docker", "images", "-q", "--filter", f"label=org.boinc.containers.owner={owner}"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            ).stdout.split()
    for name in names:
        subprocess.run(["docker", "rmi", "-f", name], capture_output=True, timeout=60, check=False)


def _remove_containers(run: Run) -> None:
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"name=bench{run.run_id}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=60, check=False)


async def bench_client_ops(run: Run, result: Result) -> None:
    found = clients()
    if not found:
        raise BenchError("no BOINC client: apt-get install boinc-client")
    if run.smoke:
        found = found[:1]
    wrapper_dir = _shared(DOCKER_WRAPPER_DIR)
    wrappers = [w for w in WRAPPERS if w == "ours" or wrapper_dir is not None]
    apps = Apps(run, wrapper_dir)
    engine = RawEngine()
    by: dict[str, dict[str, dict[str, Any]]] = {}
    failures: list[dict[str, str]] = []
    loads: list[float] = []
    bench_daemon: BenchDaemon | None = None
    try:
        async with daemon(run, "client-ops") as (d, _api), EventLog(engine) as events:
            bench_daemon = d
            for binaries in found:
                per = by.setdefault(binaries.version, {})
                for part in (_control, _cpu_task, _many):
                    for wrapper in wrappers:
                        loads.append(os.getloadavg()[0])
                        name = part.__name__.strip("_")
                        try:
                            got = await part(run, binaries, wrapper, apps, d, events)
                        except BenchError as exc:
                            if wrapper == "ours":
                                raise
                            failures.append(
                                {"client": binaries.version, "part": name, "error": str(exc)}
                            )
                            print(f"   docker_wrapper {name} failed: {exc}", file=sys.stderr)
                            continue
                        per.setdefault(wrapper, {})[name] = got
                        print(
                            f"   client {binaries.version} {wrapper:>14} {name}: "
                            + json.dumps(_rounded(got)),
                            file=sys.stderr,
                            flush=True,
                        )
            # Ours: the images the daemon built are removed while its instance id is known.
            await asyncio.to_thread(_remove_images, run, bench_daemon, apps.built)
    finally:
        await engine.close()
        await asyncio.to_thread(_remove_containers, run)
        await asyncio.to_thread(_remove_images, run, None, apps.built)
    load_note = f"load 1-min {min(loads):.2f}-{max(loads):.2f}" if loads else ""
    result.details["client_ops"] = {
        "by_client": _rounded(by),
        "failures": failures,
        "load_1m": [round(x, 2) for x in loads],
    }
    for version, per in by.items():
        _claims(result, version, per, load_note)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _claims(result: Result, v: str, per: dict[str, dict[str, Any]], load_note: str) -> None:
    ours, dw = per.get("ours", {}), per.get("docker_wrapper", {})

    def get(side: dict[str, Any], part: str, key: str) -> Any:
        return (side.get(part) or {}).get(key)

    def p95(side: dict[str, Any], key: str) -> float | None:
        values = get(side, "control", key)
        return summary(values, 4).get("p95") if values else None

    def claim(key: str, what: str, mine: Any, theirs: Any, unit: str, **kw: Any) -> None:
        result.claim(
            f"ops.{v}.{key}",
            f"client {v}: {what}; {load_note}",
            None if mine is None else float(mine),
            unit,
            docker_wrapper=None if theirs is None else float(theirs),
            **kw,
        )

    claim(
        "suspend_p95",
        "`boinccmd suspend` → engine `pause` (p95)",
        p95(ours, "suspend_s"),
        p95(dw, "suspend_s"),
        "s",
        note="the client sends the message in its next 1 s pass, for either wrapper",
    )
    claim(
        "resume_p95",
        "`boinccmd resume` → engine `unpause` (p95)",
        p95(ours, "resume_s"),
        p95(dw, "resume_s"),
        "s",
        note="the client sends the message in its next 1 s pass, for either wrapper",
    )
    claim(
        "abort_gone",
        "`boinccmd abort` → container `destroy`",
        get(ours, "control", "abort_to_gone_s"),
        get(dw, "control", "abort_to_gone_s"),
        "s",
    )
    ages = get(ours, "control", "fraction_age_s") or []
    dw_ages = get(dw, "control", "fraction_age_s") or []
    claim(
        "fraction_age",
        "age of the client's fraction done (p50 of 1 Hz looks; max in note)",
        summary(ages, 3).get("p50"),
        summary(dw_ages, 3).get("p50"),
        "s",
        note=f"max {max(ages, default=0):.2f} s vs {max(dw_ages, default=0):.2f} s",
    )
    for key, what in (
        (
            "wrapper_cpu_percent",
            "CPU of the wrapper process (+ its reaped children) over the window",
        ),
    ):
        claim(
            "wrapper_cpu",
            what + " (% of one core)",
            get(ours, "control", key),
            get(dw, "control", key),
            "%",
            note=f"ours + daemon {get(ours, 'control', 'daemon_cpu_percent') or 0:.2f} %"
            " (the daemon serves every task)",
        )
    rss, dw_rss = (
        get(ours, "control", "tree_peak_rss_bytes"),
        get(dw, "control", "tree_peak_rss_bytes"),
    )
    claim(
        "tree_rss",
        "peak RSS of the slot's processes (wrapper + every docker CLI child)",
        None if rss is None else rss / MiB,
        None if dw_rss is None else dw_rss / MiB,
        "MiB",
        note=f"processes seen {get(ours, 'control', 'tree_pids_seen')} vs"
        f" {get(dw, 'control', 'tree_pids_seen')}",
    )
    for side in (ours, dw):
        if side.get("cpu_task"):
            c = side["cpu_task"]
            side["cpu_ratio"] = (
                c["reported_cpu_s"] / c["cgroup_cpu_s"] if c["cgroup_cpu_s"] else None
            )
    claim(
        "cpu_reported",
        "CPU-bound task: CPU time the client reports ÷ the cgroup's",
        ours.get("cpu_ratio"),
        dw.get("cpu_ratio"),
        "x",
        note=f"ours {_s(get(ours, 'cpu_task', 'reported_cpu_s'))} of"
        f" {_s(get(ours, 'cpu_task', 'cgroup_cpu_s'))}, docker_wrapper"
        f" {_s(get(dw, 'cpu_task', 'reported_cpu_s'))}"
        f" of {_s(get(dw, 'cpu_task', 'cgroup_cpu_s'))}",
    )
    claim(
        "cpu_wall",
        "CPU-bound task: container start → client done",
        get(ours, "cpu_task", "container_start_to_done_s"),
        get(dw, "cpu_task", "container_start_to_done_s"),
        "s",
        note=f"work {get(ours, 'cpu_task', 'work_s')} s; container ran"
        f" {_s(get(ours, 'cpu_task', 'container_ran_s'))}"
        f" vs {_s(get(dw, 'cpu_task', 'container_ran_s'))}",
    )
    claim(
        "many_builds",
        f"{get(ours, 'many', 'tasks')} tasks of one Dockerfile at once: images built",
        get(ours, "many", "images_built"),
        get(dw, "many", "images_built"),
        "builds",
        goal="1",
        met=None
        if get(ours, "many", "images_built") is None
        else get(ours, "many", "images_built") == 1,
    )
    claim(
        "many_all_running",
        "same: client start → all containers running",
        get(ours, "many", "client_start_to_all_running_s"),
        get(dw, "many", "client_start_to_all_running_s"),
        "s",
        note=f"first running {_s(get(ours, 'many', 'client_start_to_first_running_s'))} vs"
        f" {_s(get(dw, 'many', 'client_start_to_first_running_s'))}",
    )


def _s(value: Any) -> str:
    return "?" if value is None else f"{float(value):.2f} s"
