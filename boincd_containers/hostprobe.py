"""What the doctor and the installer look at on a host, behind injectable seams.

A :class:`HostProbe` reads /proc, /sys and /etc under a chosen root and runs
commands through a chosen runner, so tests can build any host (WSL2 next to
VirtualBox, cgroup v1, no engine) from a temporary directory and canned outputs.
Engine state comes from the caller's engine adapter as :class:`EngineFacts`:
this module never talks to the engine itself.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

EngineKind = Literal["docker", "podman"]

GIB = 1024**3
VBOX_WINDOWS = "mnt/c/Program Files/Oracle/VirtualBox/VBoxManage.exe"


@dataclass(frozen=True)
class EngineFacts:
    """What the engine adapter learnt; ``runtimes`` and ``image_store`` when known."""

    reachable: bool
    kind: EngineKind | None
    version: str | None
    rootless: bool
    socket: str | None
    error: str | None
    runtimes: tuple[str, ...] = ()
    image_store: str | None = None


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str = ""


Runner = Callable[[Sequence[str]], CommandResult]


def run_command(argv: Sequence[str], timeout: float = 10.0) -> CommandResult:
    """Run a probe command; a missing or hanging tool is an answer, not an exception."""
    env = {**os.environ, "LC_ALL": "C"}  # parse English output whatever the locale
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except FileNotFoundError:
        return CommandResult(127, "", f"{argv[0]}: not found")
    except PermissionError as exc:
        return CommandResult(126, "", str(exc))
    except subprocess.TimeoutExpired:
        return CommandResult(124, "", f"{argv[0]}: timed out after {timeout:g} s")
    return CommandResult(done.returncode, done.stdout, done.stderr)


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


@dataclass
class HostProbe:
    root: Path = Path("/")
    run: Runner = run_command
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    system: str = field(default_factory=platform.system)
    boinc_user: str = "boinc"
    image_store: Path | None = None
    free_bytes: Callable[[Path], int] = _free_bytes
    min_free_warning: int = 10 * GIB
    min_free_error: int = 2 * GIB

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def read(self, rel: str) -> str | None:
        try:
            return self.path(rel).read_text(errors="replace")
        except OSError:
            return None

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def output(self, *argv: str) -> str | None:
        """Stdout of a command that succeeded, else None."""
        result = self.run(argv)
        return result.stdout.strip() if result.returncode == 0 else None


@dataclass(frozen=True)
class HostFacts:
    """Facts shared by several checks, gathered once."""

    wsl: int | None  # 1, 2, or None when not inside WSL
    wsl_distro: str | None
    cgroup: Literal["v1", "v2"] | None
    controllers: frozenset[str]
    systemd: bool
    vbox: str | None  # VirtualBox version, or "" when found but silent
    docker_cli: bool
    podman_cli: bool


def version_tuple(text: str | None) -> tuple[int, int] | None:
    m = re.search(r"(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _wsl(probe: HostProbe) -> int | None:
    version = probe.read("proc/version") or ""
    release = (probe.read("proc/sys/kernel/osrelease") or "").strip()
    interop = probe.exists("proc/sys/fs/binfmt_misc/WSLInterop") or probe.exists(
        "proc/sys/fs/binfmt_misc/WSLInterop-late"
    )
    if not ("microsoft" in version.lower() or "WSL_DISTRO_NAME" in probe.env or interop):
        return None
    # WSL1 kernels report e.g. "4.4.0-19041-Microsoft"; WSL2 "...-microsoft-standard-WSL2".
    text = release or version
    if "Microsoft" in text and "standard" not in text.lower():
        return 1
    return 2


def _cgroup(probe: HostProbe) -> tuple[Literal["v1", "v2"] | None, frozenset[str]]:
    unified = probe.read("sys/fs/cgroup/cgroup.controllers")
    if unified is not None:
        return "v2", frozenset(unified.split())
    table = probe.read("proc/cgroups")
    if table is None:
        return None, frozenset()
    enabled = set()
    for line in table.splitlines():
        cols = line.split()
        if len(cols) == 4 and not line.startswith("#") and cols[3] == "1":
            enabled.add(cols[0])
    return "v1", frozenset(enabled)


def _vbox(probe: HostProbe, wsl: int | None) -> str | None:
    found = probe.output("VBoxManage", "--version")
    if found is None and wsl:
        # From WSL the Windows VirtualBox is reachable through interop, or at least seen.
        found = probe.output("VBoxManage.exe", "--version")
        if found is None and probe.exists(VBOX_WINDOWS):
            found = ""
    return found


def gather(probe: HostProbe) -> HostFacts:
    wsl = _wsl(probe)
    cgroup, controllers = _cgroup(probe)
    return HostFacts(
        wsl=wsl,
        wsl_distro=probe.env.get("WSL_DISTRO_NAME"),
        cgroup=cgroup,
        controllers=controllers,
        systemd=probe.exists("run/systemd/system"),
        vbox=_vbox(probe, wsl),
        docker_cli=probe.output("docker", "--version") is not None,
        podman_cli=probe.output("podman", "--version") is not None,
    )
