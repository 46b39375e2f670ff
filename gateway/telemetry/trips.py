"""Trip detection from gear and speed, on frame time: start, end, duration, distance, energy.

Pure: feed it decoded series in time order, get ``Trip`` values back. A trip starts when the
gear enters a driving state (or, without a gear signal, when speed exceeds ``moving_kph``) and
ends when the gear has been in park (or speed below ``moving_kph``) for ``end_after_s``.
Distance comes from the odometer when there is one, else from integrated speed; energy from
the drop in state of charge times the usable battery capacity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.errors import ConfigError
from gateway.records import Sentinels, SignalSeries

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


@dataclass
class TripDetector:
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
        energy = 0.0
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
