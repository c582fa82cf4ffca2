"""The shim's BOINC app protocol against a file laid out as the 7.20 client makes it.

``FakeClient`` plays the client's side with raw byte offsets (SHARED_MEM in
lib/app_ipc.h: eight 1024-byte channels, flag byte first), independently of
the module under test.
"""

from __future__ import annotations

import mmap
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from boincd_containers.shim import boinc_api
from boincd_containers.shim.boinc_api import (
    BOINC_FINISH_CALLED_FILE,
    LOCKFILE,
    AppChannel,
    BoincApiError,
    Channel,
    ControlMessages,
    HeartbeatWatchdog,
    SlotLock,
    SlotLockHeld,
    StatusReport,
    finish_exit_code,
    pid_exists,
    write_finish_file,
    write_temporary_exit_file,
)

PROCESS_CONTROL_REQUEST = 0
HEARTBEAT = 4
APP_STATUS = 5
REPO = Path(__file__).resolve().parents[2]


class FakeClient:
    """The client's end: creates the zeroed 8 KiB file and uses the channels by offset."""

    def __init__(self, slot: Path) -> None:
        path = slot / "boinc_mmap_file"
        with open(path, "wb") as f:
            f.write(b"\0" * 8192)
        self._file = open(path, "r+b")  # noqa: SIM115 - closed in close()
        self.mm = mmap.mmap(self._file.fileno(), 8192)

    def close(self) -> None:
        self.mm.close()
        self._file.close()

    def send(self, channel: int, text: str) -> bool:
        off = channel * 1024
        if self.mm[off]:
            return False
        data = text.encode() + b"\0"
        self.mm[off + 1 : off + 1 + len(data)] = data
        self.mm[off] = 1
        return True

    def pending(self, channel: int) -> bool:
        return self.mm[channel * 1024] != 0

    def take(self, channel: int) -> str | None:
        off = channel * 1024
        if not self.mm[off]:
            return None
        text = self.mm[off + 1 : off + 1024].split(b"\0", 1)[0].decode()
        self.mm[off] = 0
        return text

    def heartbeat(self, network_suspended: bool = False) -> bool:
        # As ACTIVE_TASK_SET::send_heartbeats formats it.
        text = "<heartbeat/><wss>1.234000e+07</wss><max_wss>8.000000e+09</max_wss>"
        if network_suspended:
            text += "<network_suspended/>"
        return self.send(HEARTBEAT, text)


@pytest.fixture
def slot(tmp_path: Path) -> Path:
    path = tmp_path / "slots" / "0"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def client(slot: Path) -> Iterator[FakeClient]:
    fake = FakeClient(slot)
    yield fake
    fake.close()


@pytest.fixture
def chan(slot: Path, client: FakeClient) -> Iterator[AppChannel]:
    with AppChannel.open(slot) as channel:
        yield channel


def test_channel_offsets_follow_shared_mem_order() -> None:
    assert Channel.PROCESS_CONTROL_REQUEST.offset == 0
    assert Channel.HEARTBEAT.offset == 4096
    assert Channel.APP_STATUS.offset == 5120
    assert boinc_api.SHARED_MEM_SIZE == 8192


def test_open_without_mmap_file_explains_api_version(slot: Path) -> None:
    with pytest.raises(BoincApiError, match="api_version"):
        AppChannel.open(slot)


def test_open_rejects_a_short_file(slot: Path) -> None:
    (slot / "boinc_mmap_file").write_bytes(b"\0" * 100)
    with pytest.raises(BoincApiError, match="fewer than"):
        AppChannel.open(slot)


def test_closed_channel_refuses_use(chan: AppChannel) -> None:
    chan.close()
    assert chan.closed
    with pytest.raises(BoincApiError, match="closed"):
        chan.poll()


def test_poll_with_nothing_pending(chan: AppChannel) -> None:
    assert chan.poll() == ControlMessages()


@pytest.mark.parametrize("verb", ["suspend", "resume", "quit", "abort", "reread_app_info"])
def test_process_control_message_is_read_and_cleared(
    chan: AppChannel, client: FakeClient, verb: str
) -> None:
    assert client.send(PROCESS_CONTROL_REQUEST, f"<{verb}/>")
    got = chan.poll()
    assert getattr(got, verb)
    assert got.control_text == f"<{verb}/>"
    others = {"suspend", "resume", "quit", "abort", "reread_app_info"} - {verb}
    assert not any(getattr(got, o) for o in others)
    assert not client.pending(PROCESS_CONTROL_REQUEST)
    assert chan.poll() == ControlMessages()


def test_client_queue_delivers_one_message_per_read(chan: AppChannel, client: FakeClient) -> None:
    assert client.send(PROCESS_CONTROL_REQUEST, "<suspend/>")
    assert not client.send(PROCESS_CONTROL_REQUEST, "<resume/>")
    assert chan.poll().suspend
    assert client.send(PROCESS_CONTROL_REQUEST, "<resume/>")
    assert chan.poll().resume


def test_heartbeat_and_network_state(chan: AppChannel, client: FakeClient) -> None:
    assert client.heartbeat(network_suspended=True)
    got = chan.poll()
    assert got.heartbeat
    assert got.network_suspended
    assert got.working_set_size == pytest.approx(1.234e7)
    assert got.max_working_set_size == pytest.approx(8e9)
    assert not client.pending(HEARTBEAT)

    # Between heartbeats the last known state holds.
    got = chan.poll()
    assert not got.heartbeat
    assert got.network_suspended
    assert chan.network_suspended

    assert client.heartbeat(network_suspended=False)
    got = chan.poll()
    assert got.heartbeat
    assert not got.network_suspended


def test_control_and_heartbeat_in_one_poll(chan: AppChannel, client: FakeClient) -> None:
    client.send(PROCESS_CONTROL_REQUEST, "<quit/>")
    client.heartbeat()
    got = chan.poll()
    assert got.quit
    assert got.heartbeat


def test_stale_bytes_after_the_nul_are_ignored(chan: AppChannel, client: FakeClient) -> None:
    client.send(PROCESS_CONTROL_REQUEST, "<network_available/><reread_app_info/>")
    chan.poll()
    client.send(PROCESS_CONTROL_REQUEST, "<quit/>")
    got = chan.poll()
    assert got.quit
    assert not got.reread_app_info
    assert got.control_text == "<quit/>"


def test_status_report_format_matches_boinc_report_app_status() -> None:
    text = StatusReport(12.5, 10.0, 0.25, other_pid=4242, bytes_sent=10, bytes_received=20).encode()
    assert text == (
        "<current_cpu_time>1.250000e+01</current_cpu_time>\n"
        "<checkpoint_cpu_time>1.000000e+01</checkpoint_cpu_time>\n"
        "<fraction_done>2.500000e-01</fraction_done>\n"
        "<other_pid>4242</other_pid>\n"
        "<bytes_sent>10.000000</bytes_sent>\n"
        "<bytes_received>20.000000</bytes_received>\n"
    )


def test_status_report_leaves_out_what_must_not_be_sent() -> None:
    text = StatusReport(-1.0, float("nan"), None, other_pid=0).encode()
    assert text == (
        "<current_cpu_time>0.000000e+00</current_cpu_time>\n"
        "<checkpoint_cpu_time>0.000000e+00</checkpoint_cpu_time>\n"
    )
    assert "<fraction_done>1.000000e+00" in StatusReport(0, 0, 7.0).encode()
    assert "<want_network>1</want_network>" in StatusReport(0, 0, want_network=True).encode()


def test_send_status_waits_for_the_client_to_read(chan: AppChannel, client: FakeClient) -> None:
    report = StatusReport(3.0, 0.0, 0.5, other_pid=99)
    assert chan.send_status(report)
    assert client.pending(APP_STATUS)
    assert not chan.status_consumed()
    assert not chan.send_status(StatusReport(4.0, 0.0))
    assert client.take(APP_STATUS) == report.encode()
    assert chan.status_consumed()
    assert chan.send_status(StatusReport(4.0, 0.0))
    assert client.take(APP_STATUS) == StatusReport(4.0, 0.0).encode()


def test_oversized_message_is_refused(chan: AppChannel) -> None:
    with pytest.raises(ValueError, match="exceeds"):
        chan.send_msg(Channel.GRAPHICS_REPLY, "x" * 1023)
    assert chan.send_msg(Channel.GRAPHICS_REPLY, "x" * 1022)


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_deliver_status_returns_once_the_client_has_read_it(
    chan: AppChannel, client: FakeClient
) -> None:
    clock = ManualClock()
    # Someone else's status is still unread: delivery must wait for it.
    assert chan.send_status(StatusReport(1.0, 0.0, other_pid=1234))
    seen: list[str | None] = []

    def client_reads(dt: float) -> None:
        clock.now += dt
        seen.append(client.take(APP_STATUS))

    withdraw = StatusReport(2.0, 0.0, other_pid=os.getpid())
    assert chan.deliver_status(withdraw, 10.0, clock=clock, sleep=client_reads)
    assert withdraw.encode() in seen
    assert chan.status_consumed()


def test_deliver_status_times_out_when_nobody_reads(chan: AppChannel) -> None:
    clock = ManualClock()

    def advance(dt: float) -> None:
        clock.now += dt

    assert not chan.deliver_status(StatusReport(1.0, 0.0), 2.0, clock=clock, sleep=advance)
    assert clock.now >= 102.0


def test_watchdog_gives_up_after_thirty_seconds() -> None:
    clock = ManualClock()
    dog = HeartbeatWatchdog(clock=clock)
    clock.now += 30.0
    assert not dog.expired()
    dog.observe(ControlMessages(heartbeat=True))
    clock.now += 29.0
    assert not dog.client_gone()
    clock.now += 1.5
    assert dog.expired()
    assert dog.client_gone()
    assert dog.seconds_since_beat() == pytest.approx(30.5)


def test_watchdog_notices_a_vanished_client_pid() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert pid_exists(os.getpid())
    assert not pid_exists(pid_max + 1)
    clock = ManualClock()
    assert HeartbeatWatchdog(client_pid=pid_max + 1, clock=clock).client_gone()
    assert not HeartbeatWatchdog(client_pid=os.getpid(), clock=clock).client_gone()


_LOCKER = """
import sys
from boincd_containers.shim.boinc_api import SlotLock, SlotLockHeld
try:
    SlotLock(sys.argv[1]).acquire()
except SlotLockHeld:
    print("held")
else:
    print("acquired")
"""


def _lock_from_another_process(slot: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _LOCKER, str(slot)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


def test_slot_lock_keeps_a_second_instance_out(slot: Path) -> None:
    lock = SlotLock(slot)
    with lock:
        assert lock.held
        assert (slot / "boinc_lockfile").exists()
        assert _lock_from_another_process(slot) == "held"
    assert not lock.held
    assert _lock_from_another_process(slot) == "acquired"


_HOLDER = """
import sys
from boincd_containers.shim.boinc_api import SlotLock
lock = SlotLock(sys.argv[1])
lock.acquire()
print("acquired", flush=True)
sys.stdin.read()
"""


def test_slot_lock_held_by_another_process_is_reported(slot: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(slot)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "acquired"
        with pytest.raises(SlotLockHeld, match="another instance"):
            SlotLock(slot).acquire()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
        assert holder.stdout is not None
        holder.stdout.close()
    with SlotLock(slot) as lock:
        assert lock.held


def test_finish_file_formats(slot: Path) -> None:
    path = write_finish_file(slot, 0)
    assert path == slot / "boinc_finish_called"
    assert path.read_text() == "0\n"
    write_finish_file(slot, 3, "container exited\nwith code 3")
    assert path.read_text() == "3\ncontainer exited with code 3\n\n"
    write_finish_file(slot, 1, "bad job.toml", is_notice=True)
    assert path.read_text() == "1\nbad job.toml\nnotice\n"
    assert [p.name for p in slot.iterdir()] == ["boinc_finish_called"]


def test_temporary_exit_file_formats(slot: Path) -> None:
    path = write_temporary_exit_file(slot, 600, "daemon unreachable")
    assert path == slot / "boinc_temporary_exit"
    assert path.read_text() == "600\ndaemon unreachable\n"
    write_temporary_exit_file(slot, 12.2, "waiting\nfor network", is_notice=True)
    assert path.read_text() == "13\nwaiting for network\nnotice\n"
    write_temporary_exit_file(slot, 10**9, "")
    assert path.read_text() == "86400\ntemporary exit\n"
    write_temporary_exit_file(slot, -5, "x" * 1000)
    delay, reason, _ = path.read_text().split("\n")
    assert delay == "0"
    assert len(reason) <= 254


@pytest.mark.parametrize(
    ("status", "code"), [(0, 0), (1, 1), (137, 137), (256, 1), (300, 44), (-185, 71)]
)
def test_finish_exit_code_never_turns_failure_into_success(status: int, code: int) -> None:
    assert finish_exit_code(status) == code


def test_exit_codes_match_the_client() -> None:
    assert boinc_api.EXIT_ABORTED_BY_CLIENT == 194
    assert boinc_api.EXIT_QUIT == 0
    assert boinc_api.EXIT_TEMPORARY == 0


def _without_blocking_on(fifo: Path, call: Callable[[], object]) -> BaseException | None:
    """Run ``call`` in a thread; if it blocks opening ``fifo`` for writing, open the
    read end to let it go, then fail. Returns what it raised, if anything."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        thread.join(20)
        os.close(fd)
        pytest.fail(f"blocked on the FIFO {fifo.name}")
    return outcome[0]


def test_a_fifo_as_the_lock_file_fails_the_lock_instead_of_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / LOCKFILE)
    raised = _without_blocking_on(tmp_path / LOCKFILE, SlotLock(tmp_path).acquire)
    assert isinstance(raised, BoincApiError)


def test_a_fifo_or_symlink_at_the_temporary_name_cannot_block_or_redirect_a_write(
    tmp_path: Path,
) -> None:
    tmp = tmp_path / f".{BOINC_FINISH_CALLED_FILE}.tmp"
    os.mkfifo(tmp)
    assert _without_blocking_on(tmp, lambda: write_finish_file(tmp_path, 0)) is None
    assert (tmp_path / BOINC_FINISH_CALLED_FILE).read_text() == "0\n"
    outside = tmp_path / "outside"
    tmp.symlink_to(outside)
    write_finish_file(tmp_path, 3, "again")
    assert not outside.exists()
    assert (tmp_path / BOINC_FINISH_CALLED_FILE).read_text().startswith("3\n")


def test_the_pyz_carries_its_api_version_where_update_versions_finds_it(tmp_path: Path) -> None:
    from boincd_containers.shim.boinc_api import API_VERSION
    from boincd_containers.shim.pyz import build_pyz

    pyz = build_pyz(tmp_path / "shim.pyz", sys.executable).read_bytes()
    # tools/update_versions: strings FILE | grep 'API_VERSION_[0-9]+.[0-9]+.[0-9]+$'
    runs = [r.decode() for r in re.findall(rb"[\x20-\x7e]{4,}", pyz)]
    found = [r for r in runs if re.fullmatch(r".*API_VERSION_\d+\.\d+\.\d+", r)]
    assert found
    assert found[0].endswith(f"API_VERSION_{API_VERSION}")
