"""Container logs: bounded on disk, counted in the disk bound, read back streamed and capped.

The log reads run against a small fake engine on a Unix socket that sends the
multiplexed stream in chunks cut anywhere (inside frame headers too), as a real
engine's HTTP stream may arrive.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from boincd_containers.core.settings import Settings
from boincd_containers.engine import compat as engine_compat
from boincd_containers.engine.adapter import Engine
from boincd_containers.engine.streams import (
    LOG_BYTES_MAX,
    LOG_TAIL_MAX,
    Demultiplexer,
    demultiplex,
    log_tail_lines,
)
from boincd_containers.images.cache import ImageCache
from boincd_containers.job.spec import (
    LOG_FILE_MAX_BYTES,
    LOG_FILES,
    container_config,
    log_config,
    parse_request,
)
from boincd_containers.tasks.manager import TaskManager
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.registry import Registry
from boincd_containers.testing.fakes import FakeContainers, FakeEngine
from boincd_containers.watch.limits import DiskLimits, log_bytes

MiB = 1 << 20


def frame(stream: int, payload: bytes) -> bytes:
    return bytes([stream, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload


# -- demultiplexing a stream -------------------------------------------------------


FRAMES = [(1, b"out one\n"), (2, b"err \xc3\xa9\n"), (1, b""), (1, b"x" * 300), (2, b"last\n")]
STREAM = b"".join(frame(s, p) for s, p in FRAMES)
PAYLOAD = b"".join(p for _, p in FRAMES)


def feed_in_pieces(pieces: list[bytes]) -> bytes:
    demux = Demultiplexer()
    return b"".join(demux.feed(p) for p in pieces) + demux.close()


def test_frames_cut_at_every_point_demultiplex_the_same() -> None:
    # Each cut point, headers included: the old whole-buffer demultiplex, fed
    # chunk by chunk, lost frames whose header straddled two chunks.
    for cut in range(len(STREAM) + 1):
        assert feed_in_pieces([STREAM[:cut], STREAM[cut:]]) == PAYLOAD, cut
    assert feed_in_pieces([STREAM[i : i + 1] for i in range(len(STREAM))]) == PAYLOAD
    rng = random.Random(15)
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(STREAM)), rng.randint(1, 12)))
        pieces = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True)]
        assert feed_in_pieces(pieces) == PAYLOAD


def test_an_unframed_stream_passes_through_and_the_whole_buffer_helper_still_works() -> None:
    assert feed_in_pieces([b"plain ", b"tty output\n"]) == b"plain tty output\n"
    assert feed_in_pieces([b"hi\n"]) == b"hi\n"  # shorter than a header
    assert feed_in_pieces([]) == b""
    assert demultiplex(STREAM) == PAYLOAD
    assert demultiplex(b"tty text") == b"tty text"


# -- reading logs from an engine, capped -------------------------------------------


class FakeLogEngine:
    """GET /version and /containers/{id}/logs, the log sent in small odd chunks."""

    def __init__(self, socket: Path, stream: bytes) -> None:
        self.socket = socket
        self.stream = stream
        self.queries: list[dict[str, str]] = []
        self.runner: web.AppRunner | None = None

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"ApiVersion": "1.41", "Version": "20.10.24"})

    async def logs(self, request: web.Request) -> web.StreamResponse:
        self.queries.append(dict(request.query))
        if request.match_info["ref"] == "gone":
            return web.json_response({"message": "No such container: gone"}, status=404)
        response = web.StreamResponse()
        await response.prepare(request)
        pos, step = 0, 1
        while pos < len(self.stream):
            step = step * 7 % 65521 + 3  # sizes from 3 bytes to ~64 KiB, cut anywhere
            await response.write(self.stream[pos : pos + step])
            pos += step
        await response.write_eof()
        return response

    async def __aenter__(self) -> FakeLogEngine:
        app = web.Application()
        app.router.add_get("/version", self.version)
        app.router.add_get("/{version}/containers/{ref}/logs", self.logs)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.UnixSite(self.runner, str(self.socket)).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def read_logs(socket: Path, ref: str, tail: int, max_bytes: int = LOG_BYTES_MAX) -> bytes:
    engine = Engine(f"unix://{socket}")
    try:
        return b"".join([c async for c in engine.containers.stream_logs(ref, tail, max_bytes)])
    finally:
        await engine.close()


def numbered_lines(count: int, width: int = 100) -> list[bytes]:
    return [f"{i:08d} ".encode() + b"y" * (width - 10) + b"\n" for i in range(count)]


async def test_a_log_bigger_than_the_cap_is_read_back_as_its_end(short_tmp: Path) -> None:
    lines = numbered_lines(40_000)  # 4 MB of output, stdout and stderr interleaved
    stream = b"".join(frame(1 + i % 2, line) for i, line in enumerate(lines))
    socket = short_tmp / "engine.sock"
    async with FakeLogEngine(socket, stream) as fake:
        body = await read_logs(socket, "c1", 40_000)
        small = await read_logs(socket, "c1", 40_000, max_bytes=10_000)
    assert fake.queries[0]["tail"] == str(LOG_TAIL_MAX)  # the engine is asked for no more
    marker, _, rest = body.partition(b"\n")
    assert marker.startswith(b"[... ")
    assert b"bytes of earlier output left out" in marker
    assert len(rest) <= LOG_BYTES_MAX
    assert rest.endswith(lines[-1])
    # Whole lines only: the cut one at the start is left out and counted.
    assert rest.startswith(b"000")
    assert b"".join(lines).endswith(rest)
    left_out = int(marker.split()[1])
    assert left_out + len(rest) == len(b"".join(lines))
    assert len(small.partition(b"\n")[2]) <= 10_000
    assert small.endswith(lines[-1])


async def test_a_small_log_is_whole_and_bad_utf8_is_replaced(short_tmp: Path) -> None:
    stream = frame(1, b"caf\xc3") + frame(1, b"\xa9 ok\n") + frame(2, b"bad \xff\xfe bytes\n")
    socket = short_tmp / "engine.sock"
    async with FakeLogEngine(socket, stream) as fake:
        body = await read_logs(socket, "c1", 200)
        engine = Engine(f"unix://{socket}")
        try:
            text = await engine.containers.logs("c1", 5)
        finally:
            await engine.close()
    # A character split between two frames stays whole; invalid bytes become U+FFFD.
    assert body.decode("utf-8") == "café ok\nbad \ufffd\ufffd bytes\n"
    assert text == body.decode()
    assert [q["tail"] for q in fake.queries] == ["200", "5"]


async def test_a_missing_container_is_not_found(short_tmp: Path) -> None:
    from boincd_containers.core.errors import NotFound

    socket = short_tmp / "engine.sock"
    async with FakeLogEngine(socket, b""):
        with pytest.raises(NotFound):
            await read_logs(socket, "gone", 10)


def test_tail_is_bounded_and_all_means_the_bound() -> None:
    assert log_tail_lines(None) == 200
    assert log_tail_lines("50") == 50
    assert log_tail_lines("0") == 0
    assert log_tail_lines("-1") == LOG_TAIL_MAX
    assert log_tail_lines("all") == LOG_TAIL_MAX
    assert log_tail_lines("10000000000") == LOG_TAIL_MAX
    for bad in ("ten", "1.5", "9" * 5000):
        with pytest.raises(ValueError, match=r"invalid literal|digits"):
            log_tail_lines(bad)


# -- log files bounded on disk -----------------------------------------------------


def request(disk_bytes: int) -> Any:
    return parse_request(
        {
            "result": "r",
            "project": "p",
            "slot_dir": "/tmp",
            "image": "img",
            "disk_bytes": disk_bytes,
        }
    )


def test_every_container_gets_log_files_bounded_by_its_disk_bound() -> None:
    def options(disk_bytes: int) -> dict[str, str]:
        config = container_config(
            request(disk_bytes), "img", owner_id="o", uid=1, gid=1, pids_limit=10, network_name="n"
        )
        log = config["HostConfig"]["LogConfig"]
        assert log["Type"] == "json-file"
        return dict(log["Config"])

    assert options(0) == {"max-size": str(LOG_FILE_MAX_BYTES), "max-file": str(LOG_FILES)}
    assert options(50 * MiB)["max-size"] == str(LOG_FILE_MAX_BYTES)
    # A small bound: files of half of it, so output alone can pass it and be stopped.
    assert options(8 * MiB)["max-size"] == str(4 * MiB)
    assert int(options(8 * MiB)["max-size"]) * LOG_FILES > 8 * MiB
    assert options(1000)["max-size"] == str(MiB)


def test_podman_gets_one_file_with_the_same_ceiling() -> None:
    config = {"HostConfig": {"LogConfig": log_config(8 * MiB)}}
    docker = {"HostConfig": {"LogConfig": log_config(8 * MiB)}}
    engine_compat.adapt_log_config(config, podman=True)
    engine_compat.adapt_log_config(docker, podman=False)
    assert config["HostConfig"]["LogConfig"] == {
        "Type": "k8s-file",
        "Config": {"max-size": str(4 * MiB * LOG_FILES)},
    }
    assert docker["HostConfig"]["LogConfig"] == log_config(8 * MiB)


# -- log files counted in the disk bound --------------------------------------------


def test_log_bytes_counts_the_file_and_its_rotations_only(tmp_path: Path) -> None:
    log = tmp_path / "abc-json.log"
    log.write_bytes(b"a" * 100)
    (tmp_path / "abc-json.log.1").write_bytes(b"b" * 1000)
    (tmp_path / "abc-json.log.2.gz").write_bytes(b"c" * 10)
    (tmp_path / "config.v2.json").write_bytes(b"d" * 5000)
    (tmp_path / "abc-json.logger").write_bytes(b"e" * 7)
    assert log_bytes(str(log)) == 1110
    assert log_bytes(str(tmp_path / "gone" / "x.log")) == 0


class LogPathContainers(FakeContainers):
    """Names a LogPath once a container has started, as Docker does."""

    def __init__(self, engine: FakeEngine, logs: Path) -> None:
        super().__init__(engine)
        self.logs = logs

    async def inspect(self, ref: str, *, size: bool = False) -> dict[str, Any]:
        data = dict(await super().inspect(ref))
        if data["State"]["Status"] != "created":
            data["LogPath"] = str(self.logs / f"{data['Id']}-json.log")
        if size:
            data["SizeRw"] = 0
        return data


class LogPathEngine(FakeEngine):
    def __init__(self, logs: Path) -> None:
        super().__init__()
        self.logs = logs
        self.containers: LogPathContainers = LogPathContainers(self, logs)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[LogPathEngine, TaskManager, DiskLimits]]:
    engine = LogPathEngine(tmp_path)
    registry = Registry(engine, "me")
    registry.engine_error = None
    images = ImageCache(engine, tmp_path / "state", "me")
    settings = Settings(state_dir=str(tmp_path / "state"))
    tasks = TaskManager(settings, engine, registry, images)
    yield engine, tasks, DiskLimits(engine, registry, tasks, tmp_path / "state")
    await tasks.close()
    await images.close()


async def test_a_task_whose_log_passes_its_bound_is_stopped(
    rig: tuple[LogPathEngine, TaskManager, DiskLimits], tmp_path: Path
) -> None:
    engine, tasks, limits = rig
    slot = tmp_path / "slot"
    slot.mkdir()
    body = {
        "result": "chatty",
        "project": "p",
        "slot_dir": str(slot),
        "image": "boincd-test/busybox:latest",
    }
    await tasks.create_or_attach(parse_request({**body, "disk_bytes": 2 * MiB}), 0)
    record: TaskRecord = tasks.registry.get("chatty")
    async with asyncio.timeout(5):
        while record.state == "preparing":
            await record.changed.wait()
    await limits.check_all()  # created: no LogPath yet, and asked again once started
    await tasks.start("chatty")
    log = Path(engine.logs) / f"{record.container_id}-json.log"
    await asyncio.to_thread(log.write_bytes, b"x" * MiB)
    await limits.check_all()
    assert record.state == "running"
    assert limits.task_fields(record)["log_bytes"] == MiB
    await asyncio.to_thread(Path(f"{log}.1").write_bytes, b"x" * (MiB + 1))
    await limits.check_all()
    assert record.state == "exited"
    fields = limits.task_fields(record)
    assert fields["log_bytes"] == 2 * MiB + 1
    assert fields["limit_exceeded"]["kind"] == "disk"
    assert fields["limit_exceeded"]["log_bytes"] == 2 * MiB + 1
    assert (
        fields["limit_exceeded"]["message"]
        == f"disk limit exceeded: {2 * MiB + 1} bytes of {2 * MiB}"
    )
    assert (await limits.status_fields())["task_disk"]["log_bytes"] == 2 * MiB + 1
