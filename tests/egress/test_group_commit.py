"""A fast replay commits its egress per batch of frames: one ledger fsync, one outbox
transaction, and never a message in the outbox before its ledger line is on the disk."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os

import pytest

from gateway import settings as settings_mod
from gateway.app import Gateway
from gateway.canbus.replay import ReplaySource
from gateway.egress.guard import Outgoing
from gateway.egress.ledger import verify_chain
from gateway.errors import StorageError
from gateway.localbroker import free_port
from tests.conftest import KONA_CSV, KONA_PCAN


def _gateway(tmp_path, window=1.0):
    s = settings_mod.load(
        None,
        env={},
        overrides={
            "broker.url": f"mqtt://127.0.0.1:{free_port()}",  # nothing listens: all waits
            "gateway.vin": "GROUPCOMMIT000001",
            "gateway.window": window,
            "gateway.ledger": str(tmp_path / "l.jsonl"),
            "gateway.outbox": str(tmp_path / "o.sqlite"),
        },
    )
    s = dataclasses.replace(s, dbc={"can0": [str(KONA_PCAN)]})
    return Gateway(s, [ReplaySource([KONA_CSV], speed=None)])


def _on_disk_seqs(path):
    return {json.loads(line).get("seq") for line in path.read_text().splitlines()}


def test_messages_reach_the_outbox_only_after_their_ledger_lines_are_synced(tmp_path, monkeypatch):
    gw = _gateway(tmp_path)
    events = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        "gateway.egress.ledger.os.fsync", lambda fd: (events.append("fsync"), real_fsync(fd))
    )
    put_many = gw.outbox.put_many

    def spy(msgs):
        # the ledger holds every message being committed, and nothing of it is unsynced
        assert gw.ledger.durable
        assert {m.seq for m in msgs} <= _on_disk_seqs(tmp_path / "l.jsonl")
        events.append(("put", len(msgs)))
        put_many(msgs)

    monkeypatch.setattr(gw.outbox, "put_many", spy)
    report = asyncio.run(gw.run(require_broker=False, drain_timeout=0.1))
    puts = [e[1] for e in events if e != "fsync"]
    assert report.released == sum(puts) == report.outbox_left
    # grouped: 1 s windows over a replay of whole batches close several windows per commit
    assert len(puts) < report.released, (len(puts), report.released)
    assert events.count("fsync") < report.released


def test_a_group_whose_ledger_sync_fails_puts_nothing_in_the_outbox(tmp_path, monkeypatch):
    gw = _gateway(tmp_path)
    out = Outgoing(
        "gateway.signals",
        {"window": [0.0, 1.0], "policy": gw.policy.ident, "signals": {"battery.soc": {"last": 5}}},
        ("signal:BMS_542.SocDisp",),
    )

    def full(fd):
        raise OSError(28, "No space left on device")

    with gw.egress_group():
        assert gw.emit(out) is not None
        assert gw.outbox.depth() == 0  # not before the group ends
    assert gw.outbox.depth() == 1
    monkeypatch.setattr("gateway.egress.ledger.os.fsync", full)
    released = gw.report.released
    with pytest.raises(StorageError), gw.egress_group():
        gw.emit(out)
        gw.emit(out)
    assert gw.outbox.depth() == 1 and gw.report.released == released
    monkeypatch.undo()
    gw.ledger.append("event", note="the disk has room again")
    gw.outbox.close()
    gw.ledger.close()
    # the two unsynced lines were cut off again: the ledger records one egress, and chains
    lines = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in lines].count("egress") == 1
    assert verify_chain(tmp_path / "l.jsonl").entries == len(lines)


def test_a_full_disk_mid_replay_ends_with_the_ledger_error_and_a_verifiable_ledger(
    tmp_path, monkeypatch, caplog
):
    gw = _gateway(tmp_path)
    full = [False]
    decode = gw.decoder.decode

    def decode_then_fill_the_disk(batch):
        full[0] = True  # from the first batch on, the disk is full
        return decode(batch)

    def fsync(fd, real=os.fsync):
        if full[0]:
            raise OSError(28, "No space left on device")
        real(fd)

    def replace(a, b, real=os.replace):
        if full[0]:
            raise OSError(28, "No space left on device")
        real(a, b)

    monkeypatch.setattr(gw.decoder, "decode", decode_then_fill_the_disk)
    monkeypatch.setattr("gateway.egress.ledger.os.fsync", fsync)
    monkeypatch.setattr("gateway.telemetry.consent.os.replace", replace)
    with pytest.raises(StorageError, match="l.jsonl: cannot append to the audit ledger"):
        asyncio.run(gw.run(require_broker=False, drain_timeout=0.1))
    # the stop steps failed too: logged on one line each, not raised over the first error
    assert "cannot save the consent state" in caplog.text
    assert verify_chain(tmp_path / "l.jsonl").entries >= 1
    from gateway.egress.outbox import Outbox

    ob = Outbox(tmp_path / "o.sqlite")
    on_disk = _on_disk_seqs(tmp_path / "l.jsonl")
    assert all(p.seq in on_disk for p in ob.peek(1000))
    ob.close()
