"""Doctor checks from the daemon's side first: does boincd-containers answer, which
engine does it see, may the BOINC user's shims reach it; then what doctor's own user
can do, kept apart from whether tasks can run.

Tasks run through the daemon (root, or the BOINC user's rootless engine): a volunteer
running doctor as themselves may well have no access to Docker's socket, and that is
as it should be. Only what the daemon sees decides "tasks cannot run".

Advice names commands this host has: systemctl only where systemd runs
(/run/systemd/system), launchctl on macOS, else ``boincd-containers serve`` itself.
"""

from __future__ import annotations

from boincd_containers.cli.doctor_advice import (
    as_root,
    daemon_place,
    engine_place,
    group_name,
    may_open,
    same_host,
    start_daemon_advice,
)
from boincd_containers.cli.doctor_checks import Finding
from boincd_containers.cli.hostprobe import DaemonFacts, EngineFacts, HostFacts, HostProbe

# -- the checks ------------------------------------------------------------------------------


def check_daemon(probe: HostProbe, host: HostFacts, daemon: DaemonFacts) -> list[Finding]:
    place = daemon_place(daemon.socket)
    me = f"{probe.user} (uid {probe.uid})"
    if daemon.permission_denied:
        group = _socket_group(probe, daemon.socket)
        join = (
            f", or as a member of its group {group} (`usermod -aG {group} {probe.user}`, "
            "then log in again)"
            if group and group != "root"
            else ""
        )
        if probe.user == probe.boinc_user:
            # This user's shims are the ones that must get in.
            return [
                Finding(
                    "daemon.permission",
                    "error",
                    f"Tasks cannot run: the BOINC user {probe.user} may not open {place}",
                    f"{_sentence(daemon.error)}. Every shim BOINC starts talks to the daemon "
                    "there.",
                    "Set `socket_group` in the daemon's config to a group of "
                    f"{probe.user} and restart the daemon.",
                )
            ]
        return [
            Finding(
                "daemon.permission",
                "warning",
                f"This user, {me}, may not open {place}: doctor cannot ask the daemon",
                f"{_sentence(daemon.error)}. Whether tasks can run is the daemon's side of "
                "things; what "
                "follows is only what this user sees.",
                f"Run {as_root(probe, 'boincd-containers ctl doctor')}" + join + ".",
            )
        ]
    if not daemon.answered:
        return [
            Finding(
                "daemon.reachable",
                "error",
                f"Tasks cannot run: no daemon on {place}",
                f"{_sentence(daemon.error)}. The shims BOINC starts ask the daemon for every "
                "container.",
                start_daemon_advice(probe, host, daemon.socket),
            )
        ]
    ident = f"instance {daemon.instance_id[:12]}" if daemon.instance_id else "instance unknown"
    findings = [
        Finding(
            "daemon.reachable",
            "ok",
            f"boincd-containers {daemon.version or '(version unknown)'} answers on {place}",
            f"Its {ident}; the engine checks below are what it sees.",
        )
    ]
    if daemon.may_change is True:
        findings.append(
            Finding("daemon.access", "ok", f"This user, {me}, may read and change things")
        )
    elif daemon.may_change is False:
        findings.append(
            Finding(
                "daemon.access",
                "info",
                f"This user, {me}, may read but not change things (ctl gc, tasks)",
                (daemon.access_detail or "The daemon said so.")
                + ". Reading (ctl status, tasks, images, gc --dry-run, doctor) works.",
                f"Change things as root or as {probe.boinc_user}, e.g. "
                f"{as_root(probe, 'boincd-containers ctl gc')}.",
            )
        )
    findings += _boinc_socket(probe, daemon)
    return findings


def _sentence(text: str | None) -> str:
    text = (text or "no answer").rstrip(".")
    return text[:1].upper() + text[1:]


def _socket_group(probe: HostProbe, socket: str) -> str | None:
    try:
        return group_name(probe, probe.stat(probe.path(socket)).st_gid)
    except OSError:
        return None


def _boinc_socket(probe: HostProbe, daemon: DaemonFacts) -> list[Finding]:
    """The BOINC user's shims must open the daemon's socket, or no task gets a container."""
    user = probe.boinc_user
    ok, why = may_open(probe, user, daemon.socket)
    if ok is None:
        return []  # no such user (boinc.user says so), or permissions we cannot read
    place = daemon_place(daemon.socket)
    if ok:
        return [Finding("daemon.boinc_socket", "ok", f"The BOINC user {user} may open {place}")]
    return [
        Finding(
            "daemon.boinc_socket",
            "error",
            f"Tasks cannot run: the BOINC user {user} may not open {place}",
            f"{why}. The shim BOINC starts for each task runs as {user} and asks the daemon "
            "there for its container.",
            f"Set `socket_group` in the daemon's config to a group of {user} (the installer "
            "sets it up), restart the daemon, and let every folder above the socket be "
            "searchable by that group.",
        )
    ]


def check_docker_host(probe: HostProbe, engine: EngineFacts) -> list[Finding]:
    """DOCKER_HOST in doctor's environment is not the daemon's: say when they differ."""
    mine = probe.env.get("DOCKER_HOST")
    if not mine or engine.seen_by != "daemon" or not engine.socket:
        return []
    if same_host(mine, engine.socket):
        return []
    return [
        Finding(
            "engine.docker_host",
            "info",
            f"DOCKER_HOST here is {mine}; the daemon uses "
            f"{engine_place(engine.socket, engine.kind, engine.host_source)}",
            "DOCKER_HOST in this shell steers docker commands and doctor's own probes, not "
            "the daemon: it reads `docker_host` from its config file (or its own "
            "environment).",
            "If tasks should use that engine, set `docker_host` in the daemon's config and "
            "restart it.",
        )
    ]


def check_user_engine(
    probe: HostProbe, daemon_engine: EngineFacts | None, mine: EngineFacts
) -> list[Finding]:
    """What this user can do with the engine: information, never a verdict on tasks."""
    me = f"{probe.user} (uid {probe.uid})"
    place = engine_place(mine.socket, mine.kind, mine.host_source)
    daemon_reaches = bool(
        daemon_engine is not None and daemon_engine.seen_by == "daemon" and daemon_engine.reachable
    )
    if mine.reachable:
        if probe.uid == 0:
            return [Finding("user.engine", "ok", f"This user, {me}, can use {place} too")]
        detail = (
            "A rootless engine's socket gives this user's own containers."
            if mine.rootless
            else "Whoever may use a rootful engine's socket is root-equivalent on this host."
        )
        return [
            Finding("user.engine", "info", f"This user, {me}, can use {place} directly", detail)
        ]
    cause = mine.error or "no answer"
    if daemon_reaches:
        tail = (
            "That does not stop tasks: they reach the engine through the daemon, which "
            "does. Only doctor's list of containers under old names needs direct access; "
            "run doctor as root for it."
        )
    else:
        tail = (
            "Tasks never need this user to: they reach the engine through the daemon. "
            "Whether the daemon can, only the daemon can tell: run doctor as root, or "
            "as a user who may open its socket."
        )
    return [
        Finding(
            "user.engine",
            "info",
            f"This user, {me}, cannot open {place}",
            f"{_sentence(cause)}. {tail}",
        )
    ]
