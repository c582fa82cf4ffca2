"""`boincd-shim`: the BOINC task's main program. The client starts it in the slot dir.

Standard library only, so it starts fast and small, and can ship as one .pyz.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .boinc_api import (
    EXIT_INIT_FAILURE,
    LOCK_BACKOFF_S,
    LOCKFILE_TIMEOUT_S,
    AppChannel,
    BoincApiError,
    SlotLock,
    SlotLockHeld,
    finish_exit_code,
    write_finish_file,
    write_temporary_exit_file,
)
from .client import DaemonClient, DaemonError
from .initdata import INIT_DATA_FILE, InitDataError, load_init_data
from .jobfile import JOB_FILE, JobError, load_job
from .runner import Runner, TaskFailed, say


def _fail(slot: Path, status: int, message: str) -> int:
    """A task that cannot run fails with a message the volunteer can act on."""
    say(f"error: {message}")
    write_finish_file(slot, status, message)
    return finish_exit_code(status)


def _acquire(lock: SlotLock) -> bool:
    """Wait for a previous shim of this task to let go (as boinc_api does, 35 s):
    after the client was killed and restarted, the old shim notices and leaves."""
    deadline = time.monotonic() + LOCKFILE_TIMEOUT_S
    while True:
        try:
            lock.acquire()
            return True
        except SlotLockHeld:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


def _internal_error(file: str, exc: Exception) -> str:
    """A bug met while reading a slot file: one line to report, not a traceback."""
    import traceback

    frame = traceback.extract_tb(exc.__traceback__)[-1]
    where = f"{Path(frame.filename).name}:{frame.lineno}"
    return (
        f"cannot use {file}: internal error ({type(exc).__name__} at {where}: {exc}); "
        "please report it"
    )


USAGE = """usage: boincd-shim

The main program of a BOINC app version whose tasks run in containers. The BOINC
client starts it in the task's slot dir; it reads init_data.xml and job.toml there
and asks the boincd-containers daemon (socket: BOINCD_SOCKET, default
/run/boincd-containers/boincd.sock) to run the container. Not meant to be run by
hand; see docs/projects.md.
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # The client may pass an app version's command line; only a lone request for
    # help is taken as one.
    if args in (["--help"], ["-h"]):
        sys.stdout.write(USAGE)
        return 0
    slot = Path.cwd()
    try:
        init = load_init_data(slot)
    except InitDataError as exc:
        return _fail(slot, EXIT_INIT_FAILURE, str(exc))
    except Exception as exc:  # whatever the file holds, the task fails with a message
        return _fail(slot, EXIT_INIT_FAILURE, _internal_error(INIT_DATA_FILE, exc))
    try:
        job = load_job(slot, init.project_dir or None)
    except JobError as exc:
        return _fail(slot, EXIT_INIT_FAILURE, str(exc))
    except Exception as exc:
        return _fail(slot, EXIT_INIT_FAILURE, _internal_error(JOB_FILE, exc))
    lock = SlotLock(slot)
    if not _acquire(lock):
        say("another instance still runs in this slot: temporary exit")
        write_temporary_exit_file(slot, LOCK_BACKOFF_S, "another instance holds the slot lock")
        return 0
    try:
        channel = AppChannel.open(slot)
    except (BoincApiError, OSError) as exc:
        return _fail(slot, EXIT_INIT_FAILURE, f"cannot open the BOINC shared memory file: {exc}")
    client = DaemonClient()
    try:
        say(f"task {init.result_name}: daemon socket {client.path}")
        return Runner(init, job, channel, client, slot).run()
    except TaskFailed as exc:
        return _fail(slot, 1, str(exc))
    except (DaemonError, OSError) as exc:
        # Never a traceback in stderr.txt: say what went wrong and fail the task.
        return _fail(slot, 1, f"unexpected error: {exc}")
    finally:
        client.close()
        channel.close()
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
