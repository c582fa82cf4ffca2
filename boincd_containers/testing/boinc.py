"""Run the real, unmodified BOINC client standalone with a fake project.

No project server exists: the harness writes a data dir whose
``client_state.xml`` already holds a project, an app, an app version, workunits
and results in state 2 ("files downloaded"), so the client starts the tasks at
once. Everything the client would fetch is marked present, and every URL points
at ``127.0.0.1:1``, where a connection is refused at once, so a client allowed to
use the network fails fast instead of hanging on DNS or timeouts.

The client binaries are a parameter (``ClientBinaries``: Debian's 7.20.5, or
8.2.15 from ../shared/); the e2e tests run under both (boincd_containers/testing/clients.py). A
``BoincClient`` knows what it drives: ``binaries.version``, and whether it was
started with ``--allow_multiple_clients`` (the default, as tests must not
disturb each other) or as a volunteer's client is, without it.

Facts about both releases that this module relies on (read from the client's
source and checked by ``tests/e2e/test_boinc_harness.py``):

* ``--unsigned_apps_ok`` makes the client suspend network activity for good
  (every heartbeat then carries ``<network_suspended/>``) and lets it run app
  files without signatures. Files already marked present in
  ``client_state.xml`` are never verified, so ``unsigned_apps_ok=False`` still
  runs the tasks and leaves the network switch to ``set_network_mode``.
* The client runs the main program as ``../../projects/<dir>/<file>`` from the
  slot dir, stdout to ``/dev/null``, stderr appended to ``slots/N/stderr.txt``,
  at nice 19 and ``SCHED_IDLE``. When the app has ended, stderr.txt is appended
  to the result's ``stderr_out`` as ``<stderr_txt>...</stderr_txt>`` (after a
  ``<message>`` element holding the client's reason, on error).
* An exit status other than 0 is an error whatever ``boinc_finish_called``
  says (state "compute error", ``exit_status`` = the status). Exit 0 counts as
  success only if ``boinc_finish_called`` exists in the slot; without it the
  client treats the exit as premature and restarts the task.
* On success the result goes to state 4 "uploading" and, here, stays there
  (nothing can upload). Output files with ``<copy_file/>`` are copied from the
  slot to the project dir when the app ends; an output file without an upload
  URL would be deleted, so every output file gets one.
* Priority (client/app_start.cpp ``get_priority``): nice 19 for a CPU task;
  nice 10 ("high priority") for a GPU task, an app version with ``avg_ncpus``
  below 1, or an ``is_wrapper`` one. Every 10 s (MEMORY_USAGE_PERIOD) the
  client adds up the CPU time of "non-BOINC" processes, skipping those at
  priority 39 (nice 19, whatever the policy), the tasks' process trees (from
  the app's pid and its ``other_pid``) and any process whose command name
  contains "boinc" (lib/procinfo_unix.cpp), and at more than
  ``suspend_cpu_usage`` percent (default 25; DETERMINISTIC_PREFS sets 0) logs
  "Suspending computation - CPU is busy". The load is divided by the CPU
  count, which cc_config's ``ncpus`` replaces (client/cpu_sched.cpp sets
  ``p_ncpus``): with the one CPU per task this harness simulates by default, a
  quarter of one core of load anywhere on the host is enough. Log flag
  ``mem_usage_debug`` prints the figure ("[mem_usage] non-BOINC CPU usage").
* Without ``--allow_multiple_clients`` both lock their data dir (a second
  client on the same dir exits). Nothing else about other clients changes in
  7.20; 8.2 also cleans up Docker (below), which acts on the whole engine, so
  such clients run one at a time on a host (``single_client_lock``).

Where 8.2.15 differs from 7.20.5:

* At start it probes for an engine: ``podman --version`` and ``podman run --rm
  hello-world``, then the same with ``docker``; the first whose output has a
  line containing "Hello" is logged as "Docker: version V (Docker|podman)"
  (else "... found but 'hello-world' test failed"). Offline that needs a local
  ``hello-world`` image (boincd_containers/testing/volunteer.py).
* Without ``--allow_multiple_clients`` (cc_config or flag), once the probe
  found an engine, ``docker_cleanup`` (client/cs_apps.cpp) runs ``ps --all``
  and ``rm -f`` on every container whose name starts with ``boinc__``, except
  ``boinc__<project dir, lower case>__<result, lower case>`` of a started task
  whose app version's plan class contains "docker"; each removal logged as
  "Removed unused Docker container: NAME". (On Podman it also ``image rm``s
  ``localhost/boinc__*`` images.) 7.20 has no such cleanup.
* init_data.xml gets ``<plan_class>`` (when not empty) and, in ``host_info``,
  ``<docker_version>`` and ``<docker_type>`` when the probe found an engine;
  7.20 writes none of them.
* It reads the app's ``<wss>`` from app_status as the task's working set; 7.20
  ignores it and measures the task's process tree only, which a container's
  processes (children of the engine) are not part of.
* Since 8.2.14 it no longer reads ``<bytes_sent>``/``<bytes_received>`` from
  app_status: boinccmd then prints no "bytes sent" line for the task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import math
import os
import re
import signal
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from xml.sax.saxutils import escape

from boincd_containers.testing.names import unique

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class ClientBinaries:
    """One BOINC client release: its ``boinc`` and ``boinccmd``."""

    version: str  # e.g. "7.20.5", "8.2.15"
    boinc: Path
    boinccmd: Path

    def __str__(self) -> str:
        return self.version

    def available(self) -> bool:
        return self.boinc.exists() and self.boinccmd.exists()

    def reported_version(self) -> str:
        """What ``boinc --version`` prints first, e.g. ``7.20.5``."""
        out = subprocess.run(
            [str(self.boinc), "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        return out[0] if out else ""

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.version.split("."))

    # What differs between releases (see the module docstring for the source).
    @property
    def reads_bytes_transferred(self) -> bool:
        """Reads the app's ``<bytes_sent>``/``<bytes_received>`` (before 8.2.14)."""
        return self.version_tuple < (8, 2, 14)

    @property
    def writes_docker_info(self) -> bool:
        """Writes ``<plan_class>``, ``<docker_version>``, ``<docker_type>`` into
        init_data.xml (8.2 and later)."""
        return self.version_tuple >= (8, 2)

    @property
    def cleans_up_docker(self) -> bool:
        """Removes ``boinc__*`` containers at start unless allow_multiple_clients
        (docker_cleanup, 8.2.0 and later)."""
        return self.version_tuple >= (8, 2)


# Debian's client (7.20.5 on Debian 12) and the newest release, built unmodified
# (../shared/boinc-client-8.2.15/README.md). BOINCD_TEST_BOINC8_DIR overrides where
# the latter is; CI lays shared/ beside the checkout.
DEBIAN_CLIENT = ClientBinaries("7.20.5", Path("/usr/bin/boinc"), Path("/usr/bin/boinccmd"))
_BOINC8_DIR = Path(
    os.environ.get("BOINCD_TEST_BOINC8_DIR", str(REPO.parent / "shared" / "boinc-client-8.2.15"))
)
CLIENT_8_2 = ClientBinaries("8.2.15", _BOINC8_DIR / "boinc", _BOINC8_DIR / "boinccmd")
CLIENTS = (DEBIAN_CLIENT, CLIENT_8_2)

BOINC = DEBIAN_CLIENT.boinc
BOINCCMD = DEBIAN_CLIENT.boinccmd

GUI_RPC_PASSWORD = "boinc-harness"
APP_NAME = "harness_app"
VERSION_NUM = 100
# At least 6.0, or the client would use System V shared memory instead of the
# slot's boinc_mmap_file, which is what real apps (and the shim) map.
API_VERSION = "7.20.0"

# Result states (lib/common_defs.h RESULT_*), as numbers in client_state.xml and
# as the strings ``boinccmd --get_tasks`` prints.
RESULT_NEW = 0
RESULT_FILES_DOWNLOADING = 1
RESULT_FILES_DOWNLOADED = 2
RESULT_COMPUTE_ERROR = 3
RESULT_FILES_UPLOADING = 4
RESULT_FILES_UPLOADED = 5
RESULT_ABORTED = 6
RESULT_UPLOAD_FAILED = 7
RESULT_STATE_NAMES = {
    RESULT_NEW: "new",
    RESULT_FILES_DOWNLOADING: "downloading",
    RESULT_FILES_DOWNLOADED: "downloaded",
    RESULT_COMPUTE_ERROR: "compute error",
    RESULT_FILES_UPLOADING: "uploading",
    RESULT_FILES_UPLOADED: "uploaded",
    RESULT_ABORTED: "aborted",
    RESULT_UPLOAD_FAILED: "upload failed",
}

# Exit statuses the client itself sets (lib/error_numbers.h).
EXIT_DISK_LIMIT_EXCEEDED = 196
EXIT_TIME_LIMIT_EXCEEDED = 197
EXIT_MEM_LIMIT_EXCEEDED = 198
EXIT_ABORTED_VIA_GUI = 203
ERR_RESULT_START = -185  # the app could not be started
ERR_TOO_MANY_EXITS = -226  # 100 exits with status 0 but no boinc_finish_called

# Preferences written to global_prefs_override.xml unless a test overrides them.
# All other preferences keep the client's defaults (lib/prefs.cpp).
DETERMINISTIC_PREFS: Mapping[str, float | int] = {
    # Default 25: other processes of a parallel test run would make the client
    # suspend tasks ("CPU is busy") at random. Tests of that behaviour set it.
    "suspend_cpu_usage": 0,
    # Default off; a container or laptop the tests run on may look like one on
    # batteries.
    "run_on_batteries": 1,
    # Defaults 1 and 0; user activity must never suspend anything.
    "run_if_user_active": 1,
    "run_gpu_if_user_active": 1,
    # Defaults 90 % and 0.1 GB: a nearly full CI disk must not change the
    # client's decisions.
    "disk_max_used_pct": 100,
    "disk_min_free_gb": 0,
    # Defaults 0.1 and 0.5 days: nothing to fetch from a project that is not
    # there.
    "work_buf_min_days": 0,
    "work_buf_additional_days": 0,
}

T = TypeVar("T")


def boinc_available() -> bool:
    return BOINC.exists() and BOINCCMD.exists()


def escape_project_url(url: str) -> str:
    """The project dir name the client derives from a master URL (lib/url.cpp)."""
    rest = url.split("://", 1)[1] if "://" in url else url
    # The client tests with C isalnum(): ASCII only.
    out = "".join(c if (c.isascii() and c.isalnum()) or c in ".-_" else "_" for c in rest)
    return out[:-1] if out.endswith("_") else out


def client_platform(boinc: Path = BOINC) -> str:
    """The client's primary platform, e.g. ``x86_64-pc-linux-gnu``."""
    out = subprocess.run(
        [str(boinc), "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    return out[1] if len(out) > 1 else "x86_64-pc-linux-gnu"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class FileSpec:
    """A file the client finds already present in the project dir.

    ``copy_file`` makes the client copy it into the slot under ``open_name``;
    without it the slot gets a BOINC link file (an XML ``<soft_link>`` text
    file, not a symlink) that only ``boinc_resolve_filename`` understands.
    """

    open_name: str
    content: bytes | Path
    copy_file: bool = True
    executable: bool = False

    def data(self) -> bytes:
        return self.content.read_bytes() if isinstance(self.content, Path) else self.content


@dataclasses.dataclass(frozen=True)
class ResultSpec:
    name: str
    inputs: Sequence[FileSpec] = ()
    # Open names of output files; the physical file is ``<result>_<open_name>``.
    outputs: Sequence[str] = ("out.txt",)
    command_line: str = ""
    # With the app version's 1e9 flops: an estimated 1000 s, so the fraction
    # done the client guesses for an app that reports none stays small.
    rsc_fpops_est: float = 1e12
    # The client aborts a task once elapsed time exceeds bound / app flops; huge.
    rsc_fpops_bound: float = 1e18
    rsc_memory_bound: float = 256e6
    rsc_disk_bound: float = 2e9
    max_output_bytes: float = 1e9

    @property
    def wu_name(self) -> str:
        return f"{self.name}_wu"

    def output_physical(self, open_name: str) -> str:
        return f"{self.name}_{open_name}"

    def input_physical(self, spec: FileSpec) -> str:
        return f"{self.wu_name}_{spec.open_name}"


# ------------------------------------------------------------ parsed outputs


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of ``boinccmd --get_tasks`` (lib/gui_rpc_client_print.cpp)."""

    fields: Mapping[str, str]

    def _float(self, key: str) -> float | None:
        v = self.fields.get(key)
        return float(v) if v is not None else None

    def _int(self, key: str) -> int | None:
        v = self.fields.get(key)
        return int(v) if v is not None else None

    @property
    def name(self) -> str:
        return self.fields["name"]

    @property
    def state(self) -> str:
        """Result state: new, downloading, downloaded, compute error,
        uploading, uploaded, aborted, upload failed."""
        return self.fields["state"]

    @property
    def scheduler_state(self) -> str:
        """uninitialized (never run), preempted, scheduled."""
        return self.fields["scheduler state"]

    @property
    def active_task_state(self) -> str:
        """UNINITIALIZED, EXECUTING, SUSPENDED, ABORT_PENDING, QUIT_PENDING,
        EXITED, WAS_SIGNALED, EXIT_UNKNOWN, ABORTED, COULDNT_START,
        COPY_PENDING."""
        return self.fields["active_task_state"]

    @property
    def ready_to_report(self) -> bool:
        return self.fields.get("ready to report") == "yes"

    @property
    def suspended_via_gui(self) -> bool:
        return self.fields.get("suspended via GUI") == "yes"

    @property
    def done(self) -> bool:
        """The app has ended for good (success or failure)."""
        return self.state not in ("new", "downloading", "downloaded")

    # Present once the task has been scheduled at least once.
    @property
    def slot(self) -> int | None:
        return self._int("slot")

    @property
    def pid(self) -> int | None:
        return self._int("PID")

    @property
    def current_cpu_time(self) -> float | None:
        return self._float("current CPU time")

    @property
    def checkpoint_cpu_time(self) -> float | None:
        return self._float("CPU time at last checkpoint")

    @property
    def fraction_done(self) -> float | None:
        return self._float("fraction done")

    @property
    def elapsed_time(self) -> float | None:
        return self._float("elapsed task time")

    # Present once the task is done (state past "downloaded").
    @property
    def exit_status(self) -> int | None:
        return self._int("exit_status")

    @property
    def signal(self) -> int | None:
        return self._int("signal")

    @property
    def final_cpu_time(self) -> float | None:
        return self._float("final CPU time")


def parse_tasks(text: str) -> list[Task]:
    tasks: list[dict[str, str]] = []
    for line in text.splitlines():
        if re.match(r"^\d+\) -+$", line.strip()):
            tasks.append({})
        elif tasks and ": " in line:
            key, _, value = line.strip().partition(": ")
            tasks[-1][key] = value.strip()
    return [Task(t) for t in tasks]


@dataclasses.dataclass(frozen=True)
class Message:
    seqno: int
    time: str
    # low (MSG_INFO: the client's ordinary log), USER_ALERT, INTERNAL_ERROR
    priority: str
    project: str
    body: str

    def __str__(self) -> str:
        return f"{self.seqno}: ({self.priority}) [{self.project}] {self.body}"


_MESSAGE_RE = re.compile(r"^(\d+): (.*?) \((\w+)\) \[(.*?)\] ?(.*)$")


def parse_messages(text: str) -> list[Message]:
    out: list[Message] = []
    for line in text.splitlines():
        m = _MESSAGE_RE.match(line)
        if m:
            out.append(Message(int(m[1]), m[2], m[3], m[4], m[5]))
        elif out and line.strip():
            # A body with newlines continues on the next lines.
            last = out[-1]
            out[-1] = dataclasses.replace(last, body=f"{last.body}\n{line}")
    return out


@dataclasses.dataclass(frozen=True)
class ResultRecord:
    """A ``<result>`` as the client saved it in client_state.xml."""

    name: str
    state: int
    exit_status: int
    ready_to_report: bool
    final_cpu_time: float
    final_elapsed_time: float
    # <message>client's reason</message> and <stderr_txt>the slot's
    # stderr.txt</stderr_txt>, once the app has ended.
    stderr_out: str

    @property
    def state_name(self) -> str:
        return RESULT_STATE_NAMES.get(self.state, "unknown")


@dataclasses.dataclass(frozen=True)
class ActiveTaskRecord:
    result_name: str
    slot: int
    active_task_state: int
    checkpoint_cpu_time: float
    current_cpu_time: float


# ------------------------------------------------------------------- client


class ClientError(RuntimeError):
    pass


# Clients started without --allow_multiple_clients hold this lock (flock) from
# their first start to close(): a volunteer's host runs one such client, and
# an 8.2 one cleans up every boinc__* container of the engine at start.
SINGLE_CLIENT_LOCK = Path(os.environ.get("BOINCD_TEST_LOCK_DIR", "/tmp")) / (
    "boincd-tests-single-client.lock"
)


_lock_fd: int | None = None
_lock_holders = 0


@contextlib.contextmanager
def single_client_lock(timeout: float = 120) -> Iterator[None]:
    """Hold SINGLE_CLIENT_LOCK (shared with other test sessions on this host).

    Reentrant within this process: a test that prepares the host for a
    single-instance client (a hello-world image, a decoy container) takes it
    first, and its client's start() then takes it again without waiting.
    """
    global _lock_fd, _lock_holders
    if _lock_holders == 0:
        fd = os.open(SINGLE_CLIENT_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise ClientError(
                        f"another single-instance test client holds {SINGLE_CLIENT_LOCK}"
                    ) from None
                time.sleep(0.5)
        _lock_fd = fd
    _lock_holders += 1
    try:
        yield
    finally:
        _lock_holders -= 1
        if _lock_holders == 0 and _lock_fd is not None:
            os.close(_lock_fd)  # releases the flock
            _lock_fd = None


class BoincClient:
    """A BOINC client with its own data dir, GUI RPC port and fake project.

    Use as a context manager, or call ``close()``: it kills the client and
    whatever still runs in its slots, so no process outlives a test.
    """

    def __init__(
        self,
        base_dir: Path,
        app_main: Path,
        *,
        results: Sequence[ResultSpec] = (ResultSpec("result_1"),),
        project_name: str = "harness",
        master_url: str | None = None,
        app_name: str = APP_NAME,
        app_files: Sequence[FileSpec] = (),
        app_cmdline: str = "",
        avg_ncpus: float = 1.0,
        prefs: Mapping[str, float | int | str] | None = None,
        log_flags: Sequence[str] = ("task", "task_debug"),
        cc_options: Mapping[str, str | int | float] | None = None,
        unsigned_apps_ok: bool = True,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        binaries: ClientBinaries = DEBIAN_CLIENT,
        allow_multiple_clients: bool = True,
        plan_class: str = "",
    ) -> None:
        self.binaries = binaries
        self.dir = Path(base_dir).resolve()
        self.app_main = Path(app_main)
        self.results = list(results)
        self.project_name = project_name
        # Unique per client unless given: the project dir name is part of every
        # container name, so nothing an earlier run left can clash with it.
        self.master_url = master_url or f"http://127.0.0.1:1/{unique(project_name)}/"
        # False: started as a volunteer's client is, one per host at a time
        # (SINGLE_CLIENT_LOCK); 8.2 clients then clean up Docker at start.
        self.allow_multiple_clients = allow_multiple_clients
        # The app version's (and its results') plan class; 8.2's docker_cleanup
        # spares only containers of started tasks whose plan class has "docker".
        self.plan_class = plan_class
        self._single_lock: contextlib.ExitStack | None = None
        self.app_name = app_name
        self.app_files = list(app_files)
        self.app_cmdline = app_cmdline
        self.avg_ncpus = avg_ncpus
        self.prefs: dict[str, float | int | str] = {**DETERMINISTIC_PREFS, **(prefs or {})}
        self.log_flags = list(log_flags)
        # Unless told otherwise the client pretends to have a CPU per task, so
        # that every task runs at once whatever the host: with fewer CPUs, a
        # task suspended via the GUI frees its CPU for a waiting task and is
        # not resumed until a CPU frees again (up to a scheduling period, 1 h).
        self.cc_options: dict[str, str | int | float] = {
            "ncpus": max(1, math.ceil(len(self.results) * avg_ncpus)),
            **(cc_options or {}),
        }
        self.unsigned_apps_ok = unsigned_apps_ok
        self.extra_args = list(extra_args)
        self.env = dict(env) if env is not None else None
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "harness_client.log"
        # Process groups of every client started, for close().
        self._pgids: list[int] = []
        self.write_data_dir()

    @property
    def version(self) -> tuple[int, ...]:
        return self.binaries.version_tuple

    # -------------------------------------------------------------- layout

    @property
    def project_dir(self) -> Path:
        return self.dir / "projects" / escape_project_url(self.master_url)

    @property
    def project_dir_name(self) -> str:
        return escape_project_url(self.master_url)

    @property
    def client_state_path(self) -> Path:
        return self.dir / "client_state.xml"

    @property
    def main_program_name(self) -> str:
        return f"{self.app_name}_{VERSION_NUM}_{self.app_main.name}"

    def spec(self, result: str) -> ResultSpec:
        for r in self.results:
            if r.name == result:
                return r
        raise KeyError(result)

    def output_path(self, result: str, open_name: str = "out.txt") -> Path:
        """Where the client leaves the output file once the task has ended."""
        return self.project_dir / self.spec(result).output_physical(open_name)

    def write_data_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.project_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "slots").mkdir(exist_ok=True)
        (self.dir / "gui_rpc_auth.cfg").write_text(GUI_RPC_PASSWORD + "\n")
        (self.dir / f"account_{self.project_dir_name}.xml").write_text(
            "<account>\n"
            f"    <master_url>{escape(self.master_url)}</master_url>\n"
            "    <authenticator>harness_authenticator</authenticator>\n"
            f"    <project_name>{escape(self.project_name)}</project_name>\n"
            "</account>\n"
        )
        self.write_prefs()
        self.write_cc_config()
        self.client_state_path.write_text(self._client_state_xml())

    def write_prefs(self, prefs: Mapping[str, float | int | str] | None = None) -> None:
        """Write global_prefs_override.xml; a running client needs ``read_prefs()``."""
        if prefs is not None:
            self.prefs.update(prefs)
        body = "".join(f"    <{k}>{escape(str(v))}</{k}>\n" for k, v in self.prefs.items())
        (self.dir / "global_prefs_override.xml").write_text(
            f"<global_preferences>\n{body}</global_preferences>\n"
        )

    def write_cc_config(self) -> None:
        flags = "".join(f"        <{f}/>\n" for f in self.log_flags)
        opts = "".join(f"        <{k}>{escape(str(v))}</{k}>\n" for k, v in self.cc_options.items())
        (self.dir / "cc_config.xml").write_text(
            "<cc_config>\n"
            f"    <log_flags>\n{flags}    </log_flags>\n"
            f"    <options>\n{opts}    </options>\n"
            "</cc_config>\n"
        )

    def _file_xml(self, name: str, data: bytes | None, *, executable: bool = False) -> str:
        """A present file of the project dir (status 1); writes it too."""
        path = self.project_dir / name
        if data is not None:
            path.write_bytes(data)
            if executable:
                path.chmod(0o755)
        size = path.stat().st_size
        return (
            "<file>\n"
            f"    <name>{escape(name)}</name>\n"
            f"    <nbytes>{size}</nbytes>\n"
            f"    <max_nbytes>0</max_nbytes>\n"
            "    <status>1</status>\n" + ("    <executable/>\n" if executable else "") + "</file>\n"
        )

    def _client_state_xml(self) -> str:
        now = time.time()
        platform = client_platform(self.binaries.boinc)
        upload_url = f"http://127.0.0.1:1/{self.project_name}_cgi/file_upload_handler"
        parts = [
            "<client_state>\n",
            "<project>\n"
            f"    <master_url>{escape(self.master_url)}</master_url>\n"
            f"    <project_name>{escape(self.project_name)}</project_name>\n"
            f"    <scheduler_url>http://127.0.0.1:1/{self.project_name}_cgi/cgi</scheduler_url>\n"
            # No scheduler to ask: neither for work nor to report results.
            "    <dont_request_more_work/>\n"
            f"    <min_rpc_time>{now + 365 * 86400:.0f}</min_rpc_time>\n"
            "</project>\n",
            "<app>\n"
            f"    <name>{escape(self.app_name)}</name>\n"
            f"    <user_friendly_name>{escape(self.app_name)}</user_friendly_name>\n"
            "</app>\n",
        ]
        main = self.main_program_name
        parts.append(self._file_xml(main, self.app_main.read_bytes(), executable=True))
        refs = [
            f"    <file_ref>\n        <file_name>{escape(main)}</file_name>\n"
            "        <main_program/>\n    </file_ref>\n"
        ]
        for f in self.app_files:
            phys = f"{self.app_name}_{VERSION_NUM}_{f.open_name}"
            parts.append(self._file_xml(phys, f.data(), executable=f.executable))
            refs.append(self._file_ref_xml(phys, f.open_name, f.copy_file))
        parts.append(
            "<app_version>\n"
            f"    <app_name>{escape(self.app_name)}</app_name>\n"
            f"    <version_num>{VERSION_NUM}</version_num>\n"
            f"    <platform>{platform}</platform>\n"
            + (
                f"    <plan_class>{escape(self.plan_class)}</plan_class>\n"
                if self.plan_class
                else ""
            )
            + f"    <avg_ncpus>{self.avg_ncpus}</avg_ncpus>\n"
            f"    <max_ncpus>{self.avg_ncpus}</max_ncpus>\n"
            "    <flops>1e9</flops>\n"
            f"    <api_version>{API_VERSION}</api_version>\n"
            f"    <cmdline>{escape(self.app_cmdline)}</cmdline>\n"
            + "".join(refs)
            + "</app_version>\n"
        )
        for r in self.results:
            wu_refs = []
            for f in r.inputs:
                phys = r.input_physical(f)
                parts.append(self._file_xml(phys, f.data(), executable=f.executable))
                wu_refs.append(self._file_ref_xml(phys, f.open_name, f.copy_file))
            parts.append(
                "<workunit>\n"
                f"    <name>{escape(r.wu_name)}</name>\n"
                f"    <app_name>{escape(self.app_name)}</app_name>\n"
                f"    <version_num>{VERSION_NUM}</version_num>\n"
                f"    <command_line>{escape(r.command_line)}</command_line>\n"
                f"    <rsc_fpops_est>{r.rsc_fpops_est}</rsc_fpops_est>\n"
                f"    <rsc_fpops_bound>{r.rsc_fpops_bound}</rsc_fpops_bound>\n"
                f"    <rsc_memory_bound>{r.rsc_memory_bound}</rsc_memory_bound>\n"
                f"    <rsc_disk_bound>{r.rsc_disk_bound}</rsc_disk_bound>\n"
                + "".join(wu_refs)
                + "</workunit>\n"
            )
            out_refs = []
            for open_name in r.outputs:
                phys = r.output_physical(open_name)
                parts.append(
                    "<file>\n"
                    f"    <name>{escape(phys)}</name>\n"
                    "    <nbytes>0</nbytes>\n"
                    f"    <max_nbytes>{r.max_output_bytes}</max_nbytes>\n"
                    "    <status>0</status>\n"
                    # Without an upload URL the client deletes the output
                    # file when the task ends instead of keeping it.
                    f"    <upload_url>{escape(upload_url)}</upload_url>\n"
                    "</file>\n"
                )
                out_refs.append(self._file_ref_xml(phys, open_name, True))
            parts.append(
                "<result>\n"
                f"    <name>{escape(r.name)}</name>\n"
                f"    <wu_name>{escape(r.wu_name)}</wu_name>\n"
                f"    <platform>{platform}</platform>\n"
                f"    <version_num>{VERSION_NUM}</version_num>\n"
                + (
                    f"    <plan_class>{escape(self.plan_class)}</plan_class>\n"
                    if self.plan_class
                    else ""
                )
                + f"    <state>{RESULT_FILES_DOWNLOADED}</state>\n"
                f"    <received_time>{now:.0f}</received_time>\n"
                f"    <report_deadline>{now + 30 * 86400:.0f}</report_deadline>\n"
                + "".join(out_refs)
                + "</result>\n"
            )
        parts.append("</client_state>\n")
        return "".join(parts)

    @staticmethod
    def _file_ref_xml(name: str, open_name: str, copy_file: bool) -> str:
        return (
            "    <file_ref>\n"
            f"        <file_name>{escape(name)}</file_name>\n"
            f"        <open_name>{escape(open_name)}</open_name>\n"
            + ("        <copy_file/>\n" if copy_file else "")
            + "    </file_ref>\n"
        )

    # ------------------------------------------------------------ lifecycle

    def command(self) -> list[str]:
        cmd = [
            str(self.binaries.boinc),
            "--dir",
            str(self.dir),
            "--skip_cpu_benchmarks",
            "--no_info_fetch",
            "--no_gpus",
            "--gui_rpc_port",
            str(self.port),
        ]
        if self.allow_multiple_clients:
            cmd.append("--allow_multiple_clients")
        if self.unsigned_apps_ok:
            cmd.append("--unsigned_apps_ok")
        return cmd + self.extra_args

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60) -> None:
        """Start the client and wait until it answers GUI RPCs.

        Tasks start at once: the client runs its first scheduling pass right
        after initialisation (measured: a task is EXECUTING within 0.5 s of
        the start, benchmarks skipped).
        """
        if self.running:
            raise ClientError("client already running")
        if not self.allow_multiple_clients and self._single_lock is None:
            stack = contextlib.ExitStack()
            stack.enter_context(single_client_lock(max(timeout, 120)))
            self._single_lock = stack
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                # Its own session and process group, which its apps inherit:
                # close() kills the group, and a Ctrl-C meant for pytest does
                # not reach the client or its apps.
                start_new_session=True,
            )
        self._pgids.append(self.proc.pid)
        self.wait_for(self._answers, timeout, "the client to answer GUI RPCs")

    def _answers(self) -> bool:
        if not self.running:
            raise ClientError(f"client exited with {self.proc and self.proc.returncode}")
        return self.boinccmd("--get_cc_status", check=False).returncode == 0

    def stop(self, timeout: float = 90) -> int | None:
        """Graceful exit: ``boinccmd --quit``; SIGKILL after ``timeout``.

        The client sends ``<quit/>`` to each app and waits up to 60 s
        (QUIT_TIMEOUT) for it to exit before killing it, so an app that
        ignores the message makes this take over a minute. Returns the
        client's exit status (None if it had to be killed).
        """
        if not self.running:
            return self.proc.returncode if self.proc else None
        assert self.proc is not None
        self.boinccmd("--quit", check=False)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL the client alone; its apps keep running, as after a crash.

        A client started again then starts the task anew in the same slot
        (client 7.20.5 does not check whether the old app still runs there).
        """
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def restart(self, timeout: float = 90) -> None:
        self.stop(timeout)
        self.start()

    def close(self, graceful_timeout: float = 0) -> None:
        """End the client and every process it started; never raises.

        With ``graceful_timeout`` 0 (the default) nothing is asked politely:
        the client and its apps are SIGKILLed, which is quick and leaves the
        data dir as a crash would. Otherwise ``stop()`` comes first.
        """
        try:
            if graceful_timeout > 0:
                with contextlib.suppress(ClientError, subprocess.SubprocessError):
                    self.stop(graceful_timeout)
        finally:
            self.kill()
            for pgid in self._pgids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            self.kill_slot_processes()
            if self._single_lock is not None:
                self._single_lock.close()
                self._single_lock = None

    def __enter__(self) -> BoincClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def slot_processes(self) -> list[int]:
        """Pids of processes whose cwd is in one of this client's slots.

        The client starts apps in their slot dir, so this finds apps, and
        their children, that survive the client.
        """
        slots = str(self.dir / "slots") + os.sep
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if (cwd + os.sep).startswith(slots):
                pids.append(int(entry.name))
        return pids

    def kill_slot_processes(self) -> None:
        for pid in self.slot_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # They are orphans by now (init or a subreaper reaps them); wait
        # until they are gone so that the data dir can be removed.
        deadline = time.monotonic() + 10
        while self.slot_processes() and time.monotonic() < deadline:
            time.sleep(0.05)

    # ------------------------------------------------------------ boinccmd

    def boinccmd(
        self, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            str(self.binaries.boinccmd),
            "--host",
            f"127.0.0.1:{self.port}",
            "--passwd",
            GUI_RPC_PASSWORD,
            *args,
        ]
        # boinccmd reads gui_rpc_auth.cfg from its cwd when no --passwd; run
        # it in the data dir anyway so both agree.
        proc = subprocess.run(
            cmd, cwd=self.dir, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and (proc.returncode != 0 or "Operation failed" in proc.stderr):
            raise ClientError(
                f"{' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
            )
        return proc

    def tasks(self) -> list[Task]:
        return parse_tasks(self.boinccmd("--get_tasks").stdout)

    def task(self, result: str) -> Task | None:
        for t in self.tasks():
            if t.name == result:
                return t
        return None

    def _task_op(self, result: str, op: str) -> None:
        self.boinccmd("--task", self.master_url, result, op)

    def suspend(self, result: str) -> None:
        self._task_op(result, "suspend")

    def resume(self, result: str) -> None:
        self._task_op(result, "resume")

    def abort(self, result: str) -> None:
        self._task_op(result, "abort")

    def set_run_mode(self, mode: str, duration: float = 0) -> None:
        """always | auto | never; 0 = until changed."""
        self.boinccmd("--set_run_mode", mode, str(int(duration)))

    def set_network_mode(self, mode: str, duration: float = 0) -> None:
        """always | auto | never. Has no effect with ``unsigned_apps_ok``:
        that keeps the network suspended whatever the mode."""
        self.boinccmd("--set_network_mode", mode, str(int(duration)))

    def read_prefs(self) -> None:
        """Make a running client re-read global_prefs_override.xml."""
        self.boinccmd("--read_global_prefs_override")

    def read_cc_config(self) -> None:
        self.boinccmd("--read_cc_config")

    def messages(self, seqno: int = 0) -> list[Message]:
        """The client's event log after ``seqno`` (``--get_messages``)."""
        return parse_messages(self.boinccmd("--get_messages", str(seqno)).stdout)

    def cc_status(self) -> str:
        return self.boinccmd("--get_cc_status").stdout

    def _suspended(self, section: str) -> bool:
        # "<section> status\n    not suspended" or "...\n    suspended: <reason>"
        lines = self.cc_status().splitlines()
        i = lines.index(f"{section} status")
        return lines[i + 1].strip().startswith("suspended")

    def network_suspended(self) -> bool:
        """What apps see as ``<network_suspended/>`` in each heartbeat."""
        return self._suspended("Network")

    def cpu_suspended(self) -> bool:
        """All computing suspended (run mode, preferences, "CPU is busy")."""
        return self._suspended("CPU")

    # ---------------------------------------------------- client_state.xml

    def _state_root(self) -> ET.Element:
        return ET.parse(self.client_state_path).getroot()

    def result_record(self, result: str) -> ResultRecord:
        """The result as last saved; the client saves within about a second
        of a change, so poll with ``wait_for`` rather than read once."""
        for r in self._state_root().iter("result"):
            if r.findtext("name") == result:
                return ResultRecord(
                    name=result,
                    state=int(r.findtext("state") or 0),
                    exit_status=int(r.findtext("exit_status") or 0),
                    ready_to_report=r.find("ready_to_report") is not None,
                    final_cpu_time=float(r.findtext("final_cpu_time") or 0),
                    final_elapsed_time=float(r.findtext("final_elapsed_time") or 0),
                    stderr_out=r.findtext("stderr_out") or "",
                )
        raise KeyError(result)

    def active_task_records(self) -> list[ActiveTaskRecord]:
        out = []
        for a in self._state_root().iter("active_task"):
            out.append(
                ActiveTaskRecord(
                    result_name=a.findtext("result_name") or "",
                    slot=int(a.findtext("slot") or -1),
                    active_task_state=int(a.findtext("active_task_state") or 0),
                    checkpoint_cpu_time=float(a.findtext("checkpoint_cpu_time") or 0),
                    current_cpu_time=float(a.findtext("current_cpu_time") or 0),
                )
            )
        return out

    def slot_dir(self, result: str) -> Path | None:
        """The slot dir of a started task, else None.

        boinccmd knows the slot once the task has been scheduled; a slot's
        init_data.xml names its result, which also works with no client.
        """
        if self.running:
            with contextlib.suppress(ClientError, subprocess.TimeoutExpired):
                t = self.task(result)
                if t is not None and t.slot is not None and t.slot >= 0:
                    return self.dir / "slots" / str(t.slot)
        for init in sorted((self.dir / "slots").glob("*/init_data.xml")):
            with contextlib.suppress(OSError, ET.ParseError):
                if ET.parse(init).getroot().findtext("result_name") == result:
                    return init.parent
        return None

    # ---------------------------------------------------------------- waits

    def wait_for(
        self,
        predicate: Callable[[], T | None],
        timeout: float,
        what: str,
        interval: float = 0.2,
    ) -> T:
        """Poll until ``predicate`` returns something truthy and return it.

        Errors the predicate raises count as "not yet" (boinccmd refuses while
        the client starts, client_state.xml is briefly absent while the
        client replaces it) except ClientError, which means the client died.
        """
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            try:
                value = predicate()
            except ClientError:
                raise
            except (OSError, ET.ParseError, KeyError, ValueError, subprocess.SubprocessError) as e:
                last_error = e
                value = None
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what}"
                    + (f"\nlast error: {last_error!r}" if last_error else "")
                    + "\n"
                    + self.diagnostics()
                )
            time.sleep(interval)

    def wait_for_task(
        self, result: str, predicate: Callable[[Task], bool], timeout: float, what: str
    ) -> Task:
        def check() -> Task | None:
            t = self.task(result)
            return t if t is not None and predicate(t) else None

        return self.wait_for(check, timeout, f"{result}: {what}")

    def wait_done(self, result: str, timeout: float = 60) -> Task:
        """Wait until the task has ended for good; return its last state."""
        return self.wait_for_task(result, lambda t: t.done, timeout, "task done")

    def wait_final_record(self, result: str, timeout: float = 60) -> ResultRecord:
        """Wait until client_state.xml shows the task ended; return the record."""

        def check() -> ResultRecord | None:
            record = self.result_record(result)
            return record if record.state > RESULT_FILES_DOWNLOADED else None

        return self.wait_for(check, timeout, f"{result}: final state in client_state.xml")

    def diagnostics(self, n_messages: int = 40) -> str:
        """Recent client messages, tasks and client log, for failure output."""
        out = [
            f"--- client {'running' if self.running else 'not running'} "
            f"(data dir {self.dir}, port {self.port})"
        ]
        if self.running:
            try:
                msgs = self.messages()
                out.append(f"--- last {n_messages} client messages")
                out += [str(m) for m in msgs[-n_messages:]]
                out.append("--- tasks")
                out += [repr(dict(t.fields)) for t in self.tasks()]
            except (ClientError, subprocess.SubprocessError) as e:
                out.append(f"(boinccmd failed: {e})")
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").splitlines()
            out.append(f"--- tail of {self.log_path}")
            out += lines[-n_messages:]
        return "\n".join(out)


def start_shim_client(
    clients: list[BoincClient],
    base: Path,
    shim: Path,
    socket_path: str,
    binaries: ClientBinaries,
    job: bytes,
    results: Sequence[ResultSpec],
    **kwargs: Any,
) -> BoincClient:
    """A started client whose app is the shim (`shim`, a .pyz) with `job` as its
    job.toml, talking to the daemon on `socket_path`; added to `clients`, which
    the caller closes at teardown, even when the test fails."""
    client = BoincClient(
        base / f"boinc{len(clients)}",
        shim,
        results=results,
        app_files=[FileSpec("job.toml", job)],
        env={**os.environ, "BOINCD_SOCKET": socket_path},
        binaries=binaries,
        **kwargs,
    )
    clients.append(client)
    client.start()
    return client
