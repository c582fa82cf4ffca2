"""Host paths opened once, with no link the BOINC user could swap on the way.

The daemon runs as root; the slot and project dirs, and everything in them,
belong to the BOINC user, who may rename a checked directory and put a
symbolic link in its place at any moment. Checking a path and later handing
the same *string* to the engine (which resolves it again, at container start)
lets that user mount any directory on the host: the race of Kubernetes'
CVE-2017-1002101 (subPath). So a path is resolved here exactly once, one
component at a time with ``openat(O_PATH|O_NOFOLLOW)`` from ``/``, and what is
checked and used afterwards is the open file descriptor, never the string:

- a symbolic link is followed only where nobody but root (or the daemon's own
  user) can replace it: its directory is owned by root or us and writable by
  no group or other (``/var/lib/boinc -> boinc-client`` on Debian); anywhere
  else it is refused, and the last component is never followed;
- inside a slot or project dir nothing is followed and ``..`` is refused, so
  a mount source or an archive is always a real entry under its root;
- the caller decides with ``may_access`` what the slot's owner could do with
  what was opened, from the descriptor's ``fstat``, since root may do anything.

host/mounts.py turns the opened directories into mount points the engine is given
instead; images/sources.py builds contexts and images/cache.py loads archives from
the descriptors.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from collections import deque
from dataclasses import dataclass, field

from boincd_containers.core.errors import BadRequest, Forbidden

_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
# Re-opening an O_PATH descriptor through /proc/self/fd: never blocks on a FIFO.
READ_FILE = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
READ_DIR = os.O_RDONLY | os.O_DIRECTORY
_MAX_LINKS = 40  # as the kernel's own limit (ELOOP)


class UnsafePath(Forbidden):
    """A path with a link the caller could swap, or one that leaves its root."""


@dataclass(slots=True)
class Opened:
    """One opened host path: `path` is what it was reached by (trusted links
    replaced by their targets), for labels and messages only."""

    path: str
    fd: int
    st: os.stat_result = field(repr=False)

    @property
    def identity(self) -> tuple[int, int]:
        return self.st.st_dev, self.st.st_ino

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def proc_path(self) -> str:
        """The opened file itself, for mount(2) and re-opening: not a path to re-resolve."""
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def reopen(self, flags: int) -> int:
        """A new descriptor with other flags (read, list) on the very same file."""
        return os.open(self.proc_path, flags | os.O_CLOEXEC)


def _trusted_dir(st: os.stat_result) -> bool:
    """Only root (or this daemon's user) can change what is in this directory."""
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def open_path(path: str, what: str) -> Opened:
    """Open an absolute host path (O_PATH), following only links nobody but root
    can swap. A link as the last component is refused, whoever owns it."""
    if not os.path.isabs(path):
        raise BadRequest(f"{what} {path} must be an absolute path")
    if ".." in _parts(path):
        raise BadRequest(f"{what} {path} must not contain '..'")
    todo = deque(_parts(path))
    fd = os.open("/", _PATH | os.O_DIRECTORY)
    here: list[str] = []
    links = 0
    try:
        while todo:
            name = todo.popleft()
            if name == "..":  # only from a trusted link's target
                parent = os.open("..", _PATH | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = parent
                if here:
                    here.pop()
                continue
            child = os.open(name, _PATH, dir_fd=fd)  # a link: the link itself
            st = os.fstat(child)
            if stat.S_ISLNK(st.st_mode):
                os.close(child)
                if not todo or not _trusted_dir(os.fstat(fd)):
                    raise UnsafePath(
                        f"{what} {path}: {'/' + '/'.join([*here, name])} is a symbolic link, "
                        "which its owner could point anywhere: give the real path"
                    )
                links += 1
                if links > _MAX_LINKS:
                    raise BadRequest(f"{what} {path}: too many symbolic links")
                target = os.readlink(name, dir_fd=fd)
                if os.path.isabs(target):
                    os.close(fd)
                    fd, here = -1, []
                    fd = os.open("/", _PATH | os.O_DIRECTORY)
                todo.extendleft(reversed(_parts(target)))
                continue
            os.close(fd)
            fd = child
            here.append(name)
            if todo and not stat.S_ISDIR(st.st_mode):
                raise BadRequest(f"{what} {path}: /{'/'.join(here)} is not a directory")
        opened = Opened("/" + "/".join(here), fd, os.fstat(fd))
        fd = -1
        return opened
    except FileNotFoundError:
        raise BadRequest(f"{what} {path} is not usable: it does not exist") from None
    except OSError as exc:
        raise BadRequest(f"{what} {path} is not usable: {exc.strerror}") from None
    finally:
        if fd >= 0:
            os.close(fd)


def open_beneath(root: Opened, rel: str, what: str, *, shown: str | None = None) -> Opened:
    """Open `rel` inside `root` (a slot or project dir), O_PATH: no link, no `..`, ever."""
    shown = shown or rel
    parts = _parts(rel)
    if ".." in parts or rel.startswith("/"):
        raise UnsafePath(f"{what} {shown} is outside the slot and project dirs")
    fd = os.dup(root.fd)
    try:
        for i, name in enumerate(parts):
            try:
                child = os.open(name, _PATH, dir_fd=fd)
            except FileNotFoundError:
                raise BadRequest(f"{what} {shown} does not exist") from None
            except OSError as exc:
                raise BadRequest(f"{what} {shown} is not usable: {exc.strerror}") from None
            os.close(fd)
            fd = child
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePath(
                    f"{what} {shown} is outside the slot and project dirs: "
                    f"{'/'.join(parts[: i + 1])} is a symbolic link"
                )
            if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
                raise BadRequest(f"{what} {shown}: {'/'.join(parts[: i + 1])} is not a directory")
        opened = Opened(os.path.join(root.path, *parts), fd, os.fstat(fd))
        fd = -1
        return opened
    finally:
        if fd >= 0:
            os.close(fd)


def inside(path: str, root: str) -> str | None:
    """`path` relative to `root` when it is lexically under it ('' for root itself)."""
    path, root = os.path.normpath(path), os.path.normpath(root)
    if path == root:
        return ""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else None


@dataclass(frozen=True, slots=True)
class Owner:
    """Whose permissions a slot's files are read with: the slot owner's."""

    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def of(cls, uid: int, gid: int) -> Owner:
        try:
            name = pwd.getpwuid(uid).pw_name
            groups = frozenset(os.getgrouplist(name, gid))
        except (KeyError, OSError):
            groups = frozenset({gid})
        return cls(uid, gid, groups | {gid})

    def may(self, st: os.stat_result, bits: int) -> bool:
        """POSIX permission check for this user (`bits`: 4 read, 2 write, 1 search):
        the owner class wins even where it grants less than group or other."""
        if self.uid == 0:
            return True
        if st.st_uid == self.uid:
            return st.st_mode >> 6 & bits == bits
        if st.st_gid in self.groups:
            return st.st_mode >> 3 & bits == bits
        return st.st_mode & bits == bits
