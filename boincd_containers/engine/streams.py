"""Log streams: the engine's framing taken off, and only the end of a long
output kept. Pure and synchronous; containers.py feeds them the engine's bytes."""

from __future__ import annotations

import collections

# What one log read returns at most: a reader gets the end of the output, never
# the whole log in the daemon's memory (a task may write gigabytes of it).
LOG_BYTES_MAX = 1 << 20
# Lines one read asks the engine for at most (`tail=all` means this many): the
# engine then reads back only this much of the file, not all of it.
LOG_TAIL_MAX = 10_000


def _frame_header(header: bytes) -> bool:
    return header[0] in (0, 1, 2) and header[1:4] == b"\0\0\0"


class Demultiplexer:
    """The payload of a non-TTY log stream, fed in chunks as they arrive.

    The engine frames each write as an 8-byte header (stream, 0, 0, 0, size
    big-endian) and its bytes; chunks of the HTTP stream cut anywhere, inside
    a header or a payload. A stream that does not start with a header (a TTY
    container's) passes through unchanged.
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._left = 0  # payload bytes still to come in the current frame
        self._framed: bool | None = None  # None until the first 8 bytes are in
        self._raw = False

    def feed(self, data: bytes) -> bytes:
        if self._raw:
            return data
        out = bytearray()
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._left:
                take = min(self._left, end - pos)
                out += view[pos : pos + take]
                pos += take
                self._left -= take
                continue
            need = 8 - len(self._header)
            self._header += view[pos : pos + need]
            pos += min(need, end - pos)
            if len(self._header) < 8:
                break
            header = bytes(self._header)
            self._header.clear()
            if not _frame_header(header):
                # Not framed (or no longer): the rest goes through as it is
                # rather than being lost.
                self._raw = True
                out += header
                out += view[pos:]
                break
            self._framed = True
            self._left = int.from_bytes(header[4:8], "big")
        return bytes(out)

    def close(self) -> bytes:
        """What is left at the end: a short unframed stream, or nothing."""
        rest, self._header = bytes(self._header), bytearray()
        return rest if self._framed is None else b""


def demultiplex(raw: bytes) -> bytes:
    """Strip the 8-byte frame headers of a non-TTY log stream (stdout and stderr in order)."""
    demux = Demultiplexer()
    return demux.feed(raw) + demux.close()


class TailBuffer:
    """The last `limit` bytes of a stream, in the chunks they came in: memory stays
    about `limit` however long the stream is."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self.dropped = 0  # bytes of the stream's start left out

    def add(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._size += len(data)
        while self._size - len(self._chunks[0]) >= self.limit:
            first = self._chunks.popleft()
            self._size -= len(first)
            self.dropped += len(first)

    def chunks(self) -> list[bytes]:
        """The kept bytes, from a line start (and never inside a UTF-8 sequence)
        when earlier output was left out."""
        chunks = list(self._chunks)
        excess = self._size - self.limit
        if excess > 0:
            chunks[0] = chunks[0][excess:]
            self.dropped += excess
        chunks = [c for c in chunks if c]
        if self.dropped and chunks:
            before = sum(len(c) for c in chunks)
            chunks = _from_a_line_start(chunks)
            self.dropped += before - sum(len(c) for c in chunks)
        return [c for c in chunks if c]

    def clear(self) -> None:
        self._chunks.clear()
        self._size = 0


# How far into the kept bytes the first line may end and still be dropped whole:
# the engines cut lines at 16 KiB, a longer search would drop real output.
_LINE_SEARCH_BYTES = 64 * 1024


def _from_a_line_start(chunks: list[bytes]) -> list[bytes]:
    """Drop the cut line at the start of `chunks`, through its newline; without a
    newline near the start, only the continuation bytes of a cut UTF-8 character."""
    scanned = 0
    for i, chunk in enumerate(chunks):
        newline = chunk.find(b"\n", 0, _LINE_SEARCH_BYTES - scanned)
        if newline >= 0:
            return [chunk[newline + 1 :], *chunks[i + 1 :]]
        scanned += len(chunk)
        if scanned >= _LINE_SEARCH_BYTES:
            break
    first = chunks[0]
    skip = 0
    while skip < min(len(first), 3) and 0x80 <= first[skip] < 0xC0:
        skip += 1
    return [first[skip:], *chunks[1:]]


def log_tail_lines(text: str | None, default: int = 200) -> int:
    """The `tail` of a log request as a line count in 0..LOG_TAIL_MAX; `all` or a
    negative number is LOG_TAIL_MAX. ValueError when it is no number."""
    if text is None or text == "":
        return min(default, LOG_TAIL_MAX)
    if text.strip().lower() == "all":
        return LOG_TAIL_MAX
    lines = int(text)
    return LOG_TAIL_MAX if lines < 0 else min(lines, LOG_TAIL_MAX)
