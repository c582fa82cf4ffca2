"""GPU tasks on the real dockerd, with pretend NVIDIA cards (`gpu_backend = "fake:2"`):
the created containers ask for their card by UUID and see only it.

Creation only: this host has no GPU and no NVIDIA runtime. Docker 20.10
accepts such a create; it is `start` that fails ("could not select device
driver "nvidia" with capabilities: [[gpu]]"), so nothing here starts a GPU
container.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess, container_state, docker
from boincd_containers.testing.names import RUN_ID

pytestmark = pytest.mark.docker

PROJECT = f"test.example.org_gpu_{RUN_ID}"
GIB = 2**30


@pytest.fixture
def gpu_daemon(short_tmp: Path, test_image: str) -> Iterator[DaemonProcess]:
    """The real daemon with two pretend 8 GiB NVIDIA cards, BOINC numbers 0 and 1."""
    (short_tmp / "config.toml").write_text('relist_interval_s = 5.0\ngpu_backend = "fake:2"\n')
    process = DaemonProcess(short_tmp)
    try:
        yield process.start()
    finally:
        process.kill()
        process.cleanup_engine_objects()


def submit(daemon: DaemonProcess, base: Path, result: str, **extra: Any) -> dict[str, Any]:
    slot = base / result
    slot.mkdir(exist_ok=True)  # a task asked for again keeps its slot
    body = {
        "result": result,
        "project": PROJECT,
        "slot_dir": str(slot),
        "image": TEST_IMAGE,
        "command": ["sh", "-c", "sleep 300"],
        **extra,
    }
    daemon.request("POST", "/v1/tasks", body)
    deadline = time.monotonic() + 60
    task: dict[str, Any] = {}
    while time.monotonic() < deadline:
        task = daemon.request("GET", f"/v1/tasks/{result}")
        if task["state"] in ("created", "waiting", "failed"):
            return task
        time.sleep(0.1)
    raise AssertionError(f"{result} stayed {task.get('state')}\n{daemon.log()}")


def gpu(device_num: int, usage: float) -> dict[str, Any]:
    return {"gpu": {"type": "NVIDIA", "device_num": device_num, "usage": usage}}


def env_of(container_id: str) -> dict[str, str]:
    pairs = (e.split("=", 1) for e in container_state(container_id)["Config"]["Env"] or [])
    return {k: v for k, v in pairs}


def ctl_gpus_json(daemon: DaemonProcess) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "boincd_containers", "ctl", "gpus", "--json"],
        env={**os.environ, "BOINCD_SOCKET": daemon.socket},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_gpu_tasks_get_their_card_by_uuid_and_share_it(
    gpu_daemon: DaemonProcess, short_tmp: Path
) -> None:
    daemon = gpu_daemon
    devices = {d["boinc_num"]: d for d in daemon.request("GET", "/v1/gpus")["devices"]}
    assert sorted(devices) == [0, 1]
    card = devices[1]["uuid"]
    assert card != devices[0]["uuid"]

    first = submit(daemon, short_tmp, "gpu_a_0", **gpu(1, 0.5))
    assert first["state"] == "created", first
    assert first["gpus"] == [card]
    data = container_state(first["container_id"])
    requests = data["HostConfig"]["DeviceRequests"]
    assert len(requests) == 1, requests
    request = requests[0]
    # By UUID, never by count: Count 0 (unset) with one DeviceID. A count would
    # mean "the first N cards", whichever BOINC gave the task.
    assert request["Driver"] == "nvidia"
    assert request["DeviceIDs"] == [card]
    assert request.get("Count") in (0, None)
    assert request["Capabilities"] == [["gpu"]]
    env = env_of(first["container_id"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == card
    assert env["CUDA_VISIBLE_DEVICES"] == card
    # Half the card: half its 8 GiB as the MPS memory limit (container's card 0).
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=4096M"
    assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert data["Config"]["Labels"]["org.boinc.containers.gpus"] == card

    cpu = submit(daemon, short_tmp, "cpu_0")
    assert cpu["state"] == "created", cpu
    assert env_of(cpu["container_id"])["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert not container_state(cpu["container_id"])["HostConfig"]["DeviceRequests"]
    assert cpu["gpus"] == []

    second = submit(daemon, short_tmp, "gpu_b_0", **gpu(1, 0.5))
    assert second["state"] == "created", second
    second_requests = container_state(second["container_id"])["HostConfig"]["DeviceRequests"]
    assert second_requests[0]["DeviceIDs"] == [card]

    # The card is full: a third task is refused, retryably ("waiting" for its
    # next request), and nothing is created.
    third = submit(daemon, short_tmp, "gpu_c_0", **gpu(1, 0.6))
    assert third["state"] == "waiting", third
    assert third["container_id"] == ""
    error = third["error"]
    assert error["code"] == "busy"
    assert error["retryable"] is True
    assert "gpu_a_0" in error["message"]
    assert "gpu_b_0" in error["message"]
    names = docker(
        "ps", "-a", "--filter", f"name=boincd__{PROJECT}__gpu_c_0", "--format", "{{.Names}}"
    )
    assert names == ""

    snapshot = ctl_gpus_json(daemon)
    by_num = {d["boinc_num"]: d for d in snapshot["devices"]}
    assert by_num[1]["allocated"] == 1.0
    assert sorted(by_num[1]["tasks"]) == ["gpu_a_0", "gpu_b_0"]
    assert by_num[0]["allocated"] == 0.0
    shares = {s["result"]: s for s in snapshot["shares"]}
    assert set(shares) == {"gpu_a_0", "gpu_b_0"}
    for share in shares.values():
        assert share["gpus"] == [card]
        assert share["usage"] == 0.5
        assert share["budget_bytes"] == 4 * GIB
        assert share["over_budget"] is False

    # The shares come back from container labels after a daemon restart.
    daemon.stop()
    daemon.start()
    again = {s["result"]: s["gpus"] for s in ctl_gpus_json(daemon)["shares"]}
    assert again == {"gpu_a_0": [card], "gpu_b_0": [card]}

    # Once the shares are freed, the refused task, asked for again as its next
    # shim would, is prepared on its card.
    daemon.request("DELETE", "/v1/tasks/gpu_a_0")
    still = submit(daemon, short_tmp, "gpu_c_0", **gpu(1, 0.6))
    assert still["state"] == "waiting", still  # 0.5 + 0.6 still does not fit
    daemon.request("DELETE", "/v1/tasks/gpu_b_0")
    retried = submit(daemon, short_tmp, "gpu_c_0", **gpu(1, 0.6))
    assert retried["state"] == "created", retried
    assert retried["gpus"] == [card]
    assert env_of(retried["container_id"])["NVIDIA_VISIBLE_DEVICES"] == card
