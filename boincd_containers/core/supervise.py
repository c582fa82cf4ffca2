"""The one way the daemon runs a background loop: a failure is logged and the
loop restarted after a backoff, never passed on to whoever holds the loop,
where it could end the server and every sibling loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from boincd_containers.core.errors import BoincdError
from boincd_containers.core.log import get_logger

log = get_logger(__name__)

LoopFactory = Callable[[], Coroutine[Any, Any, None]]
T = TypeVar("T")

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 60.0
# A run that lasted this long was healthy: its next failure starts the backoff over.
HEALTHY_S = 60.0


def loop_name(make: LoopFactory) -> str:
    """A readable name for logs: `Monitor.run`, or where a lambda was written."""
    name = getattr(make, "__qualname__", "") or repr(make)
    code = getattr(make, "__code__", None)
    if "<lambda>" in name and code is not None:
        return f"{make.__module__}:{code.co_firstlineno}"
    return name


async def supervise(
    make: LoopFactory,
    name: str | None = None,
    *,
    first_backoff_s: float = FIRST_BACKOFF_S,
    max_backoff_s: float = MAX_BACKOFF_S,
) -> None:
    """Run `make()` until it returns; restart it after each unexpected exception.

    Cancellation (shutdown) passes through. A loop that returns has finished its
    work on purpose (e.g. a watchdog with nothing to watch) and is not restarted.
    """
    name = name or loop_name(make)
    backoff = first_backoff_s
    while True:
        started = time.monotonic()
        try:
            await make()
        except Exception as exc:  # CancelledError is no Exception: shutdown passes
            if time.monotonic() - started >= HEALTHY_S:
                backoff = first_backoff_s
            log.error("background loop failed", loop=name, retry_in_s=backoff, exc_info=exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff_s)
            continue
        log.info("background loop finished", loop=name)
        return


async def repeat(
    step: Callable[[], Awaitable[object]],
    interval_s: float,
    name: str,
    *,
    wait_first: bool = False,
    max_duty: float | None = None,
) -> None:
    """Run `step` every `interval_s`, for good: the one periodic loop of the daemon.

    A pass that fails does not end the loop: a BoincdError (the engine away, a
    full state disk) is a warning, anything else a bug logged with its
    traceback; the next pass follows at the usual time. `wait_first`: the first
    pass after one interval. `max_duty`: a pass that took long is followed by a
    longer pause, so that it takes at most that share of the time.
    """
    if wait_first:
        await asyncio.sleep(interval_s)
    while True:
        started = time.monotonic()
        try:
            await step()
        except BoincdError as exc:
            log.warning("background pass failed", loop=name, error=exc.message)
        except Exception as exc:  # a bug must not end the loop, nor its siblings
            log.error("background pass crashed", loop=name, exc_info=exc)
        pause = interval_s
        if max_duty is not None:
            pause = max(pause, (time.monotonic() - started) / max_duty)
        await asyncio.sleep(pause)


@contextlib.asynccontextmanager
async def running(*loops: LoopFactory) -> AsyncIterator[None]:
    """Each loop runs supervised while the block runs; on leaving it (normally or
    by cancellation) every loop is cancelled and awaited, so none outlives it.

    Not a TaskGroup: a TaskGroup held open across a `yield` would take the
    caller's cancellation for its own, and one child's failure would cancel the
    siblings; supervise() never lets a failure out."""
    background = Background()
    for make in loops:
        background.spawn(supervise(make), name=loop_name(make))
    try:
        yield
    finally:
        await background.close()


class Background:
    """The tasks a component starts on behalf of requests (a pull several tasks
    wait for, a task's preparation), owned by the component and ended by its
    close().

    Not a TaskGroup either: these tasks fail on their own (each reports its
    failure to whoever waits for it), and one failure must not cancel the
    others. Holding them here also keeps them referenced: the event loop keeps
    only weak references to tasks.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task still running and wait until each has ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
