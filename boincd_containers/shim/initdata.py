"""Read the slot's ``init_data.xml``, the task description the BOINC client writes.

The client writes the file before it starts the app (``write_init_data_file`` in
lib/app_ipc.cpp). Client 7.20 never writes ``docker_version``/``docker_type``, so
nothing here depends on them. Defaults follow ``APP_INIT_DATA::clear()`` so that a
field the client leaves out means what it means to a BOINC app.
"""

from __future__ import annotations

import math
import pyexpat
import re
from pathlib import Path
from typing import NamedTuple

from .slotfiles import INIT_DATA_MAX_BYTES, read_slot_file

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
# Blocks whose children may reuse our tag names; the fallback scanner skips them.
_NESTED_BLOCKS = frozenset(("project_preferences", "global_preferences", "host_info", "proxy_info"))
_TAG = re.compile(r"<([A-Za-z_][A-Za-z0-9_.-]*)")
# BOINC's result names are printable ASCII (the scheduler's database column is
# varchar(254)); the name also goes into the daemon's URLs, where '/' and '?'
# would change what is addressed.
RESULT_NAME_MAX = 254
_RESULT_NAME_RE = re.compile(r"[\x20-\x7e]+")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class _NotPlain(Exception):
    """The file declares a DTD: the client never writes one; read it as BOINC does."""


def _scan_expat(text: str) -> dict[str, str]:
    """The text of the first of each wanted child of <app_init_data>, in one pass.

    Expat streams: no tree is built, so the whole parse is linear in the file
    and a deep or wide <host_info> costs nothing but the scan.
    """
    parser = pyexpat.ParserCreate()
    found: dict[str, str] = {}
    depth = 0
    current: str | None = None  # the wanted child whose leading text we collect
    parts: list[str] = []

    def start(tag: str, _attrs: object) -> None:
        nonlocal depth, current
        depth += 1
        if depth == 1:
            if tag != "app_init_data":
                raise InitDataError(
                    f"{INIT_DATA_FILE}: the root element is <{tag}>, expected <app_init_data>"
                )
        elif depth == 2 and tag in _WANTED and tag not in found:
            current = tag
            parts.clear()
        elif depth == 3 and current is not None:
            # Like ElementTree's .text: only the text before the first child.
            found[current] = "".join(parts).strip()
            current = None

    def end(tag: str) -> None:
        nonlocal depth, current
        if depth == 2 and current == tag:
            found[tag] = "".join(parts).strip()
            current = None
        depth -= 1

    def chars(data: str) -> None:
        if current is not None and depth == 2:
            parts.append(data)

    def doctype(*_args: object) -> None:
        raise _NotPlain

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.StartDoctypeDeclHandler = doctype
    parser.EntityDeclHandler = doctype
    parser.Parse(text, True)
    return found


def _scan_lenient(text: str) -> dict[str, str]:
    """Read top-level scalar tags from text that is not well-formed XML.

    The client writes some strings (project_dir, app_name, host_info fields)
    without escaping, so an ``&`` in a path breaks a strict parser while the
    BOINC runtime, which scans tags, still reads the file.

    One pass over the tags: each tag name is looked for past its opening at
    most once, and a block that is skipped moves the scan past its end, so the
    work is linear in the file whatever it holds.
    """
    # parse_init_data_file fails without the end tag too: the file was cut short.
    if "<app_init_data>" not in text or "</app_init_data>" not in text:
        raise InitDataError(
            f"{INIT_DATA_FILE}: no complete <app_init_data> element; is the file truncated?"
        )
    found: dict[str, str] = {}
    unclosed: set[str] = set()  # no end tag after this point: none after any later one either
    pos = 0
    while True:
        m = _TAG.search(text, pos)
        if m is None:
            return found
        tag = m.group(1)
        pos = m.end()
        if tag in unclosed:
            continue
        if tag in _NESTED_BLOCKS:
            close = text.find(f"</{tag}>", pos)
            if close < 0:
                unclosed.add(tag)
            else:
                pos = close + len(tag) + 3
        elif tag in _WANTED and tag not in found and text.startswith(">", pos):
            close = text.find(f"</{tag}>", pos + 1)
            if close < 0:
                unclosed.add(tag)
            else:
                found[tag] = _unescape(text[pos + 1 : close]).strip()


def _unescape(text: str) -> str:
    """html.unescape, imported only for text that has an entity: `html` costs the
    shim's start a few ms, and init_data.xml's values rarely hold one."""
    if "&" not in text:
        return text
    import html

    return html.unescape(text)


def _number(tag: str, raw: str, kind: type[int] | type[float]) -> float:
    try:
        value = float(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise InitDataError(f"{INIT_DATA_FILE}: <{tag}> is {raw!r}, expected {what}") from None
    if not math.isfinite(value):
        raise InitDataError(f"{INIT_DATA_FILE}: <{tag}> is {raw!r}, expected a finite number")
    return value


def _check_result_name(name: str) -> None:
    if len(name) > RESULT_NAME_MAX:
        raise InitDataError(
            f"{INIT_DATA_FILE}: <result_name> is {len(name)} characters long; "
            f"BOINC's result names have at most {RESULT_NAME_MAX}"
        )
    if not _RESULT_NAME_RE.fullmatch(name) or "/" in name or "?" in name:
        raise InitDataError(
            f"{INIT_DATA_FILE}: <result_name> {name!a} has a character the shim cannot "
            "use: BOINC's result names are printable ASCII, without '/' or '?'"
        )


def parse_init_data(text: str) -> InitData:
    """Parse the text of an init_data.xml."""
    try:
        found = _scan_expat(text)
    except (pyexpat.ExpatError, _NotPlain):
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
    _check_result_name(string("result_name"))
    if not string("project_dir"):
        raise InitDataError(f"{INIT_DATA_FILE}: <project_dir> is missing or empty")
    for tag in ("project_dir", "boinc_dir"):
        if _CONTROL_RE.search(string(tag)):
            raise InitDataError(f"{INIT_DATA_FILE}: <{tag}> contains a control character")
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
        raw = read_slot_file(path, INIT_DATA_MAX_BYTES, name=INIT_DATA_FILE)
    except FileNotFoundError:
        raise InitDataError(
            f"no {INIT_DATA_FILE} in {Path(slot_dir)}: the shim must be started by the "
            "BOINC client, which writes this file into the task's slot directory"
        ) from None
    except OSError as exc:  # read_slot_file's message names the file and the problem
        raise InitDataError(str(exc)) from None
    if not raw.strip():
        raise InitDataError(f"{path} is empty")
    return parse_init_data(raw.decode("utf-8", errors="replace"))
