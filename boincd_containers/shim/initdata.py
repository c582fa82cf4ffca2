"""Read the slot's ``init_data.xml``, the task description the BOINC client writes.

The client writes the file before it starts the app (``write_init_data_file`` in
lib/app_ipc.cpp). Client 7.20 never writes ``docker_version``/``docker_type``, so
nothing here depends on them. Defaults follow ``APP_INIT_DATA::clear()`` so that a
field the client leaves out means what it means to a BOINC app.
"""

from __future__ import annotations

import html
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

INIT_DATA_FILE = "init_data.xml"


class InitDataError(Exception):
    """init_data.xml is missing or cannot be understood."""


class InitData(NamedTuple):
    result_name: str
    wu_name: str
    app_name: str
    project_dir: str
    boinc_dir: str
    slot: int
    ncpus: float
    rsc_memory_bound: float
    rsc_disk_bound: float
    gpu_type: str
    gpu_device_num: int
    gpu_opencl_dev_index: int
    gpu_usage: float
    client_pid: int
    wu_cpu_time: float
    starting_elapsed_time: float
    checkpoint_period: float
    fraction_done_start: float
    fraction_done_end: float
    major_version: int
    minor_version: int
    release: int
    shm_key: int

    @property
    def project_name(self) -> str:
        """The project dir's name under ``projects/``, as container names use it."""
        return Path(self.project_dir).name

    @property
    def uses_gpu(self) -> bool:
        # The client writes an empty type and -1 when it assigned no GPU.
        return bool(self.gpu_type) and self.gpu_device_num >= 0

    @property
    def client_version(self) -> tuple[int, int, int]:
        return (self.major_version, self.minor_version, self.release)


_STRINGS = ("result_name", "wu_name", "app_name", "project_dir", "boinc_dir", "gpu_type")
_INTS: dict[str, int] = {
    "slot": 0,
    "gpu_device_num": -1,
    "gpu_opencl_dev_index": -1,
    "client_pid": 0,
    "major_version": 0,
    "minor_version": 0,
    "release": 0,
    "shm_key": 0,
}
_FLOATS: dict[str, float] = {
    "ncpus": 0.0,
    "rsc_memory_bound": 0.0,
    "rsc_disk_bound": 0.0,
    "gpu_usage": 0.0,
    "wu_cpu_time": 0.0,
    "starting_elapsed_time": 0.0,
    # boinc_api substitutes 300 s when the client sends none.
    "checkpoint_period": 300.0,
    "fraction_done_start": 0.0,
    "fraction_done_end": 1.0,
}
_WANTED = frozenset((*_STRINGS, *_INTS, *_FLOATS))
# Blocks whose children may reuse our tag names; the fallback scanner cuts them out.
_NESTED_BLOCKS = ("project_preferences", "global_preferences", "host_info", "proxy_info")


def _scan_elementtree(text: str) -> dict[str, str]:
    root = ET.fromstring(text)
    if root.tag != "app_init_data":
        raise InitDataError(
            f"{INIT_DATA_FILE}: the root element is <{root.tag}>, expected <app_init_data>"
        )
    found: dict[str, str] = {}
    for child in root:
        if child.tag in _WANTED and child.tag not in found:
            found[child.tag] = (child.text or "").strip()
    return found


def _scan_lenient(text: str) -> dict[str, str]:
    """Read top-level scalar tags from text that is not well-formed XML.

    The client writes some strings (project_dir, app_name, host_info fields)
    without escaping, so an ``&`` in a path breaks a strict parser while the
    BOINC runtime, which scans tags, still reads the file.
    """
    # parse_init_data_file fails without the end tag too: the file was cut short.
    if "<app_init_data>" not in text or "</app_init_data>" not in text:
        raise InitDataError(
            f"{INIT_DATA_FILE}: no complete <app_init_data> element; is the file truncated?"
        )
    for block in _NESTED_BLOCKS:
        text = re.sub(rf"<{block}\b.*?</{block}>", "", text, flags=re.DOTALL)
    found: dict[str, str] = {}
    for tag in _WANTED:
        m = re.search(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
        if m:
            found[tag] = html.unescape(m.group(1)).strip()
    return found


def _number(tag: str, raw: str, kind: type[int] | type[float]) -> float:
    try:
        value = float(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise InitDataError(f"{INIT_DATA_FILE}: <{tag}> is {raw!r}, expected {what}") from None
    if not math.isfinite(value):
        raise InitDataError(f"{INIT_DATA_FILE}: <{tag}> is {raw!r}, expected a finite number")
    return value


def parse_init_data(text: str) -> InitData:
    """Parse the text of an init_data.xml."""
    try:
        found = _scan_elementtree(text)
    except ET.ParseError:
        found = _scan_lenient(text)

    def string(tag: str) -> str:
        return found.get(tag, "")

    def integer(tag: str) -> int:
        raw = found.get(tag, "")
        # The client prints these with %d; accept "3.0" rather than fail a task.
        return int(_number(tag, raw, int)) if raw else _INTS[tag]

    def real(tag: str) -> float:
        raw = found.get(tag, "")
        return _number(tag, raw, float) if raw else _FLOATS[tag]

    if not string("result_name"):
        raise InitDataError(
            f"{INIT_DATA_FILE}: <result_name> is missing or empty; "
            "the shim must be started by the BOINC client in a task's slot directory"
        )
    if not string("project_dir"):
        raise InitDataError(f"{INIT_DATA_FILE}: <project_dir> is missing or empty")
    checkpoint_period = real("checkpoint_period")
    return InitData(
        result_name=string("result_name"),
        wu_name=string("wu_name"),
        app_name=string("app_name"),
        project_dir=string("project_dir"),
        boinc_dir=string("boinc_dir"),
        slot=integer("slot"),
        ncpus=real("ncpus"),
        rsc_memory_bound=real("rsc_memory_bound"),
        rsc_disk_bound=real("rsc_disk_bound"),
        gpu_type=string("gpu_type"),
        gpu_device_num=integer("gpu_device_num"),
        gpu_opencl_dev_index=integer("gpu_opencl_dev_index"),
        gpu_usage=real("gpu_usage"),
        client_pid=integer("client_pid"),
        wu_cpu_time=real("wu_cpu_time"),
        starting_elapsed_time=real("starting_elapsed_time"),
        checkpoint_period=(
            checkpoint_period if checkpoint_period > 0 else _FLOATS["checkpoint_period"]
        ),
        fraction_done_start=real("fraction_done_start"),
        fraction_done_end=real("fraction_done_end"),
        major_version=integer("major_version"),
        minor_version=integer("minor_version"),
        release=integer("release"),
        shm_key=integer("shm_key"),
    )


def load_init_data(slot_dir: str | Path) -> InitData:
    """Read ``init_data.xml`` from the slot directory."""
    path = Path(slot_dir) / INIT_DATA_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InitDataError(
            f"no {INIT_DATA_FILE} in {Path(slot_dir)}: the shim must be started by the "
            "BOINC client, which writes this file into the task's slot directory"
        ) from None
    except OSError as exc:
        raise InitDataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not raw.strip():
        raise InitDataError(f"{path} is empty")
    return parse_init_data(raw.decode("utf-8", errors="replace"))
