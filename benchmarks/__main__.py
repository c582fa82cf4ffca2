"""Run the benchmarks: `.venv/bin/python -m benchmarks [--smoke] [--only a,b] [--out DIR]
[--profile]`.

Writes DIR/results.json and DIR/results.md (default DIR: benchmarks/results; with
--smoke, a temporary dir removed at the end, unless --out is given) and prints the
table. --profile adds py-spy stacks of the daemon and import profiles of the shim
and ctl (into DIR), for finding out why a goal is missed.

Exit status: 0 when every benchmark ran, whatever the figures (a missed goal is
a finding, not a failure: timings on a shared 2-core machine are noisy); 1 when
something did not work (a task failed, a shim crashed, the engine refused); 2
for bad arguments. CI runs `--smoke` so that the code cannot rot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from benchmarks.bench_client import bench_client
from benchmarks.bench_client_ops import bench_client_ops
from benchmarks.bench_fleet import bench_fleet
from benchmarks.bench_monitor_sample import bench_monitor_sample
from benchmarks.bench_pull import bench_pull
from benchmarks.bench_start import bench_start
from benchmarks.bench_throughput import bench_throughput
from benchmarks.common import REPO, BenchError, RawEngine, Result, Run, machine_facts
from benchmarks.report import markdown
from boincd_containers.testing.daemon import ensure_test_image

DEFAULT_OUT = REPO / "benchmarks" / "results"
Bench = Callable[[Run, Result], Awaitable[None]]
BENCHES: dict[str, Bench] = {
    "start": bench_start,  # 1, 2, shim RSS
    "monitor_sample": bench_monitor_sample,  # 3 (per sample)
    "fleet": bench_fleet,  # 3 (daemon CPU), 5, 6
    "pull": bench_pull,  # 4
    "throughput": bench_throughput,  # 7
    "client": bench_client,  # 8: latency under the real BOINC client
    "client_ops": bench_client_ops,  # 9: control and cost under it, beside docker_wrapper
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks it all works")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--out", type=Path, help="where results.json and results.md go")
    parser.add_argument(
        "--profile", action="store_true", help="also profile (py-spy, -X importtime) into OUT"
    )
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    args.names = names
    return args


async def _main(
    args: argparse.Namespace, workdir: Path, out: Path
) -> tuple[dict[str, object], list[Result]]:
    # A SIGTERM (CI timeout, Ctrl-C from a wrapper) cancels the run, so that every
    # benchmark's `finally` removes what it created.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    await asyncio.to_thread(ensure_test_image)
    engine = RawEngine()
    try:
        machine = await machine_facts(engine)
    finally:
        await engine.close()
    run = Run(
        smoke=args.smoke,
        workdir=workdir,
        profile_dir=out / "profile" if args.profile else None,
        out_dir=out,
    )
    if run.profile_dir is not None:
        run.profile_dir.mkdir(exist_ok=True)
    results: list[Result] = []
    for name in args.names:
        result = Result(name)
        results.append(result)
        load0 = os.getloadavg()[0]
        print(
            f"== {name} — {machine['date_utc'][:11]}{time.strftime('%H:%M:%SZ', time.gmtime())},"
            f" {machine['cpus']} cores ({machine['cpu_model']}), {machine['engine']},"
            f" load {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            file=sys.stderr,
            flush=True,
        )
        t0 = time.monotonic()
        try:
            await BENCHES[name](run, result)
        except (BenchError, Exception) as exc:  # one broken benchmark must not hide the rest
            result.error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        result.seconds = time.monotonic() - t0
        result.load = (load0, os.getloadavg()[0])
        for claim in result.claims:
            print(
                f"   {claim.key}: {claim.value} {claim.unit} (met: {claim.met})",
                file=sys.stderr,
                flush=True,
            )
    await _sweep(run)
    machine["run_id"] = run.run_id
    return machine, results


async def _sweep(run: Run) -> None:
    """Last line of defence: anything labelled or named with this run's id goes."""
    from benchmarks.common import BENCH_LABEL

    engine = RawEngine()
    try:
        await engine.remove_labelled(f"{BENCH_LABEL}={run.run_id}")
        await engine.remove_images_with_prefix(run.image_repo)
    finally:
        await engine.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.chdir(REPO)
    # Unix socket paths must stay short: a scratch dir directly under /tmp.
    workdir = Path(tempfile.mkdtemp(prefix="bdb-"))
    workdir.chmod(0o755)
    out = args.out
    # A smoke run's figures mean nothing: unless asked, they go to a dir removed at the end.
    throwaway = out is None and args.smoke
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="bdb-out-")) if args.smoke else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    try:
        machine, results = asyncio.run(_main(args, workdir, out))
        doc = {"machine": machine, "smoke": args.smoke, "results": [r.to_json() for r in results]}
        (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        table = markdown(doc)
        (out / "results.md").write_text(table)
        print(table)
        if not throwaway:
            print(f"results: {out / 'results.json'}, {out / 'results.md'}", file=sys.stderr)
    except (KeyboardInterrupt, asyncio.CancelledError):
        # SIGTERM or Ctrl-C: every benchmark's `finally` has removed what it made.
        print("interrupted: what the benchmarks made has been removed", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if throwaway:
            shutil.rmtree(out, ignore_errors=True)
    failed = [r.name for r in results if r.error]
    if failed:
        print(f"benchmarks that did not work: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
