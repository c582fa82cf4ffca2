"""The individual doctor checks; each returns the findings for one concern."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from boincd_containers.cli.doctor_advice import engine_place, permission_denied, start_engine_advice
from boincd_containers.cli.hostprobe import (
    GIB,
    EngineFacts,
    HostFacts,
    HostProbe,
    safely,
    version_tuple,
)

Severity = Literal["ok", "info", "warning", "error"]

# Controllers the daemon's limits rely on: cpus, memory bound, pids limit.
NEEDED_CONTROLLERS = ("cpu", "memory", "pids")
MIN_DOCKER = (20, 10)  # Engine API 1.41: the oldest the adapter is written against
MIN_PODMAN = (4, 0)  # Podman 3's compat API lacks parts of the events and df endpoints
BOINC_WSL_DISTRO = "boinc-buda-runner"  # the distro BOINC 8's Windows client installs


@dataclass(frozen=True)
class Finding:
    id: str
    severity: Severity
    title: str
    detail: str = ""
    fix: str = ""


def _engine_name(engine: EngineFacts) -> str:
    return {"docker": "Docker", "podman": "Podman", None: "container engine"}[engine.kind]


def check_engine(probe: HostProbe, host: HostFacts, engine: EngineFacts) -> list[Finding]:
    """The engine: as the daemon sees it, or (no daemon) as this user does."""
    name = _engine_name(engine)
    where = engine_place(engine.socket, engine.kind, engine.host_source)
    by_daemon = engine.seen_by == "daemon"
    if not engine.reachable:
        error = engine.error or "no answer"
        if permission_denied(error):
            if not by_daemon and probe.uid != 0:
                # This user's access says nothing of a root daemon's (user.engine says it).
                return []
            return [
                Finding(
                    "engine.permission",
                    "error",
                    f"Tasks cannot run: the daemon may not open {where}"
                    if by_daemon
                    else f"No permission on {where}, even as root",
                    f"Connecting failed: {error}",
                    "Run the daemon as root (boincd-containers.service does), or rootless "
                    "Podman for the BOINC user (boincd-containers-rootless.service). Adding "
                    "the BOINC user to the docker group also works but makes it root-equivalent.",
                )
            ]
        title = (
            f"Tasks cannot run: the daemon reaches no container engine at {where}"
            if by_daemon
            else f"No container engine at {where}"
        )
        fix = start_engine_advice(probe, host)
        if engine.host_source:
            fix += f" Or correct {engine.host_source.split(' in ')[0]}, if it is wrong."
        return [Finding("engine.reachable", "error", title, error, fix)]

    mode = "rootless" if engine.rootless else "rootful"
    whose = "The daemon uses " if by_daemon else ""
    findings = [
        Finding(
            "engine.reachable",
            "ok",
            f"{whose}{name} {engine.version or '(version unknown)'}, {mode}, at {where}",
            ""
            if by_daemon
            else "As this user sees it: no daemon told doctor which engine it uses.",
        )
    ]
    minimum = {"docker": MIN_DOCKER, "podman": MIN_PODMAN}.get(engine.kind or "")
    have = version_tuple(engine.version)
    if minimum and have and have < minimum:
        findings.append(
            Finding(
                "engine.version",
                "warning",
                f"{name} {engine.version} is older than {minimum[0]}.{minimum[1]}",
                "Older engines lack API parts the daemon uses (events, image layers).",
                f"Upgrade {name} from your distribution or the vendor's packages.",
            )
        )
    return findings


def check_access(probe: HostProbe, host: HostFacts, engine: EngineFacts) -> list[Finding]:
    user = probe.boinc_user
    findings: list[Finding] = []
    if engine.reachable and engine.rootless:
        findings.append(
            Finding(
                "security.rootless",
                "ok",
                f"Rootless {_engine_name(engine)}",
                "A container escape lands in an unprivileged user, not root.",
            )
        )
        if engine.kind == "podman":
            missing = [
                f"/etc/{name}"
                for name in ("subuid", "subgid")
                if not any(
                    line.split(":")[0] == user for line in (probe.read(f"etc/{name}") or "").split()
                )
            ]
            if missing:
                findings.append(
                    Finding(
                        "security.subuid",
                        "warning",
                        f"No subordinate ID range for {user} in {' and '.join(missing)}",
                        "Rootless Podman maps image files owned by other users through "
                        "these ranges; images with such files fail to unpack.",
                        f"`usermod --add-subuids 100000-165535 --add-subgids 100000-165535 "
                        f"{user}`, then as {user}: `podman system migrate`",
                    )
                )
    group = probe.output("getent", "group", "docker")
    members = group.split(":")[3].split(",") if group and group.count(":") >= 3 else []
    if user in members:
        findings.append(
            Finding(
                "security.docker_group",
                "warning",
                f"User {user} is in the docker group: root-equivalent",
                "Any BOINC app running as that user can start a privileged container and "
                "become root on this host. boincd-containers does not need it: the shim only "
                "talks to the daemon's socket. (BOINC 8's own docker_wrapper apps do use it.)",
                f"`gpasswd -d {user} docker`, then restart boinc-client.",
            )
        )
    elif engine.reachable and not engine.rootless:
        findings.append(
            Finding(
                "security.docker_group",
                "ok",
                f"User {user} has no direct engine access",
                "Tasks reach containers only through the daemon, which limits what they get.",
            )
        )
    return findings


def _user_uid(probe: HostProbe, engine: EngineFacts | None) -> str | None:
    m = re.match(r"(?:unix://)?/run/user/(\d+)/", (engine.socket if engine else None) or "")
    if m:
        return m.group(1)
    entry = probe.output("getent", "passwd", probe.boinc_user)
    return entry.split(":")[2] if entry and entry.count(":") >= 2 else None


def check_cgroups(probe: HostProbe, host: HostFacts, engine: EngineFacts | None) -> list[Finding]:
    # Rootless Docker and Podman alike apply limits only through a delegated v2 subtree.
    rootless = engine is not None and engine.reachable and engine.rootless
    name = _engine_name(engine) if engine is not None else ""
    if host.cgroup is None:
        if probe.system != "Linux":
            return []  # the engine's own Linux VM has the cgroups; nothing to see here
        return [
            Finding(
                "cgroup.version",
                "warning",
                "No cgroup filesystem found",
                "Engines need /sys/fs/cgroup to start containers and apply limits.",
                "Mount it (a normal systemd boot does), or run on a regular Linux host.",
            )
        ]
    if host.cgroup == "v1":
        if rootless:
            return [
                Finding(
                    "cgroup.version",
                    "warning",
                    f"cgroup v1 with rootless {name}: CPU, memory and pids limits cannot be "
                    "applied",
                    "Containers get no cgroup of their own. Tasks run, but a task may use more "
                    "cores than BOINC gave it and start any number of processes. "
                    "boincd-containers makes up for what it can: it watches each task's "
                    "memory and stops a task above BOINC's bound, pauses tasks by stopping "
                    "their processes (there is no freezer), and says so in the task's "
                    "stderr.txt.",
                    "Boot with cgroup v2 (kernel option systemd.unified_cgroup_hierarchy=1), "
                    "or use a rootful engine (boincd-containers.service).",
                )
            ]
        missing = [c for c in NEEDED_CONTROLLERS if c not in host.controllers]
        return [_controllers_finding(missing, "cgroup v1 (legacy hierarchy)")]
    findings = [
        _controllers_finding(
            [c for c in NEEDED_CONTROLLERS if c not in host.controllers],
            "cgroup v2 (unified hierarchy)",
        )
    ]
    if rootless:
        uid = _user_uid(probe, engine)
        rel = f"sys/fs/cgroup/user.slice/user-{uid}.slice/user@{uid}.service/cgroup.controllers"
        delegated = probe.read(rel) if uid else None
        user = probe.boinc_user
        if delegated is None:
            findings.append(
                Finding(
                    "cgroup.delegation",
                    "warning",
                    f"No systemd user manager for {user}: nothing is delegated to rootless {name}",
                    f"Without it rootless {name} cannot apply CPU, memory or pids limits.",
                    f"`loginctl enable-linger {user}`",
                )
            )
        else:
            missing = [c for c in NEEDED_CONTROLLERS if c not in delegated.split()]
            if missing:
                findings.append(
                    Finding(
                        "cgroup.delegation",
                        "warning",
                        f"Controllers not delegated to {user}: {', '.join(missing)}",
                        f"Rootless {name} cannot apply those limits to task containers.",
                        "Create /etc/systemd/system/user@.service.d/delegate.conf with "
                        "`[Service]` and `Delegate=cpu cpuset io memory pids`, then "
                        "`systemctl daemon-reload` and restart the user's session.",
                    )
                )
            else:
                findings.append(
                    Finding("cgroup.delegation", "ok", f"cpu, memory, pids delegated to {user}")
                )
    return findings


def _controllers_finding(missing: list[str], what: str) -> Finding:
    if not missing:
        return Finding("cgroup.version", "ok", f"{what}; cpu, memory and pids controllers on")
    return Finding(
        "cgroup.version",
        "warning",
        f"{what} without the {', '.join(missing)} controller(s)",
        "The engine silently drops limits it cannot apply: tasks may exceed their bounds.",
        "Enable them on the kernel command line (e.g. cgroup_enable=memory on Raspberry Pi).",
    )


def _cdi_specs(probe: HostProbe) -> list[str]:
    found = []
    for base in ("etc/cdi", "var/run/cdi"):
        folder = probe.path(base)
        if probe.is_dir(base):
            for spec in sorted(folder.iterdir()):
                if spec.suffix in (".yaml", ".yml", ".json") and "nvidia.com/gpu" in (
                    probe.read(f"{base}/{spec.name}") or ""
                ):
                    found.append(f"/{base}/{spec.name}")
    return found


def check_gpu(probe: HostProbe, host: HostFacts, engine: EngineFacts | None) -> list[Finding]:
    nvidia = probe.exists("proc/driver/nvidia/version") or probe.exists("dev/nvidiactl")
    nvidia = nvidia or (host.wsl == 2 and probe.exists("usr/lib/wsl/lib/libcuda.so.1"))
    if not nvidia:
        return [Finding("gpu.runtime", "info", "No NVIDIA GPU found: CPU tasks only")]
    cdi = _cdi_specs(probe)
    toolkit = probe.output("nvidia-ctk", "--version") is not None or probe.exists(
        "usr/bin/nvidia-container-runtime-hook"
    )
    runtime = bool(engine and "nvidia" in engine.runtimes)
    podman = bool(engine and engine.kind == "podman")
    usable = bool(cdi) if podman else bool(cdi or toolkit or runtime)
    if usable:
        how = ", ".join(cdi) if cdi else ("nvidia runtime" if runtime else "NVIDIA toolkit hook")
        return [Finding("gpu.runtime", "ok", f"NVIDIA GPU usable by containers ({how})")]
    if toolkit:
        fix = "`nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`"
    else:
        fix = (
            "Install nvidia-container-toolkit, then `nvidia-ctk cdi generate "
            "--output=/etc/cdi/nvidia.yaml`"
            + ("" if podman else " or `nvidia-ctk runtime configure --runtime=docker`")
            + " and restart the engine."
        )
    return [
        Finding(
            "gpu.runtime",
            "warning",
            "NVIDIA GPU found but no container GPU runtime",
            "No CDI spec for nvidia.com/gpu"
            + ("" if podman else " and no nvidia runtime or toolkit hook")
            + ": GPU tasks cannot start; CPU tasks are unaffected.",
            fix,
        )
    ]


def _image_store(probe: HostProbe, engine: EngineFacts | None) -> Path:
    if probe.image_store is not None:
        return probe.image_store
    if engine and engine.image_store:
        return Path(engine.image_store)
    if engine and engine.kind == "podman" and engine.rootless:
        entry = probe.output("getent", "passwd", probe.boinc_user)
        home = entry.split(":")[5] if entry and entry.count(":") >= 6 else "/var/lib/boinc"
        return Path(home) / ".local/share/containers/storage"
    if engine and engine.kind == "podman":
        return Path("/var/lib/containers/storage")
    return Path("/var/lib/docker")


def check_disk(probe: HostProbe, host: HostFacts, engine: EngineFacts | None) -> list[Finding]:
    store = _image_store(probe, engine)
    local = probe.path(str(store))
    while not safely(local.exists) and local != local.parent:
        local = local.parent  # the store may not exist yet; its filesystem does
    try:
        free = probe.free_bytes(local)
    except OSError as exc:
        return [
            Finding(
                "disk.image_store", "warning", f"Cannot measure free space at {store}", str(exc)
            )
        ]
    title = f"{free / GIB:.1f} GiB free for images at {store}"
    fix = (
        "Free space there, move the engine's data-root to a larger disk, or lower BOINC's "
        "disk limits so images and task data fit."
    )
    if free < probe.min_free_error:
        return [
            Finding("disk.image_store", "error", title, "Image pulls and loads will fail.", fix)
        ]
    if free < probe.min_free_warning:
        return [
            Finding(
                "disk.image_store", "warning", title, "Large scientific images may not fit.", fix
            )
        ]
    return [Finding("disk.image_store", "ok", title)]


def check_platform(probe: HostProbe, host: HostFacts, engine: EngineFacts | None) -> list[Finding]:
    findings = []
    if host.wsl == 1:
        findings.append(
            Finding(
                "platform.wsl",
                "error",
                "Inside WSL 1: containers cannot run",
                "WSL 1 translates system calls and has no real Linux kernel or cgroups.",
                f"In PowerShell: `wsl --set-version {host.wsl_distro or '<distro>'} 2`",
            )
        )
    elif host.wsl == 2:
        distro = host.wsl_distro or "unknown distro"
        note = (
            " This is BOINC's own distro: BOINC 8's Windows client drives Podman here itself."
            if distro == BOINC_WSL_DISTRO
            else ""
        )
        findings.append(
            Finding(
                "platform.wsl",
                "info",
                f"Inside WSL2 ({distro})",
                "Containers run in WSL2's Hyper-V VM; Windows stops idle distros, so keep "
                "this one running while BOINC works." + note,
            )
        )
    if probe.system == "Linux" and not host.systemd:
        if host.wsl:
            findings.append(
                Finding(
                    "platform.init",
                    "warning",
                    "systemd is not running in this WSL distro",
                    "boincd-containers.service will not start at boot.",
                    "Add `[boot]` and `systemd=true` to /etc/wsl.conf, then `wsl --shutdown`.",
                )
            )
        else:
            findings.append(
                Finding(
                    "platform.init",
                    "info",
                    "No systemd: start `boincd-containers serve` from your init system",
                )
            )
    findings += _virtualbox(probe, host)
    return findings


def _virtualbox(probe: HostProbe, host: HostFacts) -> list[Finding]:
    if host.vbox is None:
        return []
    version = host.vbox or "(version unknown)"
    if host.wsl == 2:
        old = (version_tuple(host.vbox) or (6, 0)) < (6, 0)
        return [
            Finding(
                "virt.vbox_hyperv",
                "warning",
                f"VirtualBox {version} and WSL2/Hyper-V on one PC",
                "While Hyper-V runs (WSL2 needs it) VirtualBox cannot use VT-x/AMD-V itself. "
                + (
                    "This VirtualBox (before 6.0) then cannot start VMs at all."
                    if old
                    else "It falls back to Hyper-V's API (native execution mode, the green "
                    "turtle icon in the VM window): BOINC VM apps run far slower or fail "
                    "(VERR_NEM_...)."
                ),
                "Either keep WSL2 and run container apps (set BOINC project preferences to "
                "skip VirtualBox apps, or uninstall VirtualBox); or, for VM apps, switch the "
                "hypervisor off: `bcdedit /set hypervisorlaunchtype off`, turn off the Windows "
                "features Hyper-V, Virtual Machine Platform and Windows Hypervisor Platform and "
                "Core isolation's Memory integrity, reboot; that also stops WSL2 and this daemon.",
            )
        ]
    kvm = probe.exists("sys/module/kvm_intel") or probe.exists("sys/module/kvm_amd")
    if probe.system == "Linux" and kvm:
        return [
            Finding(
                "virt.vbox_kvm",
                "warning",
                f"VirtualBox {version} installed while the KVM module is loaded",
                "Both want VT-x/AMD-V; VirtualBox VMs (BOINC VM apps) can fail to start "
                "(VERR_VMX_IN_VMX_ROOT_MODE, VERR_SVM_IN_USE). Containers are unaffected.",
                "If you use VM apps: `modprobe -r kvm_intel kvm_amd` (or boot with "
                "kvm.enable_virt_at_load=0 on Linux 6.12+).",
            )
        ]
    return [Finding("virt.vbox", "info", f"VirtualBox {version}: BOINC VM apps can run too")]


Check = Callable[[HostProbe, HostFacts, EngineFacts | None], list[Finding]]
