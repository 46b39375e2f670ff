"""The outbox keeps what was released until acknowledged, across restarts, within bounds."""

from __future__ import annotations

import itertools
import os
import sqlite3
import time

import pytest

from gateway.egress.guard import EgressGuard, Outgoing
from gateway.egress.outbox import Outbox
from gateway.egress.schema import Topics
from gateway.errors import StorageError
from gateway.telemetry.policy import load_policy


def _guard(outbox):
    """The default policy's guard for vehicle V, every consent given, numbered by ``outbox``."""
    return EgressGuard(
        load_policy(None),
        Topics("vehicles", "V"),
        consent_ok=lambda c: True,
        consent_snapshot=lambda: {},
        next_seq=outbox.next_seq,
    )


def _released(outbox, n=1):
    g = _guard(outbox)
    out = []
    for i in range(n):
        out.append(
            g.release(
                Outgoing(
                    "gateway.signals",
                    {
                        "window": [float(i), float(i + 1)],
                        "policy": "owner-default@1",
                        "signals": {"battery.soc": {"last": 36.5}},
                    },
                    ("signal:BMS_542.SocDisp",),
                )
            )
        )
    return out


def test_messages_survive_a_restart_until_acknowledged(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    for m in _released(ob, 3):
        ob.put(m)
    first = ob.peek(1)[0]
    ob.ack(first)
    ob.close()
    ob2 = Outbox(tmp_path / "o.sqlite")
    assert [p.seq for p in ob2.peek()] == [1, 2]
    # sequence numbers continue after the restart
    assert _released(ob2, 1)[0].seq == 3


def test_overflow_drops_the_oldest_and_reports_them(tmp_path):
    dropped = []
    ob = Outbox(
        tmp_path / "o.sqlite",
        max_messages=3,
        on_drop=lambda items, why: dropped.append(([i.seq for i in items], why)),
    )
    for m in _released(ob, 5):
        ob.put(m)
    assert [p.seq for p in ob.peek()] == [2, 3, 4]
    assert [s for seqs, _ in dropped for s in seqs] == [0, 1]
    assert "over 3" in dropped[0][1]


@pytest.mark.parametrize("after_a_failed_batch", [False, True])
@pytest.mark.parametrize("where", ["file", "memory"])
def test_a_bound_never_drops_what_is_in_flight_and_what_it_drops_is_not_sent(
    tmp_path, where, after_a_failed_batch
):
    # GIVEN a publisher that read a batch of 3 and handed the first to the client
    dropped = []
    path = tmp_path / "o.sqlite" if where == "file" else None
    ob = Outbox(
        path,
        max_messages=3,
        memory_limit=3,
        on_drop=lambda items, why: dropped.extend(i.seq for i in items),
    )
    msgs = _released(ob, 5)
    for m in msgs[:3]:
        ob.put(m)
    batch = ob.peek()
    ob.sending(batch[0])
    if after_a_failed_batch:  # its PUBACK did not come in time: the batch ended unsent
        ob.batch_done()  # (but the PUBLISH may sit in a stalled broker's socket, and arrive)
    # WHEN two more are put, over the bound of 3
    ob.put(msgs[3])
    ob.put(msgs[4])
    # THEN the one in flight is not dropped (it may leave: never on the record as dropped);
    # the two after it are, and the publisher does not send them from its batch
    assert dropped == [1, 2]
    assert [ob.waiting(p) for p in batch] == [True, False, False]


def test_the_memory_limit_never_drops_copies_of_rows_still_in_the_file(tmp_path):
    # GIVEN an outbox whose file failed after 3 were put: their copies are held in memory
    dropped = []
    ob = Outbox(
        tmp_path / "o.sqlite",
        memory_limit=3,
        on_drop=lambda items, why: dropped.extend(i.seq for i in items),
    )
    msgs = _released(ob, 4)
    ob.put_many(msgs[:3])
    ob._degrade(sqlite3.OperationalError("disk I/O error"))  # noqa: SLF001
    # WHEN one more is put, over the memory limit
    ob.put(msgs[3])
    # THEN no copy of a row in the file is dropped (it is not lost: the next run sends it,
    # and the ledger must not say it was dropped); the one held in memory only may be
    assert dropped in ([], [3])
    ob.close()
    assert [p.seq for p in Outbox(tmp_path / "o.sqlite").peek()] == [0, 1, 2]


def test_drops_are_said_once_a_minute_per_reason_each_on_the_record(tmp_path, caplog):
    dropped = []
    ob = Outbox(
        tmp_path / "o.sqlite",
        max_messages=2,
        on_drop=lambda items, why: dropped.extend(i.seq for i in items),
    )
    with caplog.at_level("WARNING"):
        for m in _released(ob, 50):
            ob.put(m)
    assert dropped == list(range(48)) and ob.dropped == 48
    assert caplog.text.count("outbox dropped") == 1


def test_age_bound_drops_stale_messages(tmp_path):
    now = itertools.count(0, 1000)
    ob = Outbox(tmp_path / "o.sqlite", max_age_s=1500, clock=lambda: float(next(now)))
    for m in _released(ob, 3):
        ob.put(m)
    assert [p.seq for p in ob.peek()] == [1, 2]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_falls_back_to_memory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    ob = Outbox(d / "o.sqlite")
    for m in _released(ob, 2):
        ob.put(m)
    assert ob.storage == "degraded" and ob.depth() == 2


def test_a_broken_database_file_degrades_to_memory_without_losing_messages(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", memory_limit=10)
    msgs = _released(ob, 3)
    ob.put(msgs[0])
    # the disk goes away under the gateway: the next writes must not raise
    ob._db.close()  # noqa: SLF001 - simulates an I/O failure of the connection
    ob.put(msgs[1])
    ob.put(msgs[2])
    assert ob.storage == "degraded"
    assert [p.seq for p in ob.peek()] == [1, 2]
    # what reached the disk before the failure is still there for the next start
    ob.close()
    assert [p.seq for p in Outbox(tmp_path / "o.sqlite").peek()] == [0]


def test_a_second_gateway_on_the_same_outbox_is_refused_until_the_first_closes(tmp_path):
    """Two on one outbox sent the same rows twice and numbered new summaries from the same
    counter: different summaries under one number, which the owner drops as repeats."""
    first = Outbox(tmp_path / "o.sqlite")
    with pytest.raises(StorageError, match="in use by another gateway process"):
        Outbox(tmp_path / "o.sqlite")
    first.close()
    Outbox(tmp_path / "o.sqlite").close()


def test_a_disk_that_turns_read_only_keeps_waiting_messages_in_order(tmp_path):
    # GIVEN two messages waiting on the disk (no PUBACK yet)
    ob = Outbox(tmp_path / "o.sqlite")
    msgs = _released(ob, 4)
    ob.put(msgs[0])
    ob.put(msgs[1])
    # WHEN the disk stops taking writes (reads still work, as on a full disk)
    ob._db.execute("PRAGMA query_only = 1")  # noqa: SLF001 - SQLITE_READONLY on every write
    ob.put(msgs[2])
    ob.put(msgs[3])
    # THEN nothing is stranded on the disk: all four wait, in order, and drain from memory
    assert ob.storage == "degraded"
    assert [p.seq for p in ob.peek()] == [0, 1, 2, 3]
    for p in ob.peek():
        ob.ack(p)
    assert ob.depth() == 0


def test_sequence_numbers_continue_from_the_ledger_after_a_degraded_run(tmp_path):
    from gateway.egress.ledger import Ledger

    ledger = Ledger(tmp_path / "l.jsonl", fsync=False)
    ob = Outbox(tmp_path / "o.sqlite")
    ob._db.execute("PRAGMA query_only = 1")  # noqa: SLF001 - the disk fails at once
    for m in _released(ob, 3):
        ob.put(m)
        ledger.append("egress", seq=m.seq, schema=m.schema)
    ledger.close()
    # the outbox never stored its counter; the ledger did
    ob.close()
    fresh = Outbox(tmp_path / "o.sqlite")
    assert fresh.next_seq() == 0
    fresh.close()
    again = Ledger(tmp_path / "l.jsonl", fsync=False)
    again.close()
    assert again.max_seq == 2
    ob2 = Outbox(tmp_path / "o.sqlite")
    ob2.reserve_seq(again.max_seq + 1)
    assert ob2.next_seq() == 3
    ob2.close()


def _commits(ob):
    seen = []
    ob._db.set_trace_callback(lambda sql: seen.append(sql) if sql == "COMMIT" else None)
    return seen


def test_put_many_and_ack_many_commit_once_and_survive_a_restart(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    woken = []
    ob.subscribe(lambda: woken.append(1))
    commits = _commits(ob)
    ob.put_many(_released(ob, 40))
    assert len(commits) == 1 and len(woken) == 1
    waiting = ob.peek(100)
    assert [p.seq for p in waiting] == list(range(40))
    ob.ack_many(waiting[:25])
    assert len(commits) == 2
    ob.close()
    again = Outbox(tmp_path / "o.sqlite")
    assert [p.seq for p in again.peek(100)] == list(range(25, 40))


def test_a_commit_whose_bounds_check_fails_keeps_each_message_once(tmp_path, monkeypatch):
    ob = Outbox(tmp_path / "o.sqlite")

    def broken(now):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(ob, "_enforce_bounds", broken)
    ob.put_many(_released(ob, 5))
    assert ob.storage == "degraded"
    assert [p.seq for p in ob.peek(100)] == [0, 1, 2, 3, 4]


def test_messages_acknowledged_before_the_disk_fails_are_not_sent_again(tmp_path):
    import asyncio

    from gateway.egress.mqtt import MqttPublisher
    from gateway.settings import BrokerSettings

    ob = Outbox(tmp_path / "o.sqlite")
    ob.put_many(_released(ob, 10))
    pub = MqttPublisher(BrokerSettings(), ob, "id", status=lambda s, r: None)
    sent = []

    class Client:
        async def publish(self, topic, payload, qos, retain, timeout=None):
            await asyncio.sleep(0)
            sent.append(payload)
            if len(sent) == 6:  # meanwhile the CAN path found the disk full
                ob._degrade(sqlite3.OperationalError("database or disk is full"))

    async def drain():
        stop = asyncio.Event()
        stop.set()
        await pub._drain_until(Client(), stop)

    asyncio.run(drain())
    # the five acknowledged before the failure went once; the rest of that batch may repeat
    # (same seq: the owner drops repeats), and every message went
    assert all(sent.count(p) == 1 for p in sent[:5])
    assert len(set(sent)) == 10
    # and the file, which could not be written, still holds all ten, each delivered: the
    # next run sends them again, which the stop entry says (``outbox_sent_kept``)
    assert ob.sent_kept == 10 and ob.depth() == 0


@pytest.mark.parametrize("on_disk", [True, False])
def test_retained_states_are_sent_before_a_backlog_of_summaries(tmp_path, on_disk):
    """The owner's answer to a stop (the retained status) waited behind every summary a fast
    replay had queued: 17 s, where `gateway consent stop` gives up after 5."""
    ob = Outbox(tmp_path / "o.sqlite" if on_disk else None)
    g = _guard(ob)
    ob.put_many(_released(ob, 300))
    status = g.release(
        Outgoing("gateway.status", {"state": "online", "at": 1.0, "reason": "collection stopped"})
    )
    ob.put(status)
    ob.put_many(_released(ob, 2))
    batch = ob.peek(200)
    # THEN the status comes first, and the summaries follow in their order
    assert batch[0].retain and batch[0].payload == status.payload
    seqs = [p.seq for p in batch[1:]]
    assert len(batch) == 200 and seqs == sorted(seqs)


def test_a_delete_reads_a_large_backlog_a_row_at_a_time(tmp_path):
    # a week offline: the delete held every payload in memory at once (here ~32 MB)
    import dataclasses
    import hashlib
    import tracemalloc

    from gateway.datarights import delete_category
    from gateway.telemetry.policy import Category

    ob = Outbox(tmp_path / "o.sqlite")
    big = [dataclasses.replace(m, payload=os.urandom(16_000)) for m in _released(ob, 2000)]
    ob.put_many(big)
    ob.close()
    ob = Outbox(tmp_path / "o.sqlite")
    order = [(p.seq, hashlib.sha256(p.payload).hexdigest()) for p in ob.peek(3)]
    tracemalloc.start()
    try:
        gone = delete_category(ob, Category.VEHICLE_STATUS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(gone) == 2000 and ob.depth() == 0 and gone.in_flight == []
    assert list(zip(gone.seqs, gone.sha256, strict=True))[:3] == order  # as it would have sent
    assert peak < 4_000_000, peak


def test_an_export_is_the_json_it_was_and_reads_a_large_backlog_a_row_at_a_time(tmp_path):
    import dataclasses
    import io
    import json
    import tracemalloc

    from gateway.datarights import export_outbox, write_export

    ob = Outbox(tmp_path / "o.sqlite")
    msgs = _released(ob, 3)
    ob.put_many(msgs)
    fields = {"vin": "V", "frames": {"folder": "/x", "files": [{"a": 1}]}, "consent": {}}
    for outbox in (ob, Outbox(None)):  # (and with nothing waiting)
        out = io.StringIO()
        n = write_export(out, fields, export_outbox(outbox))
        whole = {"vin": "V", "outbox": list(export_outbox(outbox)), **fields}
        assert out.getvalue() == json.dumps(whole, indent=1, default=str) + "\n"
        assert n == len(whole["outbox"]) == (3 if outbox is ob else 0)
        assert [m["seq"] for m in json.loads(out.getvalue())["outbox"]] == [m.seq for m in msgs][:n]
    # a week offline: the export held every payload, decoded, and its whole text (~32 MB here)
    big = [dataclasses.replace(m, payload=os.urandom(16_000)) for m in _released(ob, 2000)]
    ob.put_many(big)
    tracemalloc.start()
    try:
        with open(tmp_path / "x.json", "w") as out:
            n = write_export(out, fields, export_outbox(ob))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 2003 and peak < 4_000_000, peak
    assert len(json.loads((tmp_path / "x.json").read_text())["outbox"]) == 2003


def test_a_delete_the_disk_refuses_still_withdraws_and_says_what_may_have_left(tmp_path):
    # GIVEN a batch of 5 read by the publisher, 3 handed to the client, the first acknowledged
    from gateway.datarights import delete_category
    from gateway.telemetry.policy import Category

    ob = Outbox(tmp_path / "o.sqlite")
    ob.put_many(_released(ob, 5))
    batch = ob.peek(5)
    for p in batch[:3]:
        ob.sending(p)
    ob.note_acked(batch[0])
    # WHEN the owner's delete comes and the file refuses to delete rows (a failing disk)
    ob._db.execute("CREATE TRIGGER t BEFORE DELETE ON outbox BEGIN SELECT RAISE(ABORT, 'io'); END")
    gone = delete_category(ob, Category.VEHICLE_STATUS)
    # THEN all 5 are withdrawn (none is sent from the batch or from memory), on the record,
    # with the 3 that may have left
    assert ob.storage_error is not None
    assert gone.seqs == [p.seq for p in batch] and gone.in_flight == [p.seq for p in batch[:3]]
    assert not any(ob.waiting(p) for p in batch) and ob.peek(10) == []


def _mixed(outbox):
    """Messages of each kind under a policy with a signal of every category: a summary per
    category (battery.soc alone, vehicle status), one of two, a position, trips with and
    without their areas, a camera count and the gateway's status."""
    from gateway.telemetry.policy import parse_policy

    def rule(signal, name, category):
        return {"signal": signal, "publish_as": name, "category": category, "aggregates": ["last"]}

    policy = parse_policy(
        {
            "policy": {"name": "p", "version": 1, "location_grid_m": 1000},
            "signal": [
                rule("BMS_542.SocDisp", "soc", "vehicle_status"),
                rule("VCU_200.Range", "range", "driving_behaviour"),
                rule("Batt_HV_Status.VBatt", "seat", "cabin"),
                rule("BatteryCharging.Voltage_12V", "pulse", "biometric"),
                rule("StabilityControl.LAT_ACCEL", "heading", "location"),
            ],
        },
        "p.toml",
    )
    g = EgressGuard(
        policy,
        Topics("vehicles", "V"),
        consent_ok=lambda c: True,
        consent_snapshot=lambda: {},
        next_seq=outbox.next_seq,
    )
    rules = {r.publish_as: r.rule_id for r in policy.rules.values()}

    def signals(*names):
        body = {"window": [0.0, 1.0], "policy": "p@1", "signals": {n: {"last": 1} for n in names}}
        return Outgoing("gateway.signals", body, tuple(rules[n] for n in names))

    from gateway.telemetry.location import coarsen

    lat, lon = coarsen(31.2, 121.5, 1000)
    trip = {"start": 0.0, "end": 60.0, "policy": "p@1", "distance_km": 1.0}
    made = {
        "soc": signals("soc"),
        "seat+range": signals("seat", "range"),
        "pulse": signals("pulse"),
        "heading": signals("heading"),
        "position": Outgoing("gateway.location", {"window": [0.0, 1.0], "policy": "p@1",
                                                  "lat": lat, "lon": lon}),
        "trip": Outgoing("gateway.trip", trip),
        "trip+areas": Outgoing("gateway.trip", {**trip, "start_area": {"lat": lat, "lon": lon}}),
        "camera": Outgoing("gateway.camera", {"window": [0.0, 1.0], "policy": "p@1",
                                              "camera": "front", "frames_seen": 1}),
        "status": Outgoing("gateway.status", {"state": "online", "reason": ""}),
    }  # fmt: skip
    out = {}
    for key, o in made.items():
        released = g.release(o)
        assert released is not None, key
        out[key] = released
    return out


@pytest.mark.parametrize("where", ["file", "memory"])
def test_a_delete_of_a_category_takes_every_waiting_message_holding_data_of_it(tmp_path, where):
    # `data delete --category cabin` deleted nothing: the categories were read off the
    # message's kind, and a summary of signals counted as vehicle status and driving data only
    from gateway.datarights import delete_category
    from gateway.telemetry.policy import Category

    ob = Outbox(tmp_path / "o.sqlite" if where == "file" else None)
    msgs = _mixed(ob)
    assert msgs["seat+range"].categories == ("cabin", "driving_behaviour")
    assert msgs["trip+areas"].categories == ("driving_behaviour", "location")
    assert msgs["status"].categories == ()
    ob.put_many(list(msgs.values()))
    if where == "file":
        ob.close()
        ob = Outbox(tmp_path / "o.sqlite")  # (kept in the file)
    seq = {m.seq: key for key, m in msgs.items()}
    expected = {
        Category.CABIN: {"seat+range"},
        Category.BIOMETRIC: {"pulse"},
        Category.LOCATION: {"heading", "position", "trip+areas"},
        Category.VEHICLE_STATUS: {"soc"},
        Category.DRIVING_BEHAVIOUR: {"trip"},  # (seat+range went with the cabin's)
        Category.EXTERIOR_CAMERA: {"camera"},
    }
    for category, keys in expected.items():
        gone = delete_category(ob, category)
        assert {seq[s] for s in gone.seqs} == keys, category
    assert [p.schema for p in ob.peek(100)] == ["gateway.status"]


def test_rows_of_an_older_outbox_without_their_categories_go_by_what_their_kind_may_hold(
    tmp_path,
):
    from gateway.datarights import delete_category
    from gateway.telemetry.policy import Category

    # GIVEN an outbox file an older version wrote (no categories kept), with a summary of
    # signals and a status waiting
    path = tmp_path / "o.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, seq INTEGER, topic TEXT NOT "
        "NULL, payload BLOB NOT NULL, retain INTEGER NOT NULL, schema TEXT NOT NULL, created "
        "REAL NOT NULL); CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
    )
    now = time.time()
    db.execute("INSERT INTO outbox VALUES (1, 7, 't/s', x'01', 0, 'gateway.signals', ?)", (now,))
    db.execute("INSERT INTO outbox VALUES (2, NULL, 't/st', x'02', 1, 'gateway.status', ?)", (now,))
    db.commit()
    db.close()
    # WHEN it is opened and the owner deletes the cabin's data
    ob = Outbox(path)
    ob.put_many(_released(ob, 1))  # (a new row beside them, with its categories)
    gone = delete_category(ob, Category.CABIN)
    # THEN the old summary goes (it may hold a cabin signal; which, its policy would say), the
    # status and the new vehicle-status summary stay
    assert gone.seqs == [7]
    assert sorted(p.schema for p in ob.peek(10)) == ["gateway.signals", "gateway.status"]


# a value no gateway writes, put into the row of seq 1 by hand: each made Python's sqlite3
# raise on every read of the table (or the gateway end with a traceback)
_DAMAGE = {
    "topic not UTF-8": "topic = CAST(X'FF41' AS TEXT)",
    "schema not UTF-8": "schema = CAST(X'FF' AS TEXT)",
    "seq not a number": "seq = 'x'",
    "retain flag not 0 or 1": "retain = 'x'",
}


@pytest.mark.parametrize("damage", _DAMAGE.values(), ids=_DAMAGE.keys())
def test_a_damaged_row_is_named_at_the_start_check_not_taken_for_a_failing_disk(tmp_path, damage):
    # GIVEN three messages waiting, the second changed in the file by hand
    ob = Outbox(tmp_path / "o.sqlite")
    ob.put_many(_released(ob, 3))
    with sqlite3.connect(tmp_path / "o.sqlite") as db:
        db.execute(f"UPDATE outbox SET {damage} WHERE seq = 1")
    # WHEN what waits is read to be checked against the ledger
    # THEN the file and the row are named; the file is not written off as a failing disk
    # (the outbox went to memory empty, and what waited in the file was never sent)
    with pytest.raises(StorageError, match=r"o\.sqlite: a message waiting .* is damaged"):
        ob.digests()
    assert ob.storage == "ok"
    # AND read to be sent, only the damaged one is held back; the others go, in order
    batch = ob.peek()
    assert [ob.unchanged(p) for p in batch] == [True, False, True]
    assert [p.seq for p in batch if ob.unchanged(p)] == [0, 2]
    assert ob.storage == "ok" and ob.depth() == 3


def test_an_outbox_file_that_cannot_be_written_is_read_and_its_rows_stay_in_it(
    tmp_path, monkeypatch
):
    # GIVEN three messages waiting in a file that cannot be opened to be written (as for any
    # user but root with a file of mode 444, or for anyone on a read-only disk)
    path = tmp_path / "o.sqlite"
    ob = Outbox(path)
    ob.put_many(_released(ob, 3))
    ob.close()
    real = os.open

    def refuse_writing(p, flags, *rest):  # (root ignores modes)
        if str(p) == str(path) and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied", str(p))
        return real(p, flags, *rest)

    monkeypatch.setattr(os, "open", refuse_writing)
    # WHEN it is opened
    ro = Outbox(path)
    # THEN what waits is read, to be sent in this run (nothing was: the file was never
    # opened, and the run said nothing was left), and the numbering goes on after it
    assert ro.storage == "degraded" and ro.stored_seq == 3
    waiting = ro.peek()
    assert [p.seq for p in waiting] == [0, 1, 2] and ro.depth() == 3
    # AND once the broker took them, none is left, but the file still holds them: said so
    for p in waiting:
        ro.sending(p)
    ro.ack_many(waiting)
    assert ro.depth() == 0 and ro.sent_kept == 3
    ro.close()
    monkeypatch.undo()
    # (read without a -shm or -wal file left behind, that a writable run could not use)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.sqlite"]
    assert [p.seq for p in Outbox(path).peek()] == [0, 1, 2]
