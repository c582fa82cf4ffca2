"""How Docker and Podman differ behind the same Engine API, as pure functions.

The adapter (engine/adapter.py) applies these; nothing else in the daemon needs to know
which engine it talks to. Measured on this project's hosts with Docker 20.10
and Podman 4.3.1 (rootful and rootless, cgroup v1):

- Podman answers 500, not 409, for state conflicts ("... is already paused:
  container state improper", "can only kill running containers", a name "already
  in use"): a 500 means "retry" to us, so these are re-classified.
- Rootless on cgroup v1 a container has no cgroup: Podman accepts CPU, memory
  and pids limits and silently drops them (inspect shows 0), and refuses to
  pause ("can not pause containers on rootless containers with cgroup V1").
- Rootless Podman without /dev/net/tun cannot start a networked container
  (slirp4netns): a permanent condition of the host, not worth retrying.
- Podman's compatible /info claims memory and CPU limit support even where it
  has none; its /libpod/info lists the cgroup controllers it really has.
- Podman's compat create takes LogConfig `json-file` as its own `k8s-file`
  (refusing `local`) and `max-size` as conmon's `log-size-max`: one log file,
  emptied when full, no rotation, `max-file` ignored. LogPath is that file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from boincd_containers.core import labels as L
from boincd_containers.core.errors import BoincdError, Conflict, NotFound

# Limits the daemon sets, by the cgroup controller that enforces them.
LIMIT_KEYS: dict[str, tuple[str, ...]] = {
    "cpu": ("NanoCpus", "CpuQuota", "CpuPeriod", "CpuShares", "CpusetCpus"),
    "memory": ("Memory", "MemorySwap", "MemoryReservation"),
    "pids": ("PidsLimit",),
}
ALL_LIMITS = frozenset(LIMIT_KEYS)

# Substrings of Podman (libpod) errors whose HTTP status does not say what they are.
_CONFLICT_MARKERS = (
    "container state improper",
    "already in use",
    "is already paused",
    "is not paused",
)
_NOT_FOUND_MARKERS = ("no such container", "no such image", "no such volume", "no such network")
_NO_NETWORK_MARKERS = ("slirp4netns failed", "/dev/net/tun")
# The engine has no freezer for this container (rootless, cgroup v1).
_NO_FREEZER_MARKERS = (
    "can not pause containers on rootless",
    "cannot pause",
    "does not have a cgroup",
    "without cgroups",
)


def reclassify(status: int, message: str) -> BoincdError | None:
    """Our error for an engine answer whose status code misleads; None to keep the status."""
    if status < 500:
        return None
    low = message.lower()
    if any(m in low for m in _NO_NETWORK_MARKERS):
        return Conflict(
            f"{message} -- rootless Podman cannot give containers network access on this "
            "host (slirp4netns needs /dev/net/tun): jobs that need the network need a "
            "rootful engine here"
        )
    if any(m in low for m in _NOT_FOUND_MARKERS):
        return NotFound(message)
    if any(m in low for m in _CONFLICT_MARKERS):
        return Conflict(message)
    return None


def cannot_freeze(message: str) -> bool:
    """The engine refused to pause because the container has no freezer cgroup."""
    low = message.lower()
    return any(m in low for m in _NO_FREEZER_MARKERS)


def engine_limits(
    podman: bool, info: Mapping[str, Any], libpod_info: Mapping[str, Any] | None
) -> tuple[frozenset[str], bool]:
    """(controllers whose limits the engine applies, whether it can pause).

    Docker's /info is truthful (MemoryLimit, CpuCfsQuota, PidsLimit). Podman's is
    not, so its /libpod/info `host.cgroupControllers` decides: empty for rootless
    on cgroup v1, the delegated ones for rootless on v2.
    """
    cgroup_v1 = str(info.get("CgroupVersion", "")) == "1"
    rootless = "rootless" in " ".join(str(o) for o in info.get("SecurityOptions") or [])
    if podman and libpod_info is not None:
        host = libpod_info.get("host") or {}
        controllers = {str(c) for c in host.get("cgroupControllers") or []}
        rootless = rootless or bool((host.get("security") or {}).get("rootless"))
        limits = frozenset(c for c in ALL_LIMITS if c in controllers)
        freezer = "freezer" in controllers if cgroup_v1 else bool(controllers) or not rootless
        return limits, freezer
    flags = {
        "cpu": info.get("CpuCfsQuota", True),
        "memory": info.get("MemoryLimit", True),
        "pids": info.get("PidsLimit", True),
    }
    limits = frozenset(c for c, ok in flags.items() if ok)
    return limits, not (rootless and cgroup_v1)


def fit_limits(config: dict[str, Any], limits: frozenset[str]) -> list[str]:
    """Remove from a create body the limits the engine cannot apply; the controllers
    whose limits were asked for and removed (an engine would drop them silently)."""
    host_config = config.get("HostConfig") or {}
    dropped = []
    for controller, keys in LIMIT_KEYS.items():
        if controller in limits:
            continue
        asked = [k for k in keys if host_config.get(k)]
        for key in asked:
            del host_config[key]
        if asked:
            dropped.append(controller)
    return dropped


def limits_warning(dropped: list[str], engine: str, memory_watched: bool) -> str:
    """What a volunteer and the project read in stderr.txt about limits not applied."""
    names = [{"cpu": "CPU", "memory": "memory", "pids": "process count"}[d] for d in dropped]
    what = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    text = (
        f"{engine} cannot limit this task's {what} here (the container has no cgroup "
        "of its own: rootless on cgroup v1, or a controller not delegated)"
    )
    if "cpu" in dropped:
        text += "; the task may use more CPU than BOINC gave it"
    if "memory" in dropped and memory_watched:
        text += "; boincd-containers watches its memory and stops it above BOINC's bound"
    return text + ". `boincd-containers ctl doctor` tells how to fix this."


# Podman's names for event actions whose Docker names the daemon follows.
_EVENT_ACTIONS = {
    ("container", "remove"): "destroy",
    ("image", "loadfromarchive"): "load",
}


def normalize_event(event: dict[str, Any]) -> dict[str, Any]:
    """Docker's action names on Podman's events (container "remove" is "destroy")."""
    action = _EVENT_ACTIONS.get((str(event.get("Type")), str(event.get("Action"))))
    if action is not None:
        event["Action"] = event["status"] = action
    return event


IdMap = tuple[tuple[int, int, int], ...]  # (container_id, host_id, size) ranges


def id_maps(libpod_info: Mapping[str, Any] | None) -> tuple[IdMap, IdMap]:
    """Rootless Podman's user namespace maps (uid, gid); empty when it has none."""
    mappings = ((libpod_info or {}).get("host") or {}).get("idMappings") or {}

    def ranges(key: str) -> IdMap:
        return tuple(
            (int(r["container_id"]), int(r["host_id"]), int(r["size"]))
            for r in mappings.get(key) or []
        )

    return ranges("uidmap"), ranges("gidmap")


def to_container_id(host_id: int, id_map: IdMap) -> int | None:
    """The id inside the engine's user namespace that is `host_id` on the host."""
    for container_id, start, size in id_map:
        if start <= host_id < start + size:
            return container_id + host_id - start
    return None


def map_user(user: str, uid_map: IdMap, gid_map: IdMap) -> str:
    """Config.User "uid:gid" in host ids → the same owner inside a rootless engine's
    namespace, where the engine's own user is root: a slot owned by that user must
    be written by in-container root (with every capability dropped, still only
    that unprivileged user on the host)."""
    uid_text, _, gid_text = user.partition(":")
    if not uid_text.isdigit() or not uid_map:
        return user  # a name, or no namespace: the engine resolves it itself
    uid = to_container_id(int(uid_text), uid_map)
    gid = to_container_id(int(gid_text), gid_map) if gid_text.isdigit() else None
    if uid is None or (gid_text.isdigit() and gid is None):
        owner = f"{uid_text}:{gid_text}" if gid_text else uid_text
        raise Conflict(
            f"the slot dir belongs to {owner}, which this rootless engine cannot map into "
            "its containers (only its own user and its /etc/subuid range): run the BOINC "
            "client as the engine's user, or use a rootful engine"
        )
    return f"{uid}:{gid}" if gid is not None else str(uid)


def adapt_create(
    config: dict[str, Any],
    engine: str,
    limits: frozenset[str],
    uid_map: IdMap,
    gid_map: IdMap,
) -> None:
    """Fit a create body to the engine: the slot owner mapped into a rootless
    engine's namespace, limits it cannot apply removed and named in labels."""
    if uid_map and config.get("User"):
        config["User"] = map_user(str(config["User"]), uid_map, gid_map)
    dropped = fit_limits(config, limits)
    if dropped:
        labels = config.setdefault("Labels", {})
        labels[L.UNENFORCED] = ",".join(dropped)
        labels[L.WARNINGS] = limits_warning(dropped, engine, memory_watched=True)


def adapt_log_config(config: dict[str, Any], podman: bool) -> None:
    """Podman's log options for Docker's: its one file (truncated when full, never
    rotated) may hold what Docker's `max-file` files of `max-size` would, so that
    a task's log has the same ceiling on both engines."""
    log_config = (config.get("HostConfig") or {}).get("LogConfig")
    if not podman or not isinstance(log_config, dict):
        return
    options = dict(log_config.get("Config") or {})
    size, files = options.pop("max-size", None), options.pop("max-file", None)
    if log_config.get("Type") == "json-file":
        log_config["Type"] = "k8s-file"  # what Podman writes for json-file anyway
    if size is not None and str(size).isdigit():
        count = int(files) if files is not None and str(files).isdigit() else 1
        options["max-size"] = str(int(size) * max(count, 1))
    log_config["Config"] = options
