"""Per-container measurements read straight from the kernel (cgroup v1 and v2, /proc).

The engine's stats endpoint costs about two seconds a call (it waits for a second
sample to compute a CPU percentage); the same numbers are a few small sysfs reads
away. So the daemon resolves each container's cgroup directories once, from the
container's init pid, caches them, and every sample afterwards is a handful of
``open/read/close`` calls with no engine round trip.

Memory follows the kubelet/cAdvisor definition of the working set: usage minus
inactive file cache (cache the kernel can drop at no cost), floored at zero. That
is also what ``docker stats`` shows, so volunteers see the same figure everywhere.

A cgroup directory disappears when its container stops; every reader then raises
:class:`CgroupGone`, which callers treat as "exited", distinct from real errors.
"""

from __future__ import annotations

import errno
import glob
import os
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_ROOT = "/proc"

CgroupMode = Literal["unified", "hybrid", "legacy"]

# v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on 4 KiB pages);
# anything this large cannot be a limit someone set on purpose.
_UNLIMITED = 1 << 62
# Errors that mean the cgroup or process went away under us: ENOENT on open after the
# directory was removed, ENODEV when reading a file whose cgroup was removed while the
# file was open, ESRCH for /proc files of a process that has exited.
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ENODEV, errno.ESRCH})
# Bounds for the last-resort directory walk: deep enough for rootless systemd layouts
# (user.slice/user-U.slice/user@U.service/user.slice/libpod-ID.scope/container), small
# enough that a host with thousands of units still resolves quickly.
_WALK_DEPTH = 7
_WALK_MAX_DIRS = 20_000
_READ_CHUNK = 65536


class CgroupError(Exception):
    """A cgroup could not be found or read for a reason other than the container exiting."""


class CgroupGone(CgroupError):
    """The container's cgroup or init process no longer exists: the container has exited."""


@dataclass(frozen=True, slots=True)
class MemoryUsage:
    usage_bytes: int
    working_set_bytes: int
    inactive_file_bytes: int


@dataclass(frozen=True, slots=True)
class CgroupSample:
    cpu_time_ns: int
    memory: MemoryUsage


@dataclass(frozen=True, slots=True)
class Delegation:
    """Controllers for the doctor.

    On v2, ``available`` is ``cgroup.controllers`` of the cgroup (what its parent
    delegated) and ``subtree_control`` what it passes on to its children (a container
    engine needs cpu, memory and pids there). On v1 there is no delegation: both sets
    are the mounted controller hierarchies.
    """

    version: Literal[1, 2]
    available: frozenset[str]
    subtree_control: frozenset[str]


# -- low level reads ------------------------------------------------------------------


def _read(path: str) -> bytes:
    # os.open/os.read skip the buffered text layer: these files are read every second
    # per container, and the plain syscalls are several times cheaper than open().
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _translate(exc, path) from exc
    try:
        data = os.read(fd, _READ_CHUNK)
        # sysfs and procfs hand back a small file whole in one read; loop only when the
        # buffer filled, to stay correct on unusually large files.
        if len(data) == _READ_CHUNK:
            parts = [data]
            while chunk := os.read(fd, _READ_CHUNK):
                parts.append(chunk)
            data = b"".join(parts)
        return data
    except OSError as exc:
        raise _translate(exc, path) from exc
    finally:
        os.close(fd)


def _translate(exc: OSError, path: str) -> CgroupError:
    if exc.errno in _GONE_ERRNOS:
        return CgroupGone(f"{path}: {exc.strerror}")
    return CgroupError(f"{path}: {exc.strerror or exc}")


def _parse_int(data: bytes, path: str) -> int:
    try:
        return int(data)
    except ValueError:
        raise CgroupError(f"{path}: expected an integer, got {data[:40]!r}") from None


def _read_int(path: str) -> int:
    return _parse_int(_read(path), path)


def _read_limit(path: str) -> int | None:
    data = _read(path).strip()
    if data == b"max":  # v2 spelling of "no limit"
        return None
    value = _parse_int(data, path)
    return None if value >= _UNLIMITED else value


def _stat_value(data: bytes, key: bytes, path: str) -> int:
    """The value of ``key`` in a flat-keyed file (memory.stat, cpu.stat)."""
    if data.startswith(key + b" "):
        start = len(key) + 1
    else:
        idx = data.find(b"\n" + key + b" ")
        if idx < 0:
            raise CgroupError(f"{path}: no {key.decode()!r} entry")
        start = idx + len(key) + 2
    end = data.find(b"\n", start)
    return _parse_int(data[start : end if end >= 0 else len(data)], path)


# -- host-level facts (the doctor) ----------------------------------------------------


def cgroup_mode(sys_root: str = CGROUP_ROOT) -> CgroupMode:
    """``unified`` (pure v2), ``hybrid`` (v1 controllers beside a v2 tree) or ``legacy`` (v1)."""
    if os.path.exists(os.path.join(sys_root, "cgroup.controllers")):
        return "unified"
    if _v1_controller_dirs(sys_root):
        if os.path.exists(os.path.join(sys_root, "unified", "cgroup.controllers")):
            return "hybrid"
        return "legacy"
    raise CgroupError(f"no cgroup filesystem found at {sys_root}")


def cgroup_version(sys_root: str = CGROUP_ROOT) -> Literal[1, 2]:
    """The hierarchy that holds the resource controllers: hybrid hosts count as v1."""
    return 2 if cgroup_mode(sys_root) == "unified" else 1


def user_service_cgroup(uid: int) -> str:
    """Where systemd delegates a user's cgroup subtree; rootless engines live below it."""
    return f"user.slice/user-{uid}.slice/user@{uid}.service"


def delegated_controllers(sys_root: str = CGROUP_ROOT, path: str = "") -> Delegation:
    """Controllers usable at ``path`` (relative to the v2 root; e.g. :func:`user_service_cgroup`
    for a rootless engine). Unreadable or missing files count as no controllers."""
    if cgroup_mode(sys_root) != "unified":
        # "systemd" is a named hierarchy for process tracking, not a resource controller.
        mounted = frozenset(_v1_controller_dirs(sys_root)) - {"systemd"}
        return Delegation(version=1, available=mounted, subtree_control=mounted)
    base = os.path.join(sys_root, path.strip("/"))

    def words(name: str) -> frozenset[str]:
        try:
            return frozenset(_read(os.path.join(base, name)).decode().split())
        except CgroupError:
            return frozenset()

    return Delegation(
        version=2,
        available=words("cgroup.controllers"),
        subtree_control=words("cgroup.subtree_control"),
    )


def _v1_controller_dirs(sys_root: str) -> dict[str, str]:
    """Controller name -> mount directory, co-mounts (``cpu,cpuacct``) split up."""
    found: dict[str, str] = {}
    try:
        entries = sorted(os.scandir(sys_root), key=lambda e: e.name)
    except OSError:
        return found
    for entry in entries:
        if entry.name == "unified" or not entry.is_dir():
            continue
        if not os.path.exists(os.path.join(entry.path, "cgroup.procs")):
            continue
        # A real directory named after its controllers wins over a symlink alias
        # (systemd mounts cpu,cpuacct and links cpu and cpuacct to it).
        for ctrl in entry.name.split(","):
            if ctrl not in found or not entry.is_symlink():
                found[ctrl] = entry.path
    return found


# -- network --------------------------------------------------------------------------


def net_dev(pid: int, proc_root: str = PROC_ROOT) -> tuple[int, int]:
    """(rx_bytes, tx_bytes) summed over the interfaces of ``pid``'s network namespace,
    loopback excluded (traffic inside the container is not network use)."""
    data = _read(os.path.join(proc_root, str(pid), "net", "dev"))
    rx = tx = 0
    for line in data.splitlines()[2:]:
        name, sep, rest = line.partition(b":")
        if not sep or name.strip() == b"lo":
            continue
        fields = rest.split()
        if len(fields) < 9:
            continue
        rx += int(fields[0])
        tx += int(fields[8])
    return rx, tx


# -- per-container handle -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContainerCgroup:
    """A container's resolved cgroup directories; every method is a few file reads.

    ``dedicated`` is False when the container has no cgroup of its own (rootless Podman
    on v1, ``--cgroups=disabled``): the numbers then include other processes.
    """

    container_id: str
    pid: int
    version: Literal[1, 2]
    cpu_dir: str
    memory_dir: str | None
    pids_dir: str | None
    dedicated: bool
    proc_root: str = PROC_ROOT

    def cpu_time_ns(self) -> int:
        if self.version == 1:
            return _read_int(os.path.join(self.cpu_dir, "cpuacct.usage"))
        path = os.path.join(self.cpu_dir, "cpu.stat")
        return _stat_value(_read(path), b"usage_usec", path) * 1000

    def memory(self) -> MemoryUsage:
        mdir = self._memory_dir()
        if self.version == 1:
            usage = _read_int(os.path.join(mdir, "memory.usage_in_bytes"))
            key = b"total_inactive_file"  # hierarchical: includes child cgroups
        else:
            usage = _read_int(os.path.join(mdir, "memory.current"))
            key = b"inactive_file"  # v2 memory.stat is always hierarchical
        stat_path = os.path.join(mdir, "memory.stat")
        inactive = _stat_value(_read(stat_path), key, stat_path)
        return MemoryUsage(
            usage_bytes=usage,
            working_set_bytes=max(usage - inactive, 0),
            inactive_file_bytes=inactive,
        )

    def memory_limit(self) -> int | None:
        """The hard memory limit in bytes, None when unlimited."""
        name = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        return _read_limit(os.path.join(self._memory_dir(), name))

    def pids_current(self) -> int | None:
        """Tasks in the cgroup; None when the pids controller is not available to it."""
        if self.pids_dir is None:
            return None
        return _read_int(os.path.join(self.pids_dir, "pids.current"))

    def sample(self) -> CgroupSample:
        return CgroupSample(cpu_time_ns=self.cpu_time_ns(), memory=self.memory())

    def thread_ids(self) -> list[int]:
        """Every thread in the cgroup: v1 `tasks`, v2 `cgroup.threads` (both list
        thread ids, not only processes: each thread has its own priority)."""
        name = "tasks" if self.version == 1 else "cgroup.threads"
        path = os.path.join(self.cpu_dir, name)
        return [int(tid) for tid in _read(path).split()]

    def exists(self) -> bool:
        return os.path.isdir(self.cpu_dir)

    def net_dev(self) -> tuple[int, int]:
        rx_tx = net_dev(self.pid, self.proc_root)
        # Checked after the read: if the container exited meanwhile its pid may now be
        # someone else's, and its cgroup is gone, so the figures are not reported.
        if not self.exists():
            raise CgroupGone(f"cgroup of container {self.container_id[:12]} is gone")
        return rx_tx

    def _memory_dir(self) -> str:
        if self.memory_dir is None:
            raise CgroupError(
                f"memory controller not available to container {self.container_id[:12]}"
            )
        return self.memory_dir


# -- resolution -----------------------------------------------------------------------


def _layouts(cid: str) -> tuple[str, ...]:
    """Where engines put a container's cgroup, relative to a hierarchy root."""
    return (
        f"docker/{cid}",  # Docker, cgroupfs driver
        f"system.slice/docker-{cid}.scope",  # Docker, systemd driver
        f"libpod_parent/libpod-{cid}",  # Podman, cgroupfs manager
        f"machine.slice/libpod-{cid}.scope",  # Podman, systemd manager
        # rootless Docker / Podman with the systemd driver, below the user's service
        f"user.slice/user-*.slice/user@*.service/user.slice/docker-{cid}.scope",
        f"user.slice/user-*.slice/user@*.service/user.slice/libpod-{cid}.scope",
    )


def _is_container_dir(name: str, cid: str) -> bool:
    # conmon, Podman's monitor process, gets a sibling libpod-conmon-<id> cgroup.
    return cid in name and "conmon" not in name


def _find_by_id(base: str, cid: str) -> str | None:
    for rel in _layouts(cid):
        pattern = os.path.join(base, rel)
        hits = sorted(glob.glob(pattern)) if "*" in rel else [pattern]
        for hit in hits:
            if os.path.isdir(hit):
                return hit
    # Custom --cgroup-parent, nested engines and unknown layouts: a bounded
    # breadth-first walk takes the shallowest directory named after the container.
    queue: deque[tuple[str, int]] = deque([(base, 0)])
    visited = 0
    while queue and visited < _WALK_MAX_DIRS:
        path, depth = queue.popleft()
        visited += 1
        try:
            entries = sorted(
                (e for e in os.scandir(path) if e.is_dir(follow_symlinks=False)),
                key=lambda e: e.name,
            )
        except OSError:
            continue
        for entry in entries:
            if _is_container_dir(entry.name, cid):
                return entry.path
        if depth + 1 < _WALK_DEPTH:
            queue.extend((e.path, depth + 1) for e in entries)
    return None


def _parse_proc_cgroup(data: bytes) -> list[tuple[frozenset[str], str]]:
    """Lines ``id:controllers:path`` as (controllers, path); v2's line has no controllers."""
    out: list[tuple[frozenset[str], str]] = []
    for line in data.decode(errors="replace").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        ctrls = frozenset(c.removeprefix("name=") for c in parts[1].split(",") if c)
        out.append((ctrls, parts[2]))
    return out


def _resolve_dir(base: str, proc_path: str | None, cid: str) -> tuple[str | None, bool]:
    """(directory, dedicated) of the container in the hierarchy mounted at ``base``.

    The kernel shows paths relative to the reader's cgroup namespace: "/" or "/.."
    prefixes mean the container sits outside the daemon's view of the tree (the daemon
    itself runs in a nested namespace), so the known layouts are searched by id.
    """
    usable = proc_path is not None and proc_path != "/" and not proc_path.startswith("/..")
    direct = os.path.join(base, proc_path.lstrip("/")) if usable and proc_path else None
    if direct is not None and cid in direct[len(base) :] and os.path.isdir(direct):
        return direct, True
    found = _find_by_id(base, cid)
    if found is not None:
        return found, True
    if direct is not None and os.path.isdir(direct):
        # A real cgroup, shared with other processes (rootless Podman on v1).
        return direct, False
    return None, False


class CgroupReader:
    """Resolves and caches container cgroups; the sysfs and proc roots are injectable."""

    def __init__(self, sys_root: str = CGROUP_ROOT, proc_root: str = PROC_ROOT) -> None:
        self.sys_root = sys_root
        self.proc_root = proc_root
        self._mode: CgroupMode | None = None
        self._cache: dict[str, ContainerCgroup] = {}

    @property
    def mode(self) -> CgroupMode:
        if self._mode is None:
            self._mode = cgroup_mode(self.sys_root)
        return self._mode

    @property
    def version(self) -> Literal[1, 2]:
        return 2 if self.mode == "unified" else 1

    def get(self, container_id: str, pid: int) -> ContainerCgroup:
        """The container's cgroup, resolved on first use. A different pid (the container
        was restarted) resolves again. Raises CgroupGone if the process is gone."""
        cached = self._cache.get(container_id)
        if cached is not None and cached.pid == pid:
            return cached
        resolved = self._resolve(container_id, pid)
        self._cache[container_id] = resolved
        return resolved

    def forget(self, container_id: str) -> None:
        self._cache.pop(container_id, None)

    # Shortcuts that also drop the cache entry of a container that exited, so a later
    # restart under the same id resolves afresh.

    def cpu_time_ns(self, container_id: str, pid: int) -> int:
        with self._evict_on_gone(container_id):
            return self.get(container_id, pid).cpu_time_ns()

    def memory(self, container_id: str, pid: int) -> MemoryUsage:
        with self._evict_on_gone(container_id):
            return self.get(container_id, pid).memory()

    def memory_limit(self, container_id: str, pid: int) -> int | None:
        with self._evict_on_gone(container_id):
            return self.get(container_id, pid).memory_limit()

    def pids_current(self, container_id: str, pid: int) -> int | None:
        with self._evict_on_gone(container_id):
            return self.get(container_id, pid).pids_current()

    def sample(self, container_id: str, pid: int) -> CgroupSample:
        with self._evict_on_gone(container_id):
            return self.get(container_id, pid).sample()

    def net_dev(self, container_id: str, pid: int) -> tuple[int, int]:
        with self._evict_on_gone(container_id):
            return self.get(container_id, pid).net_dev()

    def thread_ids(self, container_id: str, pid: int) -> list[int]:
        with self._evict_on_gone(container_id):
            return self.get(container_id, pid).thread_ids()

    @contextmanager
    def _evict_on_gone(self, container_id: str) -> Iterator[None]:
        try:
            yield
        except CgroupGone:
            self.forget(container_id)
            raise

    def _resolve(self, cid: str, pid: int) -> ContainerCgroup:
        if pid <= 0:
            raise CgroupGone(f"container {cid[:12]} is not running (pid {pid})")
        lines = _parse_proc_cgroup(_read(os.path.join(self.proc_root, str(pid), "cgroup")))
        if self.mode == "unified":
            v2_path = next((p for ctrls, p in lines if not ctrls), None)
            cgdir, dedicated = _resolve_dir(self.sys_root, v2_path, cid)
            if cgdir is None:
                raise self._not_found(cid, pid, "")
            # Controller files exist only where the parent enabled the controller.
            memory = os.path.exists(os.path.join(cgdir, "memory.current"))
            pids = os.path.exists(os.path.join(cgdir, "pids.current"))
            return ContainerCgroup(
                container_id=cid,
                pid=pid,
                version=2,
                cpu_dir=cgdir,
                memory_dir=cgdir if memory else None,
                pids_dir=cgdir if pids else None,
                dedicated=dedicated,
                proc_root=self.proc_root,
            )
        mounts = _v1_controller_dirs(self.sys_root)

        def find(ctrl: str) -> tuple[str | None, bool]:
            base = mounts.get(ctrl)
            if base is None:
                return None, False
            proc_path = next((p for ctrls, p in lines if ctrl in ctrls), None)
            return _resolve_dir(base, proc_path, cid)

        cpu_dir, dedicated = find("cpuacct")
        if cpu_dir is None:
            raise self._not_found(cid, pid, "cpuacct ")
        memory_dir, _ = find("memory")
        pids_dir, _ = find("pids")
        return ContainerCgroup(
            container_id=cid,
            pid=pid,
            version=1,
            cpu_dir=cpu_dir,
            memory_dir=memory_dir,
            pids_dir=pids_dir,
            dedicated=dedicated,
            proc_root=self.proc_root,
        )

    def _not_found(self, cid: str, pid: int, what: str) -> CgroupError:
        # The process may have exited between reading its cgroup file and looking for
        # the directory: that is an exit, not a failure to resolve.
        if not os.path.exists(os.path.join(self.proc_root, str(pid))):
            return CgroupGone(f"container {cid[:12]} exited (pid {pid} is gone)")
        return CgroupError(f"no {what}cgroup found for container {cid[:12]} (pid {pid})")
