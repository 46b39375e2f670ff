"""The policy file: parsing, default deny, precision."""

from __future__ import annotations

import pytest

from gateway.errors import ConfigError
from gateway.records import SignalAggregate, WindowSummary
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
