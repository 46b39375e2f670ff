"""Location minimisation: snap to a grid, suppress inside geofences, limit rate and change.

Pure functions of values; the caller passes frame time. Positions are snapped to the centre of
a cell at least ``grid_m`` metres across (``coarsen``: equal rows of latitude, each cut into
equal cells of longitude as wide as ``grid_m`` at the row's edge nearest a pole).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import ConfigError

M_PER_DEG = 111_320.0
EARTH_R = 6_371_000.0


def _cells(span_deg: float, cell_deg: float) -> tuple[int, float]:
    """``span_deg`` cut into equal cells of at least ``cell_deg``: their number and size (at
    least one cell: the whole span)."""
    n = max(1, math.floor(span_deg / cell_deg)) if cell_deg > 0 else 1
    return n, span_deg / n


def coarsen(lat: float, lon: float, grid_m: float) -> tuple[float, float]:
    """The centre of the grid cell of (lat, lon): a fixed point (``on_location_grid``).

    Every cell is at least ``grid_m`` across, from pole to pole and across the antimeridian.
    The rows of latitude cut 180 degrees into equal rows; each row cuts 360 degrees of
    longitude into equal cells, as many as fit ``grid_m`` wide at the row's edge nearest a pole
    (its narrowest), so the last cell before +-180 is as wide as the others (one cut short
    there was 91 m wide at Fiji's latitude on the 1 km grid), and the cells near a pole stay
    ``grid_m`` wide (a floor of 1 % of the equator's width let them shrink to 5 m at the South
    Pole's station); the row at a pole is one cell. A number that is not finite has no cell:
    ``ValueError``."""
    if not (math.isfinite(lat) and math.isfinite(lon)):
        raise ValueError(f"not a position: {lat}, {lon}")
    rows, row_deg = _cells(180.0, grid_m / M_PER_DEG)
    i = min(max(math.floor((lat + 90.0) / row_deg), 0), rows - 1)
    south = -90.0 + i * row_deg
    poleward = min(90.0, max(abs(south), abs(south + row_deg)))
    across = M_PER_DEG * math.cos(math.radians(poleward))  # metres per degree there
    n, cell_deg = _cells(360.0, grid_m / across if across > 0 else math.inf)
    j = math.floor((lon + 180.0) / cell_deg) % n  # (+180 is -180's cell)
    return round(south + row_deg / 2, 7), round(-180.0 + (j + 0.5) * cell_deg, 7)


def on_location_grid(lat: float, lon: float, grid_m: float) -> bool:
    return math.isfinite(lat) and math.isfinite(lon) and coarsen(lat, lon, grid_m) == (lat, lon)


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_R * math.asin(min(1.0, math.sqrt(a)))


@dataclass(frozen=True)
class Geofence:
    """A circle (``lat``, ``lon``, ``radius_m``) or a polygon (``polygon = [[lat, lon], ...]``)."""

    name: str
    circle: tuple[float, float, float] | None = None
    polygon: tuple[tuple[float, float], ...] | None = None

    def contains(self, lat: float, lon: float) -> bool:
        if self.circle is not None:
            clat, clon, r = self.circle
            return distance_m(lat, lon, clat, clon) <= r
        assert self.polygon is not None
        inside = False
        pts = self.polygon
        j = len(pts) - 1
        for i in range(len(pts)):
            yi, xi = pts[i]
            yj, xj = pts[j]
            if (yi > lat) != (yj > lat) and lon < (xj - xi) * (lat - yi) / (yj - yi) + xi:
                inside = not inside
            j = i
        return inside

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str) -> Geofence:
        """One ``[[policy.geofence]]`` table. A fence that could never contain a position (a
        radius of NaN, a latitude of 312 for 31.2) would let every position near home out, so
        each number must be finite and on the globe, and a mistyped key is refused, not
        ignored."""
        unknown = sorted(set(raw) - _FENCE_KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_FENCE_KEYS))})"
            )
        name = raw.get("name", where)
        if not isinstance(name, str):
            raise ConfigError(f"{where}: name must be a string, got {name!r}")
        try:
            if "polygon" in raw:
                if {"lat", "lon", "radius_m"} & set(raw):
                    raise ValueError("give a circle or a polygon, not both")
                if not isinstance(raw["polygon"], list):
                    raise ValueError("polygon must be a list of [lat, lon] points")
                pts = tuple(_point(p) for p in raw["polygon"])
                if len(pts) < 3:
                    raise ValueError("a polygon needs at least 3 points")
                # on one line, or one point: it contains nothing. Computed at the latitudes of
                # a city, points on one line gave 4.5e-13 square degrees of rounding, not 0; a
                # fence must enclose more than a square metre (~1e-10 square degrees)
                if _area(pts) < MIN_FENCE_AREA_DEG2:
                    raise ValueError("the polygon's points are on one line: it encloses nothing")
                return cls(name, polygon=pts)
            lat, lon = _point((raw["lat"], raw["lon"]))
            radius = _number(raw["radius_m"])
            if not 0 < radius <= MAX_FENCE_RADIUS_M:
                raise ValueError(
                    f"radius_m must be > 0 and <= {MAX_FENCE_RADIUS_M:g}, got {radius}"
                )
            return cls(name, circle=(lat, lon, radius))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            why = f"{exc} is missing" if isinstance(exc, KeyError) else str(exc)
            raise ConfigError(
                f"{where}: a geofence needs lat, lon and radius_m, or polygon = "
                f"[[lat, lon], ...] ({why})"
            ) from None


_FENCE_KEYS = {"name", "lat", "lon", "radius_m", "polygon"}
MAX_FENCE_RADIUS_M = 1_000_000.0  # a fence larger than this is a mistake, not a home


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"{v!r} is not a number")
    x = float(v)
    if not math.isfinite(x):
        raise ValueError(f"{v!r} is not a finite number")
    return x


MIN_FENCE_AREA_DEG2 = 1e-10


def _area(pts: tuple[tuple[float, float], ...]) -> float:
    """The polygon's area in square degrees (the shoelace formula, about its first point:
    coordinates of ~100 would lose the digits of a small area)."""
    y0, x0 = pts[0]
    rel = [(y - y0, x - x0) for y, x in pts]
    pairs = zip(rel, rel[1:] + rel[:1], strict=True)
    return abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in pairs)) / 2


def _point(p: Any) -> tuple[float, float]:
    """(lat, lon) in degrees, on the globe."""
    if not isinstance(p, list | tuple) or len(p) != 2:
        raise ValueError(f"a point is [lat, lon], got {p!r}")
    lat, lon = _number(p[0]), _number(p[1])
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise ValueError(f"latitude must be -90 to 90 and longitude -180 to 180, got {lat}, {lon}")
    return lat, lon


def parse_geofences(raw: Sequence[Mapping[str, Any]], source: str) -> list[Geofence]:
    return [Geofence.parse(r, f"{source}: [[policy.geofence]] #{i}") for i, r in enumerate(raw, 1)]


@dataclass
class LocationLimiter:
    """At most one position per ``min_interval_s`` of frame time, and only after a move of at
    least ``min_change_m`` (so float noise and a parked car never produce a stream)."""

    min_interval_s: float
    min_change_m: float
    _last_t: float | None = None
    _last: tuple[float, float] | None = None

    def admit(self, t: float, lat: float, lon: float) -> bool:
        if self._last_t is not None and t - self._last_t < self.min_interval_s:
            return False
        if self._last is not None and distance_m(lat, lon, *self._last) < self.min_change_m:
            return False
        self._last_t, self._last = t, (lat, lon)
        return True

    def forget_position(self) -> None:
        """Forget the last exact position (the owner deleted their location data); its time
        stays, so the rate limit still holds, and the next fix needs no distance from it."""
        self._last = None


@dataclass
class LocationStage:
    """Positions in, coarse positions out, in this order: consent (nothing without it), then
    geofences (on the TRUE position), then the rate/change limit, then the grid. Nothing else
    in the gateway ever sees a position."""

    lat_signal: str
    lon_signal: str
    grid_m: float
    window: float
    geofences: Sequence[Geofence]
    limiter: LocationLimiter
    withheld: int = 0
    limited: int = 0
    no_fix: int = 0  # a coordinate that is not a finite number
    # fixes inside each fence (the first that holds it), by name: a fence a drive passes
    # through that holds none is not where it was meant to be (a typo inside valid ranges)
    by_fence: dict[str, int] = field(default_factory=dict)
    fence_checked: int = 0  # fixes looked at by the fences (with consent, a number)

    def __post_init__(self) -> None:
        self.by_fence = {f.name: 0 for f in self.geofences}  # (a fence no fix entered: 0)

    @property
    def in_geofence(self) -> int:
        return sum(self.by_fence.values())

    def feed(self, series: Sequence[Any], consent_ok: bool) -> list[tuple[float, float, float]]:
        """(window start, lat, lon) for each position that may leave."""
        by = {s.name: s for s in series}
        lat_s, lon_s = by.get(self.lat_signal), by.get(self.lon_signal)
        if lat_s is None or lon_s is None:
            return []
        lons = dict(zip(lon_s.timestamp.tolist(), lon_s.value.tolist(), strict=True))
        pairs = [
            (t, la, lons[t])
            for t, la in zip(lat_s.timestamp.tolist(), lat_s.value.tolist(), strict=True)
            if t in lons
        ]
        if not consent_ok:
            self.withheld += len(pairs)
            return []
        out = []
        for t, la, lo in pairs:
            if not (math.isfinite(la) and math.isfinite(lo)):  # no fix (a NaN, an inf)
                self.no_fix += 1
                continue
            self.fence_checked += 1
            fence = next((g for g in self.geofences if g.contains(la, lo)), None)
            if fence is not None:
                self.by_fence[fence.name] += 1
                continue
            if not self.limiter.admit(t, la, lo):
                self.limited += 1
                continue
            clat, clon = coarsen(la, lo, self.grid_m)
            out.append((math.floor(t / self.window) * self.window, clat, clon))
        return out
