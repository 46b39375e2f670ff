"""Vector ASC logs: the common data lines parsed with numpy, every other line by python-can.

A classic data line reads ``<time> <channel> <id>[x] Rx|Tx d <dlc> <byte> ... [more]``, with
any run of spaces or tabs between the fields. Lines of exactly that shape (hex base, bytes of two
hex digits, plain ASCII) are cut into tokens and converted a column at a time. Any other line
(CAN FD, error and remote frames, events, statistics, comments, odd spellings the writer allowed)
is handed to python-can's ``ASCReader`` on its own, so it is read, skipped or refused exactly as
python-can reads, skips or refuses it; a line python-can refuses is counted as bad and the
reading goes on. The header is read by python-can too.

The frames equal those of python-can's reader (``tests/canbus/test_ascfile.py`` compares both on
real and mutated files): about 1M frames/s here, 8x python-can's ``ASCReader`` alone and 13x the
gateway's earlier ASC path through it. Lines of any length are read, as python-can reads them;
a block ends after a LF or a lone CR.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from gateway.canbus import candump as cd
from gateway.canbus.messages import (
    READ_ERRORS,
    CountingLines,
    channel_name,
    divert_logging,
    message_problem,
)
from gateway.records import FrameBatch, ReadStats, widen

if TYPE_CHECKING:
    import can

log = logging.getLogger(__name__)

_HEAD_BYTES = 1 << 16  # the header must end in the first 64 KiB (else python-can reads it all)
_FRONT = 16  # zeros before a block, so that a right-aligned read never starts before it
_TOKENS = 14  # time, channel, id, direction, "d", dlc and up to 8 bytes

_WS = np.zeros(256, np.bool_)
_WS[[9, 10, 13, 32]] = True
_ODD = np.ones(256, np.bool_)  # a byte that sends its line to python-can
_ODD[[9, 10, 13]] = False
_ODD[32:127] = False
_DIGIT = np.full(256, 255, np.uint8)
_DIGIT[48:58] = np.arange(10)


class _Fallback(Exception):
    """The file is better read by python-can from the start: a header longer than 64 KiB, or
    one python-can refuses (``base HEX``), which its reader counts as a bad line and reads on."""


def _line_ends(a: npt.NDArray[np.uint8]) -> tuple[Any, Any, Any]:
    """(starts, content ends, count) of the lines of ``a``, ends without the terminator; a line
    ends at LF, CRLF or a lone CR (python's universal newlines, as python-can reads text)."""
    ends = np.flatnonzero(a == 10)
    cr = np.flatnonzero(a == 13)
    if len(cr):
        lone = cr[(cr + 1 >= len(a)) | (a[np.minimum(cr + 1, len(a) - 1)] != 10)]
        if len(lone):
            ends = np.union1d(ends, lone)
    if len(a) and (len(ends) == 0 or ends[-1] != len(a) - 1):
        ends = np.append(ends, len(a))
    starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64)
    ends = ends.astype(np.int64)
    crlf = (ends < len(a)) & (ends > starts)
    crlf[crlf] &= (a[ends[crlf]] == 10) & (a[ends[crlf] - 1] == 13)
    return starts, ends - crlf, len(starts)


def _read_header(fh: Any) -> tuple[str, int, int]:
    """(base, lines the header took, bytes they took), read by python-can's own header code:
    it consumes the first line that is no header line too, as python-can does."""
    head = fh.read(_HEAD_BYTES)
    fh.seek(0)
    a = np.frombuffer(head, np.uint8)
    import can  # python-can reads the header, and the lines numpy does not (see above)

    lines = CountingLines(io.StringIO(head.decode("utf-8", "replace"), newline=None))
    reader = can.ASCReader(lines)  # type: ignore[arg-type]
    try:
        reader._extract_header()
    except READ_ERRORS as exc:
        raise _Fallback(str(exc)) from exc
    used = lines.line_no
    if header_took_a_frame(lines.last):
        used -= 1  # read as the body's first line
    if len(head) == _HEAD_BYTES and used >= head.count(b"\n"):
        raise _Fallback("header longer than 64 KiB")
    starts, _, n = _line_ends(a)
    offset = int(starts[used]) if used < n else len(head)
    return reader.base, used, offset


def header_took_a_frame(line: str) -> bool:
    """Whether the line that ended python-can's reading of an ASC header is a data line.
    python-can's ``_extract_header`` takes the first line it does not know as the header's end
    and drops it: right for ``Begin Triggerblock``, but a file with neither that nor an
    ``internal events logged`` line (a date and a base line, then frames) lost its first frame
    without a word. Such a line is read as the body's first."""
    return _TIMED.match(line) is not None


_TIMED = re.compile(r"\s*\d+\.\d+\s", re.ASCII)


def python_can_line(text: str, base: str) -> can.Message | None:
    """One body line as python-can's ASCReader reads it: a message, None for a line it skips;
    a line it refuses raises what python-can raises."""
    import can

    reader = can.ASCReader(io.StringIO(text), base=base)
    reader._extract_header = lambda: None  # type: ignore[method-assign]
    for msg in reader:
        return msg
    return None


# a data line's start: time, channel, identifier (what python-can's reader needs, and then a
# direction, before it reads a line as a frame; without one it passes over the line in silence)
_DATA_START = re.compile(r"\d+\.\d+\s+\d+\s+[0-9A-Fa-f]+x?(\s|$)", re.ASCII)
# the lines python-can's ASCReader reads as frames (its ASC_MESSAGE_REGEX)
_READ_BY_PYTHON_CAN = re.compile(
    r"\d+\.\d+\s+(\d+\s+(\w+\s+(Tx|Rx)|ErrorFrame)|CANFD)", re.ASCII | re.IGNORECASE
)
# the lines of an ASC body that carry no time (comments, the trigger blocks), lower case
_TIMELESS = ("//", "begin triggerblock", "end triggerblock", "date ", "base ", "internal event",
             "no internal event")  # fmt: skip


def skipped_without_a_word(text: str) -> str | None:
    """Why a line of an ASC body is damaged though python-can's reader skips it (None: python-can
    reads it, or it is a line of the format that holds no frame: an event, a statistic, a
    comment, a trigger block's bounds). python-can passes over a
    data line cut short before its direction, and over a line of no ASC shape, in silence: a
    replay would lose the frame without anyone knowing."""
    line = text.strip()
    if not line or _READ_BY_PYTHON_CAN.match(line):
        return None
    if _DATA_START.match(line):
        return f"a data line without its direction and data: {ascii(line[:40])}"
    first = line.split(None, 1)[0]
    try:
        float(first)
        return None  # timed: an event python-can does not read (a statistic, a chip status)
    except ValueError:
        pass
    if line.lower().startswith(_TIMELESS):
        return None
    return f"not a line of an ASC log: {ascii(line[:40])}"


def _blocks(fh: Any, stats: ReadStats, block_bytes: int) -> Iterator[bytes]:
    """Complete lines in blocks, cut after a LF or a lone CR (universal newlines, as python-can
    reads the file). A line is never cut short: python-can reads lines of any length."""
    carry = b""
    while True:
        chunk = fh.read(block_bytes)
        stats.bytes_read += len(chunk)
        if not chunk:
            break
        buf = carry + chunk
        # a CR as the last byte may be the first half of a CRLF: not a cut until more is read
        cut = max(buf.rfind(b"\n"), buf.rfind(b"\r", 0, len(buf) - 1))
        if cut < 0:
            carry = buf
            continue
        yield buf[: cut + 1]
        carry = buf[cut + 1 :]
    if carry:
        yield carry


def _parse_block(
    buf: bytes, base: str, line0: int, first_ch: int = 1
) -> tuple[cd._Cols, list[str], int, list[Any]]:
    """Frames of one block of complete lines; bad lines as (line number, reason). ``first_ch``
    is the file's first channel number (``first_channel``): it is ``can0``."""
    if not buf:
        return cd._empty_cols(), [], 0, []
    a = np.frombuffer(buf, np.uint8)
    starts, ends, n = _line_ends(a)
    # a line with a byte other than printable ASCII, space or tab goes to python-can whole
    odd_at = np.flatnonzero(((a < 32) & (a != 9) & (a != 10) & (a != 13)) | (a > 126))
    line_odd = np.zeros(n, np.bool_)
    line_odd[np.searchsorted(starts, odd_at, side="right") - 1] = True
    # tokens: runs of bytes other than space, tab, CR, LF (none spans two lines)
    ws = (a == 32) | (a == 9) | (a == 10) | (a == 13)
    edge = np.empty(len(a), np.bool_)
    edge[0] = not ws[0]
    np.greater(ws[:-1], ws[1:], out=edge[1:])  # whitespace, then not
    tstart = np.flatnonzero(edge)
    edge[-1] = not ws[-1]
    np.less(ws[:-1], ws[1:], out=edge[:-1])  # not whitespace, then whitespace
    tend = np.flatnonzero(edge) + 1
    first = np.searchsorted(tstart, starts)
    ntok = np.diff(np.append(first, len(tstart)))
    padded = np.concatenate((np.zeros(_FRONT, np.uint8), a, np.zeros(64, np.uint8)))

    done = np.zeros(n, np.bool_)
    parts: list[tuple[Any, ...]] = []
    rows = np.flatnonzero(~line_odd & (ntok >= 6)) if base == "hex" else np.zeros(0, np.intp)
    if len(rows):
        # the first 14 tokens of each candidate line (past its last token: the next line's,
        # which no check reads, as a line needs 6 + dlc tokens to pass)
        at = first[rows, None] + np.arange(_TOKENS)
        np.minimum(at, len(tstart) - 1, out=at)
        tok = tstart[at]
        tlen = tend[at] - tok
        tok += _FRONT  # positions in ``padded``
        ok, cols = _parse_data_lines(padded, tok, tlen, ntok[rows])
        if cols:
            done[rows[ok]] = True
            parts.append((rows[ok], *cols))
    bad: list[Any] = []
    slow: list[tuple[int, can.Message]] = []
    for i in np.flatnonzero(~done & (ntok > 0)).tolist():
        text = buf[starts[i] : ends[i]].decode("utf-8", "replace")
        try:
            msg = python_can_line(text, base)
        except READ_ERRORS as exc:
            bad.append((line0 + i, " ".join(str(exc).split())[:120] or type(exc).__name__))
            continue
        if msg is None:
            unread = skipped_without_a_word(text)
            if unread is not None:
                bad.append((line0 + i, unread))
            continue
        problem = message_problem(msg)
        if problem is not None:
            bad.append((line0 + i, problem))
        else:
            slow.append((i, msg))
    return (*_assemble(parts, slow, first_ch), n, bad)


def _parse_data_lines(padded: Any, tok: Any, tlen: Any, ntok: Any) -> tuple[Any, tuple[Any, ...]]:
    """Lines of the classic data shape: (valid lines, columns of the valid lines)."""
    c3 = cd._gather(padded, tok[:, 3], 2)
    ok = (tlen[:, 3] == 2) & ((c3[:, 0] == 82) | (c3[:, 0] == 84)) & (c3[:, 1] == 120)  # Rx|Tx
    ok &= (tlen[:, 4] == 1) & (padded[tok[:, 4]] == 100)  # "d"
    dlc = cd._NIB[padded[tok[:, 5]]]
    ok &= (tlen[:, 5] == 1) & (dlc < 16)
    nbytes = np.minimum(dlc, 8).astype(np.int64)  # dlc2len, at most the 8 bytes read
    ok &= ntok >= 6 + nbytes
    # channel: 1 to 3 digits, right-aligned
    cl = tlen[:, 1]
    ok &= (cl >= 1) & (cl <= 3)
    cpos = tok[:, 1] + cl - 3
    ch = _DIGIT[cd._gather(padded, cpos, 3)]
    ch[np.arange(3) < (3 - cl)[:, None]] = 0
    ok &= (ch < 10).all(axis=1)
    chan = ch[:, 0].astype(np.int64) * 100 + ch[:, 1] * 10 + ch[:, 2]
    # id: 1 to 8 hex digits, "x" after an extended one
    il = tlen[:, 2]
    iend = tok[:, 2] + il
    last = padded[iend - 1]
    ext = (last | 0x20) == 120
    hexlen = il - ext
    ok &= (hexlen >= 1) & (hexlen <= 8)
    z = cd._NIB[cd._gather(padded, iend - ext - 8, 8)]
    z[np.arange(8) < (8 - hexlen)[:, None]] = 0
    idw = np.ascontiguousarray(z).view("<u8")[:, 0]
    ok &= (idw & cd._HI4) == 0
    fid = cd._swar8(idw, 16).view(np.int64)
    ok &= fid <= 0x1FFFFFFF  # longer ids are refused (message_problem), by the slow path
    # data: bytes of exactly two hex digits
    bpos = tok[:, 6:14]
    pairs = cd._PAIR[padded[bpos].astype(np.uint16) | (padded[bpos + 1].astype(np.uint16) << 8)]
    inside = np.arange(8) < nbytes[:, None]
    ok &= ~(((tlen[:, 6:14] != 2) | (pairs < 0)) & inside).any(axis=1)
    data = np.where(inside, pairs, 0).astype(np.uint8)
    # time: digits, one dot, digits; at most 18 digits
    tl = tlen[:, 0]
    ok &= (tl >= 3) & (tl <= 19)
    t = cd._gather(padded, tok[:, 0], 19 + 8)  # 8 more: ``_decimal`` reads words in place
    dot = np.argmax(t[:, :19] == 46, axis=1)  # the first dot; any other is no digit and fails
    ok &= (dot >= 1) & (dot <= tl - 2)
    sel = np.flatnonzero(ok)
    ts = np.zeros(len(tok))
    layout = tl[sel] * 32 + dot[sel]
    for key in np.flatnonzero(np.bincount(layout)).tolist():  # a few time widths per file
        rows = sel[layout == key]
        length, d = divmod(key, 32)
        good, scaled = cd._decimal(t[rows], ((0, d), (d + 1, length)))
        ok[rows[~good]] = False
        exact = scaled.view(np.int64)
        v = exact.astype(np.float64) / float(10 ** (length - 1 - d))  # one rounding, as float()
        for i in np.flatnonzero(good & (exact >= 2**53)).tolist():
            v[i] = float(bytes(t[rows[i], :length]).decode())
        ts[rows] = v
    sel = np.flatnonzero(ok)
    if len(sel) == 0:
        return ok, ()
    return ok, (
        ts[sel],
        chan[sel],
        fid[sel],
        ext[sel],
        nbytes[sel].astype(np.uint8),
        data[sel],
    )


def _assemble(
    parts: list[tuple[Any, ...]], slow: list[tuple[int, can.Message]], first: int
) -> tuple[cd._Cols, list[str]]:
    """The block's frames in file order, with block-local channel codes: the ASC channel
    ``first`` is ``can0`` (a channel below it too: python-can's -1 is ``can0`` as well)."""
    names: list[str] = []
    code: dict[str, int] = {}

    def local(name: str) -> int:
        if name not in code:
            code[name] = len(names)
            names.append(name)
        return code[name]

    width = 64 if any(len(m.data) > 8 for _, m in slow) else 8
    cols: list[tuple[Any, ...]] = []
    for lines, ts, chan, fid, ext, dlc, data in parts:
        present = np.flatnonzero(np.bincount(chan))
        table = np.zeros(int(present[-1]) + 1, np.uint16)
        table[present] = [local(f"can{max(c - first, 0)}") for c in present.tolist()]
        z = np.zeros(len(lines), np.bool_)
        cols.append((lines, ts, table[chan], fid, ext, z, z, z, dlc, widen(data, width)))
    if slow:
        data = np.zeros((len(slow), width), np.uint8)
        for j, (_, m) in enumerate(slow):
            data[j, : len(m.data)] = np.frombuffer(bytes(m.data), np.uint8)
        cols.append(
            (
                np.array([i for i, _ in slow], np.intp),
                np.array([float(m.timestamp) for _, m in slow]),
                np.array(
                    [local(channel_name(renumbered(m.channel, first))) for _, m in slow], np.uint16
                ),
                np.array([m.arbitration_id for _, m in slow], np.int64),
                np.array([m.is_extended_id for _, m in slow], np.bool_),
                np.array([m.is_remote_frame for _, m in slow], np.bool_),
                np.array([m.is_error_frame for _, m in slow], np.bool_),
                np.array([m.is_fd for _, m in slow], np.bool_),
                np.array([len(m.data) for _, m in slow], np.uint8),
                data,
            )
        )
    if not cols:
        return cd._empty_cols(), names
    lines, ts, chan, fid, ext, rem, err, fd, dlc, data = (
        np.concatenate(c) for c in zip(*cols, strict=True)
    )
    if len(cols) > 1:
        order = np.argsort(lines, kind="stable")
        ts, chan, fid, ext, rem, err, fd, dlc, data = (
            x[order] for x in (ts, chan, fid, ext, rem, err, fd, dlc, data)
        )
    return cd._Cols(ts, chan, fid.astype(np.uint32), ext, rem, err, fd, dlc, data), names


def iter_asc(
    path: str | Path,
    stats: ReadStats,
    *,
    chunk_frames: int,
    chunk_seconds: float,
    block_bytes: int = cd.BLOCK_BYTES,
) -> Iterator[FrameBatch] | None:
    """The frames of an ASC log as chunks, or None when python-can had better read the whole
    file (a header longer than 64 KiB, lines ended by lone CRs)."""
    path = Path(path)
    fh = open(path, "rb")  # noqa: SIM115 - closed by the generator
    try:
        base, used, offset = _read_header(fh)
    except _Fallback:
        fh.close()
        return None
    except BaseException:
        fh.close()
        raise
    first = first_channel(path, offset)
    return _iter_body(
        fh, stats, base, used, offset, first, chunk_frames, chunk_seconds, block_bytes
    )


# a data line on channel 0: its time, then 0 (after CANFD, for an FD frame)
_CHANNEL_0 = re.compile(rb"[ \t]*\d+\.\d+[ \t]+(?:CANFD[ \t]+)?0[ \t]")
# a 0 between blanks, where a file has tabs (Vector's own have none: " 0 " is searched for)
_ZERO = re.compile(rb"[ \t]0[ \t]")
_FIRST_CHANNELS: dict[tuple[int, ...], int] = {}  # a file's (device, inode, size, mtime) -> it


def first_channel(path: str | Path, offset: int = 0) -> int:
    """The first channel number of an ASC log: 1 as Vector numbers them (and python-can's
    reader assumes, ``channel - 1``), or 0 for a file with a frame on channel 0, whose
    channels 0 and 1 would otherwise both be ``can0``. The file is searched (from ``offset``)
    for a 0 between blanks, spaces or tabs, and each line holding one is matched: ~1 GB/s from
    the page cache, ~150 MB/s for CAN FD lines (their flags hold " 0 "; such a file is read
    at ~10 MB/s). Once per file and version: a looped replay reads it again each time round."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, offset)
            if key not in _FIRST_CHANNELS:
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    found = _holds_channel_0(mm, offset)
                if len(_FIRST_CHANNELS) >= 64:
                    _FIRST_CHANNELS.clear()
                _FIRST_CHANNELS[key] = 0 if found else 1
    except (OSError, ValueError):  # empty, or no file to map: python-can's numbering
        return 1
    if _FIRST_CHANNELS[key] == 0:
        log.info("%s numbers its channels from 0: its channel 0 is can0", path)
    return _FIRST_CHANNELS[key]


def _holds_channel_0(mm: mmap.mmap, offset: int) -> bool:
    if mm.find(b"\t", offset) < 0:  # spaces only: the 0 searched for in C, ~1 GB/s

        def zero(at: int) -> int:
            return mm.find(b" 0 ", at)
    else:  # a blank may be a tab: one regular expression, ~150 MB/s

        def zero(at: int) -> int:
            hit = _ZERO.search(mm, at)
            return -1 if hit is None else hit.start()

    at = offset
    while (hit := zero(at)) >= 0:
        if _CHANNEL_0.match(mm, max(mm.rfind(b"\n", 0, hit) + 1, offset)):
            return True
        at = mm.find(b"\n", hit + 1)  # the next line
        if at < 0:
            break
    return False


def renumbered(channel: Any, first: int) -> Any:
    """python-can's channel of an ASC frame (the file's number - 1) counted from the file's
    first channel (``first_channel``): 0 for ``can0``."""
    return channel + 1 - first if isinstance(channel, int) else channel


def _iter_body(
    fh: Any,
    stats: ReadStats,
    base: str,
    used: int,
    offset: int,
    first: int,
    chunk_frames: int,
    chunk_seconds: float,
    block_bytes: int,
) -> Iterator[FrameBatch]:
    channels = cd._Channels()
    chunker = cd._Chunker(chunk_frames, chunk_seconds, channels, stats)
    next_line = used + 1
    with fh:
        fh.seek(offset)
        stats.bytes_read = offset
        for buf in _blocks(fh, stats, block_bytes):
            # python-can's warnings on single lines (an FD length mismatch) stay unshown, as
            # on the whole-file python-can path
            with divert_logging("can.io", logging.NullHandler()):
                cols, names, lines, bad = _parse_block(buf, base, 0, first)
            for line_no, reason in bad:
                stats.bad(next_line + line_no, reason)
            next_line += lines
            cols.chan = channels.codes(names, cols.chan)
            yield from chunker.feed(cols)
        yield from chunker.finish()
