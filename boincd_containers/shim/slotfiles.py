"""Read a file from the slot without trusting what it is.

Everything in a slot comes from a project: the client copies or soft-links its
files there, and the app writes more while it runs. A link to ``/dev/zero``
would have the shim read until the host runs out of memory; a FIFO would block
it forever. So every slot file is opened non-blocking, checked on the opened
descriptor (not by a ``stat`` that a swap can outrun) to be a regular file, and
read up to a cap. Symlinks are followed: BOINC projects use them legitimately.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

# Caps, far above anything real and far below what would hurt the host.
JOB_FILE_MAX_BYTES = 1 << 20  # a job.toml is a few hundred bytes
INIT_DATA_MAX_BYTES = 4 << 20  # init_data.xml: tens of KB, project preferences included
SMALL_FILE_MAX_BYTES = 4096  # fraction_done, soft-link files
_READ_CHUNK = 1 << 16


class SlotFileError(OSError):
    """A slot file is not a regular file, is too large, or cannot be read.

    The message names the file and says what is wrong; it is an OSError so that
    code which already treats an unreadable file as absent keeps doing so.
    """


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _not_regular(name: str, mode: int) -> SlotFileError:
    return SlotFileError(f"{name} is {_kind(mode)}, not a regular file")


def _too_large(name: str, limit: int) -> SlotFileError:
    return SlotFileError(f"{name} is larger than {limit} bytes; refusing to read it")


def read_slot_file(path: str | Path, limit: int, *, name: str | None = None) -> bytes:
    """The contents of ``path``, a regular file of at most ``limit`` bytes.

    Raises FileNotFoundError when it does not exist (callers often treat that
    case apart) and :class:`SlotFileError`, naming the file as ``name``
    (default: the path), for anything else. Never blocks: a FIFO, a device or
    a socket is refused without being read.
    """
    label = name if name is not None else str(path)
    # A cheap look first, so a FIFO or a device is normally not even opened
    # (opening a FIFO wakes a writer waiting on it; opening some devices acts).
    # It decides nothing: the fstat of the opened descriptor below does.
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except ValueError:
        raise SlotFileError(f"{label}: the path contains a NUL character") from None
    except OSError as exc:
        raise SlotFileError(f"cannot read {label}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise _not_regular(label, mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SlotFileError(f"cannot read {label}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(label, st.st_mode)
        if st.st_size > limit:
            raise _too_large(label, limit)
        chunks: list[bytes] = []
        total = 0
        # Read one byte past the cap: the file may have grown since the fstat,
        # and /proc-like files report size 0.
        while total <= limit:
            chunk = os.read(fd, min(_READ_CHUNK, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise _too_large(label, limit)
        return b"".join(chunks)
    except SlotFileError:
        raise
    except OSError as exc:
        raise SlotFileError(f"cannot read {label}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def regular_file_mtime(path: str | Path) -> float | None:
    """The mtime of ``path`` if it is a regular file (symlinks followed), else None."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_mtime if stat.S_ISREG(st.st_mode) else None


def read_fraction_done(path: str | Path, *, name: str | None = None) -> float | None:
    """The number 0..1 an app writes to tell its progress; None if absent or not a number.

    Raises :class:`SlotFileError` when the file is not one to read (a FIFO, a
    device, more than a few KB).
    """
    try:
        raw = read_slot_file(path, SMALL_FILE_MAX_BYTES, name=name)
    except FileNotFoundError:
        return None  # the app has not written it yet
    words = raw.decode("utf-8", errors="replace").split()
    try:
        value = float(words[0]) if words else math.nan
    except ValueError:
        return None
    return min(max(value, 0.0), 1.0) if math.isfinite(value) else None
