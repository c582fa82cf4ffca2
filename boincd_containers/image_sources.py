"""Helpers for where images come from: references, archives, build contexts,
progress streams, and what engine errors mean for a task.

Pure (no engine calls), so each is tested on its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

from .errors import BadRequest, BoincdError, ImageError, NotFound, Unavailable

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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def archive_image(path: Path) -> tuple[str | None, list[str]]:
    """The image id and tags a `docker save` archive holds, without loading it.

    The id is the sha256 of the image's config, which the archive carries; an
    archive in another layout (OCI) gives (None, []) and is simply loaded.
    A file that is no tar at all is refused here, before the engine sees it.
    """
    try:
        with tarfile.open(path, mode="r:*") as tar:
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
    except (tarfile.TarError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ImageError(
            f"image_archive {path.name} is not a `docker save` archive or is damaged: {exc}"
        ) from None


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


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class PullProgress:
    """Docker's per-layer pull stream summed up in one line a volunteer can read."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.layers: dict[str, tuple[int, int]] = {}  # id -> (downloaded, total)
        self.done: set[str] = set()
        self.last = ""

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
            got = sum(c for c, _ in self.layers.values())
            total = sum(t for _, t in self.layers.values())
            size = f", {human_bytes(got)} of {human_bytes(total)}" if total else ""
            text = f"pulling {self.ref}: {len(self.done)} of {len(self.layers)} layers{size}"
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
