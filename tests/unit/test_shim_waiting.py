"""A task the daemon cannot prepare yet (a registry or engine down): said once,
retried with backoff, given up after the shim's limit; never a flood in stderr.txt."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.shim import runner as shim_runner
from boincd_containers.shim.boinc_api import TEMPORARY_EXIT_FILE
from boincd_containers.shim.runner import ShimConfig
from tests.unit.test_limits_shim import FakeChannel, FakeDaemon, make_runner

UNREACHABLE = {
    "code": "unavailable",
    "message": "image 127.0.0.1:1/x:1: registry unreachable",
    "retryable": True,
}


def waiting_daemon() -> FakeDaemon:
    daemon = FakeDaemon({"state": "waiting", "error": UNREACHABLE, "container_id": ""})

    def prepare_and_fail_again(d: FakeDaemon, method: str, url: str, body: Any) -> None:
        # Each create-or-attach prepares again, and the pull fails again.
        d.task["state"] = "preparing" if url == "/v1/tasks" else "waiting"

    daemon.on_call = prepare_and_fail_again
    return daemon


def test_a_waiting_task_is_said_once_retried_with_backoff_and_given_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shim_runner, "CREATE_RETRY_S", 0.2)
    daemon = waiting_daemon()
    runner = make_runner(tmp_path, daemon, FakeChannel())
    runner.config = ShimConfig(unreachable_limit_s=2.5, temporary_exit_delay_s=60)
    assert runner.run() == 0
    err = capsys.readouterr().err
    assert err.count("waiting: image 127.0.0.1:1/x:1: registry unreachable") == 1
    assert "the daemon is back" not in err
    assert "waiting for the daemon" not in err  # the daemon never left
    assert "could not be prepared" in err
    assert (tmp_path / TEMPORARY_EXIT_FILE).read_text().startswith("60\n")
    # 0.2, 0.4, 0.8, 1.6 s apart (±20 %): five asks in 2.5 s at most, not 25.
    creates = [u for m, u, _ in daemon.calls if m == "POST" and u == "/v1/tasks"]
    assert 2 <= len(creates) <= 5


def test_the_give_up_timer_is_not_restarted_by_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every daemon call succeeds; only the task waits. The limit still applies.
    daemon = waiting_daemon()
    runner = make_runner(tmp_path, daemon, FakeChannel())
    runner.config = ShimConfig(unreachable_limit_s=1.0)
    assert runner.run() == 0
    assert (tmp_path / TEMPORARY_EXIT_FILE).exists()


def test_use_gpu_without_a_gpu_from_boinc_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = FakeDaemon({"state": "created"})
    daemon.on_call = lambda d, m, u, b: (
        d.task.update(state="exited", exit_code=0) if u.endswith("/start") else None
    )
    runner = make_runner(tmp_path, daemon, FakeChannel())
    runner.job = runner.job._replace(use_gpu=True)
    assert runner.run() == 0
    assert "asks for a GPU (use_gpu) but BOINC assigned this task none" in capsys.readouterr().err


def test_help_is_help_not_a_failed_task(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "boincd_containers.shim", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert done.stdout.startswith("usage: boincd-shim")
    assert not (tmp_path / "boinc_finish_called").exists()


def test_a_task_that_cannot_run_takes_its_container_with_it(tmp_path: Path) -> None:
    daemon = FakeDaemon({"state": "created"})

    def refuse_start(d: FakeDaemon, method: str, url: str, body: Any) -> None:
        if url.endswith("/start"):
            error = {"code": "engine", "message": "OCI runtime create failed", "retryable": False}
            d.task.update(state="failed", error=error)

    daemon.on_call = refuse_start
    runner = make_runner(tmp_path, daemon, FakeChannel())
    with pytest.raises(shim_runner.TaskFailed, match="OCI runtime create failed"):
        runner.run()
    assert ("DELETE", f"/v1/tasks/{daemon.task['result']}", None) in daemon.calls


def test_progress_is_told_a_line_every_few_seconds_at_most(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shim_runner, "PROGRESS_EVERY_S", 0.35)
    daemon = FakeDaemon({"state": "preparing", "container_id": ""})
    polls = {"n": 0}

    def pull_then_create(d: FakeDaemon, method: str, url: str, body: Any) -> None:
        if "/wait" in url:
            time.sleep(0.1)  # the daemon's long poll: an answer within a tick
        polls["n"] += 1
        n = polls["n"]
        d.task["progress"] = f"pulling app:1: 0 of 1 layers, {n} KiB of 40 KiB"
        if n > 20:  # about 2 s of pulling, then the container
            d.task.update(state="created", container_id="c" * 64, progress="")
        if url.endswith("/start"):
            d.task.update(state="exited", exit_code=0)

    daemon.on_call = pull_then_create
    assert make_runner(tmp_path, daemon, FakeChannel()).run() == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "pulling app:1" in line]
    # A new figure every 0.1 s, told at most every 0.35 s: a few lines, not 20.
    assert 2 <= len(lines) <= 8, lines
