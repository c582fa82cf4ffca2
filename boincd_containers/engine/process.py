"""When the process serving a local engine socket started (Docker without
live-restore stops every container when it shuts down: what exited before its
start was interrupted, not finished)."""

from __future__ import annotations

import contextlib
import os
import time

import psutil


def engine_process_started_at(host: str) -> float:
    """When the process serving a local engine socket started; 0.0 when unknown
    (a remote engine, or its process not ours to see)."""
    if not host.startswith("unix://"):
        return 0.0
    path = os.path.realpath(host[len("unix://") :])
    name = os.path.basename(path)
    try:
        connections = psutil.net_connections("unix")
    except (psutil.Error, OSError):
        return 0.0
    pids = set()
    for conn in connections:
        bound = conn.laddr if isinstance(conn.laddr, str) else ""
        if not conn.pid or os.path.basename(bound) != name or os.path.realpath(bound) != path:
            continue
        pids.add(conn.pid)
    if not pids:
        # /proc/net/unix lists our network namespace only: an engine in its own
        # (e.g. started under `unshare --net`) is found through its processes'.
        pids = _listeners_elsewhere(path, name)
    starts = [start for start in map(process_started_at, pids) if start > 0]
    # With socket activation systemd holds the socket too: the engine is the youngest.
    return max(starts, default=0.0)


def process_started_at(pid: int) -> float:
    """When a process started, to the clock tick; 0.0 when unknown.

    psutil's create_time adds the start to the boot time of /proc/stat, whole
    seconds that drift from the wall clock: measured here, 0.3 s early, which
    put an engine's start after a container it then stopped. The boot clock
    gives the time since the start exactly.
    """
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
        since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - since_boot)
    except (OSError, ValueError, IndexError, AttributeError):
        with contextlib.suppress(psutil.Error):
            return float(psutil.Process(pid).create_time())
        return 0.0


def _listeners_elsewhere(path: str, name: str) -> set[int]:
    """Pids holding a Unix socket bound to `path`, looked up in every network
    namespace but ours."""
    try:
        own = os.readlink("/proc/self/ns/net")
    except OSError:
        return set()
    namespaces, inodes = {own}, set()
    for pid in psutil.pids():
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/net")
            if namespace in namespaces:
                continue
            namespaces.add(namespace)
            with open(f"/proc/{pid}/net/unix") as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode Path
            bound = fields[7] if len(fields) >= 8 else ""
            if os.path.basename(bound) == name and os.path.realpath(bound) == path:
                inodes.add(f"socket:[{fields[6]}]")
    if not inodes:
        return set()
    holders = set()
    for pid in psutil.pids():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        holders.add(pid)
                        break
    return holders
