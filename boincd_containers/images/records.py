"""What the image cache must remember across restarts: which images the daemon
brought (only those may ever be removed), when each was last used (eviction is
least-recently-used), and when each pulled tag was last asked of its registry.

Saved as `state_dir/images.json` on every change (write, fsync, rename): a
crash never leaves a half-written file, and a lost file only makes the daemon
more careful (an image it forgot it brought is never evicted, except its own
labelled builds, which it recognises again).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from boincd_containers.core.log import get_logger
from boincd_containers.core.persist import write_json
from boincd_containers.images.accounting import normalize_id

log = get_logger(__name__)

_VERSION = 2


class ImageRecords:
    def __init__(self, path: Path) -> None:
        self.path = path
        # image id -> {refs, projects, how, brought_at, last_used}
        self.images: dict[str, dict[str, Any]] = {}
        # pulled ref -> {id, resolved_at}
        self.tags: dict[str, dict[str, Any]] = {}
        # Last use of any image by a task, ours or not (not saved: display only).
        self.used_at: dict[str, float] = {}
        # Uses change often and matter little after a crash: saved with the next
        # change that matters, or by `save_if_dirty` (each eviction pass).
        self.dirty = False
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning(
                "image records unreadable; starting afresh", path=str(self.path), error=str(exc)
            )
            return
        if not isinstance(data, dict):
            return
        if data.get("version") == _VERSION:
            images, tags = data.get("images"), data.get("tags")
            self.images = {
                normalize_id(k): v for k, v in (images or {}).items() if isinstance(v, dict)
            }
            self.tags = {k: v for k, v in (tags or {}).items() if isinstance(v, dict)}
            return
        # Version 1: {ref: {id, projects, how, brought_at, last_used}}.
        for ref, entry in data.items():
            if not isinstance(entry, dict) or not entry.get("id"):
                continue
            image_id = normalize_id(str(entry["id"]))
            record = self.images.setdefault(
                image_id,
                {
                    "refs": [],
                    "projects": list(entry.get("projects") or []),
                    "how": entry.get("how", "pull"),
                    "brought_at": float(entry.get("brought_at") or 0.0),
                    "last_used": float(entry.get("last_used") or 0.0),
                },
            )
            record["refs"].append(ref)
            if entry.get("how") == "pull":
                self.tags[ref] = {"id": image_id, "resolved_at": record["brought_at"]}

    def save_if_dirty(self) -> None:
        if self.dirty:
            self.save()

    def save(self) -> None:
        """Write the records; raises StateWriteError (retryable) and stays dirty when
        the state disk refuses: the records in memory are kept and saved next time."""
        data = {"version": _VERSION, "images": self.images, "tags": self.tags}
        self.dirty = True
        write_json(self.path, data, indent=1, sort_keys=True)
        self.dirty = False

    def bring(self, image_id: str, ref: str, how: str) -> None:
        now = time.time()
        record = self.images.setdefault(
            normalize_id(image_id),
            {"refs": [], "projects": [], "how": how, "brought_at": now, "last_used": now},
        )
        if ref and ref not in record["refs"]:
            record["refs"].append(ref)
        self.save()

    def rename_ref(self, image_id: str, old: str, new: str) -> None:
        record = self.images.get(normalize_id(image_id))
        if record is None:
            return
        record["refs"] = [new if ref == old else ref for ref in record["refs"]]
        self.save()

    def resolved(self, ref: str, image_id: str, at: float) -> None:
        self.tags[ref] = {"id": normalize_id(image_id), "resolved_at": at}
        self.save()

    def touch(self, image_id: str, project: str | None = None) -> None:
        image_id = normalize_id(image_id)
        now = time.time()
        self.used_at[image_id] = now
        record = self.images.get(image_id)
        if record is None:
            return
        record["last_used"] = now
        self.dirty = True
        if project and project not in record["projects"]:
            record["projects"].append(project)
            self.save()

    def in_use(self, image_ids: Iterable[str]) -> None:
        """Images that containers use now count as used now (saved with the next change)."""
        now = time.time()
        for image_id in image_ids:
            image_id = normalize_id(image_id)
            self.used_at[image_id] = now
            if image_id in self.images:
                self.images[image_id]["last_used"] = now
                self.dirty = True

    def last_used(self, image_id: str) -> float | None:
        record = self.images.get(image_id)
        if record is not None:
            return float(record.get("last_used") or 0.0)
        return self.used_at.get(image_id)

    def forget(self, image_id: str) -> None:
        image_id = normalize_id(image_id)
        self.images.pop(image_id, None)
        self.used_at.pop(image_id, None)
        for ref in [r for r, t in self.tags.items() if t.get("id") == image_id]:
            del self.tags[ref]
        self.save()
