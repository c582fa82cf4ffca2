"""What a shim asks for (a task request) and the container it becomes.

The shim parses init_data.xml and job.toml; the daemon validates the request
again, because the socket is the security boundary: a request may only mount
paths inside its own slot and project dirs, owned by the caller.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import labels as L
from .errors import BadRequest, Forbidden
from .priority import Priority

MIN_MEMORY_BYTES = 6 * 1024 * 1024  # the engines refuse less


@dataclass(frozen=True, slots=True)
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class GpuRequest:
    type: str
    device_num: int
    usage: float


@dataclass(frozen=True, slots=True)
class TaskRequest:
    result: str
    project: str
    slot_dir: str
    project_dir: str | None = None
    image: str | None = None
    image_archive: str | None = None
    image_digest: str | None = None
    build: bool = False
    build_args: dict[str, str] = field(default_factory=dict)
    command: list[str] | None = None
    workdir: str = "/app"
    project_dir_mount: str | None = None
    mounts: list[Mount] = field(default_factory=list)
    network: bool = False
    ncpus: float = 1.0
    memory_bytes: int = 0
    disk_bytes: int = 0
    gpu: GpuRequest | None = None
    env: dict[str, str] = field(default_factory=dict)
    read_only_root: bool = False
    # False while BOINC has network activity suspended: no pull, wait instead.
    allow_fetch: bool = True
    # The shim's own priority, which the client chose for the task (priority.py).
    priority: Priority | None = None

    @property
    def name(self) -> str:
        return L.container_name(self.project, self.result)


def _get(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise BadRequest(f"{key!r} must be a number, not {value!r}")
    if not isinstance(value, kind):
        raise BadRequest(f"{key!r} has the wrong type: {value!r}")
    return value


def _str_dict(body: dict[str, Any], key: str) -> dict[str, str]:
    value = _get(body, key, dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BadRequest(f"{key!r} must map strings to strings")
    return dict(value)


def parse_request(body: Any) -> TaskRequest:
    """JSON body → TaskRequest, with a 400 naming the bad field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    known = set(TaskRequest.__dataclass_fields__)
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
    result = _get(body, "result", str, "")
    project = _get(body, "project", str, "")
    slot_dir = _get(body, "slot_dir", str, "")
    if not result or not project or not slot_dir:
        raise BadRequest("'result', 'project' and 'slot_dir' are required")
    command = _get(body, "command", list)
    if command is not None and not all(isinstance(c, str) for c in command):
        raise BadRequest("'command' must be a list of strings")
    mounts = []
    for item in _get(body, "mounts", list, []):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("source"), str)
            or not isinstance(item.get("target"), str)
        ):
            raise BadRequest("each mount needs string 'source' and 'target'")
        mounts.append(Mount(item["source"], item["target"], bool(item.get("read_only", False))))
    gpu_body = _get(body, "gpu", dict)
    gpu = None
    if gpu_body is not None:
        gpu = GpuRequest(
            type=str(gpu_body.get("type", "")),
            device_num=int(gpu_body.get("device_num", 0)),
            usage=float(gpu_body.get("usage", 1.0)),
        )
    priority = _priority(_get(body, "priority", dict))
    ncpus = float(_get(body, "ncpus", (int, float), 1.0))
    memory = int(_get(body, "memory_bytes", (int, float), 0))
    disk = int(_get(body, "disk_bytes", (int, float), 0))
    if ncpus <= 0 or memory < 0 or disk < 0:
        raise BadRequest("'ncpus' must be > 0; 'memory_bytes' and 'disk_bytes' >= 0")
    request = TaskRequest(
        result=result,
        project=project,
        slot_dir=slot_dir,
        project_dir=_get(body, "project_dir", str),
        image=_get(body, "image", str),
        image_archive=_get(body, "image_archive", str),
        image_digest=_get(body, "image_digest", str),
        build=bool(_get(body, "build", bool, False)),
        build_args=_str_dict(body, "build_args"),
        command=command,
        workdir=_get(body, "workdir", str, "/app"),
        project_dir_mount=_get(body, "project_dir_mount", str),
        mounts=mounts,
        network=bool(_get(body, "network", bool, False)),
        ncpus=ncpus,
        memory_bytes=memory,
        disk_bytes=disk,
        gpu=gpu,
        env=_str_dict(body, "env"),
        read_only_root=bool(_get(body, "read_only_root", bool, False)),
        allow_fetch=bool(_get(body, "allow_fetch", bool, True)),
        priority=priority,
    )
    if not (request.image or request.image_archive or request.build):
        raise BadRequest(
            "the job names no image: set 'image', 'image_archive' or ship a Dockerfile"
        )
    for target in [request.workdir, request.project_dir_mount, *(m.target for m in mounts)]:
        if target is not None and not PurePosixPath(target).is_absolute():
            raise BadRequest(f"container path {target!r} must be absolute")
    return request


def _priority(body: dict[str, Any] | None) -> Priority | None:
    if body is None:
        return None
    nice, idle = body.get("nice"), body.get("idle", False)
    if isinstance(nice, bool) or not isinstance(nice, int) or not isinstance(idle, bool):
        raise BadRequest('\'priority\' must be {"nice": 0..19, "idle": true|false}')
    try:
        return Priority(nice, idle)
    except ValueError as exc:
        raise BadRequest(f"'priority': {exc}") from None


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def check_paths(request: TaskRequest, peer_uid: int) -> tuple[int, int]:
    """Check the host paths and return the slot owner's (uid, gid) to run the container as.

    A non-root caller must own the slot (and project) dir: otherwise any user
    allowed on the socket could have the root daemon mount someone else's files.
    """
    slot = Path(request.slot_dir)
    if not slot.is_absolute():
        raise BadRequest(f"slot dir {slot} must be an absolute path")
    try:
        st = slot.lstat()
    except OSError as exc:
        raise BadRequest(f"slot dir {slot} is not usable: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BadRequest(f"slot dir {slot} is not a directory")
    if peer_uid != 0 and st.st_uid != peer_uid:
        raise Forbidden(f"slot dir {slot} is not owned by the calling user (uid {peer_uid})")
    roots = [slot.resolve()]
    if request.project_dir:
        project_dir = Path(request.project_dir)
        if not project_dir.is_absolute() or not project_dir.is_dir():
            raise BadRequest(f"project dir {project_dir} is not an existing absolute directory")
        if peer_uid != 0 and project_dir.stat().st_uid != peer_uid:
            raise Forbidden(f"project dir {project_dir} is not owned by the calling user")
        roots.append(project_dir.resolve())
    for mount in request.mounts:
        source = Path(mount.source)
        if not source.is_absolute():
            source = slot / source
        if not _inside(source.resolve(), roots):
            raise Forbidden(f"mount source {mount.source} is outside the slot and project dirs")
    return st.st_uid, st.st_gid


# The engine keeps a container's output in log files outside the slot, where the
# BOINC client cannot see them: they rotate within a few files of this size at
# most (half the task's disk bound when that is smaller), and the disk limits
# count them in the task's bound. So output alone can stop a task with a small
# bound, as a native app filling stderr.txt is, and never fills the disk.
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
LOG_FILE_MIN_BYTES = 1024 * 1024
LOG_FILES = 3


def log_config(disk_bytes: int) -> dict[str, Any]:
    """HostConfig.LogConfig: json-file (its LogPath is what the limits measure),
    with Docker's size options; engine_compat adapts them to Podman's."""
    size = LOG_FILE_MAX_BYTES
    if disk_bytes > 0:
        size = max(LOG_FILE_MIN_BYTES, min(size, disk_bytes // 2))
    return {"Type": "json-file", "Config": {"max-size": str(size), "max-file": str(LOG_FILES)}}


def container_config(
    request: TaskRequest,
    image: str,
    *,
    owner_id: str,
    uid: int,
    gid: int,
    pids_limit: int,
    network_name: str,
) -> dict[str, Any]:
    """The Engine API create body: locked down by default, loosened only where the job asks."""
    slot = os.path.realpath(request.slot_dir)
    mounts: list[dict[str, Any]] = [
        {"Type": "bind", "Source": slot, "Target": request.workdir, "ReadOnly": False}
    ]
    if request.project_dir and request.project_dir_mount:
        mounts.append(
            {
                "Type": "bind",
                "Source": os.path.realpath(request.project_dir),
                "Target": request.project_dir_mount,
                "ReadOnly": True,
            }
        )
    for mount in request.mounts:
        source = mount.source if os.path.isabs(mount.source) else os.path.join(slot, mount.source)
        mounts.append(
            {
                "Type": "bind",
                "Source": os.path.realpath(source),
                "Target": mount.target,
                "ReadOnly": mount.read_only,
            }
        )
    host_config: dict[str, Any] = {
        "Mounts": mounts,
        "NanoCpus": int(request.ncpus * 1e9),
        "PidsLimit": pids_limit,
        "CapDrop": ["ALL"],
        "SecurityOpt": ["no-new-privileges"],
        "NetworkMode": network_name if request.network else "none",
        "ReadonlyRootfs": request.read_only_root,
        "RestartPolicy": {"Name": "no"},
    }
    if request.memory_bytes:
        memory = max(request.memory_bytes, MIN_MEMORY_BYTES)
        # Same as Memory: no swap beyond the bound BOINC gave the task.
        host_config.update({"Memory": memory, "MemorySwap": memory})
    env = {
        "BOINC_RESULT": request.result,
        "BOINC_PROJECT": request.project,
        "BOINC_NCPUS": f"{request.ncpus:g}",
        **request.env,
    }
    task_labels = {
        L.OWNER: owner_id,
        L.PROJECT: request.project,
        L.RESULT: request.result,
        L.SLOT: slot,
        L.PROJECT_DIR: request.project_dir or "",
        L.IMAGE: image,
        L.NETWORK: "1" if request.network else "0",
        L.DISK_BOUND: str(request.disk_bytes),
        L.MEMORY_BOUND: str(request.memory_bytes),
        **(request.priority.labels() if request.priority else {}),
    }
    config: dict[str, Any] = {
        "Image": image,
        "WorkingDir": request.workdir,
        "User": f"{uid}:{gid}",
        "Env": [f"{k}={v}" for k, v in sorted(env.items())],
        "Labels": task_labels,
        "HostConfig": host_config,
        "AttachStdin": False,
        "AttachStdout": False,
        "AttachStderr": False,
        "Tty": False,
    }
    host_config["LogConfig"] = log_config(request.disk_bytes)
    if request.command:
        config["Cmd"] = request.command
    return config
