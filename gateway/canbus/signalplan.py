"""Compiling cantools' signal definitions into bit-extraction plans for ``VectorDecoder``.

A plan, built once per message from cantools' own codec tree (``Message._codecs``), says which
64-bit word of the payload each signal lives in, the two shifts that isolate it, how to sign-
extend and scale it exactly as cantools does, and how multiplexers route it. The execution of
plans over a batch is in ``gateway.canbus.fastdecode``.

Plans hold plain numbers and names, no cantools object: ``DbcPlans``, the plans of one DBC with
cantools' lookup by frame id, is kept in the DBC cache beside cantools' model, and a replay
that finds it there never imports cantools (nor python-can, which cantools imports): ~45 ms
less start-up here. Building a plan needs cantools; only that part imports it.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from gateway.errors import DbcError
from gateway.records import choices_for

if TYPE_CHECKING:
    from cantools.database.can import Database, Message, Signal

BoolArr = npt.NDArray[np.bool_]
Meta = dict[str, tuple[str, dict[float, str] | None]]

_EXACT = 2**53  # integers up to here are exact in float64
# larger groups of one id are faster decoded a message at a time (a signals x frames matrix):
# 32 rather than 128 took Kona 65k-frame chunks from 6.7 to 8.1M frames/s (A/B in one process)
FLAT_MAX_GROUP = 32
# the flat path costs ~0.2 ms a batch whatever it takes, a small group ~10 us as a matrix: a
# batch takes it only for this many small groups or more. A Kona batch has a handful (65k
# frames: ~8): without the flat path 16.0 -> 17.6M frames/s (A/B in one process, stop 18)
FLAT_MIN_GROUPS = 24


def _network_start(s: Signal) -> int:
    """First bit of the signal in network order (byte 0 bit 7 = 0) for big endian, else the LSB."""
    if s.byte_order == "big_endian":
        return 8 * (s.start // 8) + 7 - s.start % 8
    return int(s.start)


def signal_meta(message: Message) -> Meta:
    """``{"Msg.Sig": (unit, choices or None)}`` for one message; choices are keyed by the
    *scaled* value, the number that travels in ``SignalSeries.value``."""
    out: Meta = {}
    for s in message.signals:
        choices = (
            choices_for(
                s.length,
                {float(int(k) * s.scale + s.offset): str(v) for k, v in s.choices.items()},
                raw=[int(k) for k in s.choices],
                signed=s.is_signed,
                multiplexer=s.is_multiplexer,
            )
            if s.choices
            else None
        )
        out[f"{message.name}.{s.name}"] = (s.unit or "", choices)
    return out


def _linear(s: Signal) -> tuple[Any, Any] | None:
    """(scale, offset) as the Python objects cantools multiplies with, None if unknown."""
    from cantools.database.conversion import (
        IdentityConversion,
        LinearConversion,
        LinearIntegerConversion,
        NamedSignalConversion,
    )

    conv = s.conversion
    if isinstance(conv, NamedSignalConversion):
        conv = conv._conversion
    if isinstance(conv, IdentityConversion):
        return None if conv.is_float != s.is_float else (1, 0)
    if isinstance(conv, (LinearIntegerConversion, LinearConversion)):
        return conv.scale, conv.offset
    raise NotImplementedError(type(conv).__name__)


@dataclass
class _Row:
    """One signal definition: where its bits are and how its value is made."""

    length: int  # bits
    big: bool  # big-endian (Motorola) byte order
    signed: bool
    is_float: bool  # IEEE float16/32/64
    seq_end: int  # bits needed: the signal fits a frame of dlc bytes when dlc * 8 >= seq_end
    window: int  # first byte of the 8-byte word the bits are read from
    shl: int
    shr: int
    wide: bool  # spans 9 bytes: needs the byte after the word
    scale: Any
    offset: Any
    mode: str  # "mat": exact in float64; "float": IEEE signal; "obj": exact Python ints
    identity: bool


def _make_row(s: Signal) -> _Row:
    length = int(s.length)
    start = _network_start(s)
    lin = _linear(s)
    if lin is None or not 1 <= length <= 64:
        raise NotImplementedError("conversion")
    scale, offset = lin
    first, last = start // 8, (start + length - 1) // 8
    window = 0 if last < 8 else first
    wide = last - window >= 8
    pos = start - 8 * window
    if s.byte_order == "little_endian":
        shl, shr = (64 - pos - length, 64 - length) if not wide else (0, pos)
    else:
        shl, shr = pos, 64 - length
    identity = type(scale) is int and type(offset) is int and scale == 1 and offset == 0
    if s.is_float:
        if length not in (16, 32, 64):
            raise NotImplementedError("float length")
        mode = "float"
    elif isinstance(scale, float) or (
        isinstance(scale, int)
        and isinstance(offset, (int, float))
        and 2**length * abs(scale) + abs(offset) < _EXACT
    ):
        mode = "mat"
    else:
        mode = "obj"
    return _Row(
        length,
        s.byte_order == "big_endian",
        bool(s.is_signed),
        bool(s.is_float),
        start + length,
        window,
        shl,
        shr,
        wide,
        scale,
        offset,
        mode,
        identity,
    )


@dataclass
class _Node:
    """One level of a message's multiplexer tree: its signals and its multiplexed branches."""

    occ: list[tuple[int, str, int]]  # (row, name, dfs rank) of this node's signals
    muxes: list[tuple[int, dict[int, _Node]]]  # (multiplexer row, {mux value: child})
    fails: bool  # bitstruct cannot unpack this node's layout: every frame reaching it errs


def _layout_ok(signals: list[Signal], length: int) -> bool:
    """Whether bitstruct reads every signal of a node where the DBC puts it (no overlaps)."""
    bits = 8 * length
    big = sorted((s for s in signals if s.byte_order == "big_endian"), key=_network_start)
    pos = 0
    for s in big:
        if _network_start(s) < pos:
            return False
        pos = _network_start(s) + s.length
    end = bits
    for s in reversed([s for s in signals if s.byte_order == "little_endian"]):
        if s.start + s.length > end:
            return False
        end = s.start
    return pos <= bits and end >= 0


def _node_fails(node: Mapping[str, Any], length: int) -> bool:
    zeros = bytes(length)
    try:
        node["formats"].big_endian.unpack(zeros)
        node["formats"].little_endian.unpack(zeros)
    except Exception:  # bitstruct raises its own errors, or ValueError; cantools counts them
        return True
    return False


@dataclass
class _Plan:
    """How the vector decoder extracts every signal of one message (or hands it to cantools).
    ``flat`` and ``setup`` belong to one decoder (its wanted signals): a decoder works on its
    own copy of a plan it takes from a ``DbcPlans``."""

    name: str  # the message's
    length: int  # the message's, in bytes
    fallback: bool = False
    rows: list[_Row] = field(default_factory=list)
    root: _Node | None = None
    all_fit_bytes: int = 0  # a frame with this many bytes holds every signal
    muxed: bool = False
    meta: dict[str, tuple[str, dict[float, str] | None]] = field(default_factory=dict)
    flat: int = -1  # index in the decoder's flat tables, when the message qualifies
    setup: tuple[set[int], list[int], int, bool] | None = None  # see _group_setup


def _is_flat(plan: _Plan) -> bool:
    """Plain messages (no multiplexer, 8 bytes, signals exact in float64) that small groups
    decode all together, one numpy operation for every (frame, signal) pair of the batch."""
    return (
        not plan.fallback
        and plan.root is not None
        and not plan.muxed
        and not plan.root.fails
        and plan.length <= 8
        and all(r.mode == "mat" and r.window == 0 and not r.wide for r in plan.rows)
    )


def _build_plan(msg: Message) -> _Plan:
    plan = _Plan(msg.name, int(msg.length), meta=signal_meta(msg))
    if msg.is_container or msg._codecs is None:
        plan.fallback = True
        return plan
    row_of: dict[int, int] = {}
    rank = [0]

    def row(s: Signal) -> int:
        if id(s) not in row_of:
            row_of[id(s)] = len(plan.rows)
            plan.rows.append(_make_row(s))
        return row_of[id(s)]

    def names(node: Mapping[str, Any]) -> set[str]:
        own = {s.name for s in node["signals"]}
        if len(own) != len(node["signals"]):
            raise NotImplementedError("duplicate name")
        for branches in node["multiplexers"].values():
            below: set[str] = set().union(*(names(c) for c in branches.values()))
            if below & own:
                raise NotImplementedError("duplicate name")
            own |= below
        return own

    def build(node: Mapping[str, Any]) -> _Node:
        fails = _node_fails(node, msg.length)
        if not fails and not _layout_ok(node["signals"], msg.length):
            raise NotImplementedError("overlapping signals")
        occ = []
        for s in node["signals"]:
            occ.append((row(s), s.name, rank[0]))
            rank[0] += 1
        muxes = []
        for mux_name, branches in node["multiplexers"].items():
            mux_row = row(next(s for s in node["signals"] if s.name == mux_name))
            r = plan.rows[mux_row]
            if r.mode != "mat" or r.length > 62:
                raise NotImplementedError("multiplexer")
            muxes.append((mux_row, {int(k): build(c) for k, c in branches.items()}))
        return _Node(occ, muxes, fails)

    try:
        names(msg._codecs)
        plan.root = build(msg._codecs)
    except NotImplementedError:
        plan.fallback = True
        return plan
    plan.muxed = bool(plan.root.muxes)
    plan.all_fit_bytes = max((-(-r.seq_end // 8) for r in plan.rows), default=0)
    return plan


class DbcPlans:
    """What the vector decoder needs of one DBC, in plain data: every message's plan, by
    message number, and cantools' lookup of a message by frame id. ``of(db)`` makes it from
    cantools' model and builds each plan on first use; ``of(db, build=True)`` builds them all,
    to be pickled into the DBC cache and read back without cantools. ``database`` gives
    cantools' model on demand, for the messages cantools decodes itself (``fallback``)."""

    def __init__(
        self,
        mask: int,
        ids: dict[int, int],
        names: list[str],
        plans: list[_Plan | bytes | None],
    ) -> None:
        self.mask = mask  # cantools' frame id mask of the database
        self.ids = ids  # masked frame id (bit 31 set: extended) -> message number
        self.names = names  # message names, by number
        self.plans = plans  # None: not built yet; bytes: pickled, read on first use
        # whether decoding may need cantools' model: a message cantools decodes itself, or a
        # plan not built yet (or whose build failed, to fail again where it is used)
        self.needs_model = any(not isinstance(p, _Plan) or p.fallback for p in plans)
        self.database: Callable[[], Database] | None = None

    @classmethod
    def of(cls, db: Database, *, build: bool = False) -> DbcPlans:
        msgs = db.messages
        number = {id(m): i for i, m in enumerate(msgs)}
        out = cls(
            int(db._frame_id_mask),
            {int(k): number[id(m)] for k, m in db._frame_id_to_message.items()},
            [m.name for m in msgs],
            [None] * len(msgs),
        )
        out.database = lambda: db
        if build:
            for i, m in enumerate(msgs):
                try:
                    out.plans[i] = _build_plan(m)
                except Exception:  # noqa: BLE001 - left to be built (and to fail) where used
                    out.plans[i] = None
            out.needs_model = any(not isinstance(p, _Plan) or p.fallback for p in out.plans)
        return out

    def number(self, frame_id: int) -> int | None:
        """The message ``get_message_by_frame_id(frame_id)`` returns, by number (None where it
        raises KeyError): an id above 0x7FF is looked up as extended, whatever the frame says."""
        if frame_id > 0x7FF:
            frame_id |= 0x80000000
        return self.ids.get(frame_id & (0x80000000 | self.mask))

    def plan(self, number: int) -> _Plan:
        plan = self.plans[number]
        if isinstance(plan, bytes):
            try:
                plan = pickle.loads(plan)
            except Exception:  # noqa: BLE001 - a damaged entry: built again below
                plan = None
            if not isinstance(plan, _Plan):
                plan = None
            self.plans[number] = plan
        if plan is None:
            plan = self.plans[number] = _build_plan(self.message(number))
        return plan

    def message(self, number: int) -> Message:
        """cantools' own message (which imports cantools, and may read the DBC again)."""
        if self.database is None:
            raise RuntimeError("these plans have no DBC to load cantools' model from")
        msgs = self.database().messages
        if len(msgs) != len(self.names) or msgs[number].name != self.names[number]:
            raise DbcError(f"a DBC changed while in use (message {self.names[number]})")
        return msgs[number]

    def __getstate__(self) -> dict[str, Any]:
        """Each plan pickled on its own, read when its message is first met: a replay of a few
        messages of the Model 3 DBC (148) reads 8 of them (1 ms instead of 10 for all)."""
        state = {k: v for k, v in self.__dict__.items() if k != "database"}
        state["plans"] = [
            pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL) if isinstance(p, _Plan) else p
            for p in self.plans
        ]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, database=None)


def _words(data: npt.NDArray[np.uint8], rows: list[_Row]) -> dict[tuple[int, bool], Any]:
    """The 8-byte words the rows read, little- and big-endian, keyed by (first byte, big)."""
    out: dict[tuple[int, bool], Any] = {}
    for r in rows:
        big = r.big
        if (r.window, big) in out:
            continue
        le = out.get((r.window, False))
        if le is None:
            le = np.ascontiguousarray(data[:, r.window : r.window + 8]).view("<u8").ravel()
            out[(r.window, False)] = le
        if big:
            out[(r.window, True)] = le.byteswap()
    return out


def _raw(r: _Row, words: dict[tuple[int, bool], Any], data: npt.NDArray[np.uint8] | None) -> Any:
    """The signal's raw bits, sign-extended to int64 when signed (uint64 otherwise). ``data``
    (the frames' bytes) is read only for a signal that reaches past its 8-byte window."""
    big = r.big
    w = words[(r.window, big)]
    n = r.length
    if not r.wide:
        u = w << np.uint64(r.shl)
    else:
        assert data is not None, "a wide signal needs the frames' bytes"
        extra = data[:, r.window + 8].astype(np.uint64)
        if big:
            u = (w << np.uint64(r.shl)) | (extra >> np.uint64(8 - r.shl))
        else:
            u = ((w >> np.uint64(r.shr)) | (extra << np.uint64(64 - r.shr))) << np.uint64(64 - n)
    if r.signed and not r.is_float:
        return u.view(np.int64) >> np.int64(64 - n)
    return u >> np.uint64(64 - n)


def as_float(value: Any) -> float:
    """A decoded value as float64: an exact integer past float64's range (a DBC's scale of
    1E300, taken as an integer) is infinity of its sign, where ``float`` raises."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _values(r: _Row, raw: Any) -> npt.NDArray[np.float64]:
    if r.mode == "float":
        n = r.length
        with np.errstate(all="ignore"):  # NaN and inf are values here, as in cantools
            v = (
                raw.astype({16: np.uint16, 32: np.uint32, 64: np.uint64}[n])
                .view({16: np.float16, 32: np.float32, 64: np.float64}[n])
                .astype(np.float64)
            )
            if n == 16:  # cantools (bitstruct) reads a half NaN as the plain NaN, signed
                v = np.where(np.isnan(v), np.copysign(np.nan, v), v)
            return v if r.identity else v * r.scale + r.offset
    if r.mode == "obj":
        scale, offset = r.scale, r.offset
        return np.array([as_float(x * scale + offset) for x in raw.tolist()], np.float64)
    v = raw.astype(np.float64)
    return v if r.identity else v * float(r.scale) + float(r.offset)


def _mux_numbers(r: _Row, raw: Any) -> Any:
    """``int(scaled value)`` of a multiplexer, as cantools' ``_get_mux_number`` computes it."""
    if isinstance(r.scale, int) and isinstance(r.offset, int):
        return raw.astype(np.int64) * r.scale + r.offset
    return np.trunc(_values(r, raw))
