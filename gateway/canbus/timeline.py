"""A replayed log's frame times, checked as a live bus's are (``source.py``), by the log's own
time instead of this machine's clock.

A frame whose time is far off the log's (more than ``MAX_SKEW`` seconds from the last frame
taken) is damaged if the log's time comes back within ``STEP_FRAMES`` frames: one frame
stamped a day ahead closed every window open (their later samples counted late, their
summaries lost) and held a paced replay for a day. Such frames are dropped, counted and said,
as a bad line is. If the time does not come back, it did move: a gap (the car was off; a
sparse log, one frame a minute), or, backwards, a log of two recordings; both are taken, and
a step back is counted (``steps_back``), so that the gateway closes the windows open before
it (every later sample would otherwise be late). Where the log is dense (the run before has
``STEP_FRAMES`` frames or more), a short run far off at its very end, or a short first run
followed by a long one off its time, is damaged too; in a sparse stretch a frame far from the
one before is taken at once. A log whose buses each run on a clock of their own (a chunk of
many runs whose channels are each consistent) is not checked: ``separate_clocks``.

The decisions depend on the frames only, never on where the reader cut its chunks: frames off
the log's time at the end of a chunk, too few yet to tell, wait for the next chunk's (they
are ``held``), so ``--fast`` and ``--speed X`` drop and keep the same frames.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from gateway.records import FrameBatch, ReadStats, widen

# a frame more than this many seconds from the one before it is off the log's time (as a live
# bus's frame this far off the bus's clock is, ``LiveBusSource.max_skew``)
MAX_SKEW = 10.0
# frames in a row off the log's time and agreeing on a new one: the time moved, no frame was
# damaged (as for a live bus's clock step)
STEP_FRAMES = 20


@dataclass
class TimeLine:
    """The time of one log, frame by frame (see the module). ``feed`` each chunk in file
    order, then ``finish``; each yields ``(stepped_back, frames)``: the frames to hand on, and
    whether the log's time went back right before them. What it drops and the steps back are
    counted in ``stats`` (``off_time``, ``steps_back``, ``separate_clocks``)."""

    stats: ReadStats
    skew: float = MAX_SKEW
    last: float | None = None  # the time of the last frame taken
    dense: int = 0  # frames in the run the last frame taken ends (counted up to STEP_FRAMES)
    _held: FrameBatch | None = None  # frames at a chunk's end, too few yet to tell
    _seen: int = 0  # frames of the file before the current chunk (held frames not counted)

    def feed(self, batch: FrameBatch) -> Iterator[tuple[bool, FrameBatch]]:
        if len(batch) == 0:
            return
        if self._held is not None:
            batch, self._held = _concat(self._held, batch), None
        ts = batch.timestamp
        if not self.stats.separate_clocks:  # (else: not checked, see the module)
            if self.last is None or not abs(float(ts[0]) - self.last) <= self.skew:
                yield from self._runs(batch, final=False)
                return
            d = np.diff(ts)
            # the usual chunk: one run on the log's time (fmax/fmin pass over a time that is
            # not a number, which the aggregator counts; NaN first: the general way)
            if d.size and not (
                float(np.fmax.reduce(d)) <= self.skew and -float(np.fmin.reduce(d)) <= self.skew
            ):  # (not: a NaN compares false, and goes the general way)
                yield from self._runs(batch, final=False)
                return
        last = float(ts[-1])
        if last != last:  # (NaN)
            last = float(np.fmax.reduce(ts))
        if last == last:
            self.last = last
        self.dense = min(STEP_FRAMES, self.dense + len(batch))
        self._seen += len(batch)
        yield False, batch

    def finish(self) -> Iterator[tuple[bool, FrameBatch]]:
        """What is still held at the end of the file, decided without what would follow."""
        held, self._held = self._held, None
        if held is not None:
            yield from self._runs(held, final=True)

    def _runs(self, batch: FrameBatch, *, final: bool) -> Iterator[tuple[bool, FrameBatch]]:
        """The general way: the chunk's runs of frames (consecutive times within ``skew``),
        each taken, dropped or held."""
        ts = batch.timestamp
        finite = np.flatnonzero(np.isfinite(ts))
        keep = np.ones(len(batch), np.bool_)
        cuts: list[int] = []  # where a step back begins (an index into ``batch``)
        hold_from = len(batch)
        if finite.size:
            t = ts[finite]
            breaks = (np.flatnonzero(np.abs(np.diff(t)) > self.skew) + 1).tolist()
            runs = list(zip([0, *breaks], [*breaks, t.size], strict=True))
            if len(runs) > STEP_FRAMES and _separate_clocks(batch, finite, self.skew, len(runs)):
                # each channel on a clock of its own (a log merged from buses that were not
                # synchronised): there is no one time of the log to judge a frame by
                self.stats.separate_clocks = True
                self._seen += len(batch)
                yield False, batch
                return

            def drop(lo: int, hi: int) -> None:
                idx = finite[lo:hi]
                keep[idx] = False
                self.stats.off_time += idx.size
                ref = self.last if self.last is not None else float(t[hi])
                for i in idx.tolist()[: ReadStats.KEEP]:
                    off = float(ts[i]) - ref
                    self._note(self.stats.first_off_time, i, f"time {ts[i]:.6f}, {off:+.1f} s")

            k = 0
            while k < len(runs):
                lo, hi = runs[k]
                first, last, n = float(t[lo]), float(t[hi - 1]), hi - lo
                if self.last is None:
                    # the file's first run: damaged if short and followed by a run of
                    # STEP_FRAMES or more (a sparse log's next run is short too: taken)
                    if n < STEP_FRAMES and k + 1 < len(runs):
                        nxt = runs[k + 1][1] - runs[k + 1][0]
                        if nxt >= STEP_FRAMES:
                            drop(lo, hi)
                            k += 1
                            continue
                        if k + 2 == len(runs) and not final:
                            hold_from = int(finite[lo])  # the next run may grow: wait
                            break
                    elif n < STEP_FRAMES and not final:
                        hold_from = int(finite[lo])
                        break
                    self.last, self.dense = last, min(n, STEP_FRAMES)
                    k += 1
                    continue
                if abs(first - self.last) <= self.skew:  # on the log's time
                    self.last, self.dense = last, min(self.dense + n, STEP_FRAMES)
                    k += 1
                    continue
                # off the log's time: dropped if the time comes back within STEP_FRAMES
                # frames (damaged times), else taken (a gap, or a step back). In a sparse
                # stretch (the run before is short) every frame may be far from the one before:
                # taken at once (a paced replay would hold it until STEP_FRAMES more came)
                back, count = None, 0
                for j in range(k, len(runs) if self.dense >= STEP_FRAMES else k):
                    if abs(float(t[runs[j][0]]) - self.last) <= self.skew:
                        back = j
                        break
                    count += runs[j][1] - runs[j][0]
                    if count >= STEP_FRAMES:
                        break
                if back is not None:
                    drop(lo, runs[back][0])
                    k = back
                    continue
                if count < STEP_FRAMES and self.dense >= STEP_FRAMES:
                    if not final:
                        hold_from = int(finite[lo])  # what follows decides: wait for it
                        break
                    drop(lo, t.size)  # the end of a dense log: nothing follows it
                    break
                if first < self.last:  # a step back (a gap forward needs no word)
                    cuts.append(int(finite[lo]))
                    self.stats.steps_back += 1
                    self._note(self.stats.first_steps, finite[lo], f"{first - self.last:+.1f} s")
                self.last, self.dense = last, min(n, STEP_FRAMES)
                k += 1
        if hold_from < len(batch):
            self._held = batch.select(np.arange(hold_from, len(batch)))
        self._seen += hold_from
        bounds = [0, *cuts, hold_from]
        for j in range(len(bounds) - 1):
            lo, hi = bounds[j], bounds[j + 1]
            picked = np.flatnonzero(keep[lo:hi]) + lo
            if picked.size == len(batch):
                yield j > 0, batch
            elif picked.size:
                yield j > 0, batch.select(picked)

    def _note(self, notes: list[str], index: int, what: str) -> None:
        if len(notes) < ReadStats.KEEP:
            notes.append(f"frame {self._seen + int(index) + 1:,}: {what}")


def _separate_clocks(batch: FrameBatch, finite: np.ndarray, skew: float, runs: int) -> bool:
    """Whether the chunk's many runs come from channels whose own times are each consistent
    (at most a tenth as many breaks as the chunk's): buses on clocks of their own."""
    channel = batch.channel[finite]
    t = batch.timestamp[finite]
    own = 0
    for c in np.unique(channel).tolist():
        tc = t[channel == c]
        own += int(np.count_nonzero(np.abs(np.diff(tc)) > skew))
    return len(np.unique(channel)) > 1 and own * 10 <= runs


def _concat(a: FrameBatch, b: FrameBatch) -> FrameBatch:
    """``a``'s frames, then ``b``'s (their channels as ``b`` numbers them, ``a``'s others after)."""
    names = b.channels + tuple(n for n in a.channels if n not in b.channels)
    remap = np.array([names.index(n) for n in a.channels] or [0], np.uint16)
    width = max(a.data.shape[1], b.data.shape[1])
    return FrameBatch(
        timestamp=np.concatenate((a.timestamp, b.timestamp)),
        channel=np.concatenate((remap[a.channel], b.channel)),
        channels=names,
        arbitration_id=np.concatenate((a.arbitration_id, b.arbitration_id)),
        is_extended=np.concatenate((a.is_extended, b.is_extended)),
        is_remote=np.concatenate((a.is_remote, b.is_remote)),
        is_error=np.concatenate((a.is_error, b.is_error)),
        is_fd=np.concatenate((a.is_fd, b.is_fd)),
        dlc=np.concatenate((a.dlc, b.dlc)),
        data=np.concatenate((widen(a.data, width), widen(b.data, width))),
    )
