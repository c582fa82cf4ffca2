"""8. Latency under the real BOINC client: a 3 s task, client start → task done.

The unmodified client (Debian's 7.20.5 and 8.2.15, whichever are installed) runs
standalone with a fake project whose one task is already downloaded, so it
starts the task at once. Per client release and round, four app versions run
the same 3 s of work, interleaved (the order rotates each round, so background
load falls on each alike):

* **native**: the main program sleeps 3 s, writes `boinc_finish_called` and
  exits 0, the client's own floor;
* **cli**: a shell script around `docker run --rm --network none -v
  "$PWD":/app -w /app IMAGE sh -c 'sleep 3'`, the simplest container wrapper;
* **ours**: boincd-shim (.pyz) with `job.toml` `image` and `command`, against a
  real daemon process (one for the whole group, as on a volunteer's host);
* **docker_wrapper**: BOINC's own (release 22), full runs only; under 7.20 its
  main program first adds `<docker_type>`/`<docker_version>` to init_data.xml,
  which 7.20 never writes (../shared/docker_wrapper-22/README.md).

Clock: `time.time()` just before the client's `Popen` → the first time
client_state.xml shows the result past "downloaded" (polled every 25 ms; the
client rewrites the file in the same pass as it handles the app's exit). The
same detection for every variant, and passive: boinccmd polling would wake the
client's main loop and change what is measured. On the way the poll also
records when the client launched the app (mtime of the slot's init_data.xml,
written just before the fork), when the container started and died (the
engine's events), and when the app wrote boinc_finish_called (its mtime), so
the table can say where the time goes.

Each round starts a fresh client in a fresh data dir. The image is present
beforehand. Reuses boincd_containers/testing/boinc.py (`BoincClient`) for the client's data
dir and lifecycle rather than a second copy of it here (see issue 16).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import shutil
import struct
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.bench_start import shim_pyz
from benchmarks.common import (
    BENCH_LABEL,
    REPO,
    TEST_IMAGE,
    BenchError,
    EventLog,
    RawEngine,
    Result,
    Run,
    summary,
)
from benchmarks.daemon import daemon
from boincd_containers.testing.boinc import (
    CLIENT_8_2,
    DEBIAN_CLIENT,
    BoincClient,
    ClientBinaries,
    FileSpec,
    ResultSpec,
)

GOAL_S = 0.3
POLL_S = 0.025
# Past "downloaded" (2): 3 compute error, 4 uploading, 5 uploaded, 6 aborted, ...
SUCCESS_STATES = (4, 5)
DOCKER_WRAPPER_DIR = "docker_wrapper-22"
BOINC8_DIR = "boinc-client-8.2.15"


def _shared(name: str) -> Path | None:
    """A dir of ../shared/, looked for beside the checkout and above it (a worktree
    lives a level deeper than the main checkout)."""
    for parent in REPO.parents:
        candidate = parent / "shared" / name
        if candidate.is_dir():
            return candidate
    return None


def clients() -> list[ClientBinaries]:
    found = [DEBIAN_CLIENT] if DEBIAN_CLIENT.available() else []
    if CLIENT_8_2.available():
        found.append(CLIENT_8_2)
    elif "BOINCD_TEST_BOINC8_DIR" not in os.environ and (d := _shared(BOINC8_DIR)) is not None:
        alt = ClientBinaries(CLIENT_8_2.version, d / "boinc", d / "boinccmd")
        if alt.available():
            found.append(alt)
    return found


# -- the app versions ----------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    main: Path
    files: tuple[FileSpec, ...] = ()
    container: bool = True


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _docker_server_version() -> str:
    done = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout.strip() or "20.10.0"


def _build_image(tag: str, dockerfile: str) -> None:
    done = subprocess.run(
        ["docker", "build", "-q", "-t", tag, "-"],
        input=dockerfile,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"docker build {tag}: {done.stderr.strip()[-300:]}")


def variants(run: Run, task_s: float, with_docker_wrapper: bool) -> list[Variant]:
    d = run.workdir / "client-apps"
    d.mkdir(exist_ok=True)
    sleep = f"sleep {task_s:g}"
    native = _script(
        d / "native.sh",
        f"{sleep}\nprintf '0\\n' > boinc_finish_called\nexit 0\n",
    )
    # The container's name carries the result (from init_data.xml), so that its
    # engine events can be told apart; the label lets the run's sweep find it.
    cli = _script(
        d / "cli.sh",
        "result=$(sed -n 's|.*<result_name>\\(.*\\)</result_name>.*|\\1|p' init_data.xml)\n"
        f'docker run --rm --name "{run.name("cli")}-$result" --label {BENCH_LABEL}={run.run_id}'
        f' --network none -v "$PWD":/app -w /app {TEST_IMAGE} sh -c {sleep!r}\n'
        "status=$?\nprintf '%d\\n' \"$status\" > boinc_finish_called\nexit $status\n",
    )
    job = f'image = "{TEST_IMAGE}"\ncommand = ["sh", "-c", "{sleep}"]\n'
    out = [
        Variant("native", f"native app (sleep {task_s:g}, finish file, exit)", native, (), False),
        Variant("cli", "docker CLI shim (`docker run --rm`)", cli),
        Variant(
            "ours",
            "boincd-shim + daemon",
            shim_pyz(run),
            (FileSpec("job.toml", job.encode()),),
        ),
    ]
    wrapper_dir = _shared(DOCKER_WRAPPER_DIR)
    if with_docker_wrapper and wrapper_dir is not None:
        # docker_wrapper runs the image's own CMD; `image_name` keeps it from
        # building and removing a per-workunit image.
        image = _wrapper_image(run)
        _build_image(image, f'FROM {TEST_IMAGE}\nCMD ["sh", "-c", "{sleep}"]\n')
        version = _docker_server_version()
        main = _script(
            d / "docker_wrapper.sh",
            "grep -q '<docker_type>' init_data.xml || sed -i "
            f"'s|</host_info>|<docker_version>{version}</docker_version>"
            "<docker_type>1</docker_type></host_info>|' init_data.xml\n"
            'exec ./docker_wrapper "$@"\n',
        )
        out.append(
            Variant(
                "docker_wrapper",
                "BOINC docker_wrapper 22",
                main,
                (
                    FileSpec("job.toml", f'image_name = "{image}"\n'.encode()),
                    FileSpec("docker_wrapper", wrapper_dir / "docker_wrapper", executable=True),
                ),
            )
        )
    return out


# -- one round -------------------------------------------------------------------------


@dataclass
class Round:
    client: str
    variant: str
    index: int
    result: str
    load_1m: float
    # Seconds after the client's Popen; None where the variant has no such point.
    done_s: float = 0.0
    launch_s: float | None = None
    container_start_s: float | None = None
    container_die_s: float | None = None
    finish_file_s: float | None = None
    state: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "extra"}
        for k, v in out.items():
            if isinstance(v, float):
                out[k] = round(v, 4)
        return out


def _result_state(state_file: Path, result: str) -> tuple[int, str, float] | None:
    """The result's state and stderr_out as last saved, and when the client saved
    them (the file's mtime: the client writes client_state_next.xml and renames it,
    in the same pass as it handles the app's exit)."""
    try:
        with open(state_file, "rb") as f:
            mtime = os.fstat(f.fileno()).st_mtime
            root = ET.fromstring(f.read())
    except (OSError, ET.ParseError):
        return None  # between the client's unlink and rename; try again
    for r in root.iter("result"):
        if r.findtext("name") == result:
            return int(r.findtext("state") or 0), r.findtext("stderr_out") or "", mtime
    return None


_IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE, _IN_ISDIR = 0x8, 0x80, 0x100, 0x40000000
_EVENT = struct.Struct("iIII")


class SlotWatch:
    """When files appeared in the task's slot, from inotify.

    A poll cannot do it: when the app exits just before one of the client's
    passes, the client deletes the slot's files (boinc_finish_called among them)
    within milliseconds. Each time is the file's mtime, or the event's own time
    where the file is already gone.
    """

    def __init__(self, slots: Path, names: tuple[str, ...]) -> None:
        self.slots = slots
        self.names = names
        self.times: dict[str, float] = {}
        self._stop = threading.Event()
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise BenchError(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        self._dirs: dict[int, Path] = {}
        self._watch(slots, _IN_CREATE)
        for existing in slots.iterdir():  # none in a fresh data dir, but be sure
            if existing.is_dir():
                self._watch(existing, _IN_CREATE | _IN_MOVED_TO | _IN_CLOSE_WRITE)
        self._thread = threading.Thread(target=self._run, name="slot-watch", daemon=True)
        self._thread.start()

    def _watch(self, path: Path, mask: int) -> None:
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(path), mask)
        if wd >= 0:
            self._dirs[wd] = path

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            at = time.time()
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
                offset += _EVENT.size + length
                name = raw.rstrip(b"\0").decode(errors="replace")
                parent = self._dirs.get(wd)
                if parent is None:
                    continue
                if parent == self.slots:
                    if mask & _IN_ISDIR:
                        self._watch(parent / name, _IN_CREATE | _IN_MOVED_TO | _IN_CLOSE_WRITE)
                        self._seen(parent / name, at)  # made before the watch was on
                elif name in self.names and name not in self.times:
                    try:
                        self.times[name] = (parent / name).stat().st_mtime
                    except OSError:
                        self.times[name] = at

    def _seen(self, slot: Path, at: float) -> None:
        for name in self.names:
            if name not in self.times:
                with contextlib.suppress(OSError):
                    self.times[name] = (slot / name).stat().st_mtime

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self._fd)


async def _one_round(
    run: Run,
    binaries: ClientBinaries,
    variant: Variant,
    index: int,
    socket: str,
    events: EventLog,
    timeout_s: float,
) -> Round:
    tag = binaries.version.replace(".", "")
    result = f"{variant.name}_{tag}_r{index}".lower()
    base = run.workdir / f"client-{result}"
    client = BoincClient(
        base,
        variant.main,
        project_name=f"bench{run.run_id}",
        results=[ResultSpec(result, outputs=())],
        app_files=list(variant.files),
        env={**os.environ, "BOINCD_SOCKET": socket},
        binaries=binaries,
    )
    record = Round(binaries.version, variant.name, index, result, os.getloadavg()[0])
    watch = SlotWatch(client.dir / "slots", ("init_data.xml", "boinc_finish_called"))
    try:
        t0 = time.time()
        t0_ns = time.time_ns()
        await asyncio.to_thread(client.start)
        deadline = time.monotonic() + timeout_s
        while True:
            state = _result_state(client.client_state_path, result)
            if state is not None and state[0] > 2:
                record.done_s = state[2] - t0
                record.state = state[0]
                if state[0] not in SUCCESS_STATES:
                    raise BenchError(
                        f"{variant.name} under client {binaries.version}: task ended in state "
                        f"{state[0]}: {state[1][-600:]}"
                    )
                break
            if not client.running:
                raise BenchError(f"client {binaries.version} exited:\n{client.diagnostics()}")
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{variant.name} under client {binaries.version}: not done within "
                    f"{timeout_s:.0f} s\n{client.diagnostics()}"
                )
            await asyncio.sleep(POLL_S)
        if (at := watch.times.get("init_data.xml")) is not None:
            record.launch_s = at - t0
        if (at := watch.times.get("boinc_finish_called")) is not None:
            record.finish_file_s = at - t0
        if variant.container:

            def named(action: str) -> Any:
                def match(e: Any) -> bool:
                    return bool(
                        e.type == "container"
                        and e.action == action
                        and e.attributes.get("name", "").endswith(result)
                    )

                return match

            for action, attr in (("start", "container_start_s"), ("die", "container_die_s")):
                found = events.find(named(action), after_ns=t0_ns)
                if found is not None:
                    setattr(record, attr, found.time_ns / 1e9 - t0)
    finally:
        watch.close()
        await asyncio.to_thread(client.close)
        shutil.rmtree(base, ignore_errors=True)
    return record


def _remove_docker_wrapper_leftovers(run: Run) -> None:
    """docker_wrapper names its containers `boinc__<project>__<result>` and labels
    nothing: find them by this run's project name, which no one else uses. Its image
    is untagged by name: every run builds the same image id, so the sweep's "every
    tag is this run's" test would keep it while another run's tag is on it."""
    names = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"name=bench{run.run_id}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout.split()
    if names:
        subprocess.run(["docker", "rm", "-f", *names], capture_output=True, timeout=60, check=False)
    subprocess.run(
        ["docker", "rmi", f"{_wrapper_image(run)}:latest"],
        capture_output=True,
        timeout=60,
        check=False,
    )


def _wrapper_image(run: Run) -> str:
    # Untagged in job.toml: docker_wrapper's "exists" test greps `docker images`
    # for "NAME " (repository column), so a tag would make it build one.
    return f"{run.image_repo}-dw"


# -- the group ---------------------------------------------------------------------------


def _p(values: list[float | None]) -> dict[str, Any]:
    return summary([v for v in values if v is not None], digits=3)


def _phases(rounds: list[Round]) -> dict[str, Any]:
    """Median of each phase: launch, container start, run, exit noticed, client notice."""

    def diff(a: str, b: str) -> list[float | None]:
        out: list[float | None] = []
        for r in rounds:
            x, y = getattr(r, a), getattr(r, b)
            out.append(None if x is None or y is None else y - x)
        return out

    phases = {
        "done": _p([r.done_s for r in rounds]),
        "client_start_to_launch": _p([r.launch_s for r in rounds]),
        "launch_to_container_start": _p(diff("launch_s", "container_start_s")),
        "container_run": _p(diff("container_start_s", "container_die_s")),
        "container_die_to_finish_file": _p(diff("container_die_s", "finish_file_s")),
        "launch_to_finish_file": _p(diff("launch_s", "finish_file_s")),
        "finish_file_to_done": _p(diff("finish_file_s", "done_s")),
        # Whole seconds (+ the client's own few ms): the passes it took to notice.
        "launch_to_done": _p(diff("launch_s", "done_s")),
    }
    return {k: v for k, v in phases.items() if v.get("n")}


async def bench_client(run: Run, result: Result) -> None:
    found = clients()
    if not found:
        raise BenchError("no BOINC client: apt-get install boinc-client")
    task_s = 3.0
    n = run.n(7, 1)
    timeout_s = 120.0
    rounds: list[Round] = []
    failures: list[dict[str, Any]] = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    engine = RawEngine()
    try:
        # docker_wrapper needs ~15 s a task (DESIGN.md): full runs only.
        todo = variants(run, task_s, with_docker_wrapper=not run.smoke)
        async with daemon(run, "client") as (d, _api), EventLog(engine, ("container",)) as events:
            schedule: list[tuple[int, ClientBinaries, Variant]] = []
            if not run.smoke:  # a warm-up round of each, not counted: caches, first task
                schedule += [(-1, found[0], v) for v in todo if v.name != "docker_wrapper"]
            for i in range(n):
                for c_index, binaries in enumerate(found):
                    k = (i + c_index) % len(todo)
                    schedule += [(i, binaries, v) for v in todo[k:] + todo[:k]]
            for i, binaries, variant in schedule:
                try:
                    one = await _one_round(run, binaries, variant, i, d.socket, events, timeout_s)
                except BenchError as exc:
                    if variant.name != "docker_wrapper":
                        raise
                    # A reference, not ours: a round that failed is counted and left
                    # out. Seen here: its boinc__ container removed from outside
                    # mid-task (any 8.2 client started on the host without
                    # allow_multiple_clients removes every boinc__ container).
                    failures.append({"client": binaries.version, "round": i, "error": str(exc)})
                    print(f"   docker_wrapper round {i} failed: {exc}", file=sys.stderr)
                    continue
                print(
                    f"   client {one.client} {one.variant:>14} round {i}: {one.done_s:.2f} s"
                    f" (load {one.load_1m:.2f})",
                    file=sys.stderr,
                    flush=True,
                )
                if i >= 0:
                    rounds.append(one)
    finally:
        await engine.close()
        await asyncio.to_thread(_remove_docker_wrapper_leftovers, run)
    load_after = [round(x, 2) for x in os.getloadavg()]
    loads = [r.load_1m for r in rounds]
    load_note = f"load 1-min {min(loads):.2f}-{max(loads):.2f} during the rounds"

    by: dict[str, dict[str, Any]] = {}
    for binaries in found:
        per: dict[str, Any] = {}
        for v in todo:
            mine = [r for r in rounds if r.client == binaries.version and r.variant == v.name]
            if mine:
                failed = sum(
                    1
                    for f in failures
                    if f["client"] == binaries.version and v.name == "docker_wrapper"
                )
                per[v.name] = {"what": v.what, "phases": _phases(mine), "failed": failed}
        by[binaries.version] = per
    result.details["client_latency"] = {
        "task_s": task_s,
        "rounds_per_variant": n,
        "poll_s": POLL_S,
        "load_before": load_before,
        "load_after": load_after,
        "by_client": by,
        "rounds": [r.to_json() for r in rounds],
        "docker_wrapper_failures": failures,
    }
    result.details["extra_md"] = _phase_table(by, n, load_note)

    for binaries in found:
        _claims(result, binaries.version, by[binaries.version], task_s, load_note)


def _claims(result: Result, v: str, per: dict[str, Any], task_s: float, load_note: str) -> None:
    """The table's rows for one client release."""

    def done(variant: str) -> dict[str, Any]:
        found: dict[str, Any] = per[variant]["phases"]["done"]
        return found

    def work(variant: str) -> float | None:
        value = per[variant]["phases"].get("launch_to_finish_file", {}).get("p50")
        return None if value is None else float(value)

    native = done("native")
    result.claim(
        f"client.{v}.native",
        f"{task_s:g} s task under client {v}, client start → done: native app (p50);"
        f" min {native['min']:.2f} s; launched"
        f" {_median(per, 'native', 'client_start_to_launch')} s after the client's start,"
        f" boinc_finish_called {_median(per, 'native', 'launch_to_finish_file')} s after the"
        f" launch; {load_note}",
        native["p50"],
        "s",
    )
    rows = [
        ("cli", "docker CLI shim"),
        ("docker_wrapper", "BOINC docker_wrapper 22"),
        ("ours", "boincd-shim + daemon"),
    ]
    dw_p50 = done("docker_wrapper")["p50"] if "docker_wrapper" in per else None
    for name, label in rows:
        if name not in per:
            continue
        mine = done(name)
        failed = per[name]["failed"]
        result.claim(
            f"client.{v}.{name}",
            f"same, {label} (p50)"
            + (f", {failed} failed round(s) left out" if failed else "")
            + f"; min {mine['min']:.2f} s; container running"
            f" {_median(per, name, 'launch_to_container_start')} s after the launch,"
            f" boinc_finish_called {_median(per, name, 'container_die_to_finish_file')} s after"
            f" its exit ({_median(per, name, 'launch_to_finish_file')} s after the launch)",
            mine["p50"],
            "s",
            baseline=native["p50"],
            baseline_what="native app (p50)",
            docker_wrapper=dw_p50 if name != "docker_wrapper" else None,
        )
    ours, cli = done("ours"), done("cli")
    over = ours["p50"] - native["p50"]
    result.claim(
        f"client.{v}.overhead",
        f"ours - native under client {v} (p50s); docker CLI - native"
        f" {cli['p50'] - native['p50']:+.2f} s, ours - docker CLI"
        f" {ours['p50'] - cli['p50']:+.2f} s; min - min {ours['min'] - native['min']:+.2f} s",
        round(over, 3),
        "s",
        goal=f"≤ {GOAL_S} s",
        met=over <= GOAL_S,
    )
    # The client notices an exit only at its next pass (once a second, counted from
    # the launch): "done" moves in whole seconds. The launch → boinc_finish_called
    # time is the same comparison without that rounding.
    w_ours, w_native, w_cli = work("ours"), work("native"), work("cli")
    if w_ours is not None and w_native is not None:
        cli_note = "" if w_cli is None else f"; docker CLI - native {w_cli - w_native:+.2f} s"
        result.claim(
            f"client.{v}.overhead_unrounded",
            f"ours - native, app launch → boinc_finish_called (p50s), not rounded to the"
            f" client's 1 s pass{cli_note}",
            round(w_ours - w_native, 3),
            "s",
        )


def _phase_table(by: dict[str, dict[str, Any]], n: int, load_note: str) -> list[str]:
    """Where the time goes, per client and variant (p50 of each phase, seconds)."""
    cols = [
        ("done", "client start → done"),
        ("client_start_to_launch", "client start → app launched"),
        ("launch_to_container_start", "launch → container running"),
        ("container_run", "container ran"),
        ("container_die_to_finish_file", "container exit → boinc_finish_called"),
        ("launch_to_finish_file", "launch → boinc_finish_called"),
        ("launch_to_done", "launch → done (client passes)"),
    ]
    lines = [
        f"Where the time goes under the real client: p50 of {n} rounds, seconds"
        f" (min of the total in brackets); {load_note}.",
        "",
        "| client | variant | " + " | ".join(label for _, label in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for version, per in by.items():
        for name, entry in per.items():
            cells = []
            for key, _ in cols:
                stats = entry["phases"].get(key)
                if stats is None:
                    cells.append("")
                elif key == "done":
                    cells.append(f"{stats['p50']:.2f} ({stats['min']:.2f})")
                else:
                    cells.append(f"{stats['p50']:.2f}")
            lines.append(f"| {version} | {name} | " + " | ".join(cells) + " |")
    return lines


def _median(per: dict[str, Any], variant: str, phase: str) -> str:
    value = per[variant]["phases"].get(phase, {}).get("p50")
    return "?" if value is None else f"{value:.2f}"
