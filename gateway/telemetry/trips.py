"""Trip detection from gear and speed, on frame time: start, end, duration, distance, energy.

Pure: feed it decoded series in time order, get ``Trip`` values back. A trip starts when the
gear enters a driving state (or, without a gear signal, when speed exceeds ``moving_kph``) and
ends when the gear has been in park (or speed below ``moving_kph``) for ``end_after_s``.
Distance comes from the odometer when there is one, else from integrated speed; energy from
the drop in state of charge times the usable battery capacity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from gateway.errors import ConfigError
from gateway.records import Sentinels, SignalSeries, distinct

_KEYS = {
    "gear",
    "drive_states",
    "speed",
    "odometer",
    "soc",
    "battery_kwh",
    "latitude",
    "longitude",
    "moving_kph",
    "end_after_s",
}


@dataclass(frozen=True)
class TripConfig:
    """Which signals make a trip: gear (or speed), odometer, SOC and position."""

    gear: str = ""
    drive_states: tuple[str, ...] = ("D", "R", "DI_GEAR_D", "DI_GEAR_R", "Drive", "Reverse")
    speed: str = ""
    odometer: str = ""
    soc: str = ""
    battery_kwh: float = 75.0
    latitude: str = ""
    longitude: str = ""
    moving_kph: float = 2.0
    end_after_s: float = 30.0

    @property
    def signals(self) -> set[str]:
        return {
            s
            for s in (self.gear, self.speed, self.odometer, self.soc, self.latitude, self.longitude)
            if s
        }

    @property
    def enabled(self) -> bool:
        return bool(self.gear or self.speed)

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str) -> TripConfig:
        for k in raw:
            if k not in _KEYS:
                raise ConfigError(
                    f"{where}: [trips]: unknown key {k!r} (known: {', '.join(sorted(_KEYS))})"
                )
        kw: dict[str, Any] = {}
        for k, v in raw.items():
            if k == "drive_states":
                # names of the gear's values, or the raw values of a gear without names
                if (
                    not isinstance(v, list)
                    or not v
                    or not all(
                        isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool))
                        for x in v
                    )
                ):
                    raise ConfigError(
                        f"{where}: [trips].drive_states must be a non-empty list of value names "
                        f"or integers, got {v!r}"
                    )
                kw[k] = tuple(str(x) for x in v)
            elif k in ("battery_kwh", "moving_kph", "end_after_s"):
                # NaN compares false with everything: a trip would never start or never end
                if (
                    not isinstance(v, int | float)
                    or isinstance(v, bool)
                    or not math.isfinite(v)
                    or v <= 0
                ):
                    raise ConfigError(f"{where}: [trips].{k} must be a positive number, got {v!r}")
                kw[k] = float(v)
            else:
                # "" is the default: none
                if not isinstance(v, str) or (v and not all(v.partition(".")[::2])):
                    raise ConfigError(f"{where}: [trips].{k} must be 'Message.Signal', got {v!r}")
                kw[k] = v
        return cls(**kw)


@dataclass(frozen=True)
class Trip:
    """One trip: start and end times, distance, energy, and where it started and ended (exact
    here; coarsened, or left out, before it is published)."""

    start: float
    end: float
    distance_km: float
    energy_kwh: float | None  # None: no state-of-charge reading at its start or end
    start_pos: tuple[float, float] | None
    end_pos: tuple[float, float] | None

    @property
    def duration_s(self) -> float:
        return self.end - self.start

    @property
    def avg_speed_kph(self) -> float:
        return self.distance_km / (self.duration_s / 3600) if self.duration_s > 0 else 0.0


_GEAR, _SPEED, _ODO, _SOC, _LAT, _LON = range(6)
_EMPTY = np.empty(0, np.float64)
_NO_INDEX = np.empty(0, np.intp)


class _Role(NamedTuple):
    """One role's readings in a batch, in time order (ties: by index in their series)."""

    role: int
    t: npt.NDArray[np.float64]
    v: npt.NDArray[np.float64]
    i: npt.NDArray[np.intp]  # each sample's index in its series (readings only): ties in time
    choices: Mapping[float, str] | None


@dataclass
class TripDetector:
    """The state machine of a trip, run a batch at a time with numpy.

    Samples are ordered by time (ties: by index within their series, then gear, speed, odometer,
    SOC, latitude, longitude). Only gear samples (speed samples when there is no gear signal)
    move the machine: a moving one starts a trip, a parked one ends it once nothing has moved
    for ``end_after_s``. Those transitions are found with prefix maxima over the moving/parked
    samples; what a trip needs from the other signals at its start and end (odometer, SOC,
    position) is looked up with ``searchsorted`` in each signal's own samples, never merged into
    one sorted array (the merge sorted every SOC sample of a Model 3 drive: 3-4x slower); the
    speed integral is a running sum over the trip's own samples, added in sample order. The
    result equals a per-sample state machine bit for bit (``tests/telemetry/trip_reference.py``),
    at numpy speed."""

    cfg: TripConfig
    _driving: bool = False
    _start: float = 0.0
    _last_moving: float = 0.0
    _odo0: float | None = None
    _odo: float | None = None
    _soc0: float | None = None
    _soc: float | None = None
    _dist_int_km: float = 0.0
    _last_speed: tuple[float, float] | None = None
    _lat: float | None = None
    _lon: float | None = None
    _start_pos: tuple[float, float] | None = None

    def _columns(self, series: Sequence[SignalSeries]) -> list[_Role] | None:
        """Each role's samples (readings only), in time order, or None if no role has any."""
        cfg = self.cfg
        wanted = cfg.signals  # a set built on each access: once per batch, not per series
        by_name = {s.name: s for s in series if s.name in wanted}
        names = (cfg.gear, cfg.speed, cfg.odometer, cfg.soc, cfg.latitude, cfg.longitude)
        out = []
        present = False
        for role, name in enumerate(names):
            s = by_name.get(name) if name else None
            if s is None or len(s.timestamp) == 0:
                out.append(_Role(role, _EMPTY, _EMPTY, _NO_INDEX, None))
                continue
            present = True
            ts, values = s.timestamp, s.value
            if isinstance(s.choices, Sentinels):  # "SNA" is no reading: not a speed of 511.5
                keep = s.choices.valid(values)
                ts, values = ts[keep], values[keep]
            ts = np.asarray(ts, np.float64)
            values = np.asarray(values, np.float64)
            index = np.arange(len(ts))  # the sample's index in its series: ties in time
            if len(ts) > 1 and not (ts[1:] >= ts[:-1]).all():  # time ran back (or NaN)
                index = np.argsort(ts, kind="stable")
                ts, values = ts[index], values[index]
            out.append(_Role(role, ts, values, index, s.choices))
        return out if present else None

    def _moving(self, cols: list[_Role]) -> tuple[_Role, npt.NDArray[np.int8]] | None:
        """The role whose samples move the machine (gear, else speed), and per sample: 1
        moving, 0 parked."""
        cfg = self.cfg
        col = cols[_GEAR] if cfg.gear else cols[_SPEED]
        if len(col.t) == 0:
            return None
        if not cfg.gear:
            return col, (col.v > cfg.moving_kph).astype(np.int8)
        uniq = distinct(col.v)
        labels = [
            col.choices.get(v, str(int(v))) if col.choices else str(int(v)) for v in uniq.tolist()
        ]
        table = np.array([lab in cfg.drive_states for lab in labels], np.int8)
        return col, table[np.searchsorted(uniq, col.v)]

    @property
    def running_since(self) -> float | None:
        """The start (frame time) of the trip running now, if one is."""
        return self._start if self._driving else None

    def feed(self, series: Sequence[SignalSeries]) -> list[Trip]:
        """Series of one batch (any order between signals); returns trips that ended."""
        cols = self._columns(series)
        if cols is None:
            return []
        # The samples of all roles in one order: by time; equal times by the index in their
        # own series, then by role (gear, speed, odometer, SOC, latitude, longitude). Only the
        # moving role's samples change state; the others are looked up at those samples by
        # their place in that order (``upto``): each role is searched on its own, unmerged.
        END = (np.inf, -1)  # a place after every sample: see ``upto``

        def upto(role: int, at: tuple[float, int]) -> int:
            """How many samples of ``role`` come before place ``at`` (time, index * 8 + role)
            or are it."""
            if at is END:
                return len(cols[role].t)
            c = cols[role]
            t, key = at
            lo = int(np.searchsorted(c.t, t, "left"))
            hi = int(np.searchsorted(c.t, t, "right"))
            if lo == hi:
                return lo
            # ties in time: by index, then role; a role's tied samples are in index order
            return lo + int(np.searchsorted(c.i[lo:hi], (key - role) // 8, "right"))

        def latest(role: int, at: tuple[float, int], carried: float | None) -> float | None:
            k = upto(role, at)  # at is a sample of another role: these come before it
            return float(cols[role].v[k - 1]) if k > 0 else carried

        def first(role: int, lo: tuple[float, int] | None, hi: tuple[float, int]) -> float | None:
            """The first sample of ``role`` after ``lo`` (None: the batch's start), before hi."""
            k = upto(role, lo) if lo is not None else 0
            return float(cols[role].v[k]) if k < upto(role, hi) else None

        def position(at: tuple[float, int]) -> tuple[float, float] | None:
            return _position(latest(_LAT, at, self._lat), latest(_LON, at, self._lon))

        # the speed integral: one term per speed sample, from the sample before it
        st, sv = cols[_SPEED].t, cols[_SPEED].v
        if self._last_speed is not None:
            pt = np.concatenate(([self._last_speed[0]], st[:-1]))
            pv = np.concatenate(([self._last_speed[1]], sv[:-1]))
            has = np.ones(len(st), np.bool_)
        else:
            pt = np.concatenate(([np.nan], st[:-1]))
            pv = np.concatenate(([np.nan], sv[:-1]))
            has = np.arange(len(st)) > 0
        dt = st - pt
        with np.errstate(invalid="ignore"):
            counts = has & (dt > 0) & (dt < 5)
        terms = (pv + sv) / 2 * dt / 3600

        def integral(d0: float, lo: tuple[float, int] | None, hi: tuple[float, int]) -> float:
            """``d0`` plus the terms of the speed samples after ``lo`` up to ``hi`` (both
            places), added one by one in sample order, as the per-sample machine adds them."""
            a = upto(_SPEED, lo) if lo is not None else 0
            b = upto(_SPEED, hi)
            sel = terms[a:b][counts[a:b]]
            if len(sel) == 0:
                return d0
            return float(np.cumsum(np.concatenate(([d0], sel)))[-1])

        done: list[Trip] = []
        start: tuple[float, int] | None = None  # the running trip's start (None: earlier batch)
        mover = self._moving(cols)
        if mover is not None:
            col, mk = mover
            tk = col.t
            # transitions: moving samples (T) and parked ones that end a trip if one runs (E)
            moving = mk == 1
            newest = np.maximum.accumulate(np.where(moving, tk, -np.inf))
            last_true = np.where(np.logical_or.accumulate(moving), newest, self._last_moving)
            with np.errstate(invalid="ignore"):  # inf - inf: NaN, ends nothing, as in Python
                endable = (mk == 0) & (tk - last_true >= self.cfg.end_after_s)
            sel = np.flatnonzero(moving | endable)
            kinds = moving[sel]
            before = np.concatenate(([self._driving], kinds[:-1]))
            flips = sel[kinds != before]  # a start after an end, an end after a start
            for j in flips.tolist():
                at = (float(tk[j]), int(col.i[j]) * 8 + col.role)
                if mk[j] == 1:  # a trip starts
                    self._driving, self._start, start = True, at[0], at
                    self._odo0 = latest(_ODO, at, self._odo)
                    self._soc0 = latest(_SOC, at, self._soc)
                    self._start_pos = position(at)
                    self._dist_int_km = 0.0
                    continue
                # the running trip ends; the first odometer/SOC reading in it stands in for
                # one that was missing at its start
                odo0 = self._odo0 if self._odo0 is not None else first(_ODO, start, at)
                soc0 = self._soc0 if self._soc0 is not None else first(_SOC, start, at)
                done.append(
                    self._trip(
                        float(last_true[j]),
                        (odo0, latest(_ODO, at, self._odo)),
                        (soc0, latest(_SOC, at, self._soc)),
                        integral(self._dist_int_km, start, at),
                        position(at),
                    )
                )
                self._driving = False
            if moving.any():
                self._last_moving = float(last_true[-1])
        if self._driving:  # carry the running trip into the next batch
            if self._odo0 is None:
                self._odo0 = first(_ODO, start, END)
            if self._soc0 is None:
                self._soc0 = first(_SOC, start, END)
            self._dist_int_km = integral(self._dist_int_km, start, END)
        self._odo = latest(_ODO, END, self._odo)
        self._soc = latest(_SOC, END, self._soc)
        self._lat = latest(_LAT, END, self._lat)
        self._lon = latest(_LON, END, self._lon)
        if len(st):
            self._last_speed = (float(st[-1]), float(sv[-1]))
        return done

    def _trip(
        self,
        end: float,
        odo: tuple[float | None, float | None],
        soc: tuple[float | None, float | None],
        dist_int_km: float,
        end_pos: tuple[float, float] | None,
    ) -> Trip:
        """The trip running since ``self._start``: distance from the odometer when it has two
        readings, else the speed integral; energy from the SOC drop."""
        (odo0, odo1), (soc0, soc1) = odo, soc
        dist = max(odo1 - odo0, 0.0) if odo0 is not None and odo1 is not None else dist_int_km
        energy = None
        if soc0 is not None and soc1 is not None:
            energy = max(soc0 - soc1, 0.0) / 100.0 * self.cfg.battery_kwh
        return Trip(self._start, end, dist, energy, self._start_pos, end_pos)

    def forget_positions(self) -> bool:
        """Forget every position held (the running trip's start, the latest fix, which would
        be a trip's end or the next one's start): the owner deleted their location data.
        Whether there was one. A trip's end area then comes only from fixes after this."""
        held = (self._start_pos, self._lat, self._lon) != (None, None, None)
        self._start_pos = self._lat = self._lon = None
        return held

    def flush(self, t: float) -> list[Trip]:
        """End of the stream: a trip still open ends at its last moving moment."""
        if not self._driving:
            return []
        self._driving = False
        return [
            self._trip(
                self._last_moving,
                (self._odo0, self._odo),
                (self._soc0, self._soc),
                self._dist_int_km,
                _position(self._lat, self._lon),
            )
        ]


def _position(lat: float | None, lon: float | None) -> tuple[float, float] | None:
    """A position only when both coordinates have a finite reading."""
    if lat is None or lon is None or not (np.isfinite(lat) and np.isfinite(lon)):
        return None
    return (lat, lon)
