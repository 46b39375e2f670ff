"""The owner's view (`gateway owner`): what it shows, and that it outlives a broker restart."""

from __future__ import annotations

import asyncio
import io

import aiomqtt
import pytest

from gateway.egress.schema import Topics, pack
from gateway.owner import watch
from gateway.settings import BrokerSettings

pytestmark = pytest.mark.broker


def test_the_owner_view_skips_the_owners_own_commands_and_reconnects_after_a_restart(
    private_broker,
):
    topics = Topics("vehicles", "OWNERVIEW00000001")
    host, port = private_broker.host, private_broker.port
    seen: list[dict] = []

    async def publish(topic: str, payload: bytes) -> None:
        for _ in range(100):  # the broker may still be starting
            try:
                async with aiomqtt.Client(host, port) as c:
                    await c.publish(topic, payload, qos=1)
                    return
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)
        raise AssertionError("could not publish")

    async def main() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(
            watch(
                BrokerSettings(url=private_broker.url),
                topics,
                as_json=True,
                count=2,
                out=io.StringIO(),
                on_message=seen.append,
                ready=ready,
            )
        )
        await asyncio.wait_for(ready.wait(), 10)
        # WHEN the owner sends a command (JSON, on the same channel) and a summary arrives
        await publish(topics.consent_set, b'{"category": "location", "grant": false}')
        await publish(topics.stream_name("health"), pack({"schema": "gateway.health", "n": 1}))
        await asyncio.sleep(0.3)
        # ... and the broker restarts, and another summary arrives
        private_broker.stop()
        private_broker.start()
        ready.clear()
        await asyncio.wait_for(ready.wait(), 20)  # subscribed again
        await publish(topics.stream_name("health"), pack({"schema": "gateway.health", "n": 2}))
        await asyncio.wait_for(task, 20)

    asyncio.run(main())
    # THEN both summaries were shown, and the owner's own command was not shown as an error
    assert [m.get("n") for m in seen] == [1, 2]
    assert not any("error" in m for m in seen)


def test_the_owner_view_with_an_idle_timeout_gives_up_on_a_broker_that_stays_away(
    private_broker, caplog
):
    from gateway.errors import BrokerError

    topics = Topics("vehicles", "OWNERVIEW00000002")

    async def main() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(
            watch(
                BrokerSettings(url=private_broker.url),
                topics,
                idle_timeout=2.0,
                out=io.StringIO(),
                ready=ready,
            )
        )
        await asyncio.wait_for(ready.wait(), 10)
        private_broker.stop()  # and it does not come back
        await asyncio.wait_for(task, 15)  # it reconnected forever before: never returned

    with pytest.raises(BrokerError, match="broker"):
        asyncio.run(main())
    # and within the idle time: the waits between attempts end with it (the backoff, 0.5 + 1 +
    # 2 s, ran 1.5 s past it; with --idle-timeout 8 the owner waited ~20 s)
    waits = [
        float(m.split("reconnecting in ")[1].split(" s")[0])
        for m in caplog.messages
        if "reconnecting in" in m
    ]
    assert waits and sum(waits) <= 2.0 + 1e-9, waits


def test_the_owner_view_drops_redeliveries_but_not_new_messages_under_an_old_seq():
    """A gateway started again on a new outbox and ledger numbers from 0 again: its messages
    were dropped as repeats of the first one's (the owner saw 59 of 67). A redelivery is the
    same payload under the same seq; another payload under a seen seq is shown, and counted."""
    from gateway.egress.schema import pack
    from gateway.owner import OwnerView

    view = OwnerView()
    first = pack({"schema": "gateway.signals", "v": 1, "seq": 0, "window": [0, 60]})
    again = pack({"schema": "gateway.signals", "v": 1, "seq": 0, "window": [600, 660]})
    assert view.accept("t", first) is not None
    assert view.accept("t", first) is None  # redelivered (QoS 1, a resend after a restart)
    shown = view.accept("t", again)
    assert shown is not None and shown["window"] == [600, 660]
    assert (view.duplicates, view.reused) == (1, 1)


def test_times_in_the_owner_view_are_dates_also_when_named_something_until():
    from gateway.owner import format_message

    line = format_message({
        "topic": "vehicles/V/owner/location", "schema": "gateway.location", "seq": 3,
        "lat": 31.2, "lon": 121.4, "consent_until": 1_795_810_000.0,
    })  # fmt: skip
    assert "consent_until=2026-" in line and "1.79581e+09" not in line


def test_window_times_are_dates_when_they_are_unix_times_and_log_seconds_else():
    from gateway.owner import format_message

    def head(window):
        return format_message({
            "topic": "vehicles/V/owner/signals", "schema": "gateway.signals", "seq": 1,
            "window": window, "signals": {},
        }).splitlines()[0]  # fmt: skip

    assert head([1_750_000_020.0, 1_750_000_080.0]).endswith("2025-06-15T15:07:00Z..15:08:00Z"), (
        head([1_750_000_020.0, 1_750_000_080.0])
    )
    assert head([1952.0, 1954.0]).endswith("1952.0..1954.0 s (log time)")
