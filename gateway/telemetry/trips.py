"""Trip detection from gear and speed, on frame time: start, end, duration, distance, energy.

Pure: feed it decoded series in time order, get ``Trip`` values back. A trip starts when the
gear enters a driving state (or, without a gear signal, when speed exceeds ``moving_kph``) and
ends when the gear has been in park (or speed below ``moving_kph``) for ``end_after_s``.
Distance comes from the odometer when there is one, else from integrated speed; energy from
the drop in state of charge times the usable battery capacity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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
                if not isinstance(v, list):
                    raise ConfigError(f"{where}: [trips].drive_states must be a list")
                kw[k] = tuple(str(x) for x in v)
            elif k in ("battery_kwh", "moving_kph", "end_after_s"):
                if not isinstance(v, int | float) or v <= 0:
                    raise ConfigError(f"{where}: [trips].{k} must be a positive number")
                kw[k] = float(v)
            else:
                if not isinstance(v, str):
                    raise ConfigError(f"{where}: [trips].{k} must be 'Message.Signal'")
                kw[k] = v
        return cls(**kw)


@dataclass(frozen=True)
class Trip:
    """One trip: start and end times, distance, energy, and where it started and ended (exact
    here; coarsened, or left out, before it is published)."""

    start: float
    end: float
    distance_km: float
    energy_kwh: float
    start_pos: tuple[float, float] | None
    end_pos: tuple[float, float] | None

    @property
    def duration_s(self) -> float:
        return self.end - self.start

    @property
    def avg_speed_kph(self) -> float:
        return self.distance_km / (self.duration_s / 3600) if self.duration_s > 0 else 0.0


_GEAR, _SPEED, _ODO, _SOC, _LAT, _LON = range(6)


@dataclass
class TripDetector:
    """The state machine of a trip, run a batch at a time with numpy.

    Samples are ordered by time (ties: by index within their series, then gear, speed, odometer,
    SOC, latitude, longitude). Only gear samples (speed samples when there is no gear signal)
    move the machine: a moving one starts a trip, a parked one ends it once nothing has moved
    for ``end_after_s``. Those transitions are found with prefix maxima over the moving/parked
    samples; what a trip needs from the other signals at its start and end (odometer, SOC,
    position) is looked up with ``searchsorted``; the speed integral is a running sum over the
    trip's own samples, added in sample order. The result equals a per-sample state machine bit
    for bit (``tests/telemetry/trip_reference.py``), at numpy speed."""

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

    def _columns(self, series: Sequence[SignalSeries]) -> list[tuple[int, Any, Any, Any]]:
        """(role, times, values, moving: 1 moving, 0 parked, -1 says nothing) per signal."""
        cfg = self.cfg
        by_name = {s.name: s for s in series if s.name in cfg.signals}
        names = (cfg.gear, cfg.speed, cfg.odometer, cfg.soc, cfg.latitude, cfg.longitude)
        out = []
        for role, name in enumerate(names):
            s = by_name.get(name) if name else None
            if s is None or len(s.timestamp) == 0:
                continue
            ts, values = s.timestamp, s.value
            if isinstance(s.choices, Sentinels):  # "SNA" is no reading: not a speed of 511.5
                keep = s.choices.valid(values)
                ts, values = ts[keep], values[keep]
            if role == _GEAR:
                uniq = distinct(values)
                labels = [
                    s.choices.get(v, str(int(v))) if s.choices else str(int(v))
                    for v in uniq.tolist()
                ]
                table = np.array([lab in cfg.drive_states for lab in labels], np.int8)
                moving = table[np.searchsorted(uniq, values)]
            elif role == _SPEED and not cfg.gear:
                moving = (values > cfg.moving_kph).astype(np.int8)
            else:
                moving = np.full(len(values), -1, np.int8)
            out.append((role, ts, values, moving))
        return out

    @property
    def running_since(self) -> float | None:
        """The start (frame time) of the trip running now, if one is."""
        return self._start if self._driving else None

    def feed(self, series: Sequence[SignalSeries]) -> list[Trip]:
        """Series of one batch (any order between signals); returns trips that ended."""
        cols = self._columns(series)
        if not cols:
            return []
        t = np.concatenate([c[1] for c in cols]).astype(np.float64)
        v = np.concatenate([c[2] for c in cols]).astype(np.float64)
        m = np.concatenate([c[3] for c in cols])
        # by time; equal times by the index in their own series, then by role (i * 8 + role)
        i = np.concatenate([np.arange(0, 8 * len(c[1]), 8) + c[0] for c in cols])
        order = np.lexsort((i, t))
        t, v, m = t[order], v[order], m[order]
        r = i[order] & 7  # the role of each sample, in time order
        n = len(t)
        at = {role: np.flatnonzero(r == role) for role in range(6)}

        def latest(role: int, p: int, carried: float | None) -> float | None:
            k = int(np.searchsorted(at[role], p)) - 1  # the last sample before position p
            return float(v[at[role][k]]) if k >= 0 else carried

        def first(role: int, lo: int, hi: int) -> float | None:
            k = int(np.searchsorted(at[role], lo, side="right"))  # the first after lo
            pos = at[role]
            return float(v[pos[k]]) if k < len(pos) and pos[k] < hi else None

        def position(p: int) -> tuple[float, float] | None:
            return _position(latest(_LAT, p, self._lat), latest(_LON, p, self._lon))

        # the speed integral: one term per speed sample, from the sample before it
        sp = at[_SPEED]
        st, sv = t[sp], v[sp]
        if self._last_speed is not None:
            pt = np.concatenate(([self._last_speed[0]], st[:-1]))
            pv = np.concatenate(([self._last_speed[1]], sv[:-1]))
            has = np.ones(len(sp), np.bool_)
        else:
            pt = np.concatenate(([np.nan], st[:-1]))
            pv = np.concatenate(([np.nan], sv[:-1]))
            has = np.arange(len(sp)) > 0
        dt = st - pt
        with np.errstate(invalid="ignore"):
            counts = has & (dt > 0) & (dt < 5)
        terms = (pv + sv) / 2 * dt / 3600

        def integral(d0: float, lo: int, hi: int) -> float:
            """``d0`` plus the terms of the speed samples at positions in (lo, hi], added one
            by one in sample order, as the per-sample machine adds them."""
            a, b = np.searchsorted(sp, lo, side="right"), np.searchsorted(sp, hi, side="right")
            sel = terms[a:b][counts[a:b]]
            if len(sel) == 0:
                return d0
            return float(np.cumsum(np.concatenate(([d0], sel)))[-1])

        # transitions: moving samples (T) and parked samples that end a trip if one runs (E)
        k = np.flatnonzero(m >= 0)
        tk, mk = t[k], m[k]
        moving = mk == 1
        newest = np.maximum.accumulate(np.where(moving, tk, -np.inf)) if len(k) else tk
        last_true = np.where(np.logical_or.accumulate(moving), newest, self._last_moving)
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, which ends nothing, as in Python
            endable = (mk == 0) & (tk - last_true >= self.cfg.end_after_s)
        sel = np.flatnonzero((mk == 1) | endable)
        kinds = mk[sel] == 1
        before = np.concatenate(([self._driving], kinds[:-1]))
        flips = sel[kinds != before]  # a start after an end, an end after a start

        done: list[Trip] = []
        start_p = -1  # position of the running trip's start (-1: started in an earlier batch)
        for j in flips.tolist():
            p = int(k[j])
            if mk[j] == 1:  # a trip starts
                self._driving, self._start, start_p = True, float(t[p]), p
                self._odo0 = latest(_ODO, p, self._odo)
                self._soc0 = latest(_SOC, p, self._soc)
                self._start_pos = position(p)
                self._dist_int_km = 0.0
                continue
            # the running trip ends; the first odometer/SOC reading in it stands in for one
            # that was missing at its start
            odo0 = self._odo0 if self._odo0 is not None else first(_ODO, start_p, p)
            soc0 = self._soc0 if self._soc0 is not None else first(_SOC, start_p, p)
            done.append(
                self._trip(
                    float(last_true[j]),
                    (odo0, latest(_ODO, p, self._odo)),
                    (soc0, latest(_SOC, p, self._soc)),
                    integral(self._dist_int_km, start_p, p),
                    position(p),
                )
            )
            self._driving = False
        if self._driving:  # carry the running trip into the next batch
            if self._odo0 is None:
                self._odo0 = first(_ODO, start_p, n)
            if self._soc0 is None:
                self._soc0 = first(_SOC, start_p, n)
            self._dist_int_km = integral(self._dist_int_km, start_p, n)
        self._odo = latest(_ODO, n, self._odo)
        self._soc = latest(_SOC, n, self._soc)
        self._lat = latest(_LAT, n, self._lat)
        self._lon = latest(_LON, n, self._lon)
        if len(sp):
            self._last_speed = (float(st[-1]), float(sv[-1]))
        if (mk == 1).any():
            self._last_moving = float(last_true[-1])
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
        energy = 0.0
        if soc0 is not None and soc1 is not None:
            energy = max(soc0 - soc1, 0.0) / 100.0 * self.cfg.battery_kwh
        return Trip(self._start, end, dist, energy, self._start_pos, end_pos)

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
