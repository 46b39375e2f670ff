"""``gateway synth``: the synthetic Model 3 drive decodes, with python-can and cantools alone, to
the ground truth it was made from; and the bundled drive feeds location, trips and consent."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import can
import numpy as np
import pytest

from gateway.canbus.dbc import load_dbc
from gateway.egress.schema import unpack
from gateway.synth import DEFAULT_VIN, load_route, simulate, synthesise
from gateway.validate import OWN_FIGURES, _coarse
from tests.conftest import FIXTURES, KONA_PCAN, assert_one_line_error, replay_args, run_gateway

DBC = FIXTURES / "model3" / "Model3CAN.dbc"
BUNDLED = FIXTURES / "model3" / "model3_synthetic_drive.log"


def _metres(lat1, lon1, lat2, lon2):
    k = math.pi / 180
    x = (lon2 - lon1) * k * math.cos((lat1 + lat2) / 2 * k)
    return math.hypot(x, (lat2 - lat1) * k) * 6_371_008.8


def _decode_all(path: Path):
    """Reference decoding: python-can's candump reader and cantools, one frame at a time."""
    db = load_dbc(DBC)
    by_sig: dict[str, list[tuple[float, float]]] = defaultdict(list)
    vin_parts: dict[int, int] = {}
    raw: dict[int, list[bytes]] = defaultdict(list)
    n = 0
    for msg in can.LogReader(str(path)):
        n += 1
        m = db.get_message_by_frame_id(msg.arbitration_id)
        raw[msg.arbitration_id].append(bytes(msg.data))
        vals = m.decode(msg.data, decode_choices=False)
        if m.name == "ID405VIN":
            mux = int(vals["mux405"])
            vin_parts[mux] = int(next(v for k, v in vals.items() if k != "mux405"))
            continue
        for k, v in vals.items():
            by_sig[f"{m.name}.{k}"].append((msg.timestamp, float(v)))
    raw[-1] = [b""] * n  # the frame count, under an id no CAN frame has
    return by_sig, vin_parts, raw


def _numbers(obj):
    """Every number in a payload, at any depth, keys included (and numbers written as text)."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, int | float):
        yield float(obj)
    elif isinstance(obj, str):
        try:
            yield float(obj)
        except ValueError:
            return
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(k)
            yield from _numbers(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _numbers(v)


def _vehicle_data(body):
    """A payload without the health message's measures of the gateway's own process (CPU
    load, memory, uptime), as ``gateway validate`` judges them: never CAN data when they are
    given to 0.1 as the gateway gives them; a finer one is kept, and judged."""
    if isinstance(body, dict) and body.get("schema") == "gateway.health":
        return {
            k: v
            for k, v in body.items()
            if not (k in OWN_FIGURES and isinstance(v, int | float) and _coarse(v))
        }
    return body


def _truth(path: Path):
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def drive(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    r = synthesise(DBC, d / "drive.log", minutes=4, seed=11, truth=d / "truth.csv", progress=False)
    return r, d / "drive.log", _truth(d / "truth.csv")


def test_decoded_drive_matches_its_ground_truth(drive):
    result, log, truth = drive
    by_sig, vin_parts, raw = _decode_all(log)
    assert result.frames == len(raw[-1])
    truth_at = {round(float(r["time"])): r for r in truth}
    # GPS at 1 Hz, 1e-6 degree resolution, within a few metres of the true position
    lats, lons = by_sig["ID04FGPSLatLong.GPSLatitude04F"], by_sig["ID04FGPSLatLong.GPSLongitude04F"]
    assert len(lats) == len(truth)
    errors = [
        _metres(la, lo, float(truth_at[round(t)]["lat"]), float(truth_at[round(t)]["lon"]))
        for (t, la), (_, lo) in zip(lats, lons, strict=True)
    ]
    assert max(errors) < 15.0 and np.median(errors) < 4.0
    assert all(abs(la * 1e6 - round(la * 1e6)) < 1e-3 for _, la in lats[:50])
    # speed, gear and SOC at the truth's seconds
    speed = dict((round(t, 1), v) for t, v in by_sig["ID155WheelAngles.ESP_vehicleSpeed"])
    gear = dict((round(t, 1), v) for t, v in by_sig["ID118DriveSystemStatus.DI_gear"])
    soc = dict((round(t, 1), v) for t, v in by_sig["ID292BMS_SOC.SOCUI292"])
    for row in truth:
        t = round(float(row["time"]), 1)
        assert abs(speed[t] - float(row["speed_kph"])) <= 0.25 + 1e-9
        assert gear[t] == (4 if row["gear"] == "D" else 1)
        assert abs(soc[t] - float(row["soc_pct"])) <= 0.05 + 1e-9
    # parked in P at both ends, driving in between; the SOC falls, the odometer counts the km
    assert truth[0]["gear"] == "P" and truth[-1]["gear"] == "P"
    assert max(float(r["speed_kph"]) for r in truth) > 25
    socs = [v for _, v in by_sig["ID292BMS_SOC.SOCUI292"]]
    assert socs[-1] < socs[0]
    odo = [v for _, v in by_sig["ID3B6odometer.Odometer3B6"]]
    assert odo[-1] - odo[0] == pytest.approx(float(truth[-1]["distance_km"]), abs=0.01)
    assert result.distance_km == pytest.approx(float(truth[-1]["distance_km"]), abs=1e-3)
    # the VIN, reassembled from the three multiplexed frames
    text = b"".join(vin_parts[m].to_bytes(7, "little").rstrip(b"\0") for m in (16, 17, 18))
    assert text.decode() == DEFAULT_VIN


def test_tesla_checksums_and_counters_are_valid(drive):
    _, log, _ = drive
    _, _, raw = _decode_all(log)
    for fid, at in ((0x118, 0), (0x155, 7)):
        for data in raw[fid]:
            s = (sum(b for i, b in enumerate(data) if i != at) + (fid & 0xFF) + (fid >> 8)) & 0xFF
            assert data[at] == s
    counters = [d[1] & 0x0F for d in raw[0x118]]
    assert all((b - a) % 16 == 1 for a, b in zip(counters, counters[1:], strict=False))


def test_same_seed_same_bytes_other_seed_other_drive(tmp_path):
    a = synthesise(DBC, tmp_path / "a.log", minutes=1, seed=5, progress=False)
    b = synthesise(DBC, tmp_path / "b.log", minutes=1, seed=5, progress=False)
    c = synthesise(DBC, tmp_path / "c.log", minutes=1, seed=6, progress=False)
    assert a.out.read_bytes() == b.out.read_bytes()
    assert a.out.read_bytes() != c.out.read_bytes()


def test_energy_model_is_plausible_for_a_model3():
    route = load_route(None)
    d = simulate(30, route, seed=3)
    km = d.dist_m[-1] / 1000
    wh_per_km = d.energy_kwh[-1] * 1000 / km
    # urban driving of a Model 3 class car: roughly 100-200 Wh/km, and 0.1 % SOC per 0.075 kWh
    assert 90 < wh_per_km < 220, wh_per_km
    assert 80.0 - d.soc[-1] == pytest.approx(100 * d.energy_kwh[-1] / 75.0)
    assert np.all(np.diff(d.dist_m) >= 0)


def test_custom_routes_csv_and_geojson(tmp_path):
    csv_route = tmp_path / "r.csv"
    csv_route.write_text("# my test track\nlat,lon\n48.137154,11.576124\n48.139000,11.580000\n")
    gj = tmp_path / "r.geojson"
    gj.write_text(
        json.dumps(
            {
                "type": "Feature",
                "geometry": {
                    "type": "LineString",
                    "coordinates": [[11.576124, 48.137154], [11.580000, 48.139000]],
                },
            }
        )
    )
    a, b = load_route(csv_route), load_route(gj)
    assert np.array_equal(a, b)
    # a drive longer than the route turns back along it and stays on it
    d = simulate(3, a, seed=2)
    assert d.dist_m[-1] > 2 * 350
    assert d.lat.min() >= 48.137154 - 1e-9 and d.lat.max() <= 48.139 + 1e-9


def test_bad_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("lat,lon\n31.2,121.4\nnorth,east\n")
    p = run_gateway(
        "synth", "--dbc", str(DBC), "--out", str(tmp_path / "x.log"), "--route", str(bad)
    )
    assert_one_line_error(p, "line 3")
    p = run_gateway("synth", "--dbc", str(KONA_PCAN), "--out", str(tmp_path / "x.log"))
    assert_one_line_error(p, "ID04FGPSLatLong")
    p = run_gateway("synth", "--out", str(tmp_path / "x.log"), "--vin", "SHORT")
    assert_one_line_error(p, "--vin")
    p = run_gateway("synth", "--out", str(tmp_path / "no" / "such" / "dir.log"), "--minutes", "1")
    assert_one_line_error(p, "dir.log")


# -- the bundled drive, replayed to a real broker -----------------------------------------------
def _replay(state, broker, vin, *extra):
    return run_gateway(
        *replay_args(BUNDLED, [str(DBC)], broker.url, vin, state, "--fast", "-q", *extra)
    )


@pytest.mark.broker
def test_bundled_drive_location_stays_home_until_consent(tmp_path, broker, vin, listen):
    assert BUNDLED.exists(), "can_fixtures/model3/model3_synthetic_drive.log is shipped"
    exact = {
        (round(la, 6), round(lo, 6))
        for (_, la), (_, lo) in zip(
            *(
                _decode_all(BUNDLED)[0][f"ID04FGPSLatLong.GPSL{x}04F"]
                for x in ("atitude", "ongitude")
            ),
            strict=True,
        )
    }
    # WITHOUT consent: useful summaries and a trip, but no position anywhere
    owner = listen(broker.url, f"vehicles/{vin}/owner/#")
    p = _replay(tmp_path / "a", broker, vin)
    assert p.returncode == 0, p.stderr
    got = owner.settle()
    topics = {m.topic.rsplit("/owner/", 1)[1] for m in got}
    assert "signals" in topics and "trips" in topics and "location" not in topics
    bodies = [unpack(m.payload) for m in got if m.topic.endswith(("/signals", "/trips"))]
    published = {k for b in bodies if b.get("schema") == "gateway.signals" for k in b["signals"]}
    assert {"battery.soc_ui", "speed_kph", "odometer_km", "gear"} <= published, published
    # numeric signals whose DBC names one special value (SNA) stay numbers, not enum states
    windows = [b["signals"] for b in bodies if b.get("schema") == "gateway.signals"]
    assert max(w["speed_kph"]["max"] for w in windows) >= 50
    assert all(isinstance(w["odometer_km"]["last"], float | int) for w in windows)
    trip = next(b for b in bodies if b["schema"] == "gateway.trip")
    assert "start_area" not in trip and "end_area" not in trip
    # no number in any payload within 0.05 degrees of any true latitude or longitude, but for
    # the health message's figures of the gateway's own process (a fast replay's CPU load,
    # ~100-130 % on two cores, once came out at 121.5, near the drive's 121.4-121.5 degrees)
    lats = np.array(sorted({la for la, _ in exact}))
    lons = np.array(sorted({lo for _, lo in exact}))
    numbers = [x for m in got for x in _numbers(_vehicle_data(unpack(m.payload)))]
    assert len(numbers) > 100
    for x in numbers:
        assert np.abs(lats - x).min() > 0.05 and np.abs(lons - x).min() > 0.05, x
    assert 6.0 < trip["distance_km"] < 9.0
    # WITH location consent given in the config: positions leave, only on the ~1 km grid
    cfg = tmp_path / "consent.toml"
    cfg.write_text('[gateway]\nconsent = ["location:7"]\n')
    owner = listen(broker.url, f"vehicles/{vin}/owner/#")
    p = _replay(tmp_path / "b", broker, vin, "--config", str(cfg))
    assert p.returncode == 0, p.stderr
    got = owner.settle()
    locs = [unpack(m.payload) for m in got if m.topic.endswith("/owner/location")]
    assert locs, "with consent the owner gets coarsened positions"
    for b in locs:
        assert (round(b["lat"], 6), round(b["lon"], 6)) not in exact
        assert b["grid_m"] >= 500
        nearest = min(_metres(b["lat"], b["lon"], la, lo) for la, lo in exact)
        assert nearest < b["grid_m"], "a coarsened position is still near the route"
    trip = next(unpack(m.payload) for m in got if m.topic.endswith("/owner/trips"))
    for area in (trip["start_area"], trip["end_area"]):
        assert (round(area["lat"], 6), round(area["lon"], 6)) not in exact
        assert min(_metres(area["lat"], area["lon"], la, lo) for la, lo in exact) > 1.0
    # and both ledgers, trips and positions included, re-check against the policy
    for run in ("a", "b"):
        v = run_gateway("audit", "verify", str(tmp_path / run / "ledger.jsonl"))
        assert v.returncode == 0, v.stdout + v.stderr
