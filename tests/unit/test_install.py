"""install(): dry runs touch nothing; real runs into a temporary root write the service."""

from __future__ import annotations

import plistlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from boincd_containers import install as inst
from boincd_containers.hostprobe import CommandResult
from boincd_containers.settings import load_settings

EXE = "/opt/boincd-containers/bin/boincd-containers"


ACTIONS = ("groupadd", "systemctl", "loginctl", "launchctl")


class Recorder:
    """Remembers every command and runs none; the host's tools all look absent."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        self.calls.append(tuple(argv))
        if argv[0] in ACTIONS:
            return CommandResult(0, "")
        return CommandResult(127, "", f"{argv[0]}: not found")

    def actions(self) -> list[tuple[str, ...]]:
        return [c for c in self.calls if c[0] in ACTIONS]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def host_root(tmp_path: Path, *, group: bool = True) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(
        "root:x:0:0::/root:/bin/sh\nboinc:x:121:127::/var/lib/boinc:/bin/false\n"
    )
    (root / "etc/group").write_text("root:x:0:\n" + ("boinc:x:127:\n" if group else ""))
    return root


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    root = host_root(tmp_path, group=False)
    before = snapshot(root)
    runner = Recorder()
    lines = inst.install(True, root, system="Linux", exec_path=EXE, run=runner)
    assert snapshot(root) == before
    assert runner.actions() == []
    assert f"would run groupadd --system --prefix {root} boinc" in lines
    assert "would write /etc/systemd/system/boincd-containers.service" in lines
    assert "would write /etc/boincd-containers/config.toml" in lines


def test_real_run_writes_unit_config_and_group(tmp_path: Path) -> None:
    root = host_root(tmp_path, group=False)
    runner = Recorder()
    lines = inst.install(False, root, system="Linux", exec_path=EXE, run=runner)
    assert "run groupadd --system --prefix" in "\n".join(lines)
    unit = (root / "etc/systemd/system/boincd-containers.service").read_text()
    assert f"ExecStart={EXE} serve" in unit
    assert unit == inst.SYSTEMD_UNIT.replace(inst.DEFAULT_EXEC, EXE)
    assert runner.actions() == [("groupadd", "--system", "--prefix", str(root), "boinc")]
    config = root / "etc/boincd-containers/config.toml"
    assert 'socket_group = "boinc"' in config.read_text()
    # Not the live root: nothing is enabled, the admin is told how.
    assert "next: systemctl enable --now boincd-containers.service" in lines
    # Again: nothing changes, and the admin's config is never overwritten.
    config.write_text('socket_group = "volunteers"\n')
    again = inst.install(False, root, system="Linux", exec_path=EXE, run=runner)
    assert "unchanged /etc/systemd/system/boincd-containers.service" in again
    assert "keep /etc/boincd-containers/config.toml (exists; never overwritten)" in again
    assert config.read_text() == 'socket_group = "volunteers"\n'


def test_default_config_is_valid_for_the_daemon(tmp_path: Path) -> None:
    root = host_root(tmp_path)
    inst.install(False, root, system="Linux", exec_path=EXE, run=Recorder())
    config = root / "etc/boincd-containers/config.toml"
    settings = load_settings({"config": str(config)}, environ={})
    assert settings.socket_group == "boinc"


def test_rootless_unit_and_drop_in(tmp_path: Path) -> None:
    root = host_root(tmp_path)
    lines = inst.install(False, root, system="Linux", rootless=True, exec_path=EXE, run=Recorder())
    assert "keep group boinc (exists)" in lines
    unit = (root / "etc/systemd/system/boincd-containers-rootless.service").read_text()
    assert "\nUser=boinc\n" in unit
    drop_in = root / "etc/systemd/system/boincd-containers-rootless.service.d/10-podman-socket.conf"
    text = drop_in.read_text()
    assert "DOCKER_HOST=unix:///run/user/121/podman/podman.sock" in text
    assert "After=user@121.service" in text
    assert "next: loginctl enable-linger boinc" in lines


def test_rootless_needs_the_user(tmp_path: Path) -> None:
    root = host_root(tmp_path)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    with pytest.raises(inst.InstallError, match="user boinc does not exist"):
        inst.install(False, root, system="Linux", rootless=True, exec_path=EXE, run=Recorder())


def test_macos_writes_launchd_plist(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    runner = Recorder()
    lines = inst.install(False, root, system="Darwin", exec_path=EXE, run=runner)
    plist = plistlib.loads((root / "Library/LaunchDaemons/org.boinc.containers.plist").read_bytes())
    assert plist["ProgramArguments"] == [EXE, "serve"]
    config = (root / "etc/boincd-containers/config.toml").read_text()
    assert 'socket_group = "boinc_project"' in config
    assert 'socket = "/var/run/boincd-containers/boincd.sock"' in config
    assert (
        "next: sudo launchctl bootstrap system /Library/LaunchDaemons/org.boinc.containers.plist"
        in lines
    )
    assert runner.actions() == []


def test_doctor_conflicts_are_reported(tmp_path: Path) -> None:
    root = host_root(tmp_path)
    (root / "proc").mkdir()
    (root / "proc/version").write_text("Linux version 5.15.153.1-microsoft-standard-WSL2\n")
    (root / "mnt/c/Program Files/Oracle/VirtualBox").mkdir(parents=True)
    (root / "mnt/c/Program Files/Oracle/VirtualBox/VBoxManage.exe").write_text("")
    lines = inst.install(True, root, system="Linux", exec_path=EXE, run=Recorder())
    assert any(line.startswith("check: [warning] VirtualBox") for line in lines)


def test_other_systems_are_refused(tmp_path: Path) -> None:
    with pytest.raises(inst.InstallError, match="WSL2"):
        inst.install(True, tmp_path, system="Windows", exec_path=EXE, run=Recorder())


def test_default_exec_path_is_this_installation() -> None:
    path = inst.default_exec_path()
    assert path.endswith("boincd-containers")
    assert Path(path).is_absolute()
