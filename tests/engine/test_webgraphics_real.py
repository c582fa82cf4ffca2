"""Web graphics on the real engines: the real daemon relays 127.0.0.1:PORT to the app's
port inside a container that has no network, and nothing else of the host listens."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.testing.daemon import TEST_IMAGE, DaemonProcess
from boincd_containers.testing.podman import ENGINES, TestEngine

pytestmark = [pytest.mark.docker, pytest.mark.parametrize("engine", ENGINES, indirect=True)]

PAGE = "<!DOCTYPE html><title>gfx</title><h1>graphics of the container</h1>\n"


def listening_addresses(port: int) -> set[str]:
    """The local addresses listening on TCP `port` in the host's namespace (IPv4, IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # TCP_LISTEN
                found.add(address)
    return found


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def non_loopback_address() -> str | None:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # sends nothing: it only picks a source address
        address = str(probe.getsockname()[0])
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def wait_url(daemon: DaemonProcess, result: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        task = daemon.request("GET", f"/v1/tasks/{result}")
        graphics = task.get("web_graphics") or {}
        return graphics if graphics.get("url") else None

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        graphics = probe()
        if graphics is not None:
            return graphics
        time.sleep(0.1)
    raise AssertionError(f"no web graphics URL for {result}\n{daemon.log()}")


def test_graphics_port_answers_on_loopback_only_from_a_container_without_network(
    daemon: DaemonProcess, engine: TestEngine, short_tmp: Path
) -> None:
    slot = short_tmp / "slot"
    (slot / "www").mkdir(parents=True)
    (slot / "www" / "index.html").write_text(PAGE)
    result = "webgfx_0"
    daemon.request(
        "POST",
        "/v1/tasks",
        {
            "result": result,
            "project": "test.example.org_proj",
            "slot_dir": str(slot),
            "image": TEST_IMAGE,
            # Port 80, as docker_wrapper apps use: with no capabilities the app
            # still binds it (the engines set ip_unprivileged_port_start=0).
            "command": ["httpd", "-f", "-p", "80", "-h", "/app/www"],
            "web_graphics": {"guest_port": 80},
        },
    )
    task = daemon.wait_task(result, {"created", "failed", "waiting"})
    assert task["state"] == "created", task
    data = engine.inspect(task["container_id"])
    assert data["HostConfig"]["NetworkMode"] == "none"
    assert not data["HostConfig"].get("PortBindings")
    graphics = wait_url(daemon, result)
    port = graphics["host_port"]
    assert graphics["url"] == f"http://127.0.0.1:{port}/"
    assert graphics["guest_port"] == 80
    assert graphics["error"] is None

    # Not started yet: the browser is told, the app is not reached.
    status, text = get(graphics["url"])
    assert status == 503
    assert "not started yet" in text

    daemon.request("POST", f"/v1/tasks/{result}/start")
    daemon.wait_task(result, {"running"})

    def page() -> tuple[int, str] | None:
        try:
            answer = get(graphics["url"])
        except (OSError, urllib.error.URLError):
            return None
        return answer if answer[0] == 200 else None  # 503 until httpd listens

    deadline = time.monotonic() + 30
    answer = page()
    while answer is None and time.monotonic() < deadline:
        time.sleep(0.2)
        answer = page()
    assert answer == (200, PAGE), daemon.log()

    # Listening on 127.0.0.1 only: not on 0.0.0.0, not on IPv6, not on the LAN address.
    assert listening_addresses(port) == {"0100007F"}
    address = non_loopback_address()
    if address is not None:
        with pytest.raises(ConnectionRefusedError), socket.create_connection((address, port), 5):
            pass

    # Paused (BOINC suspended the task): told at once instead of hanging.
    daemon.request("POST", f"/v1/tasks/{result}/pause")
    status, text = get(graphics["url"])
    assert status == 503
    assert "suspended" in text
    daemon.request("POST", f"/v1/tasks/{result}/resume")
    assert get(graphics["url"]) == (200, PAGE)

    # The task ends: the port closes.
    daemon.request("DELETE", f"/v1/tasks/{result}")
    deadline = time.monotonic() + 10
    while listening_addresses(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert listening_addresses(port) == set()
