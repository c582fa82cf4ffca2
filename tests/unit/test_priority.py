"""The container's processes at the shim's priority: the daemon's side (host/priority.py)
on real processes of this host, and the shim's (what it asks, what it reports)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from boincd_containers.core import labels as L
from boincd_containers.core.errors import BadRequest
from boincd_containers.host.priority import IDLE_NICE, Priority, hold, thread_ids_of
from boincd_containers.job.spec import container_config, parse_request
from boincd_containers.shim.runner import own_priority
from tests.unit.test_limits_shim import FakeChannel, FakeDaemon, make_runner

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling")

# A process with a second thread, both busy doing nothing.
THREADED = (
    "import threading, time\n"
    "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
    "print('ready', flush=True); time.sleep(60)\n"
)


@pytest.fixture
def threaded() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", THREADED], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def nice_and_policy(tid: int) -> tuple[int, int]:
    return os.getpriority(os.PRIO_PROCESS, tid), os.sched_getscheduler(tid)


def test_every_thread_goes_down_to_idle(threaded: subprocess.Popen[str]) -> None:
    tids = thread_ids_of([threaded.pid])
    assert len(tids) == 2
    result = hold(tids, Priority(IDLE_NICE, idle=True))
    assert result.threads == 2
    assert result.changed == 4  # nice and policy of each
    for tid in tids:
        assert nice_and_policy(tid) == (19, os.SCHED_IDLE)
    # Already there: nothing more to change.
    assert hold(tids, Priority(IDLE_NICE, idle=True)).changed == 0


def test_priority_is_only_ever_lowered(threaded: subprocess.Popen[str]) -> None:
    tids = thread_ids_of([threaded.pid])
    hold(tids, Priority(15))
    result = hold(tids, Priority(10))  # a higher priority than the app's own
    assert result.changed == 0
    assert {nice_and_policy(tid)[0] for tid in tids} == {15}


def test_gone_threads_are_skipped() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert hold([proc.pid], Priority(19)).changed == 0
    assert thread_ids_of([proc.pid]) == []


def test_a_bad_priority_is_a_bad_request() -> None:
    body = {"result": "r", "project": "p", "slot_dir": "/tmp", "image": "i"}
    for bad in ({"nice": 20}, {"nice": -1}, {"nice": "19"}, {"nice": True}, {"nice": 5, "idle": 1}):
        with pytest.raises(BadRequest, match="priority"):
            parse_request({**body, "priority": bad})
    request = parse_request({**body, "priority": {"nice": 19, "idle": True}})
    assert request.priority == Priority(19, True)
    labels = container_config(
        request, "img", owner_id="me", uid=0, gid=0, pids_limit=1, network_name="none"
    )["Labels"]
    assert Priority.from_labels(labels) == Priority(19, True)
    assert labels[L.NICE] == "19"


def test_the_shim_asks_for_its_own_priority() -> None:
    script = (
        "import json, os; os.nice(19); "
        "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)); "
        "from boincd_containers.shim.runner import own_priority; print(json.dumps(own_priority()))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '{"nice": 19, "idle": true}'
    assert own_priority()["nice"] == os.getpriority(os.PRIO_PROCESS, 0)


def run_task(tmp_path: Path) -> tuple[FakeDaemon, FakeChannel]:
    daemon = FakeDaemon({"state": "created", "wss_bytes": 40_000_000})

    def finish_after_start(d: FakeDaemon, method: str, url: str, body: object) -> None:
        if url.endswith("/start"):
            d.task.update(state="exited", exit_code=0, pid=0)

    daemon.on_call = finish_after_start
    channel = FakeChannel()
    assert make_runner(tmp_path, daemon, channel).run() == 0
    return daemon, channel


def test_at_idle_priority_no_other_pid_is_reported(tmp_path: Path) -> None:
    os.nice(0)  # this test process is not at idle, unless the runner of the tests is
    if os.getpriority(os.PRIO_PROCESS, 0) >= IDLE_NICE:
        daemon, channel = run_task(tmp_path)
        assert all(r.other_pid is None for r in channel.reports)
        return
    pid = os.fork()
    if pid == 0:  # a child at nice 19 runs the task, as the client starts a CPU task
        code = 1
        try:
            os.nice(IDLE_NICE)
            daemon, channel = run_task(tmp_path)
            created = next(b for m, u, b in daemon.calls if u == "/v1/tasks")
            ok = (
                all(r.other_pid is None for r in channel.reports)
                and created["priority"]["nice"] == IDLE_NICE
                and any(r.wss == 40_000_000 for r in channel.reports)
            )
            code = 0 if ok else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_above_idle_other_pid_names_the_container_then_is_withdrawn(tmp_path: Path) -> None:
    if os.getpriority(os.PRIO_PROCESS, 0) >= IDLE_NICE:
        pytest.skip("the tests run at idle priority")
    daemon = FakeDaemon({"state": "created"})
    channel = FakeChannel()
    runs = {"n": 0}

    def exit_later(d: FakeDaemon, method: str, url: str, body: object) -> None:
        if d.task.get("state") == "running" and method == "GET":
            runs["n"] += 1
            if runs["n"] > 2:
                d.task.update(state="exited", exit_code=0)

    daemon.on_call = exit_later
    assert make_runner(tmp_path, daemon, channel).run() == 0
    assert any(r.other_pid == 4242 for r in channel.reports)
    assert channel.reports[-1].other_pid == os.getpid()
    assert "<wss>" not in channel.reports[-1].encode()  # the daemon gave no figure
