"""Getting the image a task needs: pull, load or build, each exactly once at a time.

Single-flight: any number of tasks asking for the same image share one
pull/load/build and all get its result or its error. The cache hands out image
*ids*: a task's container is created from the id resolved for it, so when a
project pushes a new image under the same tag, running tasks keep theirs and
new tasks get the new one (a tag is re-resolved at most every
`tag_refresh_interval_s`).

What the daemon brought (pulled, loaded or built while absent) is recorded in
`state_dir/images.json`; only those images are ever removed, and only when no
container uses them and no task is between resolving and creating its
container (a lease). Everything else on the engine is the volunteer's.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from boincd_containers.core import labels as L
from boincd_containers.core.errors import (
    BadRequest,
    BoincdError,
    Conflict,
    ImageError,
    NetworkSuspended,
    NotFound,
    Unavailable,
)
from boincd_containers.core.log import get_logger
from boincd_containers.core.supervise import Background
from boincd_containers.engine.protocols import ImageCacheEngine
from boincd_containers.host.safepath import READ_FILE, Opened, UnsafePath, inside, open_beneath
from boincd_containers.images.accounting import normalize_id
from boincd_containers.images.records import ImageRecords
from boincd_containers.images.sources import (
    CONTEXT_CAP_BYTES,
    BuildContext,
    BuildTracker,
    ContextStream,
    PullProgress,
    archive_image,
    base_images,
    build_context,
    fetch_error,
    normalize_ref,
    sha256_file,
)
from boincd_containers.job.spec import CheckedPaths, TaskRequest, check_paths

log = get_logger(__name__)

_DOCKERFILE_MAX_BYTES = 1 << 20
PULL_RETRY_S = 5.0  # after a pull whose registry could not be reached, doubling...
PULL_RETRY_MAX_S = 300.0  # ...up to this

Progress = Callable[[str], None]

__all__ = ["ImageCache", "Progress", "Resolved", "build_context", "normalize_ref"]


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a task's container is created from: `id`; `ref` names it for people."""

    ref: str
    id: str


@dataclass(frozen=True, slots=True)
class Removal:
    """The outcome of trying to remove one image."""

    image_id: str
    removed: bool
    reason: str  # why it stayed, or "removed" / "already gone"


class ImageCache:
    def __init__(
        self,
        engine: ImageCacheEngine,
        state_dir: Path,
        owner_id: str,
        *,
        tag_refresh_interval_s: float = 3600.0,
        pull_stall_s: float = 120.0,
    ) -> None:
        self.engine = engine
        self.owner_id = owner_id
        self.tag_refresh_interval_s = tag_refresh_interval_s
        self.pull_stall_s = pull_stall_s
        # ref -> (not before, next delay): a registry that could not be reached is
        # not asked again for each task that wants the image, but after a backoff.
        self._pull_backoff: dict[str, tuple[float, float, BoincdError]] = {}
        self.records = ImageRecords(state_dir / "images.json")
        self._inflight: dict[str, asyncio.Future[str]] = {}
        self._background = Background()  # the flights, ended by close()
        self._progress: dict[str, str] = {}  # flight key -> latest progress line
        self._details: dict[str, dict[str, Any]] = {}  # flight key -> bytes, rate
        self._listeners: dict[str, list[Progress]] = {}
        self._waiting: dict[str, set[str]] = {}  # flight key -> tasks waiting for it
        # Held while checking that an image is present and leasing it, and while
        # removing one: an eviction can never pull an image from under a task
        # that has resolved it but not yet created its container.
        self._lock = asyncio.Lock()
        # Task (its container name, unique per project and result) -> image id.
        self.leases: dict[str, str] = {}
        # Called when an image was brought or the disk filled up (eviction wakes).
        self.on_change: list[Callable[[], None]] = []
        self.operations = 0  # pulls + loads + builds actually run (for tests, metrics)

    @property
    def brought(self) -> dict[str, dict[str, Any]]:
        """Image id -> record (refs, projects, how, brought_at, last_used)."""
        return self.records.images

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()

    def _failed(self, exc: BoincdError, what: str) -> BoincdError:
        error = fetch_error(exc, what)
        if error.message.startswith("disk full"):
            self._changed()  # the eviction may make room before the task tries again
        return error

    # -- resolving ----------------------------------------------------------------

    async def ensure(
        self,
        request: TaskRequest,
        progress: Progress | None = None,
        *,
        paths: CheckedPaths | None = None,
    ) -> Resolved:
        """The image for this task, present and leased to it until `release(request.name)`.

        `paths`: the task's checked slot and project dirs (taskspec.check_paths),
        which builds and archives are read from; without them they are opened here.
        """
        own = paths is None
        if paths is None:
            paths = check_paths(request, peer_uid=0)
        try:
            return await self._ensure(request, progress, paths)
        finally:
            if own:
                paths.close()

    async def _ensure(
        self, request: TaskRequest, progress: Progress | None, paths: CheckedPaths
    ) -> Resolved:
        for _ in range(3):
            resolved = await self._resolve(request, progress, paths)
            async with self._lock:
                if await self._present(resolved.id):
                    self.leases[request.name] = resolved.id
                    self.records.touch(resolved.id, request.project)
                    return resolved
            log.info("image removed right after it was resolved; again", image=resolved.ref)
        raise Unavailable(f"image {resolved.ref} keeps disappearing from the engine")

    def release(self, holder: str) -> None:
        """The task's container (named `holder`) exists and pins the image now, or
        never will."""
        self.leases.pop(holder, None)

    async def _inspect(self, ref: str) -> dict[str, Any] | None:
        try:
            return await self.engine.images.inspect(ref)
        except NotFound:
            return None

    async def _present(self, ref: str) -> str | None:
        image = await self._inspect(ref)
        return None if image is None else normalize_id(str(image["Id"]))

    async def _resolve(
        self, request: TaskRequest, progress: Progress | None, paths: CheckedPaths
    ) -> Resolved:
        if request.image_archive:
            return await self._from_archive(request, progress, paths)
        if request.image:
            return await self._from_registry(normalize_ref(request.image), request, progress)
        cap = request.disk_bytes or CONTEXT_CAP_BYTES
        # Hashed in a worker thread (it reads every file): the tag names the content.
        context = BuildContext(paths.slot, paths.owner, cap)
        try:
            full_digest = await asyncio.to_thread(context.digest)
        finally:
            context.close()
        digest = full_digest[:16]
        tag = L.built_image_name(request.project, digest)
        image = await self._inspect(tag)
        if image is not None:
            image_id = normalize_id(str(image["Id"]))
            labels = (image.get("Config") or {}).get("Labels") or {}
            if image_id not in self.records.images and L.is_ours(labels, self.owner_id):
                # Our own build, its record lost (images.json): labels are the truth.
                self.records.bring(image_id, tag, "build")
            return Resolved(tag, image_id)
        # While BOINC suspends network use, a build whose base images are all here
        # is tried without network; only one that needs a pull waits.
        offline = not request.allow_fetch
        if offline and not await self._bases_present(paths):
            raise _suspended(f"image {tag} must be built from an image that is not here")
        # The build reads the slot again, later, maybe after this task is gone:
        # from a context opened now on the checked slot, which the build owns.
        if f"build:{tag}" in self._inflight:
            build = None
        else:
            build = ContextStream(BuildContext(paths.slot, paths.owner, cap))
        image_id = await self._single_flight(
            f"build:{tag}",
            request.name,
            progress,
            lambda key: self._build(build, full_digest, tag, request, key, network=not offline),
        )
        return Resolved(tag, image_id)

    async def _bases_present(self, paths: CheckedPaths) -> bool:
        """Whether every image the slot's Dockerfile builds FROM is here."""
        try:
            text = await asyncio.to_thread(_read_dockerfile, paths)
        except (BoincdError, OSError):
            return False  # the build itself will say what is wrong with it
        bases = base_images(text)
        if bases is None:
            return False
        for base in bases:
            if await self._present(normalize_ref(base)) is None:
                return False
        return True

    async def _single_flight(
        self,
        key: str,
        holder: str,
        progress: Progress | None,
        work: Callable[[str], Awaitable[str]],
    ) -> str:
        task = self._inflight.get(key)
        if task is None:
            # Its own task, held here until done: a waiter that gives up (a task
            # aborted mid-pull) must not cancel the pull the other waiters share.
            task = self._background.spawn(self._fly(key, work), name=key)
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._flight_done(key))
        if progress is not None:
            self._listeners.setdefault(key, []).append(progress)
            if key in self._progress:
                progress(self._progress[key])
        waiting = self._waiting.setdefault(key, set())
        waiting.add(holder)
        try:
            return await asyncio.shield(task)
        finally:
            waiting.discard(holder)

    async def _fly(self, key: str, work: Callable[[str], Awaitable[str]]) -> str:
        image_id = await work(key)
        # Leased to every task waiting for it in the very step it was recorded as
        # brought: the eviction that wakes cannot take it before they lease it.
        for holder in self._waiting.get(key, ()):
            self.leases[holder] = image_id
        return image_id

    def _flight_done(self, key: str) -> None:
        self._inflight.pop(key, None)
        self._progress.pop(key, None)
        self._details.pop(key, None)
        self._listeners.pop(key, None)
        self._waiting.pop(key, None)

    def _report(self, key: str, text: str) -> None:
        """Every task waiting for this flight sees its progress (in `ctl status`)."""
        self._progress[key] = text
        for listener in self._listeners.get(key, []):
            listener(text)

    def in_progress(self) -> list[dict[str, Any]]:
        """Pulls, loads and builds running now, for status."""
        return [
            {
                "what": key,
                "progress": self._progress.get(key, ""),
                **self._details.get(key, {}),
                "tasks": len(self._listeners.get(key, ())),
            }
            for key in sorted(self._inflight)
        ]

    async def close(self) -> None:
        """Cancel work nobody will wait for any more (daemon shutdown)."""
        await self._background.close()
        self.records.save_if_dirty()

    # -- pull ---------------------------------------------------------------------

    def _stale(self, ref: str, now: float) -> bool:
        """A tag this daemon pulled is asked again of the registry after the interval;
        an image somebody else put here is used as it is."""
        tag = self.records.tags.get(ref)
        if tag is None or "@" in ref:
            return False
        return now - float(tag.get("resolved_at", 0.0)) >= self.tag_refresh_interval_s

    async def _from_registry(
        self, ref: str, request: TaskRequest, progress: Progress | None
    ) -> Resolved:
        present = await self._present(ref)
        if present is not None and not self._stale(ref, time.time()):
            return Resolved(ref, present)
        if present is not None and not request.allow_fetch:
            return Resolved(ref, present)  # the volunteer's network switch wins over freshness
        if present is None and not request.allow_fetch:
            raise _suspended(f"image {ref} is not here and must be pulled")
        backoff = self._pull_backoff.get(ref)
        if present is None and backoff is not None and time.monotonic() < backoff[0]:
            # The last attempt's error, until the backoff is over.
            raise copy.copy(backoff[2])
        image_id = await self._single_flight(
            f"pull:{ref}", request.name, progress, lambda key: self._pull(ref, present, key)
        )
        return Resolved(ref, image_id)

    async def _pull(self, ref: str, had: str | None, key: str) -> str:
        log.info("pulling image", image=ref, refresh=had is not None)
        self.operations += 1
        tracker = PullProgress(ref)

        loop = asyncio.get_running_loop()

        def on_line(line: dict[str, Any]) -> None:
            stall.reschedule(loop.time() + self.pull_stall_s)  # data came: not stalled
            text = tracker.update(line)
            if text is not None:
                self._report(key, text)
                self._details[key] = tracker.detail()
            if line.get("status") == "Pull complete":
                log.info("image layer pulled", image=ref, layer=line.get("id"), done=text)

        try:
            try:
                async with asyncio.timeout(self.pull_stall_s) as stall:
                    await self.engine.images.pull(ref, on_line)
            except TimeoutError:
                raise Unavailable(
                    f"pull of {ref} stalled: no data for {self.pull_stall_s:.0f} s "
                    "(it is tried again later)"
                ) from None
            image_id = await self._present(ref)
            if image_id is None:
                raise ImageError(f"pull {ref}: the engine reports success but has no such image")
        except BoincdError as exc:
            error = self._failed(exc, f"cannot pull {ref}")
            if error.retryable:
                _, delay, _ = self._pull_backoff.get(ref, (0.0, PULL_RETRY_S / 2, error))
                delay = min(delay * 2, PULL_RETRY_MAX_S)
                until = time.monotonic() + delay * random.uniform(0.8, 1.2)
                self._pull_backoff[ref] = (until, delay, error)
            if had is None:
                log.warning("pull failed", image=ref, error=error.message)
                raise error from exc
            # A refresh that fails leaves the image that is here in use; ask again
            # only after another interval, not on every task while the registry is down.
            log.warning("tag refresh failed; using the image here", image=ref, error=error.message)
            self.records.resolved(ref, had, time.time())
            return had
        self._pull_backoff.pop(ref, None)
        brought = had is None or image_id != had
        if had is not None and image_id != had:
            log.info("tag moved to a new image", image=ref, old=had, new=image_id)
        self.records.resolved(ref, image_id, time.time())
        if brought:
            self.records.bring(image_id, ref, "pull")
            self._changed()
        log.info("image ready", image=ref, id=image_id, new=brought)
        return image_id

    # -- load ---------------------------------------------------------------------

    async def _from_archive(
        self, request: TaskRequest, progress: Progress | None, paths: CheckedPaths
    ) -> Resolved:
        archive = find_archive(request, paths)
        try:
            return await self._archive(archive, request, progress)
        finally:
            archive.close()

    async def _archive(
        self, archive: Archive, request: TaskRequest, progress: Progress | None
    ) -> Resolved:
        if request.image_digest:
            digest = await asyncio.to_thread(sha256_file, archive.open())
            expected = request.image_digest.removeprefix("sha256:").lower()
            if digest != expected:
                raise ImageError(
                    f"image_archive {archive.name}: sha256 {digest} "
                    f"does not match the job's {expected}"
                )
        # The image id is the hash of the archive's config: an image already here
        # is not loaded again, whichever slot's copy of the archive a task brings.
        image_id, tags = await asyncio.to_thread(archive_image, archive.open(), archive.name)
        ref = tags[0] if tags else image_id or archive.name
        if image_id and await self._present(image_id):
            return Resolved(ref, image_id)
        key = f"load:{image_id or archive.path}"
        # The load may outlive this task: it reads its own descriptor of the file.
        body = None if key in self._inflight else archive.open()
        loaded_id = await self._single_flight(
            key,
            request.name,
            progress,
            lambda key: self._load(body, archive.name, image_id, ref, key),
        )
        return Resolved(ref, loaded_id)

    async def _load(
        self, body: BinaryIO | None, name: str, image_id: str | None, ref: str, key: str
    ) -> str:
        assert body is not None  # the first task of a flight opened it
        self._report(key, f"loading {name}")
        log.info("loading image archive", archive=name)
        self.operations += 1
        try:
            with body:
                loaded = await self.engine.images.load(body, name=name)
        except BoincdError as exc:
            raise self._failed(exc, f"image_archive {name} could not be loaded") from exc
        found = image_id
        if found is None and loaded:  # an archive in another layout: ask the engine
            found = await self._present(loaded[0])
        if found is None:
            raise ImageError(f"image_archive {name}: the engine loaded no image from it")
        self.records.bring(found, ref, "load")
        self._changed()
        return found

    # -- build --------------------------------------------------------------------

    async def _build(
        self,
        context: ContextStream | None,
        digest: str,
        tag: str,
        request: TaskRequest,
        key: str,
        *,
        network: bool = True,
    ) -> str:
        assert context is not None  # the first task of a flight opened it
        try:
            return await self._build_from(context, digest, tag, request, key, network)
        finally:
            context.close()

    async def _build_from(
        self,
        context: ContextStream,
        digest: str,
        tag: str,
        request: TaskRequest,
        key: str,
        network: bool,
    ) -> str:
        self.operations += 1
        tracker = BuildTracker()

        def on_line(line: dict[str, Any]) -> None:
            text = tracker.update(line)
            if text:
                self._report(key, f"build {tag}: {text}")

        labels = {L.OWNER: self.owner_id, L.PROJECT: request.project}
        log.info("building image", image=tag, result=request.result)
        try:
            try:
                await self.engine.images.build(
                    context, tag, labels, request.build_args, on_line, network=network
                )
            except BoincdError as exc:
                # Our own reading stopped the request: say why, not "connection lost".
                if isinstance(context.error, BoincdError):
                    raise context.error from exc
                if not network:
                    # Perhaps for want of the network BOINC suspended: wait for it.
                    raise _suspended(
                        f"image {tag} could not be built without network ({exc.message})"
                    ) from exc
                raise
            sent = context.hexdigest()
            if sent != digest:
                # The files changed between hashing and sending (the app still
                # writing): name the image by what it was really built from.
                final = L.built_image_name(request.project, sent[:16])
                await self.engine.images.tag(tag, f"{final}:latest")
                await self.engine.images.remove(tag)  # an untag: the new name stays
                log.info("build files changed while sent; image named by them", image=final)
                tag = final
            image_id = await self._present(tag)
            if image_id is None:
                raise ImageError(f"build {tag}: the engine reports success but has no such image")
        except BoincdError as exc:
            # Steps that did succeed left untagged images behind: ours, remove them.
            for fresh in reversed(tracker.fresh_images):
                try:
                    await self.engine.images.remove(fresh)
                except BoincdError as cleanup:
                    log.warning(
                        "cannot remove a failed build's step", image=fresh, error=str(cleanup)
                    )
            if isinstance(exc, NetworkSuspended):
                raise  # retried once BOINC allows network use again
            error = self._failed(exc, f"cannot build the slot's Dockerfile ({tag})")
            log.warning("build failed", image=tag, error=error.message)
            raise error from exc
        self.records.bring(image_id, tag, "build")
        self._changed()
        return image_id

    async def adopt_legacy_tags(self) -> None:
        """Give the images we built under the old `boinc__` name their `boincd__`
        name: a BOINC 8.2 client's start-up cleanup removes `boinc__` images that
        no task of its own uses."""
        for image in await self.engine.images.list(L.owned_by(self.owner_id)):
            labels = image.get("Labels") or {}
            for old in image.get("RepoTags") or []:
                repo, _, tag = str(old).rpartition(":")
                # Podman names local images `localhost/<name>`.
                registry, _, name = repo.rpartition("/")
                if not L.is_legacy_name(name) or "__" not in name[len(L.LEGACY_NAME_PREFIX) :]:
                    continue
                digest = name.rsplit("__", 1)[1]
                new_name = L.built_image_name(str(labels.get(L.PROJECT, "")), digest)
                new = f"{registry}/{new_name}:{tag}" if registry else f"{new_name}:{tag}"
                try:
                    await self.engine.images.tag(str(image["Id"]), new)
                    await self.engine.images.remove(old)  # another tag stays: an untag
                except BoincdError as exc:
                    log.warning("cannot rename a built image", old=old, new=new, error=str(exc))
                    continue
                self.records.rename_ref(str(image["Id"]), old, new)
                log.info("renamed an image built under the old name", old=old, new=new)

    # -- removal ------------------------------------------------------------------

    async def why_kept(self, image_id: str) -> str | None:
        """Why `remove` would keep this image, or None if it would remove it: what
        a dry run asks, so that it lists exactly what the real run removes."""
        async with self._lock:
            return await self._why_kept(normalize_id(image_id))

    async def _why_kept(self, image_id: str) -> str | None:
        record = self.records.images.get(image_id)
        if record is None:
            return "not brought by this daemon"
        if image_id in self.leases.values():
            return "a task is about to use it"
        containers = await self.engine.containers.list({})
        if any(normalize_id(str(c.get("ImageID", ""))) == image_id for c in containers):
            return "a container uses it"
        try:
            image = await self.engine.images.inspect(image_id)
        except NotFound:
            self.records.forget(image_id)
            return "already gone"
        ours = {normalize_ref(r) for r in record.get("refs") or ()}  # a build's `:latest`
        claimed = set(image.get("RepoTags") or ()) - ours - {"<none>:<none>"}
        if claimed:
            # Someone tagged it since: it is theirs too now.
            return f"tagged {sorted(claimed)[0]} by someone else"
        return None

    async def remove(self, image_id: str) -> Removal:
        """Remove an image this daemon brought, if nothing uses or claims it."""
        image_id = normalize_id(image_id)
        async with self._lock:
            reason = await self._why_kept(image_id)
            if reason is not None:
                return Removal(image_id, False, reason)
            record = self.records.images.get(image_id) or {}
            try:
                await self.engine.images.remove(image_id)
            except Conflict as exc:
                return Removal(image_id, False, exc.message)
            self.records.forget(image_id)
            log.info("image removed", image=image_id, refs=record.get("refs"))
            return Removal(image_id, True, "removed")


def _read_dockerfile(paths: CheckedPaths) -> str:
    opened = open_beneath(paths.slot, "Dockerfile", "the Dockerfile")
    try:
        fd = opened.reopen(os.O_RDONLY | os.O_NONBLOCK)
    finally:
        opened.close()
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError("the Dockerfile is not a regular file")
        return fh.read(_DOCKERFILE_MAX_BYTES).decode("utf-8", errors="replace")


def _suspended(what: str) -> NetworkSuspended:
    return NetworkSuspended(
        f"{what} and BOINC has network activity suspended: the task waits for the network"
    )


class Archive:
    """An image archive found in a slot or project dir, opened once (host/safepath.py):
    every read of it, the engine's load too, is of that very file."""

    def __init__(self, name: str, opened: Opened) -> None:
        self.name = name
        self.path = opened.path
        self._opened = opened

    def open(self) -> BinaryIO:
        """A reader of its own, from the start (the same file, an independent offset)."""
        return os.fdopen(self._opened.reopen(READ_FILE & ~os.O_NONBLOCK), "rb")

    def close(self) -> None:
        self._opened.close()


def find_archive(request: TaskRequest, paths: CheckedPaths) -> Archive:
    """A name in the slot or project dir, or an absolute path inside one of them;
    a regular file its owner could read, reached with no link on the way."""
    name = request.image_archive or ""
    roots = [(paths.slot, request.slot_dir)]
    if paths.project is not None and request.project_dir:
        roots.append((paths.project, request.project_dir))
    if os.path.isabs(name):
        candidates = [
            (root, rel)
            for root, given in roots
            for rel in {inside(name, given), inside(name, root.path)}
            if rel is not None
        ]
        if not candidates:
            raise BadRequest(f"image_archive {name!r} is outside the slot and project dirs")
    else:
        candidates = [(root, name) for root, _ in roots]
    for root, rel in candidates:
        try:
            opened = open_beneath(root, rel, "image_archive", shown=repr(name))
        except UnsafePath:
            raise BadRequest(
                f"image_archive {name!r} is outside the slot and project dirs"
            ) from None
        except BadRequest:
            continue  # not in this one
        try:
            fd = opened.reopen(READ_FILE)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
        except OSError:
            opened.close()
            continue
        if not stat.S_ISREG(st.st_mode):
            opened.close()
            continue
        if not paths.owner.may(st, 4):
            opened.close()
            raise BadRequest(f"image_archive {name!r} is not readable by the slot's owner")
        return Archive(os.path.basename(rel) or name, opened)
    raise ImageError(f"image_archive {name!r} is in neither the slot nor the project dir")
