"""The shim's main loop: the BOINC client on one side, the daemon on the other.

The loop polls the client's messages every 0.1 s and reconciles the container
with what the client wants (running or paused); once a second it reports
CPU time, fraction done and the container's memory.

The daemon holds every process of the container at the shim's own priority,
which the client chose for the task. At idle priority (nice 19, every CPU
task by default) the client leaves such processes out of the "non-BOINC" load
it suspends computing for, so no other_pid is reported: the client SIGKILLs
every other_pid when it cleans up a task, also at its own shutdown without
reading any app_status first, which would kill a paused container. Above idle
(GPU tasks, fewer than one CPU, wrapper app versions) other_pid is the only
way to keep the client from suspending itself for the container's load: it is
reported while the container runs and withdrawn (our own pid) before every exit
that can wait for the client.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from .boinc_api import (
    EXIT_ABORTED_BY_CLIENT,
    EXIT_CHILD_FAILED,
    EXIT_QUIT,
    EXIT_TEMPORARY,
    AppChannel,
    Channel,
    ControlMessages,
    HeartbeatWatchdog,
    StatusReport,
    finish_exit_code,
    pid_exists,
    web_graphics_reply,
    write_atomic,
    write_finish_file,
    write_temporary_exit_file,
)
from .client import DaemonClient, DaemonError, DaemonUnreachable
from .initdata import InitData
from .jobfile import JobSpec
from .slotfiles import SMALL_FILE_MAX_BYTES, read_fraction_done, read_slot_file, regular_file_mtime

IDLE_NICE = 19  # the client's idle priority: left out of its non-BOINC load (host/priority.py)

TICK_S = 0.1
STATUS_EVERY_S = 1.0
# The client sends a heartbeat about every second; it tells whether BOINC allows
# network use. Until it comes the task is prepared without fetching anything (an
# image already present starts at once), and after this long without one, as if
# the network were allowed.
FIRST_HEARTBEAT_WAIT_S = 3.0
# Between attempts to prepare a task that failed retryably (registry unreachable,
# engine down): doubling up to the cap, with jitter, so that many tasks of one
# host do not knock on a registry in step.
CREATE_RETRY_S = 5.0
CREATE_RETRY_MAX_S = 120.0
PROGRESS_EVERY_S = 5.0  # at most one progress line in stderr.txt this often
# Causes that are not an outage: BOINC's network switch, a GPU share to free up.
_PATIENT_CODES = ("network_suspended", "busy")
MAX_BACKOFF_S = 5.0  # between attempts to reach a daemon that is down
WITHDRAW_TIMEOUT_S = 3.0  # the client reads app_status about once a second
CPU_BASE_FILE = "boincd_cpu_base"  # CPU time the task had when its container started
# The daemon stopped the container past a bound (task JSON `limit_exceeded`): fail
# with the status the client gives a native app past it (lib/error_numbers.h).
LIMIT_EXIT_STATUS = {"disk": 196, "memory": 198}  # EXIT_DISK/MEM_LIMIT_EXCEEDED


class ShimConfig(NamedTuple):
    # Past this without the daemon (or with the engine down), give the task back
    # to the client for a later retry instead of hanging in its slot.
    unreachable_limit_s: float = float(os.environ.get("BOINCD_SHIM_UNREACHABLE_S", "600"))
    temporary_exit_delay_s: float = 300.0
    logs_tail_lines: int = 200


def _jitter() -> float:
    """Uniform in [0.8, 1.2]: spreads the retries of many shims. From os.urandom,
    not `random`, whose import (with hashlib's and _sha512's) the start would pay."""
    return 0.8 + 0.4 * int.from_bytes(os.urandom(4), "big") / 0xFFFFFFFF


def say(text: str) -> None:
    """stderr.txt is what a volunteer and the project see of the task."""
    stamp = time.strftime("%H:%M:%S")
    print(f"{stamp} (boincd-shim) {text}", file=sys.stderr, flush=True)


def own_priority() -> dict[str, Any]:
    """The priority the client started us at, for the container's processes."""
    nice = min(max(os.getpriority(os.PRIO_PROCESS, 0), 0), IDLE_NICE)
    idle = hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(0) == os.SCHED_IDLE
    return {"nice": nice, "idle": idle}


def task_request(
    init: InitData,
    job: JobSpec,
    slot: Path,
    allow_fetch: bool,
    priority: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "result": init.result_name,
        "project": init.project_name,
        "slot_dir": str(slot),
        "project_dir": init.project_dir or None,
        "image": job.image,
        "image_archive": job.image_archive,
        "image_digest": job.image_digest,
        "build": job.image is None and job.image_archive is None and job.dockerfile is not None,
        "build_args": dict(job.build_args),
        "command": list(job.command) if job.command is not None else None,
        "workdir": job.workdir,
        "project_dir_mount": job.project_dir_mount,
        "mounts": [m.to_request() for m in job.mounts],
        "network": job.network,
        "ncpus": max(init.ncpus, 0.01),
        "memory_bytes": int(init.rsc_memory_bound),
        "disk_bytes": int(init.rsc_disk_bound),
        "allow_fetch": allow_fetch,
        "priority": priority or own_priority(),
    }
    if job.use_gpu and init.uses_gpu:
        body["gpu"] = {
            "type": init.gpu_type,
            "device_num": init.gpu_device_num,
            "usage": init.gpu_usage,
        }
    if job.web_graphics_guest_port is not None:
        body["web_graphics"] = {"guest_port": job.web_graphics_guest_port}
    return body


class Runner:
    def __init__(
        self,
        init: InitData,
        job: JobSpec,
        channel: AppChannel,
        client: DaemonClient,
        slot: Path,
        config: ShimConfig | None = None,
    ) -> None:
        self.init = init
        self.job = job
        self.channel = channel
        self.client = client
        self.slot = slot
        self.config = config or ShimConfig()
        self.result = init.result_name
        self.watchdog = HeartbeatWatchdog(client_pid=init.client_pid)
        self.suspended = False
        self.network_suspended = False
        self.task: dict[str, Any] = {}
        self.unreachable_since: float | None = None
        self.retry_at = 0.0
        self.waited = False  # this tick already spent its time in a long poll
        self.heartbeat_seen = False
        self.first_heartbeat_deadline = time.monotonic() + FIRST_HEARTBEAT_WAIT_S
        self.create_retry_at = 0.0
        self.create_delay_s = CREATE_RETRY_S
        self.create_refused = False
        self.progress_said, self.progress_at = "", -math.inf
        # Since when the task cannot be prepared for a cause that is not BOINC's
        # (a registry or engine down): counted toward the give-up limit, whatever
        # the daemon itself answers meanwhile.
        self.waiting_since: float | None = None
        self.create_allowed_fetch = False
        self.priority = own_priority()
        # At idle priority the container's load is not counted against the task
        # (see the module's docstring): no other_pid, nothing to withdraw.
        self.reports_other_pid = int(self.priority["nice"]) < IDLE_NICE
        self.last_report: StatusReport | None = None
        self.backoff_s = TICK_S
        self.last_status = 0.0
        self.checkpoint_cpu = init.wu_cpu_time
        self.checkpoint_mtime = self._checkpoint_mtime()
        self.said: set[str] = set()
        self.graphics_url = ""  # the web graphics URL the client has been sent

    # -- talking to the daemon ---------------------------------------------------

    def _task_path(self, verb: str = "", **query: object) -> str:
        """Our task's URL. The project goes along: two projects may have results
        of the same name, and the daemon answers only for this one's."""
        path = f"/v1/tasks/{self.result}" + (f"/{verb}" if verb else "")
        params = {**query, "project": self.init.project_name}
        return path + "?" + "&".join(f"{key}={value}" for key, value in params.items())

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        """One daemon call; None while the daemon or engine is unreachable (retried later)."""
        now = time.monotonic()
        if now < self.retry_at:
            return None  # backing off: the daemon was not there a moment ago
        try:
            answer = self.client.request(method, path, body, timeout=timeout)
        except DaemonUnreachable as exc:
            self._unreachable(str(exc))
            self.retry_at = now + self.backoff_s
            self.backoff_s = min(self.backoff_s * 2, MAX_BACKOFF_S)
            return None
        except DaemonError as exc:
            if exc.retryable:
                if exc.code != "conflict":
                    self._unreachable(exc.message, code=exc.code)
                elif path == "/v1/tasks":  # e.g. another project's task of that name
                    self._say_once("conflict", f"waiting: {exc.message}")
                # else "still being prepared": just ask again
                return None
            if exc.code == "not_found" and path.startswith("/v1/tasks/"):
                # The daemon lost the task (its record, not the container): ask
                # again; create-or-attach adopts the container by its name.
                self.task = {}
                return None
            raise TaskFailed(f"the daemon refused {method} {path}: {exc.message}") from None
        if self.unreachable_since is not None:
            say("the daemon is back")
            self.said.discard("unreachable")
        self.unreachable_since = None
        self.backoff_s = TICK_S
        return answer

    def _unreachable(self, message: str, code: str = "unavailable") -> None:
        if code in _PATIENT_CODES:
            self._say_once(code, message)
            return  # waiting for BOINC or for a GPU share is not an outage
        if self.unreachable_since is None:
            self.unreachable_since = time.monotonic()
        self._say_once("unreachable", f"waiting for the daemon: {message}")

    def _task_waits(self, code: str, message: str) -> None:
        """The daemon is there but cannot prepare the task yet: said once per
        cause, retried with backoff, given up after the limit."""
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()
        self._say_once(f"waiting:{code}", f"waiting: {message} (trying again with backoff)")

    def _say_once(self, key: str, text: str) -> None:
        if key not in self.said:
            self.said.add(key)
            say(text)

    def _give_up_if_unreachable_too_long(self) -> int | None:
        since = min(t for t in (self.unreachable_since, self.waiting_since, math.inf) if t)
        if time.monotonic() - since < self.config.unreachable_limit_s:
            return None
        if self.waiting_since is not None:
            error = (self.task.get("error") or {}).get("message")
            reason = f"the task could not be prepared: {error}"
        else:
            reason = "boincd-containers daemon or container engine unreachable"
        say(f"{reason} for {self.config.unreachable_limit_s:.0f} s: temporary exit")
        self._withdraw_other_pid()
        write_temporary_exit_file(self.slot, self.config.temporary_exit_delay_s, reason)
        return EXIT_TEMPORARY

    # -- the loop ----------------------------------------------------------------

    def run(self) -> int:
        try:
            return self._run()
        except TaskFailed:
            # A failed task is over for BOINC too: its container (created, perhaps,
            # but never to run) goes now, not after the garbage collector's grace.
            if self.task.get("container_id"):
                with contextlib.suppress(TaskFailed):
                    self._call("DELETE", self._task_path())
            raise

    def _run(self) -> int:
        for warning in self.job.warnings:
            say(f"job.toml: {warning}")
        if self.job.use_gpu and not self.init.uses_gpu:
            say(
                "warning: job.toml asks for a GPU (use_gpu) but BOINC assigned this task "
                "none (a CPU app version, or no usable GPU): it runs without a GPU"
            )
        while True:
            messages = self.channel.poll()
            self.watchdog.observe(messages)
            outcome = self._handle_messages(messages)
            if outcome is not None:
                return outcome
            if messages.heartbeat:
                self.heartbeat_seen = True
            if not self.task or self.task.get("state") in ("failed", "waiting", "removed"):
                self._create()
            outcome = self._step()
            if outcome is not None:
                return outcome
            outcome = self._give_up_if_unreachable_too_long()
            if outcome is not None:
                return outcome
            if not self.waited:
                time.sleep(TICK_S)
            self.waited = False

    def _handle_messages(self, messages: ControlMessages) -> int | None:
        if messages.abort:
            say("aborted by the client: removing the container")
            self._call("DELETE", self._task_path())
            self._withdraw_other_pid()
            return EXIT_ABORTED_BY_CLIENT
        client_gone = not messages.quit and self.watchdog.client_gone()
        if messages.quit or client_gone:
            why = "the client is gone" if client_gone else "quit requested"
            say(f"{why}: leaving the container paused for the next start")
            if self.task.get("container_id"):
                self._call("POST", self._task_path("detach"))
            if not client_gone:
                self._withdraw_other_pid()
            return EXIT_QUIT
        if messages.suspend:
            self.suspended = True
        if messages.resume:
            self.suspended = False
        if messages.network_suspended != self.network_suspended:
            self.network_suspended = messages.network_suspended
            self._sync_network()
        return None

    def _sync_network(self) -> None:
        """Make the container's network follow the client's switch.

        Compared with the container's own state, not only on a flip of the
        switch: a task created while the network is off, or attached after a
        restart, is brought in line too, before it starts.
        """
        if not (self.job.network and self.task.get("network")):
            return
        if self.task.get("state") not in ("created", "running", "paused"):
            return
        connected = not self.network_suspended
        if bool(self.task.get("network_connected")) == connected:
            return
        verb = "reconnect" if connected else "disconnect"
        try:
            task = self._call("POST", self._task_path("network"), {"connected": connected})
        except TaskFailed as exc:
            self._say_once("network", f"cannot {verb} the container's network: {exc}")
            return
        if task is not None:
            self.task = task
            say(f"network {verb}ed" + ("" if connected else " (BOINC suspended network activity)"))

    def _may_fetch(self) -> bool:
        """Whether a pull or a build may fetch: a volunteer on a metered link expects
        nothing to be fetched while BOINC suspends network use, nor before the
        first heartbeat has said whether it does."""
        knows = self.heartbeat_seen or time.monotonic() > self.first_heartbeat_deadline
        return knows and not self.network_suspended

    def _create(self) -> None:
        """Ask for the task; after a retryable failure (GPU busy, network off) not
        before a few seconds have passed or fetching became allowed."""
        now = time.monotonic()
        may_fetch = self._may_fetch()
        retrying = self.task or self.create_refused
        if retrying and now < self.create_retry_at and self.create_allowed_fetch == may_fetch:
            return
        if self.create_allowed_fetch != may_fetch:
            self.create_delay_s = CREATE_RETRY_S  # something changed: try soon again
        self.create_retry_at = now + self.create_delay_s * _jitter()
        self.create_delay_s = min(self.create_delay_s * 2, CREATE_RETRY_MAX_S)
        self.create_allowed_fetch = may_fetch
        body = task_request(self.init, self.job, self.slot, may_fetch, self.priority)
        task = self._call("POST", "/v1/tasks", body)
        self.create_refused = task is None
        if task is not None:
            self.task = task

    def _step(self) -> int | None:
        """Reconcile the container with what the client wants; report once a second."""
        now = time.monotonic()
        due = now - self.last_status >= STATUS_EVERY_S
        state = self.task.get("state")
        if state in ("preparing", None) or due or self._container_gone():
            self._refresh()
            self._sync_network()
            state = self.task.get("state")
        limit = self.task.get("limit_exceeded")
        if state == "exited" and isinstance(limit, dict):
            return self._finish_over_limit(limit)
        if state in ("created", "running", "paused", "exited"):  # prepared at last
            self.waiting_since = None
            self.create_delay_s = CREATE_RETRY_S
        if state in ("failed", "waiting"):
            self._wait_or_fail()
        elif state == "exited" and not self.task.get("interrupted"):
            return self._finish(int(self.task.get("exit_code") or 0))
        elif state in ("created", "exited") and not self.suspended:
            self._start()
        elif state == "paused" and not self.suspended:
            self._verb("resume")
        elif state == "running" and self.suspended:
            self._verb("pause")
        if due:
            self.last_status = now
            self._report()
        return None

    def _wait_or_fail(self) -> None:
        """The task could not be prepared: wait where a retry can help, else fail."""
        error = self.task.get("error") or {}
        code, message = str(error.get("code")), str(error.get("message"))
        if code == "network_suspended" and not self._may_fetch():
            if self.heartbeat_seen:  # else: not known yet, nothing to tell
                self._say_once(code, message)
        elif error.get("retryable") and code in _PATIENT_CODES:
            self._say_once(code, message)
        elif error.get("retryable"):
            self._task_waits(code, message)
        else:
            self._fail(f"the task cannot run: {message}")

    def _container_gone(self) -> bool:
        """Whether the running container's init has ended: one cheap syscall per
        tick, so an exit is noticed within a tick instead of at the next report."""
        pid = int(self.task.get("pid") or 0)
        if self.task.get("state") != "running" or pid <= 0:
            return False
        return not pid_exists(pid)

    def _refresh(self) -> None:
        if not self.task:
            return
        if self.task.get("state") == "preparing":
            # Long-poll instead of sleeping: the answer comes the moment the
            # container is created, and within a tick if not, so the client's
            # messages are still read every tick.
            task = self._call("POST", self._task_path("wait", timeout=TICK_S))
            self.waited = True
        else:
            task = self._call("GET", self._task_path())
        if task is not None:
            self.task = task
            self._tell_progress(str(task.get("progress") or ""))
            # What the daemon could not do for this task (limits a rootless engine
            # cannot apply): once in stderr.txt, where the project sees it.
            for warning in task.get("warnings") or []:
                self._say_once(f"warning:{warning}", f"warning: {warning}")

    def _tell_progress(self, text: str) -> None:
        """A pull's or build's progress in stderr.txt, a line every few seconds at
        most: what a volunteer watching a big first download wants to see."""
        now = time.monotonic()
        if text and text != self.progress_said and now >= self.progress_at + PROGRESS_EVERY_S:
            say(text)
            self.progress_said, self.progress_at = text, now

    def _start(self) -> None:
        cpu_base = self.init.wu_cpu_time
        write_atomic(self.slot / CPU_BASE_FILE, f"{cpu_base}\n")
        self._verb("start")
        if self.task.get("state") == "running":
            say(f"container {str(self.task.get('container_id'))[:12]} running")

    def _verb(self, verb: str) -> None:
        task = self._call("POST", self._task_path(verb))
        if task is not None:
            self.task = task

    # -- reporting ---------------------------------------------------------------

    def _cpu_base(self) -> float:
        try:
            return float(read_slot_file(self.slot / CPU_BASE_FILE, SMALL_FILE_MAX_BYTES))
        except (OSError, ValueError):
            return self.init.wu_cpu_time

    def _checkpoint_mtime(self) -> float | None:
        if not self.job.checkpoint_filename:
            return None
        # Only a regular file counts: a FIFO or a device is not a checkpoint.
        return regular_file_mtime(self.slot / self.job.checkpoint_filename)

    def _fraction_done(self) -> float | None:
        name = self.job.fraction_done_filename
        try:
            return read_fraction_done(self.slot / name, name=name)
        except OSError as exc:
            # A FIFO, a device or a huge file is never read: say so once.
            self._say_once("fraction_done", f"fraction done not read: {exc}")
            return None

    def _status(self, *, withdraw: bool = False) -> StatusReport:
        """What the client is told: every report, the last and the withdrawal alike.

        other_pid, where reported at all, names the container's init while it
        runs, and our own pid to withdraw it (the client keeps the last one named).
        """
        cpu = self._cpu_base() + float(self.task.get("cpu_time_s") or 0.0)
        other_pid = None
        if self.reports_other_pid:
            pid = int(self.task.get("pid") or 0)
            other_pid = pid if pid > 0 and not withdraw else os.getpid()
        return StatusReport(
            current_cpu_time=max(cpu, self.init.wu_cpu_time),
            checkpoint_cpu_time=self.checkpoint_cpu,
            fraction_done=self._fraction_done(),
            other_pid=other_pid,
            bytes_sent=float(self.task.get("tx_bytes") or 0),
            bytes_received=float(self.task.get("rx_bytes") or 0),
            wss=float(self.task.get("wss_bytes") or 0) or None,
        )

    def _send(self, report: StatusReport) -> bool:
        if self.channel.send_status(report):
            self.last_report = report
            return True
        return False

    def _report(self) -> None:
        mtime = self._checkpoint_mtime()
        if mtime is not None and mtime != self.checkpoint_mtime:
            # The app rewrote its checkpoint file: the CPU time so far is now safe.
            self.checkpoint_mtime = mtime
            self.checkpoint_cpu = self._cpu_base() + float(self.task.get("cpu_time_s") or 0.0)
        self._send(self._status())
        self._send_graphics_url()

    def _send_graphics_url(self) -> None:
        """Tell the client where the task's web graphics are, once per new URL
        (the daemon's port for the task, kept across shim restarts)."""
        graphics = self.task.get("web_graphics") or {}
        if graphics.get("error"):
            self._say_once("graphics", f"web graphics unavailable: {graphics['error']}")
        url = str(graphics.get("url") or "")
        if not url or url == self.graphics_url:
            return
        try:
            message = web_graphics_reply(url)
        except ValueError as exc:
            self._say_once("graphics", f"web graphics not reported: {exc}")
            return
        if self.channel.send_msg(Channel.GRAPHICS_REPLY, message):
            self.graphics_url = url
            say(f"web graphics at {url} (container port {graphics.get('guest_port')})")

    def _final_status(self) -> None:
        """The last report (withdrawing other_pid), left in the channel.

        A running client reads the pending app_status when it handles our exit,
        before it kills other_pid (ACTIVE_TASK::handle_exited_app), so there is no
        need to wait for it to be read; only for the channel to be free. That wait
        costs the task a client pass (about a second), so it is skipped when the
        last report already says what matters: the same other_pid and fraction
        done, and a CPU time within 1 % (or 0.1 s): the container's last figures
        rarely move by more between the last report and its exit.
        """
        report = self._status(withdraw=True)
        if _close_enough(self.last_report, report):
            return
        deadline = time.monotonic() + WITHDRAW_TIMEOUT_S
        while not self.channel.status_consumed() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._send(report)

    def _withdraw_other_pid(self) -> None:
        """Name our own pid as other_pid and wait until the client has read it."""
        if not self.reports_other_pid:
            return
        if not self.channel.deliver_status(self._status(withdraw=True), WITHDRAW_TIMEOUT_S):
            # A client that is shutting down reads no status after <quit/>; the
            # daemon then tells its kill of the paused container from a real exit.
            say("the client did not read the last status (it is probably shutting down)")

    # -- the end -----------------------------------------------------------------

    def _finish_over_limit(self, limit: dict[str, Any]) -> int:
        """Checked before `interrupted`: such a container must never be restarted."""
        status = LIMIT_EXIT_STATUS.get(str(limit.get("kind")), EXIT_CHILD_FAILED)
        return self._finish(status, str(limit.get("message") or "a resource limit was exceeded"))

    def _finish(self, exit_code: int, message: str | None = None) -> int:
        self._copy_logs()
        self._final_status()
        if message is None and exit_code != 0:
            message = f"container exited with status {exit_code}"
            if exit_code == 137 and self.task.get("oom_killed"):
                message = "container killed: out of memory (BOINC's memory bound for this task)"
        say(message or "container finished")
        write_finish_file(self.slot, exit_code, message)
        self._call("DELETE", self._task_path())
        return finish_exit_code(exit_code)

    def _copy_logs(self) -> None:
        try:
            text = self.client.request(
                "GET", self._task_path("logs", tail=self.config.logs_tail_lines)
            )
        except (DaemonUnreachable, DaemonError):
            return
        if isinstance(text, str) and text:
            sys.stderr.write("---- container output (last lines) ----\n" + text)
            if not text.endswith("\n"):
                sys.stderr.write("\n")
            sys.stderr.write("---- end of container output ----\n")
            sys.stderr.flush()

    def _fail(self, message: str) -> None:
        raise TaskFailed(message)


def _close_enough(last: StatusReport | None, final: StatusReport) -> bool:
    if last is None:
        return False
    if (last.other_pid, last.fraction_done) != (final.other_pid, final.fraction_done):
        return False
    drift = abs(final.current_cpu_time - last.current_cpu_time)
    return drift <= max(0.1, 0.01 * final.current_cpu_time)


class TaskFailed(Exception):
    """The task cannot run (bad job, refused by the daemon): fail it, never hang."""
