"""Mount points the engine is given instead of the BOINC user's paths.

The engine resolves a bind mount's source path when it *starts* the container,
not when it creates it, and as root. A source under the BOINC user's control
(the slot dir, a `mount` inside it) can be swapped for a symbolic link in
between, and the container then sees any directory on the host. Kubernetes
fixed the same race (CVE-2017-1002101) by bind-mounting the *opened*
directory onto a path of its own; so do we:

    state_dir/mounts/<container name>/<n>   (root-owned, parents 0700)

Each one is a non-recursive bind mount of ``/proc/self/fd/N``, N being the
descriptor host/safepath.py opened and taskspec.check_paths checked, so it is the
checked directory whatever happens to the path later, and nobody but root can
change it. The engine's own bind of it is private to the container: unmounting
ours later does not touch a running container, but a container started again
(after a host reboot, or an interrupted one) would get the empty mount point,
so ``ensure`` makes them again before every start, from the labels, with the
same checks. They go when the container is removed, and ``sweep`` (each GC
pass) unmounts those whose container is gone, e.g. after a daemon SIGKILL.

The mounts must be in the engine's mount namespace: the root systemd unit
therefore uses no option that gives the daemon a namespace of its own
(ProtectSystem=, PrivateTmp=, ...), which would keep them from dockerd.

Where mount(2) is impossible (the daemon is not root: rootless Podman runs it
as the BOINC user itself, or it lacks CAP_SYS_ADMIN, or it is in another
mount namespace than the engine), the engine gets the checked path (every
link on it one that only root could change, the last component none) and,
before each start, the path is walked again and must still lead to the same
(device, inode). A swap between that check and the engine's start remains
possible there; a rootless daemon is the user itself, so no privilege is
crossed, and a root daemon in this state says so in its log at each task.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boincd_containers.core import labels as L
from boincd_containers.core.errors import BadRequest, BoincdError, Forbidden
from boincd_containers.core.log import get_logger
from boincd_containers.host.safepath import Opened, open_beneath, open_path

log = get_logger(__name__)

_MS_BIND = 4096
_MNT_DETACH = 2

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def bind_mount(source: str, target: str) -> None:
    if _lib().mount(source.encode(), target.encode(), None, _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount --bind {source} {target}: {os.strerror(err)}")


def unmount(target: str) -> None:
    """Detach the mount at `target`; not mounted is fine."""
    if _lib().umount2(target.encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


def mounted_paths() -> set[str]:
    """Mount points of this namespace (/proc/self/mountinfo, octal escapes undone)."""
    points = set()
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            fields = line.split(b" ")
            if len(fields) > 4:
                points.add(fields[4].decode("unicode_escape", "surrogateescape"))
    return points


@dataclass(frozen=True, slots=True)
class Entry:
    """One host path of a task container: `root` ("slot" or "project") and `rel`
    inside it, how it is re-derived; `owner` the root's owner uid as checked
    (-1: any, the caller was root); `ident` its (device, inode) as checked."""

    root: str
    rel: str
    owner: int
    ident: tuple[int, int]
    is_dir: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "rel": self.rel,
            "owner": self.owner,
            "ident": list(self.ident),
            "dir": self.is_dir,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        dev, ino = data["ident"]
        return cls(
            str(data["root"]),
            str(data["rel"]),
            int(data["owner"]),
            (int(dev), int(ino)),
            bool(data["dir"]),
        )


def can_bind() -> bool:
    """Whether our mounts can reach the engine: root (CAP_SYS_ADMIN is found out by
    trying) in the host's mount namespace. A namespace of our own (systemd's
    ProtectSystem= and the like) keeps them from the engine, which would then
    mount an empty directory."""
    if os.geteuid() != 0:
        return False
    try:
        return os.stat("/proc/self/ns/mnt").st_ino == os.stat("/proc/1/ns/mnt").st_ino
    except OSError:
        return True  # pid 1 not ours to see (a container's view): assume one namespace


class MountTable:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "mounts"
        # Prepared, the container not created yet: sweep leaves these alone.
        self.pending: set[str] = set()
        self.bind: bool = can_bind()
        self._warned = False

    # -- making -------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        if not name or "/" in name or name in (".", ".."):
            raise BadRequest(f"container name {name!r} cannot name a mount dir")
        return self.root / name

    def _make_root(self) -> None:
        for path in (self.root.parent, self.root):
            path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(self.root)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise BoincdError(f"{self.root} is not a directory of the daemon's own")
        os.chmod(self.root, 0o700)

    def prepare(self, name: str, opened: list[tuple[Entry, Opened]]) -> list[str]:
        """The paths to give the engine for these opened sources, in order."""
        self.pending.add(name)
        if not self.bind:
            self._warn_unbound()
            return [o.path for _, o in opened]
        try:
            self._make_root()
            self.release(name)  # a half-made one of an earlier try
            where = self._dir(name)
            where.mkdir(mode=0o700)
            return [self._bind(where / str(i), o) for i, (_, o) in enumerate(opened)]
        except OSError as exc:
            self.release(name)
            if exc.errno in (errno.EPERM, errno.EACCES):
                # No CAP_SYS_ADMIN (an old systemd unit): fall back, and say so.
                self.bind = False
                return self.prepare(name, opened)
            raise BoincdError(f"cannot prepare the task's mounts: {exc}") from exc

    def _bind(self, point: Path, opened: Opened) -> str:
        if opened.is_dir:
            point.mkdir(mode=0o700)
        else:
            os.close(os.open(point, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        bind_mount(opened.proc_path, str(point))
        st = os.stat(point, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != opened.identity:
            unmount(str(point))
            raise OSError(errno.EIO, f"{point} is not the checked {opened.path} after mounting")
        return str(point)

    def created(self, name: str) -> None:
        """The container exists (or never will): it keeps its mounts from now on."""
        self.pending.discard(name)

    def _warn_unbound(self) -> None:
        if os.geteuid() == 0:
            log.warning(
                "the daemon cannot bind-mount (no CAP_SYS_ADMIN, or not in the engine's "
                "mount namespace): task paths are checked again before start, but the BOINC "
                "user could still swap them in between; use the shipped systemd unit"
            )
        elif not self._warned:
            log.info("not root: task paths are checked, then given to the engine as they are")
        self._warned = True

    # -- before each start --------------------------------------------------------

    def ensure(self, name: str, container: dict[str, Any]) -> None:
        """Make the container's mount points again where they are gone (a reboot);
        where it was given checked paths instead, check that they still lead
        where they led."""
        labels = (container.get("Config") or {}).get("Labels") or {}
        sources = {
            str(m.get("Source")) for m in (container.get("HostConfig") or {}).get("Mounts") or []
        }
        raw = labels.get(L.MOUNTS)
        if not raw:
            return  # made by a daemon before mount points: nothing recorded to check
        try:
            entries = [Entry.from_json(e) for e in json.loads(raw)]
        except (ValueError, KeyError, TypeError) as exc:
            raise Forbidden(f"container {name}: unreadable mount record ({exc})") from None
        roots = {"slot": labels.get(L.SLOT, ""), "project": labels.get(L.PROJECT_DIR, "")}
        present = mounted_paths()
        where = self._dir(name)
        for i, entry in enumerate(entries):
            point = where / str(i)
            ours = str(point) in sources  # else made without mount(2): a checked path
            if ours and str(point) in present:
                continue
            opened = reopen(entry, roots)
            try:
                if ours:
                    if not self.bind:
                        raise Forbidden(
                            f"container {name} needs its mount point {point} made again, "
                            "and this daemon cannot mount"
                        )
                    self._make_root()
                    where.mkdir(mode=0o700, exist_ok=True)
                    with contextlib.suppress(FileNotFoundError):
                        (point.rmdir if entry.is_dir else point.unlink)()
                    self._bind(point, opened)
                    log.info("task mount made again", container=name, path=opened.path)
                elif opened.identity != entry.ident:
                    raise Forbidden(
                        f"{opened.path} is no longer the directory checked when the task's "
                        "container was made (it was replaced): not started"
                    )
            finally:
                opened.close()

    # -- removing -----------------------------------------------------------------

    def release(self, name: str) -> None:
        """Unmount and remove a container's mount points. Never recursive: a point
        still mounted makes rmdir fail (EBUSY) instead of emptying the slot."""
        where = self._dir(name)
        try:
            points = sorted(os.listdir(where))
        except FileNotFoundError:
            return
        for point in points:
            path = str(where / point)
            unmount(path)
            try:
                st = os.lstat(path)
                (os.rmdir if stat.S_ISDIR(st.st_mode) else os.unlink)(path)
            except FileNotFoundError:
                pass
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(where)

    def sweep(self, live: set[str]) -> list[str]:
        """Release the mount dirs of containers that no longer exist."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        gone = sorted(set(names) - live - self.pending)
        for name in gone:
            try:
                self.release(name)
            except OSError as exc:
                log.warning("cannot release stale task mounts", container=name, error=str(exc))
                continue
            log.info("released the mounts of a container that is gone", container=name)
        return gone


def reopen(entry: Entry, roots: dict[str, str]) -> Opened:
    """Walk a recorded entry again from its root's recorded path, with the same checks."""
    path = roots.get(entry.root) or ""
    root = open_path(path, f"{entry.root} dir")
    try:
        if entry.owner >= 0 and root.st.st_uid != entry.owner:
            raise Forbidden(f"{entry.root} dir {path} is no longer owned by uid {entry.owner}")
        if not entry.rel:
            return _same_kind(root, entry)
        opened = open_beneath(root, entry.rel, "mount source")
    except BaseException:
        root.close()
        raise
    root.close()
    return _same_kind(opened, entry)


def _same_kind(opened: Opened, entry: Entry) -> Opened:
    if opened.is_dir != entry.is_dir:
        opened.close()
        raise Forbidden(f"{opened.path} changed from a {'dir' if entry.is_dir else 'file'}")
    return opened
