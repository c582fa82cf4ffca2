"""What a volunteer's host does to a task, under both client releases, on Docker.

The client runs as a volunteer runs it: without --allow_multiple_clients, on a
host whose engine it detects (a local `hello-world`, boincd_containers/testing/volunteer.py), with a
`boinc__` container that is not ours. A client 8.2 then runs its docker cleanup
at every start (client/cs_apps.cpp `docker_cleanup`): it must remove the decoy
(its message "Removed unused Docker container" proves the cleanup ran) and
leave our task's container alone whatever the app version's plan class. Under
7.20 the decoy stays.

The task counts to 25 in its slot, one line a second, with the count in the
shell's memory: a container started again from scratch writes more than 25
lines, one that lost its process writes fewer or stops. So "the same container
goes on and the count is exactly 25" is checked as the file `1..25`, in order,
and the container id and start time unchanged across the client's quit or
SIGKILL and its restart.

Priority: at default preferences (suspend_cpu_usage 25) the client suspends
everything when non-BOINC processes use more than 25 % of the CPUs, skipping
processes at nice 19 (lib/procinfo.cpp `procinfo_non_boinc`). A CPU task runs
at nice 19 and its container's processes must too; an above-idle task (here
avg_ncpus 0.5: nice 10, client/app_start.cpp) needs other_pid instead. Neither
may ever see "CPU is busy". Other load on the host counts as non-BOINC too: on
a busy shared machine these tests can see a "CPU is busy" that is not ours
(the assertion says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.core import labels as L
from boincd_containers.shim.pyz import build_pyz
from boincd_containers.testing.boinc import (
    BoincClient,
    ClientBinaries,
    ResultSpec,
    Task,
    single_client_lock,
    start_shim_client,
)
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess, container_state, docker
from boincd_containers.testing.names import unique
from boincd_containers.testing.volunteer import (
    container_exists,
    decoy_container,
    hello_world_image,
    wait_for_no_live_boinc_containers,
)

pytestmark = [pytest.mark.boinc, pytest.mark.docker, pytest.mark.slow]

TICKS = 25
# One line a second, the count kept in the shell: a restart from scratch
# starts again at 1. `:` last, so the shell stays the container's init.
COUNT = (
    f"i=0; while [ $i -lt {TICKS} ]; do i=$((i+1)); echo $i >> count.txt; sleep 1; done; "
    "cp count.txt out.txt; :"
)
EXPECTED_COUNT = "".join(f"{i}\n" for i in range(1, TICKS + 1))

BURN_S = 20
# Busy on one CPU for BURN_S s of wall time, then the container's own CPU time
# from its cgroup (v1 cpuacct, or v2 cpu.stat), in ns, into busy.txt.
BURN = (
    f"end=$(($(date +%s)+{BURN_S})); while [ $(date +%s) -lt $end ]; do :; done; "
    "if [ -r /sys/fs/cgroup/cpuacct/cpuacct.usage ]; then "
    "cat /sys/fs/cgroup/cpuacct/cpuacct.usage > busy.txt; "
    "else while read k v; do [ $k = usage_usec ] && echo ${v}000 > busy.txt; done "
    "< /sys/fs/cgroup/cpu.stat; fi; cp busy.txt out.txt; :"
)


def job_toml(command: str) -> bytes:
    # A JSON string is a TOML basic string.
    argv = json.dumps(["sh", "-c", command])
    return f"image = {json.dumps(TEST_IMAGE)}\ncommand = {argv}\n".encode()


@pytest.fixture(scope="module")
def shim_pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pyz(tmp_path_factory.mktemp("pyz") / "boincd-shim.pyz", sys.executable)


@pytest.fixture
def volunteer_host(boinc_client: ClientBinaries) -> Iterator[str]:
    """Under the host's single-client lock: hello-world for the 8.2 probe and a
    `boinc__` decoy; yields the decoy's name. All removed at the end."""
    with single_client_lock(), hello_world_image(), decoy_container() as decoy:
        if boinc_client.cleans_up_docker:
            # Another session's live task under the old name would be destroyed.
            still = wait_for_no_live_boinc_containers()
            if still:
                print(f"warning: live boinc__ containers an 8.2 cleanup will remove: {still}")
        yield decoy


@pytest.fixture
def make_client(
    short_tmp: Path, daemon: DaemonProcess, shim_pyz: Path, boinc_client: ClientBinaries
) -> Iterator[Callable[..., BoincClient]]:
    clients: list[BoincClient] = []

    def make(job: bytes, result: str, **kwargs: Any) -> BoincClient:
        return start_shim_client(
            clients,
            short_tmp,
            shim_pyz,
            daemon.socket,
            boinc_client,
            job,
            [ResultSpec(result)],
            **kwargs,
        )

    try:
        yield make
    finally:
        for client in clients:
            client.close()


def containers_of(result: str) -> list[str]:
    return docker("ps", "-aq", "--no-trunc", "--filter", f"label={L.RESULT}={result}").split()


def the_container(client: BoincClient, result: str) -> dict[str, Any]:
    """The task's one container, once it runs (not paused)."""

    def probe() -> dict[str, Any] | None:
        ids = containers_of(result)
        if len(ids) != 1:
            return None
        with contextlib.suppress(RuntimeError):  # removed meanwhile
            data = container_state(ids[0])
            if data["State"]["Running"] and not data["State"]["Paused"]:
                return data
        return None

    found: dict[str, Any] = client.wait_for(probe, 60, "the task's container running")
    return found


def count_lines(client: BoincClient, result: str) -> int:
    slot = client.slot_dir(result)
    if slot is None or not (slot / "count.txt").exists():
        return 0
    return len((slot / "count.txt").read_text().splitlines())


def bodies(client: BoincClient) -> list[str]:
    return [m.body for m in client.messages()]


def check_the_cleanup(client: BoincClient, decoy: str) -> None:
    """8.2 removed the decoy at its start (its cleanup ran); 7.20 has none."""
    if client.binaries.cleans_up_docker:
        client.wait_for(
            lambda: f"Removed unused Docker container: {decoy}" in bodies(client),
            30,
            "the 8.2 client's docker cleanup removing the decoy",
        )
        assert not container_exists(decoy)
        assert any(b.startswith("Docker: version") and "(Docker)" in b for b in bodies(client))
    else:
        assert container_exists(decoy)
        assert not any("Removed unused Docker container" in b for b in bodies(client))


def check_init_data(client: BoincClient, result: str, plan_class: str) -> None:
    slot = client.slot_dir(result)
    assert slot is not None
    root = ET.parse(slot / "init_data.xml").getroot()
    host = root.find("host_info")
    assert host is not None
    if client.binaries.writes_docker_info:
        assert root.findtext("plan_class") == (plan_class or None)
        assert host.findtext("docker_version")
        assert host.findtext("docker_type")
    else:
        assert root.find("plan_class") is None
        assert host.find("docker_version") is None
        assert host.find("docker_type") is None


def cpu_busy_messages(client: BoincClient) -> list[str]:
    return [b for b in bodies(client) if "CPU is busy" in b]


# The plan class matters to 8.2's cleanup, not to how the client stopped: the
# SIGKILL case runs with the stricter one (no plan class, nothing spared).
@pytest.mark.parametrize(
    ("how", "plan_class"),
    [
        pytest.param("quit", "", id="quit-no_plan_class"),
        pytest.param("quit", "docker", id="quit-plan_class_docker"),
        pytest.param("sigkill", "", id="sigkill-no_plan_class"),
    ],
)
def test_client_restart_keeps_the_same_container_and_every_tick(
    make_client: Callable[..., BoincClient], volunteer_host: str, how: str, plan_class: str
) -> None:
    result = unique("count")
    client = make_client(
        job_toml(COUNT), result, allow_multiple_clients=False, plan_class=plan_class
    )
    assert "--allow_multiple_clients" not in client.command()
    first = the_container(client, result)
    cid, started = first["Id"], first["State"]["StartedAt"]
    check_the_cleanup(client, volunteer_host)
    check_init_data(client, result, plan_class)
    client.wait_for(lambda: count_lines(client, result) >= 5, 60, "five ticks")

    if how == "quit":
        client.stop()
        state = container_state(cid)["State"]
        assert (state["Running"], state["Paused"]) == (True, True), state
    else:
        client.kill()
        assert container_state(cid)["State"]["Running"] is True
    before = count_lines(client, result)
    assert before < TICKS, "the task ended before the client stopped; nothing was tested"

    client.start()
    # The cleanup of the new start (8.2) spared ours: the same container goes on.
    again = the_container(client, result)
    assert (again["Id"], again["State"]["StartedAt"]) == (cid, started)
    assert containers_of(result) == [cid]
    ours = again["Name"].lstrip("/")
    assert not any(f"Removed unused Docker container: {ours}" in b for b in bodies(client))

    task = client.wait_done(result, timeout=120)
    assert (task.state, task.exit_status) == ("uploading", 0), client.diagnostics()
    assert client.output_path(result).read_text() == EXPECTED_COUNT


# A volunteer's client at default preferences: suspend_cpu_usage 25 (which the
# harness sets to 0), and the host's own CPU count. The harness otherwise makes
# the client simulate one CPU per task, and a simulated count is also what the
# client divides the non-BOINC load by (client/cpu_sched.cpp sets p_ncpus): on
# one simulated CPU a quarter of one core of load anywhere on the host suspends
# it. mem_usage_debug logs the load the client measured, for the failure
# message.
DEFAULT_PREFS_HOST: dict[str, Any] = {
    "prefs": {"suspend_cpu_usage": 25},
    "cc_options": {"ncpus": -1},
    "log_flags": ("task", "task_debug", "mem_usage_debug"),
}


@dataclasses.dataclass(frozen=True)
class Burn:
    task: Task
    niced: str  # "" when every container process reached the nice value
    busy: list[str]  # "CPU is busy" messages
    host_load: float  # share of all CPUs busy at nice <= 0 meanwhile
    usage: list[str]  # the client's own "[mem_usage] non-BOINC CPU usage: X%" lines


def burn(client: BoincClient, result: str, nice: int) -> Burn:
    """Run the BURN task to its end, checking the priorities on the way."""
    data = the_container(client, result)
    with HostLoad() as load:
        shim = client.wait_for_task(result, lambda t: t.pid is not None, 30, "the shim's pid")
        assert shim.pid is not None
        assert nice_of(shim.pid) == nice, "the client started the shim at another priority"
        niced = reaches_nice(client, data["Id"], nice)

        # Until it ends, or the first suspension (which can last as long as
        # the load does).
        # Polled each second: this test's own processes are non-BOINC load too.
        def ended() -> Task | None:
            t = client.task(result)
            return t if t is not None and (t.done or cpu_busy_messages(client)) else None

        task = client.wait_for(ended, BURN_S + 90, "the task's end", interval=1)
    usage = [b for b in bodies(client) if "non-BOINC CPU usage" in b]
    return Burn(task, niced, cpu_busy_messages(client), load.share, usage)


def check_not_suspended(run: Burn) -> None:
    assert run.busy == [], (
        f"the client suspended computing: {run.busy}; meanwhile {run.host_load:.0%} of the "
        "host's CPUs ran at nice <= 0 (the client's limit is 25 %: above it, the load "
        "of other processes on this host is reason enough); "
        + (run.niced or "the container's processes were at the task's nice value")
        + f"; the client measured: {run.usage}"
    )


def test_cpu_bound_task_at_default_preferences_runs_unsuspended_with_exact_cpu_time(
    make_client: Callable[..., BoincClient],
) -> None:
    result = unique("burn")
    client = make_client(job_toml(BURN), result, **DEFAULT_PREFS_HOST)
    # The client runs a CPU task at nice 19; every process of its container
    # must run at the shim's own nice value.
    run = burn(client, result, 19)
    check_not_suspended(run)
    assert (run.task.state, run.task.exit_status) == ("uploading", 0)
    busy_s = int(client.output_path(result).read_text()) / 1e9
    assert busy_s > BURN_S / 4, busy_s  # it did burn
    assert run.task.final_cpu_time is not None
    assert run.task.final_cpu_time == pytest.approx(busy_s, rel=0.10)
    assert not run.niced, run.niced


def test_above_idle_task_is_not_suspended_either(
    make_client: Callable[..., BoincClient],
) -> None:
    result = unique("half")
    client = make_client(job_toml(BURN), result, avg_ncpus=0.5, **DEFAULT_PREFS_HOST)
    # A task of less than one CPU is "high priority" to the client: nice 10.
    run = burn(client, result, 10)
    check_not_suspended(run)
    assert (run.task.state, run.task.exit_status) == ("uploading", 0)
    assert not run.niced, run.niced


class HostLoad:
    """The share of all CPUs that ran at nice <= 0 over a span (/proc/stat's
    user + system + irq + softirq over all but steal/guest): what the client
    counts as non-BOINC load when ours runs niced."""

    def __init__(self) -> None:
        self.share = 0.0
        self._start: list[int] = []

    @staticmethod
    def _read() -> list[int]:
        return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]

    def __enter__(self) -> HostLoad:
        self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        d = [b - a for a, b in zip(self._start, self._read(), strict=True)]
        user, _nice, system, _idle, _iowait, irq, softirq, _steal = d
        total = sum(d[:7])
        self.share = (user + system + irq + softirq) / total if total else 0.0


def nice_of(pid: int) -> int:
    # /proc/PID/stat: the 19th field, counted after the ")" that ends the name.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


def container_nices(cid: str) -> set[int]:
    """Nice values of the container's processes now (the loop forks `date`),
    from /proc (ps prints "-" for a SCHED_IDLE process); empty once it ended."""
    try:
        out = docker("top", cid, "-eo", "pid").split()[1:]
    except RuntimeError:  # not running (any more)
        return set()
    nices = set()
    for pid in out:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # gone meanwhile
            nices.add(nice_of(int(pid)))
    return nices


def reaches_nice(client: BoincClient, cid: str, nice: int) -> str:
    """ "" once every process of the container runs at `nice` (the daemon renices
    at start and at each monitor tick), else what was seen, for the assertion."""
    seen: list[set[int]] = []

    def check() -> bool:
        seen.append(container_nices(cid))
        return seen[-1] == {nice}

    try:
        client.wait_for(check, 30, f"every process of the container at nice {nice}")
    except AssertionError:
        return f"container processes' nice values seen: {seen[:3]} ... {seen[-3:]}, not {nice}"
    return ""
