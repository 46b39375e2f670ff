"""The location grid: every cell at least ``grid_m`` across, everywhere on the globe.

A cell is measured from the outside: the positions that ``coarsen`` sends to one centre are
found by walking across it in small steps, and the walk's extent is measured with the
haversine distance. Near a pole and at the antimeridian the old grid's cells were a few metres
wide (a floor of 1 % of the equator's width for the longitude step; a last cell cut short at
+-180 degrees), so a "coarsened" position placed a car within 5-175 m.
"""

from __future__ import annotations

import math
import random

import pytest

from gateway.telemetry.location import LocationLimiter, LocationStage, coarsen, distance_m
from gateway.telemetry.location import on_location_grid as on_grid


def _east_west_extent(lat: float, lon: float, grid_m: float, step_m: float) -> float:
    """Metres, along the parallel of ``lat``, of the positions with the cell of (lat, lon):
    walked east and west from it in steps of ``step_m`` (crossing +-180 as a car does)."""
    cell = coarsen(lat, lon, grid_m)
    per_deg = 111_320.0 * max(math.cos(math.radians(lat)), 1e-12)
    step = min(step_m / per_deg, 1.0)
    ends, walked = [], 0.0
    for sign in (1, -1):
        k = 0
        while k * step < 360 and coarsen(lat, _wrap(lon + sign * (k + 1) * step), grid_m) == cell:
            k += 1
        ends.append(_wrap(lon + sign * k * step))
        walked += k * step
    if walked >= 360:  # the cell is the whole parallel
        return _along(lat, 0.0, 180.0) * 2
    return _along(lat, ends[1], ends[0])


def _wrap(lon: float) -> float:
    return (lon + 180.0) % 360.0 - 180.0


def _along(lat: float, west: float, east: float) -> float:
    """Metres along the parallel from ``west`` eastwards to ``east``."""
    span = (east - west) % 360.0
    return 111_320.0 * math.cos(math.radians(lat)) * span


def _north_south_extent(lat: float, lon: float, grid_m: float, step_m: float) -> float:
    cell = coarsen(lat, lon, grid_m)
    step = step_m / 111_320.0
    lo = hi = lat
    while lo - step >= -90 and coarsen(lo - step, lon, grid_m) == cell:
        lo -= step
    while hi + step <= 90 and coarsen(hi + step, lon, grid_m) == cell:
        hi += step
    return distance_m(lo, lon, hi, lon)


@pytest.mark.parametrize(
    ("lat", "lon", "grid_m"),
    [
        (89.9, 10.0, 1000.0),  # the old grid: 175 m
        (-89.99, -60.0, 1000.0),  # 17 m
        (-89.997, 139.27, 1000.0),  # the South Pole station's latitude: 5-6 m
        (-16.80, 179.9995, 1000.0),  # Taveuni, Fiji, at the antimeridian: 91 m
        (-16.80, -179.9995, 1000.0),
        (65.0, 179.99, 5000.0),
        (0.0, 0.0, 100.0),
        (31.2304, 121.4737, 1000.0),  # Shanghai
    ],
)
def test_a_cell_is_at_least_the_grid_wide_where_the_old_grid_was_finer(lat, lon, grid_m):
    step = grid_m / 200
    # the cell's narrowest width is at its edge nearest the pole: walk along that edge too
    clat, _ = coarsen(lat, lon, grid_m)
    half = _north_south_extent(lat, lon, grid_m, step) / 111_320.0 / 2
    poleward = clat + math.copysign(max(half - 2 * step / 111_320.0, 0.0), clat)
    if abs(clat) + 2 * half >= 90 - 1e-9:  # the row at a pole: one cell, a cap around it
        assert _east_west_extent(lat, lon, grid_m, step) == pytest.approx(
            2 * math.pi * 6_371_000 * math.cos(math.radians(lat)), rel=0.01
        )
    else:
        for at in (lat, poleward):
            width = _east_west_extent(at, lon, grid_m, step)
            assert width >= grid_m - 2 * step, (at, lon, width)
    assert _north_south_extent(lat, lon, grid_m, step) >= grid_m - 2 * step


def test_the_antimeridian_is_a_border_between_two_whole_cells():
    """A car on either side of +-180 is in a cell as wide as its neighbours; +180 and -180
    are the same meridian, in the same cell."""
    for lat in (-16.8, 0.0, 52.0, 71.0):
        assert coarsen(lat, 180.0, 1000.0) == coarsen(lat, -180.0, 1000.0)
        west = coarsen(lat, 179.9999, 1000.0)
        east = coarsen(lat, -179.9999, 1000.0)
        inner = coarsen(lat, 179.5, 1000.0)
        spacing = [_along(lat, a[1], b[1]) for a, b in ((west, east), (inner, west))]
        gap = _along(lat, coarsen(lat, 179.49, 1000.0)[1], inner[1])
        # the centres on both sides of the antimeridian are as far apart as any two
        # neighbouring centres of that row
        assert math.isclose(spacing[0], gap, rel_tol=1e-6) or spacing[0] >= 1000.0, (lat, spacing)


@pytest.mark.parametrize("grid_m", [100.0, 1000.0, 7777.0, 100_000.0])
def test_every_centre_is_a_fixed_point_and_near_its_position(grid_m):
    rnd = random.Random(grid_m)
    for _ in range(2000):
        lat = rnd.choice([rnd.uniform(-90, 90), rnd.uniform(-90, -89.9), rnd.uniform(89.9, 90)])
        lon = rnd.choice([rnd.uniform(-180, 180), rnd.uniform(179.9, 180), -180.0, 180.0])
        clat, clon = coarsen(lat, lon, grid_m)
        assert on_grid(clat, clon, grid_m), (lat, lon)
        assert -90 <= clat <= 90 and -180 <= clon <= 180
        # never further from the fix than a cell's half-diagonal allows (cells are at most
        # twice the grid wide where the row's edges differ most, and any cell at a pole's
        # cap is a circle of about the grid's radius)
        d = distance_m(lat, lon, clat, clon)
        assert d <= 2.5 * grid_m or abs(clat) + grid_m / 111_320.0 >= 90, (lat, lon, d)


def test_a_coordinate_that_is_not_a_number_is_no_position():
    """A NaN latitude from the bus (no fix) ended the gateway with a traceback in the grid's
    math.floor; it is counted as no fix, and nothing leaves for it."""
    with pytest.raises(ValueError, match="not a position"):
        coarsen(math.nan, 10.0, 1000.0)
    assert not on_grid(math.nan, 10.0, 1000.0) and not on_grid(10.0, math.inf, 1000.0)
    import numpy as np

    from gateway.records import SignalSeries

    def series(name: str, values: list[float]) -> SignalSeries:
        t = np.arange(len(values), dtype=np.float64) * 10
        return SignalSeries(name, t, np.asarray(values, dtype=np.float64))

    stage = LocationStage("lat", "lon", 1000.0, 60.0, (), LocationLimiter(0.0, 0.0))
    out = stage.feed(
        [series("lat", [31.2, math.nan, 31.3, math.inf]), series("lon", [121.4] * 4)], True
    )
    assert [p[1:] for p in out] == [coarsen(31.2, 121.4, 1000.0), coarsen(31.3, 121.4, 1000.0)]
    assert stage.no_fix == 2
