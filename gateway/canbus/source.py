"""Live CAN buses through any python-can interface (socketcan can0/vcan0 on a Pi, virtual in
tests), handed on as batches of frames.

Every bus is read by a thread of its own (``bus.recv``), which hands what it read to the event
loop in lists, with this machine's clock at the moment of reading. The buses of one
``LiveBusSource`` are one stream: one aggregator and one trip detector see all of them, as a
replay's channels are (two sources would each summarise the same windows).

What a bus does wrong is counted and said, never fatal to the gateway:

- **A receive error** (socketcan's "Network is down" when a controller goes bus-off and is
  restarted, a USB adapter pulled out): one line, and the bus is opened again after 0.5 s,
  then with a doubling wait up to 30 s, as long as the gateway runs. python-can's ``Notifier``
  ends its thread at the first such error (with a traceback, and nothing read after it).
- **A frame's time**: a bus stamps its frames with a clock of its own (the system clock for
  socketcan, an adapter's for others), which is compared with this machine's monotonic clock
  (which no one sets). A time that is not a number (NaN, infinite) or more than ``max_skew``
  seconds off the bus's clock as last seen is dropped and counted (one such frame would close
  or hold every window); when ``STEP_FRAMES`` frames in a row agree on a new clock, the clock
  was stepped (NTP setting the time of a Pi, which has no real-time clock, after boot; with
  socketcan the frames' times step with it): the frames before the step are handed on, then the
  new times are taken, counted in ``clock_steps``, and the gateway closes the windows open
  before the step (a step back would otherwise make every sample late until the clock caught
  up).
- **A bus that goes silent**: while no frame comes, an empty batch every ``tick`` seconds
  carries the time (``now()``, the bus's clock), so the windows the silence passes close on
  time, not at the next frame (the last one of a drive would wait for the next ignition).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import can

from gateway.canbus.timeline import MAX_SKEW, STEP_FRAMES
from gateway.errors import InputError
from gateway.records import FrameBatch, FrameBatchBuilder, ReadStats

log = logging.getLogger(__name__)

# STEP_FRAMES (from ``timeline``, which judges a replayed log's time the same way): frames in a
# row, all off the bus's clock as last seen and agreeing (within ``max_skew``) on a new one: the
# clock was stepped, not a frame damaged
REOPEN_FIRST_S = 0.5
REOPEN_MAX_S = 30.0
_RECV_S = 0.1  # a reading thread looks at its stop flag this often


@dataclass(frozen=True)
class BusSpec:
    """One live bus: a python-can interface and channel, and the name the DBCs know it by."""

    interface: str
    channel: str
    bitrate: int = 0
    name: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)  # more keyword args of can.Bus

    @property
    def label(self) -> str:
        return self.name or self.channel

    def open(self) -> can.BusABC:
        kwargs: dict[str, Any] = dict(self.options)
        if self.bitrate:
            kwargs["bitrate"] = self.bitrate
        try:
            return can.Bus(interface=self.interface, channel=self.channel, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a driver raises what it likes (kvaser: NameError)
            why = " ".join(str(exc).split()) or type(exc).__name__
            raise InputError(
                f"CAN bus {self.interface}:{self.channel}: cannot open: {why}"
            ) from exc


@dataclass
class _Bus:
    """A bus being read: its thread, and what is known of its clock."""

    spec: BusSpec
    stats: ReadStats
    bus: can.BusABC | None = None
    thread: threading.Thread | None = None
    halt: threading.Event = field(default_factory=threading.Event)
    offset: float | None = None  # the bus's clock minus this machine's monotonic one
    candidate: tuple[float, int] | None = None  # a new offset, and the frames that agree on it
    reopen_at: float | None = None  # (event loop time) a failed bus is opened again then
    delay: float = REOPEN_FIRST_S
    frames: int = 0


@dataclass
class LiveBusSource:
    """Live CAN buses read through python-can, as one stream of batches."""

    buses: Sequence[BusSpec]
    stop: asyncio.Event | None = None
    max_batch: int = 512
    max_wait: float = 0.05
    tick: float = 0.5  # an empty batch this often while no frame comes (see now())
    # a frame this far off its bus's clock is dropped (None: times are taken as they come, as
    # a bench that sends a drive's frames faster than real time needs)
    max_skew: float | None = MAX_SKEW
    errors: int = 0  # receive errors (each followed by opening the bus again)
    reopened: int = 0  # buses opened again after an error
    clock_steps: int = 0
    stats: list[ReadStats] = field(default_factory=list)
    _open: list[_Bus] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stats = [
            ReadStats(path=f"CAN bus {b.label} ({b.interface}:{b.channel})", live=True)
            for b in self.buses
        ]

    def open(self) -> None:
        """Open every bus now (``batches`` does, if not done before): a bus that cannot be
        opened is an ``InputError`` before anything else starts."""
        if self._open:
            return
        opened: list[_Bus] = []
        try:
            for spec, stats in zip(self.buses, self.stats, strict=True):
                opened.append(_Bus(spec, stats, bus=spec.open()))
        except InputError:
            for b in opened:
                _shutdown(b)
            raise
        self._open = opened

    @property
    def labels(self) -> list[str]:
        """The buses' names: the health summaries list each, a silent one at 0 frames/s."""
        return [b.label for b in self.buses]

    def close(self) -> None:
        """Close what ``open`` opened (``batches`` closes its buses when it ends)."""
        for b in self._open:
            _shutdown(b)
        self._open = []

    def now(self) -> float | None:
        """This moment on the buses' clocks (the earliest of them), None before any frame."""
        offsets = [b.offset for b in self._open if b.offset is not None]
        return time.monotonic() + min(offsets) if offsets else None

    async def batches(self) -> AsyncIterator[FrameBatch]:
        self.open()
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[_Bus, float, list[can.Message] | BaseException]] = (
            asyncio.Queue()
        )
        stop = self.stop or asyncio.Event()
        builder = FrameBatchBuilder()
        for b in self._open:
            self._start(b, loop, inbox)
        next_tick = loop.time() + self.tick
        # what was taken from the inbox and not yet handled: a full batch, or a clock step,
        # leaves the rest of a list here for the next batch
        pending: collections.deque[tuple[_Bus, float, Any]] = collections.deque()
        try:
            while not stop.is_set():
                if not pending:
                    with contextlib.suppress(TimeoutError):
                        pending.append(await asyncio.wait_for(inbox.get(), self.max_wait))
                while not inbox.empty():
                    pending.append(inbox.get_nowait())
                step: _Bus | None = None
                while pending and len(builder) < self.max_batch and step is None:
                    b, mono, got = pending.popleft()
                    if isinstance(got, BaseException):
                        self._failed(b, got, loop)
                        continue
                    rest, stepped = self._take(b, mono, got, builder)
                    if rest:
                        pending.appendleft((b, mono, rest))
                    if stepped:
                        step = b
                self._reopen_due(loop, inbox)
                if len(builder):
                    next_tick = loop.time() + self.tick
                    yield builder.build()  # (before a step: the frames of the old clock)
                elif loop.time() >= next_tick:
                    next_tick = loop.time() + self.tick
                    yield FrameBatch.empty(tuple(builder.channels))
                if step is not None:
                    self._step(step)
        finally:
            for b in self._open:
                b.halt.set()
            for b in self._open:
                if b.thread is not None:
                    b.thread.join(timeout=2 * _RECV_S + 1)
            self.close()

    # -- reading ---------------------------------------------------------------------------
    def _start(self, b: _Bus, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue[Any]) -> None:
        b.halt = threading.Event()
        b.thread = threading.Thread(
            target=_read, args=(b, b.bus, b.halt, loop, inbox, self.max_batch),
            name=f"can-{b.spec.label}", daemon=True,
        )  # fmt: skip
        b.thread.start()

    def _failed(self, b: _Bus, exc: BaseException, loop: asyncio.AbstractEventLoop) -> None:
        self.errors += 1
        _shutdown(b)
        b.reopen_at = loop.time() + b.delay
        why = " ".join(str(exc).split()) or type(exc).__name__
        log.warning(
            "CAN bus %s (%s:%s): receive failed: %s; opening it again in %.1f s",
            b.spec.label, b.spec.interface, b.spec.channel, why, b.delay,
        )  # fmt: skip
        # the wait doubles until the bus delivers a frame again (``_take``): one that opens
        # and fails at once (an interface that is down) is not reopened every 0.5 s forever
        b.delay = min(b.delay * 2, REOPEN_MAX_S)

    def _reopen_due(self, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue[Any]) -> None:
        for b in self._open:
            if b.reopen_at is None or loop.time() < b.reopen_at:
                continue
            try:
                b.bus = b.spec.open()
            except InputError as exc:
                b.reopen_at = loop.time() + b.delay
                log.warning("%s; trying again in %.1f s", exc, b.delay)
                b.delay = min(b.delay * 2, REOPEN_MAX_S)
                continue
            b.reopen_at = None
            self.reopened += 1
            log.warning("CAN bus %s: open again, reading", b.spec.label)
            self._start(b, loop, inbox)

    def _take(
        self, b: _Bus, mono: float, msgs: list[can.Message], builder: FrameBatchBuilder
    ) -> tuple[list[can.Message], bool]:
        """Add ``msgs`` (read at ``mono``) to ``builder`` until it holds ``max_batch`` frames
        or a clock step is sure; returns the messages not handled yet, and whether a step
        waits (``_step``, once the frames before it are handed on)."""
        label = b.spec.label
        for k, msg in enumerate(msgs):
            if len(builder) >= self.max_batch:
                return msgs[k:], False
            ts = float(msg.timestamp)
            verdict = self._on_clock(b, ts, mono)
            if verdict == "step":
                return msgs[k:], True
            b.frames += 1
            if verdict == "drop":
                b.stats.bad(b.frames, self._why_dropped(b, ts, mono))
                continue
            b.stats.frames += 1
            b.delay = REOPEN_FIRST_S  # it delivers: a later error waits the shortest again
            builder.add_message(msg, label)
        return [], False

    def _on_clock(self, b: _Bus, ts: float, mono: float) -> str:
        """ "take", "drop" or "step" (see the module's docstring) for a frame of time ``ts``
        read at ``mono`` on this machine's monotonic clock."""
        if not math.isfinite(ts):
            return "drop"
        d = ts - mono
        if b.offset is None:
            b.offset = d
            late = ts - time.time()
            if abs(late) > 86_400:
                log.warning(
                    "CAN bus %s: its frames are stamped %.1f days %s this machine's clock; the "
                    "summaries carry the bus's times",
                    b.spec.label, abs(late) / 86_400, "ahead of" if late > 0 else "behind",
                )  # fmt: skip
            return "take"
        skew = self.max_skew
        if skew is None or abs(d - b.offset) <= skew:
            b.offset, b.candidate = d, None
            return "take"
        if b.candidate is not None and abs(d - b.candidate[0]) <= skew:
            b.candidate = (d, b.candidate[1] + 1)
        else:
            b.candidate = (d, 1)
        return "step" if b.candidate[1] >= STEP_FRAMES else "drop"

    @staticmethod
    def _why_dropped(b: _Bus, ts: float, mono: float) -> str:
        if not math.isfinite(ts):
            return f"frame time {ts}: not a time"
        assert b.offset is not None
        return f"frame time {ts:.6f}: {ts - mono - b.offset:+.1f} s off the bus's clock"

    def _step(self, b: _Bus) -> None:
        """The clock of ``b`` was stepped: its new offset is taken from now on."""
        assert b.candidate is not None and b.offset is not None
        log.warning(
            "CAN bus %s: its clock stepped by %+.1f s (%d frames in a row agree); the windows "
            "open before the step are closed",
            b.spec.label, b.candidate[0] - b.offset, STEP_FRAMES,
        )  # fmt: skip
        b.offset, b.candidate = b.candidate[0], None
        self.clock_steps += 1


def _read(
    b: _Bus,
    bus: can.BusABC | None,
    halt: threading.Event,
    loop: asyncio.AbstractEventLoop,
    inbox: asyncio.Queue[Any],
    most: int,
) -> None:
    """A bus's reading thread: lists of frames (up to ``most``) with the time they were read
    (the monotonic clock);
    a receive error is handed on and ends the thread (the bus is opened again)."""

    def hand(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the gateway is gone
            loop.call_soon_threadsafe(inbox.put_nowait, item)

    if bus is None:
        return
    got: list[can.Message] = []
    wall = 0.0
    try:
        while not halt.is_set():
            msg = bus.recv(_RECV_S)
            if msg is None:
                continue
            wall = time.monotonic()
            got = [msg]
            while len(got) < most and (more := bus.recv(0)) is not None:
                got.append(more)
            hand((b, wall, got))
            got = []
    except Exception as exc:  # noqa: BLE001 - any driver's failure is said, and the bus reopened
        if got:  # what was read before the error is handed on first
            hand((b, wall, got))
        if not halt.is_set():
            hand((b, time.monotonic(), exc))


def _shutdown(b: _Bus) -> None:
    if b.thread is not None:
        b.halt.set()
    bus, b.bus = b.bus, None
    if bus is not None:
        with contextlib.suppress(Exception):
            bus.shutdown()
