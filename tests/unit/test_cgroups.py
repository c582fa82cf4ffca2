"""host/cgroups.py against fake sysfs/proc trees: v1 (legacy, hybrid, co-mounted), v2, the
Docker and Podman layouts, nested cgroup namespaces, and containers that went away."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from boincd_containers.host import cgroups
from boincd_containers.host.cgroups import (
    CgroupError,
    CgroupGone,
    CgroupReader,
    cgroup_mode,
    cgroup_version,
    delegated_controllers,
    net_dev,
    user_service_cgroup,
)

CID = "3f" * 32
OTHER = "ab" * 32
PID = 4242
V1_UNLIMITED = "9223372036854771712"

# Real layout, with the header lines split only to keep them under the line limit.
NET_DEV = (
    "Inter-|   Receive                                                |  Transmit\n"
    " face |bytes    packets errs drop fifo frame compressed multicast"
    "|bytes    packets errs drop fifo colls carrier compressed\n"
    "    lo:  999999      29    0    0    0     0          0         0"
    "   999999      29    0    0    0     0       0          0\n"
    "  eth0:    1500      10    0    0    0     0          0         0"
    "      700       5    0    0    0     0       0          0\n"
    # old kernels print no space after the colon
    "  eth1:100 1 0 0 0 0 0 0 20 1 0 0 0 0 0 0\n"
)


def v1_memory_stat(inactive_file: int) -> str:
    # The per-cgroup inactive_file differs on purpose: only the hierarchical
    # total_ figure may be used.
    return (
        "cache 4096\nrss 8192\ninactive_file 1\nactive_file 0\n"
        f"total_cache 4096\ntotal_rss 8192\ntotal_inactive_file {inactive_file}\n"
        "total_active_file 0\n"
    )


def v2_memory_stat(inactive_file: int) -> str:
    return f"anon 8192\nfile 4096\nactive_anon 0\ninactive_file {inactive_file}\nactive_file 0\n"


class Tree:
    """A fake /sys/fs/cgroup and /proc under tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.sys = tmp_path / "sys"
        self.proc = tmp_path / "proc"
        self.sys.mkdir(parents=True)
        self.proc.mkdir(parents=True)

    def reader(self) -> CgroupReader:
        return CgroupReader(sys_root=str(self.sys), proc_root=str(self.proc))

    def proc_cgroup(self, pid: int, text: str) -> None:
        d = self.proc / str(pid)
        d.mkdir(exist_ok=True)
        (d / "cgroup").write_text(text)

    def proc_net(self, pid: int, text: str) -> None:
        d = self.proc / str(pid) / "net"
        d.mkdir(parents=True, exist_ok=True)
        (d / "dev").write_text(text)

    # -- v1 --

    V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer", "systemd")

    def v1_mounts(self, comount: bool = False, hybrid: bool = False) -> None:
        names = ["memory", "pids", "freezer", "systemd"]
        if comount:
            # systemd's layout: one cpu,cpuacct mount plus two alias symlinks
            names.append("cpu,cpuacct")
        else:
            names += ["cpu", "cpuacct"]
        for name in names:
            (self.sys / name).mkdir()
            (self.sys / name / "cgroup.procs").write_text("1\n")
        if comount:
            os.symlink("cpu,cpuacct", self.sys / "cpu")
            os.symlink("cpu,cpuacct", self.sys / "cpuacct")
        if hybrid:
            (self.sys / "unified").mkdir()
            (self.sys / "unified" / "cgroup.controllers").write_text("")

    def v1_cgroup(
        self,
        rel: str,
        cpu_ns: int = 5_000_000,
        usage: int = 100_000,
        inactive: int = 30_000,
        limit: str = V1_UNLIMITED,
        pids: int = 3,
    ) -> None:
        def ctrl_dir(ctrl: str) -> Path:
            d = self.sys / ctrl / rel
            d.mkdir(parents=True, exist_ok=True)
            return d

        (ctrl_dir("cpuacct") / "cpuacct.usage").write_text(f"{cpu_ns}\n")
        mem = ctrl_dir("memory")
        (mem / "memory.usage_in_bytes").write_text(f"{usage}\n")
        (mem / "memory.stat").write_text(v1_memory_stat(inactive))
        (mem / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (ctrl_dir("pids") / "pids.current").write_text(f"{pids}\n")
        ctrl_dir("freezer")

    def v1_proc_lines(self, path: str, comount: bool = False) -> str:
        cpu = ["1:cpu,cpuacct"] if comount else ["1:cpu", "2:cpuacct"]
        lines = [*cpu, "3:memory", "4:pids", "5:freezer", "6:name=systemd"]
        return "".join(f"{line}:{path}\n" for line in lines) + f"0::{path}\n"

    # -- v2 --

    def v2_root(self, controllers: str = "cpuset cpu io memory pids") -> None:
        (self.sys / "cgroup.controllers").write_text(controllers + "\n")
        (self.sys / "cgroup.subtree_control").write_text(controllers + "\n")

    def v2_cgroup(
        self,
        rel: str,
        usage_usec: int = 7_000,
        usage: int = 200_000,
        inactive: int = 50_000,
        limit: str = "max",
        pids: int = 2,
        memory: bool = True,
    ) -> Path:
        d = self.sys / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "cgroup.procs").write_text("")
        (d / "cpu.stat").write_text(
            f"usage_usec {usage_usec}\nuser_usec {usage_usec - 1000}\nsystem_usec 1000\n"
        )
        if memory:
            (d / "memory.current").write_text(f"{usage}\n")
            (d / "memory.stat").write_text(v2_memory_stat(inactive))
            (d / "memory.max").write_text(f"{limit}\n")
            (d / "pids.current").write_text(f"{pids}\n")
        return d


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


# -- cgroup v1 ------------------------------------------------------------------------


def test_v1_docker_cgroupfs(tree: Tree) -> None:
    tree.v1_mounts(hybrid=True)
    tree.v1_cgroup(f"docker/{CID}", cpu_ns=123_456_789, usage=100_000, inactive=30_000)
    tree.proc_cgroup(PID, tree.v1_proc_lines(f"/docker/{CID}"))
    reader = tree.reader()
    assert reader.mode == "hybrid"
    assert reader.version == 1

    cg = reader.get(CID, PID)
    assert cg.version == 1
    assert cg.dedicated
    assert cg.cpu_dir == str(tree.sys / "cpuacct" / "docker" / CID)
    assert cg.cpu_time_ns() == 123_456_789
    mem = cg.memory()
    assert mem.usage_bytes == 100_000
    assert mem.inactive_file_bytes == 30_000
    assert mem.working_set_bytes == 70_000
    assert cg.memory_limit() is None  # v1's "unlimited" sentinel
    assert cg.pids_current() == 3
    sample = reader.sample(CID, PID)
    assert sample.cpu_time_ns == 123_456_789
    assert sample.memory == mem


def test_v1_limit_set(tree: Tree) -> None:
    tree.v1_mounts()
    tree.v1_cgroup(f"docker/{CID}", limit="268435456")
    tree.proc_cgroup(PID, tree.v1_proc_lines(f"/docker/{CID}"))
    reader = tree.reader()
    assert reader.mode == "legacy"
    assert reader.memory_limit(CID, PID) == 268_435_456


def test_v1_systemd_driver_comounted_cpu_cpuacct(tree: Tree) -> None:
    tree.v1_mounts(comount=True)
    rel = f"system.slice/docker-{CID}.scope"
    tree.v1_cgroup(rel, cpu_ns=42)
    tree.proc_cgroup(PID, tree.v1_proc_lines(f"/{rel}", comount=True))
    cg = tree.reader().get(CID, PID)
    assert cg.cpu_dir == str(tree.sys / "cpu,cpuacct" / rel)
    assert cg.cpu_time_ns() == 42


def test_v1_podman_cgroupfs(tree: Tree) -> None:
    tree.v1_mounts(hybrid=True)
    rel = f"libpod_parent/libpod-{CID}"
    tree.v1_cgroup(rel, cpu_ns=7)
    tree.proc_cgroup(PID, tree.v1_proc_lines(f"/{rel}"))
    cg = tree.reader().get(CID, PID)
    assert cg.memory_dir == str(tree.sys / "memory" / rel)
    assert cg.cpu_time_ns() == 7


def test_v1_nested_namespace_falls_back_to_layout(tree: Tree) -> None:
    # The daemon runs in its own cgroup namespace: the container's cgroup reads "/".
    tree.v1_mounts()
    tree.v1_cgroup(f"docker/{CID}", cpu_ns=99)
    tree.v1_cgroup(f"docker/{OTHER}", cpu_ns=1)
    tree.proc_cgroup(PID, tree.v1_proc_lines("/"))
    cg = tree.reader().get(CID, PID)
    assert cg.dedicated
    assert cg.cpu_time_ns() == 99


def test_v1_rootless_podman_shares_the_session_cgroup(tree: Tree) -> None:
    # Rootless Podman on v1 creates no cgroup: the container lives in the user's session.
    tree.v1_mounts()
    rel = "user.slice/user-1000.slice/session-3.scope"
    tree.v1_cgroup(rel, cpu_ns=5)
    tree.proc_cgroup(PID, tree.v1_proc_lines(f"/{rel}"))
    cg = tree.reader().get(CID, PID)
    assert not cg.dedicated
    assert cg.cpu_time_ns() == 5


def test_v1_without_pids_controller(tree: Tree) -> None:
    tree.v1_mounts()
    tree.v1_cgroup(f"docker/{CID}")
    shutil.rmtree(tree.sys / "pids")
    tree.proc_cgroup(PID, tree.v1_proc_lines(f"/docker/{CID}"))
    cg = tree.reader().get(CID, PID)
    assert cg.pids_dir is None
    assert cg.pids_current() is None


# -- cgroup v2 ------------------------------------------------------------------------


def test_v2_docker_systemd(tree: Tree) -> None:
    tree.v2_root()
    rel = f"system.slice/docker-{CID}.scope"
    tree.v2_cgroup(rel, usage_usec=7_000, usage=200_000, inactive=50_000, pids=2)
    tree.proc_cgroup(PID, f"0::/{rel}\n")
    reader = tree.reader()
    assert reader.mode == "unified"
    assert reader.version == 2

    cg = reader.get(CID, PID)
    assert cg.version == 2
    assert cg.dedicated
    assert cg.cpu_time_ns() == 7_000_000
    mem = cg.memory()
    assert (mem.usage_bytes, mem.working_set_bytes, mem.inactive_file_bytes) == (
        200_000,
        150_000,
        50_000,
    )
    assert cg.memory_limit() is None
    assert cg.pids_current() == 2


def test_v2_docker_cgroupfs_with_limit(tree: Tree) -> None:
    tree.v2_root()
    tree.v2_cgroup(f"docker/{CID}", limit="1073741824")
    tree.proc_cgroup(PID, f"0::/docker/{CID}\n")
    assert tree.reader().memory_limit(CID, PID) == 1 << 30


def test_v2_podman_nested_namespace_skips_conmon(tree: Tree) -> None:
    tree.v2_root()
    tree.v2_cgroup(f"machine.slice/libpod-conmon-{CID}.scope", usage_usec=1)
    tree.v2_cgroup(f"machine.slice/libpod-{CID}.scope", usage_usec=300)
    tree.proc_cgroup(PID, "0::/\n")
    cg = tree.reader().get(CID, PID)
    assert cg.cpu_dir == str(tree.sys / "machine.slice" / f"libpod-{CID}.scope")
    assert cg.cpu_time_ns() == 300_000


def test_v2_podman_crun_container_subgroup_from_proc(tree: Tree) -> None:
    # crun may move the payload into a "container" child of the scope; /proc says so.
    tree.v2_root()
    rel = f"machine.slice/libpod-{CID}.scope/container"
    tree.v2_cgroup(rel, usage_usec=11)
    tree.proc_cgroup(PID, f"0::/{rel}\n")
    assert tree.reader().cpu_time_ns(CID, PID) == 11_000


def test_v2_rootless_podman_user_slice(tree: Tree) -> None:
    tree.v2_root()
    service = user_service_cgroup(1000)
    tree.v2_cgroup(f"{service}/user.slice/libpod-{CID}.scope", usage_usec=5)
    tree.proc_cgroup(PID, "0::/\n")
    assert tree.reader().cpu_time_ns(CID, PID) == 5_000


def test_v2_outside_namespace_and_custom_parent_found_by_walk(tree: Tree) -> None:
    # "/.." paths: the container sits outside the daemon's namespace, under a parent
    # no known layout names, so only the bounded walk can find it.
    tree.v2_root()
    tree.v2_cgroup(f"boinc.slice/tasks/{CID}", usage_usec=77)
    tree.proc_cgroup(PID, f"0::/../../tasks/{CID}\n")
    cg = tree.reader().get(CID, PID)
    assert cg.cpu_dir == str(tree.sys / "boinc.slice" / "tasks" / CID)
    assert cg.cpu_time_ns() == 77_000


def test_v2_memory_controller_not_delegated(tree: Tree) -> None:
    tree.v2_root(controllers="cpu")
    tree.v2_cgroup(f"docker/{CID}", memory=False)
    tree.proc_cgroup(PID, f"0::/docker/{CID}\n")
    cg = tree.reader().get(CID, PID)
    assert cg.memory_dir is None
    assert cg.pids_current() is None
    with pytest.raises(CgroupError, match="memory controller") as info:
        cg.memory()
    assert not isinstance(info.value, CgroupGone)


def test_working_set_is_floored_at_zero(tree: Tree) -> None:
    tree.v2_root()
    tree.v2_cgroup(f"docker/{CID}", usage=1_000, inactive=5_000)
    tree.proc_cgroup(PID, f"0::/docker/{CID}\n")
    assert tree.reader().memory(CID, PID).working_set_bytes == 0


def test_unknown_container_is_an_error_not_gone(tree: Tree) -> None:
    tree.v2_root()
    tree.proc_cgroup(PID, "0::/\n")
    with pytest.raises(CgroupError, match="no cgroup found") as info:
        tree.reader().get(CID, PID)
    assert not isinstance(info.value, CgroupGone)


# -- caching --------------------------------------------------------------------------


def test_resolution_is_cached_until_pid_changes(tree: Tree) -> None:
    tree.v2_root()
    tree.v2_cgroup(f"docker/{CID}", usage_usec=1)
    tree.v2_cgroup(f"elsewhere/{CID}", usage_usec=2)
    tree.proc_cgroup(PID, f"0::/docker/{CID}\n")
    reader = tree.reader()
    first = reader.get(CID, PID)
    # Resolution does not run again: even a changed /proc file is not reread.
    (tree.proc / str(PID) / "cgroup").write_text(f"0::/elsewhere/{CID}\n")
    assert reader.get(CID, PID) is first
    assert reader.cpu_time_ns(CID, PID) == 1_000
    # A restarted container has a new init pid, and is resolved again.
    tree.proc_cgroup(PID + 1, f"0::/elsewhere/{CID}\n")
    assert reader.cpu_time_ns(CID, PID + 1) == 2_000
    reader.forget(CID)
    assert reader.get(CID, PID + 1) is not first


# -- gone -----------------------------------------------------------------------------


def test_gone_after_the_cgroup_is_removed(tree: Tree) -> None:
    tree.v1_mounts()
    tree.v1_cgroup(f"docker/{CID}")
    tree.proc_cgroup(PID, tree.v1_proc_lines(f"/docker/{CID}"))
    reader = tree.reader()
    first = reader.get(CID, PID)
    for ctrl in ("cpuacct", "memory", "pids", "freezer"):
        shutil.rmtree(tree.sys / ctrl / "docker" / CID)
    with pytest.raises(CgroupGone):
        first.cpu_time_ns()
    with pytest.raises(CgroupGone):
        first.memory()
    with pytest.raises(CgroupGone):
        reader.sample(CID, PID)
    # The reader dropped its entry, so a later start resolves afresh.
    tree.v1_cgroup(f"docker/{CID}", cpu_ns=1)
    assert reader.get(CID, PID) is not first


def test_gone_when_the_process_is_gone(tree: Tree) -> None:
    tree.v2_root()
    tree.v2_cgroup(f"docker/{CID}")
    reader = tree.reader()
    with pytest.raises(CgroupGone):
        reader.get(CID, PID)  # no /proc/<pid>
    with pytest.raises(CgroupGone):
        reader.get(CID, 0)  # what inspect reports for a stopped container


def test_gone_when_the_process_exits_during_resolution(tree: Tree) -> None:
    # /proc/<pid>/cgroup names a directory already removed, and the process is gone by
    # the time the fallback search fails.
    tree.v2_root()
    tree.proc_cgroup(PID, f"0::/docker/{CID}\n")
    real_find = cgroups._find_by_id

    def find_then_exit(base: str, cid: str) -> str | None:
        shutil.rmtree(tree.proc / str(PID))
        return real_find(base, cid)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cgroups, "_find_by_id", find_then_exit)
        with pytest.raises(CgroupGone):
            tree.reader().get(CID, PID)


def test_enodev_on_read_means_gone(tree: Tree) -> None:
    # Reading a file whose cgroup was removed while it was open fails with ENODEV.
    tree.v2_root()
    tree.v2_cgroup(f"docker/{CID}")
    tree.proc_cgroup(PID, f"0::/docker/{CID}\n")
    cg = tree.reader().get(CID, PID)

    def enodev(fd: int, n: int) -> bytes:
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))

    # Patched only around the call: os is shared with pytest itself.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "read", enodev)
        with pytest.raises(CgroupGone):
            cg.cpu_time_ns()


def test_permission_denied_is_an_error_not_gone(tree: Tree) -> None:
    tree.v2_root()
    tree.v2_cgroup(f"docker/{CID}")
    tree.proc_cgroup(PID, f"0::/docker/{CID}\n")
    cg = tree.reader().get(CID, PID)

    def denied(path: str, flags: int) -> int:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "open", denied)
        with pytest.raises(CgroupError) as info:
            cg.cpu_time_ns()
    assert not isinstance(info.value, CgroupGone)


def test_malformed_file_is_an_error(tree: Tree) -> None:
    tree.v2_root()
    d = tree.v2_cgroup(f"docker/{CID}")
    (d / "memory.current").write_text("lots\n")
    (d / "cpu.stat").write_text("user_usec 1\n")
    tree.proc_cgroup(PID, f"0::/docker/{CID}\n")
    cg = tree.reader().get(CID, PID)
    with pytest.raises(CgroupError, match="expected an integer"):
        cg.memory()
    with pytest.raises(CgroupError, match="usage_usec"):
        cg.cpu_time_ns()


# -- network --------------------------------------------------------------------------


def test_net_dev_excludes_loopback(tree: Tree) -> None:
    tree.proc_net(PID, NET_DEV)
    assert net_dev(PID, proc_root=str(tree.proc)) == (1500 + 100, 700 + 20)


def test_net_dev_loopback_only(tree: Tree) -> None:
    tree.proc_net(PID, "\n".join(NET_DEV.splitlines()[:3]) + "\n")
    assert net_dev(PID, proc_root=str(tree.proc)) == (0, 0)


def test_net_dev_of_a_gone_process(tree: Tree) -> None:
    with pytest.raises(CgroupGone):
        net_dev(PID, proc_root=str(tree.proc))


def test_container_net_dev_checks_the_cgroup_still_exists(tree: Tree) -> None:
    # After an exit the pid may be reused by another process: its traffic is not ours.
    tree.v2_root()
    d = tree.v2_cgroup(f"docker/{CID}")
    tree.proc_cgroup(PID, f"0::/docker/{CID}\n")
    tree.proc_net(PID, NET_DEV)
    reader = tree.reader()
    assert reader.net_dev(CID, PID) == (1600, 720)
    shutil.rmtree(d)
    with pytest.raises(CgroupGone):
        reader.net_dev(CID, PID)


# -- host facts -----------------------------------------------------------------------


def test_modes(tmp_path: Path) -> None:
    legacy, hybrid, unified, empty = (Tree(tmp_path / n) for n in ("l", "h", "u", "e"))
    legacy.v1_mounts()
    hybrid.v1_mounts(hybrid=True)
    unified.v2_root()
    assert cgroup_mode(str(legacy.sys)) == "legacy"
    assert cgroup_mode(str(hybrid.sys)) == "hybrid"
    assert cgroup_mode(str(unified.sys)) == "unified"
    assert cgroup_version(str(hybrid.sys)) == 1
    assert cgroup_version(str(unified.sys)) == 2
    with pytest.raises(CgroupError, match="no cgroup filesystem"):
        cgroup_mode(str(empty.sys))


def test_delegated_controllers_v2(tree: Tree) -> None:
    tree.v2_root(controllers="cpuset cpu io memory hugetlb pids")
    service = tree.sys / user_service_cgroup(1000)
    service.mkdir(parents=True)
    (service / "cgroup.controllers").write_text("memory pids\n")
    (service / "cgroup.subtree_control").write_text("pids\n")

    root = delegated_controllers(str(tree.sys))
    assert root.version == 2
    assert {"cpu", "memory", "pids"} <= root.available
    user = delegated_controllers(str(tree.sys), user_service_cgroup(1000))
    assert user.available == frozenset({"memory", "pids"})
    assert user.subtree_control == frozenset({"pids"})
    missing = delegated_controllers(str(tree.sys), user_service_cgroup(1001))
    assert missing.available == frozenset()


def test_delegated_controllers_v1(tree: Tree) -> None:
    tree.v1_mounts(comount=True, hybrid=True)
    d = delegated_controllers(str(tree.sys))
    assert d.version == 1
    assert d.available == frozenset({"cpu", "cpuacct", "memory", "pids", "freezer"})
    assert d.subtree_control == d.available
