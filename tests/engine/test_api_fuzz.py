"""Fuzz the real daemon's API on its real socket: every answer is JSON with a
4xx (or a 2xx where the request was valid), never a 5xx, and the daemon stays
up with bounded memory (issue 15, RELIABILITY.md "API fuzz").

Reproducible from a seed (BOINCD_FUZZ_SEED, default 15). The quick run
(BOINCD_FUZZ_REQUESTS, default 3,000, about 20 s) is part of the suite; the full run of
10,000 requests is `BOINCD_FUZZ_FULL=1 pytest tests/engine/test_api_fuzz.py -s`.

Nothing the fuzz sends can make a container: every image it names is on a
registry that cannot resolve (`.invalid`) or is not a valid reference, slot
dirs are the test's own empty dir or do not exist (so no build can tar a
real tree), and whatever the daemon made is removed by the fixture.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from boincd_containers.testing.daemon import DaemonProcess, docker

pytestmark = pytest.mark.docker

SEED = int(os.environ.get("BOINCD_FUZZ_SEED", "15"))
QUICK_REQUESTS = int(os.environ.get("BOINCD_FUZZ_REQUESTS", "3000"))
FULL_REQUESTS = 10_000
# Memory the daemon may gain over a run (after a warm-up): records of the
# fuzz's few valid tasks, caches, allocator slack. Unbounded growth (a record
# per request, a body kept) passes this within a few thousand requests.
RSS_GROWTH_LIMIT = 48 * 2**20
ANSWER_TIMEOUT_S = 10.0
# A mutated request may be incomplete (a flipped Content-Length digit): the
# server rightly waits for the rest. Such requests get this long, then count
# as "silent", which is no failure as long as the daemon lives.
SILENT_TIMEOUT_S = 0.5

RESULTS = [f"fuzz_{i}" for i in range(12)]
PROJECTS = ["fuzz.example.org_proj", "other.example.org"]
IMAGES = ["boincd-fuzz.invalid/none:1", "registry.invalid:5000/x/y@sha256:" + "0" * 64]
ODD_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udcff",
    "\U0001f600",
    "caf\u00e9",
    "..",
    ".",
    "/",
    "a/b",
    "%2e%2e",
    "\r\nX-Injected: 1",
    "x" * 256,
    "y" * 5000,
    "NaN",
    "-1",
    "1e999",
    "\u202e",
    "<xml/>",
    "'; DROP TABLE result; --",
]
ODD_NUMBERS: list[Any] = [
    0,
    -1,
    1,
    0.5,
    2**31,
    2**63,
    2**64,
    10**30,
    -(10**30),
    1e308,
    -1e308,
    1e-320,
    True,
    False,
    None,
    "1",
    [],
    {},
]
ODD_NUMBER_TEXT = [
    "1e999",
    "-1e999",
    "NaN",
    "Infinity",
    "-Infinity",
    "9" * 5000,
    "-" + "9" * 30,
    "1" + "0" * 400,
    "0." + "0" * 400 + "1",
    "1E400",
    "01",
    "+1",
    ".5",
]
ROUTES = [
    ("GET", "/v1/version"),
    ("GET", "/v1/status"),
    ("GET", "/v1/gpus"),
    ("GET", "/v1/tasks"),
    ("GET", "/v1/images"),
    ("GET", "/metrics"),
    ("GET", "/v1/tasks/{r}"),
    ("GET", "/v1/tasks/{r}/logs"),
    ("POST", "/v1/tasks"),
    ("POST", "/v1/tasks/{r}/start"),
    ("POST", "/v1/tasks/{r}/pause"),
    ("POST", "/v1/tasks/{r}/resume"),
    ("POST", "/v1/tasks/{r}/detach"),
    ("POST", "/v1/tasks/{r}/network"),
    ("POST", "/v1/tasks/{r}/wait"),
    ("DELETE", "/v1/tasks/{r}"),
    ("POST", "/v1/gc"),
    ("POST", "/v1/images/evict"),
]
METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT", "G@T"]
# Answers that are not JSON by design: the metrics text and a container's log.
TEXT_PATHS = ("/metrics", "/logs")


@dataclass
class Case:
    kind: str
    data: bytes
    method: str = "GET"
    path: str = ""
    # Possibly incomplete bytes: no answer is acceptable.
    may_be_silent: bool = False


@dataclass
class Figures:
    tried: int = 0
    answered: Counter[int] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    silent: int = 0
    registry_unreachable: int = 0
    failures: list[str] = field(default_factory=list)
    rss_before: int = 0
    rss_after: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        classes = Counter(f"{status // 100}xx" for status in self.answered.elements())
        return {
            "seed": SEED,
            "tried": self.tried,
            "failed": len(self.failures),
            "silent": self.silent,
            "registry_unreachable_503": self.registry_unreachable,
            "statuses": dict(sorted(classes.items())),
            "kinds": dict(sorted(self.kinds.items())),
            "rss_before_mib": round(self.rss_before / 2**20, 1),
            "rss_after_mib": round(self.rss_after / 2**20, 1),
            "seconds": round(self.seconds, 1),
        }


class Fuzzer:
    """Seeded generator of requests: well-formed, mutated and raw."""

    def __init__(self, seed: int, slot: Path, project_dir: Path) -> None:
        self.rng = random.Random(seed)
        self.slot = str(slot)
        self.project_dir = str(project_dir)

    # -- values --------------------------------------------------------------

    def odd_string(self) -> str:
        rng = self.rng
        choice = rng.random()
        if choice < 0.6:
            return rng.choice(ODD_STRINGS)
        if choice < 0.8:
            return "".join(chr(rng.randrange(0, 0x110000)) for _ in range(rng.randrange(1, 12)))
        return "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(rng.randrange(1, 300)))

    def odd_value(self) -> Any:
        rng = self.rng
        choice = rng.random()
        if choice < 0.4:
            return self.odd_string()
        if choice < 0.8:
            return rng.choice(ODD_NUMBERS)
        return rng.choice([[self.odd_string()], {"a": self.odd_value()}, [[[]]], [None] * 3])

    def name(self, pool: list[str]) -> Any:
        return self.rng.choice(pool) if self.rng.random() < 0.6 else self.odd_value()

    def slot_dir(self) -> Any:
        # Never an existing directory other than the test's own empty slot: a
        # `build` would tar it.
        odd = self.odd_value()
        return self.rng.choice(
            [
                self.slot,
                self.slot,
                self.slot + "/missing",
                "relative/slot",
                "/nonexistent-fuzz",
                odd,
            ]
        )

    def valid_body(self) -> dict[str, Any]:
        rng = self.rng
        body: dict[str, Any] = {
            "result": rng.choice(RESULTS),
            "project": rng.choice(PROJECTS),
            "slot_dir": self.slot,
            "image": rng.choice(IMAGES),
            "command": ["sh", "-c", "exit 0"],
            "ncpus": rng.choice([0.5, 1, 2]),
            "memory_bytes": 64 * 2**20,
            "disk_bytes": 2**30,
            "allow_fetch": rng.random() < 0.5,
            "priority": {"nice": 19, "idle": False},
        }
        if rng.random() < 0.2:
            body["project_dir"] = self.project_dir
            body["project_dir_mount"] = "/project"
        if rng.random() < 0.2:
            body["mounts"] = [{"source": "in", "target": "/in", "read_only": True}]
        if rng.random() < 0.1:
            body["gpu"] = {"type": "NVIDIA", "device_num": 0, "usage": 0.5}
        return body

    def mutated_body(self) -> Any:
        rng = self.rng
        body = self.valid_body()
        for _ in range(rng.randrange(0, 4)):
            action = rng.random()
            key = rng.choice([*body, "gpu", "mounts", "env", "build_args", "build", "workdir"])
            if action < 0.45:
                body[key] = self.odd_value()
            elif action < 0.6:
                body.pop(key, None)
            elif action < 0.7:
                body[self.odd_string()] = self.odd_value()
            elif action < 0.8:
                body["result"] = self.name(RESULTS)
                body["project"] = self.name(PROJECTS)
            elif action < 0.9:
                body["slot_dir"] = self.slot_dir()
            else:
                body[key] = {"source": self.odd_value(), "target": self.odd_value()}
        if body.get("slot_dir") != self.slot:
            body.pop("build", None)
        # An image name from the fuzz is never a pullable reference (see module doc).
        if not (isinstance(body.get("image"), str) and ".invalid" in body["image"]):
            body["image"] = rng.choice([*IMAGES, "UPPER/Case", "a b", "::", "x@sha256:z"])
        return rng.choice([body, body, body, [body], "text", 3, None])

    # -- encodings -----------------------------------------------------------

    def encode_json(self, value: Any) -> bytes:
        rng = self.rng
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
        data = text.encode("utf-8", "surrogatepass")
        choice = rng.random()
        if choice < 0.08:
            depth = rng.choice([33, 200, 5000, 100_000])
            data = b"[" * depth + b"]" * depth
        elif choice < 0.16:
            data = b'{"ncpus": ' + rng.choice(ODD_NUMBER_TEXT).encode() + b"}"
        elif choice < 0.22:
            data = data.replace(b"fuzz", b"fu\xff\xfez", 1)
        elif choice < 0.26:
            data = data.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass")
        elif choice < 0.3 and data:
            cut = rng.randrange(len(data))
            data = data[:cut]
        elif choice < 0.33:
            data = b" " * (1 << 20) + data  # just over the body limit
        return data

    def headers(self, body: bytes) -> list[bytes]:
        rng = self.rng
        headers = [b"Host: boincd"]
        choice = rng.random()
        if choice < 0.1:
            charset = rng.choice(["bogus", "latin-1", "utf-16", "UTF-8", "", '"utf-8"', "\x00"])
            headers.append(f"Content-Type: application/json; charset={charset}".encode("latin-1"))
        elif choice < 0.15:
            headers.append(b"Content-Type: text/plain")
        if rng.random() < 0.05:
            headers.append(b"Content-Encoding: " + rng.choice([b"gzip", b"deflate", b"br", b"x"]))
        if rng.random() < 0.04:
            headers.append(b"Expect: " + rng.choice([b"100-continue", b"bogus"]))
        if rng.random() < 0.85:
            headers.append(b"Connection: close")
        headers.append(b"Content-Length: %d" % len(body))
        return headers

    # -- cases ---------------------------------------------------------------

    def http(self, method: str, path: str, body: bytes, headers: list[bytes]) -> bytes:
        head = f"{method} {path} HTTP/1.1\r\n".encode("utf-8", "surrogatepass")
        return head + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body

    def path_part(self) -> str:
        rng = self.rng
        choice = rng.random()
        if choice < 0.5:
            return rng.choice(RESULTS)
        if choice < 0.75:
            raw = self.odd_string().encode("utf-8", "surrogatepass")
            return "".join(f"%{b:02X}" for b in raw) or "%00"
        return "".join(rng.choice("aZ09._-~%!$&'()*+,;=:@") for _ in range(rng.randrange(1, 300)))

    def query(self, path: str, result: str) -> str:
        rng = self.rng
        pooled = result in RESULTS
        if path.endswith("/wait"):
            # A pool task may be preparing: keep its waits short. An unknown
            # task answers at once, whatever the timeout.
            values = ["0", "0.01", "-1", "nan", "abc", "inf"] + ([] if pooled else ["1e300"])
            return "?timeout=" + rng.choice(values)
        values = ["0", "1", "-1", "abc", "9" * 60, "%C2%B2", "%00", "1e3", "true", "yes", ""]
        key = rng.choice(["tail", "dry_run", "budget_bytes", "x", "%FF"])
        if path.endswith("/evict") and rng.random() < 0.5:
            key = "dry_run"
            values = ["1"]
        return f"?{key}={rng.choice(values)}" if rng.random() < 0.7 else ""

    def route_case(self) -> Case:
        rng = self.rng
        method, template = rng.choice(ROUTES)
        result = self.path_part()
        path = template.replace("{r}", result)
        path += self.query(path, result)
        if rng.random() < 0.1:
            method = rng.choice(METHODS)
        if path.endswith("/network"):
            value = rng.choice([{"connected": True}, {"connected": "yes"}, [], self.odd_value()])
            body = self.encode_json(value)
        elif method == "POST" and template == "/v1/tasks":
            body = self.encode_json(self.mutated_body())
        else:
            body = b"" if rng.random() < 0.8 else self.encode_json(self.odd_value())
        data = self.http(method, path, body, self.headers(body))
        return Case("route", data, method, path)

    def task_case(self) -> Case:
        value = self.valid_body() if self.rng.random() < 0.15 else self.mutated_body()
        body = self.encode_json(value)
        data = self.http("POST", "/v1/tasks", body, self.headers(body))
        return Case("task", data, "POST", "/v1/tasks")

    def http_case(self) -> Case:
        """Broken HTTP: what the parser itself must refuse."""
        rng = self.rng
        body = b'{"connected": true}'
        choice = rng.random()
        method, line_path, version = "GET", "/v1/version", "HTTP/1.1"
        headers = [b"Host: boincd", b"Connection: close"]
        if choice < 0.15:
            method = rng.choice(["G ET", "\x00", "GET\t", "get", "PRI", "A" * 100])
        elif choice < 0.3:
            version = rng.choice(["HTTP/9.9", "HTTP/1", "HTTX/1.1", "", "HTTP/1.1 extra"])
        elif choice < 0.4:
            line_path = rng.choice(["", "*", "x", "//", "/" + "a" * 9000, "/\x00", "/%zz"])
        elif choice < 0.55:
            headers.append(
                rng.choice(
                    [
                        b"No-Colon",
                        b": empty-name",
                        b"X-Big: " + b"a" * rng.choice([8000, 9000, 70000]),
                        b"X-Ctl: a\x01b",
                        b"X Space: 1",
                        b"Content-Length: -1",
                        b"Content-Length: 1, 2",
                        b"Content-Length: 99999999999999999999999",
                        b"Transfer-Encoding: chunked, gzip",
                        b"Transfer-Encoding: bogus",
                    ]
                )
            )
        elif choice < 0.65:
            headers += [b"X-Many: 1"] * rng.choice([100, 129, 500])
        elif choice < 0.8:
            chunks = rng.choice([b"zz\r\nab\r\n0\r\n\r\n", b"-1\r\n\r\n", b"1;x\r\na\r\n0\r\n\r\n"])
            head = b"POST /v1/tasks/fuzz_0/network HTTP/1.1\r\nHost: b\r\n"
            data = head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks
            return Case("http", data, "POST", "/v1/tasks/fuzz_0/network", may_be_silent=True)
        else:
            headers.append(b"Content-Length: %d" % len(body))
            data = self.http("POST", "/v1/tasks/fuzz_1/network", body, headers)
            return Case("http", data, "POST", "/v1/tasks/fuzz_1/network")
        line = f"{method} {line_path} {version}".rstrip().encode("utf-8", "surrogatepass")
        data = line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        return Case("http", data, method, line_path)

    def raw_case(self) -> Case:
        """Bytes, not HTTP: random ones, or a valid request with bytes flipped."""
        rng = self.rng
        if rng.random() < 0.5:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
            return Case("raw", data + b"\r\n\r\n", may_be_silent=True)
        data = bytearray(self.task_case().data)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return Case("raw", bytes(data), may_be_silent=True)

    def next(self) -> Case:
        choice = self.rng.random()
        maker: Callable[[], Case]
        if choice < 0.35:
            maker = self.task_case
        elif choice < 0.65:
            maker = self.route_case
        elif choice < 0.85:
            maker = self.http_case
        else:
            maker = self.raw_case
        return maker()


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes] | None:
    """One HTTP answer by its Content-Length (a 1xx interim one skipped); None
    when the connection closed or stayed silent first."""
    buffer = b""
    while True:
        while b"\r\n\r\n" not in buffer:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionError):
                return None
            if not chunk:
                return None
            buffer += chunk
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
        if status >= 200:
            break
    length = int(headers.get("content-length", "0"))
    while len(buffer) < length:
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionError):
            break
        if not chunk:
            break
        buffer += chunk
    return status, headers, buffer[:length]


def _send(socket_path: str, case: Case) -> tuple[int, dict[str, str], bytes] | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(SILENT_TIMEOUT_S if case.may_be_silent else ANSWER_TIMEOUT_S)
    try:
        sock.connect(socket_path)
        # Answered (e.g. 413) and closed before we finished sending: read it.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(case.data)
        return _read_answer(sock)
    finally:
        sock.close()


def registry_unreachable(status: int, body: bytes) -> bool:
    """The one 5xx that is right: the fuzz's images are on `.invalid` registries,
    whose lookup fails as an unreachable registry does, and the daemon says so
    as documented (503 `unavailable`, retryable: a volunteer's network may be
    down for a moment). It is counted apart, never as a pass for a 500."""
    if status != 503:
        return False
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return (
        error.get("code") == "unavailable"
        and error.get("retryable") is True
        and "the registry or engine cannot be reached" in error.get("message", "")
    )


def _problem(case: Case, answer: tuple[int, dict[str, str], bytes]) -> str | None:
    """Why an answer breaks the contract, or None."""
    status, headers, body = answer
    if status >= 500 and not registry_unreachable(status, body):
        return f"{status}: {body[:200]!r}"
    if case.method == "HEAD":
        return None  # no body to check
    if 200 <= status < 300 and any(p in case.path for p in TEXT_PATHS):
        return None
    if not headers.get("content-type", "").startswith("application/json"):
        return f"{status} with content-type {headers.get('content-type')!r}: {body[:120]!r}"
    try:
        data = json.loads(body)
    except ValueError:
        return f"{status} with a body that is not JSON: {body[:120]!r}"
    if status >= 400:
        error = data.get("error") if isinstance(data, dict) else None
        if not isinstance(error, dict) or set(error) != {"code", "message", "retryable"}:
            return f"{status} without the error object: {body[:120]!r}"
    return None


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fuzz(daemon: DaemonProcess, base: Path, requests: int) -> Figures:
    assert daemon.proc is not None
    slot = base / "fuzz-slot"
    project_dir = base / "fuzz-project"
    slot.mkdir()
    project_dir.mkdir()
    fuzzer = Fuzzer(SEED, slot, project_dir)
    figures = Figures()
    warm_up = min(200, requests // 10)
    started = time.monotonic()
    for i in range(requests):
        if i == warm_up:
            figures.rss_before = _rss(daemon.proc.pid)
        case = fuzzer.next()
        figures.tried += 1
        figures.kinds[case.kind] += 1
        answer = _send(daemon.socket, case)
        if daemon.proc.poll() is not None:
            code = daemon.proc.returncode
            figures.failures.append(f"#{i} daemon died ({code}) on {case.data[:200]!r}")
            break
        if answer is None:
            if case.may_be_silent:
                figures.silent += 1
            else:
                figures.failures.append(f"#{i} no answer to {case.data[:200]!r}")
            continue
        figures.answered[answer[0]] += 1
        if registry_unreachable(answer[0], answer[2]):
            figures.registry_unreachable += 1
        problem = _problem(case, answer)
        if problem is not None:
            figures.failures.append(f"#{i} {problem} for {case.data[:200]!r}")
    figures.seconds = time.monotonic() - started
    if daemon.proc.poll() is None:
        figures.rss_after = _rss(daemon.proc.pid)
        version = daemon.request("GET", "/v1/version")
        assert version["api"] == 1
    return figures


def _check(daemon: DaemonProcess, figures: Figures) -> None:
    summary = figures.summary()
    print("\nAPI fuzz:", json.dumps(summary))
    report = os.environ.get("BOINCD_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps({**summary, "failures": figures.failures}, indent=1))
    assert not figures.failures, "\n".join(figures.failures[:20]) + "\n" + daemon.log()[-3000:]
    # Most answers must be answers, not silence: the fuzz is not testing timeouts.
    assert figures.silent < figures.tried // 10, summary
    assert figures.rss_after - figures.rss_before < RSS_GROWTH_LIMIT, summary
    # The fuzz never names a pullable image: no container may exist.
    owner = f"label=org.boinc.containers.owner={daemon.instance_id}"
    assert docker("ps", "-aq", "--filter", owner) == ""


def test_api_fuzz_quick(daemon: DaemonProcess, short_tmp: Path) -> None:
    _check(daemon, fuzz(daemon, short_tmp, QUICK_REQUESTS))


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(
    os.environ.get("BOINCD_FUZZ_FULL") != "1",
    reason="the full 10,000-request fuzz runs with BOINCD_FUZZ_FULL=1 (RELIABILITY.md)",
)
def test_api_fuzz_full(daemon: DaemonProcess, short_tmp: Path) -> None:
    _check(daemon, fuzz(daemon, short_tmp, FULL_REQUESTS))
