"""Trip detection from gear and speed samples: start, end, distance, energy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.records import SignalSeries, choices_for
from gateway.telemetry.trips import TripConfig, TripDetector
from tests.telemetry.trip_reference import ScalarTripDetector

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


GEAR_NAMES = {1.0: "P", 2.0: "R", 3.0: "N", 4.0: "D"}


def _timeline(rng: np.random.Generator, seconds: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Samples on a coarse time grid (ties within and across signals are common): a gear that
    changes in runs, speeds with some "SNA" readings, odometer, SOC and a position."""

    def times(rate: float) -> np.ndarray:
        n = rng.poisson(seconds * rate)
        return np.sort(np.round(rng.uniform(0, seconds, n) * 4) / 4)

    gt = times(rng.choice([0.2, 1.0, 5.0]))
    runs = rng.choice(list(GEAR_NAMES), size=max(1, len(gt) // 6 + 1), p=[0.4, 0.1, 0.1, 0.4])
    gv = np.repeat(runs, 6)[: len(gt)].astype(float)
    st = times(rng.choice([1.0, 4.0]))
    sv = np.where(rng.random(len(st)) < 0.1, 511.5, np.round(rng.uniform(0, 90, len(st)), 1))
    if rng.random() < 0.3:
        sv[rng.random(len(st)) < 0.5] = 0.0  # parked stretches for speed-only trips
    ot = times(0.5)
    ov = 1000 + np.cumsum(rng.uniform(0, 0.05, len(ot)))
    ct = times(0.2)
    cv = 80 - np.cumsum(rng.uniform(0, 0.2, len(ct)))
    lt = times(1.0)
    return {
        "gear": (gt, gv),
        "speed": (st, sv),
        "odo": (ot, ov),
        "soc": (ct, cv),
        "lat": (lt, 31 + rng.uniform(0, 0.1, len(lt))),
        "lon": (lt + rng.choice([0.0, 0.25]), 121 + rng.uniform(0, 0.1, len(lt))),
    }


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    with_gear=st.booleans(),
    extras=st.integers(0, 15),
    scrambled=st.booleans(),
)
def test_vectorised_trips_equal_the_per_sample_machine(seed, with_gear, extras, scrambled):
    """Trips, bit for bit, whatever the cut into batches, the ties in time, the signals present,
    and with ``scrambled`` samples out of time order within their series (a log whose time
    runs back)."""
    rng = np.random.default_rng(seed)
    cfg = TripConfig(
        gear="D.gear" if with_gear else "",
        speed="D.speed",
        odometer="D.odo" if extras & 1 else "",
        soc="D.soc" if extras & 2 else "",
        latitude="D.lat" if extras & 4 else "",
        longitude="D.lon" if extras & 8 else "",
        end_after_s=float(rng.choice([0.5, 5.0, 30.0])),
    )
    seconds = float(rng.choice([20.0, 200.0, 900.0]))
    line = _timeline(rng, seconds)
    meta = {
        "gear": ("", choices_for(3, GEAR_NAMES)),
        "speed": ("kph", choices_for(10, {511.5: "SNA"})),
    }
    cuts = np.sort(np.r_[0.0, rng.uniform(0, seconds, rng.integers(0, 12)), seconds + 1])
    fast, slow = TripDetector(cfg), ScalarTripDetector(cfg)
    got, want = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        batch = []
        for role, (t, v) in line.items():
            keep = (t >= lo) & (t < hi)
            if keep.any() or rng.random() < 0.5:
                unit, choices = meta.get(role, ("", None))
                bt, bv = t[keep], v[keep]
                if scrambled and rng.random() < 0.7:
                    order = rng.permutation(len(bt))
                    bt, bv = bt[order], bv[order]
                batch.append(SignalSeries(f"D.{role}", bt, bv, unit, choices))
        rng.shuffle(batch)
        got += fast.feed(batch)
        want += slow.feed(batch)
    got += fast.flush(seconds)
    want += slow.flush(seconds)
    assert got == want


def test_a_moving_sample_at_minus_infinity_still_counts_as_moving():
    """The prefix maximum must not take -inf for 'nothing moved yet' (found in review)."""
    cfg = TripConfig(gear="D.gear", end_after_s=30.0)
    batch = [
        SignalSeries(
            "D.gear", np.array([-np.inf, 100.0]), np.array([4.0, 1.0]), "", choices_for(3, GEARS)
        )
    ]
    assert TripDetector(cfg).feed(batch) == ScalarTripDetector(cfg).feed(batch)


@pytest.mark.parametrize(
    ("seconds", "published"), [(20.0, 60.0), (29.0, 60.0), (95.0, 120.0), (0.0, 0.0)]
)
def test_a_short_trip_is_published_as_at_least_a_minute_long(tmp_path, seconds, published):
    from gateway.app import Gateway
    from gateway.egress.outbox import Outbox
    from gateway.egress.schema import unpack
    from gateway.telemetry.trips import Trip
    from tests.conftest import KONA_PCAN, gateway_settings

    # GIVEN a gateway (no sources) and a trip shorter than the minute durations are rounded to
    gw = Gateway(gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}), [])
    try:
        # WHEN its summary is published
        gw.publish_trip(Trip(1_750_000_000.0, 1_750_000_000.0 + seconds, 0.4, 0.1, None, None))
    finally:
        gw.outbox.close()
        gw.ledger.close()
    # THEN its duration is on the minute grid, but not 0 next to a distance
    trips = [unpack(m.payload) for m in Outbox(tmp_path / "o.sqlite").peek(10)]
    trips = [t for t in trips if t.get("schema") == "gateway.trip"]
    assert len(trips) == 1
    trip = trips[0]
    assert trip["duration_s"] == published and trip["distance_km"] == 0.4
    assert trip["end"] - trip["start"] == published and trip["start"] % 60 == 0


def test_a_trip_without_state_of_charge_readings_has_no_energy_not_zero(tmp_path):
    from gateway.app import Gateway
    from gateway.egress.outbox import Outbox
    from gateway.egress.schema import unpack
    from gateway.telemetry.trips import Trip
    from tests.conftest import KONA_PCAN, gateway_settings

    policy = tmp_path / "p.toml"
    policy.write_text(
        '[policy]\nname = "p"\nversion = 1\n\n[[signal]]\nsignal = "BMS_542.SocDisp"\n'
        'publish_as = "soc"\naggregates = ["last"]\n\n[trips]\n'
        'gear = "ID118DriveSystemStatus.DI_gear"\nspeed = "ID257DIspeed.DI_vehicleSpeed"\n'
    )
    gw = Gateway(gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}, policy=str(policy)), [])
    try:
        gw.publish_trip(Trip(1_750_000_000.0, 1_750_000_600.0, 7.6, None, None, None))
    finally:
        gw.outbox.close()
        gw.ledger.close()
    (trip,) = [unpack(m.payload) for m in Outbox(tmp_path / "o.sqlite").peek(10)]
    assert trip["distance_km"] == 7.6 and "energy_kwh" not in trip


def test_a_trip_whose_positions_were_forgotten_has_no_start_or_end_position():
    cfg = TripConfig(gear="D.gear", latitude="G.lat", longitude="G.lon", end_after_s=30.0)
    gear = SignalSeries("D.gear", np.arange(0.0, 20), np.full(20, 4.0), "", choices_for(3, GEARS))
    fix = [
        SignalSeries(n, np.array([0.5]), np.array([v]), "")
        for n, v in (("G.lat", 31.2), ("G.lon", 121.4))
    ]
    trips = TripDetector(cfg)
    assert trips.feed([gear, *fix]) == [] and trips.running_since == 0.0
    assert trips.forget_positions()
    parked = SignalSeries(
        "D.gear", np.arange(20.0, 60), np.full(40, 1.0), "", choices_for(3, GEARS)
    )
    (trip,) = trips.feed([parked])
    assert (trip.start, trip.start_pos, trip.end_pos) == (0.0, None, None)
