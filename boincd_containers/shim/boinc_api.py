"""The BOINC app side of the client/app protocol, in pure Python.

Facts taken from BOINC 7.20.5 (lib/app_ipc.h, lib/app_ipc.cpp, lib/shmem.cpp,
api/boinc_api.cpp, client/app_control.cpp, client/app_start.cpp):

* The client creates ``boinc_mmap_file`` in the slot (``create_shmem_mmap``) for
  app versions with api_version >= 6.0, zeroes it (``reset_msgs``) and starts the
  app, which maps the whole file (``attach_shmem_mmap``).
* The file holds ``struct SHARED_MEM``: eight ``MSG_CHANNEL`` of 1024 bytes, in
  the order of :class:`Channel`. Byte 0 of a channel is the "unread" flag; the
  message is a NUL-terminated string from byte 1 (at most 1022 bytes). The
  sender writes only when the flag is clear and sets it last; the receiver
  copies the string and clears it (``MSG_CHANNEL::send_msg``/``get_msg``).
* Messages are matched by substring (``match_tag``), numbers read after the tag.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import math
import mmap
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

# The app API the shim speaks (the slot's boinc_mmap_file, api_version >= 6): what
# an app version's <api_version> must say; the .pyz carries it for update_versions.
API_VERSION = "7.20.0"

MMAPPED_FILE_NAME = "boinc_mmap_file"
MSG_CHANNEL_SIZE = 1024
SHARED_MEM_SIZE = 8 * MSG_CHANNEL_SIZE
# strlcpy(buf+1, msg, MSG_CHANNEL_SIZE-1): one byte is the flag, one the NUL.
MAX_MESSAGE_BYTES = MSG_CHANNEL_SIZE - 2

LOCKFILE = "boinc_lockfile"
BOINC_FINISH_CALLED_FILE = "boinc_finish_called"
TEMPORARY_EXIT_FILE = "boinc_temporary_exit"

# boinc_api gives up on a silent client after HEARTBEAT_GIVEUP_SECS.
HEARTBEAT_GIVEUP_S = 30.0
# boinc_api waits this long for a slot lock held by a previous instance, then
# asks the client, by a temporary exit, not to restart it for LOCK_BACKOFF_S.
LOCKFILE_TIMEOUT_S = 35.0
LOCK_BACKOFF_S = 600

# Exit statuses the client expects (lib/error_numbers.h, boinc_api.cpp).
EXIT_SUCCESS = 0
EXIT_QUIT = 0  # after <quit/> or a lost client: the client restarts the task
EXIT_TEMPORARY = 0  # with boinc_temporary_exit written: restart after the delay
EXIT_ABORTED_BY_CLIENT = 194  # after <abort/> (the client ignores it then)
EXIT_CHILD_FAILED = 195
EXIT_INIT_FAILURE = 206

# The client reads the temporary-exit delay with %d and uses 300 s when it is
# outside 0..86400 (ACTIVE_TASK::temporary_exit_file_present).
_TEMP_EXIT_MAX_DELAY_S = 86400
# Lines the client reads from the finish/temporary-exit files with fgets().
_FINISH_MESSAGE_MAX = 1022
_TEMP_EXIT_REASON_MAX = 254


class Channel(enum.IntEnum):
    """The MSG_CHANNELs of struct SHARED_MEM, in file order (index * 1024 = offset)."""

    PROCESS_CONTROL_REQUEST = 0  # client -> app: <suspend/> <resume/> <quit/> <abort/>
    PROCESS_CONTROL_REPLY = 1  # app -> client, unused
    GRAPHICS_REQUEST = 2  # client -> app, unused
    GRAPHICS_REPLY = 3  # app -> client: web graphics URL
    HEARTBEAT = 4  # client -> app, every second, also while suspended
    APP_STATUS = 5  # app -> client: cpu time, fraction done, other_pid
    TRICKLE_UP = 6  # app -> client
    TRICKLE_DOWN = 7  # client -> app

    @property
    def offset(self) -> int:
        return int(self) * MSG_CHANNEL_SIZE


class BoincApiError(Exception):
    """The client/app channel or a slot file cannot be used."""


class ControlMessages(NamedTuple):
    """What one :meth:`AppChannel.poll` found.

    The client queues process-control messages and hands over at most one per
    channel read, so at most one of suspend/resume/quit/abort is normally set.
    """

    suspend: bool = False
    resume: bool = False
    quit: bool = False
    abort: bool = False
    reread_app_info: bool = False
    network_available: bool = False
    heartbeat: bool = False
    # The state from the latest heartbeat message; kept between heartbeats.
    network_suspended: bool = False
    working_set_size: float | None = None
    max_working_set_size: float | None = None
    control_text: str | None = None
    heartbeat_text: str | None = None


class StatusReport(NamedTuple):
    """An app_status message, in what client 7.20 parses (get_app_status_msg)."""

    current_cpu_time: float
    checkpoint_cpu_time: float
    fraction_done: float | None = None
    # The client SIGKILLs this pid when it cleans up after the app exits.
    other_pid: int | None = None
    bytes_sent: float = 0.0
    bytes_received: float = 0.0
    want_network: bool = False
    # The container's working set: clients 8.x take it as the task's memory
    # (client/app.cpp wss_from_app); 7.20 ignores the tag.
    wss: float | None = None

    def encode(self) -> str:
        # The client zeroes both CPU times on every message, so always send both.
        parts = [
            f"<current_cpu_time>{_nonneg(self.current_cpu_time):e}</current_cpu_time>\n",
            f"<checkpoint_cpu_time>{_nonneg(self.checkpoint_cpu_time):e}</checkpoint_cpu_time>\n",
        ]
        if self.want_network:
            parts.append("<want_network>1</want_network>\n")
        if self.fraction_done is not None:
            fd = min(1.0, _nonneg(self.fraction_done))
            parts.append(f"<fraction_done>{fd:e}</fraction_done>\n")
        # other_pid 0 would make the client kill(0, SIGKILL): its own process group.
        if self.other_pid is not None and self.other_pid > 0:
            parts.append(f"<other_pid>{self.other_pid}</other_pid>\n")
        if self.wss is not None and self.wss > 0 and math.isfinite(self.wss):
            parts.append(f"<wss>{self.wss:e}</wss>\n")
        if self.bytes_sent > 0 and math.isfinite(self.bytes_sent):
            parts.append(f"<bytes_sent>{self.bytes_sent:f}</bytes_sent>\n")
        if self.bytes_received > 0 and math.isfinite(self.bytes_received):
            parts.append(f"<bytes_received>{self.bytes_received:f}</bytes_received>\n")
        return "".join(parts)


# The client keeps it in `char web_graphics_url[256]` (client/app.h).
WEB_GRAPHICS_URL_MAX = 255


def web_graphics_reply(url: str) -> str:
    """The graphics_reply message of boinc_web_graphics_url() (api/boinc_api.cpp).

    Clients 7.20.5 and 8.2.15 read the URL from this channel only, not from
    app_status (ACTIVE_TASK::get_graphics_msg), keep it for the task and hand
    it to BOINC Manager's "Show graphics" in the GUI RPC get_results answer.
    """
    if len(url) > WEB_GRAPHICS_URL_MAX or not url.isascii() or any(c in url for c in "<>&\0"):
        raise ValueError(f"not a URL the client can keep: {url!r}")
    return f"<web_graphics_url>{url}</web_graphics_url>\n"


def _nonneg(x: float) -> float:
    if not math.isfinite(x) or x < 0:
        return 0.0
    return float(x)


def _has_bool_tag(text: str, tag: str) -> bool:
    """lib/parse.cpp parse_bool: ``<tag/>``, ``<tag />`` or ``<tag>N</tag>`` with N != 0."""
    if f"<{tag}/>" in text or f"<{tag} />" in text:
        return True
    m = re.search(rf"<{tag}>\s*(-?\d+)", text)
    return bool(m and int(m.group(1)) != 0)


def _float_after(text: str, tag: str) -> float | None:
    m = re.search(rf"<{tag}>\s*([^<\s]+)", text)
    if not m:
        return None
    try:
        value = float(m.group(1))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_control(text: str) -> dict[str, bool]:
    """Flags of a process_control_request message (boinc_api handle_process_control_msg)."""
    return {
        "suspend": "<suspend/>" in text,
        "resume": "<resume/>" in text,
        "quit": "<quit/>" in text,
        "abort": "<abort/>" in text,
        "reread_app_info": "<reread_app_info/>" in text,
        "network_available": "<network_available/>" in text,
    }


def parse_heartbeat(text: str) -> tuple[bool, bool, float | None, float | None]:
    """(heartbeat, network_suspended, wss, max_wss) of a heartbeat message.

    The 7.20 client sends ``<heartbeat/><wss>..</wss><max_wss>..</max_wss>``
    plus ``<network_suspended/>`` while the volunteer has network off
    (ACTIVE_TASK_SET::send_heartbeats). boinc_api looks for ``suspend_network``
    instead, which the client never sends; we read what the client writes and
    accept the other spelling too.
    """
    suspended = _has_bool_tag(text, "network_suspended") or _has_bool_tag(text, "suspend_network")
    return (
        "<heartbeat/>" in text,
        suspended,
        _float_after(text, "wss"),
        _float_after(text, "max_wss"),
    )


class AppChannel:
    """The app's end of ``boinc_mmap_file``."""

    def __init__(self) -> None:
        self._mm: mmap.mmap | None = None
        self._network_suspended = False

    @classmethod
    def open(cls, slot_dir: str | Path) -> AppChannel:
        chan = cls()
        chan._attach(Path(slot_dir) / MMAPPED_FILE_NAME)
        return chan

    def _attach(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise BoincApiError(
                f"{path} does not exist: the BOINC client creates it before starting the "
                "app, and only for app versions whose <api_version> is 6.0 or later"
            ) from None
        except OSError as exc:
            raise BoincApiError(f"cannot open {path}: {exc.strerror or exc}") from None
        try:
            size = os.fstat(fd).st_size
            if size < SHARED_MEM_SIZE:
                raise BoincApiError(
                    f"{path} has {size} bytes, fewer than the {SHARED_MEM_SIZE} of the "
                    "client's shared memory; it was not made by the BOINC client"
                )
            self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None

    def __enter__(self) -> AppChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._mm is None

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            raise BoincApiError("the BOINC app channel is closed")
        return self._mm

    def has_msg(self, channel: Channel) -> bool:
        return self._map()[channel.offset] != 0

    def get_msg(self, channel: Channel) -> str | None:
        """Take the pending message off a channel and clear its flag; None if none."""
        mm = self._map()
        off = channel.offset
        if mm[off] == 0:
            return None
        raw = mm[off + 1 : off + 1 + MAX_MESSAGE_BYTES]
        mm[off] = 0
        return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")

    def send_msg(self, channel: Channel, text: str) -> bool:
        """Write a message if the receiver has read the last one; returns whether written."""
        data = text.encode("utf-8")
        if len(data) > MAX_MESSAGE_BYTES:
            raise ValueError(
                f"message of {len(data)} bytes exceeds the channel's {MAX_MESSAGE_BYTES}"
            )
        mm = self._map()
        off = channel.offset
        if mm[off] != 0:
            return False
        mm[off + 1 : off + 2 + len(data)] = data + b"\0"
        # The flag goes last: the client may read the channel at any moment.
        mm[off] = 1
        return True

    def poll(self) -> ControlMessages:
        """Read and clear the process-control and heartbeat channels."""
        control = self.get_msg(Channel.PROCESS_CONTROL_REQUEST)
        beat = self.get_msg(Channel.HEARTBEAT)
        flags = parse_control(control or "")
        heartbeat = False
        wss = max_wss = None
        if beat is not None:
            heartbeat, self._network_suspended, wss, max_wss = parse_heartbeat(beat)
        return ControlMessages(
            suspend=flags["suspend"],
            resume=flags["resume"],
            quit=flags["quit"],
            abort=flags["abort"],
            reread_app_info=flags["reread_app_info"],
            network_available=flags["network_available"],
            heartbeat=heartbeat,
            network_suspended=self._network_suspended,
            working_set_size=wss,
            max_working_set_size=max_wss,
            control_text=control,
            heartbeat_text=beat,
        )

    @property
    def network_suspended(self) -> bool:
        return self._network_suspended

    def send_status(self, report: StatusReport) -> bool:
        """Post an app_status message unless the client has not read the last one."""
        return self.send_msg(Channel.APP_STATUS, report.encode())

    def status_consumed(self) -> bool:
        """Whether the client has read the last app_status message."""
        return not self.has_msg(Channel.APP_STATUS)

    def deliver_status(
        self,
        report: StatusReport,
        timeout_s: float,
        *,
        interval_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> bool:
        """Send ``report`` and wait until the client has read it; False on timeout.

        Used before exiting on <quit/>: the status naming the shim's own pid as
        other_pid must reach the client, or the client kills the paused
        container it still knows as other_pid. The client reads app_status
        about once a second (ACTIVE_TASK_SET::get_msgs).
        """
        deadline = clock() + timeout_s
        while not self.send_status(report):
            if clock() >= deadline:
                return False
            sleep(interval_s)
        while not self.status_consumed():
            if clock() >= deadline:
                return False
            sleep(interval_s)
        return True


class HeartbeatWatchdog:
    """Tells when the client has gone: no heartbeat for 30 s, or its pid is gone."""

    def __init__(
        self,
        timeout_s: float = HEARTBEAT_GIVEUP_S,
        *,
        client_pid: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._timeout_s = timeout_s
        self._client_pid = client_pid
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        self._last = self._clock()

    def observe(self, messages: ControlMessages) -> None:
        if messages.heartbeat:
            self.beat()

    def seconds_since_beat(self) -> float:
        return self._clock() - self._last

    def expired(self) -> bool:
        return self.seconds_since_beat() > self._timeout_s

    def client_gone(self) -> bool:
        if self.expired():
            return True
        return self._client_pid > 0 and not pid_exists(self._client_pid)


def pid_exists(pid: int) -> bool:
    """As boinc_api's client_dead(): only "no such process" means gone.

    EPERM means it exists under another user (a sandboxed client).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SlotLockHeld(BoincApiError):
    """Another app instance holds the slot's boinc_lockfile."""


class SlotLock:
    """The slot's ``boinc_lockfile``, locked as boinc_api does (fcntl F_SETLK write lock).

    The client does not require it; it keeps two instances of the app (ours or
    a boinc_api app restarted in the same slot) from driving one task.
    """

    def __init__(self, slot_dir: str | Path) -> None:
        self.path = Path(slot_dir) / LOCKFILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting; raise :class:`SlotLockHeld` if it is taken."""
        if self._fd is not None:
            return
        # Non-blocking and no link followed: a FIFO or a symlink planted in the
        # slot must fail the open, not hang it or lock something elsewhere.
        flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o664)
        except OSError as exc:
            raise BoincApiError(f"cannot open {self.path}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BoincApiError(f"{self.path} is not a regular file")
        try:
            # lockf() in CPython is fcntl(F_SETLK), the lock FILE_LOCK::lock takes.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise SlotLockHeld(
                    f"{self.path} is locked: another instance may be running in this slot"
                ) from None
            # ENOSYS: no locking on this file system; boinc_api carries on too.
            if exc.errno != errno.ENOSYS:
                raise BoincApiError(f"cannot lock {self.path}: {exc.strerror}") from None
        self._fd = fd

    def release(self) -> None:
        """Unlock by closing the file.

        FILE_LOCK::unlock also deletes the file, which lets a waiter lock the
        deleted inode while a newcomer locks a fresh file; leaving it in place
        avoids that, and the client empties the slot when the task ends.
        """
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> SlotLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _one_line(text: str, limit: int) -> str:
    # The client reads each of these lines with fgets(): a newline in the text
    # would end it early and shift the "notice" line.
    flat = " ".join(text.split())
    data = flat.encode("utf-8")[:limit]
    return data.decode("utf-8", errors="ignore")


def finish_exit_code(status: int) -> int:
    """The process exit status that makes the client see ``status``.

    On Unix the client judges the task by the process's exit status
    (WEXITSTATUS, 8 bits), not by the number in the finish file; a failure
    whose low byte is 0 must not read as success.
    """
    code = status & 0xFF
    if status != 0 and code == 0:
        return 1
    return code


def write_atomic(path: Path, content: str) -> None:
    """Write a slot file whole or not at all. The temporary name is made afresh
    (O_EXCL, no link followed), so nothing planted there (a FIFO, a symlink)
    can block the write or redirect it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(tmp, flags, 0o644), "w", encoding="utf-8") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_finish_file(
    slot_dir: str | Path, status: int, message: str | None = None, *, is_notice: bool = False
) -> Path:
    """Write ``boinc_finish_called`` as boinc_finish_message() does.

    Format: the status on the first line; with a message, the message on the
    second and "notice" or an empty third line (the client shows the message
    only when that third line exists). Exit with :func:`finish_exit_code`
    (status) afterwards: with exit 0 and this file, the task succeeded.
    """
    content = f"{status}\n"
    if message is not None:
        content += f"{_one_line(message, _FINISH_MESSAGE_MAX)}\n{'notice' if is_notice else ''}\n"
    path = Path(slot_dir) / BOINC_FINISH_CALLED_FILE
    write_atomic(path, content)
    return path


def write_temporary_exit_file(
    slot_dir: str | Path, delay_s: float, reason: str, *, is_notice: bool = False
) -> Path:
    """Write ``boinc_temporary_exit`` as boinc_temporary_exit() does; then exit 0.

    Format: the delay in whole seconds, the reason, and "notice" to raise it
    as a notice. The client ignores the file when the reason line is missing,
    so a reason is always written.
    """
    if math.isfinite(delay_s):
        delay = max(0, min(_TEMP_EXIT_MAX_DELAY_S, math.ceil(delay_s)))
    else:
        delay = _TEMP_EXIT_MAX_DELAY_S
    line = _one_line(reason, _TEMP_EXIT_REASON_MAX) or "temporary exit"
    content = f"{delay}\n{line}\n"
    if is_notice:
        content += "notice\n"
    path = Path(slot_dir) / TEMPORARY_EXIT_FILE
    write_atomic(path, content)
    return path
