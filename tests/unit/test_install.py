"""install(): dry runs touch nothing; real runs into a temporary root write the service."""

from __future__ import annotations

import plistlib
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from boincd_containers.cli import install as inst
from boincd_containers.cli.hostprobe import CommandResult
from boincd_containers.core.settings import load_settings

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


def _shown(lines: list[str], path: str) -> str:
    """The text a dry run shows for `path`, between its --- markers."""
    block = next(line for line in lines if line.startswith(f"--- {path}\n"))
    body = block.removeprefix(f"--- {path}\n")
    assert body.endswith(f"\n--- end of {path}")
    return body.removesuffix(f"\n--- end of {path}") + "\n"


def test_dry_run_shows_the_unit_and_config_it_would_write(tmp_path: Path) -> None:
    root = host_root(tmp_path)
    lines = inst.install(True, root, system="Linux", exec_path=EXE, run=Recorder())
    unit = _shown(lines, "/etc/systemd/system/boincd-containers.service")
    config = _shown(lines, "/etc/boincd-containers/config.toml")
    # Exactly what a real run writes.
    real = host_root(tmp_path / "real")
    inst.install(False, real, system="Linux", exec_path=EXE, run=Recorder())
    assert unit == (real / "etc/systemd/system/boincd-containers.service").read_text()
    assert config == (real / "etc/boincd-containers/config.toml").read_text()
    assert f"ExecStart={EXE} serve" in unit
    # Each file right after the action that names it.
    i = lines.index("would write /etc/systemd/system/boincd-containers.service")
    assert lines[i + 1].startswith("--- /etc/systemd/system/boincd-containers.service\n")


def test_dry_run_shows_the_rootless_drop_in_and_the_plist(tmp_path: Path) -> None:
    root = host_root(tmp_path)
    lines = inst.install(True, root, system="Linux", rootless=True, exec_path=EXE, run=Recorder())
    drop_in = "/etc/systemd/system/boincd-containers-rootless.service.d/10-podman-socket.conf"
    assert "DOCKER_HOST=unix:///run/user/121/podman/podman.sock" in _shown(lines, drop_in)
    mac = tmp_path / "mac"
    mac.mkdir()
    lines = inst.install(True, mac, system="Darwin", exec_path=EXE, run=Recorder())
    plist = plistlib.loads(_shown(lines, "/" + inst.PLIST).encode())
    assert plist["ProgramArguments"] == [EXE, "serve"]


def test_dry_run_does_not_show_a_kept_config(tmp_path: Path) -> None:
    root = host_root(tmp_path)
    (root / "etc/boincd-containers").mkdir(parents=True)
    (root / "etc/boincd-containers/config.toml").write_text('socket_group = "volunteers"\n')
    lines = inst.install(True, root, system="Linux", exec_path=EXE, run=Recorder())
    assert "keep /etc/boincd-containers/config.toml (exists; never overwritten)" in lines
    assert not any(line.startswith("--- /etc/boincd-containers/config.toml") for line in lines)


@pytest.mark.skipif(sys.platform != "linux", reason="the systemd unit is Linux's")
def test_install_dry_run_from_the_command_line_prints_the_unit() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "boincd_containers", "install", "--dry-run"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    if "--- /etc/systemd/system/boincd-containers.service\n" not in done.stdout:
        # This host already has the unit as it would be written.
        assert "unchanged /etc/systemd/system/boincd-containers.service" in done.stdout
    else:
        assert "\n[Service]\n" in done.stdout
