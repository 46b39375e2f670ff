"""End to end on the real Kona EV log and a real Mosquitto broker: what the owner receives."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import can
import cantools
import numpy as np
import pytest

from gateway.egress.schema import HEADER_FIELDS, SCHEMAS, unpack
from gateway.telemetry.policy import load_policy, quantize
from tests.conftest import (
    FIXTURES,
    KONA,
    KONA_CANDUMP,
    KONA_CCAN,
    KONA_CSV,
    KONA_PCAN,
    replay_args,
    run_gateway,
    unsalted,
)

pytestmark = pytest.mark.broker
WINDOW = 5.0


def _replay(tmp_path: Path, broker_url: str, vin: str, *extra: str, log: Path = KONA_CSV):
    dbcs = [f"can0={KONA_PCAN}", f"can1={KONA_CCAN}"]
    return run_gateway(
        *replay_args(log, dbcs, broker_url, vin, tmp_path, "--window", str(WINDOW), "-q", *extra)
    )


def _reference_windows() -> dict[float, dict[str, dict[str, float]]]:
    """Independently of the gateway: python-can's own candump reader + cantools per frame."""
    pcan = cantools.database.load_file(str(KONA / "kona_pcan.cantools.dbc"))
    policy = load_policy(None)
    wanted = {
        name: rule
        for name, rule in policy.rules.items()
        if name.startswith(("BMS_542", "Batt_HV", "BatteryCharging", "VCU_200"))
    }
    samples: dict[tuple[float, str], list[tuple[float, float]]] = defaultdict(list)
    for msg in can.LogReader(str(KONA_CANDUMP)):
        if msg.channel != "can0":
            continue
        try:
            m = pcan.get_message_by_frame_id(msg.arbitration_id)
        except KeyError:
            continue
        values = m.decode(msg.data, decode_choices=False, allow_truncated=True)
        for sig, v in values.items():
            name = f"{m.name}.{sig}"
            if name in wanted:
                start = np.floor(msg.timestamp / WINDOW) * WINDOW
                samples[(start, name)].append((msg.timestamp, float(v)))
    out: dict[float, dict[str, dict[str, float]]] = defaultdict(dict)
    for (start, name), pts in samples.items():
        vals = np.array([v for _, v in pts])
        rule = wanted[name]
        out[start][rule.publish_as] = {
            "last": quantize(pts[-1][1], rule.quantum),
            "min": quantize(vals.min(), rule.quantum),
            "max": quantize(vals.max(), rule.quantum),
            "mean": quantize(vals.mean(), rule.quantum),
        }
    return out


def _signals(messages) -> list[dict]:
    return [unsalted(unpack(m.payload)) for m in messages if m.topic.endswith("/owner/signals")]


def test_owner_receives_summaries_equal_to_an_independent_cantools_computation(
    tmp_path, broker, vin, listen
):
    # GIVEN an observer on every topic of the broker
    lst = listen(broker.url, "#")
    # WHEN the real 2019 Kona P-CAN + C-CAN log is replayed as fast as possible
    proc = _replay(tmp_path, broker.url, vin, "--fast")
    assert proc.returncode == 0, proc.stderr
    messages = lst.settle()
    # THEN everything published is under the owner's prefix
    ours = [m for m in messages if f"/{vin}/" in m.topic]
    assert ours, "nothing was published"
    assert all(m.topic.startswith(f"vehicles/{vin}/owner/") for m in ours)
    got = {p["window"][0]: p["signals"] for p in _signals(ours)}
    ref = _reference_windows()
    assert set(ref) <= set(got)
    for start, signals in ref.items():
        for name, agg in signals.items():
            published = got[start][name]
            for key, value in published.items():
                if key == "unit":
                    continue
                if key == "mean":
                    rule = load_policy(None).by_publish_name()[name]
                    assert abs(value - agg[key]) <= rule.quantum + 1e-9, (start, name, key)
                else:
                    assert value == agg[key], (start, name, key, value, agg[key])
    # the known facts of this log
    socs = [s["battery.soc"]["last"] for s in got.values() if "battery.soc" in s]
    assert socs and set(socs) == {36.5}
    hv = [s["battery.hv_voltage"]["mean"] for s in got.values() if "battery.hv_voltage" in s]
    assert hv and all(350 <= v <= 360 for v in hv)
    ign = [s["ignition"] for s in got.values() if "ignition" in s]
    seen_states = set().union(*(i["states"] for i in ign))
    assert {"Off", "On"} <= seen_states


def test_fast_and_speed_50_publish_identical_summaries(tmp_path, broker, listen):
    results = []
    for i, pace in enumerate((["--fast"], ["--speed", "50"])):
        vin = f"TESTSPEED{i}{tmp_path.name[-7:].upper():0>7}"[:17]
        lst = listen(broker.url, f"vehicles/{vin}/owner/#")
        (tmp_path / str(i)).mkdir()
        proc = _replay(tmp_path / str(i), broker.url, vin, *pace)
        assert proc.returncode == 0, proc.stderr
        results.append(_signals(lst.settle()))
    assert results[0], "no summaries"
    assert results[0] == results[1]


def test_published_bytes_are_plain_summaries_and_never_raw_frames(tmp_path, broker, vin, listen):
    lst = listen(broker.url, f"vehicles/{vin}/#")
    proc = _replay(tmp_path, broker.url, vin, "--fast", log=KONA_CANDUMP)
    assert proc.returncode == 0, proc.stderr
    messages = lst.settle()
    assert messages
    policy = load_policy(None)
    allowed = set(policy.by_publish_name())
    raw_payloads = set()
    raw_bytes = 0
    for msg in can.LogReader(str(KONA_CANDUMP)):
        raw_bytes += len(msg.data)
        # distinctive payloads only: 8 zero bytes are also how msgpack writes the number 0.0
        if len(msg.data) == 8 and len(set(msg.data)) >= 4:
            raw_payloads.add(bytes(msg.data))
    assert len(raw_payloads) > 1000  # the search below has something to find
    published = 0
    for m in messages:
        published += len(m.payload)
        body = unpack(m.payload)
        schema = SCHEMAS[body["schema"]]
        assert body["v"] == schema.version
        assert set(body) - set(HEADER_FIELDS) <= set(schema.fields)
        if body["schema"] == "gateway.signals":
            assert set(body["signals"]) <= allowed
        for raw in raw_payloads:
            assert raw not in m.payload
    assert published < 0.02 * raw_bytes, (published, raw_bytes)


def test_a_numeric_signal_with_a_few_named_values_never_leaves_finer_than_its_rule(
    tmp_path, broker, vin, listen
):
    """A parking sensor's distance (Model 3 DBC, 9 bits, cm) whose DBC names four special
    values (BLOCKED, NEAR_DETECTION, NO_OBJECT_DETECTED, SNA) is read as a list of states; its
    other values, the distances, left as text at full precision, past ``quantum``."""
    from gateway.telemetry.policy import load_policy as load

    dbc = FIXTURES / "model3" / "Model3CAN.dbc"
    msg = cantools.database.load_file(str(dbc), strict=False).get_message_by_name(
        "ID20EPARK_sdiFront"
    )
    # GIVEN a log of that message with random distances, the named values among them
    rng = np.random.default_rng(5)
    dist = rng.integers(0, 512, 600)
    dist[::7] = rng.choice([0, 1, 500, 511], len(dist[::7]))
    log = tmp_path / "park.log"
    with can.Logger(str(log)) as out:
        for i, d in enumerate(dist.tolist()):
            data = bytearray(8)
            data[0], data[1] = d & 0xFF, d >> 8  # PARK_sdiSensor1RawDistData: bits 0..8
            out.on_message_received(
                can.Message(timestamp=1_750_000_000 + i * 0.1, arbitration_id=msg.frame_id,
                            data=bytes(data), is_extended_id=False, channel="can0")
            )  # fmt: skip
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[policy]\nname = "park"\nversion = 1\n\n[[signal]]\n'
        'signal = "ID20EPARK_sdiFront.PARK_sdiSensor1RawDistData"\npublish_as = "park"\n'
        'aggregates = ["count", "last", "states", "mean"]\nquantum = 10\n'
    )
    rule = load(str(policy)).by_publish_name()["park"]
    lst = listen(broker.url, f"vehicles/{vin}/owner/signals")
    # WHEN it is replayed with a rule that allows a 10 cm grid
    proc = run_gateway(
        *replay_args(log, [str(dbc)], broker.url, vin, tmp_path, "--fast", "-q",
                     "--window", "10", "--policy", str(policy))
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # THEN the owner gets names, or numbers on the 10 cm grid, never a finer value
    park = [unpack(m.payload)["signals"]["park"] for m in lst.settle()]
    assert len(park) >= 5
    names = {"BLOCKED", "NEAR_DETECTION", "NO_OBJECT_DETECTED", "SNA"}
    lasts = [p["last"] for p in park]
    keys = [k for p in park for k in p["states"]]
    assert any(isinstance(v, int | float) for v in lasts)  # the positive control: a distance
    for v in lasts:
        assert v in names if isinstance(v, str) else v % 10 == 0, v
    for k in keys:
        assert k in names or float(k) % 10 == 0, k
    assert sum(sum(p["states"].values()) for p in park) == sum(p["count"] for p in park)
    assert rule.quantum == 10
    # AND the policy author is told, once, that mean does not exist for a list of states
    said = [ln for ln in proc.stderr.splitlines() if "mean" in ln and "left out" in ln]
    assert len(said) == 1, proc.stderr
