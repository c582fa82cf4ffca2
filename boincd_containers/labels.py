"""Names and labels of the objects the daemon creates.

Labels are the truth: the daemon rebuilds its whole view from them after a
restart, and never touches an object whose owner label is not its own.
"""

from __future__ import annotations

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
# Limits the engine could not apply ("cpu,memory,pids") and what that means, in words.
UNENFORCED = f"{PREFIX}.unenforced"
WARNINGS = f"{PREFIX}.warnings"

_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")


def safe_name_part(text: str) -> str:
    """Engine names allow [a-zA-Z0-9_.-]; BOINC project dirs and results almost always fit."""
    cleaned = _UNSAFE.sub("_", text)
    return cleaned or "_"


def container_name(project: str, result: str) -> str:
    """`boinc__<project>__<result>`, the scheme of BOINC's own docker_wrapper."""
    return f"boinc__{safe_name_part(project)}__{safe_name_part(result)}"


def owner_filter(instance_id: str) -> dict[str, list[str]]:
    """Engine list filter for the objects of this daemon instance only."""
    return {"label": [f"{OWNER}={instance_id}"]}


def is_ours(labels: dict[str, str] | None, instance_id: str) -> bool:
    return bool(labels) and labels is not None and labels.get(OWNER) == instance_id
