"""JSON answers made of parts that rarely change, encoded once per change.

A status answer is mostly the same from one request to the next: the image list
changes when images do, a task's figures once per sample. `KeptJSON` keeps each
such part with its text; `dumps` writes the answer around the kept texts instead
of encoding them again. Its output is json.dumps's, byte for byte (default
separators, ASCII escapes).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Hashable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class KeptJSON:
    """Parts of answers kept by name (a task, the image list) with their JSON text."""

    def __init__(self) -> None:
        self._by_name: dict[Hashable, tuple[Any, str]] = {}
        self._text_by_id: dict[int, str] = {}

    def keep(self, name: Hashable, value: T) -> T:
        """`value`, or the equal value kept under `name` before (so its text is
        reused). Equality is Python's: a number that turns from 1 into 1.0 keeps
        its old text, which the daemon's fields (each of one type) never do.
        A kept value must not be changed in place afterwards."""
        kept = self._by_name.get(name)
        if kept is not None:
            if kept[0] is value or kept[0] == value:
                return kept[0]  # type: ignore[no-any-return]
            self._text_by_id.pop(id(kept[0]), None)
        text = json.dumps(value)
        self._by_name[name] = (value, text)
        self._text_by_id[id(value)] = text
        return value

    def retain(self, names: Collection[Hashable]) -> None:
        """Forget the parts not named (tasks that are gone)."""
        for name in [n for n in self._by_name if n not in names]:
            value, _ = self._by_name.pop(name)
            self._text_by_id.pop(id(value), None)

    def __len__(self) -> int:
        return len(self._by_name)

    def dumps(self, value: Any, depth: int = 2) -> str:
        """json.dumps(value), taking each kept part's text as it is. Kept parts are
        looked for `depth` levels down (a status answer's are at two: `tasks[i]`,
        `images.items`); below that, values are encoded whole."""
        # Every kept value is held here, so no other live object has its id.
        text = self._text_by_id.get(id(value))
        if text is not None:
            return text
        if depth > 0 and type(value) is dict and all(type(k) is str for k in value):
            if depth > 1 or self._holds_kept(value.values()):
                members = (f"{json.dumps(k)}: {self.dumps(v, depth - 1)}" for k, v in value.items())
                return "{" + ", ".join(members) + "}"
        elif depth > 0 and type(value) is list and (depth > 1 or self._holds_kept(value)):
            return "[" + ", ".join(self.dumps(v, depth - 1) for v in value) + "]"
        return json.dumps(value)  # one call for all of it: the C encoder is faster

    def _holds_kept(self, values: Iterable[Any]) -> bool:
        return any(id(v) in self._text_by_id for v in values)
