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
import pwd
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

EngineKind = Literal["docker", "podman"]
# Whose view engine facts are: the daemon's answer, or this user's own probe.
SeenBy = Literal["daemon", "user"]

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
    # The daemon's owner label value, when the daemon (or its state dir) told us.
    instance_id: str | None = None
    # Containers carrying our owner label; None when they could not be listed.
    labelled: tuple[LabelledContainer, ...] | None = None
    # Who saw this: the daemon (its GET /v1/status) or doctor's own user probing directly.
    seen_by: SeenBy = "daemon"
    # Where the engine URL came from when it was chosen, not found: "DOCKER_HOST" or
    # "docker_host in /etc/...". None: one of the usual sockets.
    host_source: str | None = None


@dataclass(frozen=True)
class DaemonFacts:
    """What boincd-containers' own socket said to doctor's user."""

    socket: str
    answered: bool
    error: str | None = None  # why it did not answer
    permission_denied: bool = False  # the socket is there, this user may not open it
    version: str | None = None
    instance_id: str | None = None
    # Whether this user may change things (the daemon's peer-credential check); None:
    # not known.
    may_change: bool | None = None
    access_detail: str | None = None  # the daemon's own words on it, when it refused


@dataclass(frozen=True)
class LabelledContainer:
    name: str  # without the engine's leading "/"
    owner: str
    state: str
    project: str | None = None
    result: str | None = None


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


def safely(test: Callable[[], bool]) -> bool:
    try:
        return test()
    except OSError:
        return False


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


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
    stat: Callable[[Path], os.stat_result] = os.stat
    min_free_warning: int = 10 * GIB
    min_free_error: int = 2 * GIB
    # Who runs doctor: its findings about "this user" are about them.
    uid: int = field(default_factory=os.geteuid)
    user: str = field(default_factory=lambda: _user_name(os.geteuid()))

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def read(self, rel: str) -> str | None:
        try:
            return self.path(rel).read_text(errors="replace")
        except OSError:
            return None

    # A user other than root meets folders it may not enter (/root/.cargo/bin on PATH,
    # /var/lib/boinc): for doctor that is "not there", never a crash.
    def exists(self, rel: str) -> bool:
        return safely(self.path(rel).exists)

    def is_file(self, rel: str) -> bool:
        return safely(self.path(rel).is_file)

    def is_dir(self, rel: str) -> bool:
        return safely(self.path(rel).is_dir)

    def output(self, *argv: str) -> str | None:
        """Stdout of a command that succeeded, else None."""
        result = self.run(argv)
        return result.stdout.strip() if result.returncode == 0 else None

    def which(self, name: str) -> str | None:
        """The program's path on this host's PATH (under ``root``), as advice may name it."""
        for folder in self.env.get("PATH", "").split(os.pathsep):
            if not folder:
                continue
            candidate = self.path(f"{folder}/{name}")
            if safely(candidate.is_file) and os.access(candidate, os.X_OK):
                return f"{folder.rstrip('/')}/{name}"
        return None


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
    boinc: BoincClientFacts


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
        # Running, not installed: systemctl is on hosts (containers, WSL) where it cannot work.
        systemd=probe.exists("run/systemd/system"),
        vbox=_vbox(probe, wsl),
        docker_cli=probe.output("docker", "--version") is not None,
        podman_cli=probe.output("podman", "--version") is not None,
        boinc=boinc_client(probe),
    )


# -- the local BOINC client ------------------------------------------------------------------

# Where distributions put the client and its data; the service's own unit comes first.
BOINC_UNITS = (
    "etc/systemd/system/boinc-client.service",
    "lib/systemd/system/boinc-client.service",
    "usr/lib/systemd/system/boinc-client.service",
)
BOINC_BINARIES = (
    "/usr/bin/boinc",
    "/usr/local/bin/boinc",
    "/opt/boinc/boinc",
    "/Applications/BOINCManager.app/Contents/Resources/boinc",
)
BOINC_DATA_DIRS = (
    "/var/lib/boinc-client",
    "/var/lib/boinc",
    "/opt/boinc",
    "/Library/Application Support/BOINC Data",
)
BOINC_PROCESS_NAMES = ("boinc", "boinc_client")
DOCKER_TYPES: dict[int, EngineKind] = {1: "docker", 2: "podman"}  # lib/common_defs.h


@dataclass(frozen=True)
class BoincClient:
    """One client program found, and how it is (or would be) started."""

    path: str  # as run: absolute, or the bare name left to PATH
    version: str | None  # "8.2.15"; None when `--version` gave no answer
    source: str  # where we found it: "running, pid 812", "boinc-client.service", "PATH"
    data_dir: str | None = None
    # On its command line, or in cc_config.xml of its data dir.
    allow_multiple_clients: bool = False
    uid: int | None = None  # a running client's user: its cleanup acts as that user


@dataclass(frozen=True)
class BoincClientFacts:
    clients: tuple[BoincClient, ...]  # running ones first, then the service's, then others
    data_dir: str | None  # the service's (or the usual) data dir
    # From that dir's client_state.xml: the client that last wrote it, and the engine its
    # last start detected (8.x clients write <docker_version> only when the probe worked).
    state_version: str | None = None
    state_engine: EngineKind | None = None
    state_engine_version: str | None = None

    @property
    def version(self) -> str | None:
        """The version that matters most: a running client's, else the service's, else any."""
        return next((c.version for c in self.clients if c.version), self.state_version)


def release_tuple(text: str | None) -> tuple[int, int, int] | None:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def _xml_int(text: str, tag: str) -> int | None:
    m = re.search(rf"<{tag}>\s*(-?\d+)\s*</{tag}>", text)
    return int(m.group(1)) if m else None


def _xml_flag(text: str, tag: str) -> bool:
    """BOINC's parse_bool: `<tag/>` or a non-zero `<tag>n</tag>` is true."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return bool(re.search(rf"<{tag}\s*/>", text)) or bool(_xml_int(text, tag))


@dataclass(frozen=True)
class _Start:
    path: str
    source: str
    argv: tuple[str, ...] = ()
    data_dir: str | None = None
    uid: int | None = None

    @property
    def dir(self) -> str | None:
        argv = self.argv
        return argv[argv.index("--dir") + 1] if "--dir" in argv[:-1] else self.data_dir


def _readlink(probe: HostProbe, rel: str) -> str | None:
    try:
        return os.readlink(probe.path(rel)).removesuffix(" (deleted)")
    except OSError:
        return None


def _running(probe: HostProbe) -> list[_Start]:
    try:
        entries = [e.name for e in probe.path("proc").iterdir() if e.name.isdigit()]
    except OSError:
        return []
    found = []
    for pid in sorted(entries, key=int):
        if (probe.read(f"proc/{pid}/comm") or "").strip() not in BOINC_PROCESS_NAMES:
            continue
        argv = tuple((probe.read(f"proc/{pid}/cmdline") or "").split("\0"))
        # exe and cwd are readable only as root or the client's user; argv[0] then.
        exe = _readlink(probe, f"proc/{pid}/exe")
        exe = exe or (argv[0] if argv[0].startswith("/") else None)
        uid = re.search(r"^Uid:\s+(\d+)", probe.read(f"proc/{pid}/status") or "", re.M)
        if exe:
            cwd = _readlink(probe, f"proc/{pid}/cwd")
            real_uid = int(uid.group(1)) if uid else None
            found.append(_Start(exe, f"running, pid {pid}", argv, cwd, real_uid))
    return found


def _service(probe: HostProbe) -> _Start | None:
    for unit in BOINC_UNITS:
        text = probe.read(unit)
        if text is None:
            continue
        # Drop-ins override the unit's own lines; the last assignment wins.
        folder = probe.path(unit + ".d")
        for conf in sorted(folder.glob("*.conf")) if safely(folder.is_dir) else []:
            text += "\n" + (probe.read(f"{unit}.d/{conf.name}") or "")
        exec_start = [v.split() for v in re.findall(r"^ExecStart=(.*)$", text, re.M) if v.strip()]
        workdir = re.findall(r"^WorkingDirectory=-?(\S+)", text, re.M)
        if not exec_start:
            return None
        argv = tuple(exec_start[-1])
        path = argv[0].lstrip("-@+!:")
        return _Start(path, "boinc-client.service", argv, workdir[-1] if workdir else None)
    # sysvinit: Debian's init script reads /etc/default/boinc-client.
    text = probe.read("etc/default/boinc-client") or ""
    settings = dict(re.findall(r'^(BOINC_\w+)="?([^"\n]*)"?', text, re.M))
    if not settings.get("BOINC_CLIENT"):
        return None
    opts = tuple(settings.get("BOINC_OPTS", "").split())
    return _Start(
        settings["BOINC_CLIENT"], "/etc/default/boinc-client", opts, settings.get("BOINC_DIR")
    )


def _on_path(probe: HostProbe) -> str:
    for folder in probe.env.get("PATH", "").split(os.pathsep):
        if folder and probe.is_file(f"{folder}/boinc"):
            return f"{folder}/boinc"
    return "boinc"  # not under our root: the runner's own PATH decides


def _client_version(probe: HostProbe, path: str) -> str | None:
    out = probe.output(path, "--version")  # prints e.g. "8.2.15 x86_64-pc-linux-gnu"
    m = re.match(r"\s*(\d+\.\d+(?:\.\d+)?)", out or "")
    return m.group(1) if m else None


def _same_file(probe: HostProbe, a: str, b: str) -> bool:
    if a == b or not (a.startswith("/") and b.startswith("/")):
        return a == b
    return probe.path(a).resolve() == probe.path(b).resolve()


def boinc_client(probe: HostProbe) -> BoincClientFacts:
    """Every BOINC client program we can find, and what its data dir says."""
    running = _running(probe)
    service = _service(probe)
    starts = list(running)
    starts += [service] if service else []
    starts.append(_Start(_on_path(probe), "PATH"))
    starts += [_Start(p, "installed") for p in BOINC_BINARIES if probe.is_file(p)]
    dirs = [service.dir] if service and service.dir else []
    dirs += [d for d in BOINC_DATA_DIRS if probe.is_dir(d)]
    data_dir = next(
        (d for d in dirs if probe.is_file(f"{d}/client_state.xml")),
        dirs[0] if dirs else None,
    )
    clients: list[BoincClient] = []
    for start in starts:
        # A running client is listed per process; other finds of the same file are not.
        if not start.source.startswith("running") and any(
            _same_file(probe, start.path, c.path) for c in clients
        ):
            continue
        version = _client_version(probe, start.path)
        if version is None and not probe.is_file(start.path):
            continue  # a unit naming a program that is gone, or nothing on PATH
        where = start.dir or data_dir
        cc_config = probe.read(f"{where}/cc_config.xml") or "" if where else ""
        multiple = "--allow_multiple_clients" in start.argv
        clients.append(
            BoincClient(
                start.path,
                version,
                start.source,
                where,
                multiple or _xml_flag(cc_config, "allow_multiple_clients"),
                start.uid,
            )
        )
    state = (probe.read(f"{data_dir}/client_state.xml") or "") if data_dir else ""
    major = _xml_int(state, "core_client_major_version")
    minor = _xml_int(state, "core_client_minor_version")
    release = _xml_int(state, "core_client_release")
    host_info = re.search(r"<host_info>(.*?)</host_info>", state, re.S)
    info = host_info.group(1) if host_info else ""
    engine = re.search(r"<docker_version>\s*([^<]*?)\s*</docker_version>", info)
    return BoincClientFacts(
        clients=tuple(clients),
        data_dir=data_dir,
        state_version=f"{major}.{minor}.{release or 0}" if major is not None else None,
        state_engine=DOCKER_TYPES.get(_xml_int(info, "docker_type") or 0) if engine else None,
        state_engine_version=engine.group(1) if engine else None,
    )
