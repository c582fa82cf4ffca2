"""What doctor names and suggests: whose socket a path is, and commands this host has
(systemctl only where systemd runs, launchctl on macOS, sudo only where it exists)."""

from __future__ import annotations

import os
import stat as stat_module
import sys
from pathlib import Path

from boincd_containers.cli.hostprobe import EngineKind, HostFacts, HostProbe

# As boincd_containers.cli.install writes them (install imports the doctor: no import back).
UNIT = "boincd-containers.service"
ROOTLESS_UNIT = "boincd-containers-rootless.service"
PLIST = "/Library/LaunchDaemons/org.boinc.containers.plist"
LAUNCHD_LABEL = "system/org.boinc.containers"
DEFAULT_SOCKET = "/run/boincd-containers/boincd.sock"
_RUN_DAEMON = Path(__file__).resolve().parents[1] / "scripts" / "run-daemon.sh"


# -- names and commands ----------------------------------------------------------------------


def engine_place(url: str | None, kind: EngineKind | None = None, source: str | None = None) -> str:
    """'Docker's socket /var/run/docker.sock (DOCKER_HOST)': whose socket, and why there."""
    if not url:
        return "the usual engine sockets"
    path = url.removeprefix("unix://")
    if kind == "podman" or (kind is None and "podman" in path):
        owner = "rootless Podman's" if path.startswith("/run/user/") else "Podman's"
    elif kind == "docker" or (kind is None and path.endswith("docker.sock")):
        owner = "Docker's"
    else:
        owner = "the engine's"
    # tcp://, ssh://: an endpoint, not a socket file.
    text = f"{owner} endpoint {path}" if "://" in path else f"{owner} socket {path}"
    return f"{text} ({source})" if source else text


def permission_denied(error: str | None) -> bool:
    low = (error or "").lower()
    return "permission denied" in low or "errno 13" in low or "eacces" in low


def daemon_place(socket: str) -> str:
    return f"boincd-containers' socket {socket}"


def same_host(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    return a.removeprefix("unix://").rstrip("/") == b.removeprefix("unix://").rstrip("/")


def as_root(probe: HostProbe, command: str) -> str:
    """`command` as this user can run it as root: sudo only where there is one."""
    if probe.uid == 0:
        return f"`{command}`"
    if probe.which("sudo"):
        return f"`sudo {command}`"
    return f"as root: `{command}`"


def _serve_command(probe: HostProbe, socket: str) -> str:
    exe = probe.which("boincd-containers") or f"{sys.executable} -m boincd_containers"
    flag = f" --socket {socket}" if socket != DEFAULT_SOCKET else ""
    return f"{exe} serve{flag}"


def start_daemon_advice(probe: HostProbe, host: HostFacts, socket: str) -> str:
    """How to start the daemon here, with a command this host has."""
    elsewhere = (
        f" Or, if the daemon serves another socket, point doctor at it (`--socket PATH` "
        f"or BOINCD_SOCKET; this run looked at {socket})."
        if socket != DEFAULT_SOCKET
        else ""
    )
    if probe.system == "Darwin":
        if probe.exists(PLIST):
            how = as_root(probe, f"launchctl bootstrap system {PLIST}")
        else:
            how = as_root(probe, "boincd-containers install") + " (it loads the LaunchDaemon)"
        return f"Start it: {how}." + elsewhere
    if host.systemd:
        units = [u for u in (UNIT, ROOTLESS_UNIT) if probe.exists(f"etc/systemd/system/{u}")]
        if units:
            name = units[0].removesuffix(".service")
            return (
                f"Start it: {as_root(probe, f'systemctl enable --now {name}')}; "
                f"`journalctl -u {name}` says why it stopped." + elsewhere
            )
        return (
            f"Install the service: {as_root(probe, 'boincd-containers install')}, then "
            f"{as_root(probe, 'systemctl enable --now boincd-containers')}." + elsewhere
        )
    how = (
        f"Start it: {as_root(probe, _serve_command(probe, socket))} (it stays in the "
        "foreground; there is no systemd here, so have your init system start it at boot)"
    )
    if _RUN_DAEMON.is_file():
        script = str(_RUN_DAEMON) + (f" --socket {socket}" if socket != DEFAULT_SOCKET else "")
        how += f", or from the source checkout {as_root(probe, script)}"
    return how + "." + elsewhere


def restart_daemon_advice(probe: HostProbe, host: HostFacts) -> str:
    if probe.system == "Darwin":
        return as_root(probe, f"launchctl kickstart -k {LAUNCHD_LABEL}")
    if host.systemd:
        return as_root(probe, "systemctl restart boincd-containers")
    return "stop `boincd-containers serve` and start it again"


def start_engine_advice(probe: HostProbe, host: HostFacts) -> str:
    """How to start (or get) an engine on this host."""
    user = probe.boinc_user
    if probe.system == "Darwin":
        return "Start Docker Desktop, or `podman machine start`."
    if host.systemd:
        if host.docker_cli:
            return f"Start the engine: {as_root(probe, 'systemctl enable --now docker')}"
        if host.podman_cli:
            return (
                f"Start the engine: {as_root(probe, 'systemctl enable --now podman.socket')}, "
                f"or for rootless Podman as {user}: `loginctl enable-linger {user}` and "
                "`systemctl --user enable --now podman.socket`"
            )
    elif host.docker_cli or host.podman_cli:
        if host.docker_cli and probe.exists("etc/init.d/docker") and probe.which("service"):
            how = as_root(probe, "service docker start")
        elif host.docker_cli:
            how = as_root(probe, "dockerd &")
        else:
            how = as_root(probe, "podman system service --time=0 unix:///run/podman/podman.sock &")
        return f"Start the engine: {how} (no systemd here: start it at boot from your init system)"
    for tool, command in (("apt-get", "apt-get install podman"), ("dnf", "dnf install podman")):
        if probe.which(tool):
            return f"Install an engine: {as_root(probe, command)} (or Docker), then start it."
    return "Install an engine (Podman or Docker) from your distribution, then start it."


# -- who may open a socket ------------------------------------------------------------------


def user_ids(probe: HostProbe, user: str) -> tuple[int, set[int]] | None:
    """(uid, every gid) of a user on the probed host; None when it has no such user."""
    entry = probe.output("getent", "passwd", user)
    fields = entry.split(":") if entry else []
    if len(fields) < 4 or not fields[2].isdigit():
        return None
    groups = {int(g) for g in (probe.output("id", "-G", user) or "").split() if g.isdigit()}
    return int(fields[2]), groups | ({int(fields[3])} if fields[3].isdigit() else set())


def _allows(st: os.stat_result, uid: int, gids: set[int], bits: tuple[int, int, int]) -> bool:
    owner, group, other = bits
    if st.st_uid == uid:
        return bool(st.st_mode & owner)
    if st.st_gid in gids:
        return bool(st.st_mode & group)
    return bool(st.st_mode & other)


def may_open(probe: HostProbe, user: str, path: str) -> tuple[bool | None, str]:
    """Whether ``user`` may connect to the socket at ``path`` (write on it, search on
    every folder above it), and why; None when the permissions cannot be read."""
    ids = user_ids(probe, user)
    if ids is None:
        return None, f"there is no user {user}"
    uid, gids = ids
    if uid == 0:
        return True, f"{user} is root"
    try:
        st = probe.stat(probe.path(path))
        for folder in Path(path).parents:
            if not _allows(probe.stat(probe.path(str(folder))), uid, gids, (0o100, 0o010, 0o001)):
                return False, f"{user} may not enter {folder}"
    except OSError as exc:
        return None, f"cannot read the permissions of {path}: {exc.strerror}"
    if not _allows(st, uid, gids, (0o200, 0o020, 0o002)):
        mode = stat_module.filemode(st.st_mode)
        group = group_name(probe, st.st_gid)
        return False, f"{path} is {mode} with group {group}, and {user} is not in it"
    return True, f"{user} may open {path}"


def group_name(probe: HostProbe, gid: int) -> str:
    return (probe.output("getent", "group", str(gid)) or str(gid)).split(":")[0]
