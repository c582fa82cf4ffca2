"""``boincd-containers install``: the boot-time service, a default config, the socket group.

Linux gets a systemd unit (rootful, or rootless Podman for the BOINC user), macOS a
launchd LaunchDaemon. Everything is written under ``root`` (``/`` on a real host, a
temporary directory in tests) and every command goes through an injectable runner,
so a dry run and a real run into a temporary root can be checked without touching
the host. The unit and plist texts are embedded below (so an installed wheel needs
no data files); tests keep them equal to ``systemd/`` and ``launchd/`` in the repo.

Socket group: ``boinc`` on Linux. The Debian/Fedora packages run the client as user
``boinc`` with that primary group, so the shims it starts reach the socket with no
extra membership, and volunteers who manage BOINC are usually in it already; a
group of our own would need the client's user added to it by hand. On macOS BOINC
runs apps as ``boinc_project``, created by BOINC's installer.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from boincd_containers.cli.doctor import HostProbe, run_doctor
from boincd_containers.cli.hostprobe import Runner, run_command
from boincd_containers.core.persist import write_text

__all__ = ["InstallError", "default_exec_path", "install", "main"]

DEFAULT_EXEC = "/usr/local/bin/boincd-containers"
UNIT_DIR = "etc/systemd/system"
UNIT = "boincd-containers.service"
ROOTLESS_UNIT = "boincd-containers-rootless.service"
PLIST = "Library/LaunchDaemons/org.boinc.containers.plist"
CONFIG = "etc/boincd-containers/config.toml"
LINUX_GROUP = "boinc"
MACOS_GROUP = "boinc_project"
MACOS_SOCKET = "/var/run/boincd-containers/boincd.sock"


class InstallError(Exception):
    """Something the admin must fix first; the message says what."""


SYSTEMD_UNIT = """\
# boincd-containers: one host daemon that runs BOINC tasks in Docker/Podman containers.
#
# Installed by `boincd-containers install` to /etc/systemd/system/ (ExecStart then
# names the installed console script; /usr/local/bin is where `pipx install --global`
# or a symlink to a venv's bin/boincd-containers puts it). Local changes belong in a
# drop-in (`systemctl edit boincd-containers`), which a reinstall leaves alone.
#
# Runs as root for a rootful engine (/var/run/docker.sock, /run/podman/podman.sock).
# For rootless Podman use boincd-containers-rootless.service instead.

[Unit]
Description=BOINC containers daemon (runs BOINC tasks in containers)
# Wants=, not Requires=: a host has Docker or Podman, rarely both, and a missing
# unit is ignored. The daemon retries the engine anyway, so this is ordering only.
Wants=docker.service podman.socket
After=docker.service podman.socket podman.service
# Shims that the client starts at boot find the socket already up; at shutdown the
# client stops first, so its shims can leave their containers paused cleanly.
Before=boinc-client.service

[Service]
# READY=1 once the socket listens and state is rebuilt from the engine's labels;
# WATCHDOG=1 from the event loop, so a wedged loop gets restarted.
Type=notify
NotifyAccess=main
WatchdogSec=60
TimeoutStartSec=300
TimeoutStopSec=90
ExecStart=/usr/local/bin/boincd-containers serve
Restart=on-failure
RestartSec=5

# Task containers are children of the engine (containerd-shim or conmon), never of
# this unit, so a restart or upgrade of the daemon leaves running tasks alone; the
# new daemon re-attaches by label. KillMode=process keeps it so even for helper
# processes an engine may fork from our side (a CLI-started conmon would otherwise
# live, and die, in this unit's cgroup).
KillMode=process

# The socket (/run/boincd-containers/boincd.sock) is created with this group and
# mode 0660, so the BOINC client's user reaches it; nobody else does.
Group=boinc
UMask=0007
RuntimeDirectory=boincd-containers
RuntimeDirectoryMode=0750
StateDirectory=boincd-containers
StateDirectoryMode=0750
ConfigurationDirectory=boincd-containers
ConfigurationDirectoryMode=0755
# BOINCD_SOCKET, BOINCD_STATE_DIR and BOINCD_CONFIG are left unset on purpose:
# the defaults are the directories above, and an environment value would
# override the config file.

# Hardening, within one constraint: the daemon must live in the host's mount
# namespace. It bind-mounts each task's checked slot (and project dir, and
# `mount` sources) onto /var/lib/boincd-containers/mounts/ and gives the engine
# that path, which the BOINC user cannot swap for a symbolic link (host/mounts.py,
# as Kubernetes' fix for CVE-2017-1002101). Mounts made in a namespace of the
# unit's own never reach dockerd (systemd makes such a namespace a slave, and
# MountFlags=shared does not undo that), so no option here may create one:
# no ProtectSystem=, ProtectHome=, PrivateTmp=, PrivateDevices=, ReadOnlyPaths=,
# ProtectKernelTunables=, ProtectKernelModules=, ProtectKernelLogs=,
# ProtectControlGroups=, ProtectHostname=. What they guarded is guarded
# anyway: a daemon that may use the engine's socket is root in all but name.
NoNewPrivileges=yes
ProtectClock=yes
# net: web graphics enter a task container's network namespace (setns) to
# reach its port, so the container needs no network of its own (watch/webgraphics.py).
RestrictNamespaces=net
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
# AF_UNIX: engine, our socket, sd_notify; AF_INET*: a tcp:// DOCKER_HOST;
# AF_NETLINK: interface statistics.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
# Reading slot dirs and /proc of task processes owned by the BOINC user,
# fixing ownership of files a container left in the slot, and bind-mounting
# the checked task dirs (mount(2)); nothing else. Repeated lines add up.
CapabilityBoundingSet=CAP_CHOWN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_SYS_PTRACE
# Lowering a task container's threads to the task's priority (setpriority,
# sched_setscheduler on processes of other users: host/priority.py).
CapabilityBoundingSet=CAP_SYS_NICE
# And setns() into a task container's network namespace, which needs
# CAP_SYS_ADMIN, for web graphics (watch/webgraphics.py). Repeated lines are merged.
CapabilityBoundingSet=CAP_SYS_ADMIN

[Install]
WantedBy=multi-user.target
"""

SYSTEMD_ROOTLESS_UNIT = """\
# boincd-containers for rootless Podman: the daemon and the engine both run as
# the BOINC user, so neither a task nor the daemon has root on the host.
#
# Needs (done by `boincd-containers install --rootless`, or by hand):
#   loginctl enable-linger boinc        # the user's systemd manager runs at boot
#   systemctl --user -M boinc@ enable --now podman.socket
#   a drop-in boincd-containers-rootless.service.d/10-podman-socket.conf with
#     [Unit]
#     Wants=user@UID.service
#     After=user@UID.service
#     [Service]
#     Environment=DOCKER_HOST=unix:///run/user/UID/podman/podman.sock
#   where UID is `id -u boinc`: a system unit cannot name another user's runtime
#   dir itself (%U is the service manager's UID, not User='s).
# On cgroup v2 give the user cpu, memory and pids (Delegate= in a drop-in for
# user@.service), else limits cannot be applied; `boincd-containers ctl doctor`
# checks all of this.

[Unit]
Description=BOINC containers daemon, rootless Podman (runs BOINC tasks in containers)
# Same socket path as the rootful unit: only one of the two may run.
Conflicts=boincd-containers.service
Before=boinc-client.service

[Service]
Type=notify
NotifyAccess=main
WatchdogSec=60
TimeoutStartSec=300
TimeoutStopSec=90
ExecStart=/usr/local/bin/boincd-containers serve
Restart=on-failure
RestartSec=5
# Containers belong to the user's Podman (conmon), not to this unit; see the
# rootful unit for why a daemon restart must not touch them.
KillMode=process

User=boinc
Group=boinc
UMask=0007
RuntimeDirectory=boincd-containers
RuntimeDirectoryMode=0750
StateDirectory=boincd-containers
StateDirectoryMode=0750
ConfigurationDirectory=boincd-containers
ConfigurationDirectoryMode=0755

NoNewPrivileges=yes
ProtectSystem=strict
# read-only, not yes: yes would also hide /run/user, where the Podman socket is.
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
# An unprivileged daemon needs no capabilities at all.
CapabilityBoundingSet=

[Install]
WantedBy=multi-user.target
"""

LAUNCHD_PLIST = """\
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN"
  "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!--
  boincd-containers on macOS, a LaunchDaemon (root, started at boot).
  Installed by `boincd-containers install` to /Library/LaunchDaemons/ (owner root:wheel,
  mode 644, or launchd refuses it); load with
  `sudo launchctl bootstrap system /Library/LaunchDaemons/org.boinc.containers.plist`.

  DOCKER_HOST is /var/run/docker.sock: the one path that does not depend on which
  user runs the engine. Docker Desktop links it to the user's ~/.docker/run/docker.sock
  when "Allow the default Docker socket to be used" is on (the default); a Podman
  machine provides it once `sudo podman-mac-helper install` has run. A per-user path
  such as ~/.docker/run/docker.sock would tie a system daemon to one login.
  Either engine runs only while its user is logged in; the daemon waits and retries.

  macOS has no /run (the system volume is read-only), so the socket lives under
  /var/run; BOINC's apps run as user boinc_project, hence that socket group (config.toml).
-->
<plist version="1.0">
<dict>
	<key>Label</key>
	<string>org.boinc.containers</string>
	<key>ProgramArguments</key>
	<array>
		<string>/usr/local/bin/boincd-containers</string>
		<string>serve</string>
	</array>
	<key>EnvironmentVariables</key>
	<dict>
		<key>DOCKER_HOST</key>
		<string>unix:///var/run/docker.sock</string>
		<key>BOINCD_SOCKET</key>
		<string>/var/run/boincd-containers/boincd.sock</string>
		<key>PATH</key>
		<string>/usr/local/bin:/opt/homebrew/bin:/usr/bin:/bin:/usr/sbin:/sbin</string>
	</dict>
	<key>RunAtLoad</key>
	<true/>
	<!-- Restart after a crash, not after a clean stop (like Restart=on-failure). -->
	<key>KeepAlive</key>
	<dict>
		<key>SuccessfulExit</key>
		<false/>
	</dict>
	<key>ThrottleInterval</key>
	<integer>10</integer>
	<!-- Seconds between SIGTERM and SIGKILL: time to shut down in order. -->
	<key>ExitTimeOut</key>
	<integer>90</integer>
	<!-- 007 octal: the socket and state are for root and the socket group only. -->
	<key>Umask</key>
	<integer>7</integer>
	<key>StandardOutPath</key>
	<string>/Library/Logs/boincd-containers.log</string>
	<key>StandardErrorPath</key>
	<string>/Library/Logs/boincd-containers.log</string>
</dict>
</plist>
"""

CONFIG_TEMPLATE = """\
# boincd-containers settings (TOML). Command-line flags and environment variables
# (BOINCD_SOCKET, BOINCD_STATE_DIR, DOCKER_HOST, BOINCD_<NAME>) override this file;
# an unknown key is an error. Written once by `boincd-containers install` and never
# overwritten: edit freely, then restart the service.
{socket}
# Group owning the daemon socket (mode 0660): the BOINC client's user must be in it.
socket_group = "{group}"

# The user the BOINC client runs as: besides root, the only one allowed to change things.
# boinc_user = "boinc"

# Container engine; unset: DOCKER_HOST, then the usual Docker and Podman sockets.
# docker_host = "unix:///var/run/docker.sock"

# Disk budget for cached images, in bytes; unset: a share of the engine's free disk.
# image_cache_budget_bytes = 20000000000

# How long exited containers, orphaned volumes and unused images are kept, in seconds.
# gc_grace_s = 3600

# log_level = "info"
"""

DROP_IN = """\
# Written by `boincd-containers install --rootless`: the Podman socket of user {user}.
[Unit]
Wants=user@{uid}.service
After=user@{uid}.service

[Service]
Environment=DOCKER_HOST=unix:///run/user/{uid}/podman/podman.sock
"""


def default_exec_path() -> str:
    """The console script of this installation, so the service runs what was installed."""
    sibling = Path(os.path.abspath(sys.executable)).parent / "boincd-containers"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    return shutil.which("boincd-containers") or DEFAULT_EXEC


@dataclass
class _Installer:
    root: Path
    dry_run: bool
    run: Runner
    lines: list[str] = field(default_factory=list)

    @property
    def live(self) -> bool:
        # Host databases (getent) and service managers only make sense for the real root.
        return self.root.resolve() == Path("/")

    def say(self, action: str) -> None:
        self.lines.append(("would " if self.dry_run else "") + action)

    def write(self, rel: str, text: str, mode: int = 0o644, *, keep: bool = False) -> None:
        target = self.root / rel
        shown = "/" + rel
        if target.exists():
            if keep:
                self.lines.append(f"keep {shown} (exists; never overwritten)")
                return
            if target.read_text(errors="replace") == text:
                self.lines.append(f"unchanged {shown}")
                return
        self.say(f"write {shown}")
        if self.dry_run:
            # What would be written, in full: an admin reviews the unit and the config
            # before letting a root service onto the host.
            self.lines.append(f"--- {shown}\n{text.rstrip()}\n--- end of {shown}")
            return
        write_text(target, text, mode)  # never a half-written unit if we are interrupted

    def command(self, *argv: str) -> None:
        self.say("run " + " ".join(argv))
        if self.dry_run:
            return
        result = self.run(argv)
        if result.returncode != 0:
            raise InstallError(f"{' '.join(argv)} failed: {result.stderr.strip() or result.stdout}")

    def entry(self, database: str, name: str) -> list[str] | None:
        """A passwd or group entry, from NSS on the live host, else from root/etc."""
        if self.live:
            result = self.run(("getent", database, name))
            lines = result.stdout.splitlines() if result.returncode == 0 else []
        else:
            try:
                lines = (self.root / "etc" / database).read_text().splitlines()
            except OSError:
                lines = []
        for line in lines:
            fields = line.split(":")
            if fields[0] == name:
                return fields
        return None


def _linux(inst: _Installer, exe: str, rootless: bool, user: str, enable: bool) -> None:
    unit = ROOTLESS_UNIT if rootless else UNIT
    text = SYSTEMD_ROOTLESS_UNIT if rootless else SYSTEMD_UNIT
    if inst.entry("group", LINUX_GROUP) is None:
        prefix = () if inst.live else ("--prefix", str(inst.root))
        inst.command("groupadd", "--system", *prefix, LINUX_GROUP)
    else:
        inst.lines.append(f"keep group {LINUX_GROUP} (exists)")
    text = text.replace(DEFAULT_EXEC, exe).replace("\nUser=boinc\n", f"\nUser={user}\n")
    inst.write(f"{UNIT_DIR}/{unit}", text)
    if rootless:
        passwd = inst.entry("passwd", user)
        if passwd is None or len(passwd) < 3:
            raise InstallError(f"user {user} does not exist: install boinc-client first")
        inst.write(
            f"{UNIT_DIR}/{unit}.d/10-podman-socket.conf", DROP_IN.format(user=user, uid=passwd[2])
        )
    inst.write(CONFIG, CONFIG_TEMPLATE.format(socket="", group=LINUX_GROUP), keep=True)
    steps: list[tuple[str, ...]] = [("systemctl", "daemon-reload")]
    if rootless:
        steps += [
            ("loginctl", "enable-linger", user),
            ("systemctl", "--user", "-M", f"{user}@", "enable", "--now", "podman.socket"),
        ]
    steps.append(("systemctl", "enable", "--now", unit))
    systemd = (inst.root / "run/systemd/system").is_dir()
    if enable and inst.live and systemd:
        for argv in steps:
            inst.command(*argv)
    elif systemd or not inst.live:
        inst.lines += ["next: " + " ".join(argv) for argv in steps]
    else:
        inst.lines.append(f"next: systemd is not running; start `{exe} serve` at boot yourself")


def _macos(inst: _Installer, exe: str, enable: bool) -> None:
    inst.write(PLIST, LAUNCHD_PLIST.replace(DEFAULT_EXEC, exe))
    socket = f'\nsocket = "{MACOS_SOCKET}"\n'
    inst.write(CONFIG, CONFIG_TEMPLATE.format(socket=socket, group=MACOS_GROUP), keep=True)
    bootstrap = ("launchctl", "bootstrap", "system", "/" + PLIST)
    if enable and inst.live:
        inst.command(*bootstrap)
    else:
        inst.lines.append("next: sudo " + " ".join(bootstrap))


def install(
    dry_run: bool,
    root: Path = Path("/"),
    *,
    system: str | None = None,
    rootless: bool = False,
    exec_path: str | None = None,
    boinc_user: str = "boinc",
    enable: bool = False,
    run: Runner = run_command,
) -> list[str]:
    """Install the service under ``root``; return one line per action, in order.

    ``dry_run`` writes and runs nothing and says ``would ...`` instead, each file it
    would write followed by its full text (between ``--- PATH`` and
    ``--- end of PATH``). ``enable``
    also starts the service, only on the live root with a running service manager;
    otherwise the commands to do so come back as ``next: ...`` lines. Conflicts the
    doctor finds (WSL2 with VirtualBox, missing cgroup controllers...) come first as
    ``check: ...`` lines; they do not stop the install.
    """
    system = system or platform.system()
    inst = _Installer(root=root, dry_run=dry_run, run=run)
    probe = HostProbe(root=root, run=run, system=system, boinc_user=boinc_user)
    for finding in run_doctor(probe, None).findings:
        if finding.severity in ("warning", "error"):
            fix = f" (fix: {finding.fix})" if finding.fix else ""
            inst.lines.append(f"check: [{finding.severity}] {finding.title}{fix}")
    exe = exec_path or default_exec_path()
    if system == "Linux":
        _linux(inst, exe, rootless, boinc_user, enable)
    elif system == "Darwin":
        if rootless:
            raise InstallError("--rootless is for Linux; macOS engines run in their own VM")
        _macos(inst, exe, enable)
    else:
        raise InstallError(f"{system}: install and run boincd-containers inside a WSL2 distro")
    return inst.lines


def main(dry_run: bool, rootless: bool = False) -> int:
    """Entry point of ``boincd-containers install``: print the actions, exit non-zero on failure."""
    if not dry_run and hasattr(os, "geteuid") and os.geteuid() != 0:
        print("boincd-containers install: must run as root (try --dry-run)", file=sys.stderr)
        return 1
    try:
        lines = install(dry_run, rootless=rootless, enable=True)
    except (InstallError, OSError) as exc:
        print(f"boincd-containers install: {exc}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0
