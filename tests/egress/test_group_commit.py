"""A fast replay commits its egress in groups of batches (a paced one per batch): one ledger
fsync, one outbox transaction, and never a message in the outbox before its ledger line is on
the disk."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from types import SimpleNamespace

import pytest

from gateway.app import Gateway
from gateway.canbus.replay import ReplaySource
from gateway.egress.guard import Outgoing
from gateway.egress.ledger import verify_chain
from gateway.errors import StorageError
from tests.conftest import KONA_CSV, KONA_PCAN, gateway_settings


def _gateway(tmp_path, window=1.0):
    # no broker listens: everything waits in the outbox
    s = gateway_settings(
        tmp_path, {"can0": [str(KONA_PCAN)]}, vin="GROUPCOMMIT000001", window=window
    )
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


class _Pieces:
    """The Kona log's fast batches, each cut into ``n`` pieces: an unpaced source of many
    batches."""

    unpaced = True

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.running = False  # between its first and its last batch

    async def batches(self):
        import numpy as np

        from gateway.canbus.chunking import FAST
        from gateway.canbus.replay import iter_log

        self.running = True
        for batch in iter_log(KONA_CSV, chunking=FAST):
            for idx in np.array_split(np.arange(len(batch)), self.n):
                self.count += 1
                yield batch.select(idx)
        self.running = False


def _grouped_run(tmp_path, monkeypatch, seconds):
    monkeypatch.setattr("gateway.app.UNPACED_GROUP_SECONDS", seconds)
    gw = _gateway(tmp_path)
    source = gw.sources[0] = _Pieces(20)
    puts = []  # the messages of each group commit
    egress_group = gw.egress_group

    @contextlib.contextmanager
    def counted():
        opens = gw._group is None
        with egress_group():
            yield
            if opens:
                puts.append(len(gw._group))

    monkeypatch.setattr(gw, "egress_group", counted)

    async def main():
        closed = []  # at each turn of another task during the replay: no egress group open?
        stop = asyncio.Event()

        async def other_task():
            while not stop.is_set():
                if source.running:
                    closed.append(gw._group is None)
                await asyncio.sleep(0)

        task = asyncio.create_task(other_task())
        report = await gw.run(require_broker=False, drain_timeout=0.1)
        stop.set()
        await task
        return report, closed

    report, closed = asyncio.run(main())
    payloads = [p.payload for p in gw.outbox.peek(10_000)]
    gw.outbox.close()
    return SimpleNamespace(
        report=report, commits=puts, closed=closed, batches=source.count, payloads=payloads
    )


def test_an_unpaced_source_shares_one_group_across_its_batches_and_nothing_runs_inside(
    tmp_path, monkeypatch
):
    # GIVEN the same unpaced source of 40 batches, committed once (a group that never times
    # out) and once per batch (a group of zero seconds)
    one = _grouped_run(tmp_path / "one", monkeypatch, 1e9)
    each = _grouped_run(tmp_path / "each", monkeypatch, 0.0)
    assert one.batches == each.batches == 40 and one.report.released > 10
    # THEN one commit took the whole replay's windows (and one the flush at its end), and no
    # other task ran meanwhile ...
    assert len(one.commits) == 2 and sum(one.commits) > 10
    assert one.closed == []
    # ... while per-batch groups committed after each batch and yielded to the loop after
    # each, and no other task ever saw an open group: nothing of theirs can land inside one
    assert len(each.commits) == 41 and sum(each.commits) == sum(one.commits)
    assert len(each.closed) >= 39 and all(each.closed)
    # and the owner gets the same bytes either way
    assert one.payloads == each.payloads
