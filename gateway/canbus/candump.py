"""candump ``-l`` logs in, ``FrameBatch`` chunks out: the replay hot path, parsed with numpy.

A line is ``(1953.613500) can0 109#000100FFFFFF0F3D``; CAN FD is ``id##<flags><data>``, a
remote frame ``id#R`` (or ``#R5``, with the requested length), an error frame has
``CAN_ERR_FLAG`` (0x20000000) in its 8-digit id, and a direction ``R``/``T`` may follow.

The file is read in large blocks. Lines of one length and one layout (the positions of ``.``,
``)``, the spaces and ``#``) are cut into a matrix and parsed a column at a time; anything
else (remote frames, a direction, odd spacing, garbage) goes through a per-line parser that
counts and skips what it cannot read. Frames equal python-can's ``CanutilsLogReader`` on clean
files, with three deliberate differences: an error frame keeps its channel, error class (as
id) and data, where python-can keeps only the time; any id with ``CAN_ERR_FLAG`` is an error
frame (python-can also wants the bus-error class bit); FD flags are read as hex.

Chunks are cut by content only (``gateway.canbus.chunking``), never by block, so a replay at
any speed and with any block size sees the same batches.
"""

from __future__ import annotations

import collections
import io
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from gateway.canbus.chunking import CHUNK_FRAMES, CHUNK_SECONDS
from gateway.records import FrameBatch, ReadStats

CAN_ERR_FLAG = 0x20000000
MAX_LINE = 512  # the longest valid line (64-byte FD frame, long channel name) is ~200
BLOCK_BYTES = 1 << 19  # 512 KiB: bounded memory (peak RSS) at the same speed as larger blocks
_FD_LENGTHS = frozenset((*range(9), 12, 16, 20, 24, 32, 48, 64))

_DIGIT, _HEX, _NAME = 1, 2, 4
_CLASS = np.zeros(256, np.uint8)
_HEXVAL = np.zeros(256, np.uint8)
for _c in range(33, 127):
    _CLASS[_c] |= _NAME
for _c in b"0123456789":
    _CLASS[_c] |= _DIGIT
for _i, _c in enumerate(b"0123456789abcdef"):
    _CLASS[_c] |= _HEX
    _HEXVAL[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _CLASS[_c] |= _HEX
    _HEXVAL[_c] = 10 + _i
# one bit per kind of byte a layout can require: the check of a whole line is one lookup
_B_DIGIT, _B_HEX, _B_NAME, _B_OPEN, _B_CLOSE, _B_SPACE, _B_HASH, _B_DOT = (1 << i for i in range(8))
_BITS = np.zeros(256, np.uint8)
_BITS[list(b"0123456789")] |= _B_DIGIT
_BITS[list(b"0123456789abcdefABCDEF")] |= _B_HEX
_BITS[33:127] |= _B_NAME
for _c, _b in (
    (b"(", _B_OPEN),
    (b")", _B_CLOSE),
    (b" ", _B_SPACE),
    (b"#", _B_HASH),
    (b".", _B_DOT),
):
    _BITS[_c[0]] |= _b
_NIB = np.full(256, 255, np.uint8)  # hex digit value, 255 for anything else
_NIB[list(b"0123456789abcdefABCDEF")] = [*range(16), *range(10, 16)]
_DEC = np.full(256, 255, np.uint8)  # decimal digit value, 255 for anything else
_DEC[list(b"0123456789")] = range(10)


@dataclass
class _Cols:
    """Frames of one block (or pending for the next chunk), in file order."""

    ts: npt.NDArray[np.float64]
    chan: npt.NDArray[np.uint16]  # global channel index
    fid: npt.NDArray[np.uint32]
    ext: npt.NDArray[np.bool_]
    remote: npt.NDArray[np.bool_]
    error: npt.NDArray[np.bool_]
    fd: npt.NDArray[np.bool_]
    dlc: npt.NDArray[np.uint8]
    data: npt.NDArray[np.uint8]

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, lo: int, hi: int) -> _Cols:
        return _Cols(*(getattr(self, f)[lo:hi] for f in _FIELDS))

    @staticmethod
    def concat(a: _Cols, b: _Cols) -> _Cols:
        if len(a) == 0:
            return b
        width = max(a.data.shape[1], b.data.shape[1])
        parts = [_widen(a.data, width), _widen(b.data, width)]
        cols = [np.concatenate([getattr(a, f), getattr(b, f)]) for f in _FIELDS[:-1]]
        return _Cols(*cols, np.concatenate(parts))


_FIELDS = ("ts", "chan", "fid", "ext", "remote", "error", "fd", "dlc", "data")


def _widen(data: npt.NDArray[np.uint8], width: int) -> npt.NDArray[np.uint8]:
    if data.shape[1] == width:
        return data
    out = np.zeros((data.shape[0], width), np.uint8)
    out[:, : data.shape[1]] = data
    return out


def _empty_cols() -> _Cols:
    z = np.zeros(0, np.bool_)
    return _Cols(
        np.zeros(0),
        np.zeros(0, np.uint16),
        np.zeros(0, np.uint32),
        z,
        z,
        z,
        z,
        np.zeros(0, np.uint8),
        np.zeros((0, 8), np.uint8),
    )


Frame = tuple[float, str, int, bool, bool, bool, bool, int, bytes]


def parse_line(text: str) -> Frame | str | None:
    """One candump line: a frame, a reason why it is not one, or None for a blank line."""
    parts = text.split()
    if not parts:
        return None
    if len(parts) == 4 and parts[3] in ("R", "T", "r", "t"):
        parts = parts[:3]
    if len(parts) != 3:
        return f"expected '(time) channel id#data', got {len(parts)} fields"
    stamp, channel, frame = parts
    if not (stamp.startswith("(") and stamp.endswith(")")):
        return "timestamp not in parentheses"
    try:
        ts = float(stamp[1:-1])
    except ValueError:
        return "bad timestamp"
    if not math.isfinite(ts):
        return "bad timestamp"
    if not channel.isprintable():
        return "bad channel name"
    can_id, sep, data = frame.partition("#")
    if not sep or not 1 <= len(can_id) <= 8:
        return "bad id"
    try:
        fid = int(can_id, 16)
    except ValueError:
        return "bad id"
    if not can_id.isalnum():
        return "bad id"
    fd = data.startswith("#")
    remote = False
    dlc = None
    if fd:
        if len(data) < 2 or data[1] not in "0123456789abcdefABCDEF":
            return "bad CAN FD flags"
        data = data[2:]
    elif data[:1] in ("R", "r"):
        remote = True
        if len(data) > 2 or (len(data) == 2 and data[1] not in "012345678"):
            return "bad remote length"
        dlc = int(data[1:] or 0)
        data = ""
    elif len(data) == 18 and data[16] == "_" and data[17] in "9abcdefABCDEF":
        data = data[:16]  # classic frame with a DLC code of 9..15 for its 8 bytes
    if len(data) % 2:
        return "odd number of hex digits"
    try:
        payload = bytes.fromhex(data)
    except ValueError:
        return "bad data"
    if len(payload) > 8 and not (fd and len(payload) in _FD_LENGTHS):
        return "wrong data length"
    error = bool(fid & CAN_ERR_FLAG)
    n = len(payload) if dlc is None else dlc
    return (ts, channel, fid & 0x1FFFFFFF, len(can_id) > 3, remote, error, fd, n, payload)


class _Channels:
    """Channel names, numbered in order of first appearance in the file."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.index: dict[str, int] = {}

    def codes(self, names: list[str], local: npt.NDArray[np.intp]) -> npt.NDArray[np.uint16]:
        """Global indices for frames whose block-local channel code is ``local``."""
        if len(local) == 0:
            return np.zeros(0, np.uint16)
        present = [c for c in range(len(names)) if (local == c).any()]
        for c in sorted(present, key=lambda c: int(np.argmax(local == c))):
            if names[c] not in self.index:
                self.index[names[c]] = len(self.names)
                self.names.append(names[c])
        table = np.array([self.index.get(n, 0) for n in names], np.uint16)
        return table[local]


def _number(v: npt.NDArray[np.uint8], base: int) -> npt.NDArray[np.int64]:
    """Digit values (rows of at most 15 hex / 18 decimal digits) to integers."""
    if v.shape[1] == 0:
        return np.zeros(v.shape[0], np.int64)
    weights = base ** np.arange(v.shape[1] - 1, -1, -1, dtype=np.int64)
    return v.astype(np.int64) @ weights


def _template(
    length: int, width: int, dot: int, close: int, sp2: int, hsh: int, fd: bool
) -> npt.NDArray[np.uint8]:
    """The class bit each column of a line of this layout must have (0: anything)."""
    t = np.zeros(width, np.uint8)
    t[0], t[dot], t[close], t[close + 1], t[sp2], t[hsh] = (
        _B_OPEN,
        _B_DOT,
        _B_CLOSE,
        _B_SPACE,
        _B_SPACE,
        _B_HASH,
    )
    t[1:dot] = _B_DIGIT
    t[dot + 1 : close] = _B_DIGIT
    t[close + 2 : sp2] = _B_NAME
    t[sp2 + 1 : hsh] = _B_HEX
    data_at = hsh + 1
    if fd:
        t[hsh + 1], t[hsh + 2] = _B_HASH, _B_HEX
        data_at = hsh + 3
    t[data_at:length] = _B_HEX
    return t


def _rows_match(g: npt.NDArray[np.uint8], template: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Rows of ``g`` (width a multiple of 8) whose every byte has its template bit."""
    miss = (_BITS[g] & template) ^ template
    words = miss.view(np.uint64)
    acc = words[:, 0].copy()
    for j in range(1, words.shape[1]):
        acc |= words[:, j]
    return acc == 0


def _parse_group(
    g: npt.NDArray[np.uint8], length: int, dot: int, close: int, sp2: int, hsh: int, fd: bool
) -> tuple[npt.NDArray[np.bool_], dict[str, Any]] | None:
    """Parse lines of one layout (``g`` holds each line padded to a multiple of 8 bytes);
    returns (valid rows, columns of the valid rows)."""
    data_at = hsh + (3 if fd else 1)
    nhex = length - data_at
    if (
        dot < 2
        or close - dot < 2
        or sp2 - close < 3
        or not 1 <= hsh - sp2 - 1 <= 8
        or nhex % 2
        or nhex < 0
    ):
        return None
    nbytes = nhex // 2
    if nbytes > 8 and not (fd and nbytes in _FD_LENGTHS):
        return None
    if (dot - 1) + (close - dot - 1) > 18:
        return None  # more digits than int64 holds: float() line by line
    ok = _rows_match(g, _template(length, g.shape[1], dot, close, sp2, hsh, fd))
    if not ok.all():
        g = g[ok]
    if len(g) == 0:
        return ok, {}
    frac_digits = close - dot - 1
    scaled = _number(_DEC[g[:, 1:dot]], 10) * 10**frac_digits + _number(
        _DEC[g[:, dot + 1 : close]], 10
    )
    exact = scaled < 2**53
    ts = scaled / float(10**frac_digits)  # one rounding, as float() does
    if not exact.all():
        slow = np.flatnonzero(~exact)
        for i in slow.tolist():
            ts[i] = float(bytes(g[i, 1:close]).decode())
    fid = _number(_NIB[g[:, sp2 + 1 : hsh]], 16)
    nib = _NIB[g[:, data_at:length]]
    data = (nib[:, 0::2] << 4) | nib[:, 1::2]
    chan = np.ascontiguousarray(g[:, close + 2 : sp2]).view(f"S{sp2 - close - 2}").ravel()
    return ok, {
        "ts": ts,
        "fid": fid,
        "chan": chan,
        "data": data,
        "ext": hsh - sp2 - 1 > 3,
        "fd": fd,
    }


def _layout(row: bytes) -> tuple[int, int, int, int, bool] | None:
    """Positions of '.', ')', the second space and '#' in one line, and whether it is FD."""
    if row.count(b" ") != 2 or row.count(b"#") not in (1, 2):
        return None
    hsh = row.find(b"#")
    if row.count(b"#") == 2 and row[hsh + 1] != 35:
        return None
    return row.find(b"."), row.find(b")"), row.rfind(b" "), hsh, row.count(b"#") == 2


class _BadLines(list[tuple[int, str]]):
    """Bad lines of one block, collected in a worker and replayed into ReadStats in order."""

    def bad(self, line_no: int, reason: str) -> None:
        self.append((line_no, reason))


def _parse_block(buf: bytes, stats: _BadLines, line0: int) -> tuple[_Cols, list[str]]:
    """Frames of the complete lines in ``buf``; ``line0`` is the number of its first line.

    Lines are grouped by length; within a group, the layout of one line is assumed for all and
    checked on every line, and the lines that do not fit are tried with their own layout
    (a few times) before the per-line parser takes the rest."""
    a = np.frombuffer(buf, np.uint8)
    ends = np.flatnonzero(a == 10)
    if len(a) and (len(ends) == 0 or ends[-1] != len(a) - 1):
        ends = np.append(ends, len(a))
    starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64)
    ends = ends.astype(np.int64)
    nonempty = ends > starts
    ends = ends - (nonempty & (a[np.maximum(ends - 1, 0)] == 13))
    lens = ends - starts
    n = len(starts)
    done = np.zeros(n, np.bool_)  # parsed by the fast path
    results: list[tuple[npt.NDArray[np.intp], dict[str, Any]]] = []
    candidates = (lens >= 10) & (lens <= MAX_LINE)
    candidates[candidates] &= a[starts[candidates]] == 40
    cand = np.flatnonzero(candidates)
    cand_lens = lens[cand]
    padded = np.concatenate([a, np.zeros(MAX_LINE + 8, np.uint8)])
    counts = np.bincount(cand_lens, minlength=1) if len(cand) else np.zeros(1, np.int64)
    for length in np.flatnonzero(counts).tolist():
        rows = cand[cand_lens == length] if counts[length] != len(cand) else cand
        width = (length + 7) // 8 * 8
        windows = np.lib.stride_tricks.sliding_window_view(padded, width)
        m = windows[starts[rows]]  # one row copy per line, no index matrix
        pending = np.arange(len(rows))
        for _ in range(4):  # at most a few layouts of one length
            if len(pending) == 0:
                break
            lay = _layout(bytes(m[pending[0], :length]))
            if lay is None:
                break
            parsed = _parse_group(m[pending] if len(pending) != len(rows) else m, length, *lay)
            if parsed is None:
                break
            ok, cols = parsed
            hit = rows[pending[ok]]
            if len(hit):
                done[hit] = True
                results.append((hit, cols))
            if not ok[0]:
                break  # the sample line itself is not valid: leave the rest to the slow path
            pending = pending[~ok]
    # everything else, line by line
    slow: list[tuple[int, Frame]] = []
    for i in np.flatnonzero(~done & nonempty).tolist():
        line_no = line0 + i
        if lens[i] > MAX_LINE:
            stats.bad(line_no, f"line too long ({int(lens[i])} bytes)")
            continue
        raw = buf[starts[i] : ends[i]]
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            stats.bad(line_no, "not ASCII text")
            continue
        got = parse_line(text)
        if isinstance(got, str):
            stats.bad(line_no, got)
        elif got is not None:
            slow.append((i, got))
    return _assemble(n, results, slow)


def _assemble(
    n: int, results: list[tuple[Any, dict[str, Any]]], slow: list[tuple[int, Frame]]
) -> tuple[_Cols, list[str]]:
    """The block's frames in file order; ``chan`` holds block-local codes into the names."""
    width = 8
    for _, cols in results:
        if cols["data"].shape[1] > 8:
            width = 64
    if any(f[7] > 8 for _, f in slow):
        width = 64
    ts = np.zeros(n)
    fid = np.zeros(n, np.uint32)
    flags = np.zeros((n, 4), np.bool_)  # ext, remote, error, fd
    dlc = np.zeros(n, np.uint8)
    data = np.zeros((n, width), np.uint8)
    local = np.zeros(n, np.intp)
    valid = np.zeros(n, np.bool_)
    names: list[str] = []
    name_code: dict[str, int] = {}

    def code(name: str) -> int:
        if name not in name_code:
            name_code[name] = len(names)
            names.append(name)
        return name_code[name]

    for rows, cols in results:
        valid[rows] = True
        ts[rows] = cols["ts"]
        raw_id = cols["fid"]
        fid[rows] = raw_id & 0x1FFFFFFF
        flags[rows, 0] = cols["ext"]
        flags[rows, 2] = (raw_id & CAN_ERR_FLAG) != 0
        flags[rows, 3] = cols["fd"]
        nb = cols["data"].shape[1]
        dlc[rows] = nb
        data[rows, :nb] = cols["data"]
        chan = cols["chan"]
        left = np.arange(len(chan))
        while len(left):  # a handful of channel names: one compare per name beats a sort
            same = chan[left] == chan[left[0]]
            local[rows[left[same]]] = code(chan[left[0]].decode("ascii"))
            left = left[~same]
    for i, (t, ch, f, ext, rem, err, fd, nb, payload) in slow:
        valid[i] = True
        ts[i], fid[i], dlc[i], local[i] = t, f, nb, code(ch)
        flags[i] = (ext, rem, err, fd)
        data[i, : len(payload)] = np.frombuffer(payload, np.uint8)
    keep = np.flatnonzero(valid)
    return _Cols(
        ts[keep],
        local[keep],
        fid[keep],
        flags[keep, 0],
        flags[keep, 1],
        flags[keep, 2],
        flags[keep, 3],
        dlc[keep],
        data[keep],
    ), names


def _blocks(
    fh: IO[Any], stats: ReadStats, block_bytes: int, bad: _BadLines
) -> Iterator[tuple[bytes, int]]:
    """Complete lines in blocks, with the number of each block's first line. A line longer
    than ``MAX_LINE`` is counted as bad here and never held in memory whole."""
    carry = b""
    line_no = 1
    long_line: int | None = None  # line number of an overlong line being skipped
    while True:
        chunk = fh.read(block_bytes)
        if isinstance(chunk, str):
            chunk = chunk.encode("utf-8", "surrogateescape")
        stats.bytes_read += len(chunk)
        if not chunk:
            break
        if long_line is not None:
            cut = chunk.find(b"\n")
            if cut < 0:
                continue
            bad.bad(long_line, "line too long")
            line_no = long_line + 1
            long_line = None
            chunk = chunk[cut + 1 :]
        buf = carry + chunk
        cut = buf.rfind(b"\n")
        if cut < 0:
            carry = buf
        else:
            yield buf[: cut + 1], line_no
            line_no += buf.count(b"\n", 0, cut + 1)
            carry = buf[cut + 1 :]
        if len(carry) > MAX_LINE:
            long_line, carry = line_no, b""
    if long_line is not None:
        bad.bad(long_line, "line too long")
    elif carry:
        yield carry, line_no


def _open(source: str | Path | IO[Any]) -> tuple[IO[Any], bool]:
    if isinstance(source, (str, Path)):
        return open(source, "rb"), True  # noqa: SIM115
    if isinstance(source, io.TextIOBase):
        return source, False
    return source, False


def iter_candump(
    source: str | Path | IO[Any],
    stats: ReadStats | None = None,
    *,
    chunk_frames: int = CHUNK_FRAMES,
    max_chunk_seconds: float = CHUNK_SECONDS,
    block_bytes: int = BLOCK_BYTES,
    workers: int = 2,
) -> Iterator[FrameBatch]:
    """Every frame of a candump log, in file order, as chunks that end after ``chunk_frames``
    frames or at the first frame ``max_chunk_seconds`` or more after the chunk's first one.
    Bad lines are counted in ``stats`` (pass one in to read it afterwards), never raised."""
    stats = stats if stats is not None else ReadStats()
    if isinstance(source, (str, Path)):
        stats.path = stats.path or str(source)
    fh, owned = _open(source)
    channels = _Channels()
    chunker = _Chunker(chunk_frames, max_chunk_seconds, channels, stats)
    # blocks are parsed two at a time (numpy releases the GIL for most of the work) and
    # consumed strictly in file order, so channel numbering and bad-line order are unchanged
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    ahead: collections.deque[Any] = collections.deque()

    def parse(buf: bytes, line0: int) -> tuple[_Cols, list[str], _BadLines]:
        bad = _BadLines()
        cols, names = _parse_block(buf, bad, line0)
        return cols, names, bad

    reader_bad = _BadLines()  # overlong lines, found while reading ahead

    def consume(result: tuple[_Cols, list[str], _BadLines], line0: int) -> Iterator[FrameBatch]:
        cols, names, bad = result
        while reader_bad and reader_bad[0][0] < line0:
            stats.bad(*reader_bad.pop(0))
        for line_no, reason in bad:
            stats.bad(line_no, reason)
        cols.chan = channels.codes(names, cols.chan)
        yield from chunker.feed(cols)

    try:
        for buf, line0 in _blocks(fh, stats, block_bytes, reader_bad):
            if pool is None:
                yield from consume(parse(buf, line0), line0)
                continue
            ahead.append((pool.submit(parse, buf, line0), line0))
            if len(ahead) > workers:
                fut, first = ahead.popleft()
                yield from consume(fut.result(), first)
        while ahead:
            fut, first = ahead.popleft()
            yield from consume(fut.result(), first)
        for item in reader_bad:
            stats.bad(*item)
        yield from chunker.finish()
    finally:
        for fut, _ in ahead:
            fut.cancel()
        if pool is not None:
            pool.shutdown(wait=True)
        if owned:
            fh.close()


@dataclass
class _Chunker:
    frames: int
    seconds: float
    channels: _Channels
    stats: ReadStats
    pending: _Cols = field(default_factory=_empty_cols)
    seen: int = 0  # channels that appeared in the frames emitted so far

    def feed(self, cols: _Cols) -> Iterator[FrameBatch]:
        self.pending = _Cols.concat(self.pending, cols)
        yield from self._cut(final=False)

    def finish(self) -> Iterator[FrameBatch]:
        yield from self._cut(final=True)

    def _cut(self, final: bool) -> Iterator[FrameBatch]:
        p = self.pending
        lo = 0
        while lo < len(p):
            window = p.ts[lo : lo + self.frames]
            ends = (window - window[0]) >= self.seconds
            if len(window) == self.frames:
                ends[-1] = True
            if ends.any():
                hi = lo + int(np.argmax(ends)) + 1
            elif final:
                hi = len(p)
            else:
                break
            yield self._batch(p.take(lo, hi))
            lo = hi
        self.pending = p.take(lo, len(p))

    def _batch(self, c: _Cols) -> FrameBatch:
        self.seen = max(self.seen, int(c.chan.max()) + 1)
        data = c.data
        width = 64 if int(c.dlc.max()) > 8 else 8
        data = np.ascontiguousarray(data[:, :width]) if data.shape[1] != width else data.copy()
        self.stats.frames += len(c)
        return FrameBatch(
            timestamp=c.ts.copy(),
            channel=c.chan.copy(),
            channels=tuple(self.channels.names[: self.seen]),
            arbitration_id=c.fid.copy(),
            is_extended=c.ext.copy(),
            is_remote=c.remote.copy(),
            is_error=c.error.copy(),
            is_fd=c.fd.copy(),
            dlc=c.dlc.copy(),
            data=data,
        )
