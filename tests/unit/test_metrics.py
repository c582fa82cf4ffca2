"""Prometheus metrics: the text format itself, and what a scrape reports from the
daemon's memory (never from the engine or the GPU driver)."""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web

from boincd_containers.core.errors import Unavailable
from boincd_containers.core.settings import Settings, SettingsError
from boincd_containers.daemon import metrics, routes
from boincd_containers.daemon.app import Daemon, gpu_backends
from boincd_containers.daemon.keys import DAEMON
from boincd_containers.daemon.metrics import Family, escape_label_value, format_value, render
from boincd_containers.engine.info import EngineInfo
from boincd_containers.host.gpu.fake import GIB, FakeGpuBackend
from boincd_containers.tasks.record import TaskRecord
from boincd_containers.tasks.state import TaskState
from boincd_containers.watch.monitor import Sample

# -- a strict reader of the text format (version 0.0.4) ----------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')

Samples = dict[str, list[tuple[dict[str, str], float]]]


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), text)


def parse_exposition(text: str) -> tuple[Samples, dict[str, str]]:
    """Samples by family and each family's TYPE; fails on anything the format forbids:
    a sample before its family's TYPE, a TYPE twice, a family split in two,
    bad names or escapes, a missing final line feed."""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    samples: Samples = {}
    types: dict[str, str] = {}
    helps: set[str] = set()
    current = ""
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"HELP twice for {name}"
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert re.fullmatch(_NAME, name), name
            assert name not in types, f"TYPE twice for {name}"
            assert kind in ("counter", "gauge", "summary", "histogram", "untyped"), kind
            types[name] = kind
            current = name
            samples[name] = []
            continue
        assert not line.startswith("#"), line
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, inner, value = match.groups()
        assert name == current, f"{name} outside its family block (after {current})"
        labels: dict[str, str] = {}
        rest = inner or ""
        while rest:
            label = _LABEL.match(rest)
            assert label, f"bad labels in {line!r}"
            assert label.group(1) not in labels, f"label twice in {line!r}"
            labels[label.group(1)] = _unescape(label.group(2))
            rest = rest[label.end() :]
        samples[name].append((labels, float(value)))
    assert helps == set(types), "every family needs HELP and TYPE"
    return samples, types


def value_of(samples: Samples, metric: str, /, **labels: str) -> float:
    found = [v for lab, v in samples[metric] if lab == labels]
    assert len(found) == 1, f"{metric}{labels}: {samples.get(metric)}"
    return found[0]


# -- the format --------------------------------------------------------------------


def test_label_values_are_escaped_and_read_back() -> None:
    tricky = 'C:\\slot\\"x"\nnext'
    text = render([Family("t_bytes", "gauge", "a \\ help\nline").add(3, result=tricky)])
    assert 'result="C:\\\\slot\\\\\\"x\\"\\nnext"' in text
    assert "# HELP t_bytes a \\\\ help\\nline\n" in text
    samples, types = parse_exposition(text)
    assert samples["t_bytes"] == [({"result": tricky}, 3.0)]
    assert types == {"t_bytes": "gauge"}
    assert escape_label_value("plain") == "plain"


def test_a_label_value_utf8_cannot_hold_still_renders() -> None:
    # Before: a task named with a lone surrogate (adopted from the engine's
    # labels) made text.encode() raise, and /metrics answered 500 to everyone.
    text = render([Family("t_bytes", "gauge", "h").add(1, result="r\ud800x", project="caf\u00e9")])
    text.encode("utf-8")
    samples, _ = parse_exposition(text)
    assert samples["t_bytes"] == [({"result": "r\\ud800x", "project": "caf\u00e9"}, 1.0)]


def test_values_are_exact_integers_or_floats() -> None:
    assert format_value(2**40 + 1) == "1099511627777"
    assert format_value(0.5) == "0.5"
    assert format_value(12.0) == "12"
    assert format_value(math.inf) == "+Inf"
    assert format_value(-math.inf) == "-Inf"
    assert format_value(math.nan) == "NaN"


def test_bad_names_and_duplicates_are_refused() -> None:
    with pytest.raises(ValueError, match="must end in _total"):
        Family("boincd_pulls", "counter", "x")
    with pytest.raises(ValueError, match="invalid metric name"):
        Family("1bad", "gauge", "x")
    with pytest.raises(ValueError, match="invalid label name"):
        Family("ok", "gauge", "x").add(1, **{"bad-name": "v"})
    with pytest.raises(ValueError, match="given twice"):
        render([Family("a", "gauge", "x"), Family("a", "gauge", "y")])


# -- what a scrape reports -----------------------------------------------------------


class NoEngine:
    """An engine that fails the test if a scrape tries to use it."""

    def __init__(self, info: EngineInfo | None) -> None:
        self.info = info

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a scrape used the engine: {name}")


class Disk:
    """The status parts the inventory and GC features add, and the disk-limits
    feature's task fields (their shapes as in docs/api.md)."""

    def __init__(self) -> None:
        self.calls = 0

    def task_fields(self, record: TaskRecord) -> dict[str, Any]:
        if record.result == "r_1":
            return {"disk_used_bytes": 5000, "disk_bound_bytes": 10**9}
        return {"disk_used_bytes": None, "disk_bound_bytes": None}

    async def status_fields(self) -> dict[str, Any]:
        self.calls += 1
        return {
            "images": {
                "total_bytes": 3 * 2**30 + 7,
                "count": 4,
                "reclaimable_bytes": 2**20,
                "cache_bytes": 2**30,
                "budget_bytes": 10 * 2**30,
                "items": [],
                "projects": {"proj_a": {"bytes": 100, "unique_bytes": 40, "images": 2}},
                "in_progress": [{"what": "pull:x", "progress": "", "tasks": 2}],
            },
            "volumes": {"total_bytes": 4096, "count": 2},
            "containers": {"writable_bytes": 8192, "count": 1},
            "gc": {"freed_bytes_total": 5 * 2**30, "last_run": 1700000000.5},
        }


class Broken:
    def task_fields(self, record: TaskRecord) -> dict[str, Any]:
        return {}

    async def status_fields(self) -> dict[str, Any]:
        raise Unavailable("accounting not ready")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(Settings(state_dir=str(tmp_path / "state"), gpu_backend="fake:2"))
    info = EngineInfo("docker", "20.10.24", "1.41", True, "1", "cgroupfs", "unix:///x", "/")
    d.engine = NoEngine(info)
    yield d
    d.gpus.allocator.close()


def _task(d: Daemon, result: str, project: str, state: str, sample: Sample | None) -> None:
    record = TaskRecord(result, project, container_id="c" * 64, state=TaskState(state))
    d.registry.store.add(record)
    if sample is not None:
        d.monitor.samples[record.key] = sample


async def test_scrape_reports_tasks_resources_gpus_and_engine(daemon: Daemon) -> None:
    _task(daemon, "r_1", "proj_a", "running", Sample(1.0, 12.5, 50 * 2**20, 40 * 2**20, 10, 20))
    _task(daemon, "r_2", "proj_b", "running", Sample(1.0, 3.0, 2**20, 2**20, 0, 0))
    _task(daemon, 'r_"3"', "proj_b", "paused", None)
    allocator = daemon.gpus.allocator
    allocator.allocate("proj_a/r_1", "NVIDIA", 0, 0.5)
    allocator.allocate("proj_b/r_2", "NVIDIA", 0, 0.5)
    backend = cast(FakeGpuBackend, allocator.backends[0])
    driver_calls = backend.calls
    daemon.registry.engine_error = None
    daemon.images.operations = 3

    samples, types = parse_exposition(render(await metrics.collect(daemon)))

    assert backend.calls == driver_calls, "a scrape must not query the GPU driver"
    assert value_of(samples, "boincd_engine_up") == 1
    assert (
        value_of(samples, "boincd_engine_info", kind="docker", version="20.10.24", mode="rootless")
        == 1
    )
    assert value_of(samples, "boincd_tasks", state="running") == 2
    assert value_of(samples, "boincd_tasks", state="paused") == 1
    assert value_of(samples, "boincd_tasks", state="failed") == 0
    assert types["boincd_task_cpu_seconds_total"] == "counter"
    assert (
        value_of(samples, "boincd_task_cpu_seconds_total", result="r_1", project="proj_a") == 12.5
    )
    assert (
        value_of(samples, "boincd_task_memory_bytes", result="r_1", project="proj_a") == 50 * 2**20
    )
    assert (
        value_of(
            samples, "boincd_task_network_transmit_bytes_total", result="r_1", project="proj_a"
        )
        == 20
    )
    # Never sampled: no made-up zeros.
    assert not [lab for lab, _ in samples["boincd_task_memory_bytes"] if lab["result"] == 'r_"3"']
    uuid = backend.uuid(0)
    for result, project in (("r_1", "proj_a"), ("r_2", "proj_b")):
        share = value_of(samples, "boincd_task_gpu_share", result=result, project=project, gpu=uuid)
        assert share == 0.5
        budget = value_of(
            samples, "boincd_task_gpu_memory_budget_bytes", result=result, project=project
        )
        assert budget == 4 * GIB
    assert value_of(samples, "boincd_gpu_allocated_ratio", gpu=uuid, name="Fake GPU") == 1.0
    assert value_of(samples, "boincd_gpu_tasks", gpu=uuid, name="Fake GPU") == 2
    assert value_of(samples, "boincd_image_operations_total") == 3
    # The inventory has not matched the engine (a NoEngine) yet: no image is known.
    assert value_of(samples, "boincd_images") == 0


async def test_engine_down_is_reported_not_an_error(daemon: Daemon) -> None:
    daemon.engine = NoEngine(None)
    samples, _ = parse_exposition(render(await metrics.collect(daemon)))
    assert value_of(samples, "boincd_engine_up") == 0
    assert samples["boincd_engine_info"] == []


async def test_disk_and_gc_figures_come_from_the_features_status(daemon: Daemon) -> None:
    disk = Disk()
    daemon.status_providers += [Broken(), disk]
    _task(daemon, "r_1", "proj_a", "running", None)
    _task(daemon, "r_2", "proj_a", "preparing", None)
    samples, types = parse_exposition(render(await metrics.collect(daemon)))
    assert disk.calls == 1
    assert value_of(samples, "boincd_images_bytes") == 3 * 2**30 + 7
    assert value_of(samples, "boincd_images") == 4
    assert value_of(samples, "boincd_images_reclaimable_bytes") == 2**20
    assert value_of(samples, "boincd_image_cache_bytes") == 2**30
    assert value_of(samples, "boincd_image_cache_budget_bytes") == 10 * 2**30
    assert value_of(samples, "boincd_image_operations_in_progress") == 1
    assert value_of(samples, "boincd_project_images_bytes", project="proj_a") == 100
    assert value_of(samples, "boincd_project_images_exclusive_bytes", project="proj_a") == 40
    assert value_of(samples, "boincd_volumes_bytes") == 4096
    assert value_of(samples, "boincd_volumes") == 2
    assert value_of(samples, "boincd_containers_writable_bytes") == 8192
    assert value_of(samples, "boincd_task_disk_bytes", result="r_1", project="proj_a") == 5000
    assert value_of(samples, "boincd_task_disk_bound_bytes", result="r_1", project="proj_a") == 1e9
    assert [lab["result"] for lab, _ in samples["boincd_task_disk_bytes"]] == ["r_1"]
    assert value_of(samples, "boincd_gc_freed_bytes_total") == 5 * 2**30
    assert types["boincd_gc_freed_bytes_total"] == "counter"
    assert value_of(samples, "boincd_gc_last_run_timestamp_seconds") == 1700000000.5


async def _http_get(socket_path: str, path: str) -> tuple[str, dict[str, str], str]:
    reader, writer = await asyncio.open_unix_connection(socket_path)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.decode().partition("\r\n\r\n")
    status, *lines = head.split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, body


async def test_served_on_the_socket_with_the_prometheus_content_type(daemon: Daemon) -> None:
    assert "/metrics" in {r.path for r in routes.routes if isinstance(r, web.RouteDef)}
    app = web.Application(middlewares=[routes.errors_and_auth])
    app[DAEMON] = daemon
    app.router.add_get("/metrics", routes.prometheus_metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    base = tempfile.mkdtemp(prefix="bd-m-")
    try:
        socket_path = str(Path(base) / "d.sock")
        await web.UnixSite(runner, socket_path).start()
        status, headers, body = await _http_get(socket_path, "/metrics")
        assert status.split(" ")[1] == "200", status
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        samples, _ = parse_exposition(body)
        assert "boincd_tasks" in samples
    finally:
        await runner.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def test_gpu_backend_setting() -> None:
    fake = gpu_backends("fake:3")
    assert [len(b.devices()) for b in fake] == [3]
    assert gpu_backends("none") == []
    assert len(gpu_backends("auto")) == 2  # NVML, then /sys for AMD and Intel
    for bad in ("nvml2", "fake:", "fake:x"):
        with pytest.raises(SettingsError, match="gpu_backend"):
            gpu_backends(bad)
