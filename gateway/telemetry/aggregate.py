"""Windowed aggregation with numpy: count / min / max / mean / last per signal and window.

Windows are cut on the frames' own timestamps (``[k*w, (k+1)*w)``), never on the wall clock, so
a replay at any speed yields the same windows; and every aggregate is independent of how the
stream was cut into batches (the mean is an exactly rounded ``math.fsum``), so it also yields
the same numbers. Memory: the values of each permitted signal are kept until its window
closes. A window is emitted once the stream's watermark (the latest frame time seen) has
passed its end; samples that arrive for a window already emitted are counted as late and
dropped. Each window also keeps the caller's clock time (``add``'s ``now``) when it began
collecting, for the consent check at its release. ``discard`` forgets what the open windows
hold of some signals, or all (the owner's delete).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.records import Sentinels, SignalAggregate, SignalSeries, WindowSummary


@dataclass(slots=True)
class _Partial:
    """Running statistics of one signal in one window."""

    unit: str
    choices: Mapping[float, str] | None
    count: int = 0
    min: float = np.inf
    max: float = -np.inf
    parts: list[npt.NDArray[np.float64]] = field(default_factory=list)
    last_ts: float = -np.inf
    last: float = np.nan
    states: dict[float, int] | None = None

    def result(self) -> SignalAggregate:
        if self.choices is not None:
            # a value the DBC names is its name; any other stays a number (rounded to the
            # rule's precision when published: it may be a reading of a numeric signal that
            # names a few special values, a torque with "SNA", never a string of 17 digits)
            states: dict[str | float, int] = {}
            for v, n in sorted((self.states or {}).items()):
                key = self.choices.get(v, v)
                states[key] = states.get(key, 0) + n
            return SignalAggregate(
                self.count,
                None,
                None,
                None,
                self.choices.get(self.last, self.last),
                self.unit,
                states,
            )
        # exactly rounded, so the mean does not depend on how the stream was batched; fsum
        # reads the values through the array's memoryview (a third faster than from a list)
        try:
            mean = (math.fsum(np.concatenate(self.parts).data) if self.parts else 0.0) / self.count
        except OverflowError:  # a sum past the largest float (values near 1e308): the mean of
            # the values scaled by a power of two (exact), scaled back. It ended the gateway
            mean = math.fsum(np.concatenate(self.parts) * _SCALE) / self.count / _SCALE
        return SignalAggregate(self.count, self.min, self.max, mean, self.last, self.unit)


_SCALE = 2.0**-64  # a sum of up to 2**64 floats, each scaled by it, cannot overflow


_MAX_WINDOWS = 2.0**62  # window numbers of valid times stay well inside int64


def _runs(idx: npt.NDArray[np.int64], ts: Any, vals: Any) -> Any:
    """Per run of one window number in ``idx`` (non-decreasing, not empty): (window number,
    start, end, min, max, time and value of its last sample), as Python numbers, one run per
    item (numpy's scalars cost ~10x more to read one at a time)."""
    if idx[0] == idx[-1]:  # the usual case: the whole series in one window
        n = idx.size
        return (
            (
                int(idx[0]),
                0,
                n,
                float(vals.min()),
                float(vals.max()),
                float(ts[-1]),
                float(vals[-1]),
            ),
        )
    cut = np.flatnonzero(idx[1:] != idx[:-1]) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [idx.size]))
    last = ends - 1
    return zip(
        idx[starts].tolist(),
        starts.tolist(),
        ends.tolist(),
        np.minimum.reduceat(vals, starts).tolist(),
        np.maximum.reduceat(vals, starts).tolist(),
        ts[last].tolist(),
        vals[last].tolist(),
        strict=True,
    )


@dataclass
class WindowAggregator:
    """Every signal per window of frame time: count, min, max, mean and last, or for a signal
    with named states, count, last and samples per state."""

    window: float = 60.0
    late_samples: int = 0
    invalid_samples: int = 0
    _open: dict[int, dict[str, _Partial]] = field(default_factory=dict)
    _opened: dict[int, float] = field(default_factory=dict)  # window -> ``now`` it opened at
    _closed_below: int | None = None  # every window index below this has been emitted
    watermark: float = -np.inf

    def __post_init__(self) -> None:
        if not self.window > 0:
            raise ValueError("window must be positive")

    def add(self, series: Iterable[SignalSeries], now: float = -math.inf) -> None:
        """The samples of one batch; ``now`` is the caller's clock (wall time) as it takes
        them in, kept by each window they open (one time per batch: none per sample)."""
        w = self.window
        for s in series:
            ts, vals = s.timestamp, s.value
            # a time must be finite and its window number fit in 64 bits (a damaged log can
            # hold "(1e300)"): the window numbers then follow the times
            ok = np.isfinite(vals) & (np.abs(ts) < _MAX_WINDOWS * w)
            choices = s.choices
            if isinstance(choices, Sentinels):
                ok &= choices.valid(vals)
                choices = None
            if not ok.all():
                self.invalid_samples += int((~ok).sum())
                ts, vals = ts[ok], vals[ok]
            if ts.size == 0:
                continue
            idx = np.floor(ts / w).astype(np.int64)
            if self._closed_below is not None:
                late = idx < self._closed_below
                if late.any():
                    self.late_samples += int(late.sum())
                    keep = ~late
                    ts, vals, idx = ts[keep], vals[keep], idx[keep]
                    if ts.size == 0:
                        continue
            # window indices follow the times (floor is monotonic): in time order, they are too
            if idx.size > 1 and bool((ts[1:] < ts[:-1]).any()):
                order = np.argsort(ts, kind="stable")  # equal times keep file order
                ts, vals, idx = ts[order], vals[order], idx[order]
            stated = False  # a window of this signal counts states (it was opened with names)
            for k, lo, hi, vmin, vmax, t_last, v_last in _runs(idx, ts, vals):
                bucket = self._open.get(k)
                if bucket is None:
                    bucket = self._open[k] = {}
                    self._opened[k] = now
                p = bucket.get(s.name)
                if p is None:
                    p = bucket[s.name] = _Partial(s.unit, choices)
                    if choices is not None:
                        p.states = {}
                p.count += hi - lo
                if vmin < p.min:
                    p.min = vmin
                if vmax > p.max:
                    p.max = vmax
                p.parts.append(vals[lo:hi])
                if t_last >= p.last_ts:
                    p.last_ts, p.last = t_last, v_last
                stated = stated or p.states is not None
            if stated:  # samples per state and window: one sort for the series
                self._count_states(s.name, idx, vals)

    def _count_states(self, name: str, idx: npt.NDArray[np.int64], vals: Any) -> None:
        order = np.lexsort((vals, idx))
        si, sv = idx[order], vals[order]
        first = np.flatnonzero(np.concatenate(([True], (si[1:] != si[:-1]) | (sv[1:] != sv[:-1]))))
        counts = np.diff(np.append(first, si.size))
        for k, v, n in zip(si[first].tolist(), sv[first].tolist(), counts.tolist(), strict=True):
            states = self._open[k][name].states
            if states is not None:  # a window opened by a series without names counts none
                states[v] = states.get(v, 0) + n

    def advance(self, watermark: float) -> list[WindowSummary]:
        """Emit every window that ends at or before ``watermark``, oldest first. A time that
        is not finite (a damaged frame's) moves nothing."""
        if not math.isfinite(watermark) or abs(watermark) >= _MAX_WINDOWS * self.window:
            return []
        self.watermark = max(self.watermark, watermark)
        return self._emit_below(int(np.floor(self.watermark / self.window)))

    def discard(self, names: Collection[str] | None = None) -> tuple[int, int]:
        """Forget the samples of the signals ``names`` (every signal when None) in every open
        window, as if they had never come: (windows that held some, samples forgotten). A
        window left with nothing is closed unsent; a later sample of its time opens it anew,
        at that later ``now``."""
        windows = samples = 0
        for k in list(self._open):
            bucket = self._open[k]
            gone = list(bucket) if names is None else [n for n in bucket if n in names]
            if not gone:
                continue
            windows += 1
            samples += sum(bucket.pop(n).count for n in gone)
            if not bucket:
                del self._open[k], self._opened[k]
        return windows, samples

    def flush(self) -> list[WindowSummary]:
        """Emit every open window, the last partial one included (end of a replay)."""
        return self._emit_below(max(self._open) + 1) if self._open else []

    def _emit_below(self, limit: int) -> list[WindowSummary]:
        if self._closed_below is None or limit > self._closed_below:
            self._closed_below = limit
        out = []
        for k in sorted(k for k in self._open if k < limit):
            bucket = self._open.pop(k)
            out.append(
                WindowSummary(
                    start=k * self.window,
                    end=(k + 1) * self.window,
                    signals={name: p.result() for name, p in sorted(bucket.items())},
                    opened=self._opened.pop(k),
                )
            )
        return out
