"""The systemd units and the launchd plist: valid, as documented, and equal to install's copies."""

from __future__ import annotations

import configparser
import plistlib
import shutil
import subprocess
from pathlib import Path

import pytest

from boincd_containers.cli import install

REPO = Path(__file__).resolve().parents[2]
UNITS = {
    "boincd-containers.service": install.SYSTEMD_UNIT,
    "boincd-containers-rootless.service": install.SYSTEMD_ROOTLESS_UNIT,
}
PLIST = REPO / "launchd/org.boinc.containers.plist"


def service_section(text: str) -> dict[str, str]:
    # strict=False: systemd allows repeated keys; the last one wins, as here.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return dict(parser["Service"])


@pytest.mark.parametrize("name", sorted(UNITS))
def test_repo_files_equal_install_constants(name: str) -> None:
    assert (REPO / "systemd" / name).read_text() == UNITS[name]


def test_plist_equals_install_constant() -> None:
    assert PLIST.read_text() == install.LAUNCHD_PLIST


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_contract(name: str) -> None:
    service = service_section(UNITS[name])
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert int(service["WatchdogSec"]) > 0
    assert service["ExecStart"] == f"{install.DEFAULT_EXEC} serve"
    assert service["RuntimeDirectory"] == "boincd-containers"  # /run/boincd-containers/
    assert service["StateDirectory"] == "boincd-containers"  # /var/lib/boincd-containers
    assert service["ConfigurationDirectory"] == "boincd-containers"
    assert service["KillMode"] == "process"
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes"
    assert "AF_UNIX" in service["RestrictAddressFamilies"].split()
    # The engine socket must stay reachable: never hidden, never pinned by a bind mount.
    assert "docker.sock" not in service.get("ReadWritePaths", "")
    assert "PrivateDevices" not in service  # NVML needs /dev/nvidia*


# Each gives the unit a mount namespace of its own (a slave of the host's).
MOUNT_NAMESPACE_OPTIONS = (
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "ReadOnlyPaths",
    "ReadWritePaths",
    "InaccessiblePaths",
    "BindPaths",
    "TemporaryFileSystem",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectHostname",
    "ProtectProc",
    "ProcSubset",
)


def test_root_unit_lives_in_the_host_mount_namespace_and_may_mount() -> None:
    """The root daemon's task mount points (host/mounts.py) must reach dockerd."""
    service = service_section(UNITS["boincd-containers.service"])
    assert [o for o in MOUNT_NAMESPACE_OPTIONS if o in service] == []
    assert "CAP_SYS_ADMIN" in service["CapabilityBoundingSet"].split()


def test_rootless_unit_keeps_its_file_system_protections() -> None:
    """Rootless, the daemon mounts nothing: the read-only view costs nothing there."""
    service = service_section(UNITS["boincd-containers-rootless.service"])
    assert service["ProtectSystem"] == "strict"
    assert service.get("ProtectHome") == "read-only"


def test_rootless_unit_runs_as_boinc() -> None:
    assert service_section(UNITS["boincd-containers-rootless.service"])["User"] == "boinc"


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian package: systemd)")
    # verify insists that ExecStart exists; point it at this checkout's console script
    # or, failing that, any executable, since only the unit's syntax is under test.
    exe = install.default_exec_path()
    if not Path(exe).exists():
        exe = shutil.which("true") or "/bin/true"
    unit = tmp_path / name
    unit.write_text(UNITS[name].replace(install.DEFAULT_EXEC, exe))
    done = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=120, check=False
    )
    # verify exits 0 even for unknown keys or bad values; any message is a defect.
    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == ""


def test_launchd_plist_keys() -> None:
    plist = plistlib.loads(PLIST.read_bytes())
    assert plist["Label"] == "org.boinc.containers"
    assert plist["ProgramArguments"] == [install.DEFAULT_EXEC, "serve"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    env = plist["EnvironmentVariables"]
    assert env["DOCKER_HOST"] == "unix:///var/run/docker.sock"
    assert env["BOINCD_SOCKET"] == install.MACOS_SOCKET
    assert plist["StandardOutPath"].startswith("/Library/Logs/")
    assert plist["StandardErrorPath"].startswith("/Library/Logs/")
    assert plist["Umask"] == 0o007


def test_rootful_unit_lets_web_graphics_enter_a_container_network_namespace() -> None:
    # setns(CLONE_NEWNET) needs CAP_SYS_ADMIN and a namespace filter that allows
    # net (watch/webgraphics.py); nothing else is widened.
    text = UNITS["boincd-containers.service"]
    # systemd ORs repeated CapabilityBoundingSet= lines.
    caps = {
        cap
        for line in text.splitlines()
        if line.startswith("CapabilityBoundingSet=")
        for cap in line.partition("=")[2].split()
    }
    assert caps == {
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_SYS_PTRACE",
        "CAP_SYS_ADMIN",
        # setpriority/sched_setscheduler on a container's processes (host/priority.py)
        "CAP_SYS_NICE",
    }
    assert service_section(text)["RestrictNamespaces"] == "net"
