"""Helpers for where images come from: references, archives, build contexts,
progress streams, and what engine errors mean for a task.

No engine calls, so each is tested on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import inspect
import json
import os
import re
import stat
import tarfile
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from boincd_containers.core.errors import BadRequest, BoincdError, ImageError, NotFound, Unavailable
from boincd_containers.host.safepath import READ_DIR, Opened, Owner, open_path

# Files BOINC and the shim put in a slot: never part of a build context.
_SLOT_NOISE = ("boinc_", "init_data.xml", "stderr.txt", "job.toml", "fraction_done")


def normalize_ref(ref: str) -> str:
    """`repo` means `repo:latest`, as for `docker pull` (the API would pull every tag)."""
    ref = ref.strip()
    last = ref.rsplit("/", 1)[-1]
    if "@" in last or ":" in last:
        return ref
    return f"{ref}:latest"


# What engines and registries say, mapped to what the task should do. Order
# matters: a disk-full error mentions the registry URL too.
_DISK_FULL = ("no space left on device", "disk quota exceeded")
_AUTH = (
    "no basic auth credentials",
    "unauthorized",
    "authentication required",
    "access denied",
    "requested access to the resource is denied",
    "denied:",
)
_UNKNOWN = ("manifest unknown", "not found", "does not exist", "name unknown", "invalid reference")
_UNREACHABLE = (
    "connection refused",
    "no such host",
    "i/o timeout",
    "timeout",
    "network is unreachable",
    "connection reset",
    "no route to host",
    "temporary failure in name resolution",
    "tls handshake timeout",
    "engine unreachable",
)


def fetch_error(exc: BoincdError, what: str) -> BoincdError:
    """A clear error for a failed pull, load or build, and whether to retry.

    The task fails (ImageError, not retryable) when the image cannot exist as
    asked; it waits and BOINC retries later (Unavailable) when the cause may
    pass: registry or engine unreachable, disk full.
    """
    detail = exc.message
    text = detail.lower()
    if any(s in text for s in _DISK_FULL):
        return Unavailable(
            f"disk full: {what}: the disk under the container engine's data root has no "
            f"space left; old images are evicted, the task is retried later ({detail})"
        )
    if any(s in text for s in _AUTH):
        return ImageError(
            f"{what}: the registry wants credentials (or the image does not exist there); "
            f"the project must publish it openly, or the host's engine must log in ({detail})"
        )
    if any(s in text for s in _UNKNOWN) or isinstance(exc, NotFound):
        return ImageError(f"{what}: no such image ({detail})")
    # Docker says so with a 500, Podman in the pull's stream: the same for us.
    if any(s in text for s in _UNREACHABLE):
        return Unavailable(f"{what}: the registry or engine cannot be reached now ({detail})")
    if isinstance(exc, Unavailable | ImageError):
        return type(exc)(f"{what}: {detail}", retryable=exc.retryable)
    return ImageError(f"{what}: {detail}")


def sha256_file(source: Path | BinaryIO) -> str:
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        fh = stack.enter_context(source.open("rb")) if isinstance(source, Path) else source
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def archive_image(source: Path | BinaryIO, name: str | None = None) -> tuple[str | None, list[str]]:
    """The image id and tags a `docker save` archive holds, without loading it.

    The id is the sha256 of the image's config, which the archive carries; an
    archive in another layout (OCI) gives (None, []) and is simply loaded.
    A file that is no tar at all is refused here, before the engine sees it.
    """
    name = name or (source.name if isinstance(source, Path) else "archive")
    try:
        with (
            tarfile.open(source, mode="r:*")
            if isinstance(source, Path)
            else tarfile.open(fileobj=source, mode="r:*")
        ) as tar:
            member = tar.extractfile("manifest.json") if "manifest.json" in tar.getnames() else None
            if member is None:
                return None, []
            manifest = json.load(member)
            entry = manifest[0]
            config = tar.extractfile(str(entry["Config"]))
            if config is None:
                raise ValueError("no config")
            image_id = "sha256:" + hashlib.sha256(config.read()).hexdigest()
            tags = [str(t) for t in entry.get("RepoTags") or []]
            return image_id, tags
    except tarfile.TarError:
        # tarfile's own text lists every compression it tried, with reprs.
        reason = "it is not a tar file (or a damaged one)"
    except (ValueError, KeyError, IndexError, TypeError):
        reason = "its manifest.json does not describe an image"
    except OSError as exc:
        reason = exc.strerror or str(exc)
    raise ImageError(f"image_archive {name} is not a `docker save` archive or is damaged: {reason}")


# -- build contexts ---------------------------------------------------------------------
#
# The root daemon reads the slot for `docker build`, and the BOINC user may
# change the slot meanwhile (links racing into it). So the context is read
# from the slot's descriptor down, each directory and file opened relative to
# its parent with O_NOFOLLOW (host/safepath.py): links, FIFOs, devices and sockets
# are never opened and not part of the context; a file or directory its owner
# could not read fails the build, since root could read it. The tar is made
# by hand (tarfile's headers, our data), one piece at a time, so it is pulled
# by the engine request chunk by chunk from a worker thread (ContextStream):
# memory stays at a chunk, whatever the slot holds, and the loop never blocks.

CONTEXT_CAP_BYTES = 4 << 30  # without a disk bound, no bigger context than this
CHUNK_BYTES = 1 << 20
_MAX_DEPTH = 64
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


class BuildContext:
    """One read of a slot's build files as a reproducible tar (same files, same
    bytes): mtimes and owners zeroed, setuid/setgid bits dropped. Iterating it
    yields the tar in pieces; it owns a descriptor of the slot, closed at the end."""

    def __init__(self, slot: Opened, owner: Owner, cap: int = CONTEXT_CAP_BYTES) -> None:
        self.owner = owner
        self.cap = cap
        self.sent = 0
        try:
            self._fd = slot.reopen(READ_DIR)
        except OSError as exc:
            raise BadRequest(f"the slot dir cannot be read: {exc.strerror}") from None
        self._gen = self._generate()

    def __iter__(self) -> Iterator[bytes]:
        return self._gen

    def digest(self) -> str:
        """The sha256 of the whole tar (a worker thread's job: it reads every file)."""
        digest = hashlib.sha256()
        for piece in self._gen:
            digest.update(piece)
        return digest.hexdigest()

    def close(self) -> None:
        if inspect.getgeneratorstate(self._gen) == inspect.GEN_CREATED:
            os.close(self._fd)  # its finally never runs: the descriptor is ours
        # A generator still running in a thread (an awaiting task was cancelled)
        # ends by itself and closes what it opened; closing its descriptors here,
        # under it, could make it read whatever reuses their numbers.
        with contextlib.suppress(ValueError):
            self._gen.close()

    def _count(self, piece: bytes) -> bytes:
        self.sent += len(piece)
        if self.sent > self.cap:
            raise ImageError(
                f"the slot's build context is larger than {human_bytes(self.cap)} "
                "(the task's disk bound): not built"
            )
        return piece

    def _generate(self) -> Generator[bytes, None, None]:
        try:
            try:
                st = os.stat("Dockerfile", dir_fd=self._fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                raise BadRequest("the job names no image and the slot has no Dockerfile to build")
            for piece in self._dir(self._fd, "", 0):
                yield self._count(piece)
            end = 2 * _BLOCK
            end += (-(self.sent + end)) % _RECORD
            yield self._count(b"\0" * end)
        except OSError as exc:
            raise ImageError(
                f"the slot's build files cannot be read: {exc}", retryable=True
            ) from None
        finally:
            os.close(self._fd)

    def _dir(self, dir_fd: int, prefix: str, depth: int) -> Iterator[bytes]:
        if depth > _MAX_DEPTH:
            raise ImageError(f"build context: {prefix} is nested more than {_MAX_DEPTH} deep")
        for name in sorted(os.listdir(dir_fd)):
            if not prefix and name.startswith(_SLOT_NOISE):
                continue
            rel = prefix + name
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone meanwhile
            if stat.S_ISDIR(st.st_mode):
                if not self.owner.may(st, 5):
                    raise ImageError(f"build context: {rel}/ is not readable by the slot's owner")
                try:
                    sub = os.open(name, READ_DIR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        continue  # a link now: never followed
                    raise
                try:
                    yield from self._dir(sub, rel + "/", depth + 1)
                finally:
                    os.close(sub)
            elif stat.S_ISREG(st.st_mode):
                yield from self._file(dir_fd, name, rel)
            # Links, FIFOs, devices, sockets: not part of a build context.

    def _file(self, dir_fd: int, name: str, rel: str) -> Iterator[bytes]:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return  # swapped for a link after the lstat: never followed
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return
            if not self.owner.may(st, 4):
                raise ImageError(f"build context: {rel} is not readable by the slot's owner")
            info = tarfile.TarInfo(rel)
            info.size, info.mode = st.st_size, stat.S_IMODE(st.st_mode) & ~0o6000
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            yield info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
            left = st.st_size
            while left:
                piece = os.read(fd, min(CHUNK_BYTES, left))
                if not piece:
                    raise ImageError(
                        f"build context: {rel} shrank while it was read; try again",
                        retryable=True,
                    )
                left -= len(piece)
                yield piece
            yield b"\0" * (-st.st_size % _BLOCK)
        finally:
            os.close(fd)


class ContextStream:
    """A build context as an async request body: each piece read in a worker
    thread, hashed as it goes. `error` keeps what stopped it, since the engine
    request then fails with a mere broken connection."""

    def __init__(self, context: BuildContext) -> None:
        self.context = context
        self._pieces = iter(context)
        self._hash = hashlib.sha256()
        self.error: BaseException | None = None

    def __aiter__(self) -> ContextStream:
        return self

    def _batch(self) -> bytes:
        out = bytearray()
        for piece in self._pieces:
            out += piece
            if len(out) >= CHUNK_BYTES:
                break
        return bytes(out)

    async def __anext__(self) -> bytes:
        try:
            chunk = await asyncio.to_thread(self._batch)
        except Exception as exc:
            self.error = exc
            raise
        if not chunk:
            raise StopAsyncIteration
        self._hash.update(chunk)
        return chunk

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        self.context.close()


def build_context(slot: Path | Opened, owner: Owner | None = None) -> bytes:
    """The whole context in memory: for tests and small slots only."""
    opened = open_path(str(slot), "slot dir") if isinstance(slot, Path) else slot
    try:
        context = BuildContext(opened, owner or Owner.of(opened.st.st_uid, opened.st.st_gid))
        try:
            return b"".join(context)
        finally:
            context.close()
    finally:
        if opened is not slot:
            opened.close()


_FROM = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?\s*$", re.IGNORECASE)


def base_images(dockerfile: str) -> list[str] | None:
    """The images a Dockerfile builds FROM, other than its own stages and
    `scratch`; None when one cannot be known without building (an ARG in it).

    What a build needs from a registry, apart from what its steps fetch: with
    all of them here it can be tried while BOINC suspends network use."""
    stages: set[str] = set()
    bases: list[str] = []
    for line in dockerfile.replace("\\\n", " ").splitlines():
        match = _FROM.match(line)
        if match is None:
            continue
        image, alias = match.group(1), match.group(2)
        if "$" in image:
            return None
        if image.lower() != "scratch" and image.lower() not in stages:
            bases.append(image)
        if alias:
            stages.add(alias.lower())
    return bases


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


RATE_WINDOW_S = 10.0


class PullProgress:
    """Docker's per-layer pull stream summed up in one line a volunteer can read."""

    def __init__(self, ref: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.ref = ref
        self.layers: dict[str, tuple[int, int]] = {}  # id -> (downloaded, total)
        self.done: set[str] = set()
        self.last = ""
        self._clock = clock
        # (when, bytes done) over the last RATE_WINDOW_S: the rate a person sees.
        self._samples: deque[tuple[float, int]] = deque()

    def bytes(self) -> tuple[int, int]:
        return sum(c for c, _ in self.layers.values()), sum(t for _, t in self.layers.values())

    def rate(self) -> float:
        """Bytes per second over the last few seconds."""
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def detail(self) -> dict[str, Any]:
        done, total = self.bytes()
        return {"bytes_done": done, "bytes_total": total, "bytes_per_s": round(self.rate())}

    def update(self, line: dict[str, Any]) -> str | None:
        """The new summary, or None when nothing a person would notice changed."""
        status = str(line.get("status") or "")
        layer = str(line.get("id") or "")
        detail = line.get("progressDetail") or {}
        if status == "Pulling fs layer" and layer:
            self.layers.setdefault(layer, (0, 0))
        elif status == "Downloading" and layer:
            self.layers[layer] = (int(detail.get("current") or 0), int(detail.get("total") or 0))
        elif status in ("Download complete", "Already exists", "Pull complete") and layer:
            current, total = self.layers.get(layer, (0, 0))
            self.layers[layer] = (max(current, total), total)
            if status != "Download complete":
                self.done.add(layer)
        elif not status:
            return None
        if self.layers:
            got, total = self.bytes()
            now = self._clock()
            self._samples.append((now, got))
            while self._samples and self._samples[0][0] < now - RATE_WINDOW_S:
                self._samples.popleft()
            size = f", {human_bytes(got)} of {human_bytes(total)}" if total else ""
            rate = self.rate()
            speed = f", {human_bytes(rate)}/s" if rate > 0 else ""
            text = f"pulling {self.ref}: {len(self.done)} of {len(self.layers)} layers{size}{speed}"
        else:
            text = f"pulling {self.ref}: {status}"
        if text == self.last:
            return None
        self.last = text
        return text


# Classic builder output: "Step 2/5 : COPY a /a", " ---> Using cache", " ---> 3f2a1b".
_STEP = re.compile(r"^Step \d+/\d+ : (\S+)", re.IGNORECASE)
_IMAGE = re.compile(r"^---> ([0-9a-f]{12,64})$")


class BuildTracker:
    """Follows a build's output: the last step for progress, and the images its
    steps made (not the FROM base, not cache hits), to remove if the build fails."""

    def __init__(self) -> None:
        self.fresh_images: list[str] = []
        self._instruction = ""
        self._cached = False

    def update(self, line: dict[str, Any]) -> str:
        aux = line.get("aux")
        if isinstance(aux, dict) and isinstance(aux.get("ID"), str):
            return ""
        text = str(line.get("stream") or "").strip()
        if not text:
            return ""
        step = _STEP.match(text)
        if step:
            self._instruction, self._cached = step.group(1).upper(), False
            return text
        if text == "---> Using cache":
            self._cached = True
            return ""
        image = _IMAGE.match(text)
        if image:
            if self._instruction not in ("", "FROM") and not self._cached:
                self.fresh_images.append(image.group(1))
            self._cached = False
        return ""
