"""The real daemon as a process on the real engine, and an async client for its API.

Each benchmark group gets a fresh daemon (own state dir, so its own owner id):
whatever it created is found again by that label and removed at the end,
whatever happened, and nothing of anyone else's is ever touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchmarks.common import BenchError, Run
from boincd_containers.testing.daemon import DaemonProcess


class DaemonApi:
    """The daemon's JSON API over its socket (docs/api.md)."""

    def __init__(self, socket: str, timeout_s: float = 120.0) -> None:
        connector = aiohttp.UnixConnector(path=socket, limit=200)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)
        )

    async def close(self) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body: Any = None, *, ok404: bool = False) -> Any:
        kwargs: dict[str, Any] = {} if body is None else {"json": body}
        async with self.session.request(method, f"http://boincd{path}", **kwargs) as resp:
            raw = await resp.read()
            if resp.status == 404 and ok404:
                return None
            if resp.status >= 400:
                raise BenchError(f"daemon {method} {path}: {resp.status} {raw[:400]!r}")
            if "json" in resp.headers.get("Content-Type", ""):
                return json.loads(raw)
            return raw.decode()

    async def task(self, result: str) -> dict[str, Any]:
        data: dict[str, Any] = await self.call("GET", f"/v1/tasks/{result}")
        return data

    async def wait_state(
        self, result: str, states: Collection[str], timeout_s: float = 120.0
    ) -> dict[str, Any]:
        """Until the task is in one of `states`; a failed task is an error.

        While the task is being prepared this long-polls `POST .../wait` instead of
        polling: 32 waiters polling every 50 ms would load the daemon (and the 2
        cores) with the benchmark's own requests.
        """
        deadline = time.monotonic() + timeout_s
        task = await self.task(result)
        while True:
            if task["state"] in states:
                return task
            if task["state"] == "failed":
                raise BenchError(f"task {result} failed: {task.get('error')}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"task {result} still {task['state']} after {timeout_s:.0f} s")
            if task["state"] == "preparing":
                wait = f"/v1/tasks/{result}/wait?timeout={min(remaining, 10.0):.2f}"
                task = await self.call("POST", wait)
            else:
                await asyncio.sleep(0.05)
                task = await self.task(result)


class BenchDaemon:
    """A daemon started for one benchmark group; `async with` stops it and removes
    every container and volume it owns."""

    def __init__(self, run: Run, name: str) -> None:
        self.name = name
        self.keep_log = run.out_dir
        self.base = run.workdir / name
        self.base.mkdir(parents=True, exist_ok=True)
        # The built-in defaults (relist every 30 s, sampling at 1 Hz), not the tests'
        # faster relist: the figures are those of a daemon as installed.
        (self.base / "config.toml").write_text("# benchmarks: built-in defaults\n")
        self.process = DaemonProcess(self.base)
        self.api: DaemonApi | None = None

    @property
    def socket(self) -> str:
        return self.process.socket

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.pid)

    @property
    def instance_id(self) -> str:
        return self.process.instance_id

    async def __aenter__(self) -> BenchDaemon:
        try:
            await asyncio.to_thread(self.process.start)
        except BaseException:
            await self._cleanup()
            raise
        self.api = DaemonApi(self.socket)
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        await self._cleanup(keep_log=exc_type is not None)

    async def _cleanup(self, keep_log: bool = True) -> None:
        if self.api is not None:
            await self.api.close()
        await asyncio.to_thread(self.process.stop)
        await asyncio.to_thread(self.process.cleanup_engine_objects)
        if keep_log and self.keep_log is not None:  # for the post-mortem of a failure
            with contextlib.suppress(OSError):
                shutil.copyfile(self.process.log_path, self.keep_log / f"daemon-{self.name}.log")

    def log_tail(self) -> str:
        return self.process.log()


@contextlib.asynccontextmanager
async def daemon(run: Run, name: str) -> AsyncIterator[tuple[BenchDaemon, DaemonApi]]:
    async with BenchDaemon(run, name) as d:
        assert d.api is not None
        yield d, d.api


def log_path(d: BenchDaemon) -> Path:
    return d.process.log_path
