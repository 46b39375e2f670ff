"""Nothing lost: a broker that goes away mid-replay, a gateway killed with SIGKILL."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import warnings

import pytest

from gateway.egress.ledger import verify_chain
from gateway.egress.schema import unpack
from tests.conftest import (
    FIXTURES,
    KONA_CSV,
    KONA_PCAN,
    assert_one_line_error,
    gateway_settings,
    replay_args,
    run_gateway,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def _ledger_seqs(path, schema="gateway.signals"):
    out = []
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if e.get("kind") == "egress" and e.get("schema") == schema:
            out.append(e["seq"])
    return out


def _received_seqs(messages, stream="signals"):
    seqs = [unpack(m.payload)["seq"] for m in messages if m.topic.endswith("/owner/" + stream)]
    first_seen = []
    seen = set()
    for s in seqs:
        if s not in seen:
            seen.add(s)
            first_seen.append(s)
    return seqs, first_seen


def _replay_cmd(tmp_path, url, vin, *extra):
    return [
        sys.executable,
        "-m",
        "gateway",
        *replay_args(
            KONA_CSV, [f"can0={KONA_PCAN}"], url, vin, tmp_path, "--window", "0.25", "-q", *extra
        ),
    ]


def _paced_replay(tmp_path, url, vin, **popen):  # type: ignore[no-untyped-def]
    """The Kona replay at 3x (about 3.6 s, a summary every 0.25 s of log time), started."""
    return subprocess.Popen(
        _replay_cmd(tmp_path, url, vin, "--speed", "3"), stdout=subprocess.DEVNULL, **popen
    )


def _replay_across_a_broker_restart(
    tmp_path, broker, vin, *, down_s: float, persistence: bool = True
) -> tuple[int, str]:
    """A replay paced at 2x (about 5 s) whose broker is stopped 1.5 s in, for ``down_s``, and
    started again (with its retained messages kept, or not): exit status and stderr."""
    proc = subprocess.Popen(
        _replay_cmd(tmp_path, broker.url, vin, "--speed", "2", "--drain-timeout", "60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    broker.stop()
    broker.persistence = persistence
    time.sleep(down_s)
    broker.start()
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_broker_stopped_mid_replay_loses_nothing_and_keeps_order(
    tmp_path, private_broker, vin, durable_listen
):
    # GIVEN an owner with a persistent session and a replay paced at 2x (about 5 s)
    owner = durable_listen(private_broker.url, f"vehicles/{vin}/owner/#")
    # WHEN the broker is stopped for 3 s in the middle of it and started again
    code, err = _replay_across_a_broker_restart(tmp_path, private_broker, vin, down_s=3.0)
    assert code == 0, err
    produced = _ledger_seqs(tmp_path / "ledger.jsonl")
    owner.wait_until(lambda ms: set(produced) <= set(_received_seqs(ms)[1]))
    messages = owner.stop()
    # THEN every summary the gateway released arrived, in order, duplicates only as repeats
    all_seqs, unique = _received_seqs(messages)
    assert len(produced) >= 20
    assert unique == sorted(unique), "summaries arrived out of order"
    assert set(produced) <= set(unique), f"missing: {sorted(set(produced) - set(unique))}"
    assert set(all_seqs) == set(unique)
    assert owner.connects >= 2  # the owner really was cut off too
    assert "reconnecting" in err
    print(
        f"\nbroker outage: produced {len(produced)}, received {len(unique)} "
        f"({len(all_seqs) - len(unique)} duplicates dropped by seq)"
    )


def test_gateway_killed_mid_replay_delivers_every_committed_summary_after_restart(
    tmp_path, private_broker, vin, durable_listen
):
    owner = durable_listen(private_broker.url, f"vehicles/{vin}/owner/#")
    # GIVEN a replay whose broker is away, so summaries pile up in the outbox
    proc = _paced_replay(tmp_path, private_broker.url, vin, stderr=subprocess.DEVNULL)
    time.sleep(1.2)
    private_broker.stop()
    time.sleep(1.5)
    # WHEN the gateway is killed with SIGKILL
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    committed = set(_ledger_seqs(tmp_path / "ledger.jsonl"))
    with sqlite3.connect(tmp_path / "outbox.sqlite") as db:
        waiting = {r[0] for r in db.execute("SELECT seq FROM outbox WHERE seq IS NOT NULL")}
    assert waiting, "the test needs summaries waiting in the outbox at the kill"
    # ...and started again on the same outbox and ledger, with the broker back
    private_broker.start()
    again = run_gateway(*_replay_cmd(tmp_path, private_broker.url, vin, "--fast")[3:])
    assert again.returncode == 0, again.stderr
    owner.wait_until(lambda ms: committed <= set(_received_seqs(ms)[1]))
    _, unique = _received_seqs(owner.stop())
    # THEN every summary committed before the kill arrived, and the ledger still verifies
    assert committed <= set(unique), f"missing: {sorted(committed - set(unique))[:10]}"
    report = verify_chain(tmp_path / "ledger.jsonl")
    assert report.kinds["start"] == 2
    print(
        f"\nSIGKILL: committed before kill {len(committed)} (waiting {len(waiting)}), "
        f"received {len(unique)} unique"
    )


def test_a_ledger_deleted_mid_run_stops_egress_with_exit_4(
    tmp_path, private_broker, vin, durable_listen
):
    owner = durable_listen(private_broker.url, f"vehicles/{vin}/owner/signals")
    # GIVEN a paced replay publishing a summary every 0.25 s of log time
    proc = _paced_replay(tmp_path, private_broker.url, vin, stderr=subprocess.PIPE, text=True)
    ledger = tmp_path / "ledger.jsonl"
    deadline = time.monotonic() + 30
    while (not ledger.exists() or len(_ledger_seqs(ledger)) < 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    # WHEN its ledger is deleted (the evidence of what leaves gone from the disk)
    recorded = set(_ledger_seqs(ledger))
    ledger.unlink()
    _, err = proc.communicate(timeout=60)
    # THEN the run stops with exit 4 and one line saying so, at its next ledger write: the
    # lines it wrote after the deletion went to no file, and their summaries never left
    assert proc.returncode == 4, err
    assert err.count("the audit ledger was deleted or replaced while the gateway ran") == 1, err
    assert "Traceback" not in err
    time.sleep(0.5)
    _, unique = _received_seqs(owner.stop())
    assert unique and set(unique) <= recorded | {max(recorded) + 1}, (sorted(recorded), unique)
    # AND the owner's retained status is not left at "online": the connection ended without a
    # DISCONNECT, and the broker published the last will (recorded when it connected)
    assert _retained_status(private_broker.url, vin)["state"] == "offline"


def _retained_status(url: str, vin: str) -> dict:
    import asyncio

    import aiomqtt

    async def read() -> dict:
        host, port = url.removeprefix("mqtt://").split(":")
        async with aiomqtt.Client(host, int(port)) as c:
            await c.subscribe(f"vehicles/{vin}/owner/status", qos=1)
            async with asyncio.timeout(5):
                async for m in c.messages:
                    return unpack(m.payload)
        raise AssertionError("no retained status")

    return asyncio.run(read())


def _can_mount_private_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    not _can_mount_private_tmpfs(),
    reason="needs `unshare -rm` to mount a small private tmpfs (user namespaces disabled here)",
)
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_outbox_disk_full_or_read_only_keeps_the_can_path_alive(
    tmp_path, broker, vin, listen, fault
):
    # GIVEN the outbox on its own tiny disk: 128 KiB that fill up after a few summaries, or a
    # disk mounted read-only (a private mount namespace: nothing outside the test sees it)
    disk = tmp_path / "disk"
    disk.mkdir()
    opts = "size=200k" if fault == "full" else "size=200k,ro"
    owner = listen(broker.url, f"vehicles/{vin}/owner/#")
    cmd = [
        "unshare",
        "-rm",
        "sh",
        "-c",
        f'mount -t tmpfs -o {opts} tmpfs "{disk}" && exec "$@"',
        "sh",
        *_replay_cmd(tmp_path, broker.url, vin, "--speed", "4"),
    ]
    outbox_at = cmd.index(str(tmp_path / "outbox.sqlite"))
    cmd[outbox_at] = str(disk / "outbox.sqlite")
    # WHEN the gateway replays (health every 0.5 s)
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "GATEWAY_GATEWAY_HEALTH_INTERVAL": "0.3"},
    )
    # THEN one clear error names the outbox and the reason, the replay completes...
    assert proc.returncode == 0, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("gateway: error:")]
    assert len(errors) == 1 and "outbox.sqlite cannot be written" in errors[0], proc.stderr
    assert (
        ("full" in errors[0])
        if fault == "full"
        else any(w in errors[0].lower() for w in ("readonly", "read-only", "open"))
    )
    assert "Traceback" not in proc.stderr
    # ...every summary the gateway released reached the owner (kept in memory meanwhile)...
    produced = _ledger_seqs(tmp_path / "ledger.jsonl")
    messages = owner.settle()
    _, unique = _received_seqs(messages)
    assert len(produced) >= 20 and set(produced) <= set(unique)
    # ...and the health topic says the storage is degraded while the CAN path kept going
    health = [unpack(m.payload) for m in messages if m.topic.endswith("/owner/health")]
    assert health and health[-1]["storage"] == "degraded"
    assert health[-1]["frames"] > 30_000 and health[-1]["frames_per_s"]
    print(f"\ndisk {fault}: produced {len(produced)}, received {len(unique)}; {errors[0]}")


def test_summaries_held_in_memory_at_the_end_are_on_the_record_as_lost(tmp_path, capsys):
    """The outbox file cannot be written (here its folder cannot even be made) and the broker
    is away: the summaries were kept in memory only, so they end with the process. The ledger
    records them as dropped, and the last line says so, instead of saying they wait in the
    file (it held none of them)."""
    import asyncio

    from gateway.app import Gateway
    from gateway.canbus.replay import ReplaySource
    from gateway.cli import _undelivered

    (tmp_path / "afile").write_text("")
    s = gateway_settings(
        tmp_path,
        {"can0": [str(KONA_PCAN)]},
        vin="LOSTINMEMORY00001",
        window=5.0,
        outbox=str(tmp_path / "afile" / "o.sqlite"),
    )
    gw = Gateway(s, [ReplaySource([KONA_CSV], speed=None)])
    assert gw.outbox.storage == "degraded"
    report = asyncio.run(gw.run(require_broker=False, drain_timeout=0))
    entries = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    # every message through the outbox (the retained consent state has no seq); not the last
    # will, ledgered when it is handed to a connection, which takes no outbox row
    released = [
        e["seq"] for e in entries if e["kind"] == "egress" and e["schema"] != "gateway.status"
    ]
    dropped = [q for e in entries if e["kind"] == "dropped" for q in e["seqs"]]
    assert report.outbox_left == 0 and report.lost_in_memory == len(released) >= 5
    assert dropped == released  # in the order they were released
    assert entries[-1]["kind"] == "stop" and entries[-1]["lost_in_memory"] == len(released)
    verify_chain(tmp_path / "l.jsonl")  # raises on a break
    assert _undelivered(report, s) == 3
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"gateway: error: {len(released)} summaries could not be delivered")
    assert "held in memory only" in line and "wait in" not in line


def test_a_stalled_broker_does_not_hold_the_run_past_its_drain_timeout(tmp_path, private_broker):
    """The broker stops answering (SIGSTOP: the connection stays up, no PUBACK comes) with
    summaries waiting: the run ends at its drain timeout, not 10 s later, when the wait for a
    PUBACK would have ended; what was not acknowledged stays in the outbox."""
    import asyncio

    from gateway.app import Gateway
    from gateway.canbus.replay import ReplaySource

    s = gateway_settings(
        tmp_path,
        {"can0": [str(KONA_PCAN)]},
        url=private_broker.url,
        vin="STALLED0000000001",
        window=0.25,
    )
    gw = Gateway(s, [ReplaySource([KONA_CSV], speed=None)])
    pid = private_broker._proc.pid
    stalled = []

    def on_sent(n: int) -> None:
        if not stalled:
            os.kill(pid, signal.SIGSTOP)
            stalled.append(True)

    gw.publisher.on_sent = on_sent
    gw.publisher.ack_timeout = 30.0  # a slow uplink's: not what ends the run
    t0 = time.monotonic()
    try:
        report = asyncio.run(gw.run(drain_timeout=1.0))
    finally:
        os.kill(pid, signal.SIGCONT)
    # a timeout kept, not a speed measured: the publisher's own wait would end the run 10 s
    # after the drain timeout (30 s for this PUBACK); it ends at the drain timeout
    took = time.monotonic() - t0
    assert stalled and report.outbox_left > 0 and report.sent < report.released
    assert took < 8.0, f"the run ended {took:.1f} s after it began, with a 1 s drain timeout"
    # and the report says what ended the wait (it blamed an "unavailable" broker)
    assert report.drain_cut == "not all sent within the drain timeout of 1 s"


_KILLED_BETWEEN = """
import asyncio, os, sys
from gateway.app import Gateway
from gateway.canbus.replay import ReplaySource
from tests.conftest import KONA_CSV, KONA_PCAN, gateway_settings
from pathlib import Path

s = gateway_settings(Path(sys.argv[1]), {"can0": [str(KONA_PCAN)]}, vin="KILLEDBETWEEN0001", window=2.0)
gw = Gateway(s, [ReplaySource([KONA_CSV], speed=None)])
put_many = gw.outbox.put_many

def put_many_or_die(msgs):
    if any(m.schema == "gateway.signals" for m in msgs):
        os._exit(9)  # killed: its ledger lines are written and synced, the outbox never got them
    put_many(msgs)

gw.outbox.put_many = put_many_or_die
asyncio.run(gw.run(require_broker=False, drain_timeout=0))
"""


def test_a_run_killed_between_ledger_and_outbox_has_its_unsent_summaries_on_the_record(tmp_path):
    """Killed after the group's ledger lines were synced and before the outbox commit: those
    summaries never reach the outbox, so they never leave. The next start says so in the
    ledger (it claimed them released, and nothing else would ever mention them again)."""
    from gateway.app import Gateway

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_BETWEEN, str(tmp_path)], cwd=root, timeout=120
    )
    assert proc.returncode == 9
    entries = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    released = [
        (e["seq"], e["sha256"]) for e in entries if e["kind"] == "egress" and e["seq"] is not None
    ]
    assert released and entries[-1]["kind"] == "egress"  # no stop entry: killed
    # WHEN the gateway starts again on the same ledger and outbox
    s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}, vin="KILLEDBETWEEN0001")
    gw = Gateway(s, [])
    gw.ledger.close()
    gw.outbox.close()
    # THEN the summaries of that last group are on the record as never sent, and only they
    entries = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    dropped = [e for e in entries if e["kind"] == "dropped"]
    assert len(dropped) == 1 and "before they reached the outbox" in dropped[0]["reason"]
    assert list(zip(dropped[0]["seqs"], dropped[0]["sha256"], strict=True)) == released
    verify_chain(tmp_path / "l.jsonl")
    # and a later start does not record them again
    Gateway(s, []).ledger.close()
    again = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert sum(e["kind"] == "dropped" for e in again) == 1


def test_a_last_will_is_on_the_record_once_for_all_the_attempts_until_a_broker_takes_it(
    tmp_path, private_broker
):
    """The "offline" last will travels in CONNECT: it was ledgered as egress on every attempt,
    and a car offline for a day wrote thousands of entries for messages that never left. It
    is on the record before its first CONNECT (a broker holds it from reading the CONNECT,
    whether or not its CONNACK arrives), once, and the same will goes with every attempt."""
    import asyncio

    from gateway.app import Gateway

    url = private_broker.url
    private_broker.stop()  # away: the gateway collects and retries
    s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}, url=url, vin="LASTWILL000000001")
    gw = Gateway(s, [])
    gw.publisher.backoff_initial = 0.05
    asyncio.run(gw.run(require_broker=False, drain_timeout=1.0))

    def statuses() -> int:  # the ledger keeps a message's hash, not its text
        entries = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
        return sum(e["kind"] == "egress" and e["schema"] == "gateway.status" for e in entries)

    assert gw.publisher.reconnects >= 3 and statuses() == 1
    private_broker.start()  # back: the next run's connection takes its own will
    s2 = gateway_settings(
        tmp_path, {"can0": [str(KONA_PCAN)]}, url=private_broker.url, vin="LASTWILL000000001"
    )
    asyncio.run(Gateway(s2, []).run(drain_timeout=5.0))
    assert statuses() == 1 + 3  # its will, "online", and "offline" (stopped) at the end


def test_a_last_will_the_broker_took_while_its_connack_came_too_late_is_on_the_record(
    tmp_path, private_broker, monkeypatch
):
    """A broker holds the will from the moment it reads the CONNECT. With its CONNACK slower
    than the gateway's connect timeout (a stalled link), the gateway gave up and closed the
    connection; the broker published the retained "offline" will, and the ledger, told only
    at a CONNACK, had no line for those bytes."""
    import hashlib

    import aiomqtt

    from gateway.app import Gateway
    from gateway.egress import mqtt as mqtt_mod
    from gateway.errors import BrokerError

    monkeypatch.setattr(mqtt_mod, "FIRST_CONNECT_TIMEOUT", 0.5)
    vin = "LATECONNACK000001"

    async def pipe(reader, writer, delay: float) -> None:
        try:
            while data := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)  # (the broker's answers: held past the timeout)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def proxied(client_r, client_w) -> None:
        broker_r, broker_w = await asyncio.open_connection("127.0.0.1", private_broker.port)
        await asyncio.gather(pipe(client_r, broker_w, 0.0), pipe(broker_r, client_w, 1.5))

    async def main() -> bytes | None:
        server = await asyncio.start_server(proxied, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}, url=f"mqtt://127.0.0.1:{port}")
        s = dataclasses.replace(s, gateway=dataclasses.replace(s.gateway, vin=vin))
        with pytest.raises(BrokerError):
            await Gateway(s, []).run(drain_timeout=1.0)
        await asyncio.sleep(2.0)  # the proxy passes the close on; the broker publishes the will
        server.close()
        async with aiomqtt.Client("127.0.0.1", private_broker.port) as sub:
            await sub.subscribe(f"vehicles/{vin}/owner/status", qos=1)
            try:
                async with asyncio.timeout(3):
                    async for m in sub.messages:
                        return bytes(m.payload)
            except TimeoutError:
                return None
        return None

    will = asyncio.run(main())
    assert will is not None, "the broker published no will: the scenario did not happen"
    assert unpack(will)["state"] == "offline"
    entries = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    recorded = {e.get("sha256") for e in entries if e["kind"] == "egress"}
    assert hashlib.sha256(will).hexdigest() in recorded


def test_ctrl_c_while_a_silent_broker_is_checked_ends_the_run_at_once(tmp_path):
    import socket as socket_mod

    # GIVEN a "broker" that accepts the connection and never answers (the check waits 5 s)
    silent = socket_mod.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    url = f"mqtt://127.0.0.1:{silent.getsockname()[1]}"
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway",
             *replay_args(KONA_CSV, [f"can0={KONA_PCAN}"], url, "SILENTBROKER00001", tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        silent.settimeout(30)
        conn, _ = silent.accept()  # the check is waiting for its CONNACK
        time.sleep(0.3)
        # WHEN the user presses Ctrl-C
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        waited = time.monotonic() - t0
        conn.close()
    finally:
        silent.close()
    # THEN it stops then, not when the check times out (3.5 s later), and says so
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert waited < 2.5, waited


def test_a_run_cancelled_while_a_silent_broker_is_checked_is_cancelled_not_interrupted(
    tmp_path,
):
    # (its code raised KeyboardInterrupt on any end of that wait but the check's own: a
    # caller's wait_for, or a task group, got a KeyboardInterrupt that stopped its loop)
    import asyncio
    import socket as socket_mod

    from gateway.app import Gateway

    silent = socket_mod.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    url = f"mqtt://127.0.0.1:{silent.getsockname()[1]}"
    s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}, url=url, vin="CANCELLED00000001")
    gc.collect()  # (what earlier tests left: paho's socket pairs of their clients' threads)
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(TimeoutError):
                asyncio.run(asyncio.wait_for(Gateway(s, []).run(), 1.0))
            gc.collect()
    finally:
        silent.close()
    # AND the connection it was making is closed: aiomqtt left paho's socket open, and its
    # "unclosed socket" warning failed a later test
    # (a socket of another test's, collected meanwhile, is not this one's)
    ours = f"raddr=('127.0.0.1', {url.rsplit(':', 1)[1]})>"
    unclosed = [str(w.message) for w in said if "unclosed" in str(w.message)]
    assert not [m for m in unclosed if m.endswith(ours)], unclosed


def test_a_fast_looping_replay_waits_for_a_connected_publisher(
    tmp_path, private_broker, monkeypatch
):
    """A fast --loop replay made summaries far faster than one turn of the event loop per
    0.1 s let the publisher send (8 a second): its outbox reached its bound and dropped them."""
    import asyncio

    from gateway import app as app_mod
    from gateway.canbus.replay import ReplaySource

    monkeypatch.setattr(app_mod, "UNPACED_BACKLOG", 200)
    drive = FIXTURES / "model3" / "model3_synthetic_drive.log"
    s = gateway_settings(
        tmp_path, {"*": [str(drive.with_name("Model3CAN.dbc"))]}, url=private_broker.url,
        window=2.0,
    )  # fmt: skip
    gw = app_mod.Gateway(s, [ReplaySource([drive], speed=None, loop=True, max_laps=30)])
    depths = []
    put_many = gw.outbox.put_many

    def put_and_look(msgs):
        put_many(msgs)
        if gw.publisher.connected.is_set():  # (before, it has nothing to wait for)
            depths.append(gw.outbox.depth())

    gw.outbox.put_many = put_and_look
    report = asyncio.run(gw.run(drain_timeout=30))
    # THEN, connected, the backlog stayed within a group's summaries (~600) of its bound
    # while thousands were made, and all were sent
    assert report.released > 5000 and report.sent == report.released and not report.dropped
    assert len(depths) > 5 and max(depths) < 1500, (len(depths), max(depths))


def test_an_outbox_deleted_while_the_gateway_runs_is_said_not_promised_to_the_next_run(
    tmp_path, capsys
):
    import asyncio

    from gateway.app import Gateway
    from gateway.canbus.replay import ReplaySource
    from gateway.cli import _undelivered

    class DeletesTheOutbox:  # a replay whose outbox file is deleted after its first batch
        unpaced = True

        def __init__(self) -> None:
            self.inner = ReplaySource([KONA_CSV], speed=None)

        async def batches(self):  # type: ignore[no-untyped-def]
            async for i, batch in _enumerate(self.inner.batches()):
                if i == 1:
                    for f in tmp_path.glob("o.sqlite*"):
                        f.unlink()
                yield batch

    s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}, window=0.5)  # no broker
    gw = Gateway(s, [DeletesTheOutbox()])
    gw.publisher.backoff_initial = 0.05
    report = asyncio.run(gw.run(require_broker=False, drain_timeout=0.3))
    # THEN what waited in it is not said to wait for the next run, but lost, and recorded
    assert report.outbox_deleted > 0 and report.outbox_left == 0, report
    assert _undelivered(report, s) == 3
    assert "were lost with the outbox file, deleted while the gateway ran" in (
        capsys.readouterr().err
    )
    entries = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert entries[-1]["kind"] == "stop" and entries[-1]["outbox_left"] == 0
    assert any("deleted while the gateway ran" in e.get("reason", "") for e in entries)


async def _enumerate(items):  # type: ignore[no-untyped-def]
    i = 0
    async for item in items:
        yield i, item
        i += 1


def test_an_outbox_gone_after_a_killed_run_is_said_and_recorded(tmp_path, caplog):
    from gateway.app import Gateway
    from gateway.egress.ledger import Ledger

    # GIVEN a ledger whose last run was killed (egress entries, no stop entry)
    s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}, vin="KILLEDRUN00000001")
    killed = Ledger(tmp_path / "l.jsonl")
    killed.append("start", vin="KILLEDRUN00000001", outbox=str((tmp_path / "o.sqlite").resolve()))
    killed.append("egress", seq=0, sha256="0" * 64, topic="t", schema="gateway.signals")
    killed.close()
    # WHEN the next run finds no outbox file
    with caplog.at_level("WARNING"):
        gw = Gateway(s, [])
    gw.ledger.close()
    gw.outbox.close()
    # THEN it says so, and the ledger records it (how many is not known)
    assert "has no stop entry (killed?), and this outbox is gone" in caplog.text
    entries = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in entries] == ["start", "egress", "dropped", "start"]
    assert "how many is not known" in entries[2]["reason"]


def test_summaries_dropped_by_the_outboxs_bounds_make_the_exit_status_3(tmp_path, capsys):
    # (it was 0, "everything released was delivered", though 49 had been dropped)
    from gateway.app import RunReport
    from gateway.cli import _undelivered

    s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]})
    assert _undelivered(RunReport(released=300, sent=300), s) == 0
    assert _undelivered(RunReport(released=300, sent=251, dropped=49), s) == 3
    err = capsys.readouterr().err
    # and with some also left waiting, both are said
    assert _undelivered(RunReport(released=300, sent=200, dropped=49, outbox_left=51), s) == 3
    both = capsys.readouterr().err
    assert "100 summaries could not be delivered" in both and "49 were dropped" in both, both
    assert "49 summaries were never delivered; 49 were dropped by the outbox's bounds" in err


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_summaries_lost_with_an_outbox_gone_since_the_last_run_are_said_and_recorded(
    tmp_path, private_broker, capsys, how
):
    import asyncio

    from gateway.app import Gateway
    from gateway.canbus.replay import ReplaySource
    from gateway.cli import _undelivered

    # GIVEN a run whose broker was away: its summaries wait in the outbox file
    url = private_broker.url
    private_broker.stop()
    s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}, url=url, vin="GONEOUTBOX0000001")
    first = Gateway(s, [ReplaySource([KONA_CSV], speed=None)])
    first.publisher.backoff_initial = 0.05
    left = asyncio.run(first.run(require_broker=False, drain_timeout=0.3)).outbox_left
    assert left > 0
    # WHEN the outbox file is deleted, or emptied, before the next run
    outbox = tmp_path / "o.sqlite"
    for extra in tmp_path.glob("o.sqlite-*"):
        extra.unlink()
    outbox.unlink() if how == "deleted" else outbox.write_bytes(b"")
    private_broker.start()
    report = asyncio.run(Gateway(s, []).run(drain_timeout=5.0))
    # THEN the next run says so (exit status 3 and one line), and the ledger records them
    assert report.outbox_lost == left
    assert _undelivered(report, s) == 3
    # (a run with another outbox file, or one that cannot be opened, is no judge of it: they
    # could still be sent from it)
    other = dataclasses.replace(
        s, gateway=dataclasses.replace(s.gateway, outbox=str(tmp_path / "b.sqlite"))
    )
    assert asyncio.run(Gateway(other, []).run(drain_timeout=5.0)).outbox_lost == 0
    err = capsys.readouterr().err
    assert f"{left} left waiting by the last run were lost with its outbox file" in err
    entries = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    drops = [e for e in entries if e["kind"] == "dropped" and e.get("count") == left]
    assert len(drops) == 1 and "deleted or replaced" in drops[0]["reason"]
    assert verify_chain(tmp_path / "l.jsonl").kinds["stop"] == 3


def test_a_stop_while_waiting_for_an_absent_broker_ends_the_wait_and_keeps_the_rest(tmp_path):
    import asyncio

    from gateway.app import Gateway
    from gateway.canbus.replay import ReplaySource

    # GIVEN a replay whose broker is away, with a 60 s wait for it at the end
    s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}, vin="DRAINSTOP00000001", window=5.0)
    gw = Gateway(s, [ReplaySource([KONA_CSV], speed=None)])

    async def main():
        stop = asyncio.Event()
        run = asyncio.create_task(gw.run(stop, require_broker=False, drain_timeout=60))
        while not gw.report.frames or gw.outbox.depth() == 0:  # the frames are in
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # ... and it waits for the broker
        # WHEN the user stops it (Ctrl-C once, after the replay ended)
        stop.set()
        return await asyncio.wait_for(run, 20)  # not the 60 s it would wait for the broker

    report = asyncio.run(main())
    # THEN it ended, and everything undelivered is still in the outbox and on the record
    from gateway.egress.outbox import Outbox

    assert report.outbox_left > 0 and report.sent == 0
    kept = Outbox(tmp_path / "o.sqlite")
    assert kept.depth() == report.outbox_left
    kept.close()
    assert verify_chain(tmp_path / "l.jsonl").kinds["stop"] == 1


def test_a_broker_that_lost_its_retained_messages_gets_the_consent_state_again(
    tmp_path, private_broker, vin, listen
):
    """A broker restarted without persistence has lost the retained consent state; the
    gateway published it only at its start, so an owner connecting later saw none."""
    code, err = _replay_across_a_broker_restart(
        tmp_path,
        private_broker,
        vin,
        down_s=2.0,
        persistence=False,  # it comes back empty
    )
    assert code == 0, err
    assert "reconnecting" in err
    retained = listen(private_broker.url, f"vehicles/{vin}/owner/consent").settle()
    assert len(retained) == 1 and retained[0].retain
    assert unpack(retained[0].payload)["collection"] == "on"


def test_an_idle_gateway_reconnects_at_once_when_its_broker_comes_back(tmp_path, private_broker):
    """A publisher with nothing to send found a lost connection only at its next send (a
    window later): until then its subscription, and with it the owner's commands, was gone."""
    import asyncio

    from gateway.egress.mqtt import MqttPublisher
    from gateway.egress.outbox import Outbox
    from gateway.settings import BrokerSettings

    ob = Outbox(tmp_path / "o.sqlite")
    pub = MqttPublisher(
        BrokerSettings(url=private_broker.url, backoff_max=0.5),
        ob,
        "gw-idle",
        status=lambda s, r: None,
        inbound_topics=("vehicles/V/owner/command",),
    )

    async def main() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(pub.run(stop))
        await asyncio.wait_for(pub.listening.wait(), 10)
        private_broker.stop()
        private_broker.start()
        t0 = time.monotonic()
        while pub.reconnects == 0 or not pub.listening.is_set():
            await asyncio.sleep(0.05)
            if time.monotonic() - t0 > 20:
                break
        took = time.monotonic() - t0
        stop.set()
        await asyncio.wait_for(task, 15)
        return took

    took = asyncio.run(main())
    ob.close()
    assert pub.reconnects >= 1 and pub.connections == 2, "never noticed the lost connection"
    assert took < 20


def test_a_command_sent_as_soon_as_the_gateway_is_online_is_obeyed_in_a_fast_loop(
    tmp_path, broker, vin
):
    # GIVEN a fast replay in a loop, which holds the event loop 0.1 s at a time: its publisher
    # used to connect beside it, in 3-4 s, and a command sent meanwhile was lost
    proc = subprocess.Popen(
        _replay_cmd(tmp_path, broker.url, vin, "--fast", "--loop"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ledger = tmp_path / "ledger.jsonl"

    def obeyed() -> bool:
        lines = ledger.read_text().splitlines() if ledger.exists() else []
        entries = [json.loads(line) for line in lines if line.strip()]
        return any(e["kind"] == "consent" and e["result"].get("action") == "stop" for e in entries)

    async def owner() -> float:
        import aiomqtt

        async with aiomqtt.Client(broker.host, broker.port) as c:
            await c.subscribe(f"vehicles/{vin}/owner/status", qos=1)
            async with asyncio.timeout(30):
                async for m in c.messages:
                    if unpack(bytes(m.payload)).get("state") == "online":
                        break
            # WHEN the owner stops collection the moment the gateway says it is online
            await c.publish(f"vehicles/{vin}/owner/command", b'{"command": "stop"}', qos=1)
            return time.monotonic()

    try:
        sent = asyncio.run(owner())
        # THEN the gateway takes the command: it was subscribed before it said "online", and
        # before it read a frame (it took 3-4 s to subscribe, and the command was lost)
        while not obeyed() and time.monotonic() - sent < 10:
            time.sleep(0.05)
        assert obeyed(), "the owner's stop never reached the gateway"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def test_a_broker_that_never_acknowledges_the_subscriptions_does_not_hold_a_replay(tmp_path, vin):
    # GIVEN a "broker" that accepts each connection (CONNACK) and then answers nothing: the
    # gateway's subscriptions to the owner's commands are never acknowledged
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(1024)  # CONNECT
            conn.sendall(bytes([0x20, 0x02, 0x00, 0x00]))  # CONNACK, accepted
            held.append(conn)  # read by nobody, closed at the end

    threading.Thread(target=serve, daemon=True).start()
    try:
        # WHEN a fast replay runs against it
        t0 = time.monotonic()
        proc = subprocess.run(
            _replay_cmd(
                tmp_path, f"mqtt://127.0.0.1:{port}", vin, "--fast", "--drain-timeout", "1"
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        took = time.monotonic() - t0
    finally:
        server.close()
        for conn in held:
            conn.close()
    # THEN it waits a few seconds for the subscriptions, says so, replays, and keeps what it
    # could not send in the outbox (exit 3): it must not wait for them without end
    assert proc.returncode == 3, proc.stderr
    assert "did not take the subscriptions" in proc.stderr
    assert "wait in" in proc.stderr
    assert took < 60
    assert "Traceback" not in proc.stderr


def test_a_publisher_that_fails_after_its_connack_stops_the_run_before_a_frame_is_read(
    tmp_path, broker, vin
):
    # GIVEN a gateway whose ledger cannot take the publisher's "online" status, written
    # after the broker's CONNACK (a disk that fills at that moment)
    from gateway.app import Gateway
    from gateway.canbus.replay import ReplaySource
    from gateway.errors import StorageError

    s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}, url=broker.url, vin=vin)
    gw = Gateway(s, [ReplaySource([KONA_CSV], speed=None)])
    status = gw.publisher.status

    def failing(state, reason):  # type: ignore[no-untyped-def]
        if state == "online":
            raise StorageError(f"{tmp_path / 'l.jsonl'}: No space left on device")
        return status(state, reason)

    gw.publisher.status = failing
    # WHEN it runs
    with pytest.raises(StorageError, match="No space left"):
        asyncio.run(gw.run(drain_timeout=1))
    # THEN it stops with the ledger's error before it reads a frame: it did not replay the
    # whole log with no publisher (after a warning that the broker took no subscriptions)
    assert gw.report.frames == 0


def _summaries_left_waiting(tmp_path, vin) -> list[int]:
    """A fast Kona replay whose broker is away (gateway_settings' ledger and outbox in
    ``tmp_path``, window 0.25 s): the seqs of the summaries of signals it left in the outbox."""
    s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}, vin=vin, window=0.25)
    from gateway.app import Gateway
    from gateway.canbus.replay import ReplaySource

    gw = Gateway(s, [ReplaySource([KONA_CSV], speed=None)])
    gw.publisher.backoff_initial = 0.05
    assert asyncio.run(gw.run(require_broker=False, drain_timeout=0)).sent == 0
    with sqlite3.connect(tmp_path / "o.sqlite") as db:
        rows = db.execute("SELECT seq FROM outbox WHERE schema = 'gateway.signals' ORDER BY id")
        seqs = [q for (q,) in rows]
    assert len(seqs) >= 20, "the test needs summaries waiting in the outbox"
    return seqs


# the auditor's two: a topic that is not UTF-8, a payload made text (|| X'00' turns a blob
# into text): each made the whole outbox unreadable, taken for a failing disk, and nothing sent
_DAMAGED_ROW = {
    "topic not UTF-8": "topic = CAST(X'FF41' AS TEXT)",
    "payload made text": "payload = payload || X'00'",
}


@pytest.mark.parametrize("damage", _DAMAGED_ROW.values(), ids=_DAMAGED_ROW.keys())
def test_a_row_damaged_in_the_outbox_file_stops_the_start_with_exit_4_and_nothing_is_sent(
    tmp_path, broker, vin, listen, damage
):
    # GIVEN summaries waiting in the outbox, one of them changed in the file by hand
    waiting = _summaries_left_waiting(tmp_path, vin)
    with sqlite3.connect(tmp_path / "o.sqlite") as db:
        db.execute(f"UPDATE outbox SET {damage} WHERE seq = ?", (waiting[5],))
    owner = listen(broker.url, f"vehicles/{vin}/owner/signals")
    # WHEN a run starts on it, its broker there (an empty log: it only drains the outbox)
    empty = tmp_path / "empty.log"
    empty.write_text("")
    proc = run_gateway(
        "replay", str(empty), "--dbc", f"can0={KONA_PCAN}", "--broker", broker.url,
        "--vin", vin, "--ledger", str(tmp_path / "l.jsonl"),
        "--outbox", str(tmp_path / "o.sqlite"), "-q",
    )  # fmt: skip
    # THEN it stops with exit 4 and one line naming the file and the row, as for any row
    # changed after its egress line was written (it was exit 0, "outbox cannot be written",
    # and none of the others sent, in this run or any later one)
    assert proc.returncode == 4, proc.stderr
    assert_one_line_error(
        proc, str(tmp_path / "o.sqlite"), f"seq {waiting[5]}", "Nothing was sent; move it aside"
    )
    assert owner.settle() == []
    with sqlite3.connect(tmp_path / "o.sqlite") as db:  # and every one still waits
        kept = db.execute("SELECT seq FROM outbox WHERE schema = 'gateway.signals'").fetchall()
    assert len(kept) == len(waiting)


def test_a_row_damaged_while_the_gateway_runs_is_not_sent_and_every_other_is(
    tmp_path, broker, vin, listen, capsys
):
    from gateway.app import Gateway
    from gateway.cli import _undelivered

    # GIVEN summaries waiting in the outbox, and a gateway whose start check passed
    waiting = _summaries_left_waiting(tmp_path, vin)
    s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}, url=broker.url, vin=vin)
    gw = Gateway(s, [])
    # WHEN one of them is damaged in the file before it is sent
    with sqlite3.connect(tmp_path / "o.sqlite") as db:
        db.execute("UPDATE outbox SET topic = CAST(X'FF41' AS TEXT) WHERE seq = ?", (waiting[5],))
    owner = listen(broker.url, f"vehicles/{vin}/owner/signals")
    report = asyncio.run(gw.run(drain_timeout=10))
    # THEN every other one reaches the owner, in order; the damaged one is not sent (it was
    # none of them: the outbox went to memory, empty, as if the disk had failed)
    _, received = _received_seqs(owner.settle())
    assert received == [q for q in waiting if q != waiting[5]]
    # AND it is on the record as dropped, with the reason, and the exit status says so
    entries = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    drops = [e for e in entries if e["kind"] == "dropped"]
    assert [e["seqs"] for e in drops] == [[waiting[5]]]
    assert "its topic is not UTF-8 text" in drops[0]["reason"]
    assert report.changed_in_outbox == 1 and report.outbox_left == 0
    assert _undelivered(report, s) == 3
    assert "1 were not sent, their rows changed or damaged in" in capsys.readouterr().err


def _can_drop_root() -> bool:
    """Whether a command can run as a user whose file modes are enforced: any user but root,
    or, for root, uid 1000 of a user namespace of its own (no capabilities: a file of mode
    444 cannot be opened to be written, as for any user)."""
    if os.geteuid() != 0:
        return True
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-user=1000", "--map-group=1000", "true"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.parametrize("broker_there", [True, False], ids=["broker there", "broker away"])
@pytest.mark.parametrize(
    "read_only",
    [
        pytest.param(
            "disk",
            marks=pytest.mark.skipif(
                not _can_mount_private_tmpfs(), reason="needs `unshare -rm` to mount a tmpfs"
            ),
        ),
        pytest.param(
            "file",
            marks=pytest.mark.skipif(
                not _can_drop_root(), reason="needs `unshare --user` to run without root"
            ),
        ),
    ],
)
def test_summaries_waiting_in_a_read_only_outbox_are_sent_and_said_to_stay_in_it(
    tmp_path, broker, vin, listen, read_only, broker_there
):
    # GIVEN summaries waiting in an outbox that cannot be written: on a disk mounted
    # read-only (a private mount namespace), or a file of mode 444; its ledger elsewhere
    waiting = _summaries_left_waiting(tmp_path / "state", vin)
    with sqlite3.connect(tmp_path / "state" / "o.sqlite") as db:
        in_file = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    empty = tmp_path / "empty.log"
    empty.write_text("")
    url = broker.url if broker_there else "mqtt://127.0.0.1:1"
    outbox = tmp_path / "state" / "o.sqlite"
    if read_only == "disk":
        outbox = tmp_path / "disk" / "o.sqlite"
        outbox.parent.mkdir()
        shell = (
            f'mount -t tmpfs -o size=10m tmpfs "{outbox.parent}" && '
            f'cp "{tmp_path / "state" / "o.sqlite"}" "{outbox}" && '
            f'mount -o remount,ro "{outbox.parent}" && exec "$@"'
        )
        prefix = ["unshare", "-rm", "sh", "-c", shell, "sh"]
    else:
        outbox.chmod(0o444)
        prefix = ["unshare", "--user", "--map-user=1000", "--map-group=1000"]
        prefix = prefix if os.geteuid() == 0 else []
    owner = listen(broker.url, f"vehicles/{vin}/owner/signals")
    # WHEN a run drains it (an empty log)
    proc = subprocess.run(
        [
            *prefix, sys.executable, "-m", "gateway", "replay", str(empty),
            "--dbc", f"can0={KONA_PCAN}", "--broker", url, "--vin", vin,
            "--ledger", str(tmp_path / "state" / "l.jsonl"), "--outbox", str(outbox), "-q",
        ],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    stop = json.loads((tmp_path / "state" / "l.jsonl").read_text().splitlines()[-1])
    assert stop["kind"] == "stop"
    assert "Traceback" not in proc.stderr
    if broker_there:
        # THEN every summary waiting in it reaches the owner in this run (none did: the file
        # was never opened, and nothing in it read)...
        _, received = _received_seqs(owner.settle())
        assert received == waiting, proc.stderr
        # ...and the stop entry and the last lines do not say the file is empty: it still
        # holds them, and the next run that can write it sends them again (the owner drops
        # the repeats by seq); the exit status says that all were delivered
        assert proc.returncode == 0, proc.stderr
        assert (stop["outbox_left"], stop.get("outbox_sent_kept")) == (0, in_file)
        assert f"{in_file} summaries sent in this run stay in {outbox}" in proc.stderr
    else:
        # THEN, not sent, they are said to wait in it (the stop entry said "outbox_left": 0)
        assert proc.returncode == 3, proc.stderr
        assert stop["outbox_left"] == in_file and "outbox_sent_kept" not in stop
        assert owner.settle() == []


@pytest.mark.skipif(not _can_mount_private_tmpfs(), reason="needs `unshare -rm` to mount a tmpfs")
def test_a_read_only_outbox_whose_write_ahead_log_cannot_be_read_stops_the_start(tmp_path, vin):
    # GIVEN an outbox whose last rows are only in its -wal (a run killed before SQLite moved
    # them into the file), without its -shm, on a disk mounted read-only: SQLite cannot read
    # the -wal without making a -shm, and reading the file alone would miss those rows
    waiting = _summaries_left_waiting(tmp_path / "state", vin)
    copy = tmp_path / "copy"
    copy.mkdir()
    db = sqlite3.connect(tmp_path / "state" / "o.sqlite", isolation_level=None)
    db.execute("PRAGMA wal_autocheckpoint = 0")
    db.execute("DELETE FROM outbox WHERE seq = ?", (waiting[0],))  # a change held in the -wal
    for name in ("o.sqlite", "o.sqlite-wal"):
        shutil.copy(tmp_path / "state" / name, copy / name)
    db.close()
    disk = tmp_path / "disk"
    disk.mkdir()
    empty = tmp_path / "empty.log"
    empty.write_text("")
    shell = (
        f'mount -t tmpfs -o size=10m tmpfs "{disk}" && cp "{copy}"/* "{disk}" && '
        f'mount -o remount,ro "{disk}" && exec "$@"'
    )
    # WHEN a run starts on it
    proc = subprocess.run(
        [
            "unshare", "-rm", "sh", "-c", shell, "sh", sys.executable, "-m", "gateway",
            "replay", str(empty), "--dbc", f"can0={KONA_PCAN}", "--broker", "mqtt://127.0.0.1:1",
            "--vin", vin, "--ledger", str(tmp_path / "state" / "l.jsonl"),
            "--outbox", str(disk / "o.sqlite"), "-q",
        ],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    # THEN it stops with exit 4 and one line naming the file (it ran saying nothing waited)
    assert proc.returncode == 4, proc.stderr
    assert_one_line_error(proc, str(disk / "o.sqlite"), "nor read without writing")
