"""The daemon's socket: created safely, never stolen from a live daemon, and every
bad request on it answered with a JSON 4xx."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from boincd_containers.core.errors import BoincdError
from boincd_containers.core.settings import Settings
from boincd_containers.daemon import routes as api
from boincd_containers.daemon.app import Daemon
from boincd_containers.daemon.server import (
    JsonErrorHandler,
    SocketInUse,
    prepare_socket_path,
    protocol_factory,
    secure_socket,
)
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.state import TaskState


def test_parent_dir_is_created(short_tmp: Path) -> None:
    path = short_tmp / "run" / "deeper" / "boincd.sock"
    prepare_socket_path(path)
    assert path.parent.is_dir()
    assert not path.exists()


def test_a_stale_socket_is_removed(short_tmp: Path) -> None:
    path = short_tmp / "boincd.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # a daemon that died without cleaning up leaves this behind
    assert path.is_socket()
    prepare_socket_path(path)
    assert not path.exists()


def test_a_live_daemon_socket_is_never_replaced(short_tmp: Path) -> None:
    path = short_tmp / "boincd.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(SocketInUse, match="already serving"):
            prepare_socket_path(path)
        assert path.is_socket()
    finally:
        live.close()


def test_a_regular_file_in_the_way_is_refused(short_tmp: Path) -> None:
    path = short_tmp / "boincd.sock"
    path.write_text("not a socket")
    with pytest.raises(SocketInUse, match="not a socket"):
        prepare_socket_path(path)
    assert path.read_text() == "not a socket"


def test_socket_mode_and_group(short_tmp: Path) -> None:
    path = short_tmp / "boincd.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    try:
        secure_socket(path, "nogroup")
        st = path.stat()
        assert st.st_mode & 0o777 == 0o660
        import grp

        assert st.st_gid == grp.getgrnam("nogroup").gr_gid
        with pytest.raises(BoincdError, match="does not exist"):
            secure_socket(path, "no-such-group-xyz")
    finally:
        sock.close()


# -- the API on its socket: every bad request gets a JSON 4xx ------------------------


class NoEngine:
    """An engine that fails the test if a request reaches it: every request
    here must be refused before the daemon does anything."""

    info = None

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a bad request reached the engine: {name}")


@pytest.fixture
async def api_socket(tmp_path: Path) -> AsyncIterator[tuple[str, Daemon]]:
    """The API's routes and middleware behind the daemon's own connection handler
    (server.protocol_factory) on a Unix socket, with no engine behind it."""
    daemon = Daemon(Settings(state_dir=str(tmp_path / "state"), gpu_backend="none"))
    daemon.engine = NoEngine()
    app = web.Application(middlewares=[api.errors_and_auth], client_max_size=api.MAX_BODY_BYTES)
    app[api.DAEMON] = daemon
    app.add_routes(api.routes)

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("secret detail /root/x")

    app.router.add_get("/v1/boom", boom)

    runner = web.AppRunner(app)
    await runner.setup()
    base = tempfile.mkdtemp(prefix="bd-s-")
    path = str(Path(base) / "d.sock")
    listener = await asyncio.get_running_loop().create_unix_server(protocol_factory(runner), path)
    os.chmod(path, 0o777)
    os.chmod(base, 0o755)
    try:
        yield path, daemon
    finally:
        listener.close()
        await runner.cleanup()
        shutil.rmtree(base, ignore_errors=True)


async def _raw(path: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes, read one HTTP answer (by its Content-Length)."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), headers, body
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _post(path: str, body: bytes, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    head = f"POST {path} HTTP/1.1\r\nHost: d\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def _json_error(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    assert 400 <= status < 500, (status, body[:300])
    assert headers["content-type"].startswith("application/json"), headers
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"code", "message", "retryable"}
    return error


BAD_HTTP = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: d\r\nno colon here\r\n\r\n",
    b"GET /v1/version HTTP/1.1\r\nHost: d\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /v1/version HTTP/1.1\r\nHost: d\r\n" + b"X: y\r\n" * 200 + b"\r\n",
    b"GET /v1/version HTTP/9.9\r\nHost: d\r\n\r\n",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
    b"POST /v1/tasks HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /v1/tasks HTTP/1.1\r\nHost: d\r\nContent-Length: -4\r\n\r\n",
    # Not the parser's, but also answered by aiohttp before any middleware.
    b"GET /v1/version HTTP/1.1\r\nHost: d\r\nExpect: bogus\r\n\r\n",
    b"POST /v1/tasks HTTP/1.1\r\nHost: d\r\nContent-Encoding: gzip\r\n"
    b"Content-Length: 4\r\n\r\nnope",
]


@pytest.mark.parametrize("data", BAD_HTTP, ids=range(len(BAD_HTTP)))
async def test_the_http_parsers_own_errors_are_json(
    api_socket: tuple[str, Daemon], data: bytes
) -> None:
    # Before: aiohttp answered these itself, in text/plain, past the middleware.
    status, headers, body = await _raw(api_socket[0], data)
    assert _json_error(status, headers, body)["code"] in ("bad_request", "http_error")


def test_the_request_handler_hooks_are_still_there() -> None:
    """JsonErrorHandler overrides aiohttp's RequestHandler.handle_error and
    finish_response: if an upgrade renames or reshapes them, fail here, not
    silently in text/plain."""
    params = list(inspect.signature(web.RequestHandler.handle_error).parameters)
    assert params == ["self", "request", "status", "exc", "message"]
    params = list(inspect.signature(web.RequestHandler.finish_response).parameters)
    assert params == ["self", "request", "resp", "start_time"]
    assert JsonErrorHandler.handle_error is not web.RequestHandler.handle_error
    assert JsonErrorHandler.finish_response is not web.RequestHandler.finish_response


async def test_a_wrong_method_is_a_json_405_with_allow(api_socket: tuple[str, Daemon]) -> None:
    status, headers, body = await _raw(
        api_socket[0], b"PUT /v1/version HTTP/1.1\r\nHost: d\r\n\r\n"
    )
    assert status == 405
    assert _json_error(status, headers, body)["code"] == "method_not_allowed"
    assert "GET" in headers["allow"]


async def test_logs_of_a_task_without_a_container_is_a_409(api_socket: tuple[str, Daemon]) -> None:
    # Before: the engine was asked for container "" and the answer was a 503.
    path, daemon = api_socket
    daemon.registry.store.add(TaskRecord("r_2", "proj", state=TaskState.FAILED))
    data = b"GET /v1/tasks/r_2/logs HTTP/1.1\r\nHost: d\r\n\r\n"
    status, headers, body = await _raw(path, data)
    assert status == 409
    assert _json_error(status, headers, body)["code"] == "conflict"


BAD_BODIES = [
    (b"{}", ["Content-Type: application/json; charset=bogus-9"], "charset"),
    (b"{}", ["Content-Type: application/json; charset=latin-1"], "charset"),
    (b'{"result": "\xff\xfe"}', [], "UTF-8"),
    (b"[" * 5000 + b"]" * 5000, [], "nested"),
    (b'{"a":' * 40 + b"1" + b"}" * 40, [], "nested"),
    (b"9" * 5000, [], "too large"),
    (b'{"ncpus": 1e999}', [], "too large"),
    (b'{"ncpus": NaN}', [], "not a number"),
    (b'{"ncpus": -Infinity}', [], "not a number"),
    (b"\xef\xbb\xbf{}", [], "JSON"),
    (b"{", [], "JSON"),
    (b"[1, 2]", [], "JSON object"),
    (b'{"result": "\\ud800", "project": "p", "slot_dir": "/s", "image": "i"}', [], "printable"),
    (b'{"result": 7, "project": "p", "slot_dir": "/s", "image": "i"}', [], "string"),
]


@pytest.mark.parametrize(("body", "headers", "words"), BAD_BODIES, ids=range(len(BAD_BODIES)))
async def test_bad_bodies_get_a_json_400(
    api_socket: tuple[str, Daemon], body: bytes, headers: list[str], words: str
) -> None:
    # Before: bogus charsets, bad UTF-8, deep nesting and huge numbers were 500s.
    status, head, answer = await _raw(api_socket[0], _post("/v1/tasks", body, *headers))
    error = _json_error(status, head, answer)
    assert error["code"] == "bad_request", error
    assert words in error["message"], error


async def test_a_body_over_the_limit_gets_a_json_413(api_socket: tuple[str, Daemon]) -> None:
    body = b" " * (api.MAX_BODY_BYTES + 1)
    status, headers, answer = await _raw(api_socket[0], _post("/v1/tasks", body))
    assert status == 413
    assert _json_error(status, headers, answer)["code"] == "too_large"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/tasks/" + "r" * 300,
        "/v1/tasks/bad%00name",
        "/v1/tasks/caf%C3%A9",
        "/v1/tasks/a%2Fb/pause",
        "/v1/tasks/x/wait?timeout=nan",
        "/v1/tasks/x/wait?timeout=-1",
        "/v1/tasks/x/logs?tail=%C2%B2",
        "/v1/tasks/x/logs?tail=" + "9" * 5000,
    ],
)
async def test_bad_names_and_queries_in_the_url_get_a_json_400(
    api_socket: tuple[str, Daemon], path: str
) -> None:
    method = "POST" if path.endswith(("pause", "nan", "-1")) else "GET"
    data = f"{method} {path} HTTP/1.1\r\nHost: d\r\nContent-Length: 0\r\n\r\n".encode()
    status, headers, body = await _raw(api_socket[0], data)
    assert _json_error(status, headers, body)["code"] == "bad_request"


async def test_a_bug_is_a_json_500_that_tells_nothing(api_socket: tuple[str, Daemon]) -> None:
    status, headers, body = await _raw(api_socket[0], b"GET /v1/boom HTTP/1.1\r\nHost: d\r\n\r\n")
    assert status == 500
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["code"] == "internal"
    assert "secret" not in error["message"]
    assert "Traceback" not in body.decode()


_GET_AS = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"GET /v1/tasks/r_1 HTTP/1.1\\r\\nHost: d\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.split(b" ")[1].decode())
"""


async def test_only_the_tasks_own_side_renews_its_lease(
    api_socket: tuple[str, Daemon], tmp_path: Path
) -> None:
    path, daemon = api_socket
    slot = tmp_path / "slot"
    slot.mkdir()
    boinc_uid, reader_uid = 64001, 64002
    os.chown(slot, boinc_uid, boinc_uid)
    daemon.writer_uids = frozenset({0, boinc_uid})
    record = TaskRecord("r_1", "proj", slot_dir=str(slot), state="created")
    daemon.registry.store.add(record)

    async def get_as(uid: int) -> None:
        record.last_seen = 1000.0
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        proc = await asyncio.create_subprocess_exec(
            *argv, sys.executable, "-c", _GET_AS, path, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert out.decode().strip() == "200"

    # Before: any reader's GET renewed the lease, so a monitoring script could
    # keep an abandoned task's container from ever being collected.
    await get_as(reader_uid)
    assert record.last_seen == 1000.0
    await get_as(boinc_uid)
    assert record.last_seen > 1000.0
    assert api._renews_lease(0, daemon.writer_uids, "")
    assert not api._renews_lease(boinc_uid, daemon.writer_uids, str(tmp_path / "gone"))
    os.chown(slot, 0, 0)  # a writer that does not own the slot: not its task
    assert not api._renews_lease(boinc_uid, daemon.writer_uids, str(slot))


def test_decode_json_takes_what_the_shim_sends() -> None:
    body = {"result": "r_0", "ncpus": 0.5, "memory_bytes": 2**40, "command": ["a"], "gpu": None}
    assert api.decode_json(json.dumps(body).encode(), "UTF-8") == body
    assert api.decode_json(json.dumps(body).encode(), None) == body


def test_dry_runs_are_reads_anyone_on_the_socket_may_ask() -> None:
    from aiohttp.test_utils import make_mocked_request

    def reads_only(method: str, url: str) -> bool:
        return api._reads_only(make_mocked_request(method, url))

    assert reads_only("POST", "/v1/gc?dry_run=1")
    assert reads_only("POST", "/v1/images/evict?dry_run=true&budget_bytes=0")
    assert not reads_only("POST", "/v1/gc")
    assert not reads_only("POST", "/v1/images/evict?dry_run=0")
    assert not reads_only("POST", "/v1/tasks?dry_run=1")
    assert not reads_only("DELETE", "/v1/gc?dry_run=1")
    assert reads_only("GET", "/v1/status")


def test_the_daemon_names_its_process_as_the_boinc_client_counts_its_own() -> None:
    # lib/procinfo_unix.cpp: is_boinc_app = strcasestr(comm, "boinc")
    script = (
        "from boincd_containers.daemon.server import name_the_process; name_the_process(); "
        "print(open('/proc/self/comm').read().strip())"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "boincd-containe"
    assert "boinc" in out.stdout.lower()


async def test_a_result_two_projects_have_is_picked_by_project_or_is_a_409(
    api_socket: tuple[str, Daemon],
) -> None:
    path, daemon = api_socket
    daemon.registry.store.add(TaskRecord("r_9", "proj_a", state=TaskState.FAILED))
    daemon.registry.store.add(TaskRecord("r_9", "proj_b", state=TaskState.WAITING))
    for project, state in (("proj_a", "failed"), ("proj_b", "waiting")):
        data = f"GET /v1/tasks/r_9?project={project} HTTP/1.1\r\nHost: d\r\n\r\n".encode()
        status, _, body = await _raw(path, data)
        assert status == 200
        assert (json.loads(body)["project"], json.loads(body)["state"]) == (project, state)
    status, headers, body = await _raw(path, b"GET /v1/tasks/r_9 HTTP/1.1\r\nHost: d\r\n\r\n")
    error = _json_error(status, headers, body)
    assert status == 409
    assert error["code"] == "conflict"
    assert "'proj_a'" in error["message"]
    assert "'proj_b'" in error["message"]
    data = b"GET /v1/tasks/r_9?project=proj_c HTTP/1.1\r\nHost: d\r\n\r\n"
    assert (await _raw(path, data))[0] == 404
