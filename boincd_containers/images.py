"""Getting the image a task needs: pull, load or build, each exactly once at a time.

Single-flight: any number of tasks asking for the same image share one
pull/load/build and all get its result or its error.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from . import labels as L
from .engine import Engine
from .errors import BadRequest, ImageError, NetworkSuspended, NotFound
from .log import get_logger
from .taskspec import TaskRequest

log = get_logger(__name__)

Progress = Callable[[str], None]

# Files BOINC and the shim put in a slot: never part of a build context.
_SLOT_NOISE = ("boinc_", "init_data.xml", "stderr.txt", "job.toml", "fraction_done")


class ImageCache:
    def __init__(self, engine: Engine, state_dir: Path, owner_id: str) -> None:
        self.engine = engine
        self.owner_id = owner_id
        self._inflight: dict[str, asyncio.Future[str]] = {}
        self._record_path = state_dir / "images.json"
        self.brought: dict[str, dict[str, Any]] = self._load_records()
        self.operations = 0  # pulls + loads + builds actually run (for tests, metrics)

    def _load_records(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._record_path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save_records(self) -> None:
        # Write-then-rename: a crash never leaves a half-written record.
        tmp = self._record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.brought, indent=1, sort_keys=True))
        os.replace(tmp, self._record_path)

    def _remember(self, ref: str, image_id: str, project: str, how: str) -> None:
        entry = self.brought.setdefault(
            ref, {"projects": [], "how": how, "brought_at": time.time()}
        )
        entry["id"] = image_id
        entry["last_used"] = time.time()
        if project not in entry["projects"]:
            entry["projects"].append(project)
        self._save_records()

    async def ensure(self, request: TaskRequest, progress: Progress | None = None) -> str:
        """The image reference to create the task's container from."""
        if request.image_archive:
            archive = self._find_archive(request)
            key = f"archive:{archive}"
            return await self._single_flight(key, lambda: self._load(archive, request, progress))
        if request.image:
            ref = request.image
            return await self._single_flight(
                f"pull:{ref}", lambda: self._pull(ref, request, progress)
            )
        context = build_context(Path(request.slot_dir))
        digest = hashlib.sha256(context).hexdigest()[:16]
        tag = f"boinc__{L.safe_name_part(request.project)}__{digest}"
        return await self._single_flight(
            f"build:{tag}", lambda: self._build(context, tag, request, progress)
        )

    async def _single_flight(self, key: str, work: Callable[[], Awaitable[str]]) -> str:
        task = self._inflight.get(key)
        if task is None:
            # Its own task, held here until done: a waiter that gives up (a task
            # aborted mid-pull) must not cancel the pull the other waiters share.
            task = asyncio.ensure_future(work())
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    async def close(self) -> None:
        """Cancel work nobody will wait for any more (daemon shutdown)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pull(self, ref: str, request: TaskRequest, progress: Progress | None) -> str:
        try:
            image = await self.engine.inspect_image(ref)
            self._remember(ref, image["Id"], request.project, "pull")
            return ref
        except NotFound:
            pass
        if not request.allow_fetch:
            raise NetworkSuspended(
                f"image {ref} is not here and BOINC has network activity suspended: "
                "the task waits for the network to pull it"
            )
        log.info("pulling image", image=ref, result=request.result)
        self.operations += 1

        def on_line(line: dict[str, Any]) -> None:
            if progress is not None and line.get("status"):
                detail = line.get("progress") or line.get("id") or ""
                progress(f"pull {ref}: {line['status']} {detail}".strip())

        await self.engine.pull_image(ref, on_line)
        image = await self.engine.inspect_image(ref)
        self._remember(ref, image["Id"], request.project, "pull")
        return ref

    def _find_archive(self, request: TaskRequest) -> Path:
        """A name in the slot or project dir, or an absolute path inside one of them."""
        name = request.image_archive or ""
        roots = [Path(d).resolve() for d in (request.slot_dir, request.project_dir) if d]
        candidates = [Path(name)] if os.path.isabs(name) else [r / name for r in roots]
        for candidate in candidates:
            real = candidate.resolve()
            if not any(real == r or r in real.parents for r in roots):
                raise BadRequest(f"image_archive {name!r} is outside the slot and project dirs")
            if real.is_file():
                return real
        raise ImageError(f"image_archive {name!r} is in neither the slot nor the project dir")

    async def _load(self, archive: Path, request: TaskRequest, progress: Progress | None) -> str:
        if request.image_digest:
            digest = await asyncio.to_thread(_sha256_file, archive)
            expected = request.image_digest.removeprefix("sha256:")
            if digest != expected:
                raise ImageError(
                    f"image_archive {archive.name}: sha256 {digest} "
                    f"does not match the job's {expected}"
                )
        if progress is not None:
            progress(f"loading {archive.name}")
        self.operations += 1
        loaded = await self.engine.load_image(archive)
        if not loaded:
            raise ImageError(f"image_archive {archive.name}: the engine loaded no image from it")
        ref = loaded[0]
        image = await self.engine.inspect_image(ref)
        self._remember(ref, image["Id"], request.project, "load")
        return ref

    async def _build(
        self, context: bytes, tag: str, request: TaskRequest, progress: Progress | None
    ) -> str:
        try:
            image = await self.engine.inspect_image(tag)
            self._remember(tag, image["Id"], request.project, "build")
            return tag
        except NotFound:
            pass
        self.operations += 1

        def on_line(line: dict[str, Any]) -> None:
            if progress is not None and line.get("stream", "").strip():
                progress(f"build {tag}: {line['stream'].strip()}")

        labels = {L.OWNER: self.owner_id, L.PROJECT: request.project}
        await self.engine.build_image(context, tag, labels, request.build_args, on_line)
        image = await self.engine.inspect_image(tag)
        self._remember(tag, image["Id"], request.project, "build")
        return tag


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_context(slot: Path) -> bytes:
    """A reproducible tar of the slot's build files: same files, same bytes, same hash."""
    if not (slot / "Dockerfile").is_file():
        raise BadRequest("the job names no image and the slot has no Dockerfile to build")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(slot.rglob("*")):
            rel = path.relative_to(slot)
            if rel.parts[0].startswith(_SLOT_NOISE) or not path.is_file() or path.is_symlink():
                continue
            info = tar.gettarinfo(str(path), arcname=str(rel))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    return buffer.getvalue()
