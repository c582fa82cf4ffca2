"""Names and labels of the objects the daemon creates.

Labels are the truth: the daemon rebuilds its whole view from them after a
restart, and never touches an object whose owner label is not its own.
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "org.boinc.containers"
OWNER = f"{PREFIX}.owner"
PROJECT = f"{PREFIX}.project"
RESULT = f"{PREFIX}.result"
SLOT = f"{PREFIX}.slot"
# Extensions of the contract: what the daemon needs to rebuild its view.
PROJECT_DIR = f"{PREFIX}.project_dir"
IMAGE = f"{PREFIX}.image"
NETWORK = f"{PREFIX}.network"
GPUS = f"{PREFIX}.gpus"
GPU_USAGE = f"{PREFIX}.gpu_usage"
DISK_BOUND = f"{PREFIX}.disk_bound"
MEMORY_BOUND = f"{PREFIX}.memory_bound"
MOUNTS = f"{PREFIX}.mounts"  # how the mount points are made again (host/mounts.py)
# Limits the engine could not apply ("cpu,memory,pids") and what that means, in words.
UNENFORCED = f"{PREFIX}.unenforced"
WARNINGS = f"{PREFIX}.warnings"

# Extensions of the contract: the priority the BOINC client gave the task's shim,
# which every process of the container is held to (see host/priority.py).
NICE = f"{PREFIX}.nice"
SCHED_IDLE = f"{PREFIX}.sched_idle"
# The container port the daemon forwards 127.0.0.1:<host port> to (watch/webgraphics.py).
WEB_GRAPHICS_PORT = f"{PREFIX}.web_graphics_port"

# Our prefix. Never "boinc__": BOINC clients 8.2.0 and later `rm -f` every
# container, and untag every image, whose name starts with that at each start,
# unless it belongs to a started docker-plan-class task (client/cs_apps.cpp
# docker_cleanup, lib/util.cpp docker_is_boinc_name).
NAME_PREFIX = "boincd__"
LEGACY_NAME_PREFIX = "boinc__"
# Engines accept long names, but they travel in every API path and log line.
MAX_NAME_LENGTH = 200
_NAME_HASH_CHARS = 16
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
# ".-" never occurs in a host name or in BOINC's names: it starts an escape.
_ESCAPE = ".-"
_SEPARATOR = "__"


def _escape(ch: str) -> str:
    return "".join(f"{_ESCAPE}{byte:02x}" for byte in ch.encode("utf-8", "surrogatepass"))


def encode_name_part(text: str, *, first: bool = False) -> str:
    """An engine-safe spelling of a project or result name that keeps the usual
    ones as they are and cannot make two names one.

    Characters engines refuse become ``.-XX`` (their UTF-8 bytes in hex), and so
    does a "." that would start that sequence. In the first part (the project),
    "_" is escaped too where it would make "__" or end the part, so the first
    "__" after the prefix is always the separator.
    """
    out = []
    for i, ch in enumerate(text):
        after = text[i + 1 : i + 2]
        starts_escape = ch == "." and after == "-"
        makes_separator = first and ch == "_" and after in ("_", "")
        out.append(_escape(ch) if ch not in _PLAIN or starts_escape or makes_separator else ch)
    return "".join(out)


def container_name(project: str, result: str) -> str:
    """`boincd__<project>__<result>`: one name per (project, result), within limits."""
    name = (
        f"{NAME_PREFIX}{encode_name_part(project, first=True)}{_SEPARATOR}"
        f"{encode_name_part(result)}"
    )
    if len(name) <= MAX_NAME_LENGTH:
        return name
    digest = hashlib.sha256(f"{project}\0{result}".encode("utf-8", "surrogatepass")).hexdigest()
    return f"{name[: MAX_NAME_LENGTH - _NAME_HASH_CHARS - 1]}-{digest[:_NAME_HASH_CHARS]}"


_IMAGE_UNSAFE = re.compile(r"[^a-z0-9._-]")
_IMAGE_SEPARATORS = re.compile(r"[._-]{2,}")


def built_image_name(project: str, digest: str) -> str:
    """`boincd__<project>__<digest>` for an image built from a slot's Dockerfile.

    Image names must be lower case, with single separators between letters and
    digits; the content digest, not the name, tells builds apart.
    """
    part = _IMAGE_SEPARATORS.sub(".", _IMAGE_UNSAFE.sub(".", project.lower())).strip("._-")
    part = part[:100].rstrip("._-") or "project"
    return f"{NAME_PREFIX}{part}{_SEPARATOR}{digest}"


_LEGACY_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")


def legacy_container_name(project: str, result: str) -> str:
    """The name containers had before the rename, to find and adopt them."""
    parts = [_LEGACY_UNSAFE.sub("_", part) or "_" for part in (project, result)]
    return f"{LEGACY_NAME_PREFIX}{parts[0]}{_SEPARATOR}{parts[1]}"


def is_legacy_name(name: str) -> bool:
    """A name from before the rename, which an 8.2 client's cleanup would remove."""
    return name.lstrip("/").startswith(LEGACY_NAME_PREFIX)


def owned_by(instance_id: str) -> dict[str, str]:
    """The labels that select this daemon installation's objects in the engine's
    lists and event streams (the engine adapter turns them into a filter)."""
    return {OWNER: instance_id}


def is_ours(labels: dict[str, str] | None, instance_id: str) -> bool:
    return bool(labels) and labels is not None and labels.get(OWNER) == instance_id
