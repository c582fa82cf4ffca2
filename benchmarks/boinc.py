"""A fake-but-real BOINC slot and the client's end of its shared memory.

The real shim runs in a real slot directory: `init_data.xml`, `job.toml` and a
zeroed 8192-byte `boinc_mmap_file`, as client 7.20 makes them. This module then
does what the client does over that file, written from BOINC's layout
(lib/app_ipc.h: eight 1024-byte MSG_CHANNELs; byte 0 is the "unread" flag, the
message a NUL-terminated string from byte 1; the sender writes only into a
channel whose flag is clear and sets the flag last) rather than with the shim's
own code, so the two sides are written independently:

* a heartbeat every second on channel 4, as ACTIVE_TASK_SET::send_heartbeats;
* app_status read (flag cleared) every second on channel 5, as get_msgs;
* `<suspend/>`, `<resume/>`, `<abort/>`, `<quit/>` on channel 0 when asked.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CHANNEL_BYTES = 1024
SHMEM_BYTES = 8 * CHANNEL_BYTES
PROCESS_CONTROL_REQUEST = 0
HEARTBEAT = 4
APP_STATUS = 5
HEARTBEAT_TEXT = "<heartbeat/><wss>0.000000</wss><max_wss>0.000000</max_wss>"

_INIT_DATA = """<app_init_data>
<major_version>7</major_version>
<minor_version>20</minor_version>
<release>5</release>
<app_version>100</app_version>
<app_name>bench</app_name>
<project_dir>{project_dir}</project_dir>
<boinc_dir>{boinc_dir}</boinc_dir>
<wu_name>{result}_wu</wu_name>
<result_name>{result}</result_name>
<slot>{slot}</slot>
<client_pid>{client_pid}</client_pid>
<wu_cpu_time>0.000000</wu_cpu_time>
<starting_elapsed_time>0.000000</starting_elapsed_time>
<checkpoint_period>60.000000</checkpoint_period>
<fraction_done_start>0.000000</fraction_done_start>
<fraction_done_end>1.000000</fraction_done_end>
<gpu_type></gpu_type>
<gpu_device_num>-1</gpu_device_num>
<gpu_opencl_dev_index>-1</gpu_opencl_dev_index>
<gpu_usage>0.000000</gpu_usage>
<ncpus>{ncpus:f}</ncpus>
<rsc_memory_bound>{memory:f}</rsc_memory_bound>
<rsc_disk_bound>{disk:f}</rsc_disk_bound>
</app_init_data>
"""


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class Slot:
    """One task's slot under `<root>/slots/<index>`, its project under `<root>/projects`."""

    root: Path
    index: int
    project: str
    result: str
    image: str
    command: tuple[str, ...]
    ncpus: float = 1.0
    memory_bytes: int = 256 << 20
    disk_bytes: int = 1 << 30

    @property
    def dir(self) -> Path:
        return self.root / "slots" / str(self.index)

    @property
    def project_dir(self) -> Path:
        return self.root / "projects" / self.project

    def write(self) -> Slot:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.project_dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "init_data.xml").write_text(
            _INIT_DATA.format(
                project_dir=self.project_dir,
                boinc_dir=self.root,
                result=self.result,
                slot=self.index,
                client_pid=os.getpid(),
                ncpus=self.ncpus,
                memory=float(self.memory_bytes),
                disk=float(self.disk_bytes),
            )
        )
        command = ", ".join(_toml_str(c) for c in self.command)
        (self.dir / "job.toml").write_text(
            f"image = {_toml_str(self.image)}\ncommand = [{command}]\n"
        )
        # The client zeroes the file before it starts the app (reset_msgs).
        (self.dir / "boinc_mmap_file").write_bytes(bytes(SHMEM_BYTES))
        return self

    def request(self) -> dict[str, object]:
        """The task as the daemon API takes it (docs/api.md), for tasks made without a shim."""
        return {
            "result": self.result,
            "project": self.project,
            "slot_dir": str(self.dir),
            "project_dir": str(self.project_dir),
            "image": self.image,
            "command": list(self.command),
            "ncpus": self.ncpus,
            "memory_bytes": self.memory_bytes,
            "disk_bytes": self.disk_bytes,
            "allow_fetch": True,
        }

    def finish_status(self) -> int | None:
        """The status in boinc_finish_called, None when the shim did not write it."""
        try:
            return int((self.dir / "boinc_finish_called").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stderr_tail(self, chars: int = 1500) -> str:
        try:
            return (self.dir / "stderr.txt").read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class _Channels:
    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self.mm = mmap.mmap(fd, SHMEM_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.last_status = ""
        self.statuses = 0

    def clear(self, channel: int) -> bool:
        return self.mm[channel * CHANNEL_BYTES] == 0

    def put(self, channel: int, text: str) -> bool:
        off = channel * CHANNEL_BYTES
        if self.mm[off] != 0:
            return False
        data = text.encode() + b"\0"
        self.mm[off + 1 : off + 1 + len(data)] = data
        self.mm[off] = 1  # last: the app may look at any moment
        return True

    def take(self, channel: int) -> str | None:
        off = channel * CHANNEL_BYTES
        if self.mm[off] == 0:
            return None
        text = self.mm[off + 1 : off + CHANNEL_BYTES].split(b"\0", 1)[0].decode(errors="replace")
        self.mm[off] = 0
        return text


class FakeClient:
    """The client side for any number of slots: one thread does the 1 Hz chores."""

    def __init__(self) -> None:
        self._slots: dict[Path, _Channels] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fake-boinc-client", daemon=True)
        self._thread.start()

    def attach(self, slot: Slot) -> None:
        channels = _Channels(slot.dir / "boinc_mmap_file")
        channels.put(HEARTBEAT, HEARTBEAT_TEXT)
        with self._lock:
            self._slots[slot.dir] = channels

    def detach(self, slot: Slot) -> None:
        with self._lock:
            channels = self._slots.pop(slot.dir, None)
        if channels is not None:
            channels.mm.close()

    def send(self, slot: Slot, message: str, timeout_s: float = 5.0) -> int:
        """Queue a process-control message as the client does; returns when it was
        written (time.time_ns(), the engine's clock) once the channel was free."""
        with self._lock:
            channels = self._slots[slot.dir]
        deadline = time.monotonic() + timeout_s
        while True:
            at = time.time_ns()
            if channels.put(PROCESS_CONTROL_REQUEST, message):
                return at
            if time.monotonic() > deadline:
                raise TimeoutError(f"the app did not read its control channel in {timeout_s} s")
            time.sleep(0.001)

    async def asend(self, slot: Slot, message: str, timeout_s: float = 5.0) -> int:
        """`send` for asyncio code: waits for a busy channel without blocking the loop."""
        with self._lock:
            channels = self._slots[slot.dir]
        deadline = time.monotonic() + timeout_s
        while True:
            at = time.time_ns()
            if channels.put(PROCESS_CONTROL_REQUEST, message):
                return at
            if time.monotonic() > deadline:
                raise TimeoutError(f"the app did not read its control channel in {timeout_s} s")
            await asyncio.sleep(0.001)

    def last_status(self, slot: Slot) -> str:
        with self._lock:
            channels = self._slots.get(slot.dir)
        return channels.last_status if channels else ""

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                slots = list(self._slots.values())
            for channels in slots:
                try:
                    channels.put(HEARTBEAT, HEARTBEAT_TEXT)
                    status = channels.take(APP_STATUS)
                except ValueError:  # closed under us by detach()
                    continue
                if status is not None:
                    channels.last_status = status
                    channels.statuses += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for channels in self._slots.values():
                channels.mm.close()
            self._slots.clear()


def launch_shim(shim: Path, slot: Slot, socket: str) -> subprocess.Popen[bytes]:
    """Start the shim in its slot as the client does: cwd = slot, output to stderr.txt."""
    out = (slot.dir / "stderr.txt").open("ab")
    try:
        return subprocess.Popen(
            [str(shim)],
            cwd=slot.dir,
            env={**os.environ, "BOINCD_SOCKET": socket},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    finally:
        out.close()
