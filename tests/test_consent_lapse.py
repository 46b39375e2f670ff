"""Consent is checked where location data would leave, not only where it was made: a position
queued while the broker was away does not leave after the consent lapsed, and a trip's start
area needs consent from the trip's start."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.app import Gateway
from gateway.canbus.chunking import FAST
from gateway.canbus.replay import ReplaySource, iter_log
from gateway.egress.ledger import read_entries
from gateway.egress.outbox import Outbox
from gateway.egress.schema import unpack
from gateway.telemetry.policy import Category
from tests.conftest import FIXTURES, gateway_settings

DRIVE = FIXTURES / "model3" / "model3_synthetic_drive.log"
DBC = FIXTURES / "model3" / "Model3CAN.dbc"
DAY = 86400.0


def _waiting(tmp_path):
    """What waits in the outbox a run left behind."""
    ob = Outbox(tmp_path / "o.sqlite")
    try:
        return ob.peek(10_000)
    finally:
        ob.close()


def _settings(tmp_path, url=None, consent=(), vin="CONSENTLAPSE00001"):
    return gateway_settings(tmp_path, {"*": [str(DBC)]}, url=url, consent=consent, vin=vin)


@pytest.mark.broker
def test_positions_queued_offline_do_not_leave_after_the_consent_lapsed(
    tmp_path, broker, listen, vin
):
    # GIVEN a drive replayed with location consent while the broker is away: positions wait
    clock = [2_000_000_000.0]
    away = _settings(tmp_path, None, ["location:1"], vin)  # no broker
    gw = Gateway(away, [ReplaySource([DRIVE], speed=None)], clock=lambda: clock[0])
    report = asyncio.run(gw.run(require_broker=False, drain_timeout=0))
    queued = _waiting(tmp_path)
    waiting = [p.schema for p in queued]
    assert waiting.count("gateway.location") > 0 and report.outbox_left == len(waiting)
    located = sum(  # positions, and trips with their start/end areas
        p.schema == "gateway.location"
        or (p.schema == "gateway.trip" and "end_area" in unpack(p.payload))
        for p in queued
    )
    # WHEN the gateway runs again two days later (the grant has expired), with the broker up
    clock[0] += 2 * DAY
    lst = listen(broker.url, f"vehicles/{vin}/owner/#")
    back = Gateway(_settings(tmp_path, broker.url, vin=vin), [], clock=lambda: clock[0])
    asyncio.run(back.run(drain_timeout=10))
    got = [unpack(m.payload).get("schema") for m in lst.settle()]
    # THEN the rest left, but no position; the ledger says which were held back, and why
    assert "gateway.signals" in got and "gateway.location" not in got
    dropped = [
        e for _, e, _ in read_entries(tmp_path / "l.jsonl") if e and e.get("kind") == "dropped"
    ]
    assert sum(len(e["seqs"]) for e in dropped) == located > waiting.count("gateway.location")
    assert all("location consent no longer valid" in e["reason"] for e in dropped)
    assert _waiting(tmp_path) == []


class _GrantMidway:
    """The drive's batches, cut in 20; location consent is granted after the 5th (the trip
    is under way by then)."""

    unpaced = True

    def __init__(self, gw_box: list[Gateway], clock: list[float]) -> None:
        self.gw_box, self.clock = gw_box, clock

    async def batches(self):
        for batch in iter_log(DRIVE, chunking=FAST):
            for k, idx in enumerate(np.array_split(np.arange(len(batch)), 20)):
                if k == 5:
                    self.gw_box[0].consent.grant(
                        Category.LOCATION, self.clock[0] + DAY, self.clock[0], 30
                    )
                yield batch.select(idx)


def test_a_trip_under_way_before_consent_carries_no_start_area(tmp_path):
    clock = [2_000_000_000.0]
    box: list[Gateway] = []
    s = _settings(tmp_path)  # no broker
    gw = Gateway(s, [_GrantMidway(box, clock)], clock=lambda: clock[0])
    box.append(gw)
    asyncio.run(gw.run(require_broker=False, drain_timeout=0))
    trips = [unpack(p.payload) for p in _waiting(tmp_path) if p.schema == "gateway.trip"]
    # THEN the trip that began before the grant has its end area, not its start area
    assert trips, "the drive has a trip"
    assert all("start_area" not in t for t in trips)
    assert any("end_area" in t for t in trips)


@pytest.mark.broker
def test_an_expired_grant_is_published_on_the_consent_topic(tmp_path, broker, listen, vin):
    import time

    # GIVEN a live gateway (a quiet bus) with a location grant of about 1.5 s
    lst = listen(broker.url, f"vehicles/{vin}/owner/consent")

    class QuietBus:
        def __init__(self) -> None:
            self.done = asyncio.Event()

        async def batches(self):
            await self.done.wait()
            return
            yield

    bus = QuietBus()
    gw = Gateway(_settings(tmp_path, broker.url, [f"location:{1.5 / DAY}"], vin), [bus])

    async def main():
        stop = asyncio.Event()
        run = asyncio.create_task(gw.run(stop, drain_timeout=5))
        await asyncio.sleep(3.5)  # past the expiry, and the 1 s check after it
        bus.done.set()
        await run

    t0 = time.time()
    asyncio.run(main())
    states = [unpack(m.payload) for m in lst.settle()]
    # THEN a state with the grant was published at the start, and one without it after expiry
    assert "location" in states[0]["grants"]
    assert any(s["grants"] == {} and s["at"] > t0 + 1.5 for s in states[1:])


@pytest.mark.broker
@pytest.mark.parametrize("queued_by", ["this version", "an older version"])
def test_summaries_with_a_cabin_signal_queued_offline_do_not_leave_after_the_consent_lapsed(
    tmp_path, broker, listen, vin, queued_by
):
    """Only positions and trips were checked again at sending: a summary holding a cabin (or
    biometric) signal left after its consent had lapsed. (An older version's outbox kept no
    categories: a summary's are read off its signals, by the policy in force.)"""
    from tests.conftest import KONA_CSV, KONA_PCAN

    def policy(name, *rules):
        path = tmp_path / f"{name}.toml"
        path.write_text(
            f'[policy]\nname = "{name}"\nversion = 1\n'
            + "".join(
                f'\n[[signal]]\nsignal = "{sig}"\npublish_as = "{pub}"\ncategory = "{cat}"\n'
                'aggregates = ["last"]\n'
                for sig, pub, cat in rules
            )
        )
        return str(path)

    soc = ("BMS_542.SocDisp", "soc", "vehicle_status")
    cabin = ("Batt_HV_Status.VBatt", "seat", "cabin")
    clock = [2_000_000_000.0]

    def run(policy_file, url, consent=()):
        s = gateway_settings(
            tmp_path, {"can0": [str(KONA_PCAN)]}, url=url, consent=consent, vin=vin,
            window=5.0, policy=policy_file,
        )  # fmt: skip
        source = [ReplaySource([KONA_CSV], speed=None)] if url is None else []
        gw = Gateway(s, source, clock=lambda: clock[0])
        return asyncio.run(gw.run(require_broker=url is not None, drain_timeout=10))

    # GIVEN summaries queued while the broker was away: some with a cabin signal (its consent
    # valid for a day), some of vehicle status only
    run(policy("both", soc, cabin), None, ["cabin:1"])
    run(policy("status", soc), None)
    queued = _waiting(tmp_path)
    held = {p.seq for p in queued if p.schema == "gateway.signals" and b"seat" in p.payload}
    plain = {p.seq for p in queued if p.schema == "gateway.signals"} - held
    assert held and plain
    if queued_by == "an older version":
        import sqlite3

        db = sqlite3.connect(tmp_path / "o.sqlite")
        db.execute("UPDATE outbox SET categories = NULL")
        db.commit()
        db.close()
    # WHEN the gateway runs again two days later, with the broker up (under the policy of
    # both signals: it tells an older version's summaries apart)
    clock[0] += 2 * DAY
    lst = listen(broker.url, f"vehicles/{vin}/owner/#")
    run(policy("both", soc, cabin), broker.url)
    got = [unpack(m.payload) for m in lst.settle()]
    # THEN the vehicle-status summaries left, none with the cabin signal; the ledger says
    # which were held back, and why
    sent = {b["seq"] for b in got if b.get("schema") == "gateway.signals"}
    assert sent == plain
    assert not any("seat" in b.get("signals", {}) for b in got)
    dropped = [
        e for _, e, _ in read_entries(tmp_path / "l.jsonl") if e and e.get("kind") == "dropped"
    ]
    assert {s for e in dropped for s in e["seqs"]} == held
    assert all(e["reason"].startswith("cabin consent no longer valid") for e in dropped)
    assert _waiting(tmp_path) == []


_ODOMETER_AS_CABIN = (
    ("ID292BMS_SOC.SOCUI292", "soc", "vehicle_status", '["last"]'),
    ("ID3B6odometer.Odometer3B6", "cabin.thing", "cabin", '["count", "last"]'),
)
_GRANT = (250.0, "consent/set", {"category": "cabin", "grant": True, "days": 1})
_WITHDRAW = (250.0, "consent/set", {"category": "cabin", "grant": False})


def _cabin_midway(tmp_path, vin, messages, consent=(), url=None):
    """The Model 3 drive in 60 s windows, the odometer a cabin signal, ``messages`` from the
    owner 250 s into it: the signals windows that left (from the broker at ``url``, else from
    the outbox), the frame time of the owner's messages, and the run's report."""
    from tests.conftest import OwnerMidDrive, write_policy

    policy = write_policy(tmp_path / "cabin-odometer.toml", *_ODOMETER_AS_CABIN)
    s = gateway_settings(
        tmp_path, {"*": [str(DBC)]}, url=url, consent=consent, vin=vin, window=60.0,
        policy=policy,
    )  # fmt: skip
    source, report = OwnerMidDrive.run(s, messages, url)
    return source.said_at[0], report


@pytest.mark.parametrize(
    ("consent", "messages"),
    [
        ((), [_GRANT]),  # the auditor's case: granted while a window collects
        (["cabin:1"], [_WITHDRAW, _GRANT]),  # withdrawn and given again while it collects
    ],
    ids=["granted-midway", "withdrawn-and-granted-again"],
)
def test_a_sensitive_window_collected_before_consent_does_not_leave_once_it_is_granted(
    tmp_path, vin, consent, messages
):
    # GIVEN the odometer as a cabin signal, 60 s windows, and the owner's consent for cabin
    # given (or given again) 250 s into the drive, while the window of its 200-260 s collects
    at, report = _cabin_midway(tmp_path, vin, messages, consent)
    windows = [unpack(p.payload) for p in _waiting(tmp_path) if p.schema == "gateway.signals"]
    # THEN the window open at the grant leaves without the cabin signal, counted as withheld
    # for lack of consent; every window that began after the grant has it
    open_then = [w for w in windows if w["window"][0] <= at < w["window"][1]]
    assert len(open_then) == 1 and "soc" in open_then[0]["signals"]
    assert "cabin.thing" not in open_then[0]["signals"]
    after = [w for w in windows if w["window"][0] > at]
    assert len(after) >= 4 and all("cabin.thing" in w["signals"] for w in after)
    # (before: with a grant from the start, the windows closed before the withdrawal had it)
    before = [w for w in windows if w["window"][1] <= at]
    assert all(("cabin.thing" in w["signals"]) == bool(consent) for w in before)
    assert report.withheld["cabin"] == 1 + (0 if consent else len(before))


@pytest.mark.broker
def test_a_grant_midway_through_a_window_lets_out_only_the_windows_begun_after_it(
    tmp_path, broker, listen, vin
):
    # GIVEN the drive replayed to a real broker, the owner granting cabin consent over MQTT
    # 250 s into it, while the window of its 200-260 s collects
    lst = listen(broker.url, f"vehicles/{vin}/owner/signals")
    at, report = _cabin_midway(tmp_path, vin, [_GRANT], url=broker.url)
    windows = [unpack(m.payload) for m in lst.settle()]
    # THEN what reached the owner holds the cabin signal only for windows begun after the grant
    with_cabin = sorted(w["window"][0] for w in windows if "cabin.thing" in w["signals"])
    begun_after = sorted(w["window"][0] for w in windows if w["window"][0] > at)
    assert with_cabin == begun_after and len(begun_after) >= 4
    assert any(w["window"][0] <= at < w["window"][1] for w in windows)  # it left, without it
    assert report.withheld["cabin"] == len(windows) - len(begun_after)
