"""The values that travel between stages.

CAN frames travel in batches of numpy columns (``FrameBatch``) so that parsing, decoding and
aggregation can all work a column at a time; a live bus produces small batches, a replay large
ones. Decoding turns a batch into time series per signal (``SignalSeries``); aggregation turns
series into ``WindowSummary`` values; only summaries (never frames, never pixels) may reach
``gateway.egress``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]
U32 = npt.NDArray[np.uint32]
BOOL = npt.NDArray[np.bool_]


def distinct(a: Any) -> Any:
    """``np.unique(a)`` of a 1-D array of finite numbers, sorted. Not ``np.unique`` itself:
    numpy 2.x's first plain call imports ``numpy.ma`` to rule out a masked array (10 ms of a
    replay's start-up), and with ``return_inverse`` it sorts twice (``searchsorted`` of the
    values in this is the inverse)."""
    s = np.sort(a)
    keep = np.ones(len(s), np.bool_)
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


@dataclass(frozen=True, slots=True)
class FrameBatch:
    """N CAN frames as columns. ``data`` is N x width (width 8, or 64 when CAN FD frames are in it);
    bytes past ``dlc`` (the data length in bytes, not the DLC code) are zero."""

    timestamp: F64
    channel: npt.NDArray[np.uint16]  # index into ``channels``
    channels: tuple[str, ...]
    arbitration_id: U32
    is_extended: BOOL
    is_remote: BOOL
    is_error: BOOL
    is_fd: BOOL
    dlc: U8
    data: U8

    def __len__(self) -> int:
        return int(self.timestamp.shape[0])

    @property
    def raw_bytes(self) -> int:
        """Payload bytes carried by these frames (what a raw upload would send): a remote
        frame's length asks for data and carries none."""
        if self.is_remote.any():
            return int(self.dlc.sum(dtype=np.int64, where=~self.is_remote))
        return int(self.dlc.sum(dtype=np.int64))

    @classmethod
    def empty(cls, channels: tuple[str, ...] = ()) -> FrameBatch:
        return cls(
            timestamp=np.empty(0, np.float64),
            channel=np.empty(0, np.uint16),
            channels=channels,
            arbitration_id=np.empty(0, np.uint32),
            is_extended=np.empty(0, np.bool_),
            is_remote=np.empty(0, np.bool_),
            is_error=np.empty(0, np.bool_),
            is_fd=np.empty(0, np.bool_),
            dlc=np.empty(0, np.uint8),
            data=np.empty((0, 8), np.uint8),
        )

    def select(self, mask: npt.NDArray[np.bool_] | npt.NDArray[np.intp]) -> FrameBatch:
        """The frames picked by a boolean mask or an index array, in that order."""
        return FrameBatch(
            timestamp=self.timestamp[mask],
            channel=self.channel[mask],
            channels=self.channels,
            arbitration_id=self.arbitration_id[mask],
            is_extended=self.is_extended[mask],
            is_remote=self.is_remote[mask],
            is_error=self.is_error[mask],
            is_fd=self.is_fd[mask],
            dlc=self.dlc[mask],
            data=self.data[mask],
        )


def widen(data: npt.NDArray[np.uint8], width: int) -> npt.NDArray[np.uint8]:
    """Frames' data bytes padded with zeros to ``width`` columns (8 to CAN FD's 64)."""
    if data.shape[1] == width:
        return data
    out = np.zeros((data.shape[0], width), np.uint8)
    out[:, : data.shape[1]] = data
    return out


@dataclass(slots=True)
class FrameBatchBuilder:
    """Collects frames one at a time (live bus, python-can readers) and emits a ``FrameBatch``."""

    channels: list[str] = field(default_factory=list)
    _ts: list[float] = field(default_factory=list)
    _ch: list[int] = field(default_factory=list)
    _id: list[int] = field(default_factory=list)
    _flags: list[tuple[bool, bool, bool, bool]] = field(default_factory=list)
    _dlc: list[int] = field(default_factory=list)
    _data: list[bytes] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._ts)

    def channel_index(self, name: str) -> int:
        try:
            return self.channels.index(name)
        except ValueError:
            self.channels.append(name)
            return len(self.channels) - 1

    def add(
        self,
        timestamp: float,
        channel: str,
        arbitration_id: int,
        data: bytes,
        *,
        is_extended: bool = False,
        is_remote: bool = False,
        is_error: bool = False,
        is_fd: bool = False,
    ) -> None:
        self._ts.append(timestamp)
        self._ch.append(self.channel_index(channel))
        self._id.append(arbitration_id)
        self._flags.append((is_extended, is_remote, is_error, is_fd))
        self._dlc.append(len(data))
        self._data.append(bytes(data))

    def add_message(self, msg: Any, channel: str) -> None:
        """A python-can ``Message`` (a reader's, a live bus's) on ``channel``."""
        self.add(
            float(msg.timestamp),
            channel,
            msg.arbitration_id,
            bytes(msg.data),
            is_extended=msg.is_extended_id,
            is_remote=msg.is_remote_frame,
            is_error=msg.is_error_frame,
            is_fd=msg.is_fd,
        )

    def build(self) -> FrameBatch:
        """Return the collected frames as a batch and start a new, empty one."""
        n = len(self._ts)
        if n == 0:
            return FrameBatch.empty(tuple(self.channels))
        width = 8 if max(self._dlc) <= 8 else 64
        buf = bytearray(n * width)
        for i, payload in enumerate(self._data):
            buf[i * width : i * width + len(payload)] = payload
        flags = np.array(self._flags, dtype=np.bool_).reshape(n, 4)
        batch = FrameBatch(
            timestamp=np.array(self._ts, np.float64),
            channel=np.array(self._ch, np.uint16),
            channels=tuple(self.channels),
            arbitration_id=np.array(self._id, np.uint32),
            is_extended=flags[:, 0].copy(),
            is_remote=flags[:, 1].copy(),
            is_error=flags[:, 2].copy(),
            is_fd=flags[:, 3].copy(),
            dlc=np.array(self._dlc, np.uint8),
            data=np.frombuffer(bytes(buf), np.uint8).reshape(n, width).copy(),
        )
        self._ts.clear()
        self._ch.clear()
        self._id.clear()
        self._flags.clear()
        self._dlc.clear()
        self._data.clear()
        return batch


class Sentinels(dict[float, str]):
    """Choices of a NUMERIC signal that name only special raw values ("SNA", "INIT"): a 10-bit
    speed with ``1023 = SNA`` is a speed, not an enumeration. Samples at these values mean "no
    valid reading": the aggregator and trip detection leave them out (counted as invalid) rather
    than averaging 511.5 km/h into a window, and the window's figures stay numbers."""

    def valid(self, values: F64) -> npt.NDArray[np.bool_]:
        """True where a sample is a reading, False where it is one of the special values (one
        comparison per value: ``np.isin`` costs ~10x more on the few values a signal names)."""
        keep = np.ones(len(values), np.bool_)
        for special in self:
            keep &= values != special
        return keep


def choices_for(
    length: int,
    choices: dict[float, str],
    *,
    raw: Sequence[int] = (),
    signed: bool = False,
    multiplexer: bool = False,
) -> dict[float, str]:
    """``Sentinels`` for a signal of 6 bits or more (64+ raw values) whose names mark special
    values only: at most two names, or names only at the edges of its raw range (``raw``, the
    named raw values: 0, the lowest, the highest two: a 12-bit torque naming 0, 4094 and 4095).
    Otherwise, and always for a multiplexer (its names name its values), the signal is an
    enumeration (gear, ignition state) and its names are its values."""
    if multiplexer or length < 6:
        return choices
    lo, hi = (-(1 << (length - 1)), (1 << (length - 1)) - 1) if signed else (0, (1 << length) - 1)
    if len(choices) <= 2 or (raw and set(raw) <= {0, lo, hi, hi - 1}):
        return Sentinels(choices)
    return choices


class SignalSeries(NamedTuple):
    """One decoded signal over a batch: timestamps and numeric values (enum signals stay
    numeric; ``choices`` maps those numbers to names).

    A named tuple, not a frozen dataclass: the vector decoder makes hundreds of these per batch,
    and a named tuple is made in a third of the time (0.26 against 0.69 us; ~5 % of the decode
    time of a 65k-frame Kona batch). It is as immutable; fields are read by name."""

    name: str  # "Message.Signal"
    timestamp: F64
    value: F64
    unit: str = ""
    choices: Mapping[float, str] | None = None


@dataclass(slots=True)
class DecodeStats:
    """What decoding could not use, counted per arbitration id; never fatal."""

    frames: int = 0
    decoded: int = 0
    unknown_id: dict[int, int] = field(default_factory=dict)
    errors: dict[int, int] = field(default_factory=dict)
    skipped_special: int = 0  # error and remote frames

    def merge(self, other: DecodeStats) -> None:
        self.frames += other.frames
        self.decoded += other.decoded
        self.skipped_special += other.skipped_special
        for mine, theirs in ((self.unknown_id, other.unknown_id), (self.errors, other.errors)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """The signal series decoded from one batch of frames, and what could not be decoded."""

    series: Sequence[SignalSeries]
    stats: DecodeStats


class Decoder(Protocol):
    """Turns a batch of frames into signal series (``CantoolsDecoder``, ``VectorDecoder``)."""

    def decode(self, batch: FrameBatch) -> DecodedBatch: ...


@dataclass(frozen=True, slots=True)
class SignalAggregate:
    """count/min/max/mean/last of one signal in one window. For enum signals ``last`` is the
    state's name and ``states`` counts samples per state name (a value without a name: the
    number itself, in both); min/max/mean are then None."""

    count: int
    min: float | None
    max: float | None
    mean: float | None
    last: float | str | None
    unit: str = ""
    states: Mapping[str | float, int] | None = None


@dataclass(frozen=True, slots=True)
class WindowSummary:
    """Every signal seen in one window ``[start, end)`` of frame time, and ``opened``, the
    gateway's clock (wall time) when the window began collecting: a sensitive signal leaves
    only under a consent valid without a break since then (-inf: not known, so only a grant
    older than the process covers it)."""

    start: float
    end: float
    signals: Mapping[str, SignalAggregate]
    opened: float = float("-inf")


@dataclass(frozen=True, slots=True)
class CameraSummary:
    """What a camera did in one window. Counts only: never pixels."""

    camera: str
    start: float
    end: float
    frames_seen: int
    frames_anonymised: int
    frames_dropped: int
    faces_blurred: int
    plates_blurred: int
    fps: float
    health: str  # "ok", "degraded", "failed"


@dataclass(slots=True)
class ReadStats:
    """What a log reader could not use. Bad lines are skipped and counted, never raised; the
    first few are remembered with their line numbers for the end-of-replay report."""

    path: str = ""
    frames: int = 0
    bad_lines: int = 0
    first_bad: list[tuple[int, str]] = field(default_factory=list)
    stopped_early: str | None = None  # a binary log whose rest could not be read
    bytes_read: int = 0  # of the file, for progress
    live: bool = False  # a live bus: what is bad is a frame (numbered from 1), not a line
    # a replay's frames whose time was far off the log's, dropped, and the times the log's time
    # went back (``canbus.timeline``), each with the first few as "frame N: ..."
    off_time: int = 0
    first_off_time: list[str] = field(default_factory=list)
    steps_back: int = 0
    first_steps: list[str] = field(default_factory=list)
    separate_clocks: bool = False  # its channels each on a clock of their own: times unchecked

    KEEP = 5

    def bad(self, line_no: int, reason: str) -> None:
        self.bad_lines += 1
        if len(self.first_bad) < self.KEEP:
            self.first_bad.append((line_no, reason))
