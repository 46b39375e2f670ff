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
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from gateway.canbus.chunking import CHUNK_FRAMES, CHUNK_SECONDS
from gateway.errors import LogFormatError
from gateway.records import FrameBatch, ReadStats, widen

CAN_ERR_FLAG = 0x20000000
MAX_LINE = 512  # the longest valid line (64-byte FD frame, long channel name) is ~200
BLOCK_BYTES = 1 << 19  # 512 KiB: bounded memory (peak RSS) at the same speed as larger blocks
_DIRECTIONS = frozenset((b" R", b" T", b" r", b" t"))  # what may follow the data
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
for _byte, _bit in (
    (b"(", _B_OPEN),
    (b")", _B_CLOSE),
    (b" ", _B_SPACE),
    (b"#", _B_HASH),
    (b".", _B_DOT),
):
    _BITS[_byte[0]] |= _bit
_NIB = np.full(256, 255, np.uint8)  # hex digit value, 255 for anything else
_NIB[list(b"0123456789abcdefABCDEF")] = [*range(16), *range(10, 16)]
_DEC = np.full(256, 255, np.uint8)  # decimal digit value, 255 for anything else
_DEC[list(b"0123456789")] = range(10)


_W8 = np.uint64(0x0101010101010101)
_HI4 = _W8 * np.uint64(0xF0)
_ASCII0 = _W8 * np.uint64(0x30)
_PLUS6 = _W8 * np.uint64(0x06)
_LO4 = _W8 * np.uint64(0x0F)
_PAIR = np.full(65536, -1, np.int16)  # two hex digits (first in the low byte) -> byte value
for _h in b"0123456789abcdefABCDEF":
    for _l in b"0123456789abcdefABCDEF":
        _PAIR[_h | (_l << 8)] = (int(_NIB[_h]) << 4) | int(_NIB[_l])
_NOT_NAME = np.full(256, 0x80, np.uint8)  # 0x80 for a byte no channel name may hold
_NOT_NAME[33:127] = 0
# the pairs of data byte ``j`` (as uint16 lanes of two uint64 words) kept by a frame of n bytes
_INSIDE = np.zeros((9, 8), np.uint16)
for _n in range(9):
    _INSIDE[_n, :_n] = 0xFFFF
_INSIDE_WORDS = _INSIDE.view("<u8")
_PAIR_HIGH = np.uint64(0xFF00FF00FF00FF00)  # an invalid pair (-1) has its high byte set


def _swar8(w: npt.NDArray[np.uint64], base: int) -> npt.NDArray[np.uint64]:
    """The value of eight digits held one per byte, the first in the lowest byte, combined
    pairwise in three multiplications (the SWAR idiom of simdjson's parse_eight_digits)."""
    b = np.uint64(base)
    w = (w * (np.uint64(1) + (b << np.uint64(8)))) >> np.uint64(8)
    w &= np.uint64(0x00FF00FF00FF00FF)
    w = (w * (np.uint64(1) + ((b * b) << np.uint64(16)))) >> np.uint64(16)
    w &= np.uint64(0x0000FFFF0000FFFF)
    return (w * (np.uint64(1) + ((b**4) << np.uint64(32)))) >> np.uint64(32)


def _decimal(
    m: npt.NDArray[np.uint8], spans: tuple[tuple[int, int], ...]
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.uint64]]:
    """(every byte a digit, value) of the digits in column ``spans`` of each row, read as one
    number (at most 19 digits). ``m`` is C-contiguous and 8 bytes wider than the last span:
    the digits are read as words in place, up to eight at a time, and right-aligned."""
    ok = np.ones(len(m), np.bool_)
    value = np.zeros(len(m), np.uint64)
    for lo, hi in spans:
        for col in range(lo, hi, 8):
            k = min(8, hi - col)
            keep = np.uint64((1 << 8 * k) - 1)
            w = _row_words(m, col, k)
            ok &= (w & (_HI4 & keep)) == (_ASCII0 & keep)
            ok &= ((w + (_PLUS6 & keep)) & (_HI4 & keep)) == (_ASCII0 & keep)
            w &= _LO4
            w <<= np.uint64(64 - 8 * k)  # the last digit in the highest byte: leading zeros
            value *= np.uint64(10**k)
            value += _swar8(w, 10)
    return ok, value


def _parse_classic(
    padded: npt.NDArray[np.uint8],
    starts: npt.NDArray[np.int64],
    lens: npt.NDArray[np.int64],
    dot: int,
    close: int,
    sp2: int,
    hsh: int,
) -> tuple[npt.NDArray[np.bool_], dict[str, Any]] | None:
    """Classic frames (0 to 8 data bytes, any of them, a direction after them or not) of one
    prefix layout: every line whose time, channel and id sit where they sit in the sample
    line. Returns (valid lines, columns of the valid lines); a line this rejects goes to the
    general paths, which give the reason."""
    nid = hsh - sp2 - 1
    ndig = (dot - 1) + (close - dot - 1)
    if dot < 2 or close - dot < 2 or sp2 - close < 3 or not 1 <= nid <= 8 or ndig > 18:
        return None
    d0 = hsh + 1
    # a direction after the data (" R"/" T", as python-can's CanutilsLogWriter writes it)
    last = padded[starts + lens - 1] | 0x20
    has_dir = (padded[starts + lens - 2] == 32) & ((last == 0x72) | (last == 0x74))
    nhex = lens - d0 - 2 * has_dir
    elig = np.flatnonzero((nhex >= 0) & (nhex <= 16) & (nhex % 2 == 0))
    ok_all = np.zeros(len(starts), np.bool_)
    if len(elig) == 0:
        return ok_all, {}
    width = (d0 + 16 + 7) // 8 * 8
    m = _gather(padded, starts[elig], width)
    ok = m[:, dot] == 46
    ok &= m[:, close] == 41
    ok &= m[:, close + 1] == 32
    ok &= m[:, sp2] == 32
    ok &= m[:, hsh] == 35
    good, scaled = _decimal(m, ((1, dot), (dot + 1, close)))
    ok &= good
    nchan = sp2 - close - 2
    long_name = nchan > 8  # a short one is read as one word below
    z = np.zeros((len(m), 8 * ((nchan + 7) // 8) + 8 if long_name else 8), np.uint8)
    if long_name:
        z[:, :nchan] = np.take(_NOT_NAME, m[:, close + 2 : sp2])  # channel: 0 where allowed
    z[:, -nid:] = np.take(_NIB, m[:, sp2 + 1 : hsh])  # id: nibbles, right-aligned
    words = z.view("<u8")
    idw = words[:, -1]
    ok &= (idw & _HI4) == 0
    for j in range(words.shape[1] - 1):
        ok &= words[:, j] == 0
    pairs = np.take(_PAIR, m[:, d0 : d0 + 16].view("<u2"))
    nbytes = nhex[elig] // 2
    pw = pairs.view("<u8") & np.take(_INSIDE_WORDS, nbytes, axis=0)
    ok &= ((pw[:, 0] | pw[:, 1]) & _PAIR_HIGH) == 0
    if not long_name:
        names, codes = _name_codes(_row_words(m, close + 2, nchan), nchan, ok)
    sel = np.flatnonzero(ok)
    ok_all[elig[sel]] = True
    if len(sel) == 0:
        return ok_all, {}
    if len(sel) != len(m):
        m, scaled, idw, pw, nbytes = m[sel], scaled[sel], idw[sel], pw[sel], nbytes[sel]
    frac = close - dot - 1
    exact = scaled.view(np.int64)  # < 10**18: an int64, which converts to float fast
    ts = exact.astype(np.float64) / float(10**frac)  # one rounding, as float() does
    slow = np.flatnonzero(exact >= 2**53)
    for i in slow.tolist():
        ts[i] = float(bytes(m[i, 1:close]).decode())
    fid = _swar8(idw, 16).view(np.int64)
    data = np.ascontiguousarray(pw.view(np.uint8)[:, 0::2])
    chan: Any  # names as fixed-width bytes per row, or (names, each row's index into them)
    if long_name:
        chan = np.ascontiguousarray(m[:, close + 2 : sp2]).view(f"S{nchan}").ravel()
    else:
        chan = (names, codes[sel])
    return ok_all, {
        "ts": ts,
        "fid": fid,
        "chan": chan,
        "data": data,
        "dlc": nbytes.astype(np.uint8),
        "ext": nid > 3,
        "fd": False,
    }


def _gather(
    padded: npt.NDArray[np.uint8], starts: npt.NDArray[np.int64], width: int
) -> npt.NDArray[np.uint8]:
    """Rows of ``width`` bytes of ``padded`` starting at ``starts``, as a C-contiguous matrix.
    The bytes are viewed as overlapping ``width``-byte items, one per offset, so the gather
    copies a whole row at a time (3x faster than fancy indexing a sliding window view)."""
    items = np.ndarray((len(padded) - width + 1,), f"V{width}", padded, 0, (1,))
    return items[starts].view(np.uint8).reshape(len(starts), width)


def _row_words(m: npt.NDArray[np.uint8], col: int, n: int) -> npt.NDArray[np.uint64]:
    """Bytes ``col`` to ``col + n`` (n <= 8) of every row of ``m`` (C-contiguous, at least
    ``col + 8`` wide) as one little-endian integer each, read in place."""
    words = np.ndarray((len(m),), "<u8", m.reshape(-1), col, (m.shape[1],))
    return words & np.uint64((1 << 8 * n) - 1) if n < 8 else words.copy()


def _name_codes(
    words: npt.NDArray[np.uint64], n: int, ok: npt.NDArray[np.bool_]
) -> tuple[list[str], npt.NDArray[np.uint16]]:
    """Channel names of ``n`` bytes (each packed in a word, first byte lowest) of the rows in
    ``ok``, as (names in order of appearance, each row's index into them). A row whose name
    holds a byte no name may hold (a space, a control byte, non-ASCII) is taken out of ``ok``.

    A log has a handful of channels: one comparison per name; past eight names, one sort."""
    codes = np.zeros(len(words), np.uint16)
    names: list[str] = []
    left = ok.copy()  # rows not yet named
    for _ in range(8):
        i = int(np.argmax(left))
        if not left[i]:
            return names, codes
        same = words == words[i]
        same &= left
        left ^= same
        name = _word_name(int(words[i]), n)
        if name is None:
            ok ^= same  # a byte no name may hold
            continue
        if names:  # codes start at 0
            codes[same] = len(names)
        names.append(name)
    rest = np.flatnonzero(left)  # past eight names
    if len(rest):
        distinct, first, inverse = np.unique(words[rest], return_index=True, return_inverse=True)
        table = np.zeros(len(distinct), np.int64)
        for k in np.argsort(first, kind="stable").tolist():
            name = _word_name(int(distinct[k]), n)
            table[k] = -1 if name is None else len(names)
            if name is not None:
                names.append(name)
        mapped = table[inverse]
        ok[rest[mapped < 0]] = False
        codes[rest] = np.maximum(mapped, 0)
    return names, codes


def _word_name(word: int, n: int) -> str | None:
    raw = word.to_bytes(8, "little")[:n]
    if any(b < 33 or b > 126 for b in raw):
        return None
    return raw.decode("ascii")


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
    def join(parts: list[_Cols]) -> _Cols:
        if len(parts) == 1:
            return parts[0]
        width = max(c.data.shape[1] for c in parts)
        cols = [np.concatenate([getattr(c, f) for c in parts]) for f in _FIELDS[:-1]]
        return _Cols(*cols, np.concatenate([widen(c.data, width) for c in parts]))


_FIELDS = ("ts", "chan", "fid", "ext", "remote", "error", "fd", "dlc", "data")


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

    LIMIT = 1 << 16  # channel numbers are uint16 (FrameBatch.channel); a car has a handful

    def __init__(self, path: str = "") -> None:
        self.path = path
        self.names: list[str] = []
        self.index: dict[str, int] = {}

    def codes(self, names: list[str], local: npt.NDArray[np.uint16]) -> npt.NDArray[np.uint16]:
        """Global indices for frames whose block-local channel code is ``local``."""
        if len(local) == 0:
            return np.zeros(0, np.uint16)
        if all(n in self.index for n in names):  # the usual case: no new channel
            known = [self.index[n] for n in names]
            if known == list(range(len(known))):  # and numbered as in the block
                return local
            return np.array(known, np.uint16)[local]
        present = [c for c in range(len(names)) if (local == c).any()]
        for c in sorted(present, key=lambda c: int(np.argmax(local == c))):
            if names[c] not in self.index:
                if len(self.names) == self.LIMIT:
                    raise LogFormatError(
                        f"{self.path or 'candump log'}: more than {self.LIMIT:,} different "
                        "channel names; is this a candump log?"
                    )
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


def _parse_block(buf: bytes, stats: _BadLines, line0: int) -> tuple[_Cols, list[str], int]:
    """Frames of the complete lines in ``buf`` and the number of lines; ``line0`` is the number
    of its first line.

    Three passes, each taking what the one before left: classic frames whose time, channel and
    id sit where they sit in a sample line, whatever their data length (nearly every line of a
    real log, in one go); lines grouped by length, a layout per group (CAN FD); and the
    per-line parser for the rest, which counts and skips what it cannot read."""
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
    done = np.zeros(n, np.bool_)  # parsed by a fast path
    results: list[tuple[npt.NDArray[np.intp], dict[str, Any]]] = []
    candidates = (lens >= 10) & (lens <= MAX_LINE)
    candidates[candidates] &= a[starts[candidates]] == 40
    cand = np.flatnonzero(candidates)
    padded = np.concatenate([a, np.zeros(MAX_LINE + 8, np.uint8)])
    left = cand
    for _ in range(8):  # a few prefix layouts: ids of 3 and 8 digits, channels, time widths
        if len(left) == 0:
            break
        sample = buf[starts[left[0]] : ends[left[0]]]
        lay = _layout(sample[:-2] if sample[-2:] in _DIRECTIONS else sample)
        parsed = (
            None
            if lay is None or lay[4]
            else _parse_classic(padded, starts[left], lens[left], *lay[:4])
        )
        if parsed is None:
            left = left[1:]  # a sample that is no classic frame: the later passes take it
            continue
        ok, cols = parsed
        if cols:
            done[left[ok]] = True
            results.append((left[ok], cols))
        left = left[~ok]
        if len(left) and not ok[0]:
            left = left[1:]
    cand = cand[~done[cand]]
    cand_lens = lens[cand]
    counts = np.bincount(cand_lens, minlength=1) if len(cand) else np.zeros(1, np.int64)
    for length in np.flatnonzero(counts).tolist():
        rows = cand[cand_lens == length] if counts[length] != len(cand) else cand
        m = _gather(padded, starts[rows], (length + 7) // 8 * 8)
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
        try:  # an interface may have a name beyond ASCII: python-can reads UTF-8 text
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats.bad(line_no, "not UTF-8 text")
            continue
        got = parse_line(text)
        if isinstance(got, str):
            stats.bad(line_no, got)
        elif got is not None:
            slow.append((i, got))
    return (*_assemble(results, slow), n)


def _assemble(
    results: list[tuple[Any, dict[str, Any]]], slow: list[tuple[int, Frame]]
) -> tuple[_Cols, list[str]]:
    """The block's frames in file order; ``chan`` holds block-local codes into the names."""
    width = 8
    for _, cols in results:
        if cols["data"].shape[1] > 8:
            width = 64
    if any(f[7] > 8 for _, f in slow):
        width = 64
    names: list[str] = []
    name_code: dict[str, int] = {}

    def code(name: str) -> int:
        if name not in name_code:
            name_code[name] = len(names)
            names.append(name)
        return name_code[name]

    parts: list[tuple[Any, ...]] = []  # (lines, ts, raw id, ext, remote, fd, dlc, data, chan)
    for rows, cols in results:
        k = len(rows)
        data = widen(cols["data"], width)
        dlc = cols.get("dlc")
        if dlc is None:
            dlc = np.full(k, cols["data"].shape[1], np.uint8)
        chan = cols["chan"]
        if isinstance(chan, tuple):  # (names, each row's index into them)
            part_names, part_codes = chan
            local = np.array([code(n) for n in part_names], np.uint16)[part_codes]
        else:
            local = np.empty(k, np.uint16)
            left = np.arange(k)
            while len(left):  # a handful of channel names: one compare per name beats a sort
                same = chan[left] == chan[left[0]]
                local[left[same]] = code(chan[left[0]].decode("ascii"))
                left = left[~same]
        flag = np.full(k, cols["ext"], np.bool_), np.zeros(k, np.bool_), np.full(k, cols["fd"])
        parts.append((rows, cols["ts"], cols["fid"], *flag, dlc, data, local))
    if slow:
        k = len(slow)
        data = np.zeros((k, width), np.uint8)
        for j, (_, f) in enumerate(slow):
            data[j, : len(f[8])] = np.frombuffer(f[8], np.uint8)
        parts.append(
            (
                np.array([i for i, _ in slow], np.intp),
                np.array([f[0] for _, f in slow], np.float64),
                np.array([f[2] | (CAN_ERR_FLAG if f[5] else 0) for _, f in slow], np.int64),
                np.array([f[3] for _, f in slow], np.bool_),
                np.array([f[4] for _, f in slow], np.bool_),
                np.array([f[6] for _, f in slow], np.bool_),
                np.array([f[7] for _, f in slow], np.uint8),
                data,
                np.array([code(f[1]) for _, f in slow], np.uint16),
            )
        )
    if not parts:
        return _empty_cols(), names
    if len(parts) == 1:
        lines, ts, raw_id, ext, remote, fd, dlc, data, local = parts[0]
    else:
        lines, ts, raw_id, ext, remote, fd, dlc, data, local = (
            np.concatenate(col) for col in zip(*parts, strict=True)
        )
        order = np.argsort(lines, kind="stable")
        ts, raw_id, ext, remote, fd, dlc, data, local = (
            x[order] for x in (ts, raw_id, ext, remote, fd, dlc, data, local)
        )
    raw_id = np.asarray(raw_id, np.int64)
    return _Cols(
        ts,
        local,
        (raw_id & 0x1FFFFFFF).astype(np.uint32),
        ext,
        remote,
        (raw_id & CAN_ERR_FLAG) != 0,
        fd,
        dlc,
        data,
    ), names


def _blocks(fh: IO[Any], stats: ReadStats, block_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Complete lines in blocks, each with the number of overlong lines skipped right before
    it (a line longer than ``MAX_LINE`` is never held in memory whole); the last block may be
    empty, to report overlong lines at the end. Lines are counted by the parser, not here."""
    carry = b""
    skipped = 0
    in_long = False  # inside an overlong line being skipped
    cr = b""  # a CR that ended the last read: a line end of its own, or the start of a CRLF
    first = True
    while True:
        chunk = fh.read(block_bytes)
        if isinstance(chunk, str):
            chunk = chunk.encode("utf-8", "surrogateescape")
        stats.bytes_read += len(chunk)
        if first:  # a byte order mark (an editor on Windows saved the log) is not a line's
            first, chunk = False, chunk.removeprefix(b"\xef\xbb\xbf")
        if not chunk:
            if cr:  # the file ended on a lone CR
                chunk, cr = b"\n", b""
            else:
                break
        elif cr or b"\r" in chunk:  # one memchr a block, where no line ends in CR
            chunk, cr = _lone_crs(cr + chunk)
            if not chunk:
                continue
        if in_long:
            cut = chunk.find(b"\n")
            if cut < 0:
                continue
            skipped, in_long = skipped + 1, False
            chunk = chunk[cut + 1 :]
        buf = carry + chunk
        cut = buf.rfind(b"\n")
        if cut < 0:
            carry = buf
        else:
            yield buf[: cut + 1], skipped
            skipped, carry = 0, buf[cut + 1 :]
        if len(carry) > MAX_LINE:
            in_long, carry = True, b""
    skipped += in_long
    if carry or skipped:
        yield carry, skipped


def _lone_crs(chunk: bytes) -> tuple[bytes, bytes]:
    """``chunk`` with every CR that ends a line alone (old Mac line ends; python-can reads text
    with universal newlines, so a lone CR ends its lines too) made an LF, and the CR it ends
    with held back, the first half of a CRLF perhaps. CRLF stays: the parser takes it."""
    held = b""
    if chunk.endswith(b"\r"):
        chunk, held = chunk[:-1], b"\r"
    if chunk.count(b"\r") != chunk.count(b"\r\n"):
        chunk = _LONE_CR.sub(b"\n", chunk)
    return chunk, held


_LONE_CR = re.compile(rb"\r(?!\n)")


def _open(source: str | Path | IO[Any]) -> tuple[IO[Any], bool]:
    if isinstance(source, (str, Path)):
        return open(source, "rb"), True  # noqa: SIM115
    if isinstance(source, io.TextIOBase):
        return source, False
    return source, False


def parse_threads() -> int:
    """Threads that parse candump blocks by default, beside the pipeline's own thread: one per
    core beyond it, two at most. Measured on a 2-core VM, a second parse thread made long
    Kona replays 5-15 % faster but cost ~5 MB of peak memory, which put the 3,172-signal
    Model 3 DBC over the 80 MB CAN-only budget (83 MB; 78 with one thread; 76 with parsing in
    the pipeline's own thread, which was 5 % slower still)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(2, cores - 1))


def iter_candump(
    source: str | Path | IO[Any],
    stats: ReadStats | None = None,
    *,
    chunk_frames: int = CHUNK_FRAMES,
    max_chunk_seconds: float = CHUNK_SECONDS,
    block_bytes: int = BLOCK_BYTES,
    workers: int | None = None,
) -> Iterator[FrameBatch]:
    """Every frame of a candump log, in file order, as chunks that end after ``chunk_frames``
    frames or at the first frame ``max_chunk_seconds`` or more after the chunk's first one.
    Bad lines are counted in ``stats`` (pass one in to read it afterwards), never raised.
    ``workers``: threads that parse blocks (0: in this one). By default a file is parsed in a
    process of its own where that is possible (``parseproc``), else in ``parse_threads()``."""
    stats = stats if stats is not None else ReadStats()
    if isinstance(source, (str, Path)):
        stats.path = stats.path or str(source)
        if workers is None and os.environ.get("GATEWAY_PARSE_PROCESS", "1") != "0":
            from gateway.canbus import parseproc

            if parseproc.available() and parseproc.usable(Path(source)):
                yield from parseproc.iter_candump_forked(
                    Path(source),
                    stats,
                    chunk_frames=chunk_frames,
                    max_chunk_seconds=max_chunk_seconds,
                    block_bytes=block_bytes,
                )
                return
    workers = parse_threads() if workers is None else workers
    fh, owned = _open(source)
    assembly = _Assembly(stats, chunk_frames, max_chunk_seconds)
    # with several workers, blocks are parsed side by side (numpy releases the GIL for most of
    # the work) and consumed strictly in file order, so channel numbering and bad-line order
    # are unchanged
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
    ahead: collections.deque[Any] = collections.deque()
    try:
        for buf, skipped in _blocks(fh, stats, block_bytes):
            if pool is None:
                yield from assembly.feed(parse_block(buf), skipped)
                continue
            ahead.append((pool.submit(parse_block, buf), skipped))
            if len(ahead) > workers:
                fut, before = ahead.popleft()
                yield from assembly.feed(fut.result(), before)
        while ahead:
            fut, before = ahead.popleft()
            yield from assembly.feed(fut.result(), before)
        yield from assembly.finish()
    finally:
        for fut, _ in ahead:
            fut.cancel()
        if pool is not None:
            pool.shutdown(wait=True)
        if owned:
            fh.close()


Parsed = tuple["_Cols", list[str], "_BadLines", int]


def parse_block(buf: bytes) -> Parsed:
    """The frames of one block of complete lines (``_blocks``), their block-local channel
    names, the bad lines numbered from 0 (the block's first line) and the number of lines:
    what ``_Assembly.feed`` takes, in whichever thread or process it was parsed."""
    bad = _BadLines()
    cols, names, lines = _parse_block(buf, bad, 0)
    return cols, names, bad, lines


class _Assembly:
    """What follows the parse of each block, in file order: bad lines numbered in the file,
    channels numbered in order of first appearance, and the frames cut into chunks."""

    def __init__(self, stats: ReadStats, chunk_frames: int, max_chunk_seconds: float) -> None:
        self.stats = stats
        self.channels = _Channels(stats.path or "")
        self.chunker = _Chunker(chunk_frames, max_chunk_seconds, self.channels, stats)
        self.next_line = 1  # number of the first line of the next block

    def feed(self, parsed: Parsed, skipped: int) -> Iterator[FrameBatch]:
        """The chunks that the next block completes; ``skipped``: the overlong lines right
        before it."""
        cols, names, bad, lines = parsed
        for _ in range(skipped):
            self.stats.bad(self.next_line, "line too long")
            self.next_line += 1
        for line_no, reason in bad:
            self.stats.bad(self.next_line + line_no, reason)
        self.next_line += lines
        cols.chan = self.channels.codes(names, cols.chan)
        yield from self.chunker.feed(cols)

    def finish(self) -> Iterator[FrameBatch]:
        yield from self.chunker.finish()


@dataclass
class _Chunker:
    """Cuts parsed blocks into chunks by frame count and time span, never by block."""

    frames: int
    seconds: float
    channels: _Channels
    stats: ReadStats
    parts: list[_Cols] = field(default_factory=list)  # frames not yet in a chunk
    count: int = 0  # frames in ``parts``
    span: float = 0.0  # latest time in ``parts`` minus the first frame's
    seen: int = 0  # channels that appeared in the frames emitted so far

    def feed(self, cols: _Cols) -> Iterator[FrameBatch]:
        if len(cols) == 0:
            return
        self.parts.append(cols)
        self.count += len(cols)
        self.span = max(self.span, float(cols.ts.max()) - float(self.parts[0].ts[0]))
        if self.count >= self.frames or self.span >= self.seconds:
            yield from self._cut(final=False)  # joined only when a chunk can end

    def finish(self) -> Iterator[FrameBatch]:
        yield from self._cut(final=True)

    def _cut(self, final: bool) -> Iterator[FrameBatch]:
        if not self.parts:
            return
        p = _Cols.join(self.parts)
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
        rest = p.take(lo, len(p))
        self.parts = [rest] if len(rest) else []
        self.count = len(rest)
        self.span = float(rest.ts.max() - rest.ts[0]) if len(rest) else 0.0

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
