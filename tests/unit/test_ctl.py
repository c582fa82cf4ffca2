"""`boincd-containers ctl` as a volunteer and a script use it: the real CLI, as a
subprocess, against a fake daemon on a real Unix socket."""

from __future__ import annotations

import json
import os
import socketserver
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.cli import ctl

REPO = Path(__file__).resolve().parents[2]

ENGINE_UP = {
    "kind": "docker",
    "version": "20.10.24",
    "rootless": False,
    "host": "unix:///var/run/docker.sock",
    "reachable": True,
    "error": None,
}
ENGINE_DOWN = {**ENGINE_UP, "reachable": False, "error": "connection refused"}


def status_body(
    engine: dict[str, Any], images: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    items = images or []
    return {
        "daemon": {"version": "0.1.0", "instance_id": "0123456789abcdef"},
        "engine": engine,
        "tasks": [],
        "images": {"total_bytes": 0, "count": len(items), "items": items},
        "volumes": {"total_bytes": 0, "count": 0},
    }


class FakeDaemon:
    """Answers GET paths with canned JSON over HTTP/1.1 on a Unix socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.answers: dict[str, Any] = {}
        answers = self.answers

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = json.dumps(answers.get(self.path.split("?")[0], {})).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def address_string(self) -> str:
                return "unix"

        self.server = socketserver.ThreadingUnixStreamServer(path, Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeDaemon:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bd-ctl-") as d:  # short: sun_path is ~108 bytes
        yield Path(d)


@pytest.fixture
def daemon(sock_dir: Path) -> Iterator[FakeDaemon]:
    with FakeDaemon(str(sock_dir / "boincd.sock")) as fake:
        yield fake


def cli(*args: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BOINCD_SOCKET"}
    return subprocess.run(
        [sys.executable, "-m", "boincd_containers", *args],
        cwd=REPO,
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_json_without_a_daemon_still_prints_one_object(sock_dir: Path) -> None:
    missing = str(sock_dir / "nobody.sock")
    done = cli("ctl", "--socket", missing, "status", "--json")
    assert done.returncode == ctl.EXIT_NOT_RUNNING == 3
    answer = json.loads(done.stdout)
    assert answer["error"]["code"] == "not_running"
    assert answer["error"]["socket"] == missing
    assert "not running" in done.stderr


def test_status_json_without_permission_says_so_in_the_object(sock_dir: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root may open any socket")
    path = sock_dir / "closed.sock"
    with FakeDaemon(str(path)):
        path.chmod(0)
        done = cli("ctl", "--socket", str(path), "status", "--json")
    assert done.returncode == ctl.EXIT_NO_PERMISSION
    assert json.loads(done.stdout)["error"]["code"] == "permission_denied"


def test_socket_may_follow_the_verb(daemon: FakeDaemon) -> None:
    daemon.answers["/v1/status"] = status_body(ENGINE_UP)
    before = cli("ctl", "--socket", daemon.path, "status", "--json")
    after = cli("ctl", "status", "--socket", daemon.path, "--json")
    assert (before.returncode, after.returncode) == (0, 0), after.stderr
    assert json.loads(after.stdout) == json.loads(before.stdout) == status_body(ENGINE_UP)


def test_socket_after_the_verb_wins_over_the_environment(daemon: FakeDaemon) -> None:
    daemon.answers["/v1/tasks"] = {"tasks": []}
    env = {**os.environ, "BOINCD_SOCKET": "/nonexistent/boincd.sock"}
    done = subprocess.run(
        [sys.executable, "-m", "boincd_containers", "ctl", "tasks", "--socket", daemon.path],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "tasks    none" in done.stdout


def test_status_fails_while_the_daemon_cannot_reach_the_engine(daemon: FakeDaemon) -> None:
    daemon.answers["/v1/status"] = status_body(ENGINE_DOWN)
    text = cli("ctl", "--socket", daemon.path, "status")
    assert text.returncode == ctl.EXIT_ENGINE_UNREACHABLE == 5
    assert "engine   unavailable: connection refused" in text.stdout
    assert "cannot reach the container engine" in text.stderr
    as_json = cli("ctl", "--socket", daemon.path, "status", "--json")
    assert as_json.returncode == 5
    assert json.loads(as_json.stdout)["engine"]["reachable"] is False


def test_status_with_the_engine_up_exits_zero(daemon: FakeDaemon) -> None:
    daemon.answers["/v1/status"] = status_body(ENGINE_UP)
    done = cli("ctl", "--socket", daemon.path, "status")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_json_into_a_closed_pipe_ends_without_a_traceback(daemon: FakeDaemon) -> None:
    # `ctl images --json | head` once head has gone: the read end is closed before
    # ctl writes, so every write fails with EPIPE, deterministically.
    items = [{"ref": f"img{i}:latest", "id": f"sha256:{i:064x}"} for i in range(2000)]
    daemon.answers["/v1/images"] = {"count": len(items), "items": items}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = cli("ctl", "--socket", daemon.path, "images", "--json", stdout=write_end)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr
    assert "BrokenPipe" not in done.stderr
    assert done.returncode == 0


def test_help_lists_install_and_every_command() -> None:
    done = cli("--help")
    assert done.returncode == 0
    for command in ("serve", "ctl", "install"):
        assert command in done.stdout
    assert "install the boot-time service" in done.stdout
    assert "--dry-run" in cli("install", "--help").stdout


# -- the one-line summary of images no task uses --------------------------------


def image(ref: str, *, used: bool) -> dict[str, Any]:
    return {
        "ref": ref,
        "id": "sha256:" + "ab" * 32,
        "size_bytes": 2048,
        "unique_bytes": 1024,
        "shared_bytes": 1024,
        "projects": ["proj"] if used else [],
        "pinned": used,
        "ours": used,
    }


def other_line(items: list[dict[str, Any]]) -> str:
    text = ctl._images_text({"count": len(items), "items": items}, brief=True)
    return next(line for line in text.splitlines() if "no BOINC task uses" in line)


def test_a_single_unused_image_is_neither_other_nor_plural() -> None:
    assert other_line([image("mine:1", used=False)]) == (
        "  1 image no BOINC task uses (1.0 KiB of its own); `ctl images` lists it"
    )


def test_unused_images_beside_used_ones_are_other() -> None:
    used = image("science:1", used=True)
    assert other_line([used, image("a:1", used=False)]) == (
        "  and 1 other image no BOINC task uses (1.0 KiB of its own); `ctl images` lists it"
    )
    many = [used, image("a:1", used=False), image("b:1", used=False)]
    assert other_line(many) == (
        "  and 2 other images no BOINC task uses (2.0 KiB of their own); `ctl images` lists them"
    )


def test_only_unused_images_are_counted_plainly() -> None:
    line = other_line([image("a:1", used=False), image("b:1", used=False)])
    assert line == "  2 images no BOINC task uses (2.0 KiB of their own); `ctl images` lists them"
