"""Platform checks for ``boincd-containers ctl doctor``: what stops tasks, and what to do.

Everything the checks look at comes through a :class:`HostProbe` (a filesystem root
for /proc, /sys and /etc, a command runner, the environment), and the engine's
state through :class:`EngineFacts` filled by the caller, so every situation a
volunteer may be in can be reproduced in unit tests on any machine.  The checks
live in :mod:`boincd_containers.cli.doctor_checks`, the probing in
:mod:`boincd_containers.cli.hostprobe`; this module ties them into a report.
"""

from __future__ import annotations

import textwrap
from dataclasses import asdict, dataclass
from typing import Any, Literal

from boincd_containers.cli.doctor_advice import permission_denied
from boincd_containers.cli.doctor_boinc import check_boinc, check_old_names, old_name_containers
from boincd_containers.cli.doctor_checks import (
    NEEDED_CONTROLLERS,
    Check,
    Finding,
    Severity,
    check_access,
    check_cgroups,
    check_disk,
    check_engine,
    check_gpu,
    check_platform,
)
from boincd_containers.cli.doctor_daemon import check_daemon, check_docker_host, check_user_engine
from boincd_containers.cli.hostprobe import (
    BoincClientFacts,
    CommandResult,
    DaemonFacts,
    EngineFacts,
    HostFacts,
    HostProbe,
    LabelledContainer,
    Runner,
    gather,
    run_command,
)

__all__ = [
    "CommandResult",
    "DaemonFacts",
    "DoctorReport",
    "EngineFacts",
    "Finding",
    "HostProbe",
    "Recommendation",
    "Runner",
    "Severity",
    "recommend",
    "run_command",
    "run_doctor",
]

# Checks that need no engine; the installer runs these alone.
HOST_CHECKS: tuple[Check, ...] = (
    check_platform,
    check_cgroups,
    check_gpu,
    check_disk,
    check_boinc,
)

Runtime = Literal["native-docker", "rootless-podman", "wsl2", "vm-apps", "docker-desktop"]


@dataclass(frozen=True)
class Recommendation:
    runtime: Runtime
    reason: str


@dataclass(frozen=True)
class DoctorReport:
    findings: tuple[Finding, ...]
    recommendation: Recommendation
    boinc: BoincClientFacts | None = None
    # Our containers still named boinc__…; None when they were not listed.
    old_names: tuple[LabelledContainer, ...] | None = None
    # What boincd-containers' socket said; None when it was not asked (the installer).
    daemon: DaemonFacts | None = None
    user: tuple[int, str] | None = None  # doctor's own uid and name

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    @property
    def tasks_can_run(self) -> bool | None:
        """The verdict: None when doctor could not ask the daemon and found no blocker."""
        if not self.ok:
            return False
        if self.daemon is not None and not self.daemon.answered:
            return None
        return True

    def exit_code(self) -> int:
        # Every error-severity finding means tasks cannot run; warnings do not.
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "findings": [asdict(f) for f in self.findings],
            "recommendation": asdict(self.recommendation),
            # What was found of the local BOINC client, for scripts; None: no such probe.
            "boinc_client": (
                {**asdict(self.boinc), "version": self.boinc.version} if self.boinc else None
            ),
            "old_name_containers": (
                [asdict(c) for c in self.old_names] if self.old_names is not None else None
            ),
            # Added later; `ok` keeps its meaning (no error finding).
            "tasks_can_run": self.tasks_can_run,
            "daemon": asdict(self.daemon) if self.daemon is not None else None,
            "user": {"uid": self.user[0], "name": self.user[1]} if self.user else None,
        }

    def render_text(self, width: int = 88) -> str:
        marks = {"ok": "[ ok ]", "info": "[info]", "warning": "[warn]", "error": "[FAIL]"}
        lines = ["boincd-containers doctor", ""]
        indent = " " * 7  # lines up with the text after the severity mark
        for f in self.findings:
            lines += textwrap.wrap(
                f"{marks[f.severity]} {f.title}  ({f.id})", width, subsequent_indent=indent
            )
            if f.detail:
                lines += textwrap.wrap(
                    f.detail, width, initial_indent=indent, subsequent_indent=indent
                )
            if f.fix:
                lines += textwrap.wrap(
                    f"fix: {f.fix}",
                    width,
                    initial_indent=indent,
                    subsequent_indent=indent + "     ",
                )
        counts = {s: sum(f.severity == s for f in self.findings) for s in ("error", "warning")}
        rec = self.recommendation
        lines += [
            "",
            f"Recommended runtime: {_RUNTIME_NAMES[rec.runtime]}",
            *textwrap.wrap(rec.reason, width, initial_indent="  ", subsequent_indent="  "),
            "",
            f"{counts['error']} error(s), {counts['warning']} warning(s): "
            + {
                True: "tasks can run.",
                False: "tasks cannot run until the errors are fixed.",
                None: "doctor could not ask the daemon whether tasks can run.",
            }[self.tasks_can_run],
        ]
        return "\n".join(lines) + "\n"


_RUNTIME_NAMES: dict[Runtime, str] = {
    "native-docker": "a rootful engine (Docker) on this host",
    "rootless-podman": "rootless Podman for the BOINC user",
    "wsl2": "containers inside WSL2",
    "vm-apps": "VirtualBox VM apps (no containers)",
    "docker-desktop": "Docker Desktop or a Podman machine",
}


def recommend(probe: HostProbe, host: HostFacts, engine: EngineFacts | None) -> Recommendation:
    if probe.system == "Darwin":
        return Recommendation(
            "docker-desktop",
            "macOS has no Linux kernel: Docker Desktop or a Podman machine runs one in a VM; "
            "the daemon reaches it at /var/run/docker.sock.",
        )
    if host.wsl == 1:
        return Recommendation("wsl2", "Convert this distro to WSL2; WSL 1 cannot run containers.")
    if host.wsl == 2 or probe.system == "Windows":
        where = "in this WSL2 distro" if host.wsl == 2 else "inside a WSL2 distro"
        extra = " VirtualBox VM apps suffer under Hyper-V here." if host.vbox is not None else ""
        return Recommendation(
            "wsl2", f"On Windows, run the engine and boincd-containers {where}." + extra
        )
    reachable = engine is not None and engine.reachable
    podman = host.podman_cli or bool(engine and engine.kind == "podman")
    limits_ok = host.cgroup == "v2" and all(c in host.controllers for c in NEEDED_CONTROLLERS)
    if reachable and engine is not None and engine.rootless and engine.kind == "podman":
        return Recommendation("rootless-podman", "Already rootless Podman: keep it.")
    if podman and limits_ok and host.systemd:
        return Recommendation(
            "rootless-podman",
            "cgroup v2 with systemd can delegate limits to the BOINC user, so rootless Podman "
            "gives full limits without a root-equivalent engine socket "
            "(boincd-containers-rootless.service).",
        )
    if reachable or host.docker_cli or host.podman_cli:
        how = "boincd-containers.service" if host.systemd else "`boincd-containers serve`"
        return Recommendation(
            "native-docker",
            f"Rootful engine with {how} as root: all limits apply"
            + (" on cgroup v1." if host.cgroup == "v1" else "."),
        )
    if host.vbox is not None:
        return Recommendation(
            "vm-apps",
            "No container engine here, and VirtualBox works: keep VM apps, or install Podman "
            "to run container apps at near-native speed.",
        )
    return Recommendation(
        "rootless-podman" if limits_ok and host.systemd else "native-docker",
        "No container engine yet: install "
        + ("podman for the BOINC user." if limits_ok and host.systemd else "docker.io."),
    )


def run_doctor(
    probe: HostProbe,
    engine: EngineFacts | None,
    daemon: DaemonFacts | None = None,
    user_engine: EngineFacts | None = None,
) -> DoctorReport:
    """All checks, the daemon's side first, then what this user can do, then the host.

    ``engine``: the engine as the daemon sees it, or (``seen_by="user"``) as this user
    does when no daemon answered; None skips the engine checks (the installer's use).
    ``daemon``: what its socket said; None skips the daemon checks. ``user_engine``:
    this user's own probe of the daemon's engine.
    """
    host = gather(probe)
    findings: list[Finding] = []
    if daemon is not None:
        findings += check_daemon(probe, host, daemon)
    if engine is not None:
        findings += check_engine(probe, host, engine)
        findings += check_docker_host(probe, engine)
    mine = user_engine
    if mine is None and engine is not None and engine.seen_by == "user":
        # No daemon, and this user may not open the engine's socket: a fact about the
        # user, not about whether a root daemon could (check_engine stays silent on it).
        denied = not engine.reachable and permission_denied(engine.error)
        mine = engine if denied and probe.uid != 0 else None
    if mine is not None:
        findings += check_user_engine(probe, engine, mine)
    if engine is not None:
        findings += check_access(probe, host, engine)
        findings += check_old_names(probe, host, engine)
    for check in HOST_CHECKS:
        findings += check(probe, host, engine)
    old_names = None
    if engine is not None and engine.labelled is not None:
        ours, theirs = old_name_containers(engine)
        old_names = (*ours, *theirs)
    return DoctorReport(
        tuple(findings),
        recommend(probe, host, engine),
        host.boinc,
        old_names,
        daemon,
        (probe.uid, probe.user),
    )
