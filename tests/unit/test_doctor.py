"""Doctor checks on fake hosts: a temporary root for /proc, /sys, /etc and canned commands."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import os
import socketserver
import stat as stat_module
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.cli import doctor_cli
from boincd_containers.cli.doctor import (
    CommandResult,
    DaemonFacts,
    DoctorReport,
    EngineFacts,
    Finding,
    HostProbe,
    run_doctor,
)
from boincd_containers.cli.hostprobe import GIB, LabelledContainer, run_command

WSL2_VERSION = (
    "Linux version 5.15.153.1-microsoft-standard-WSL2 (root@1c602f52c2e4) "
    "(gcc (GCC) 11.2.0) #1 SMP Fri Mar 29 23:14:13 UTC 2024\n"
)
V2_ALL = "cpuset cpu io memory hugetlb pids rdma misc\n"
V1_TABLE = (
    "#subsys_name\thierarchy\tnum_cgroups\tenabled\n"
    "cpuset\t2\t1\t1\ncpu\t3\t80\t1\ncpuacct\t3\t80\t1\nmemory\t4\t90\t1\n"
    "devices\t5\t80\t1\npids\t6\t80\t1\n"
)
USER_SLICE = "sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/cgroup.controllers"

DOCKER = EngineFacts(True, "docker", "24.0.7", False, "/var/run/docker.sock", None)
ROOTLESS_PODMAN = EngineFacts(
    True, "podman", "4.3.1", True, "/run/user/1000/podman/podman.sock", None
)
ROOTFUL_PODMAN = EngineFacts(True, "podman", "4.3.1", False, "/run/podman/podman.sock", None)


class FakeRunner:
    """Answers known command lines; anything else is 'not installed' (127)."""

    def __init__(self, answers: Mapping[tuple[str, ...], str]) -> None:
        self.answers = dict(answers)
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        key = tuple(argv)
        self.calls.append(key)
        if key in self.answers:
            return CommandResult(0, self.answers[key] + "\n")
        return CommandResult(127, "", f"{argv[0]}: not found")


def make_probe(
    root: Path,
    files: Mapping[str, str] | None = None,
    commands: Mapping[tuple[str, ...], str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    system: str = "Linux",
    free_gib: float = 100,
    healthy: bool = True,
    tools: Sequence[str] = (),
    uid: int = 0,
    user: str = "root",
) -> HostProbe:
    """A host; ``healthy`` starts from cgroup v2, systemd, BOINC installed, user boinc.

    ``tools``: programs on its PATH (/usr/bin under the root), for advice that names them;
    ``uid``/``user``: who runs doctor."""
    base_files: dict[str, str] = {}
    base_cmds: dict[tuple[str, ...], str] = {}
    if healthy:
        base_files = {
            "proc/version": "Linux version 6.1.0-18-amd64 (debian-kernel@lists.debian.org)\n",
            "sys/fs/cgroup/cgroup.controllers": V2_ALL,
            "run/systemd/system/.keep": "",
        }
        base_cmds = {
            ("boinc", "--version"): "7.20.5 x86_64-pc-linux-gnu",
            ("getent", "passwd", "boinc"): "boinc:x:1000:1000::/var/lib/boinc:/usr/sbin/nologin",
            ("getent", "group", "docker"): "docker:x:999:",
        }
    base_files.update(files or {})
    base_cmds.update(commands or {})
    for rel, text in base_files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for tool in tools:
        program = root / "usr/bin" / tool
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    return HostProbe(
        root=root,
        run=FakeRunner(base_cmds),
        env={"PATH": "/usr/bin", **(env or {})},
        system=system,
        free_bytes=lambda _path: int(free_gib * GIB),
        uid=uid,
        user=user,
    )


def by_id(report: DoctorReport, finding_id: str) -> Finding:
    matches = [f for f in report.findings if f.id == finding_id]
    assert len(matches) == 1, (finding_id, report.findings)
    return matches[0]


def ids(report: DoctorReport) -> set[str]:
    return {f.id for f in report.findings}


def test_healthy_docker_host_is_ok(tmp_path: Path) -> None:
    report = run_doctor(
        make_probe(tmp_path, commands={("docker", "--version"): "Docker 24"}), DOCKER
    )
    assert report.ok
    assert report.exit_code() == 0
    assert by_id(report, "engine.reachable").severity == "ok"
    assert by_id(report, "security.docker_group").severity == "ok"
    assert by_id(report, "cgroup.version").severity == "ok"
    assert by_id(report, "boinc.client").title == "BOINC client 7.20.5"
    assert report.recommendation.runtime == "native-docker"
    json.dumps(report.to_json())  # plain data all the way down


def test_wsl2_with_virtualbox_warns_about_emulation(tmp_path: Path) -> None:
    probe = make_probe(
        tmp_path,
        {
            "proc/version": WSL2_VERSION,
            "proc/sys/kernel/osrelease": "5.15.153.1-microsoft-standard-WSL2\n",
        },
        {("VBoxManage.exe", "--version"): "7.0.14r161095"},
        env={"WSL_DISTRO_NAME": "Ubuntu"},
    )
    report = run_doctor(probe, DOCKER)
    assert by_id(report, "platform.wsl").title == "Inside WSL2 (Ubuntu)"
    conflict = by_id(report, "virt.vbox_hyperv")
    assert conflict.severity == "warning"
    assert "7.0.14r161095" in conflict.title
    assert "turtle" in conflict.detail
    assert "hypervisorlaunchtype off" in conflict.fix
    assert report.recommendation.runtime == "wsl2"
    assert "VirtualBox" in report.recommendation.reason
    assert report.exit_code() == 0  # VM apps suffer; container tasks do not


def test_wsl2_sees_windows_virtualbox_on_disk(tmp_path: Path) -> None:
    probe = make_probe(
        tmp_path,
        {
            "proc/version": WSL2_VERSION,
            "proc/sys/fs/binfmt_misc/WSLInterop": "enabled\n",
            "mnt/c/Program Files/Oracle/VirtualBox/VBoxManage.exe": "",
        },
    )
    conflict = by_id(run_doctor(probe, DOCKER), "virt.vbox_hyperv")
    assert "version unknown" in conflict.title


def test_old_virtualbox_under_hyperv_cannot_start_vms(tmp_path: Path) -> None:
    probe = make_probe(
        tmp_path, {"proc/version": WSL2_VERSION}, {("VBoxManage.exe", "--version"): "5.2.44r139111"}
    )
    assert "cannot start VMs" in by_id(run_doctor(probe, DOCKER), "virt.vbox_hyperv").detail


def test_wsl2_without_systemd(tmp_path: Path) -> None:
    probe = make_probe(tmp_path, {"proc/version": WSL2_VERSION})
    (tmp_path / "run/systemd/system/.keep").unlink()
    (tmp_path / "run/systemd/system").rmdir()
    finding = by_id(run_doctor(probe, DOCKER), "platform.init")
    assert finding.severity == "warning"
    assert "systemd=true" in finding.fix


def test_wsl1_blocks_tasks(tmp_path: Path) -> None:
    probe = make_probe(
        tmp_path,
        {
            "proc/version": "Linux version 4.4.0-19041-Microsoft (Microsoft@Microsoft.com)\n",
            "proc/sys/kernel/osrelease": "4.4.0-19041-Microsoft\n",
        },
        env={"WSL_DISTRO_NAME": "Debian"},
    )
    report = run_doctor(probe, DOCKER)
    assert by_id(report, "platform.wsl").severity == "error"
    assert "wsl --set-version Debian 2" in by_id(report, "platform.wsl").fix
    assert report.exit_code() != 0
    assert report.recommendation.runtime == "wsl2"


def test_virtualbox_next_to_kvm_on_native_linux(tmp_path: Path) -> None:
    probe = make_probe(
        tmp_path,
        {"sys/module/kvm_intel/refcnt": "0\n"},
        {("VBoxManage", "--version"): "7.1.4r165100"},
    )
    assert by_id(run_doctor(probe, DOCKER), "virt.vbox_kvm").severity == "warning"


def test_virtualbox_alone_is_fine(tmp_path: Path) -> None:
    probe = make_probe(tmp_path, commands={("VBoxManage", "--version"): "7.1.4r165100"})
    assert by_id(run_doctor(probe, DOCKER), "virt.vbox").severity == "info"


def test_no_engine_installed(tmp_path: Path) -> None:
    engine = EngineFacts(
        False, None, None, False, "/var/run/docker.sock", "[Errno 2] No such file or directory"
    )
    report = run_doctor(make_probe(tmp_path, tools=["apt-get"]), engine)
    finding = by_id(report, "engine.reachable")
    assert finding.severity == "error"
    assert "apt-get install podman" in finding.fix
    assert report.exit_code() == 1
    assert report.to_json()["ok"] is False
    # cgroup v2 + systemd: rootless Podman is the way to go on a fresh host.
    assert report.recommendation.runtime == "rootless-podman"


def test_engine_installed_but_stopped(tmp_path: Path) -> None:
    engine = EngineFacts(False, None, None, False, "/var/run/docker.sock", "Connection refused")
    probe = make_probe(tmp_path, commands={("docker", "--version"): "Docker version 20.10.24"})
    assert (
        "systemctl enable --now docker" in by_id(run_doctor(probe, engine), "engine.reachable").fix
    )


def test_no_engine_but_virtualbox_recommends_vm_apps(tmp_path: Path) -> None:
    engine = EngineFacts(False, None, None, False, None, "no socket found")
    probe = make_probe(tmp_path, commands={("VBoxManage", "--version"): "7.0.20r163906"})
    assert run_doctor(probe, engine).recommendation.runtime == "vm-apps"


def test_no_permission_on_socket(tmp_path: Path) -> None:
    engine = EngineFacts(
        False,
        "docker",
        None,
        False,
        "/var/run/docker.sock",
        "Cannot connect: [Errno 13] Permission denied",
    )
    report = run_doctor(make_probe(tmp_path), engine)
    finding = by_id(report, "engine.permission")
    assert finding.severity == "error"
    assert "/var/run/docker.sock" in finding.title
    assert "engine.reachable" not in ids(report)
    assert report.exit_code() == 1


def test_old_engine_version(tmp_path: Path) -> None:
    engine = EngineFacts(True, "podman", "3.4.4", False, "/run/podman/podman.sock", None)
    assert by_id(run_doctor(make_probe(tmp_path), engine), "engine.version").severity == "warning"


def test_cgroup_v1_with_rootless_podman_cannot_limit(tmp_path: Path) -> None:
    probe = make_probe(tmp_path, {"proc/cgroups": V1_TABLE})
    (tmp_path / "sys/fs/cgroup/cgroup.controllers").unlink()
    report = run_doctor(probe, ROOTLESS_PODMAN)
    finding = by_id(report, "cgroup.version")
    assert finding.severity == "warning"
    assert "cannot be applied" in finding.title
    assert "cgroup.delegation" not in ids(report)


def test_cgroup_v1_rootful_is_fine(tmp_path: Path) -> None:
    probe = make_probe(tmp_path, {"proc/cgroups": V1_TABLE})
    (tmp_path / "sys/fs/cgroup/cgroup.controllers").unlink()
    report = run_doctor(probe, DOCKER)
    assert by_id(report, "cgroup.version").severity == "ok"
    assert "v1" in by_id(report, "cgroup.version").title


def test_cgroup_v2_missing_memory_controller(tmp_path: Path) -> None:
    probe = make_probe(tmp_path, {"sys/fs/cgroup/cgroup.controllers": "cpuset cpu io pids\n"})
    finding = by_id(run_doctor(probe, DOCKER), "cgroup.version")
    assert finding.severity == "warning"
    assert "memory" in finding.title


def test_cgroup_v2_with_delegation(tmp_path: Path) -> None:
    probe = make_probe(tmp_path, {USER_SLICE: "cpuset cpu io memory pids\n"})
    report = run_doctor(probe, ROOTLESS_PODMAN)
    assert by_id(report, "cgroup.delegation").severity == "ok"
    assert report.recommendation.runtime == "rootless-podman"


def test_cgroup_v2_without_cpu_delegation(tmp_path: Path) -> None:
    probe = make_probe(tmp_path, {USER_SLICE: "memory pids\n"})
    finding = by_id(run_doctor(probe, ROOTLESS_PODMAN), "cgroup.delegation")
    assert finding.severity == "warning"
    assert "cpu" in finding.title
    assert "Delegate=" in finding.fix


def test_cgroup_v2_without_user_manager(tmp_path: Path) -> None:
    finding = by_id(run_doctor(make_probe(tmp_path), ROOTLESS_PODMAN), "cgroup.delegation")
    assert finding.severity == "warning"
    assert "enable-linger boinc" in finding.fix


def test_delegation_uid_from_passwd_when_socket_is_elsewhere(tmp_path: Path) -> None:
    engine = EngineFacts(True, "podman", "4.3.1", True, "/srv/podman.sock", None)
    probe = make_probe(tmp_path, {USER_SLICE: "cpu memory pids\n"})
    assert by_id(run_doctor(probe, engine), "cgroup.delegation").severity == "ok"


def test_rootless_podman_needs_subuid(tmp_path: Path) -> None:
    report = run_doctor(make_probe(tmp_path, {USER_SLICE: V2_ALL}), ROOTLESS_PODMAN)
    assert by_id(report, "security.rootless").severity == "ok"
    assert by_id(report, "security.subuid").severity == "warning"
    probe = make_probe(
        tmp_path, {"etc/subuid": "boinc:100000:65536\n", "etc/subgid": "boinc:100000:65536\n"}
    )
    assert "security.subuid" not in ids(run_doctor(probe, ROOTLESS_PODMAN))


def test_docker_group_membership_is_root_equivalent(tmp_path: Path) -> None:
    probe = make_probe(
        tmp_path, commands={("getent", "group", "docker"): "docker:x:999:alice,boinc"}
    )
    report = run_doctor(probe, DOCKER)
    finding = by_id(report, "security.docker_group")
    assert finding.severity == "warning"
    assert "root-equivalent" in finding.title
    assert finding.fix.startswith("`gpasswd -d boinc docker`")
    assert report.exit_code() == 0


def test_gpu_absent(tmp_path: Path) -> None:
    assert by_id(run_doctor(make_probe(tmp_path), DOCKER), "gpu.runtime").severity == "info"


def test_gpu_without_runtime(tmp_path: Path) -> None:
    probe = make_probe(tmp_path, {"proc/driver/nvidia/version": "NVRM version: 550.54\n"})
    finding = by_id(run_doctor(probe, DOCKER), "gpu.runtime")
    assert finding.severity == "warning"
    assert "nvidia-container-toolkit" in finding.fix


@pytest.mark.parametrize("cdi_dir", ["etc/cdi", "var/run/cdi"])
def test_gpu_with_cdi_spec(tmp_path: Path, cdi_dir: str) -> None:
    probe = make_probe(
        tmp_path,
        {
            "proc/driver/nvidia/version": "NVRM version: 550.54\n",
            f"{cdi_dir}/nvidia.yaml": "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\n",
        },
    )
    finding = by_id(run_doctor(probe, ROOTFUL_PODMAN), "gpu.runtime")
    assert finding.severity == "ok"
    assert f"/{cdi_dir}/nvidia.yaml" in finding.title


def test_gpu_docker_nvidia_runtime_from_engine_info(tmp_path: Path) -> None:
    engine = EngineFacts(
        True, "docker", "24.0.7", False, "/var/run/docker.sock", None, runtimes=("runc", "nvidia")
    )
    probe = make_probe(tmp_path, {"dev/nvidiactl": ""})
    assert by_id(run_doctor(probe, engine), "gpu.runtime").severity == "ok"


def test_gpu_podman_with_toolkit_but_no_cdi(tmp_path: Path) -> None:
    probe = make_probe(
        tmp_path,
        {"proc/driver/nvidia/version": "NVRM\n"},
        {("nvidia-ctk", "--version"): "NVIDIA Container Toolkit CLI version 1.14.6"},
    )
    finding = by_id(run_doctor(probe, ROOTFUL_PODMAN), "gpu.runtime")
    assert finding.severity == "warning"
    assert finding.fix == "`nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`"


@pytest.mark.parametrize(("free_gib", "severity"), [(0.5, "error"), (5, "warning"), (50, "ok")])
def test_disk_space(tmp_path: Path, free_gib: float, severity: str) -> None:
    report = run_doctor(make_probe(tmp_path, free_gib=free_gib), DOCKER)
    finding = by_id(report, "disk.image_store")
    assert finding.severity == severity
    assert "/var/lib/docker" in finding.title
    assert report.ok is (severity != "error")


def test_disk_measured_on_nearest_existing_folder(tmp_path: Path) -> None:
    seen: list[Path] = []

    def free(path: Path) -> int:
        seen.append(path)
        return 100 * GIB

    probe = make_probe(tmp_path, {"var/lib/.keep": ""})
    probe.free_bytes = free
    finding = by_id(run_doctor(probe, ROOTLESS_PODMAN), "disk.image_store")
    # The rootless store lives under the boinc user's home, absent here.
    assert "/var/lib/boinc/.local/share/containers/storage" in finding.title
    assert seen == [tmp_path / "var/lib"]


def test_disk_uses_given_store_path(tmp_path: Path) -> None:
    probe = make_probe(tmp_path)
    probe.image_store = Path("/data/images")
    assert "/data/images" in by_id(run_doctor(probe, DOCKER), "disk.image_store").title


def test_boinc_missing(tmp_path: Path) -> None:
    probe = make_probe(tmp_path, commands={})
    probe.run = FakeRunner({})
    report = run_doctor(probe, DOCKER)
    assert by_id(report, "boinc.client").severity == "warning"
    assert by_id(report, "boinc.user").severity == "warning"


def test_macos_recommends_docker_desktop(tmp_path: Path) -> None:
    probe = make_probe(tmp_path, system="Darwin", healthy=False)
    report = run_doctor(probe, DOCKER)
    assert report.recommendation.runtime == "docker-desktop"
    assert "cgroup.version" not in ids(report)


def test_without_engine_facts_only_host_checks_run(tmp_path: Path) -> None:
    report = run_doctor(make_probe(tmp_path), None)
    assert not {"engine.reachable", "security.docker_group"} & ids(report)
    assert "cgroup.version" in ids(report)


def test_render_text(tmp_path: Path) -> None:
    engine = EngineFacts(False, "docker", None, False, "/var/run/docker.sock", "Permission denied")
    text = run_doctor(make_probe(tmp_path), engine).render_text()
    assert "[FAIL] Tasks cannot run: the daemon may not open Docker's socket" in text
    assert "fix: Run the daemon as root" in text
    assert "Recommended runtime:" in text
    assert text.rstrip().endswith("tasks cannot run until the errors are fixed.")
    assert all(len(line) <= 88 for line in text.splitlines())


def test_run_command_reports_missing_tool() -> None:
    result = run_command(["boincd-no-such-tool-here", "--version"])
    assert result.returncode == 127
    assert run_command(["true"]).returncode == 0


def test_cgroup_v1_with_rootless_docker_cannot_limit(tmp_path: Path) -> None:
    engine = EngineFacts(True, "docker", "24.0.7", True, "/run/user/1000/docker.sock", None)
    probe = make_probe(tmp_path, {"proc/cgroups": V1_TABLE})
    (tmp_path / "sys/fs/cgroup/cgroup.controllers").unlink()
    assert "rootless Docker" in by_id(run_doctor(probe, engine), "cgroup.version").title


# -- the local BOINC client: version, its start-up docker cleanup, our old names ------------

SERVICE = "[Service]\nUser=boinc\nWorkingDirectory=/var/lib/boinc\nExecStart=/usr/bin/boinc\n"
SOCKET = "/var/run/docker.sock"


def client_state(version: str, engine: tuple[str, int] | None = None) -> str:
    major, minor, release = version.split(".")
    host_info = (
        f"<host_info>\n<p_ncpus>2</p_ncpus>\n<docker_version>{engine[0]}</docker_version>\n"
        f"<docker_type>{engine[1]}</docker_type>\n</host_info>\n"
        if engine
        else "<host_info>\n<p_ncpus>2</p_ncpus>\n</host_info>\n"
    )
    return (
        f"<client_state>\n{host_info}<core_client_major_version>{major}"
        f"</core_client_major_version>\n<core_client_minor_version>{minor}"
        f"</core_client_minor_version>\n<core_client_release>{release}"
        "</core_client_release>\n</client_state>\n"
    )


def boinc_host(
    tmp_path: Path,
    version: str | None,
    *,
    files: Mapping[str, str] | None = None,
    commands: Mapping[tuple[str, ...], str] | None = None,
    socket_mode: int = 0o660,
    socket_gid: int = 999,
) -> HostProbe:
    """Debian's layout: the service runs /usr/bin/boinc in /var/lib/boinc; the engine's
    socket is root:docker (gid 999) with ``socket_mode``."""
    base = {"lib/systemd/system/boinc-client.service": SERVICE, "var/lib/boinc/.keep": ""}
    if version is not None:
        base["usr/bin/boinc"] = ""
    cmds: dict[tuple[str, ...], str] = dict(commands or {})
    if version:
        cmds["/usr/bin/boinc", "--version"] = f"{version} x86_64-pc-linux-gnu"
    probe = make_probe(tmp_path, {**base, **(files or {})}, cmds)
    assert isinstance(probe.run, FakeRunner)
    del probe.run.answers["boinc", "--version"]  # the healthy host's PATH client: not here

    def stat(path: Path) -> os.stat_result:
        if path != tmp_path / SOCKET.lstrip("/"):
            raise FileNotFoundError(path)
        return os.stat_result(
            (stat_module.S_IFSOCK | socket_mode, 1, 1, 1, 0, socket_gid, 0, 0, 0, 0)
        )

    probe.stat = stat
    return probe


IN_DOCKER_GROUP: dict[tuple[str, ...], str] = {
    ("id", "-G", "boinc"): "1000 999",
    ("getent", "group", "999"): "docker:x:999:boinc",
}


def test_client_version_from_the_service_unit(tmp_path: Path) -> None:
    report = run_doctor(boinc_host(tmp_path, "8.2.15"), DOCKER)
    finding = by_id(report, "boinc.client")
    assert finding.title == "BOINC client 8.2.15"
    assert "/usr/bin/boinc (boinc-client.service, data dir /var/lib/boinc)" in finding.detail
    data = report.to_json()["boinc_client"]
    assert data["version"] == "8.2.15"
    assert [c["source"] for c in data["clients"]] == ["boinc-client.service"]


def test_client_on_path_and_elsewhere_are_both_listed(tmp_path: Path) -> None:
    probe = boinc_host(
        tmp_path,
        "7.20.5",
        files={"opt/boinc8/boinc": ""},
        commands={("/opt/boinc8/boinc", "--version"): "8.2.15 x86_64-pc-linux-gnu"},
    )
    probe.env = {"PATH": "/opt/boinc8:/usr/bin"}
    finding = by_id(run_doctor(probe, DOCKER), "boinc.client")
    assert finding.title == "BOINC client 7.20.5"  # the service's comes first
    assert "Also: 8.2.15 at /opt/boinc8/boinc (PATH" in finding.detail


def test_running_client_comes_first_with_its_own_flags(tmp_path: Path) -> None:
    probe = boinc_host(
        tmp_path,
        "7.20.5",
        files={
            "proc/4242/comm": "boinc\n",
            "proc/4242/cmdline": "/opt/b/boinc\0--dir\0/srv/boinc\0--allow_multiple_clients\0",
            "proc/77/comm": "bash\n",
            # Named boinc but no client: listed, never the headline.
            "proc/12/comm": "boinc\n",
            "proc/12/cmdline": "/tmp/boinc\0",
            "tmp/boinc": "",
            "srv/boinc/.keep": "",
        },
        commands={("/opt/b/boinc", "--version"): "8.2.15 x86_64-pc-linux-gnu", **IN_DOCKER_GROUP},
    )
    report = run_doctor(probe, DOCKER)
    finding = by_id(report, "boinc.client")
    assert finding.title == "BOINC client 8.2.15"
    assert "running, pid 4242, data dir /srv/boinc" in finding.detail
    assert "7.20.5 at /usr/bin/boinc" in finding.detail
    assert "(version unknown) at /tmp/boinc (running, pid 12" in finding.detail
    cleanup = by_id(report, "boinc.docker_cleanup")
    assert cleanup.severity == "info"
    assert "cleanup off (allow_multiple_clients)" in cleanup.title


def test_nothing_of_boinc_installed(tmp_path: Path) -> None:
    probe = make_probe(tmp_path, healthy=False)
    report = run_doctor(probe, DOCKER)
    assert by_id(report, "boinc.client").severity == "warning"
    assert "boinc.docker_cleanup" not in ids(report)
    assert report.to_json()["boinc_client"]["version"] is None


def test_version_from_client_state_when_no_program_is_found(tmp_path: Path) -> None:
    probe = boinc_host(
        tmp_path,
        None,
        files={"var/lib/boinc/client_state.xml": client_state("8.2.7")},
        commands=IN_DOCKER_GROUP,
    )
    report = run_doctor(probe, DOCKER)
    assert by_id(report, "boinc.client").title == "BOINC client 8.2.7"
    assert "last ran in /var/lib/boinc" in by_id(report, "boinc.client").detail
    assert by_id(report, "boinc.docker_cleanup").severity == "warning"


@pytest.mark.parametrize(
    ("version", "severity"),
    [
        ("7.20.5", None),
        ("8.0.4", None),
        ("8.2.0", "warning"),
        ("8.2.10", "warning"),
        ("8.2.11", "info"),
        ("8.2.15", "info"),
    ],
)
def test_cleanup_by_client_version(tmp_path: Path, version: str, severity: str | None) -> None:
    report = run_doctor(boinc_host(tmp_path, version, commands=IN_DOCKER_GROUP), DOCKER)
    if severity is None:
        assert "boinc.docker_cleanup" not in ids(report)
        return
    finding = by_id(report, "boinc.docker_cleanup")
    assert finding.severity == severity
    assert "boincd__" in finding.detail  # our own containers are safe by name
    assert "boinc is in group docker of /var/run/docker.sock" in finding.detail
    if severity == "warning":
        assert "cannot turn that off" in finding.title
        assert finding.fix.startswith("Upgrade the BOINC client to 8.2.11 or later")
        assert "allow_multiple_clients" in finding.fix
    else:
        assert "allow_multiple_clients` would turn it off" in finding.detail
    assert report.exit_code() == 0  # a warning, not a blocker


def test_old_client_running_as_root_reaches_the_rootful_engine(tmp_path: Path) -> None:
    files = {
        "proc/900/comm": "boinc\n",
        "proc/900/cmdline": "/usr/bin/boinc\0--dir\0/root/boinc\0",
        "proc/900/status": "Name:\tboinc\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n",
    }
    report = run_doctor(boinc_host(tmp_path, "8.2.7", files=files), DOCKER)
    finding = by_id(report, "boinc.docker_cleanup")
    assert finding.severity == "warning"  # the boinc user itself may not open the socket
    assert "the client /usr/bin/boinc (pid 900) runs as root" in finding.detail


def test_old_client_that_cannot_reach_the_engine_is_only_info(tmp_path: Path) -> None:
    finding = by_id(run_doctor(boinc_host(tmp_path, "8.2.7"), DOCKER), "boinc.docker_cleanup")
    assert finding.severity == "info"
    assert "boinc may not open /var/run/docker.sock" in finding.detail


def test_socket_open_to_everyone_counts_as_reachable(tmp_path: Path) -> None:
    probe = boinc_host(tmp_path, "8.2.7", socket_mode=0o666)
    finding = by_id(run_doctor(probe, DOCKER), "boinc.docker_cleanup")
    assert finding.severity == "warning"
    assert "open to all users" in finding.detail


def test_boinc_users_own_rootless_podman_is_reachable(tmp_path: Path) -> None:
    probe = boinc_host(tmp_path, "8.2.3", files={USER_SLICE: V2_ALL})
    assert by_id(run_doctor(probe, ROOTLESS_PODMAN), "boinc.docker_cleanup").severity == "warning"


def test_client_that_last_used_its_own_podman_does_not_reach_rootful_docker(
    tmp_path: Path,
) -> None:
    state = client_state("8.2.7", ("4.3.1", 2))
    probe = boinc_host(
        tmp_path,
        "8.2.7",
        files={"var/lib/boinc/client_state.xml": state},
        commands=IN_DOCKER_GROUP,
    )
    finding = by_id(run_doctor(probe, DOCKER), "boinc.docker_cleanup")
    assert finding.severity == "info"
    assert "Its last start found podman 4.3.1." in finding.detail


def test_without_engine_facts_the_cleanup_is_not_judged(tmp_path: Path) -> None:
    finding = by_id(run_doctor(boinc_host(tmp_path, "8.2.7"), None), "boinc.docker_cleanup")
    assert finding.severity == "info"
    assert "unknown" in finding.detail


@pytest.mark.parametrize(
    ("cc_config", "off"),
    [
        (
            "<cc_config><options><allow_multiple_clients>1</allow_multiple_clients>"
            "</options></cc_config>",
            True,
        ),
        ("<cc_config><options><allow_multiple_clients/></options></cc_config>", True),
        (
            "<cc_config><options><allow_multiple_clients>0</allow_multiple_clients>"
            "</options></cc_config>",
            False,
        ),
        (
            "<cc_config><!-- <options><allow_multiple_clients>1</allow_multiple_clients>"
            "</options> --></cc_config>",
            False,
        ),
    ],
)
def test_allow_multiple_clients_in_cc_config(tmp_path: Path, cc_config: str, off: bool) -> None:
    probe = boinc_host(tmp_path, "8.2.15", files={"var/lib/boinc/cc_config.xml": cc_config})
    title = by_id(run_doctor(probe, DOCKER), "boinc.docker_cleanup").title
    assert ("cleanup off" in title) is off


def test_allow_multiple_clients_does_not_help_before_8_2_11(tmp_path: Path) -> None:
    cc_config = "<options><allow_multiple_clients>1</allow_multiple_clients></options>"
    probe = boinc_host(
        tmp_path,
        "8.2.9",
        files={"var/lib/boinc/cc_config.xml": cc_config},
        commands=IN_DOCKER_GROUP,
    )
    assert by_id(run_doctor(probe, DOCKER), "boinc.docker_cleanup").severity == "warning"


INSTANCE = "a" * 32
OTHER = "b" * 32


def labelled(*containers: LabelledContainer) -> EngineFacts:
    return dataclasses.replace(DOCKER, instance_id=INSTANCE, labelled=containers)


def test_old_name_containers_are_listed_and_at_risk_under_an_old_client(tmp_path: Path) -> None:
    engine = labelled(
        LabelledContainer("boinc__p.org_x__r_1", INSTANCE, "running", "p.org_x", "r_1"),
        LabelledContainer("boincd__p.org_x__r_2", INSTANCE, "running", "p.org_x", "r_2"),
        LabelledContainer("boinc__p.org_x__r_3", OTHER, "exited", "p.org_x", "r_3"),
    )
    report = run_doctor(boinc_host(tmp_path, "8.2.7", commands=IN_DOCKER_GROUP), engine)
    ours = by_id(report, "containers.old_name")
    assert ours.severity == "warning"
    assert ours.title.startswith("1 container(s) of boincd-containers")
    assert "boinc__p.org_x__r_1 (running; task r_1 of p.org_x)" in ours.detail
    assert "r_2" not in ours.detail
    assert "r_3" not in ours.detail
    assert "BOINC client 8.2.7 here does so at its next start" in ours.detail
    assert "systemctl restart boincd-containers" in ours.fix
    theirs = by_id(report, "containers.old_name_other")
    assert "boinc__p.org_x__r_3 (exited" in theirs.detail
    assert "docker rm -f boinc__p.org_x__r_3" in theirs.fix
    listed = report.to_json()["old_name_containers"]
    assert [(c["name"], c["owner"]) for c in listed] == [
        ("boinc__p.org_x__r_1", INSTANCE),
        ("boinc__p.org_x__r_3", OTHER),
    ]
    assert report.exit_code() == 0


def test_old_name_containers_under_a_7_20_client_are_info(tmp_path: Path) -> None:
    engine = labelled(LabelledContainer("boinc__p__r", INSTANCE, "paused"))
    finding = by_id(run_doctor(boinc_host(tmp_path, "7.20.5"), engine), "containers.old_name")
    assert finding.severity == "info"
    assert "boinc__p__r (paused)" in finding.detail


def test_old_name_containers_without_a_known_instance_id(tmp_path: Path) -> None:
    engine = dataclasses.replace(
        DOCKER, labelled=(LabelledContainer("boinc__p__r", OTHER, "running"),)
    )
    report = run_doctor(boinc_host(tmp_path, "8.2.15", commands=IN_DOCKER_GROUP), engine)
    finding = by_id(report, "containers.old_name")
    assert "instance id is unknown" in finding.title
    assert finding.severity == "warning"  # 8.2.15 without allow_multiple_clients cleans up
    assert "containers.old_name_other" not in ids(report)


def test_no_old_name_containers(tmp_path: Path) -> None:
    engine = labelled(LabelledContainer("boincd__p__r", INSTANCE, "running"))
    report = run_doctor(boinc_host(tmp_path, "8.2.7"), engine)
    assert by_id(report, "containers.old_name").severity == "ok"
    # Not listed at all (engine mute, or doctor without an engine): no claim either way.
    unlisted = run_doctor(boinc_host(tmp_path, "8.2.7"), DOCKER)
    assert "containers.old_name" not in ids(unlisted)
    assert unlisted.to_json()["old_name_containers"] is None
    assert report.to_json()["old_name_containers"] == []


# -- the daemon's side first, then this user's ---------------------------------------------

DAEMON_SOCKET = "/run/boincd-containers/boincd.sock"
UP = DaemonFacts(DAEMON_SOCKET, True, version="0.9.0", instance_id=INSTANCE, may_change=True)
DOWN = DaemonFacts(
    DAEMON_SOCKET,
    False,
    "the daemon is not running (no answer on /run/boincd-containers/boincd.sock: "
    "No such file or directory)",
)
DENIED = EngineFacts(
    False,
    None,
    None,
    False,
    "/var/run/docker.sock",
    "[Errno 13] Permission denied",
    seen_by="user",
)
AS_USER = dataclasses.replace(DOCKER, seen_by="user")


def advice(report: DoctorReport) -> str:
    return " ".join(f.fix for f in report.findings) + " " + report.recommendation.reason


def no_systemd(tmp_path: Path, **kwargs: object) -> HostProbe:
    probe = make_probe(tmp_path, **kwargs)  # type: ignore[arg-type]
    (tmp_path / "run/systemd/system/.keep").unlink()
    (tmp_path / "run/systemd/system").rmdir()
    return probe


def test_no_daemon_means_tasks_cannot_run_even_with_a_healthy_engine(tmp_path: Path) -> None:
    probe = make_probe(tmp_path, {"etc/systemd/system/boincd-containers.service": "[Unit]\n"})
    report = run_doctor(probe, AS_USER, DOWN)
    finding = report.findings[0]  # the daemon comes first
    assert finding.id == "daemon.reachable"
    assert finding.severity == "error"
    assert (
        finding.title == f"Tasks cannot run: no daemon on boincd-containers' socket {DAEMON_SOCKET}"
    )
    assert "`systemctl enable --now boincd-containers`" in finding.fix  # systemd runs here
    assert report.exit_code() == 1
    assert report.tasks_can_run is False
    assert report.to_json()["daemon"]["answered"] is False
    assert report.render_text().rstrip().endswith("tasks cannot run until the errors are fixed.")
    engine = by_id(report, "engine.reachable")
    assert engine.severity == "ok"
    assert "no daemon told doctor" in engine.detail


def test_without_systemd_no_systemctl_advice(tmp_path: Path) -> None:
    probe = no_systemd(
        tmp_path,
        commands={("docker", "--version"): "Docker version 20.10.24"},
        tools=["boincd-containers", "systemctl", "service"],  # systemctl installed, not running
    )
    stopped = EngineFacts(False, None, None, False, "/var/run/docker.sock", "Connection refused")
    report = run_doctor(probe, stopped, DOWN)
    fixes = advice(report)
    assert "systemctl" not in fixes
    assert "`/usr/bin/boincd-containers serve`" in by_id(report, "daemon.reachable").fix
    assert "`dockerd &`" in by_id(report, "engine.reachable").fix  # no /etc/init.d/docker
    assert "boincd-containers.service" not in report.recommendation.reason


def test_no_daemon_on_macos_says_launchctl(tmp_path: Path) -> None:
    probe = make_probe(
        tmp_path,
        {"Library/LaunchDaemons/org.boinc.containers.plist": "<plist/>"},
        system="Darwin",
        healthy=False,
        uid=501,
        user="volunteer",
        tools=["sudo"],
    )
    fix = by_id(run_doctor(probe, AS_USER, DOWN), "daemon.reachable").fix
    assert (
        "`sudo launchctl bootstrap system /Library/LaunchDaemons/org.boinc.containers.plist`" in fix
    )


def test_daemon_without_an_engine(tmp_path: Path) -> None:
    lost = EngineFacts(
        False, "docker", None, False, "/var/run/docker.sock", "Cannot connect: Connection refused"
    )
    report = run_doctor(make_probe(tmp_path), lost, UP)
    assert by_id(report, "daemon.reachable").severity == "ok"
    engine = by_id(report, "engine.reachable")
    assert engine.severity == "error"
    assert engine.title == (
        "Tasks cannot run: the daemon reaches no container engine at "
        "Docker's socket /var/run/docker.sock"
    )
    assert report.exit_code() == 1
    ids_in_order = [f.id for f in report.findings]
    assert ids_in_order.index("daemon.reachable") < ids_in_order.index("engine.reachable")


def test_daemon_fine_and_this_user_without_docker_access(tmp_path: Path) -> None:
    daemon = dataclasses.replace(
        UP, may_change=False, access_detail="uid 65534 may read but not change anything"
    )
    probe = make_probe(tmp_path, uid=65534, user="nobody")
    report = run_doctor(probe, DOCKER, daemon, DENIED)
    user = by_id(report, "user.engine")
    assert user.severity == "info"
    assert user.title == (
        "This user, nobody (uid 65534), cannot open Docker's socket /var/run/docker.sock"
    )
    assert "does not stop tasks" in user.detail
    access = by_id(report, "daemon.access")
    assert access.severity == "info"
    assert "may read but not change" in access.title
    assert "engine.permission" not in ids(report)
    assert by_id(report, "engine.reachable").title.startswith("The daemon uses Docker 24.0.7")
    assert report.exit_code() == 0
    assert report.tasks_can_run is True
    text = report.render_text()
    assert "the daemon socket" not in text
    assert text.rstrip().endswith("tasks can run.")


def test_no_daemon_and_this_user_without_docker_access(tmp_path: Path) -> None:
    report = run_doctor(make_probe(tmp_path, uid=65534, user="nobody"), DENIED, DOWN)
    assert "engine.permission" not in ids(report)  # a root daemon may well open it
    assert by_id(report, "user.engine").severity == "info"
    assert [f.id for f in report.findings if f.severity == "error"] == ["daemon.reachable"]


def test_this_user_may_not_open_the_daemons_socket(tmp_path: Path) -> None:
    denied = DaemonFacts(
        DAEMON_SOCKET,
        False,
        f"no permission to use the daemon socket {DAEMON_SOCKET}: Permission denied",
        permission_denied=True,
    )
    report = run_doctor(make_probe(tmp_path, uid=65534, user="nobody"), DENIED, denied)
    finding = by_id(report, "daemon.permission")
    assert finding.severity == "warning"
    assert "doctor cannot ask the daemon" in finding.title
    assert report.exit_code() == 0
    assert report.tasks_can_run is None
    assert report.to_json()["tasks_can_run"] is None
    text = report.render_text()
    assert "tasks cannot run" not in text.lower()
    assert text.rstrip().endswith("doctor could not ask the daemon whether tasks can run.")
    # The BOINC user itself locked out: its shims are, so tasks cannot run.
    as_boinc = make_probe(tmp_path, uid=1000, user="boinc")
    blocked = by_id(run_doctor(as_boinc, DENIED, denied), "daemon.permission")
    assert blocked.severity == "error"
    assert "socket_group" in blocked.fix


def _stat_as(modes: dict[str, tuple[int, int, int]]) -> object:
    real = os.stat

    def fake(path: Path) -> os.stat_result:
        for suffix, (mode, uid, gid) in modes.items():
            if str(path).endswith(suffix):
                st = list(real(path))
                st[0], st[4], st[5] = mode, uid, gid
                return os.stat_result(st)
        return real(path)

    return fake


@pytest.mark.parametrize(("gid", "severity"), [(0, "error"), (1000, "ok")])
def test_the_boinc_user_must_open_the_daemons_socket(
    tmp_path: Path, gid: int, severity: str
) -> None:
    probe = make_probe(
        tmp_path,
        {DAEMON_SOCKET.lstrip("/"): ""},
        {("id", "-G", "boinc"): "1000", ("getent", "group", "0"): "root:x:0:"},
    )
    tmp_path.chmod(0o755)  # the host's "/"
    probe.stat = _stat_as({"boincd.sock": (stat_module.S_IFSOCK | 0o660, 0, gid)})  # type: ignore[assignment]
    finding = by_id(run_doctor(probe, DOCKER, UP), "daemon.boinc_socket")
    assert finding.severity == severity
    if severity == "error":
        assert finding.title.startswith("Tasks cannot run: the BOINC user boinc may not open")
        assert "srw-rw---- with group root" in finding.detail


def test_docker_host_here_is_not_the_daemons(tmp_path: Path) -> None:
    probe = make_probe(tmp_path, env={"DOCKER_HOST": "tcp://127.0.0.1:2375"})
    report = run_doctor(probe, DOCKER, UP)
    note = by_id(report, "engine.docker_host")
    assert note.severity == "info"
    assert note.title == (
        "DOCKER_HOST here is tcp://127.0.0.1:2375; the daemon uses Docker's socket "
        "/var/run/docker.sock"
    )
    same = make_probe(tmp_path, env={"DOCKER_HOST": "unix:///var/run/docker.sock"})
    assert "engine.docker_host" not in ids(run_doctor(same, DOCKER, UP))


def test_json_keeps_its_keys_and_adds_the_daemon(tmp_path: Path) -> None:
    data = run_doctor(make_probe(tmp_path), DOCKER, UP).to_json()
    assert {"ok", "findings", "recommendation", "boinc_client", "old_name_containers"} <= set(data)
    assert data["daemon"]["version"] == "0.9.0"
    assert data["tasks_can_run"] is True
    assert data["user"] == {"uid": 0, "name": "root"}
    json.dumps(data)


class _Fake(http.server.BaseHTTPRequestHandler):
    """Answers from the server's `routes`: {(method, path): (status, body)}."""

    def _answer(self) -> None:
        routes = self.server.routes  # type: ignore[attr-defined]
        status, body = routes.get((self.command, self.path.split("?")[0]), (404, {}))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


ENGINE_ROUTES = {
    ("GET", "/version"): (200, {"Version": "24.0.7", "Components": [{"Name": "Engine"}]}),
    ("GET", "/info"): (200, {"SecurityOptions": [], "DockerRootDir": "/var/lib/docker"}),
    ("GET", "/containers/json"): (200, []),
}


@contextlib.contextmanager
def serving(server: socketserver.BaseServer, routes: object) -> Iterator[None]:
    server.routes = routes  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[Any, Any]:
        conn, _ = super().get_request()
        return conn, ("local", 0)  # BaseHTTPRequestHandler wants a host and port


def test_docker_host_tcp_is_probed_and_named(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    port = server.server_address[1]
    env = {"DOCKER_HOST": f"tcp://127.0.0.1:{port}", "BOINCD_CONFIG": os.devnull}
    with serving(server, ENGINE_ROUTES):
        daemon, engine, mine = doctor_cli.gather_facts(str(tmp_path / "none.sock"), env)
    assert not daemon.answered
    assert mine is None
    assert engine.reachable, engine.error
    assert engine.host_source == "DOCKER_HOST"
    report = run_doctor(make_probe(tmp_path), engine, daemon)
    assert by_id(report, "engine.reachable").title == (
        f"Docker 24.0.7, rootful, at Docker's endpoint tcp://127.0.0.1:{port} (DOCKER_HOST)"
    )
    assert report.old_names == ()  # listed over the same endpoint


def test_the_daemon_is_asked_first_and_says_who_may_change(tmp_path: Path) -> None:
    engine_sock, daemon_sock = tmp_path / "engine.sock", tmp_path / "boincd.sock"
    status = {
        "daemon": {"version": "0.9.0", "instance_id": INSTANCE},
        "engine": {
            "kind": "docker",
            "version": "24.0.7",
            "rootless": False,
            "host": f"unix://{engine_sock}",
            "reachable": True,
            "error": None,
        },
    }
    refusal = {"error": {"code": "forbidden", "message": "uid 65534 may read but not change"}}
    daemon_routes = {
        ("GET", "/v1/status"): (200, status),
        ("POST", "/v1/doctor/may-change"): (403, refusal),
    }
    env = {"DOCKER_HOST": f"unix://{engine_sock}", "BOINCD_CONFIG": os.devnull}
    with (
        serving(_UnixHTTPServer(str(daemon_sock), _Fake), daemon_routes),
        serving(_UnixHTTPServer(str(engine_sock), _Fake), ENGINE_ROUTES),
    ):
        daemon, engine, mine = doctor_cli.gather_facts(str(daemon_sock), env)
    assert daemon.answered
    assert daemon.version == "0.9.0"
    assert daemon.may_change is False
    assert daemon.access_detail == "uid 65534 may read but not change"
    assert engine.seen_by == "daemon"
    assert engine.host_source == "DOCKER_HOST"  # the same engine as this shell's DOCKER_HOST
    assert mine is not None
    assert mine.reachable
    assert mine.seen_by == "user"
