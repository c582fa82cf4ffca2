"""Small facts the daemon must not lose on a crash, written atomically.

Every JSON file of the state dir goes through `write_json`: a temporary file,
fsync, rename. A disk that is full or read-only makes it raise
`StateWriteError` (retryable, one of the daemon's own errors), never a bare
OSError that would turn a normal request into a 500 or stop a limit's kill
half-way. The callers keep what they meant to save in memory and save it again
with their next change.

Most writes are synchronous on purpose: a detached mark, an exceeded limit or
an image brought must be on disk before the step that depends on it (the
pause, the kill, handing the image out), and they come once per such event. The
one write that recurs on a clock, the shims' lease times, goes through
`write_json_off_loop` so that its fsync never holds up the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from boincd_containers.core.errors import StateWriteError


def write_json(path: Path, data: Any, **dump_options: Any) -> None:
    """Replace `path` with `data` as JSON, all or nothing; raises StateWriteError."""
    write_text(path, json.dumps(data, **dump_options))


async def write_json_off_loop(path: Path, data: Any, **dump_options: Any) -> None:
    """write_json with the write and its fsync in a worker thread: for a loop that
    saves now and then, whose event loop must not wait for the disk meanwhile.

    The data is encoded here, on the caller's thread, so changes made while the
    thread writes do not leak into the file half-made. The caller runs one save
    of a file at a time (the temporary file's name is fixed)."""
    text = json.dumps(data, **dump_options)
    await asyncio.to_thread(write_text, path, text)


def write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Replace `path` with `text` (and `mode`), all or nothing; raises StateWriteError."""
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            tmp.chmod(mode)
        os.replace(tmp, path)
    except OSError as exc:
        # A half-written temporary file would only take space a full disk lacks.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise StateWriteError(
            f"cannot save {path}: {exc.strerror or exc} (is the state dir's disk full "
            "or read-only? the change is kept in memory and saved again later)"
        ) from exc


class PersistentSet:
    """A set of strings saved as JSON on every change (write, fsync, rename).

    A failed save leaves the change in memory (the daemon acts on it) and marks
    the set dirty: the next change, or `flush()`, writes the whole set again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dirty = False
        try:
            loaded = json.loads(path.read_text())
            self._items = {str(x) for x in loaded} if isinstance(loaded, list) else set()
        except (OSError, ValueError):
            self._items = set()

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: str) -> None:
        """Add and save; raises StateWriteError when the save fails (the item stays)."""
        if item not in self._items:
            self._items.add(item)
            self.dirty = True
        self.flush()

    def discard(self, item: str) -> None:
        """Discard and save; raises StateWriteError when the save fails (it stays gone)."""
        if item in self._items:
            self._items.discard(item)
            self.dirty = True
        self.flush()

    def flush(self) -> None:
        """Save what an earlier failed save left unsaved; raises StateWriteError."""
        if self.dirty:
            write_json(self.path, sorted(self._items))
            self.dirty = False
