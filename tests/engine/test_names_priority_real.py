"""On the real engines: the container's processes at the task's priority, and
containers and images made under the old `boinc__` names adopted and renamed."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from boincd_containers.core import labels as L
from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess
from boincd_containers.testing.names import RUN_ID
from boincd_containers.testing.podman import ENGINES, TestEngine, daemon_env

pytestmark = [pytest.mark.docker, pytest.mark.parametrize("engine", ENGINES, indirect=True)]

PROJECT = f"test.example.org_names_{RUN_ID}"


def body(slot: Path, result: str, command: str, **extra: object) -> dict[str, object]:
    return {
        "result": result,
        "project": PROJECT,
        "slot_dir": str(slot),
        "image": TEST_IMAGE,
        "command": ["sh", "-c", command],
        "ncpus": 1,
        "memory_bytes": 64 * 2**20,
        **extra,
    }


def descendants(root: int) -> set[int]:
    """The root and every process below it, from /proc's parent pids."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            parent[int(name)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    found = {root}
    while True:
        more = {pid for pid, ppid in parent.items() if ppid in found} - found
        if not more:
            return found
        found |= more


def threads_of(engine: TestEngine, container_id: str) -> dict[int, tuple[int, int]]:
    """tid -> (nice, scheduling policy) of every thread of the container's processes."""
    out: dict[int, tuple[int, int]] = {}
    for pid in descendants(int(engine.inspect(container_id)["State"]["Pid"])):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                out[tid] = (os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(tid))
            except ProcessLookupError:
                continue
    return out


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_every_process_runs_at_the_shims_priority(
    daemon: DaemonProcess, engine: TestEngine, short_tmp: Path
) -> None:
    slot = short_tmp / "slot"
    slot.mkdir()
    # A process at start, and one forked seconds later by a process the daemon
    # already lowered (inherited) or not (caught at the next tick).
    command = "sleep 60 & sleep 2; sleep 60 & wait"
    idle = {"nice": 19, "idle": True}
    daemon.request("POST", "/v1/tasks", body(slot, "prio_0", command, priority=idle))
    task = daemon.wait_task("prio_0", {"created"})
    assert task["priority"] == idle
    task = daemon.request("POST", "/v1/tasks/prio_0/start")
    assert task["state"] == "running"
    low = (19, os.SCHED_IDLE)
    wait_for(
        lambda: (
            len(t := threads_of(engine, task["container_id"])) >= 3 and set(t.values()) == {low}
        ),
        20,
        "every process of the container at nice 19, SCHED_IDLE",
    )


def test_above_idle_the_container_is_not_lowered_past_it(
    daemon: DaemonProcess, engine: TestEngine, short_tmp: Path
) -> None:
    slot = short_tmp / "slot"
    slot.mkdir()
    above = {"nice": 10, "idle": False}
    daemon.request("POST", "/v1/tasks", body(slot, "prio_1", "sleep 60", priority=above))
    daemon.wait_task("prio_1", {"created"})
    task = daemon.request("POST", "/v1/tasks/prio_1/start")
    wait_for(
        lambda: set(threads_of(engine, task["container_id"]).values()) == {(10, os.SCHED_OTHER)},
        20,
        "the container at nice 10",
    )


def test_a_container_under_the_old_name_is_adopted_and_renamed(
    short_tmp: Path, engine: TestEngine, test_image: str
) -> None:
    daemon = DaemonProcess(short_tmp, extra_env=daemon_env(engine), engine=engine)
    result = f"old_{uuid.uuid4().hex[:8]}"
    old_name = L.legacy_container_name(PROJECT, result)
    slot = short_tmp / "slot"
    slot.mkdir()
    try:
        daemon.start()
        owner = daemon.instance_id
        daemon.kill()
        # As an older daemon made it: our labels, the old name, running.
        labels = {L.OWNER: owner, L.PROJECT: PROJECT, L.RESULT: result, L.SLOT: str(slot)}
        args = [arg for k, v in labels.items() for arg in ("--label", f"{k}={v}")]
        cid = engine.cli("run", "-d", "--name", old_name, *args, test_image, "sleep", "300")
        daemon.start()
        task = daemon.wait_task(result, {"running"})
        assert task["container_id"] == cid
        assert task["name"] == L.container_name(PROJECT, result)
        assert engine.inspect(cid)["Name"].lstrip("/") == L.container_name(PROJECT, result)
        # The shim's create-or-attach finds it: no second container.
        attached = daemon.request("POST", "/v1/tasks", body(slot, result, "sleep 300"))
        assert attached["container_id"] == cid
    finally:
        daemon.kill()
        daemon.cleanup_engine_objects()
        engine.force_remove(old_name)


def test_an_image_built_under_the_old_name_is_renamed(
    short_tmp: Path, engine: TestEngine, test_image: str
) -> None:
    daemon = DaemonProcess(short_tmp, extra_env=daemon_env(engine), engine=engine)
    digest = uuid.uuid4().hex[:16]
    old, new = f"boinc__{PROJECT}__{digest}", L.built_image_name(PROJECT, digest)
    context = short_tmp / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(f'FROM {test_image}\nCMD ["true"]\n')
    try:
        daemon.start()
        owner = daemon.instance_id
        daemon.kill()
        engine.cli(
            "build", "-q", "-t", old, "--label", f"{L.OWNER}={owner}",
            "--label", f"{L.PROJECT}={PROJECT}", str(context),
        )  # fmt: skip
        image_id = engine.cli("image", "inspect", "--format", "{{.Id}}", old)
        daemon.start()
        wait_for(lambda: engine.has_image(new), 20, f"image {new}")
        assert engine.cli("image", "inspect", "--format", "{{.Id}}", new) == image_id
        wait_for(lambda: not engine.has_image(old), 20, f"old tag {old} gone")
    finally:
        daemon.kill()
        daemon.cleanup_engine_objects()
        engine.cli("rmi", "-f", old, new, check=False)


def test_two_projects_tasks_of_the_same_result_name_are_two_tasks(
    daemon: DaemonProcess, engine: TestEngine, short_tmp: Path
) -> None:
    """Result names are unique per project, not per host: each project's shim
    gets its own task and container, and never the other's."""
    from boincd_containers.shim.client import DaemonError

    other = "other.example.org_proj"
    slot_a, slot_b = short_tmp / "a", short_tmp / "b"
    slot_a.mkdir()
    slot_b.mkdir()
    daemon.request("POST", "/v1/tasks", body(slot_a, "dup_1", "sleep 60"))
    daemon.request("POST", "/v1/tasks", {**body(slot_b, "dup_1", "sleep 60"), "project": other})
    mine = daemon.wait_task("dup_1", {"created"}, 60, project=PROJECT)["container_id"]
    theirs = daemon.wait_task("dup_1", {"created"}, 60, project=other)["container_id"]
    assert mine != theirs
    assert engine.inspect(mine)["Name"].lstrip("/") == L.container_name(PROJECT, "dup_1")
    assert engine.inspect(theirs)["Name"].lstrip("/") == L.container_name(other, "dup_1")
    # Without the project the result name is ambiguous: said, not guessed.
    with pytest.raises(DaemonError) as ambiguous:
        daemon.request("GET", "/v1/tasks/dup_1")
    assert ambiguous.value.status == 409
    daemon.request("DELETE", f"/v1/tasks/dup_1?project={other}")
    with pytest.raises(DaemonError) as gone:
        daemon.request("GET", f"/v1/tasks/dup_1?project={other}")
    assert gone.value.status == 404
    assert daemon.request("GET", "/v1/tasks/dup_1")["container_id"] == mine
    assert engine.inspect(mine)["State"]["Status"] == "created"


def test_results_that_differ_only_in_characters_engines_refuse_are_two_tasks(
    daemon: DaemonProcess, engine: TestEngine, short_tmp: Path
) -> None:
    ids = []
    for n, result in enumerate(("c;x", "c x")):
        slot = short_tmp / f"s{n}"
        slot.mkdir()
        daemon.request("POST", "/v1/tasks", body(slot, result, "sleep 60"))
        ids.append(daemon.wait_task(result, {"created"})["container_id"])
    assert len(set(ids)) == 2
    names = {engine.inspect(i)["Name"].lstrip("/") for i in ids}
    assert names == {L.container_name(PROJECT, "c;x"), L.container_name(PROJECT, "c x")}
