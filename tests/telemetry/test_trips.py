"""Trip detection from gear and speed samples: start, end, distance, energy."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.records import SignalSeries, choices_for
from gateway.telemetry.trips import TripConfig, TripDetector

CFG = TripConfig(gear="D.gear", speed="D.speed", soc="D.soc", end_after_s=30.0)
GEARS = {1.0: "P", 4.0: "D"}


def _drive(speed_values: np.ndarray, t: np.ndarray) -> list[SignalSeries]:
    """P for 10 s, D while ``t`` runs, P for 60 s after; SOC falls by 1 % over the drive."""
    gear_t = np.r_[np.arange(0, 10.0), t, np.arange(t[-1] + 1, t[-1] + 61)]
    gear_v = np.r_[np.full(10, 1.0), np.full(t.size, 4.0), np.full(60, 1.0)]
    return [
        SignalSeries("D.gear", gear_t, gear_v, "", choices_for(3, GEARS)),
        SignalSeries("D.speed", t, speed_values, "kph", choices_for(10, {511.5: "SNA"})),
        SignalSeries("D.soc", np.array([9.0, t[-1] + 1]), np.array([80.0, 79.0]), "%"),
    ]


def test_a_drive_at_36_kph_for_100_s_is_one_km():
    t = np.arange(10.0, 110.0, 0.5)
    (trip,) = TripDetector(CFG).feed(_drive(np.full(t.size, 36.0), t))
    assert trip.start == 10.0 and trip.end == t[-1]
    assert trip.distance_km == pytest.approx(36.0 * (t[-1] - t[0]) / 3600)
    assert trip.energy_kwh == pytest.approx(0.01 * CFG.battery_kwh)


def test_sna_speed_samples_are_no_reading_and_add_no_distance():
    t = np.arange(10.0, 110.0, 0.5)
    clean = TripDetector(CFG).feed(_drive(np.full(t.size, 36.0), t))[0]
    speeds = np.full(t.size, 36.0)
    speeds[::7] = 511.5  # the DBC's "SNA": 1023 raw at 0.5 km/h per bit
    (trip,) = TripDetector(CFG).feed(_drive(speeds, t))
    assert trip.distance_km == pytest.approx(clean.distance_km, rel=0.01)
    assert trip.distance_km < 1.05
