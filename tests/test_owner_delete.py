"""The owner's delete reaches what the gateway holds in memory, not only what waits in the
outbox: the open windows, the trips a stop holds back and the running one. Else a stop, a
delete of everything and a resume sent, right after the resume, a trip and a window collected
before the stop."""

from __future__ import annotations

import pytest

from gateway.egress.ledger import read_entries
from gateway.egress.outbox import Outbox
from gateway.egress.schema import unpack
from tests.conftest import MODEL3_DBC, OwnerMidDrive, gateway_settings, write_policy

TRIPS = """
[trips]
gear = "ID118DriveSystemStatus.DI_gear"
drive_states = ["DI_GEAR_D", "DI_GEAR_R"]
speed = "ID155WheelAngles.ESP_vehicleSpeed"
odometer = "ID3B6odometer.Odometer3B6"
latitude = "ID04FGPSLatLong.GPSLatitude04F"
longitude = "ID04FGPSLatLong.GPSLongitude04F"
"""
RULES = (
    ("ID292BMS_SOC.SOCUI292", "soc", "vehicle_status", '["last"]'),
    ("ID3B6odometer.Odometer3B6", "cabin.thing", "cabin", '["count"]'),
    ("ID155WheelAngles.ESP_vehicleSpeed", "speed", "driving_behaviour", '["max"]'),
)


def _command(at, **body):
    return (at, "command", body)


def _run(tmp_path, vin, script, url=None):
    """The Model 3 drive (60 s windows, a trip from its start; cabin and location consent for
    a day) with the owner's ``script``: the messages it left in the outbox (all that was
    made, without a broker; with one at ``url``, what was not sent), the frame times of the
    owner's messages, and the gateway's answer to the delete."""
    policy = write_policy(tmp_path / "delete-in-memory.toml", *RULES, more=TRIPS)
    s = gateway_settings(
        tmp_path, {"*": [str(MODEL3_DBC)]}, url=url, consent=["cabin:1", "location:1"],
        vin=vin, window=60.0, policy=policy,
    )  # fmt: skip
    source, _ = OwnerMidDrive.run(s, script, url)
    ob = Outbox(tmp_path / "o.sqlite")
    try:
        left = [(p.schema, unpack(p.payload)) for p in ob.peek(10_000)]
    finally:
        ob.close()
    (answer,) = [
        e["result"]
        for _, e, _ in read_entries(tmp_path / "l.jsonl")
        if e and e.get("kind") == "consent" and e["result"].get("action") == "delete"
    ]
    return left, source.said_at, answer


def _windows(left):
    return [b for schema, b in left if schema == "gateway.signals"]


def _trips(left):
    return [b for schema, b in left if schema == "gateway.trip"]


# (signals left in the window open at the stop (None: it does not leave), whether the trip
# running at the stop leaves, whether with its areas, what the answer counts in memory)
AFTER_DELETE = {
    "all": (None, False, False, {"windows": 1, "trips": 1, "trip_areas": 0}),
    "cabin": ({"soc", "speed"}, True, True, {"windows": 1, "trips": 0, "trip_areas": 0}),
    "driving_behaviour": (
        {"soc", "cabin.thing"},
        False,
        False,
        {"windows": 1, "trips": 1, "trip_areas": 0},
    ),
    "location": (
        {"soc", "cabin.thing", "speed"},
        True,
        False,
        {"windows": 1, "trips": 0, "trip_areas": 1},
    ),
}


@pytest.mark.parametrize("category", list(AFTER_DELETE))
def test_stop_then_delete_discards_what_is_held_in_memory_of_the_category(tmp_path, vin, category):
    # GIVEN a drive under way; the owner stops collection 250 s into it (the window of its
    # 200-260 s is open, the trip is held back), deletes a category at 270 s, resumes at 330 s
    script = [
        _command(250.0, command="stop"),
        _command(270.0, command="delete", category=category),
        _command(330.0, command="resume"),
    ]
    left, (stopped, _, resumed), answer = _run(tmp_path, vin, script)
    signals, trip_leaves, with_areas, counted = AFTER_DELETE[category]
    # THEN the window open at the stop leaves without the category's signals (not at all for
    # all); the trip running at the stop leaves only for cabin, and for location without its
    # start and end areas
    open_then = [w for w in _windows(left) if w["window"][0] <= stopped < w["window"][1]]
    assert [set(w["signals"]) for w in open_then] == ([signals] if signals else [])
    before = [t for t in _trips(left) if t["start"] < stopped]
    assert len(before) == trip_leaves
    assert all(("start_area" in t, "end_area" in t) == (with_areas,) * 2 for t in before)
    # (what was collected after the resume leaves as usual)
    assert any(w["window"][0] > resumed for w in _windows(left))
    # and the answer says what was discarded in memory, beside what was removed from the outbox
    assert {k: answer["discarded"][k] for k in counted} == counted
    assert answer["discarded"]["values"] > 0  # (for location: the fixes trips are made from)


@pytest.mark.parametrize("category", ["driving_behaviour", "location"])
def test_a_delete_while_driving_discards_the_running_trip_or_its_start(tmp_path, vin, category):
    # GIVEN a drive under way, with location consent; the owner deletes a category at 250 s
    left, (deleted,), answer = _run(
        tmp_path, vin, [_command(250.0, command="delete", category=category)]
    )
    trips = _trips(left)
    # THEN for driving behaviour, the trip that leaves began after the delete; for location,
    # the trip leaves without the area it started in (its end area is of a later fix)
    if category == "driving_behaviour":
        assert trips and all(t["start"] >= deleted - 30 for t in trips)  # (to the minute)
        assert answer["discarded"]["trips"] == 1
    else:
        (trip,) = trips
        assert trip["start"] < deleted and "start_area" not in trip and "end_area" in trip
        assert answer["discarded"]["trip_areas"] == 1


@pytest.mark.broker
def test_stop_delete_all_resume_sends_nothing_collected_before_the_stop(
    tmp_path, broker, listen, vin
):
    # GIVEN the drive replayed to a real broker, and an owner who, 250 s into it, stops
    # collection, deletes all, and resumes 80 s later, each over MQTT (the auditor's sequence)
    lst = listen(broker.url, f"vehicles/{vin}/owner/#")
    script = [
        _command(250.0, command="stop"),
        _command(250.0, command="delete", category="all"),
        _command(330.0, command="resume"),
    ]
    _, (stopped, _, resumed), answer = _run(tmp_path, vin, script, url=broker.url)
    got = [
        (m.topic.rsplit("/", 1)[-1], unpack(m.payload))
        for m in lst.settle()
        if not m.topic.endswith(("/command", "/consent/set"))  # (the owner's own, JSON)
    ]
    # THEN neither the window open at the stop nor the trip under way then reaches the owner
    windows = [b for stream, b in got if stream == "signals"]
    trips = [b for stream, b in got if stream == "trips"]
    assert not [w for w in windows if w["window"][0] <= stopped < w["window"][1]]
    assert not [t for t in trips if t["start"] < stopped]
    # (what was collected before the window opened left before the stop; what came after the
    # resume leaves)
    assert any(w["window"][1] <= stopped for w in windows)
    assert any(w["window"][0] > resumed for w in windows) and trips
    # and the owner's answer counts what the gateway discarded in memory
    (said,) = [
        b["last_change"]
        for stream, b in got
        if stream == "consent" and b["last_change"].get("action") == "delete"
    ]
    assert said["discarded"] == answer["discarded"]
    assert said["discarded"]["windows"] == 1 and said["discarded"]["trips"] == 1
    assert said["discarded"]["values"] > 0
