"""SavvyCAN / GVRET CSV logs, which python-can cannot read.

Columns are found by header name (``Time Stamp,ID,Extended,Bus,LEN,D1..D8``; some files add
``Dir``, some use ``Dir``/``Direction`` or more data columns for CAN FD). Times are microseconds.
Bus N becomes channel ``canN``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from gateway.canbus.chunking import CHUNK_FRAMES, CHUNK_SECONDS
from gateway.canbus.messages import READ_ERRORS
from gateway.errors import LogFormatError
from gateway.records import FrameBatch, FrameBatchBuilder, ReadStats

_TRUE = {"true", "1", "yes", "t"}
_LENGTHS = {*range(9), 12, 16, 20, 24, 32, 48, 64}  # classic CAN and CAN FD data lengths


def looks_like_gvret(first_line: str) -> bool:
    cols = [c.strip().lower() for c in first_line.split(",")]
    return "time stamp" in cols and "id" in cols and ("bus" in cols or "len" in cols)


def iter_gvret(
    path: str | Path,
    stats: ReadStats,
    *,
    chunk_frames: int = CHUNK_FRAMES,
    chunk_seconds: float = CHUNK_SECONDS,
) -> Iterator[FrameBatch]:
    path = Path(path)
    try:
        fh: TextIO = open(path, encoding="utf-8-sig", errors="replace", newline="")  # noqa: SIM115
    except OSError as exc:
        raise LogFormatError(f"{path}: cannot open: {exc.strerror}") from exc
    with fh:
        header = fh.readline()
        if not looks_like_gvret(header):
            raise LogFormatError(f"{path}:1: not a SavvyCAN/GVRET CSV header: {header[:60]!r}")
        cols = [c.strip().lower() for c in header.split(",")]
        i_ts, i_id = cols.index("time stamp"), cols.index("id")
        i_ext = cols.index("extended") if "extended" in cols else None
        i_bus = cols.index("bus") if "bus" in cols else None
        i_len = cols.index("len") if "len" in cols else None
        i_data = [i for i, c in enumerate(cols) if c.startswith("d") and c[1:].isdigit()]
        if not i_data:
            raise LogFormatError(f"{path}:1: no data columns (D1, D2, ...) in the header")
        first_data = i_data[0]
        builder = FrameBatchBuilder()
        chunk_start = None
        stats.bytes_read = len(header)
        for line_no, line in enumerate(fh, start=2):
            stats.bytes_read += len(line)
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split(",")
            try:
                ts = int(parts[i_ts]) / 1e6
                fid = int(parts[i_id], 16)
                ext = parts[i_ext].strip().lower() in _TRUE if i_ext is not None else fid > 0x7FF
                bus = int(parts[i_bus]) if i_bus is not None else 0
                n = int(parts[i_len]) if i_len is not None else len(parts) - first_data
                if n not in _LENGTHS:
                    raise ValueError(f"data length {n} is not a CAN or CAN FD length")
                if first_data + n > len(parts):
                    raise ValueError(f"length {n} does not match the data columns")
                data = bytes(int(b, 16) for b in parts[first_data : first_data + n])
                if fid < 0 or fid > (0x1FFFFFFF if ext else 0x7FF):
                    raise ValueError(f"id {fid:X} out of range")
            except READ_ERRORS as exc:  # a time of 400 digits overflows the division, too
                stats.bad(line_no, str(exc) or type(exc).__name__)
                continue
            if chunk_start is None:
                chunk_start = ts
            builder.add(ts, f"can{bus}", fid, data, is_extended=ext, is_fd=n > 8)
            stats.frames += 1
            if len(builder) >= chunk_frames or ts - chunk_start >= chunk_seconds:
                yield builder.build()
                chunk_start = None
        if len(builder):
            yield builder.build()
