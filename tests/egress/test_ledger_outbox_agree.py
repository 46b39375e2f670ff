"""What waits in the outbox is what the audit ledger recorded, and a number handed to a summary
whose ledger line could not be written is handed out again: the owner's seq has no gap that
nothing explains. Proven with the real gateway, files and broker."""

from __future__ import annotations

import asyncio
import errno
import json
import sqlite3

import pytest

from gateway.app import Gateway
from gateway.canbus.replay import ReplaySource
from gateway.egress import ledger as ledger_mod
from gateway.egress.ledger import read_entries
from gateway.egress.outbox import Outbox
from gateway.errors import StorageError
from tests.conftest import (
    KONA_CSV,
    KONA_PCAN,
    assert_one_line_error,
    gateway_settings,
    replay_args,
    run_gateway,
)


def _waiting_run(tmp_path, vin: str) -> list[int]:
    """A run whose broker was never reachable: its summaries wait in the outbox."""
    s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}, vin=vin, window=5.0)
    report = asyncio.run(Gateway(s, [ReplaySource([KONA_CSV], speed=None)]).run(
        require_broker=False, drain_timeout=0.2))  # fmt: skip
    assert report.outbox_left >= 3
    ob = Outbox(tmp_path / "o.sqlite")
    seqs = [p.seq for p in ob.peek(10_000) if p.seq is not None]
    ob.close()
    return seqs


def _replay_again(tmp_path, broker, vin: str):
    return run_gateway(*replay_args(KONA_CSV, [str(KONA_PCAN)], broker.url, vin, tmp_path,
                                    "--fast", "-q", "--window", "5"),
                       "--ledger", str(tmp_path / "l.jsonl"),
                       "--outbox", str(tmp_path / "o.sqlite"))  # fmt: skip


@pytest.mark.broker
def test_a_summary_changed_in_the_outbox_file_is_not_sent(tmp_path, broker, vin, listen):
    seqs = _waiting_run(tmp_path, vin)
    # GIVEN one byte of one waiting summary changed in the file (same length: the policy name)
    db = sqlite3.connect(tmp_path / "o.sqlite")
    (payload,) = db.execute("SELECT payload FROM outbox WHERE seq = ?", (seqs[1],)).fetchone()
    assert b"owner-default@1" in payload
    db.execute("UPDATE outbox SET payload = ? WHERE seq = ?",
               (payload.replace(b"owner-default@1", b"owner-default@9"), seqs[1]))  # fmt: skip
    db.commit()
    db.close()
    lst = listen(broker.url, f"vehicles/{vin}/#")
    # WHEN the gateway runs again, with its broker up
    proc = _replay_again(tmp_path, broker, vin)
    # THEN it refuses, naming the outbox and the first changed summary, and sends nothing
    assert proc.returncode == 4
    assert_one_line_error(proc, "o.sqlite", f"first seq {seqs[1]}", "differ from what the audit")
    assert lst.settle(quiet=0.5) == []


def test_the_gateway_sends_only_bytes_on_record_while_it_runs_too(tmp_path, vin):
    """Checked at the start (above), and from then on by the digests the gateway holds: a
    waiting row changed in the file while it runs is not sent (the publisher's side:
    tests/egress/test_mqtt_publish.py)."""
    _waiting_run(tmp_path, vin)
    s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}, vin=vin, window=5.0)
    gw = Gateway(s, [])
    waiting = gw.outbox.peek(10_000)
    assert waiting and all(gw.outbox.unchanged(p) for p in waiting)
    db = sqlite3.connect(tmp_path / "o.sqlite")
    db.execute("UPDATE outbox SET payload = ? WHERE id = ?", (b"\x80", waiting[0].key[1]))
    db.commit()
    db.close()
    (changed, *rest) = gw.outbox.peek(10_000)
    assert not gw.outbox.unchanged(changed) and all(gw.outbox.unchanged(p) for p in rest)
    gw.ledger.close()
    gw.outbox.close()


@pytest.mark.broker
def test_summaries_waiting_without_their_ledger_lines_are_not_sent(tmp_path, broker, vin, listen):
    seqs = _waiting_run(tmp_path, vin)
    # GIVEN the ledger cut before the egress line of the second waiting summary (a backup)
    lines = (tmp_path / "l.jsonl").read_text().splitlines(keepends=True)
    cut = next(i for i, ln in enumerate(lines) if json.loads(ln).get("seq") == seqs[1])
    (tmp_path / "l.jsonl").write_text("".join(lines[:cut]))
    lst = listen(broker.url, f"vehicles/{vin}/#")
    proc = _replay_again(tmp_path, broker, vin)
    assert proc.returncode == 4
    assert_one_line_error(proc, "o.sqlite", f"(seq {seqs[1]}..{seqs[-1]})", "no line in the audit")
    assert lst.settle(quiet=0.5) == []


@pytest.mark.parametrize("grouped", [True, False])
def test_a_number_whose_ledger_line_failed_is_handed_out_again(tmp_path, monkeypatch, grouped):
    gw = Gateway(gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}), [])
    real = ledger_mod.os.fsync
    try:
        gw.publish_digest()  # seq 0, recorded and kept

        # WHEN the disk fails the next ledger write (an fsync EIO)
        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(ledger_mod.os, "fsync", failing)
        with pytest.raises(StorageError):
            if grouped:
                with gw.egress_group():
                    gw.publish_digest()
                    gw.publish_digest()
            else:
                gw.publish_digest()
        monkeypatch.setattr(ledger_mod.os, "fsync", real)
        gw.publish_digest()  # the disk works again
    finally:
        gw.outbox.close()
        gw.ledger.close()
    # THEN the summaries that never left gave their numbers back: no gap, in either file
    ob = Outbox(tmp_path / "o.sqlite")
    kept = [p.seq for p in ob.peek(100) if p.seq is not None]
    ob.close()
    recorded = [e["seq"] for _, e, _ in read_entries(tmp_path / "l.jsonl")
                if e and e.get("kind") == "egress" and e.get("seq") is not None]  # fmt: skip
    assert kept == recorded == [0, 1]


@pytest.mark.broker
def test_lines_a_ledger_lost_of_summaries_already_sent_are_recorded_as_such(
    tmp_path, broker, vin, caplog
):
    # GIVEN a run that sent everything, and its ledger cut back before its last summaries
    s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}, url=broker.url, vin=vin,
                         window=5.0)  # fmt: skip
    report = asyncio.run(Gateway(s, [ReplaySource([KONA_CSV], speed=None)]).run())
    assert report.outbox_left == 0
    lines = (tmp_path / "l.jsonl").read_text().splitlines(keepends=True)
    sent = [json.loads(ln)["seq"] for ln in lines if json.loads(ln).get("seq") is not None]
    cut = next(i for i, ln in enumerate(lines) if json.loads(ln).get("seq") == sent[-3])
    (tmp_path / "l.jsonl").write_text("".join(lines[:cut]))
    # WHEN the gateway starts again on these files
    gw = Gateway(s, [])
    gw.outbox.close()
    gw.ledger.close()
    # THEN the numbers the ledger lost are on its record, and said
    (entry,) = [
        e for _, e, _ in read_entries(tmp_path / "l.jsonl") if e and e.get("kind") == "unrecorded"
    ]
    assert entry["seqs"] == [sent[-3], sent[-1]]
    assert f"lost the lines of seq {sent[-3]}..{sent[-1]}" in caplog.text
    assert ledger_mod.verify_chain(tmp_path / "l.jsonl").kinds["unrecorded"] == 1


def test_a_summary_blocked_as_too_large_gives_its_number_back(tmp_path, monkeypatch, caplog):
    from gateway.egress import guard as guard_mod

    gw = Gateway(gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}), [])
    try:
        gw.publish_digest()  # seq 0
        monkeypatch.setattr(guard_mod, "MAX_PAYLOAD", 10)
        gw.publish_digest()  # blocked: too large
        monkeypatch.undo()
        gw.publish_digest()  # seq 1, not 2
    finally:
        gw.outbox.close()
        gw.ledger.close()
    kinds = [e.get("kind") for _, e, _ in read_entries(tmp_path / "l.jsonl") if e]
    assert "blocked" in kinds
    # and the next start finds nothing missing from the ledger
    again = Gateway(gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}), [])
    again.outbox.close()
    again.ledger.close()
    recorded = [e for _, e, _ in read_entries(tmp_path / "l.jsonl") if e]
    assert [
        e["seq"] for e in recorded if e.get("kind") == "egress" and e.get("seq") is not None
    ] == [0, 1]
    assert (
        "unrecorded" not in [e.get("kind") for e in recorded]
        and "lost the lines" not in caplog.text
    )


def test_numbers_recorded_as_unrecorded_are_recorded_once(tmp_path):
    # GIVEN an outbox that numbered up to 49 and a ledger that knows up to 10
    ob = Outbox(tmp_path / "o.sqlite")
    ob._db.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', 50)")
    ob.close()
    led = ledger_mod.Ledger(tmp_path / "l.jsonl")
    led.append("egress", seq=10, sha256="x")
    led.close()
    # WHEN the gateway starts three times without sending anything
    for _ in range(3):
        gw = Gateway(gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}), [])
        gw.outbox.close()
        gw.ledger.close()
    # THEN the numbers are on record once
    entries = [e for _, e, _ in read_entries(tmp_path / "l.jsonl") if e]
    assert [e["seqs"] for e in entries if e.get("kind") == "unrecorded"] == [[11, 49]]


def test_rows_read_from_a_failing_outbox_file_are_not_called_lost(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    from tests.egress.test_outbox import _released

    ob.put_many(_released(ob, 3))  # in the file
    ob._degrade(sqlite3.OperationalError("database or disk is full"))  # read into memory
    ob.put_many(_released(ob, 2))  # in memory only
    assert ob.depth() == 5
    assert [p.seq for p in ob.memory_only()] == [3, 4]
    ob.close()


def test_copies_of_a_failing_file_s_rows_are_still_bytes_on_record(tmp_path):
    """A row sent and acknowledged under its file key while the file failed has a copy in
    memory: sent again later (the owner drops the repeat), it was refused as "changed in the
    outbox file", with an error and a false ledger line."""
    from tests.egress.test_outbox import _released

    ob = Outbox(tmp_path / "o.sqlite")
    ob.expect([])
    ob.put_many(_released(ob, 3))
    in_file = ob.peek(10)
    ob._degrade(sqlite3.OperationalError("disk I/O error"))  # the rows copied into memory
    ob.ack_many(in_file)  # their PUBACKs, under the file's keys
    copies = ob.peek(10)
    assert copies and all(p.key[0] == "mem" for p in copies)
    assert all(ob.unchanged(p) for p in copies)
    ob.close()


def test_bytes_on_record_are_known_however_long_the_gateway_runs(tmp_path):
    """The digests are forgotten below the lowest number waiting, every 256 messages: a prune
    made while a put's messages were not in the file yet forgot them, and the publisher then
    refused them as changed (a gateway sending as it goes: its outbox often empty)."""
    from tests.egress.test_outbox import _released

    ob = Outbox(tmp_path / "o.sqlite")
    ob.expect([])
    refused = 0
    for _ in range(100):  # a few messages at a time, sent before the next come
        ob.put_many(_released(ob, 7))  # (7: the prune falls now on a put, now on an ack)
        batch = ob.peek(10)
        refused += sum(not ob.unchanged(p) for p in batch)
        ob.ack_many(batch)
    assert refused == 0
    ob.close()
