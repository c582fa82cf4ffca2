"""Prometheus text metrics at `GET /metrics` on the daemon's socket.

Everything is read from what the daemon already holds in memory (task records,
the monitor's latest samples, GPU assignments, image accounting, counters):
a scrape never calls the engine or a GPU driver, so scraping every few
seconds costs the host nothing and works while the engine is down.

Format: the Prometheus text exposition format 0.0.4 (HELP and TYPE lines,
escaped label values, counters named `*_total`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from boincd_containers.core.errors import BoincdError
from boincd_containers.core.log import get_logger
from boincd_containers.tasks.state import TaskKey, TaskState

if TYPE_CHECKING:
    from boincd_containers.daemon.app import Daemon

log = get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Every state a task record can be in (tasks/state.py): each is reported, 0
# included, so a state does not vanish from graphs when it empties.
TASK_STATES = tuple(TaskState)

Kind = Literal["counter", "gauge", "untyped"]

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def escape_label_value(value: str) -> str:
    """Backslash, double quote and line feed are the three escapes the format knows.

    Label values are UTF-8: what cannot be encoded (a lone surrogate, as a task
    adopted from the engine may carry) is written as its `\\udXXX` escape, so
    one odd name never makes the whole scrape fail.
    """
    value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text escapes backslash and line feed only (quotes are literal there)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    # Integers exactly (byte counts beyond 2**53 are not expected, but a float
    # repr would print 1e+16 and lose bytes); everything else as Python's repr.
    if float(value).is_integer() and abs(value) < 2**63:
        return str(int(value))
    return repr(float(value))


@dataclass
class Family:
    """One metric: its name, type, help and samples (labels, value)."""

    name: str
    kind: Kind
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _METRIC_NAME.fullmatch(self.name):
            raise ValueError(f"invalid metric name {self.name!r}")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name!r} must end in _total")

    def add(self, value: float, **labels: str) -> Family:
        for name in labels:
            if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
                raise ValueError(f"invalid label name {name!r} on {self.name}")
        self.samples.append((labels, float(value)))
        return self

    def render(self) -> str:
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for labels, value in self.samples:
            if labels:
                inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels.items())
                lines.append(f"{self.name}{{{inner}}} {format_value(value)}")
            else:
                lines.append(f"{self.name} {format_value(value)}")
        return "\n".join(lines) + "\n"


def render(families: Iterable[Family]) -> str:
    """The whole exposition; each family once, in the given order."""
    seen: set[str] = set()
    parts: list[str] = []
    for family in families:
        if family.name in seen:
            raise ValueError(f"metric {family.name} given twice")
        seen.add(family.name)
        parts.append(family.render())
    return "".join(parts)


# -- what the daemon knows ------------------------------------------------------


def _daemon_families(daemon: Daemon) -> list[Family]:
    info = daemon.engine.info
    engine_up = Family(
        "boincd_engine_up",
        "gauge",
        "1 while the daemon is connected to the container engine, else 0.",
    ).add(1 if daemon.registry.engine_error is None else 0)
    engine_info = Family(
        "boincd_engine_info",
        "gauge",
        "The container engine the daemon drives (always 1; the labels carry the facts).",
    )
    if info is not None:
        engine_info.add(
            1,
            kind=info.kind,
            version=info.version,
            mode="rootless" if info.rootless else "rootful",
        )
    build = Family(
        "boincd_daemon_info", "gauge", "The running daemon (always 1; version in the label)."
    ).add(1, version=daemon.version, instance_id=daemon.instance_id)
    return [build, engine_up, engine_info]


def _task_families(daemon: Daemon) -> list[Family]:
    by_state = dict.fromkeys(TASK_STATES, 0)
    records = list(daemon.registry.tasks.values())
    for record in records:
        by_state[record.state] = by_state.get(record.state, 0) + 1
    tasks = Family("boincd_tasks", "gauge", "Task containers by state.")
    for state, count in by_state.items():
        tasks.add(count, state=state)

    cpu = Family(
        "boincd_task_cpu_seconds_total", "counter", "CPU time used by the task's container."
    )
    memory = Family(
        "boincd_task_memory_bytes", "gauge", "Memory used by the task's container (cgroup usage)."
    )
    wss = Family(
        "boincd_task_working_set_bytes",
        "gauge",
        "Working set of the task's container (usage less inactive file cache).",
    )
    rx = Family(
        "boincd_task_network_receive_bytes_total", "counter", "Bytes the task's container received."
    )
    tx = Family(
        "boincd_task_network_transmit_bytes_total", "counter", "Bytes the task's container sent."
    )
    disk = Family(
        "boincd_task_disk_bytes",
        "gauge",
        "Disk a task uses: its slot dir, writable layer and volumes.",
    )
    bound = Family(
        "boincd_task_disk_bound_bytes", "gauge", "BOINC's disk bound for the task (rsc_disk_bound)."
    )
    samples = daemon.monitor.samples
    for record in records:
        labels = {"result": record.result, "project": record.project}
        # Disk figures come from the disk-limits feature's task fields, where present
        # (memory only: its own loop measures); None means not measured yet.
        fields = daemon.task_json(record)
        if _int(fields.get("disk_used_bytes")) is not None:
            disk.add(fields["disk_used_bytes"], **labels)
        if _int(fields.get("disk_bound_bytes")) is not None:
            bound.add(fields["disk_bound_bytes"], **labels)
        # A task never sampled (still preparing, or never ran) has no figures:
        # a 0 would read as "used nothing", which is not known.
        sample = samples.get(record.key)
        if sample is None:
            continue
        cpu.add(sample.cpu_time_s, **labels)
        memory.add(sample.memory_bytes, **labels)
        wss.add(sample.wss_bytes, **labels)
        rx.add(sample.rx_bytes, **labels)
        tx.add(sample.tx_bytes, **labels)
    return [tasks, cpu, memory, wss, rx, tx, disk, bound]


def _gpu_families(daemon: Daemon) -> list[Family]:
    # Assignments only (a lock and a dict): no NVML call per scrape. Cards no
    # task holds therefore do not appear; `ctl gpus` lists the full inventory.
    assignments = daemon.gpus.allocator.assignments()
    share = Family(
        "boincd_task_gpu_share",
        "gauge",
        "Fraction of a GPU a task holds (BOINC's gpu_usage; 1 for each whole card).",
    )
    budget = Family(
        "boincd_task_gpu_memory_budget_bytes",
        "gauge",
        "GPU memory a task may use on each of its cards (card memory x its share).",
    )
    allocated: dict[str, float] = {}
    holders: dict[str, int] = {}
    names = {d.uuid: d.name for a in assignments for d in a.devices}
    for a in sorted(assignments, key=lambda a: a.result):
        task = TaskKey.parse(a.result)  # the allocator holds per task, not per result
        for uuid in a.uuids:
            share.add(a.share, result=task.result, project=task.project, gpu=uuid)
            allocated[uuid] = allocated.get(uuid, 0.0) + a.share
            holders[uuid] = holders.get(uuid, 0) + 1
        budget.add(a.memory_budget_bytes, result=task.result, project=task.project)
    card = Family(
        "boincd_gpu_allocated_ratio",
        "gauge",
        "Sum of the shares tasks hold on a GPU (at most 1); only GPUs some task holds.",
    )
    count = Family("boincd_gpu_tasks", "gauge", "Tasks holding a share of a GPU.")
    for uuid in sorted(allocated):
        card.add(round(allocated[uuid], 6), gpu=uuid, name=names.get(uuid, ""))
        count.add(holders[uuid], gpu=uuid, name=names.get(uuid, ""))
    return [share, budget, card, count]


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _project_rows(projects: Any) -> list[tuple[str, int | None, int | None]]:
    """(project, bytes its images use, bytes only it uses) from either shape
    the inventory may give: {name: {...}} or [{"project": name, ...}]."""
    rows: list[tuple[str, int | None, int | None]] = []
    items: Iterable[tuple[str, Any]]
    if isinstance(projects, Mapping):
        items = projects.items()
    elif isinstance(projects, list):
        items = ((str(p.get("project", "")), p) for p in projects if isinstance(p, Mapping))
    else:
        return rows
    for name, data in items:
        if not isinstance(data, Mapping) or not name:
            continue
        used = _int(data.get("used_bytes", data.get("bytes")))
        own = _int(data.get("exclusive_bytes", data.get("unique_bytes")))
        rows.append((name, used, own))
    return rows


def _single(name: str, help_text: str, value: Any) -> list[Family]:
    """A one-sample gauge, or nothing when the feature did not give the figure."""
    number = _int(value)
    return [] if number is None else [Family(name, "gauge", help_text).add(number)]


def _disk_families(fields: Mapping[str, Any], daemon: Daemon) -> list[Family]:
    families: list[Family] = []
    images = fields.get("images")
    if isinstance(images, Mapping):
        families += _single(
            "boincd_images_bytes",
            "Disk used by the engine's images: each distinct layer counted once.",
            images.get("total_bytes"),
        )
        families += _single("boincd_images", "Images in the engine's store.", images.get("count"))
        families += _single(
            "boincd_image_cache_bytes",
            "Disk used by the images the daemon brought (distinct layers).",
            images.get("cache_bytes"),
        )
        families += _single(
            "boincd_image_cache_budget_bytes",
            "The budget for the images the daemon brought; least recently used go first.",
            images.get("budget_bytes"),
        )
        families += _single(
            "boincd_images_reclaimable_bytes",
            "Image bytes the daemon could free now (its own images no task uses).",
            images.get("reclaimable_bytes"),
        )
        in_progress = images.get("in_progress")
        if isinstance(in_progress, list):
            families += _single(
                "boincd_image_operations_in_progress",
                "Image pulls, loads and builds running now.",
                len(in_progress),
            )
        used = Family(
            "boincd_project_images_bytes",
            "gauge",
            "Disk used by a project's images (distinct layers, shared ones included).",
        )
        own = Family(
            "boincd_project_images_exclusive_bytes",
            "gauge",
            "Disk used by layers only this project's images use.",
        )
        for project, used_bytes, own_bytes in sorted(_project_rows(images.get("projects"))):
            if used_bytes is not None:
                used.add(used_bytes, project=project)
            if own_bytes is not None:
                own.add(own_bytes, project=project)
        families += [used, own]
    volumes = fields.get("volumes")
    if isinstance(volumes, Mapping):
        families += _single(
            "boincd_volumes_bytes", "Disk used by the daemon's volumes.", volumes.get("total_bytes")
        )
        families += _single("boincd_volumes", "Volumes the daemon created.", volumes.get("count"))
    containers = fields.get("containers")
    if isinstance(containers, Mapping):
        families += _single(
            "boincd_containers_writable_bytes",
            "Disk used by the writable layers of the daemon's containers.",
            containers.get("writable_bytes"),
        )
    families.append(
        Family(
            "boincd_image_operations_total",
            "counter",
            "Image pulls, loads and builds run (one per image however many tasks wait for it).",
        ).add(daemon.images.operations)
    )
    return families


def _gc_families(fields: Mapping[str, Any]) -> list[Family]:
    """From the `gc` status field of the garbage collector feature, when attached."""
    gc = fields.get("gc")
    if not isinstance(gc, Mapping):
        return []
    families = [
        Family(
            "boincd_gc_freed_bytes_total",
            "counter",
            "Bytes freed by garbage collection since the daemon started.",
        ).add(_int(gc.get("freed_bytes_total")) or 0)
    ]
    last_run = gc.get("last_run")
    if isinstance(last_run, int | float):
        families.append(
            Family(
                "boincd_gc_last_run_timestamp_seconds",
                "gauge",
                "When garbage collection last ran (Unix time).",
            ).add(last_run)
        )
    return families


_STATUS_PARTS = ("images", "volumes", "containers", "gc")


async def _status_parts(daemon: Daemon) -> dict[str, Any]:
    """`images`, `volumes`, `containers` (inventory feature) and `gc` (collector)
    as they appear in status: each kept in memory by its feature (DESIGN: no
    `system df` per request). The GPU part of status is skipped: it asks the
    driver, which a scrape must not do.
    """
    fields: dict[str, Any] = {}
    for provider in daemon.status_providers:
        if provider is daemon.gpus or provider is daemon.monitor:
            continue
        try:
            part = await provider.status_fields()
        except BoincdError as exc:
            log.debug("metrics: a status part failed", error=exc.message)
            continue
        for key in _STATUS_PARTS:
            if key in part:
                fields[key] = part[key]
    return fields


async def collect(daemon: Daemon) -> list[Family]:
    families = _daemon_families(daemon) + _task_families(daemon) + _gpu_families(daemon)
    parts = await _status_parts(daemon)
    families += _disk_families(parts, daemon)
    families += _gc_families(parts)
    return families
