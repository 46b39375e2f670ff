"""Live buses (python-can's virtual interface): a receive error, frame times off the bus's
clock, a silent bus, and several buses as one stream."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any

import can
import can.util
import pytest
from can.interfaces.virtual import VirtualBus

from gateway.app import Gateway
from gateway.canbus.dbc import load_dbc
from gateway.canbus.source import STEP_FRAMES, BusSpec, LiveBusSource
from gateway.egress.outbox import Outbox
from gateway.egress.schema import unpack
from gateway.errors import InputError
from tests.conftest import FIXTURES, gateway_settings

MODEL3 = FIXTURES / "model3" / "Model3CAN.dbc"


class FlakyBus(VirtualBus):
    """A virtual bus whose ``recv`` fails once, at its ``FAIL_AT``-th call that would return a
    frame (socketcan's "Network is down" after a bus-off): the frame stays queued."""

    FAIL_AT = 0
    calls = 0

    def recv(self, timeout=None):  # type: ignore[no-untyped-def]
        if FlakyBus.FAIL_AT and not self.queue.empty():
            FlakyBus.calls += 1
            if FlakyBus.calls == FlakyBus.FAIL_AT:
                raise can.CanOperationError("Network is down [Error Code 100]")
        return super().recv(timeout)


@pytest.fixture
def flaky(monkeypatch):
    monkeypatch.setitem(can.interfaces.BACKENDS, "flaky", (__name__, "FlakyBus"))
    monkeypatch.setattr(can.util, "VALID_INTERFACES", can.util.VALID_INTERFACES | {"flaky"})
    monkeypatch.setattr(FlakyBus, "calls", 0)
    monkeypatch.setattr(FlakyBus, "FAIL_AT", 0)
    return FlakyBus


def _channel() -> str:
    return "vbus-" + uuid.uuid4().hex[:8]


async def _collect(
    source: LiveBusSource, until, timeout: float = 10.0, batches: list | None = None
) -> list[float]:
    """Frame times the source hands on, until ``until(times)``; then it is stopped. Each
    batch's times, with the source's clock_steps when it came, go to ``batches``."""
    times: list[float] = []

    async def read() -> None:
        async for batch in source.batches():
            times.extend(batch.timestamp.tolist())
            if batches is not None and len(batch):
                batches.append((source.clock_steps, batch.timestamp.tolist()))
            if until(times):
                source.stop.set()

    await asyncio.wait_for(read(), timeout)
    return times


def _frame(t: float, i: int = 0x123) -> can.Message:
    return can.Message(timestamp=t, arbitration_id=i, data=bytes(8), is_extended_id=False)


async def test_a_receive_error_is_said_and_the_bus_read_again(flaky, caplog):
    # GIVEN a bus whose receive fails once, on the 50th frame (python-can's Notifier ended
    # its thread there: nothing more was read, and nothing said but a traceback)
    ch = _channel()
    flaky.FAIL_AT = 50
    source = LiveBusSource([BusSpec("flaky", ch, name="can0")], stop=asyncio.Event())
    tx = can.Bus(interface="virtual", channel=ch, preserve_timestamps=True)
    source.open()
    first = [time.time() + k * 1e-3 for k in range(100)]
    for t in first:
        tx.send(_frame(t))

    async def after_reopening() -> list[float]:
        for _ in range(200):
            if source.reopened:
                break
            await asyncio.sleep(0.05)
        later = [time.time() + k * 1e-3 for k in range(100)]
        for t in later:
            tx.send(_frame(t))
        return later

    try:
        with caplog.at_level(logging.WARNING):
            sender = asyncio.create_task(after_reopening())
            times = await _collect(source, lambda ts: len(ts) >= 149)
            later = await sender
    finally:
        tx.shutdown()
    # THEN it is said in one line, the bus is opened again and read: the frames before the
    # error and all sent after it (those waiting in the closed bus went with it, as a
    # socket's do)
    assert source.errors == 1 and source.reopened == 1
    assert times == first[:49] + later
    said = [r.getMessage() for r in caplog.records if "receive failed" in r.getMessage()]
    assert len(said) == 1 and "Network is down" in said[0] and "\n" not in said[0]


async def test_frame_times_off_the_bus_clock_are_dropped_and_a_clock_step_is_taken():
    ch = _channel()
    source = LiveBusSource([BusSpec("virtual", ch, name="can0")], stop=asyncio.Event())
    tx = can.Bus(interface="virtual", channel=ch, preserve_timestamps=True)
    source.open()
    now = time.time()
    good = [now + k * 0.001 for k in range(10)]
    odd = [now + 86_400.0, math.nan, math.inf]  # one damaged frame each: dropped
    stepped = [now - 3600.0 + k * 0.001 for k in range(STEP_FRAMES + 5)]  # NTP set the clock
    try:
        for t in good[:5] + odd + good[5:] + stepped:
            tx.send(_frame(t))
        batches: list = []
        times = await _collect(source, lambda ts: len(ts) >= len(good) + 6, batches=batches)
    finally:
        tx.shutdown()
    # THEN the damaged times are dropped and counted; of the stepped ones, those before the
    # step was sure (STEP_FRAMES agreeing) too, and the rest are taken
    assert times == good + stepped[STEP_FRAMES - 1 :]
    assert source.clock_steps == 1
    # and no batch holds times of both clocks: those before the step came before it was said
    assert all(
        all(t > now - 10 for t in ts) if steps == 0 else all(t < now - 10 for t in ts)
        for steps, ts in batches
    ), batches
    st = source.stats[0]
    assert st.bad_lines == len(odd) + STEP_FRAMES - 1
    assert st.frames == len(times)
    assert any("off the bus's clock" in why for _, why in st.first_bad)
    assert any("not a time" in why for _, why in st.first_bad)


async def test_a_full_batch_leaves_the_rest_for_the_next(monkeypatch):
    """Taking frames into a full batch threw away the list taken next from the inbox: 1000
    frames in, 600 out, with max_batch 100."""
    ch = _channel()
    source = LiveBusSource([BusSpec("virtual", ch)], stop=asyncio.Event(), max_batch=100)
    tx = can.Bus(interface="virtual", channel=ch, preserve_timestamps=True)
    source.open()
    sent = [time.time() + k * 1e-4 for k in range(1000)]
    try:
        for t in sent:
            tx.send(_frame(t))
        times = await _collect(source, lambda ts: len(ts) >= 1000)
    finally:
        tx.shutdown()
    assert times == sent


class DownBus(VirtualBus):
    """A bus that opens, and whose every read fails (an interface that is down)."""

    def recv(self, timeout=None):  # type: ignore[no-untyped-def]
        raise can.CanOperationError("Network is down [Error Code 100]")


async def test_a_bus_that_fails_at_once_each_time_is_opened_again_ever_less_often(monkeypatch):
    """A bus that opens and fails on its first read was opened again every 0.5 s forever: the
    wait went back to the shortest after each open."""
    monkeypatch.setitem(can.interfaces.BACKENDS, "down", (__name__, "DownBus"))
    monkeypatch.setattr(can.util, "VALID_INTERFACES", can.util.VALID_INTERFACES | {"down"})
    source = LiveBusSource([BusSpec("down", _channel())], stop=asyncio.Event())
    source.open()

    async def stop_after(seconds: float) -> None:
        await asyncio.sleep(seconds)
        source.stop.set()

    stopper = asyncio.create_task(stop_after(4.0))
    await _collect(source, lambda ts: False)
    await stopper
    # THEN after 0.5, 1 and 2 s of waiting, 4 s hold 3 or 4 errors, not 8
    assert 3 <= source.errors <= 4, source.errors


def test_a_bus_that_cannot_be_opened_is_one_line():
    source = LiveBusSource([BusSpec("no-such-interface", "can0")])
    with pytest.raises(InputError, match=r"CAN bus no-such-interface:can0: cannot open") as e:
        source.open()
    assert "\n" not in str(e.value)


def _signals(tmp_path: Path) -> list[dict]:
    """The signal summaries waiting in the outbox (no broker listens)."""
    box = Outbox(tmp_path / "o.sqlite")
    try:
        out = [unpack(p.payload) for p in box.peek(10_000)]
    finally:
        box.close()
    return [b for b in out if "signals" in b]


async def _live_gateway(tmp_path: Path, buses: list[str], window: float) -> tuple[Gateway, Any]:
    s = gateway_settings(tmp_path, {"*": [str(MODEL3)]}, window=window, decoder="vector")
    stop = asyncio.Event()
    specs = [BusSpec("virtual", ch, name=f"can{i}") for i, ch in enumerate(buses)]
    source = LiveBusSource(specs, stop=stop, tick=0.1)
    gw = Gateway(s, [source])
    task = asyncio.create_task(gw.run(stop, require_broker=False, drain_timeout=1))
    return gw, (stop, task)


async def _wait(cond, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("not reached in time")


async def test_a_silent_bus_closes_its_window_on_time(tmp_path):
    # GIVEN 1 s windows and frames for half a second, then silence
    ch = _channel()
    db = load_dbc(MODEL3)
    speed = db.get_message_by_name("ID155WheelAngles")
    gw, (stop, task) = await _live_gateway(tmp_path, [ch, _channel()], window=1.0)
    tx = can.Bus(interface="virtual", channel=ch)
    try:
        await asyncio.sleep(0.3)
        while time.time() % 1.0 > 0.1:  # all frames in one window, which only silence ends
            await asyncio.sleep(0.01)
        for _ in range(10):
            data = speed.encode({s.name: 0 for s in speed.signals} | {"ESP_vehicleSpeed": 50})
            tx.send(can.Message(arbitration_id=speed.frame_id, data=data, is_extended_id=False))
            await asyncio.sleep(0.05)
        # THEN the window closes while the bus is silent (before: at the next frame, or stop)
        await _wait(lambda: gw.report.windows >= 1, timeout=6)
    finally:
        stop.set()
        await task
        tx.shutdown()
    # (and the second bus, which never sent a frame, is in the health summaries, at 0/s)
    assert gw.health.snapshot()["frames_per_s"]["can1"] == 0.0
    summaries = _signals(tmp_path)
    assert len(summaries) == 1
    assert all(b["signals"]["speed_kph"]["mean"] == 50 for b in summaries)


async def test_two_buses_are_summarised_as_one(tmp_path):
    # GIVEN speed on one bus and the gear on another, in the same windows
    a, b = _channel(), _channel()
    db = load_dbc(MODEL3)
    speed = db.get_message_by_name("ID155WheelAngles")
    gear = db.get_message_by_name("ID118DriveSystemStatus")
    gw, (stop, task) = await _live_gateway(tmp_path, [a, b], window=60.0)
    txa = can.Bus(interface="virtual", channel=a)
    txb = can.Bus(interface="virtual", channel=b)
    try:
        await asyncio.sleep(0.3)
        for _ in range(10):
            txa.send(
                can.Message(
                    arbitration_id=speed.frame_id,
                    data=speed.encode({s.name: 0 for s in speed.signals}),
                    is_extended_id=False,
                )
            )
            txb.send(
                can.Message(
                    arbitration_id=gear.frame_id,
                    data=gear.encode({s.name: 0 for s in gear.signals}),
                    is_extended_id=False,
                )
            )
            await asyncio.sleep(0.02)
        await _wait(lambda: gw.report.frames >= 20)
    finally:
        stop.set()
        await task
        txa.shutdown()
        txb.shutdown()
    # THEN one summary per window carries both (two sources summarised each window twice,
    # and a trip saw only the bus that had its speed)
    summaries = _signals(tmp_path)
    windows = [tuple(s["window"]) for s in summaries]
    assert len(windows) == len(set(windows)) == gw.report.windows
    names = set().union(*(s["signals"] for s in summaries))
    assert {"speed_kph", "gear"} <= names
