"""Doctor checks about the BOINC client next to us: its version, its start-up container
cleanup, and our containers that cleanup would remove.

Facts from BOINC's source (client/cs_apps.cpp ``docker_cleanup``, client/client_state.cpp,
client/hostinfo_unix.cpp): at every start a client 8.2.0 or later probes ``podman``, then
``docker`` (``<cli> --version``, then ``<cli> run --rm hello-world`` must print "Hello"),
as its own user; if that works it runs ``<cli> ps --all`` and ``rm -f``s every container
whose name starts with ``boinc__`` that is not a started task of its own with a "docker"
plan class, then ``image rm``s such images. From 8.2.11 ``allow_multiple_clients`` skips
the cleanup; before that nothing does. That option also drops the client's lock on its
data dir (client/main.cpp) and makes project servers keep a host record per client
(sched/handle_request.cpp), so it is not advice to give lightly.
"""

from __future__ import annotations

import re

from boincd_containers.cli.doctor_advice import restart_daemon_advice, user_ids
from boincd_containers.cli.doctor_checks import Finding
from boincd_containers.cli.hostprobe import (
    BoincClient,
    BoincClientFacts,
    EngineFacts,
    HostFacts,
    HostProbe,
    LabelledContainer,
    release_tuple,
)
from boincd_containers.core import labels as L

OLD_NAME_PREFIX = L.LEGACY_NAME_PREFIX  # our old task container names; 8.2 clients own it
NEW_NAME_PREFIX = L.NAME_PREFIX
CLEANUP_FROM = (8, 2, 0)
CLEANUP_SWITCH_FROM = (8, 2, 11)  # allow_multiple_clients turns the cleanup off from here
MAX_LISTED = 10


def _cleans_up(client: BoincClient) -> bool:
    """Whether this client runs the cleanup at its next start."""
    version = release_tuple(client.version)
    if version is None or version < CLEANUP_FROM:
        return False
    return version < CLEANUP_SWITCH_FROM or not client.allow_multiple_clients


def _clients(boinc: BoincClientFacts) -> tuple[BoincClient, ...]:
    """The clients found, or the one client_state.xml remembers when no program was found."""
    if boinc.clients or boinc.state_version is None:
        return boinc.clients
    return (BoincClient("", boinc.state_version, "client_state.xml", boinc.data_dir),)


def _describe(client: BoincClient) -> str:
    if client.source == "client_state.xml":
        return f"{client.version} last ran in {client.data_dir}"
    version = client.version or "(version unknown)"
    where = f", data dir {client.data_dir}" if client.data_dir else ""
    return f"{version} at {client.path} ({client.source}{where})"


def boinc_reaches_engine(
    probe: HostProbe, boinc: BoincClientFacts, engine: EngineFacts | None
) -> tuple[bool | None, str]:
    """Whether the BOINC user's own docker/podman commands act on the engine we use, and why.

    None when it cannot be told (no engine facts, a socket we cannot stat).
    """
    user = probe.boinc_user
    if engine is None or not engine.reachable or not engine.socket:
        return None, "the engine in use is not known"
    ids = user_ids(probe, user)
    if ids is None:
        return False, f"there is no user {user}"
    uid, gids = ids
    if uid == 0:
        return True, f"{user} is root"
    m = re.match(r"(?:unix://)?/run/user/(\d+)/", engine.socket)
    own = engine.rootless and m is not None and int(m.group(1)) == uid
    if own:
        return True, f"the engine is {user}'s own rootless {engine.kind or 'engine'}"
    if engine.rootless:
        return False, "the engine is another user's rootless one"
    if boinc.state_engine == "podman":
        # As a plain user the podman CLI works on that user's own rootless store.
        return False, f"its last start used {user}'s own rootless Podman, not this engine"
    try:
        st = probe.stat(probe.path(engine.socket))
    except OSError:
        return None, f"cannot read the permissions of {engine.socket}"
    if st.st_uid == uid:
        ok, how = bool(st.st_mode & 0o200), f"{user} owns {engine.socket}"
    elif st.st_gid in gids:
        group = (probe.output("getent", "group", str(st.st_gid)) or str(st.st_gid)).split(":")[0]
        ok, how = bool(st.st_mode & 0o020), f"{user} is in group {group} of {engine.socket}"
    else:
        ok, how = bool(st.st_mode & 0o002), f"{engine.socket} is open to all users"
    if ok:
        return True, how
    return False, f"{user} may not open {engine.socket}"


def _reach(
    probe: HostProbe,
    boinc: BoincClientFacts,
    clients: list[BoincClient],
    engine: EngineFacts | None,
) -> tuple[bool | None, str]:
    # A client started by hand as root: its `docker` CLI reaches the rootful engine.
    as_root = [c for c in clients if c.uid == 0]
    if as_root and engine is not None and engine.reachable and not engine.rootless:
        pid = as_root[0].source.removeprefix("running, ")
        return True, f"the client {as_root[0].path} ({pid}) runs as root"
    return boinc_reaches_engine(probe, boinc, engine)


def check_boinc(probe: HostProbe, host: HostFacts, engine: EngineFacts | None) -> list[Finding]:
    boinc = host.boinc
    clients = _clients(boinc)
    findings = []
    if not clients:
        findings.append(
            Finding(
                "boinc.client",
                "warning",
                "BOINC client not found",
                "The daemon serves the shims a BOINC client starts; without a client there "
                "are no tasks.",
                "`apt install boinc-client` (in this distro when inside WSL2).",
            )
        )
    else:
        main = next((c for c in clients if c.version), clients[0])
        others = [c for c in clients if c is not main]
        detail = f"Found {_describe(main)}."
        if others:
            detail += " Also: " + "; ".join(_describe(c) for c in others) + "."
        if boinc.state_version and boinc.state_version != main.version:
            detail += (
                f" client_state.xml in {boinc.data_dir} was last written by {boinc.state_version}."
            )
        title = f"BOINC client {main.version or '(version unknown)'}"
        findings.append(Finding("boinc.client", "ok", title, detail))
        findings += _cleanup(probe, boinc, clients, engine)
    if probe.output("getent", "passwd", probe.boinc_user) is None:
        findings.append(
            Finding(
                "boinc.user",
                "warning",
                f"No user {probe.boinc_user}",
                "The service gives the socket to the BOINC user's group.",
                "Install boinc-client (it creates the user), or set the user the client runs as "
                "(`boinc_user` in the daemon's config).",
            )
        )
    return findings


def _cleanup(
    probe: HostProbe,
    boinc: BoincClientFacts,
    clients: tuple[BoincClient, ...],
    engine: EngineFacts | None,
) -> list[Finding]:
    user = probe.boinc_user
    versions = [(c, release_tuple(c.version) or (0, 0, 0)) for c in clients]
    stuck = [c for c, v in versions if CLEANUP_FROM <= v < CLEANUP_SWITCH_FROM]
    newer = [c for c, v in versions if v >= CLEANUP_SWITCH_FROM]
    if not stuck and not newer:
        return []
    reach, why = _reach(probe, boinc, stuck or newer, engine)
    can: dict[bool | None, str] = {
        True: f"It can use the engine boincd-containers uses ({why}).",
        False: f"It cannot use the engine boincd-containers uses ({why}).",
        None: f"Whether it can use the engine boincd-containers uses is unknown: {why}.",
    }
    if boinc.state_engine:
        found = f"Its last start found {boinc.state_engine} {boinc.state_engine_version}."
    else:
        found = ""
    what = (
        f"At each start it runs `docker|podman ps --all` as user {user} and `rm -f`s every "
        f"container whose name starts with {OLD_NAME_PREFIX} that is not one of its own "
        'started tasks with a "docker" plan class, then `image rm`s such images '
        "(client/cs_apps.cpp docker_cleanup), once `run --rm hello-world` works for it."
    )
    safe = (
        f"boincd-containers names its containers and images {NEW_NAME_PREFIX}…, which this "
        "cleanup never touches; it removes only our containers still under the old name "
        f"(containers.old_name) and other {OLD_NAME_PREFIX} containers on this engine."
    )
    detail = " ".join(part for part in (what, can[reach], found, safe) if part)
    if stuck:
        title = (
            f"BOINC client {stuck[0].version} removes {OLD_NAME_PREFIX} containers at every start"
        )
        if not reach:
            return [Finding("boinc.docker_cleanup", "info", title, detail)]
        return [
            Finding(
                "boinc.docker_cleanup",
                "warning",
                title + "; 8.2.0 to 8.2.10 cannot turn that off",
                detail,
                "Upgrade the BOINC client to 8.2.11 or later. There `allow_multiple_clients` "
                "(in cc_config.xml `<options>`, or `--allow_multiple_clients`) turns the "
                "cleanup off; boincd-containers does not need it, and it also drops the "
                "client's lock on its data dir and makes projects keep a separate host "
                f"record for it, so set it only to keep other {OLD_NAME_PREFIX} containers. "
                "Meanwhile let boincd-containers start before the client (its service does).",
            )
        ]
    on = [c for c in newer if not c.allow_multiple_clients]
    if not on:
        return [
            Finding(
                "boinc.docker_cleanup",
                "info",
                f"BOINC client {newer[0].version}: start-up container cleanup off "
                "(allow_multiple_clients)",
            )
        ]
    return [
        Finding(
            "boinc.docker_cleanup",
            "info",
            f"BOINC client {on[0].version} removes unused {OLD_NAME_PREFIX} containers at "
            "each start",
            detail + " `allow_multiple_clients` would turn it off; boincd-containers does not "
            "need that.",
        )
    ]


def old_name_containers(
    engine: EngineFacts,
) -> tuple[list[LabelledContainer], list[LabelledContainer]]:
    """Labelled containers named boinc__…: this instance's (all, when its id is unknown),
    and other instances'."""
    old = [c for c in engine.labelled or () if c.name.startswith(OLD_NAME_PREFIX)]
    mine = engine.instance_id
    ours = [c for c in old if mine is None or c.owner == mine]
    return ours, [c for c in old if c not in ours]


def check_old_names(probe: HostProbe, host: HostFacts, engine: EngineFacts) -> list[Finding]:
    """Containers of ours still named boinc__…: an 8.2 client's start would remove them."""
    if engine.labelled is None:
        return []
    ours, theirs = old_name_containers(engine)
    mine = engine.instance_id
    if not ours and not theirs:
        return [
            Finding(
                "containers.old_name",
                "ok",
                f"No containers of boincd-containers under the old name {OLD_NAME_PREFIX}…",
            )
        ]
    cleaning = [c for c in _clients(host.boinc) if _cleans_up(c)]
    reach, _ = _reach(probe, host.boinc, cleaning, engine)
    at_risk = bool(cleaning) and reach is not False
    risk = (
        f" BOINC client {cleaning[0].version} here does so at its next start."
        if at_risk
        else " No such client can reach this engine now."
    )
    cli = "podman" if engine.kind == "podman" else "docker"
    findings = []
    if ours:
        whose = "" if mine else " (carrying our owner label; this daemon's instance id is unknown)"
        findings.append(
            Finding(
                "containers.old_name",
                "warning" if at_risk else "info",
                f"{len(ours)} container(s) of boincd-containers still under the old name "
                f"{OLD_NAME_PREFIX}…{whose}",
                f"{_listing(ours)}. boincd-containers adopts them by their labels and renames "
                f"them {NEW_NAME_PREFIX}… when it starts. Until then a BOINC client 8.2 or "
                "later starting without allow_multiple_clients removes them (`rm -f`), and "
                f"their tasks start again from scratch.{risk}",
                "Restart boincd-containers before the BOINC client next starts "
                f"({restart_daemon_advice(probe, host)}; at boot its service starts first).",
            )
        )
    if theirs:
        owners = sorted({c.owner[:12] for c in theirs})
        findings.append(
            Finding(
                "containers.old_name_other",
                "warning" if at_risk else "info",
                f"{len(theirs)} container(s) of another boincd-containers instance under the old "
                f"name {OLD_NAME_PREFIX}…",
                f"{_listing(theirs)}. Their owner label ({', '.join(owners)}) is not this "
                f"daemon's ({(mine or '')[:12]}): it neither adopts nor removes them.{risk}",
                f"Start the daemon that owns them, or when their tasks are gone remove them: "
                f"`{cli} rm -f {theirs[0].name}`.",
            )
        )
    return findings


def _listing(containers: list[LabelledContainer]) -> str:
    shown = [
        f"{c.name} ({c.state}"
        + (f"; task {c.result} of {c.project}" if c.result and c.project else "")
        + ")"
        for c in containers[:MAX_LISTED]
    ]
    more = len(containers) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")
