"""The guard fails closed: only declared schemas, fields, signals, aggregates and precision."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gateway.egress.guard import EgressGuard, Outgoing, Released
from gateway.egress.schema import Topics, unpack
from gateway.telemetry.policy import Category, load_policy


@pytest.fixture
def guard():
    blocks: list[tuple[str, str]] = []
    seq = itertools.count()
    consent = {"location": False}
    g = EgressGuard(
        load_policy(None),
        Topics("vehicles", "VIN1"),
        consent_ok=lambda c: not c.sensitive or consent.get(c.value, False),
        consent_snapshot=lambda: {},
        next_seq=lambda: next(seq),
        on_block=lambda out, why: blocks.append((out.schema, why)),
    )
    g.blocks = blocks  # type: ignore[attr-defined]
    g.consent = consent  # type: ignore[attr-defined]
    return g


def _signals(signals, rules=("signal:BMS_542.SocDisp",), **extra):
    body = {"window": [0.0, 60.0], "policy": "owner-default@1", "signals": signals, **extra}
    return Outgoing("gateway.signals", body, tuple(rules))


def test_a_permitted_summary_passes_packed_with_header_and_sequence(guard):
    msg = guard.release(_signals({"battery.soc": {"last": 36.5, "unit": "%"}}))
    assert isinstance(msg, Released)
    assert msg.topic == "vehicles/VIN1/owner/signals"
    body = unpack(msg.payload)
    assert body["schema"] == "gateway.signals" and body["v"] == 1 and body["seq"] == 0


@pytest.mark.parametrize(
    ("out", "reason"),
    [
        (_signals({"battery.soc": {"last": 36.5}}, secret=1), "field 'secret' is not in schema"),
        (_signals({"vin": {"last": 1.0}}), "not permitted by policy"),
        (_signals({"battery.soc": {"last": 36.57}}), "finer than the permitted precision"),
        # a number as text is a number: on the grid too, or blocked
        (_signals({"battery.soc": {"last": "36.57"}}), "finer than the permitted precision"),
        (_signals({"battery.soc": {"min": "36.5"}}), "is not a number"),
        (_signals({"battery.soc": {"mean": 36.5}}), "aggregate 'mean' is not permitted"),
        (_signals({"battery.soc": {"last": np.zeros((720, 1280, 3), np.uint8)}}), "may not leave"),
        (_signals({"battery.soc": {"last": np.float64(36.5)}}), "not a plain number"),
        (_signals({"battery.soc": {"last": b"\x01\x02\x03\x04\x05\x06\x07\x08"}}), "may not leave"),
        (_signals({"battery.soc": {"last": 36.5}}, rules=()), "not covered by the rules"),
        (
            _signals(
                {"position.lat": {"last": 31.2}}, rules=("signal:ID04FGPSLatLong.GPSLatitude04F",)
            ),
            "location stream",
        ),
        (Outgoing("gateway.frames", {"data": b"raw"}), "not declared"),
        (
            Outgoing("gateway.signals", {"window": [0, 1], "policy": "other@9", "signals": {}}),
            "not the one in force",
        ),
        (
            Outgoing(
                "gateway.location",
                {
                    "window": [0, 1],
                    "policy": "owner-default@1",
                    "lat": 31.0,
                    "lon": 121.0,
                    "grid_m": 1000,
                    "consent_until": 0,
                },
            ),
            "without valid location consent",
        ),
    ],
)
def test_the_guard_blocks_and_records(guard, out, reason):
    assert guard.release(out) is None
    assert guard.blocked == 1
    assert reason in guard.blocks[0][1]


def test_an_over_precise_position_is_blocked_even_with_consent(guard):
    guard.consent["location"] = True
    out = Outgoing(
        "gateway.location",
        {
            "window": [0, 1],
            "policy": "owner-default@1",
            "lat": 31.230416,
            "lon": 121.473701,
            "grid_m": 1000,
            "consent_until": 9e9,
        },
    )
    assert guard.release(out) is None
    assert "grid" in guard.blocks[0][1]


def test_released_messages_cannot_be_made_outside_the_guard():
    with pytest.raises(TypeError):
        Released("t", b"x", "gateway.signals", 1, (), {}, False)


def test_category_sensitivity_follows_gb_t_41871():
    assert Category.LOCATION.sensitive and Category.CABIN.sensitive
    assert not Category.VEHICLE_STATUS.sensitive


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ({"a": {"b": [1, 2.5, float("nan")]}}, "body.a.b[2]: not a finite number"),
        ({"a": [{"x": 1}, {"y": np.float64(1)}]}, "body.a[1].y: float64 is not a plain number"),
        ({"a": {"b": np.float64("inf")}}, "body.a.b: not a finite number"),
        ({"a": {3: 1}}, "body.a: non-string key 3"),
        ({"a": list(range(65))}, "body.a: list of 65 items (bulk data is not a summary)"),
        ({"a": {"b": bytearray(b"x")}}, "body.a.b: builtins.bytearray may not leave"),
        ({"a": (1, ["s", None, True, {"z": set()}])}, "body.a[1][3].z: builtins.set may not"),
    ],
)
def test_a_value_that_is_not_plain_is_named_by_its_path(value, said) -> None:
    from gateway.egress.guard import Blocked, _plain

    with pytest.raises(Blocked) as exc:
        _plain(value, "body")
    assert exc.value.reason.startswith(said), exc.value.reason


def test_plain_values_pass() -> None:
    from gateway.egress.guard import _plain

    _plain({"a": [1, 2.5, -0.0, "s", None, True, {"b": (1, 2)}], "c": {}}, "body")


def test_state_names_pass_and_numbers_among_states_must_be_on_the_grid(tmp_path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(
        '[policy]\nname = "p"\nversion = 1\n\n[[signal]]\nsignal = "M.S"\n'
        'publish_as = "s"\naggregates = ["last", "states"]\nquantum = 10\n'
    )
    seq = itertools.count()
    g = EgressGuard(
        load_policy(str(policy)),
        Topics("vehicles", "VIN1"),
        consent_ok=lambda c: True,
        consent_snapshot=lambda: {},
        next_seq=lambda: next(seq),
    )

    def out(values):
        body = {"window": [0.0, 60.0], "policy": "p@1", "signals": {"s": values}}
        return Outgoing("gateway.signals", body, ("signal:M.S",))

    assert g.release(out({"last": "SNA", "states": {"SNA": 2, "120": 3, "NaN": 1}}))
    assert g.release(out({"last": 130, "states": {"BLOCKED": 1}}))
    for bad in ({"last": "123"}, {"states": {"SNA": 1, "123.5": 2}}, {"states": {123: 1}}):
        assert g.release(out(bad)) is None, bad


def test_a_ledger_line_cannot_be_matched_to_its_message_by_trying_the_values_it_may_hold(guard):
    """The ledger keeps each message's sha256 (and size, sequence number, window). A position
    has few possible values: hashing the message as the guard packs it, for every cell of a
    50 km square, found a deleted position in seconds. 128 random bits in each message (its
    ``salt``) leave the sha256 matchable only with the message itself."""
    import hashlib

    from gateway.egress.schema import pack
    from gateway.telemetry.location import coarsen

    guard.consent["location"] = True
    cells = sorted(
        {coarsen(31.2 + i * 0.01, 121.4 + j * 0.01, 1000) for i in range(10) for j in range(10)}
    )
    secret = cells[37]

    def body(lat, lon):
        return {
            "window": [600.0, 660.0],
            "policy": "owner-default@1",
            "lat": lat,
            "lon": lon,
            "grid_m": 1000.0,
            "consent_until": 0.0,
        }

    msg = guard.release(Outgoing("gateway.location", body(*secret), ("location",)))
    assert msg is not None
    # what a holder of the ledger knows besides the sha256: the schema, version and sequence
    head = {"schema": "gateway.location", "v": 1, "seq": msg.seq}
    tried = {hashlib.sha256(pack({**head, **body(*cell)})).hexdigest() for cell in cells}
    assert msg.sha256 not in tried
    # the message itself still matches its line, as ``gateway audit`` and the owner check it
    assert hashlib.sha256(msg.payload).hexdigest() == msg.sha256
    again = guard.release(Outgoing("gateway.location", body(*secret), ("location",)))
    assert again is not None and unpack(again.payload)["salt"] != unpack(msg.payload)["salt"]


def test_a_sender_cannot_choose_the_salt(guard):
    out = _signals({"battery.soc": {"last": 36.5}}, salt="0" * 32)
    assert guard.release(out) is None
    assert "set by the guard" in guard.blocks[-1][1]
