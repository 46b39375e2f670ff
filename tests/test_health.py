"""The health topic, through the guard and the ledger like every other stream."""

from __future__ import annotations

import json

import pytest

from gateway.egress.schema import unpack
from tests.conftest import KONA_CSV, KONA_PCAN, replay_args, run_gateway

pytestmark = pytest.mark.broker


def test_health_reports_rates_per_channel_errors_outbox_and_resources(
    tmp_path, broker, vin, listen
):
    # GIVEN a bad line in the log, so the health figures have something to count
    log = tmp_path / "with-bad-line.csv"
    lines = KONA_CSV.read_text().splitlines(keepends=True)
    log.write_text("".join([*lines[:500], "this is not a GVRET line\n", *lines[500:]]))
    owner = listen(broker.url, f"vehicles/{vin}/owner/health")
    # WHEN it is replayed at 4x with a health summary every 0.5 s
    p = run_gateway(
        *replay_args(log, [f"can0={KONA_PCAN}"], broker.url, vin, tmp_path, "--speed", "4", "-q"),
        env={"GATEWAY_GATEWAY_HEALTH_INTERVAL": "0.5"},
    )
    assert p.returncode == 0, p.stderr
    health = [unpack(m.payload) for m in owner.settle()]
    # THEN several arrive, each saying what the gateway did so far
    assert len(health) >= 3
    last = health[-1]
    assert last["frames"] == len(lines) - 1  # every frame of the log (header excluded)
    assert last["bad_frames"] == 1
    assert set().union(*(h["frames_per_s"] for h in health)) == {"can0", "can1"}
    busy = [h for h in health[:-1] if h["frames_per_s"]]
    assert busy and all(r > 1000 for h in busy for r in h["frames_per_s"].values())
    assert last["unknown_ids"] > 0  # can1 has no DBC here: its ids are unknown, counted
    assert last["storage"] == "ok" and last["reconnects"] == 0 and last["blocked"] == 0
    assert 5 < last["rss_mb"] < 1000 and 0 <= last["cpu_percent"] <= 400
    assert all(b["uptime_s"] >= a["uptime_s"] for a, b in zip(health, health[1:], strict=False))
    # every health message is in the audit ledger too
    ledgered = [
        e
        for e in map(json.loads, (tmp_path / "ledger.jsonl").read_text().splitlines())
        if e.get("kind") == "egress" and e.get("schema") == "gateway.health"
    ]
    assert len(ledgered) == len(health)
