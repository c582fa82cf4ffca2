"""Web graphics: the job key, the request field, the container's config, the daemon's
127.0.0.1 relay (with a fake opener instead of a container's namespace) and what
the shim tells the client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from boincd_containers.core import labels as L
from boincd_containers.core.errors import BadRequest
from boincd_containers.job.spec import container_config, parse_request
from boincd_containers.shim.boinc_api import AppChannel, Channel, web_graphics_reply
from boincd_containers.shim.client import DaemonClient
from boincd_containers.shim.initdata import parse_init_data
from boincd_containers.shim.jobfile import JobSpec
from boincd_containers.shim.runner import Runner, task_request
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.registry import Registry
from boincd_containers.tasks.state import TaskKey
from boincd_containers.watch.webgraphics import GraphicsUnavailable, Streams, WebGraphics

RESULT = "wu_gfx_0"
KEY = TaskKey("proj", RESULT)


def body(slot: Path, **extra: Any) -> dict[str, Any]:
    return {"result": RESULT, "project": "proj", "slot_dir": str(slot), "image": "img", **extra}


# -- the request --------------------------------------------------------------------


def test_request_carries_the_guest_port_only(tmp_path: Path) -> None:
    request = parse_request(body(tmp_path, web_graphics={"guest_port": 8080}))
    assert request.web_graphics is not None
    assert request.web_graphics.guest_port == 8080
    assert parse_request(body(tmp_path)).web_graphics is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"guest_port": 0}, "from 1 to 65535"),
        ({"guest_port": 65536}, "from 1 to 65535"),
        ({"guest_port": True}, "from 1 to 65535"),
        ({"guest_port": "80"}, "from 1 to 65535"),
        ({"guest_port": 80.0}, "from 1 to 65535"),
        ({}, "from 1 to 65535, not None"),
        # The host side is never the caller's to choose: no address, no port.
        ({"guest_port": 80, "host_ip": "0.0.0.0"}, "listens on 127.0.0.1 only"),
        ({"guest_port": 80, "host_port": 22}, "the daemon picks the host port"),
        (80, "wrong type"),
    ],
)
def test_bad_web_graphics_requests_are_refused(tmp_path: Path, value: Any, expected: str) -> None:
    with pytest.raises(BadRequest, match=expected):
        parse_request(body(tmp_path, web_graphics=value))


def test_container_publishes_no_port_and_keeps_its_network(tmp_path: Path) -> None:
    request = parse_request(body(tmp_path, web_graphics={"guest_port": 80}))
    config = container_config(
        request, "img", owner_id="me", uid=1, gid=1, pids_limit=10, network_name="bridge"
    )
    assert config["Labels"][L.WEB_GRAPHICS_PORT] == "80"
    host = config["HostConfig"]
    assert host["NetworkMode"] == "none"  # graphics give the app no network
    assert "PortBindings" not in host
    assert "PublishAllPorts" not in host
    assert "ExposedPorts" not in config
    # Port 80 without capabilities, on Podman as on Docker; in its own namespace only.
    assert host["Sysctls"] == {"net.ipv4.ip_unprivileged_port_start": "0"}
    plain = container_config(
        parse_request(body(tmp_path)),
        "img",
        owner_id="me",
        uid=1,
        gid=1,
        pids_limit=10,
        network_name="bridge",
    )
    assert L.WEB_GRAPHICS_PORT not in plain["Labels"]
    assert "Sysctls" not in plain["HostConfig"]


def test_record_reads_the_guest_port_from_its_label() -> None:
    record = TaskRecord(RESULT, "proj")
    record.apply_inspect({"Id": "c1", "Config": {"Labels": {L.WEB_GRAPHICS_PORT: "8080"}}})
    assert record.web_graphics_port == 8080
    for bad in ("", "0", "70000", "x", "\u00b2"):
        record.apply_inspect({"Id": "c1", "Config": {"Labels": {L.WEB_GRAPHICS_PORT: bad}}})
        assert record.web_graphics_port == 0


# -- the daemon's relay ---------------------------------------------------------------


class AppServer:
    """Stands for the app in the container: answers each connection with a page."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.opened: list[tuple[str, int]] = []

    async def __aenter__(self) -> AppServer:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            request = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n<h1>graphics</h1>" + request[:14])
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def opener(self, record: TaskRecord, guest_port: int) -> Streams:
        self.opened.append((record.container_id, guest_port))
        return await asyncio.open_connection("127.0.0.1", self.port)


def running_record(registry: Registry, port: int = 80) -> TaskRecord:
    record = TaskRecord(RESULT, "proj", container_id="c1", state="running", pid=4242)
    record.web_graphics_port = port
    registry.store.add(record)
    return record


@contextlib.asynccontextmanager
async def graphics(opener: Any) -> AsyncIterator[tuple[WebGraphics, Registry]]:
    registry = Registry(cast(Any, None), "me")
    web = WebGraphics(registry, opener=opener)
    try:
        yield web, registry
    finally:
        await web.close()


async def fetch(port: int, host: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def test_listens_on_loopback_only_and_relays_to_the_guest_port() -> None:
    async with AppServer() as app, graphics(app.opener) as (web, registry):
        record = running_record(registry, 8080)
        assert web.task_fields(record)["web_graphics"]["url"] is None  # not yet listening
        await web.sync()
        fields = web.task_fields(record)["web_graphics"]
        port = fields["host_port"]
        assert fields == {
            "guest_port": 8080,
            "host_port": port,
            "url": f"http://127.0.0.1:{port}/",
            "error": None,
        }
        listener = web._listeners[KEY]
        assert [s.getsockname()[0] for s in listener.server.sockets] == ["127.0.0.1"]
        page = await fetch(port)
        assert page.startswith(b"HTTP/1.0 200 OK")
        assert b"<h1>graphics</h1>GET / HTTP/1.0" in page
        assert app.opened == [("c1", 8080)]
        # Same port for as long as the task lives, whatever the syncs.
        await web.sync()
        assert web.task_fields(record)["web_graphics"]["host_port"] == port


async def test_other_addresses_of_the_host_do_not_answer() -> None:
    # Any non-loopback IPv4 address of this host: the listener must not be there.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: it only picks a route
        address = probe.getsockname()[0]
    except OSError:
        pytest.skip("no route: this host has no non-loopback IPv4 address")
    finally:
        probe.close()
    if address.startswith("127."):
        pytest.skip("this host has no non-loopback IPv4 address")
    async with AppServer() as app, graphics(app.opener) as (web, registry):
        record = running_record(registry)
        await web.sync()
        port = web.task_fields(record)["web_graphics"]["host_port"]
        with pytest.raises(ConnectionRefusedError):
            await fetch(port, address)


async def test_a_task_not_running_is_not_reached_and_a_gone_task_stops_listening() -> None:
    async with AppServer() as app, graphics(app.opener) as (web, registry):
        record = running_record(registry)
        record.state, record.pid = "created", 0
        await web.sync()
        port = web.task_fields(record)["web_graphics"]["host_port"]
        page = await fetch(port)  # told at once, without reaching the app
        assert page.startswith(b"HTTP/1.0 503")
        assert b"has not started yet" in page
        record.state, record.pid = "paused", 4242
        assert b"The task is suspended" in await fetch(port)
        assert app.opened == []
        registry.store.drop(registry.get(RESULT))
        await web.sync()
        assert web._listeners == {}
        with pytest.raises(ConnectionRefusedError):
            await fetch(port)


async def test_a_task_without_graphics_gets_no_listener() -> None:
    async with AppServer() as app, graphics(app.opener) as (web, registry):
        record = running_record(registry, port=0)
        await web.sync()
        assert web._listeners == {}
        assert web.task_fields(record) == {"web_graphics": None}


async def test_a_namespace_that_cannot_be_entered_is_said_in_the_task() -> None:
    async def refuse(record: TaskRecord, guest_port: int) -> Streams:
        raise GraphicsUnavailable(1, "setns needs CAP_SYS_ADMIN")

    async with graphics(refuse) as (web, registry):
        record = running_record(registry)
        await web.sync()
        port = web.task_fields(record)["web_graphics"]["host_port"]
        page = await fetch(port)
        assert page.startswith(b"HTTP/1.0 503")
        assert b"cannot be shown: setns needs CAP_SYS_ADMIN" in page
        assert web.task_fields(record)["web_graphics"]["error"] == "setns needs CAP_SYS_ADMIN"


async def test_an_app_not_listening_yet_is_said_and_the_listener_stays() -> None:
    async def refused(record: TaskRecord, guest_port: int) -> Streams:
        raise ConnectionRefusedError(111, "Connection refused")

    async with graphics(refused) as (web, registry):
        record = running_record(registry)
        await web.sync()
        port = web.task_fields(record)["web_graphics"]["host_port"]
        page = await fetch(port)
        assert page.startswith(b"HTTP/1.0 503")
        assert b"nothing answers on port 80 in its container" in page
        assert web.task_fields(record)["web_graphics"]["error"] is None
        assert KEY in web._listeners


# -- the shim -----------------------------------------------------------------------


def test_reply_message_is_what_boinc_web_graphics_url_sends() -> None:
    url = "http://127.0.0.1:40000/"
    assert web_graphics_reply(url) == f"<web_graphics_url>{url}</web_graphics_url>\n"
    for bad in ("http://x/<b>", "http://x/" + "a" * 250, "http://\u00e9/"):
        with pytest.raises(ValueError, match="not a URL the client can keep"):
            web_graphics_reply(bad)


class FakeDaemon:
    def request(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no daemon call expected")


def make_runner(slot: Path, guest_port: int | None) -> tuple[Runner, AppChannel]:
    (slot / "boinc_mmap_file").write_bytes(b"\0" * 8192)
    channel = AppChannel.open(slot)
    init = parse_init_data(
        f"<app_init_data><result_name>{RESULT}</result_name><ncpus>1</ncpus>"
        "<project_dir>/p/projects/proj</project_dir></app_init_data>"
    )
    job = JobSpec(
        slot_dir=str(slot), project_dir=None, image="img", web_graphics_guest_port=guest_port
    )
    runner = Runner(init, job, channel, cast(DaemonClient, FakeDaemon()), slot)
    return runner, channel


def test_shim_asks_for_graphics_only_when_the_job_has_them(tmp_path: Path) -> None:
    runner, channel = make_runner(tmp_path, 8080)
    with channel:
        request = task_request(runner.init, runner.job, tmp_path, True, {"nice": 19})
        assert request["web_graphics"] == {"guest_port": 8080}
        assert parse_request(request).web_graphics is not None
        runner.job = runner.job._replace(web_graphics_guest_port=None)
        assert "web_graphics" not in task_request(runner.init, runner.job, tmp_path, True)


def test_shim_sends_each_new_url_once_on_graphics_reply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runner, channel = make_runner(tmp_path, 80)
    with channel:
        runner.task = {"web_graphics": {"guest_port": 80, "host_port": None, "url": None}}
        runner._send_graphics_url()
        assert channel.get_msg(Channel.GRAPHICS_REPLY) is None  # no URL yet: nothing sent
        url = "http://127.0.0.1:40001/"
        runner.task = {"web_graphics": {"guest_port": 80, "host_port": 40001, "url": url}}
        runner._send_graphics_url()
        sent = channel.get_msg(Channel.GRAPHICS_REPLY)
        assert sent == f"<web_graphics_url>{url}</web_graphics_url>\n"
        runner._send_graphics_url()
        assert channel.get_msg(Channel.GRAPHICS_REPLY) is None  # the client has it already
        # Not on app_status: neither client reads the URL there.
        assert channel.get_msg(Channel.APP_STATUS) is None
        # A new URL (a restarted daemon) is sent as soon as the client read the last one.
        other = "http://127.0.0.1:40002/"
        runner.task["web_graphics"]["url"] = other
        channel.send_msg(Channel.GRAPHICS_REPLY, "<unread/>")
        runner._send_graphics_url()
        assert channel.get_msg(Channel.GRAPHICS_REPLY) == "<unread/>"
        runner._send_graphics_url()
        assert other in (channel.get_msg(Channel.GRAPHICS_REPLY) or "")
    err = capsys.readouterr().err
    assert err.count("web graphics at http://127.0.0.1:40001/ (container port 80)") == 1


def test_shim_says_once_why_graphics_are_unavailable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runner, channel = make_runner(tmp_path, 80)
    with channel:
        runner.task = {"web_graphics": {"guest_port": 80, "url": None, "error": "no setns"}}
        runner._send_graphics_url()
        runner._send_graphics_url()
    assert capsys.readouterr().err.count("web graphics unavailable: no setns") == 1


async def test_a_daemon_that_may_not_enter_namespaces_says_so_before_any_connection() -> None:
    registry = Registry(cast(Any, None), "me")
    web = WebGraphics(registry)
    web._probe = lambda: "setns needs CAP_SYS_ADMIN"
    try:
        record = running_record(registry)
        await web.sync()
        fields = web.task_fields(record)["web_graphics"]
        assert fields["error"] == "setns needs CAP_SYS_ADMIN"
        assert fields["url"] is not None  # the page tells the browser why
    finally:
        await web.close()


def test_this_process_may_enter_a_namespace_as_root() -> None:
    from boincd_containers.watch.webgraphics import can_enter_netns

    expected = None if os.geteuid() == 0 else "CAP_SYS_ADMIN"
    answer = can_enter_netns()
    if expected is None:
        assert answer is None
    else:
        assert answer is not None
        assert expected in answer
