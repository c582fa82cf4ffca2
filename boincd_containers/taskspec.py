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
class WebGraphicsRequest:
    # The container port serving the task's web graphics (job.toml
    # web_graphics_guest_port). The host side is always the daemon's: a port
    # it binds on 127.0.0.1 only (webgraphics.py), never one a caller names.
    guest_port: int


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
    web_graphics: WebGraphicsRequest | None = None

    @property
    def name(self) -> str:
        return L.container_name(self.project, self.result)


# BOINC's own bounds: the client keeps result names and project dir names in
# `char name[256]` (client/client_types.h), the server's result.name is a
# varchar(191), and project dir names are the master URL through
# escape_project_url (lib/url.cpp: letters, digits, '.', '-', '_').
NAME_MAX = 255
PATH_MAX = 4096  # Linux PATH_MAX, the longest path a syscall takes
TEXT_MAX = 65536  # one argument or environment value
ITEMS_MAX = 4096  # entries in a list or map (arguments, environment, mounts)
NCPUS_MAX = 65536.0
GPU_USAGE_MAX = 64.0
GPU_DEVICE_MAX = 1023
PORT_MAX = 65535
BYTES_MAX = 2**63 - 1


def _show(value: Any) -> str:
    """A bad value in an error message: ASCII, and short whatever was sent."""
    text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_name(value: Any, what: str) -> str:
    """A result or project name as BOINC makes them: printable ASCII, at most
    NAME_MAX characters, usable as one URL path segment and one directory name
    (no '/', not '.' or '..')."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{what!r} must be a non-empty string")
    if len(value) > NAME_MAX:
        raise BadRequest(f"{what!r} is {len(value)} characters long; at most {NAME_MAX}")
    if not (value.isascii() and value.isprintable()) or "/" in value or value in (".", ".."):
        raise BadRequest(
            f"{what!r} {_show(value)} must be printable ASCII without '/' (as BOINC names are)"
        )
    return value


def _text(value: Any, key: str, limit: int) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{key!r} must be a string, not {_show(value)}")
    if len(value) > limit:
        raise BadRequest(f"{key!r} is {len(value)} characters long; at most {limit}")
    if "\0" in value:
        raise BadRequest(f"{key!r} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates: JSON's \ud800 escapes decode to them, but no file
        # name, label or engine string can hold them.
        raise BadRequest(f"{key!r} is not valid Unicode: {_show(value)}") from None
    return value


def _get(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise BadRequest(f"{key!r} must be a number, not {value!r}")
    if not isinstance(value, kind):
        raise BadRequest(f"{key!r} has the wrong type: {_show(value)}")
    return value


def _value(body: dict[str, Any], key: str, default: Any) -> Any:
    value = body.get(key)
    return default if value is None else value


def _str(body: dict[str, Any], key: str, limit: int = PATH_MAX) -> str | None:
    value = body.get(key)
    return None if value is None else _text(value, key, limit)


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    return bool(_get(body, key, bool, default))


def _number(value: Any, key: str, low: float, high: float) -> float:
    """A JSON number in [low, high]: never a bool (JSON true is not 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{key!r} must be a number, not {_show(value)}")
    if not low <= value <= high:  # NaN fails too
        raise BadRequest(f"{key!r} must be between {low:g} and {high:g}, not {_show(value)}")
    return float(value)


def _list(body: dict[str, Any], key: str) -> list[Any] | None:
    value: list[Any] | None = _get(body, key, list)
    if value is not None and len(value) > ITEMS_MAX:
        raise BadRequest(f"{key!r} has {len(value)} entries; at most {ITEMS_MAX}")
    return value


def _str_dict(body: dict[str, Any], key: str) -> dict[str, str]:
    value = _get(body, key, dict, {})
    if len(value) > ITEMS_MAX:
        raise BadRequest(f"{key!r} has {len(value)} entries; at most {ITEMS_MAX}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise BadRequest(f"{key!r} must map strings to strings")
    for name, text in value.items():
        if not name or "=" in name:
            raise BadRequest(f"{key!r} has a bad name {_show(name)}")
        _text(name, key, NAME_MAX)
        _text(text, key, TEXT_MAX)
    return dict(value)


def _mounts(body: dict[str, Any]) -> list[Mount]:
    mounts = []
    for item in _list(body, "mounts") or []:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("source"), str)
            or not isinstance(item.get("target"), str)
        ):
            raise BadRequest("each mount needs string 'source' and 'target'")
        extra = sorted(set(item) - {"source", "target", "read_only"})
        if extra:
            raise BadRequest(f"unknown mount field(s): {_show(extra)}")
        read_only = item.get("read_only", False)
        if not isinstance(read_only, bool):
            raise BadRequest(f"a mount's 'read_only' must be true or false, not {_show(read_only)}")
        source = _text(item["source"], "mounts.source", PATH_MAX)
        target = _text(item["target"], "mounts.target", PATH_MAX)
        mounts.append(Mount(source, target, read_only))
    return mounts


def _gpu(body: dict[str, Any]) -> GpuRequest | None:
    gpu_body = _get(body, "gpu", dict)
    if gpu_body is None:
        return None
    extra = sorted(set(gpu_body) - {"type", "device_num", "usage"})
    if extra:
        raise BadRequest(f"unknown gpu field(s): {_show(extra)}")
    device = _value(gpu_body, "device_num", 0)
    if isinstance(device, bool) or not isinstance(device, int):
        raise BadRequest(f"'gpu.device_num' must be a whole number, not {_show(device)}")
    return GpuRequest(
        type=_text(_value(gpu_body, "type", ""), "gpu.type", NAME_MAX),
        device_num=int(_number(device, "gpu.device_num", 0, GPU_DEVICE_MAX)),
        usage=_number(_value(gpu_body, "usage", 1.0), "gpu.usage", 0, GPU_USAGE_MAX),
    )


def _web_graphics(body: dict[str, Any]) -> WebGraphicsRequest | None:
    wg = _get(body, "web_graphics", dict)
    if wg is None:
        return None
    extra = sorted(set(wg) - {"guest_port"})
    if extra:
        raise BadRequest(
            f"unknown web_graphics field(s): {_show(extra)}; only 'guest_port' may be given: "
            "the daemon picks the host port and listens on 127.0.0.1 only"
        )
    port = wg.get("guest_port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= PORT_MAX:
        raise BadRequest(
            f"'web_graphics.guest_port' must be a port number from 1 to {PORT_MAX}, "
            f"not {_show(port)}"
        )
    return WebGraphicsRequest(guest_port=port)


def parse_request(body: Any) -> TaskRequest:
    """JSON body → TaskRequest, with a 400 naming the bad field.

    Every field is checked for type and bounds here, so nothing later (paths,
    labels, the engine, metrics) meets a value it cannot handle.
    """
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    known = set(TaskRequest.__dataclass_fields__)
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(f"unknown field(s): {_show(unknown)}")
    if not body.get("result") or not body.get("project") or not body.get("slot_dir"):
        raise BadRequest("'result', 'project' and 'slot_dir' are required")
    result = check_name(body["result"], "result")
    project = check_name(body["project"], "project")
    slot_dir = _text(body["slot_dir"], "slot_dir", PATH_MAX)
    command = _list(body, "command")
    if command is not None:
        if not all(isinstance(c, str) for c in command):
            raise BadRequest("'command' must be a list of strings")
        for arg in command:
            _text(arg, "command", TEXT_MAX)
    mounts = _mounts(body)
    gpu = _gpu(body)
    priority = _priority(_get(body, "priority", dict))
    ncpus = _number(_value(body, "ncpus", 1.0), "ncpus", 0, NCPUS_MAX)
    if ncpus <= 0:
        raise BadRequest("'ncpus' must be > 0")
    memory = int(_number(_value(body, "memory_bytes", 0), "memory_bytes", 0, BYTES_MAX))
    disk = int(_number(_value(body, "disk_bytes", 0), "disk_bytes", 0, BYTES_MAX))
    request = TaskRequest(
        result=result,
        project=project,
        slot_dir=slot_dir,
        project_dir=_str(body, "project_dir"),
        image=_str(body, "image"),
        image_archive=_str(body, "image_archive"),
        image_digest=_str(body, "image_digest", NAME_MAX),
        build=_flag(body, "build", False),
        build_args=_str_dict(body, "build_args"),
        command=command,
        workdir=_str(body, "workdir") or "/app",
        project_dir_mount=_str(body, "project_dir_mount"),
        mounts=mounts,
        network=_flag(body, "network", False),
        ncpus=ncpus,
        memory_bytes=memory,
        disk_bytes=disk,
        gpu=gpu,
        env=_str_dict(body, "env"),
        read_only_root=_flag(body, "read_only_root", False),
        allow_fetch=_flag(body, "allow_fetch", True),
        priority=priority,
        web_graphics=_web_graphics(body),
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
    if request.web_graphics is not None:
        # No port is published: the container keeps the network its job asked
        # for (none by default); the daemon forwards to it (webgraphics.py).
        task_labels[L.WEB_GRAPHICS_PORT] = str(request.web_graphics.guest_port)
        # A docker_wrapper app serves on port 80 with no capabilities: Docker lets
        # any user of a container's own network namespace bind low ports, Podman
        # 4.3 does not unless told (measured). Only that namespace is affected.
        host_config.setdefault("Sysctls", {})["net.ipv4.ip_unprivileged_port_start"] = "0"
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
    if request.command:
        config["Cmd"] = request.command
    return config
