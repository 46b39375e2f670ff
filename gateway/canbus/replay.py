"""Recorded CAN logs in, ``FrameBatch`` chunks out, whatever the format.

candump, ASC and SavvyCAN/GVRET CSV have readers of our own (python-can has none for GVRET;
candump and the data lines of ASC are parsed with numpy, ASC's other lines by python-can); every
other format goes through python-can's readers (BLF, TRC, python-can CSV, MF4 where asammdf is
installed). A text line a reader cannot parse is
counted and skipped, and the reading goes on at the next line.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.canbus.ascfile import first_channel, iter_asc, renumbered
from gateway.canbus.candump import iter_candump
from gateway.canbus.chunking import FAST, PACED, Chunking
from gateway.canbus.gvret import iter_gvret, looks_like_gvret
from gateway.canbus.messages import (
    READ_ERRORS,
    CountingLines,
    channel_name,
    divert_logging,
    last_lines,
    looks_binary,
    message_problem,
)
from gateway.canbus.timeline import TimeLine
from gateway.errors import LogFormatError
from gateway.records import FrameBatch, FrameBatchBuilder, ReadStats

log = logging.getLogger("gateway.replay")

if TYPE_CHECKING:
    import can


class LogFormat(Enum):
    CANDUMP = "candump"
    GVRET_CSV = "gvret-csv"
    PYTHON_CAN_CSV = "python-can-csv"
    ASC = "asc"
    BLF = "blf"
    TRC = "trc"
    MF4 = "mf4"


_SUFFIXES = {
    ".log": LogFormat.CANDUMP,
    ".asc": LogFormat.ASC,
    ".blf": LogFormat.BLF,
    ".trc": LogFormat.TRC,
    ".mf4": LogFormat.MF4,
}
_TEXT_NAMES = {
    LogFormat.CANDUMP: "candump",
    LogFormat.ASC: "Vector ASC",
    LogFormat.TRC: "PEAK TRC",
    LogFormat.PYTHON_CAN_CSV: "CSV",
}
_PYTHON_CAN_CSV_HEADER = "timestamp,arbitration_id,extended,remote,error,dlc,data"


def detect_format(path: Path) -> LogFormat:
    """By suffix, confirmed or decided by the first bytes."""
    if not path.exists():
        raise LogFormatError(f"{path}: log file not found")
    if not path.is_file():
        raise LogFormatError(f"{path}: not a file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise LogFormatError(f"{path}: cannot read: {exc.strerror}") from exc
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"(\xb5/\xfd", b"PK\x03\x04")):
        # gzip, bzip2, xz, zstd, zip: read as text, a compressed log passed for a CSV file
        raise LogFormatError(
            f"{path}: a compressed file; decompress it first (e.g. gunzip -k, unzstd, unxz) "
            "and replay the log inside"
        )
    # a byte order mark (Excel's "CSV UTF-8" writes one) is not part of the first line
    # (and a line may end in a lone CR, as an old Mac's: python-can reads such a CSV)
    first = (head.splitlines() or [b""])[0].decode("utf-8", "replace").lstrip("\ufeff").strip()
    suffix = path.suffix.lower()
    named = _SUFFIXES.get(suffix, LogFormat.PYTHON_CAN_CSV if suffix == ".csv" else None)
    if named in _TEXT_NAMES:  # named as a text log
        for sig, kind, right in ((b"LOGG", "BLF", ".blf"), (b"MDF ", "MF4", ".mf4")):
            if head.startswith(sig):
                raise LogFormatError(
                    f"{path}: a {kind} file (it starts with {sig.decode()!r}), not the "
                    f"{_TEXT_NAMES[named]} log its name says: name it {path.stem}{right}"
                )
        if looks_binary(head):
            raise LogFormatError(
                f"{path}: binary data, not the {_TEXT_NAMES[named]} text log its name says"
            )
    if not head.strip() and suffix == ".csv":
        return LogFormat.PYTHON_CAN_CSV  # empty: said as any empty log is ("no frame in it")
    if suffix not in _SUFFIXES and first.startswith(";"):  # a TRC header has commas too
        return LogFormat.TRC
    if suffix not in _SUFFIXES and first.startswith(("date ", "base ")):  # so has ASC's date
        return LogFormat.ASC
    if suffix == ".csv" or (suffix not in _SUFFIXES and b"," in head[:200]):
        if looks_like_gvret(first):
            return LogFormat.GVRET_CSV
        if first.replace(" ", "").lower() == _PYTHON_CAN_CSV_HEADER:
            return LogFormat.PYTHON_CAN_CSV
        raise LogFormatError(
            f"{path}:1: unknown CSV layout (expected a SavvyCAN/GVRET header 'Time Stamp,ID,...' "
            f"or python-can's '{_PYTHON_CAN_CSV_HEADER}')"
        )
    if suffix in _SUFFIXES:
        fmt = _SUFFIXES[suffix]
        # a binary log's magic bytes, checked here: a later file of a replay that cannot be
        # read would otherwise end it midway
        magic = {LogFormat.BLF: b"LOGG", LogFormat.MF4: b"MDF "}.get(fmt)
        if magic is not None and not head.startswith(magic):
            raise LogFormatError(
                f"{path}: not a {fmt.value.upper()} file (it does not start with {magic!r})"
            )
        return fmt
    if head.startswith(b"LOGG"):
        return LogFormat.BLF
    if head.startswith(b"MDF "):
        return LogFormat.MF4
    if first.startswith("("):
        return LogFormat.CANDUMP
    if first.startswith("date ") or first.startswith("base "):
        return LogFormat.ASC
    if first.startswith(";$FILEVERSION") or first.startswith(";"):
        return LogFormat.TRC
    raise LogFormatError(
        f"{path}: unknown log format (known: candump .log, .asc, .blf, .trc, python-can .csv, "
        f"SavvyCAN/GVRET .csv, .mf4)"
    )


# python-can's binary readers
_BINARY_READERS = {LogFormat.BLF: "BLFReader", LogFormat.MF4: "MF4Reader"}

# python-can's text readers (python-can is imported when one is used: ~25 ms of start-up)
_READERS = {
    LogFormat.ASC: "ASCReader",
    LogFormat.TRC: "TRCReader",
    LogFormat.PYTHON_CAN_CSV: "CSVReader",
}


class _Header:
    """Whether an ASC or TRC reader of python-can got through its header (``_extract_header``,
    run by each new pass over the reader). Once it has, a pass after a bad data line must not
    read a header again; while it has not, the next pass goes on reading it from the line
    after the one that failed. (Skipping the rest of a header whose start time was no number
    left a TRC reader without its columns: every frame after it was dropped, uncounted.)"""

    def __init__(self, reader: Any, lines: CountingLines, stats: ReadStats, asc: bool) -> None:
        self.done = False
        self.asc = asc
        self.reader = reader
        self.unknown = 0  # TRC lines counted as bad for a type PEAK does not define
        self.nonblank = 0  # non-blank lines read by the end of the header
        self.bad = 0  # bad lines counted by then
        self._extract = reader._extract_header
        self._lines, self._stats = lines, stats
        reader._extract_header = self

    def __call__(self) -> Any:
        if self.done:
            return None
        first = self._extract()
        self.done = True
        if self.asc:  # the body: python-can passes over damaged lines of it in silence
            from gateway.canbus.ascfile import header_took_a_frame, skipped_without_a_word

            if header_took_a_frame(self._lines.last):
                self._lines.pushback.append(self._lines.last)  # a frame: read with the body

            def watch(text: str, line_no: int) -> None:
                reason = skipped_without_a_word(text)
                if reason is not None:
                    self._stats.bad(line_no, reason)

            self._lines.watch = watch
        # a TRC reader's header returns the line that ended it, which it then reads as a frame
        # (unless the file ended first: then it is the header's last comment)
        data = isinstance(first, str) and bool(first) and not first.startswith(";")
        at = None if self.asc else _trc_types(self.reader)
        if at is not None:

            def types(text: str, line_no: int) -> None:
                cols = text.split()
                if len(cols) > at and not cols[0].startswith(";"):
                    kind = cols[at]
                    if kind not in _TRC_READ and kind not in _TRC_OTHER:
                        self.unknown += 1
                        self._stats.bad(
                            line_no, f"a line of a type TRC does not define: {ascii(kind[:12])}"
                        )

            self._lines.watch = types
        self.nonblank = self._lines.nonblank - data
        self.bad = self._stats.bad_lines
        if data and self._lines.watch is not None and not self.asc:
            self._lines.watch(first, self._lines.line_no)  # read with the header, checked here
        # no data line (an empty file, a header alone, a blank line after it): nothing for
        # python-can to parse, where it would log a "Failed to parse" that counts as bad
        return first if data or not isinstance(first, str) else None

    def unsaid(self) -> int:
        """Non-blank lines after the header not counted as bad. Asked when no frame was read:
        then python-can passed over them without a word, as it does a line of a type it does
        not know (a header whose columns did not fit the lines, a lost comma, made it pass
        over them all)."""
        if not self.done:
            return 0
        return (self._lines.nonblank - self.nonblank) - (self._stats.bad_lines - self.bad)


def _resume(reader: Any, fmt: LogFormat, lines: CountingLines) -> None:
    """Make a reader whose generator died on a bad line continue at the next one: an ASC or
    TRC reader goes on with its header or its frames (``_Header``); a CSV reader must skip
    its header again."""
    if fmt is LogFormat.PYTHON_CAN_CSV:
        lines.pushback.append(_PYTHON_CAN_CSV_HEADER + "\n")


class _CountParseWarnings(logging.Handler):
    """python-can's TRC reader logs a line it cannot parse and moves on: count it as bad, in
    its words, for the file whose reader pulled that line (two logs may be read side by side:
    each handler sees every record of ``can.io``)."""

    def __init__(self, stats: ReadStats, lines: CountingLines) -> None:
        super().__init__(logging.WARNING)
        self.stats, self.lines = stats, lines

    def emit(self, record: logging.LogRecord) -> None:
        if last_lines() is not self.lines:
            return
        msg = record.getMessage()
        if "Failed to parse" in msg:
            self.stats.bad(self.lines.line_no, " ".join(msg.split())[:120])


# the record types of PEAK's TRC files (python-can reads the first set): status, error
# counters, events, error frames and warnings hold no frame to decode; a type outside both is
# a damaged line (python-can passes over it, logging only at level INFO)
_TRC_READ = {"Tx", "Rx", "DT", "FD", "FB", "FE", "BI", "RR"}
_TRC_OTHER = {"ST", "EC", "EV", "ER", "Warng", "Error"}


def _trc_types(reader: Any) -> int | None:
    """Which column of a TRC body line holds its type, by the file's version (None: the file
    has no type column, version 1.0)."""
    version = str(getattr(reader, "file_version", "")).rsplit(".", 1)[-1]
    if version in ("V2_0", "V2_1"):
        at = getattr(reader, "columns", {}).get("T")
        return at if isinstance(at, int) else None
    return {"V1_1": 2, "V1_3": 3}.get(version)


def _iter_python_can_text(path: Path, fmt: LogFormat, stats: ReadStats) -> Iterator[can.Message]:
    with open(path, encoding="utf-8-sig", errors="replace", newline=None) as fh:
        # python-can's CSV reader takes a blank line for a bad one; its other readers pass
        # over them, as the gateway's own readers do
        lines = CountingLines(fh, skip_blank=fmt is LogFormat.PYTHON_CAN_CSV)
        with divert_logging("can.io", _CountParseWarnings(stats, lines)):
            yield from _resilient(path, fmt, stats, lines)


def _resilient(
    path: Path, fmt: LogFormat, stats: ReadStats, lines: CountingLines
) -> Iterator[can.Message]:
    import can

    reader = getattr(can, _READERS[fmt])(lines)
    header = (
        _Header(reader, lines, stats, fmt is LogFormat.ASC)
        if fmt in (LogFormat.ASC, LogFormat.TRC)
        else None
    )
    last_error_line = -1
    read = 0
    while True:
        try:
            for msg in reader:
                stats.bytes_read = lines.chars
                problem = message_problem(msg)
                if problem is not None:
                    stats.bad(lines.line_no, problem)
                    continue
                read += 1
                yield msg
            # (TRC only: python-can's ASC reader passes over its blocks' own lines too)
            # lines it passed over in silence, or for a type it does not know (every line, if
            # the header's columns do not fit them)
            if header is not None and fmt is LogFormat.TRC:
                unread = header.unsaid() + header.unknown
                if not read and unread > 0:
                    stats.stopped_early = (
                        f"python-can's {_READERS[fmt]} read no frame from the {unread} line(s) "
                        "after its header: does the header fit them?"
                    )
            stats.bytes_read = lines.chars  # (a file with no frame in it too)
            return
        except READ_ERRORS as exc:
            if lines.line_no == last_error_line:
                # the reader fails again without consuming anything: give up on the rest
                stats.stopped_early = f"line {lines.line_no}: {exc}"
                return
            last_error_line = lines.line_no
            stats.bad(lines.line_no, " ".join(str(exc).split())[:120] or type(exc).__name__)
            _resume(reader, fmt, lines)


def _iter_python_can_binary(path: Path, fmt: LogFormat, stats: ReadStats) -> Iterator[can.Message]:
    try:
        import can

        # by format, not by suffix (``LogReader`` goes by the suffix: a BLF file found by its
        # magic bytes but named otherwise was refused as "unknown log format")
        reader = getattr(can, _BINARY_READERS[fmt])(str(path))
    except ImportError as exc:
        raise LogFormatError(f"{path}: reading {fmt.value} needs an extra package: {exc}") from exc
    except Exception as exc:  # python-can raises assorted errors on a corrupt header
        raise LogFormatError(f"{path}: cannot read as {fmt.value}: {exc}") from exc
    size = path.stat().st_size
    if fmt is LogFormat.BLF:
        _guard_blf_objects(reader)
    try:
        for i, msg in enumerate(reader):
            if i % 4096 == 0:
                fh = getattr(reader, "file", None)  # python-can's readers keep their file here
                stats.bytes_read = min(size, getattr(fh, "tell", lambda: 0)() or 0)
            problem = message_problem(msg)
            if problem is not None:
                stats.bad(i + 1, f"object {i + 1}: {problem}")
                continue
            yield msg
        # python-can's BLF reader ends quietly where a cut-off file ends; its header says
        # how long the file was written
        declared = getattr(reader, "file_size", None)
        if isinstance(declared, int) and declared > size:
            stats.stopped_early = (
                f"the file ends at {size:,} of the {declared:,} bytes its header declares "
                "(cut short)"
            )
    except Exception as exc:  # a corrupt object in a binary log ends what can be read
        stats.stopped_early = f"{type(exc).__name__}: {exc}"
    finally:
        stats.bytes_read = size
        reader.stop()


_BLF_OBJ_HEADER = struct.Struct("<4sHHLL")  # python-can's OBJ_HEADER_BASE_STRUCT


def _guard_blf_objects(reader: Any) -> None:
    """python-can's BLF reader steps from object to object by each one's declared size; an
    object that declares a size smaller than its own header (0, in a damaged file) is stepped
    to again and again: the replay ran at 100 % of a core for good, deaf to Ctrl-C (the
    reader runs in the event loop), or repeated one frame without end. Each container's
    objects are walked first, as the reader will walk them, and such an object ends the
    reading there ("a corrupt object" in the report), before the reader sees it."""
    parse = getattr(reader, "_parse_data", None)
    if parse is None:  # (a python-can without it: read as it reads)
        return

    def checked(data: bytes) -> Iterator[Any]:
        pos, end = 0, len(data)
        while True:  # (python-can's own walk: an object's start, after up to 4 bytes padding)
            at = data.find(b"LOBJ", pos, pos + 8)
            if at < 0 or at + _BLF_OBJ_HEADER.size > end:
                break  # (not found: python-can says so itself; or continued in the next one)
            obj_size = _BLF_OBJ_HEADER.unpack_from(data, at)[3]
            if obj_size < _BLF_OBJ_HEADER.size:
                yield from parse(data[:at])  # the objects before it are read
                raise ValueError(
                    f"a corrupt object (it declares {obj_size} bytes, less than its own "
                    "header) in a BLF container"
                )
            if at + obj_size > end:
                break
            pos = at + obj_size
        yield from parse(data)

    reader._parse_data = checked


def _batches_from_messages(
    messages: Iterator[can.Message], stats: ReadStats, chunking: Chunking
) -> Iterator[FrameBatch]:
    builder = FrameBatchBuilder()
    chunk_start: float | None = None
    for msg in messages:
        ts = float(msg.timestamp)
        if chunk_start is None:
            chunk_start = ts
        builder.add_message(msg, channel_name(msg.channel))
        stats.frames += 1
        if len(builder) >= chunking.frames or ts - chunk_start >= chunking.seconds:
            yield builder.build()
            chunk_start = None
    if len(builder):
        yield builder.build()


def _from_channel_0(messages: Iterator[can.Message]) -> Iterator[can.Message]:
    """python-can's messages of an ASC that numbers its channels from 0 (it says channel - 1)."""
    for msg in messages:
        msg.channel = renumbered(msg.channel, 0)
        yield msg


def iter_log(
    path: str | Path, stats: ReadStats | None = None, chunking: Chunking = PACED
) -> Iterator[FrameBatch]:
    """Every frame of one log file, in file order, as content-cut chunks."""
    path = Path(path)
    fmt = detect_format(path)
    stats = stats if stats is not None else ReadStats(path=str(path))
    stats.path = str(path)
    if fmt is LogFormat.GVRET_CSV:
        yield from iter_gvret(
            path, stats, chunk_frames=chunking.frames, chunk_seconds=chunking.seconds
        )
    elif fmt is LogFormat.CANDUMP:
        yield from iter_candump(
            path, stats, chunk_frames=chunking.frames, max_chunk_seconds=chunking.seconds
        )
    elif fmt is LogFormat.ASC and (
        fast := iter_asc(path, stats, chunk_frames=chunking.frames, chunk_seconds=chunking.seconds)
    ):
        yield from fast
    elif fmt in _READERS:
        messages = _iter_python_can_text(path, fmt, stats)
        if fmt is LogFormat.ASC and first_channel(path) == 0:
            messages = _from_channel_0(messages)
        yield from _batches_from_messages(messages, stats, chunking)
    else:
        yield from _batches_from_messages(
            _iter_python_can_binary(path, fmt, stats), stats, chunking
        )


def _checked(line: TimeLine, batches: Iterator[FrameBatch]) -> Iterator[tuple[bool, FrameBatch]]:
    """A log's chunks, their frames' times checked by ``line`` (``canbus.timeline``)."""
    for batch in batches:
        yield from line.feed(batch)
    yield from line.finish()


def shift(batch: FrameBatch, offset: float) -> FrameBatch:
    if offset == 0.0:
        return batch
    from dataclasses import replace

    return replace(batch, timestamp=batch.timestamp + offset)


@dataclass
class ReplaySource:
    """Replays logs one after another (and again with ``loop``), paced on the frames' own
    timestamps: ``speed=1`` is real time, ``speed=None`` as fast as possible. Pacing sleeps
    with ``asyncio.sleep`` (python-can's ``MessageSync`` would block the event loop).

    A later file, or the next lap of a loop, keeps its own times if they begin after the
    previous one ended (the next segment of a recording), else it is shifted to start just
    after, so that window time never runs backwards.

    Unpaced (``speed=None``), it never awaits between batches: its consumer yields to the event
    loop (the gateway does, between group commits that span several batches).
    """

    paths: Sequence[Path]
    speed: float | None = 1.0
    loop: bool = False
    stats: list[ReadStats] = field(default_factory=list)
    on_progress: Callable[[ReadStats, int, int], None] | None = None
    clock: Callable[[], float] = time.monotonic
    max_laps: int | None = None
    wall0: float | None = None  # clock() when the first frame was due: maps log time to wall time
    log0: float = 0.0
    laps: int = 0  # laps begun (more than 1 with ``loop``)
    # the times a log's time went back (``canbus.timeline``): the gateway closes the windows
    # open before each, as for a live bus's clock step
    clock_steps: int = 0

    @property
    def unpaced(self) -> bool:
        return self.speed is None

    def due(self, log_time: float) -> float | None:
        """The clock time at which a frame of ``log_time`` is released (paced replays)."""
        if self.wall0 is None or self.speed is None:
            return None
        return self.wall0 + (log_time - self.log0) / self.speed

    async def batches(self) -> AsyncIterator[FrameBatch]:
        offset = 0.0
        last_end: float | None = None
        wall0: float | None = None
        log0 = 0.0
        lap = 0
        while True:
            self.laps += 1
            lap_frames = 0
            # progress over all the logs of a lap, by bytes: one bar, not one per file
            sizes = [p.stat().st_size if p.exists() else 0 for p in self.paths]
            total, before = sum(sizes), 0
            for path, size in zip(self.paths, sizes, strict=True):
                stats = ReadStats(path=str(path))
                self.stats.append(stats)
                first = True
                said_step = False
                chunking = FAST if self.speed is None else PACED
                line = TimeLine(stats)
                for stepped, batch in _checked(line, iter_log(path, stats, chunking)):
                    if stepped:  # the log's time went back: the gateway closes what is open
                        self.clock_steps += 1
                        wall0 = None  # and a paced replay is paced from here on its new time
                        if not said_step:  # once a file (a log of 119 steps said 119
                            # lines, each with the total): the report counts them all
                            said_step = True
                            log.warning(
                                "%s: the log's time goes back (first: %s); the windows open "
                                "before are closed, here and at each later step back (counted "
                                "in the report)",
                                path, stats.first_steps[0],
                            )  # fmt: skip
                    if first:  # its own times if they begin after the last end, else shifted
                        # (not by the offset of a file before it: a file of absolute times
                        # after one of relative times was put that far ahead, a replay idle)
                        first = False
                        start = float(batch.timestamp[0])
                        if last_end is not None:
                            offset = 0.0 if start > last_end else last_end - start + 0.001
                    batch = shift(batch, offset)
                    if wall0 is None:
                        wall0, log0 = self.clock(), float(batch.timestamp[0])
                        self.wall0, self.log0 = wall0, log0
                    if self.speed is not None:
                        due = wall0 + (float(batch.timestamp[-1]) - log0) / self.speed
                        delay = due - self.clock()
                        import asyncio  # not at the top: parsing may start before it

                        # a turn for the other tasks even when behind the pace (a Pi asked for
                        # more than it can do): without one, nothing was published, nor an
                        # owner's command heard, until the replay caught up or ended
                        await asyncio.sleep(max(delay, 0.0))
                    last_end = (
                        float(np.max(batch.timestamp))
                        if last_end is None
                        else max(last_end, float(np.max(batch.timestamp)))
                    )
                    if self.on_progress is not None:
                        self.on_progress(stats, before + min(stats.bytes_read, size), total)
                    lap_frames += len(batch)
                    yield batch
                before += size
            lap += 1
            if not self.loop or (self.max_laps is not None and lap >= self.max_laps):
                return
            if not lap_frames:  # another lap reads nothing again, forever, never waiting
                log.warning("--loop: the log(s) hold no frames; not looping")
                return
