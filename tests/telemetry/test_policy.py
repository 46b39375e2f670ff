"""The policy file: parsing, default deny, precision."""

from __future__ import annotations

import pytest

from gateway.errors import ConfigError
from gateway.records import SignalAggregate, WindowSummary
from gateway.telemetry.location import parse_geofences
from gateway.telemetry.policy import (
    Category,
    load_policy,
    parse_policy,
    permitted_signals,
    quantize,
)


def test_default_policy_names_the_owner_useful_kona_signals():
    p = load_policy(None)
    for sig in (
        "BMS_542.SocDisp",
        "Batt_HV_Status.VBatt",
        "BatteryCharging.Voltage_12V",
        "VCU_200.Range",
        "BodyState.IgnitionSw",
        "ID292BMS_SOC.SOCUI292",
    ):
        assert sig in p.rules
    assert all(r.category.sensitive for r in p.rules.values() if r.location is not None)


@pytest.mark.parametrize(
    ("value", "q", "expect"),
    [
        (36.5, 0.5, 36.5),
        (36.74, 0.5, 36.5),
        (354.90000000000003, 1, 355),
        (12.36, 0.1, 12.4),
        (203.0, 2, 204),
        (-0.04, 0.1, -0.0),
    ],
)
def test_quantize_rounds_to_the_grid_without_float_noise(value, q, expect):
    assert quantize(value, q) == expect


def test_a_signal_the_policy_does_not_name_never_leaves():
    p = load_policy(None)
    summary = WindowSummary(
        0,
        60,
        {
            "BMS_542.SocDisp": SignalAggregate(3, 36.0, 37.0, 36.5, 36.5, "%"),
            "VCU_109.UnkChargeRelated": SignalAggregate(3, 1.0, 2.0, 1.5, 2.0),
        },
    )
    out, used, _ = permitted_signals(p, summary, lambda c: True)
    assert list(out) == ["battery.soc"]
    assert set(out["battery.soc"]) == {"last", "min", "max", "unit"}
    assert used == ["signal:BMS_542.SocDisp"]


def test_sensitive_signal_is_withheld_without_consent():
    p = parse_policy(
        {"signal": [{"signal": "Cabin.Mic", "category": "cabin", "aggregates": ["max"]}]}, "t.toml"
    )
    summary = WindowSummary(0, 60, {"Cabin.Mic": SignalAggregate(1, 1.0, 1.0, 1.0, 1.0)})
    out, _, withheld = permitted_signals(p, summary, lambda c: c is not Category.CABIN)
    assert out == {} and withheld == ["signal:Cabin.Mic"]


def _loc(sig, axis):
    return {"signal": sig, "publish_as": sig, "category": "location", "location": axis}


def _fence(**kw):
    return {
        "policy": {"geofence": [{"name": "home", "lat": 31.2, "lon": 121.5, "radius_m": 500, **kw}]}
    }


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"signal": [{"signal": "NoDot"}]}, "[[signal]] #1.signal"),
        ({"signal": [{"signal": "A.B", "aggregates": ["median"]}]}, "[[signal]] #1.aggregates"),
        ({"signal": [{"signal": "A.B", "quantum": -1}]}, "quantum"),
        ({"signal": [{"signal": "A.B", "colour": 1}]}, "unknown key 'colour'"),
        ({"signal": [{"signal": "A.B"}, {"signal": "A.B"}]}, "named twice"),
        ({"signal": [{"signal": "A.B", "location": "latitude"}]}, 'category = "location"'),
        ({"policy": {"max_consent_days": 0}}, "max_consent_days"),
        # a grid finer than the GPS itself is no coarsening
        ({"policy": {"location_grid_m": 0.01}}, "location_grid_m must be at least 100 m"),
        ({"rules": {}}, "unknown section [rules]"),
        # a fence that can contain no position would let every position near it out
        (_fence(radius_m=float("nan")), "[[policy.geofence]] #1"),
        (_fence(radius_m=-500), "radius_m must be > 0"),
        (_fence(radius_m=float("inf")), "finite"),
        (_fence(lat=312.304), "latitude must be -90 to 90"),
        (_fence(lon=-181), "longitude -180 to 180"),
        (_fence(radius_m=True), "not a number"),
        (_fence(radius=500), "unknown key 'radius'"),
        ({"policy": {"geofence": [{"lat": 1, "lon": 2}]}}, "'radius_m' is missing"),
        (_fence(polygon=[[0, 0], [0, 1], [1, 1]]), "a circle or a polygon, not both"),
        ({"policy": {"geofence": [{"polygon": [[0, 0], [0, 1], [91, 1]]}]}}, "latitude"),
        ({"policy": {"geofence": [{"polygon": [[0, 0], [0, 1], [1]]}]}}, "a point is [lat, lon]"),
        # NaN compares false with everything: a trip would never start, or never end
        ({"trips": {"moving_kph": float("nan")}}, "[trips].moving_kph must be a positive"),
        ({"trips": {"end_after_s": float("inf")}}, "[trips].end_after_s must be a positive"),
        ({"trips": {"battery_kwh": True}}, "[trips].battery_kwh must be a positive"),
        ({"trips": {"drive_states": [["D"]]}}, "[trips].drive_states must be a non-empty list"),
        ({"trips": {"drive_states": []}}, "[trips].drive_states must be a non-empty list"),
        ({"trips": {"gear": "DI_gear"}}, "[trips].gear must be 'Message.Signal'"),
        # found by a sweep: each was accepted, and failed later or silently
        ({"signal": [{"signal": "A.B", "quantum": 1e-310}]}, "quantum must be a number from"),
        ({"policy": {"max_consent_days": 1e12}}, "max_consent_days must be at most 365"),
        ({"policy": {"location_grid_m": 3e7}}, "location_grid_m must be at most 100000"),
        ({"policy": {"version": True}}, "[policy].version must be an integer from 1"),
        ({"policy": {"version": 0}}, "[policy].version must be an integer from 1"),
        ({"policy": {"name": ""}}, "[policy].name must be a non-empty string"),
        ({"signal": [{"signal": "A.B", "publish_as": ""}]}, "publish_as must be a non-empty"),
        ({"signal": [{"signal": "."}]}, "[[signal]] #1.signal must be 'Message.Signal'"),
        (
            {
                "signal": [
                    {"signal": "A.B", "publish_as": "x"},
                    {"signal": "A.C", "publish_as": "x"},
                ]
            },
            "publish_as 'x' is used by two signals (A.B, A.C)",
        ),
        (
            {"signal": [_loc("A.Lat", "latitude"), _loc("A.Speed", "latitude")]},
            'location = "latitude" is given to two signals (A.Lat, A.Speed)',
        ),
        ({"signal": [_loc("A.Lat", "latitude")]}, "without a signal for the other axis"),
        (_fence(name={"a": 1}), "name must be a string"),
        (_fence(lat="31.2"), "is not a number"),
        (
            {"policy": {"geofence": [{"polygon": [[1, 2], [1, 2], [1, 2]]}]}},
            "on one line: it encloses nothing",
        ),
        (  # on one line in a city: the shoelace's rounding gave 4.5e-13, and it was taken
            {
                "policy": {
                    "geofence": [{"polygon": [[31.20, 121.44], [31.21, 121.45], [31.22, 121.46]]}]
                }
            },
            "on one line: it encloses nothing",
        ),
        ({"policy": {"geofence": [{"polygon": [{"lat": 1}, [0, 1], [1, 1]]}]}}, "a point is"),
    ],
)
def test_policy_mistakes_are_named(raw, needle):
    with pytest.raises(ConfigError) as exc:
        parse_policy(raw, "p.toml")
    assert needle in str(exc.value) and "p.toml" in str(exc.value)


def test_a_policy_is_the_same_after_its_lookups_are_cached_and_it_is_pickled():
    import copy
    import pickle

    policy = load_policy(None)
    by_name = policy.by_publish_name()
    assert by_name == {r.publish_as: r for r in policy.rules.values()}
    assert all(r.allowed == {a.value for a in r.aggregates} | {"unit"} for r in by_name.values())
    for again in (pickle.loads(pickle.dumps(policy)), copy.deepcopy(policy)):
        assert again == policy and again.by_publish_name() == by_name


def test_good_geofences_and_trip_settings_are_read_as_given():
    """What the checks above refuse, and nothing more: circles, polygons (either way round the
    antimeridian's neighbourhood), numeric gear states."""
    p = parse_policy(
        {
            "policy": {
                "geofence": [
                    {"name": "home", "lat": -33.87, "lon": 151.21, "radius_m": 250},
                    {"name": "work", "polygon": [[10, 179.9], [10.1, 179.9], [10.1, 180]]},
                    {"lat": 31.2, "lon": 121.5, "radius_m": 1e3},
                ]
            },
            "trips": {"gear": "G.Gear", "drive_states": ["D", 4], "moving_kph": 3, "odometer": ""},
        },
        "p.toml",
    )
    assert len(p.geofences) == 3
    assert p.trips.drive_states == ("D", "4") and p.trips.moving_kph == 3.0
    fences = parse_geofences(p.geofences, "p.toml")
    assert fences[0].contains(-33.87, 151.21) and not fences[0].contains(-33.9, 151.21)
    assert fences[2].circle == (31.2, 121.5, 1000.0)


def test_the_policy_reference_documents_every_key_category_and_aggregate():
    """docs/policy.md is the reference a policy author reads: a key the parser accepts but the
    reference does not name is a key nobody can find out about."""
    import re
    from pathlib import Path

    from gateway.telemetry import location, policy, trips

    doc = (Path(__file__).resolve().parents[2] / "docs" / "policy.md").read_text()
    named = set(re.findall(r"`([a-z_]+)`", doc))
    expected = (
        policy._POLICY_KEYS
        | policy._RULE_KEYS
        | trips._KEYS
        | location._FENCE_KEYS
        | {c.value for c in policy.Category}
        | {a.value for a in policy.Aggregate}
    )
    assert expected - named == set()


@pytest.mark.parametrize(("lat", "lon"), [(89.9999, 179.9999), (-89.9999, -179.9999), (90, 180)])
@pytest.mark.parametrize("grid_m", [100.0, 1000.0, 100_000.0])
def test_a_coarsened_position_stays_on_the_globe_and_on_its_grid(lat, lon, grid_m):
    """Near a pole or the antimeridian a cell's centre fell beyond +-90 / +-180 degrees."""
    from gateway.telemetry.location import coarsen, on_location_grid

    clat, clon = coarsen(lat, lon, grid_m)
    assert -90 <= clat <= 90 and -180 <= clon <= 180
    assert on_location_grid(clat, clon, grid_m)  # what the guard checks


def test_a_position_named_as_an_ordinary_signal_is_a_warning(caplog):
    """It leaves as exact window values: the policy is legal, but almost surely a mistake."""
    raw = {"signal": [{"signal": "ID04FGPSLatLong.GPSLatitude04F", "quantum": 1e-6}]}
    parse_policy(raw, "p.toml")
    assert 'no location = "latitude" or "longitude"' in caplog.text
    assert "and without consent" in caplog.text
    caplog.clear()
    parse_policy(
        {"signal": [_loc("G.Latitude", "latitude"), _loc("G.Longitude", "longitude")]}, "p.toml"
    )
    assert caplog.text == ""


def test_a_rule_whose_aggregates_do_not_exist_for_its_signal_publishes_nothing_and_says_so(
    caplog,
):
    """A gear (a list of states) with mean/max published an empty entry in every window."""
    p = parse_policy(
        {"signal": [{"signal": "G.Gear", "publish_as": "gear", "aggregates": ["mean", "max"]}]},
        "p.toml",
    )
    states = SignalAggregate(3, None, None, None, "D", states={"D": 2, "P": 1})
    summary = WindowSummary(0, 60, {"G.Gear": states})
    for _ in range(2):
        out, used, _ = permitted_signals(p, summary, lambda c: True)
        assert out == {} and used == []
    said = [r for r in caplog.records if "none of its aggregates (mean, max)" in r.message]
    assert len(said) == 1 and "give some of: count, last, states" in said[0].message


@pytest.mark.parametrize("value", [9e307, 1.7e308, -1.7e308, 1e300])
@pytest.mark.parametrize("quantum", [0.5, 0.01, 1e-10])
def test_a_value_near_the_largest_float_is_on_every_fine_grid_and_does_not_end_the_gateway(
    value, quantum
):
    """``round(9e307 / 0.5)`` raised OverflowError: one CAN frame ended a replay. Such a value
    is a whole number far past 2**53, a multiple of any quantum under 1 already."""
    from gateway.telemetry.policy import on_grid

    assert quantize(value, quantum) == value
    assert on_grid(value, quantum)
