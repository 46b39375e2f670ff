"""The first trip detector, one Python step per sample: kept as the reference the vectorised
``gateway.telemetry.trips.TripDetector`` must equal, trip for trip and bit for bit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.records import Sentinels, SignalSeries
from gateway.telemetry.trips import Trip, TripConfig


@dataclass
class ScalarTripDetector:
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
    _pos: tuple[float, float] | None = None
    _start_pos: tuple[float, float] | None = None
    _events: list[tuple[float, int, str, Any]] = field(default_factory=list)

    def feed(self, series: Sequence[SignalSeries]) -> list[Trip]:
        """Series of one batch (any order between signals); returns trips that ended."""
        cfg = self.cfg
        by_name = {s.name: s for s in series if s.name in cfg.signals}
        events: list[tuple[float, int, str, Any]] = []
        for role, name in (
            ("gear", cfg.gear),
            ("speed", cfg.speed),
            ("odo", cfg.odometer),
            ("soc", cfg.soc),
            ("lat", cfg.latitude),
            ("lon", cfg.longitude),
        ):
            s = by_name.get(name) if name else None
            if s is None:
                continue
            ts, values = s.timestamp, s.value
            if isinstance(s.choices, Sentinels):  # "SNA" is no reading: not a speed of 511.5
                keep = s.choices.valid(values)
                ts, values = ts[keep], values[keep]
            vals: list[Any]
            if role == "gear":
                vals = [
                    s.choices.get(v, str(int(v))) if s.choices else str(int(v))
                    for v in values.tolist()
                ]
            else:
                vals = values.tolist()
            events += [
                (t, i, role, v) for i, (t, v) in enumerate(zip(ts.tolist(), vals, strict=True))
            ]
        events.sort(key=lambda e: (e[0], e[1]))
        done: list[Trip] = []
        for t, _, role, v in events:
            trip = self._step(t, role, v)
            if trip is not None:
                done.append(trip)
        return done

    def _moving(self, role: str, v: Any) -> bool | None:
        if role == "gear":
            return v in self.cfg.drive_states
        if role == "speed" and not self.cfg.gear:
            return v > self.cfg.moving_kph
        return None

    def _step(self, t: float, role: str, v: Any) -> Trip | None:
        if role == "odo":
            self._odo = v
            if self._driving and self._odo0 is None:
                self._odo0 = v
        elif role == "soc":
            self._soc = v
            if self._driving and self._soc0 is None:
                self._soc0 = v
        elif role == "lat":
            self._pos = (v, self._pos[1] if self._pos else float("nan"))
        elif role == "lon":
            self._pos = (self._pos[0] if self._pos else float("nan"), v)
        elif role == "speed":
            if self._driving and self._last_speed is not None:
                t0, v0 = self._last_speed
                if 0 < t - t0 < 5:
                    self._dist_int_km += (v0 + v) / 2 * (t - t0) / 3600
            self._last_speed = (t, v)
        moving = self._moving(role, v)
        if moving is True:
            self._last_moving = t
            if not self._driving:
                self._driving = True
                self._start = t
                self._odo0, self._soc0 = self._odo, self._soc
                self._dist_int_km = 0.0
                self._start_pos = self._valid(self._pos)
        elif moving is False and self._driving and t - self._last_moving >= self.cfg.end_after_s:
            return self._finish(t)
        return None

    @staticmethod
    def _valid(pos: tuple[float, float] | None) -> tuple[float, float] | None:
        if pos is None or not all(np.isfinite(pos)):
            return None
        return pos

    def _finish(self, t: float) -> Trip:
        self._driving = False
        if self._odo0 is not None and self._odo is not None:
            dist = max(self._odo - self._odo0, 0.0)
        else:
            dist = self._dist_int_km
        energy = None
        if self._soc0 is not None and self._soc is not None:
            energy = max(self._soc0 - self._soc, 0.0) / 100.0 * self.cfg.battery_kwh
        return Trip(
            self._start, self._last_moving, dist, energy, self._start_pos, self._valid(self._pos)
        )

    def flush(self, t: float) -> list[Trip]:
        """End of the stream: a trip still open ends at its last moving moment."""
        if self._driving:
            return [self._finish(t)]
        return []
