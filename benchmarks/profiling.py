"""Where the time and memory go, for `--profile` runs: py-spy on the daemon, import
times and per-module RSS of the stdlib-only programs (shim, ctl).

py-spy is not a dependency of the project: `.venv/bin/pip install py-spy`. Without
it, `--profile` records why instead of failing the run.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

# Modules the shim and ctl import, heaviest first as measured; each is timed alone.
STDLIB_SUSPECTS = (
    "http.client",
    "ssl",
    "email.parser",
    "xml.etree.ElementTree",
    "tomllib",
    "dataclasses",
    "json, re, mmap, fcntl, socket",
)
# Leaf frames where a thread waits for work: not time spent on anything.
_IDLE_LEAVES = ("EpollSelector.select (", "_worker (concurrent/futures/thread.py)")
# Frames every sample passes through (event loop, thread plumbing, entry points):
# they say nothing about where the time goes, so the inclusive list skips them.
_PLUMBING = (
    "(asyncio/",
    "(<frozen",
    "(threading.py)",
    "(concurrent/futures/",
    "(selectors.py)",
    "(boincd_containers/cli.py)",
    "(boincd_containers/__main__.py)",
)
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")
_IMPORT = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


@asynccontextmanager
async def sampling(pid: int, out: Path, rate: int = 500) -> AsyncIterator[dict[str, Any]]:
    """py-spy record on a live process for the block; yields a dict filled with the
    top frames afterwards (or with the reason there are none)."""
    found: dict[str, Any] = {}
    exe = py_spy()
    if exe is None:
        found["error"] = "py-spy not installed (.venv/bin/pip install py-spy)"
        yield found
        return
    args = ["record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    proc = await asyncio.create_subprocess_exec(
        exe,
        *args,
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(0.5)  # attached before the measured work starts
    try:
        yield found
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    text = await asyncio.to_thread(_read, out)
    if text is not None:
        found.update(top_frames(text))
        found["raw"] = str(out)
    else:
        found["error"] = f"py-spy wrote nothing: {err.decode()[-300:]}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def top_frames(collapsed: str, n: int = 15) -> dict[str, Any]:
    """Inclusive and self shares (%) of the busy samples per function, from py-spy's
    collapsed stacks; samples of threads waiting for work are left out."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        if frames[-1].startswith(_IDLE_LEAVES):
            continue
        total += count
        for frame in set(frames):
            if not any(p in frame for p in _PLUMBING):
                inclusive[frame] += count
        own[frames[-1]] += count
    return {
        "samples": total,
        "inclusive": [(f, round(100 * c / total, 1)) for f, c in inclusive.most_common(n)]
        if total
        else [],
        "self": [(f, round(100 * c / total, 1)) for f, c in own.most_common(n)] if total else [],
    }


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


def import_times(stderr: str, n: int = 12) -> list[tuple[str, float, float]]:
    """(module, self ms, cumulative ms) of the slowest top-level imports from -X importtime."""
    rows = []
    for line in stderr.splitlines():
        match = _IMPORT.match(line)
        if match:
            rows.append((match[4], int(match[1]) / 1e3, int(match[2]) / 1e3, len(match[3])))
    top_level = [r for r in rows if r[3] <= 3]  # depth: the imports a program asked for
    top_level.sort(key=lambda r: r[2], reverse=True)
    return [(name, round(own, 1), round(cum, 1)) for name, own, cum, _ in top_level[:n]]


def module_rss() -> dict[str, int]:
    """Peak RSS (KiB) of a bare interpreter that imports only one module: what each
    import costs a stdlib-only program."""
    out = {}
    for stmt in ("pass", *STDLIB_SUSPECTS):
        code = (
            f"{'import ' + stmt if stmt != 'pass' else 'pass'}\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        out[stmt] = int(done.stdout.strip() or 0)
    return out


def pstats_top(path: Path, n: int = 15) -> list[tuple[str, float, float]]:
    """(function, cumulative ms, own ms) of the costliest calls in a cProfile dump."""
    import pstats

    try:
        stats = pstats.Stats(str(path))
    except (OSError, TypeError, EOFError) as exc:
        return [(f"no profile: {exc}", 0.0, 0.0)]
    rows = []
    for (file, line, func), (_, _, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            (f"{func} ({_short_path(file)}:{line})", round(cum * 1e3, 1), round(own * 1e3, 1))
        )
    rows.sort(key=lambda r: r[1], reverse=True)
    return rows[:n]


def _short_path(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path
