"""What a shim asks for (a task request) and the container it becomes.

The shim parses init_data.xml and job.toml; the daemon validates the request
again, because the socket is the security boundary: a request may only mount
paths inside its own slot and project dirs, owned by the caller.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from boincd_containers.core import labels as L
from boincd_containers.core.errors import BadRequest, Forbidden
from boincd_containers.host.mounts import Entry
from boincd_containers.host.priority import Priority
from boincd_containers.host.safepath import Opened, Owner, inside, open_beneath, open_path

MIN_MEMORY_BYTES = 6 * 1024 * 1024  # the engines refuse less
# Docker refuses a CPU limit under 0.01 CPUs ("Range of CPUs is from 0.01 to N"),
# and over the host's count: a task always gets a limit within that range.
MIN_NANO_CPUS = 10_000_000
# The writable /tmp (and /var/tmp) of a read-only root: memory (tmpfs pages count
# in the container's memory limit), bounded in size.
DEFAULT_TMP_BYTES = 1024 * 1024 * 1024


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
    # it binds on 127.0.0.1 only (watch/webgraphics.py), never one a caller names.
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
    # None: the daemon's default (tasks/manager.py: read-only where the task user is not
    # root inside the container); job.toml's `read_only_root` decides otherwise.
    read_only_root: bool | None = None
    # False while BOINC has network activity suspended: no pull, wait instead.
    allow_fetch: bool = True
    # The shim's own priority, which the client chose for the task (host/priority.py).
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
        read_only_root=_get(body, "read_only_root", bool),
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


@dataclass(frozen=True, slots=True)
class HostPaths:
    """Where the engine finds each bind mount's source (host/mounts.py: mount points of
    the daemon's own, or the checked paths), and the checked slot dir for labels."""

    slot: str
    project: str | None
    mounts: tuple[str, ...]
    slot_label: str
    record: str  # JSON: how to make the mount points again (labels.MOUNTS)


@dataclass(slots=True)
class CheckedPaths:
    """What check_paths opened and checked. The container is made from these
    descriptors, never from the request's strings again: those the BOINC user can
    re-point at any time (host/safepath.py). Close it when done."""

    owner: Owner  # the slot's owner: the container runs as this uid:gid
    slot: Opened
    project: Opened | None = None
    # (mount, "slot" or "project", path inside that root, opened source)
    sources: list[tuple[Mount, str, str, Opened]] = field(default_factory=list)
    root_owner: int = -1  # the uid slot and project must still have (-1: caller root)

    @property
    def ids(self) -> tuple[int, int]:
        return self.owner.uid, self.owner.gid

    def entries(self, request: TaskRequest) -> list[tuple[Entry, Opened]]:
        """Every host path of the container in order: slot, project dir, mounts."""

        def entry(root: str, rel: str, opened: Opened) -> Entry:
            return Entry(root, rel, self.root_owner, opened.identity, opened.is_dir)

        out = [(entry("slot", "", self.slot), self.slot)]
        if self.project is not None and request.project_dir_mount:
            out.append((entry("project", "", self.project), self.project))
        out += [(entry(root, rel, o), o) for _, root, rel, o in self.sources]
        return out

    def close(self) -> None:
        for opened in [self.slot, self.project, *(s[3] for s in self.sources)]:
            if opened is not None:
                opened.close()


def _source_root(source: str, roots: dict[str, list[str]]) -> tuple[str, str] | None:
    """("slot" or "project", the rest) for an absolute source lexically under a root."""
    for kind, spellings in roots.items():
        for spelling in spellings:
            rel = inside(source, spelling)
            if rel is not None:
                return kind, rel
    return None


def check_paths(request: TaskRequest, peer_uid: int) -> CheckedPaths:
    """Open and check the host paths; the slot owner's (uid, gid) runs the container.

    A non-root caller must own the slot (and project) dir: otherwise any user
    allowed on the socket could have the root daemon mount someone else's files.
    Each path is opened once (host/safepath.py) and judged by its descriptor.
    """
    slot = open_path(request.slot_dir, "slot dir")
    checked = CheckedPaths(Owner.of(slot.st.st_uid, slot.st.st_gid), slot)
    try:
        if not slot.is_dir:
            raise BadRequest(f"slot dir {request.slot_dir} is not a directory")
        if peer_uid != 0 and slot.st.st_uid != peer_uid:
            raise Forbidden(
                f"slot dir {request.slot_dir} is not owned by the calling user (uid {peer_uid})"
            )
        checked.root_owner = -1 if peer_uid == 0 else peer_uid
        roots = {"slot": [request.slot_dir, slot.path]}
        if request.project_dir:
            project_dir = request.project_dir
            if not os.path.isabs(project_dir):
                raise BadRequest(f"project dir {project_dir} is not an existing absolute directory")
            try:
                checked.project = open_path(project_dir, "project dir")
            except BadRequest:
                raise BadRequest(
                    f"project dir {project_dir} is not an existing absolute directory"
                ) from None
            if not checked.project.is_dir:
                raise BadRequest(f"project dir {project_dir} is not an existing absolute directory")
            if peer_uid != 0 and checked.project.st.st_uid != peer_uid:
                raise Forbidden(f"project dir {project_dir} is not owned by the calling user")
            roots["project"] = [project_dir, checked.project.path]
        for mount in request.mounts:
            if os.path.isabs(mount.source):
                where = _source_root(mount.source, roots)
                if where is None:
                    raise Forbidden(
                        f"mount source {mount.source} is outside the slot and project dirs"
                    )
                kind, rel = where
            else:
                kind, rel = "slot", mount.source
            root = checked.slot if kind == "slot" else checked.project
            assert root is not None
            opened = open_beneath(root, rel, "mount source", shown=mount.source)
            checked.sources.append((mount, kind, rel, opened))
        return checked
    except BaseException:
        checked.close()
        raise


def nano_cpus(ncpus: float) -> int:
    """BOINC's `ncpus` as an engine CPU limit, always within what the engine takes."""
    host = float(os.cpu_count() or 1)
    if not math.isfinite(ncpus) or ncpus <= 0:
        ncpus = 1.0
    return max(MIN_NANO_CPUS, min(int(ncpus * 1e9), int(host * 1e9)))


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
    host_paths: HostPaths | None = None,
    default_memory_bytes: int = 0,
    read_only_root: bool | None = None,
    tmp_bytes: int = DEFAULT_TMP_BYTES,
) -> dict[str, Any]:
    """The Engine API create body: locked down by default, loosened only where the job asks.

    `host_paths` are what the engine mounts (TaskManager always passes them:
    mount points made from check_paths' descriptors); without them, the
    request's own paths, as they are, for tests of the rest of the body.
    `default_memory_bytes`: the memory limit when BOINC gave the task no bound;
    `read_only_root`: the caller's decision (None: the request's, else writable).
    """
    host = host_paths or HostPaths(
        request.slot_dir,
        request.project_dir,
        tuple(
            m.source if os.path.isabs(m.source) else os.path.join(request.slot_dir, m.source)
            for m in request.mounts
        ),
        request.slot_dir,
        "",
    )
    slot = host.slot_label
    mounts: list[dict[str, Any]] = [
        {"Type": "bind", "Source": host.slot, "Target": request.workdir, "ReadOnly": False}
    ]
    if host.project and request.project_dir_mount:
        mounts.append(
            {
                "Type": "bind",
                "Source": host.project,
                "Target": request.project_dir_mount,
                "ReadOnly": True,
            }
        )
    for mount, source in zip(request.mounts, host.mounts, strict=True):
        mounts.append(
            {"Type": "bind", "Source": source, "Target": mount.target, "ReadOnly": mount.read_only}
        )
    host_config: dict[str, Any] = {
        "Mounts": mounts,
        "NanoCpus": nano_cpus(request.ncpus),
        "PidsLimit": pids_limit,
        "CapDrop": ["ALL"],
        "SecurityOpt": ["no-new-privileges"],
        "NetworkMode": network_name if request.network else "none",
        "RestartPolicy": {"Name": "no"},
    }
    # A limit always: BOINC's bound, else the daemon's default (a task without one
    # could take the host's memory from the volunteer).
    memory = max(request.memory_bytes or default_memory_bytes, 0)
    if memory:
        memory = max(memory, MIN_MEMORY_BYTES)
        # Same as Memory: no swap beyond the bound BOINC gave the task.
        host_config.update({"Memory": memory, "MemorySwap": memory})
    read_only = request.read_only_root if read_only_root is None else read_only_root
    host_config["ReadonlyRootfs"] = bool(read_only)
    if read_only:
        # What a task user may write in an image's root: the sticky scratch dirs.
        # No noexec: apps unpack and run helpers there (PyInstaller does).
        size = min(tmp_bytes, memory) if memory else tmp_bytes
        options = f"rw,nosuid,nodev,mode=1777,size={size}"
        host_config["Tmpfs"] = {"/tmp": options, "/var/tmp": options}
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
        **({L.MOUNTS: host.record} if host.record else {}),
        **(request.priority.labels() if request.priority else {}),
    }
    if request.web_graphics is not None:
        # No port is published: the container keeps the network its job asked
        # for (none by default); the daemon forwards to it (watch/webgraphics.py).
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
    host_config["LogConfig"] = log_config(request.disk_bytes)
    if request.command:
        config["Cmd"] = request.command
    return config
