"""The shim's side of limits and of the network switch, against a scripted daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from boincd_containers.shim.boinc_api import (
    BOINC_FINISH_CALLED_FILE,
    AppChannel,
    ControlMessages,
    StatusReport,
)
from boincd_containers.shim.client import DaemonClient
from boincd_containers.shim.initdata import parse_init_data
from boincd_containers.shim.jobfile import JobSpec
from boincd_containers.shim.runner import Runner

RESULT = "wu_1_0"


class FakeChannel:
    """The client's side of the mmap channel: heartbeats with the network switch."""

    def __init__(self, network_suspended: bool = False) -> None:
        self.network_suspended = network_suspended
        self.reports: list[StatusReport] = []
        self.polls = 0

    def poll(self) -> ControlMessages:
        # The shim polls every 0.1 s: a shim that never finishes fails the test.
        self.polls += 1
        if self.polls > 300:
            raise AssertionError("the shim did not finish the task")
        return ControlMessages(heartbeat=True, network_suspended=self.network_suspended)

    def send_status(self, report: StatusReport) -> bool:
        self.reports.append(report)
        return True

    def deliver_status(self, report: StatusReport, timeout_s: float) -> bool:
        self.reports.append(report)
        return True

    def status_consumed(self) -> bool:
        return True  # the client reads each report at once here


class FakeDaemon:
    """Answers as the daemon would; `on_call` lets a test move the task along."""

    def __init__(self, task: dict[str, Any]) -> None:
        self.task = {"result": RESULT, "container_id": "c" * 64, "pid": 4242, **task}
        self.calls: list[tuple[str, str, Any]] = []
        self.on_call: Any = None

    def request(self, method: str, url: str, body: Any = None, timeout: float | None = None) -> Any:
        if url.startswith("/v1/tasks/"):
            # Every task URL names the task's project (results are unique per
            # project only); recorded without it.
            base, _, query = url.partition("?")
            params = [p for p in query.split("&") if p]
            assert "project=proj" in params, url
            rest = [p for p in params if p != "project=proj"]
            url = base + ("?" + "&".join(rest) if rest else "")
        self.calls.append((method, url, body))
        if url.endswith("/network"):
            self.task["network_connected"] = body["connected"]
        elif url.endswith("/start"):
            self.task["state"] = "running"
        if self.on_call is not None:
            self.on_call(self, method, url, body)
        if url.endswith("/logs?tail=200"):
            return "app output\n"
        if method == "DELETE":
            return {"removed": RESULT}
        return dict(self.task)

    def verbs(self) -> list[str]:
        """The changes asked for, in order: "POST start", "POST network {...}"..."""
        out = []
        for method, url, body in self.calls:
            if method == "GET":
                continue
            shown = "" if body is None or url == "/v1/tasks" else f" {body}"
            out.append(f"{method} {url.rsplit('/', 1)[-1]}{shown}")
        return out

    def close(self) -> None:
        pass


def make_runner(
    slot: Path, daemon: FakeDaemon, channel: FakeChannel, network: bool = False
) -> Runner:
    init = parse_init_data(
        "<app_init_data>"
        f"<result_name>{RESULT}</result_name><project_dir>/p/projects/proj</project_dir>"
        "<rsc_disk_bound>1000000</rsc_disk_bound><ncpus>1</ncpus>"
        "</app_init_data>"
    )
    job = JobSpec(slot_dir=str(slot), project_dir=None, image="img", network=network)
    return Runner(init, job, cast(AppChannel, channel), cast(DaemonClient, daemon), slot)


def test_a_task_stopped_past_its_disk_bound_fails_as_boinc_fails_native_apps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    message = "disk limit exceeded: 2000000 bytes of 1000000"
    # `interrupted` as well (a re-attached task): the limit must win, never a restart.
    daemon = FakeDaemon(
        {
            "state": "exited",
            "exit_code": 137,
            "interrupted": True,
            "limit_exceeded": {"kind": "disk", "message": message},
        }
    )
    status = make_runner(tmp_path, daemon, FakeChannel()).run()
    assert status == 196  # EXIT_DISK_LIMIT_EXCEEDED
    assert (tmp_path / BOINC_FINISH_CALLED_FILE).read_text().splitlines()[:2] == [
        "196",
        message,
    ]
    assert message in capsys.readouterr().err
    assert "POST start" not in daemon.verbs()
    assert daemon.verbs()[-1] == "DELETE " + RESULT


def test_a_task_created_while_the_network_is_off_starts_disconnected_and_reconnects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = FakeDaemon({"state": "created", "network": True, "network_connected": True})
    channel = FakeChannel(network_suspended=True)

    def script(d: FakeDaemon, method: str, url: str, body: Any) -> None:
        if url.endswith("/start"):
            channel.network_suspended = False  # the volunteer allows network again
        elif url.endswith("/network") and body == {"connected": True}:
            d.task.update(state="exited", exit_code=0)

    daemon.on_call = script
    status = make_runner(tmp_path, daemon, channel, network=True).run()
    assert status == 0
    verbs = daemon.verbs()
    assert verbs[:4] == [
        "POST tasks",
        "POST network {'connected': False}",
        "POST start",
        "POST network {'connected': True}",
    ]
    err = capsys.readouterr().err
    assert "network disconnected" in err
    assert "network reconnected" in err


def test_a_job_without_network_never_touches_it(tmp_path: Path) -> None:
    daemon = FakeDaemon({"state": "created", "network": False, "network_connected": False})
    channel = FakeChannel(network_suspended=True)

    def script(d: FakeDaemon, method: str, url: str, body: Any) -> None:
        if url.endswith("/start"):
            channel.network_suspended = False
            d.task.update(state="exited", exit_code=0)

    daemon.on_call = script
    assert make_runner(tmp_path, daemon, channel).run() == 0
    assert not [v for v in daemon.verbs() if "network" in v]


def test_traffic_counters_go_to_the_client(tmp_path: Path) -> None:
    daemon = FakeDaemon({"state": "running", "rx_bytes": 5000, "tx_bytes": 700})
    channel = FakeChannel()

    def script(d: FakeDaemon, method: str, url: str, body: Any) -> None:
        if channel.reports:
            d.task.update(state="exited", exit_code=0)

    daemon.on_call = script
    assert make_runner(tmp_path, daemon, channel).run() == 0
    first = channel.reports[0]
    assert (first.bytes_received, first.bytes_sent) == (5000, 700)
    assert "<bytes_received>5000" in first.encode()
