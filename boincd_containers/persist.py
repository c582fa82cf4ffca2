"""Small facts the daemon must not lose on a crash, written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path


class PersistentSet:
    """A set of strings saved as JSON on every change (write, fsync, rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path
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
        if item not in self._items:
            self._items.add(item)
            self._save()

    def discard(self, item: str) -> None:
        if item in self._items:
            self._items.discard(item)
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            json.dump(sorted(self._items), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
