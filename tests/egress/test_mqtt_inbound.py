"""The publisher's inbound side on a real broker: ``listening`` means an owner's command sent
from then on reaches the gateway."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from gateway.egress.mqtt import MqttPublisher
from gateway.egress.outbox import Outbox
from gateway.settings import BrokerSettings

pytestmark = pytest.mark.broker


async def test_a_command_sent_as_soon_as_listening_is_set_is_received(tmp_path, broker):
    # GIVEN a publisher subscribed to a command topic, and an owner already connected
    host, port = broker.url.removeprefix("mqtt://").split(":")
    got: list[tuple[str, bytes]] = []
    arrived = asyncio.Event()

    async def on_inbound(topic: str, payload: bytes, retained: bool) -> None:
        got.append((topic, payload))
        arrived.set()

    topics = ("t/inbound/one", "t/inbound/two")
    rounds = []
    async with aiomqtt.Client(host, int(port)) as owner:
        for k in range(5):  # a new connection and new subscriptions each round
            ob = Outbox(tmp_path / f"o{k}.sqlite")
            pub = MqttPublisher(
                BrokerSettings(url=broker.url),
                ob,
                f"inbound-{k}",
                status=lambda s, r: None,
                inbound_topics=topics,
                on_inbound=on_inbound,
            )
            stop = asyncio.Event()
            run = asyncio.create_task(pub.run(stop))
            # WHEN the owner publishes the moment the publisher says it listens
            await asyncio.wait_for(pub.listening.wait(), 10)
            arrived.clear()
            await owner.publish(topics[k % 2], f"cmd-{k}".encode(), qos=1)
            await asyncio.wait_for(arrived.wait(), 5)
            stop.set()
            await asyncio.wait_for(run, 10)
            rounds.append(pub.listening.is_set())
            ob.close()
    # THEN every command arrived, on its topic; and a publisher that stopped no longer listens
    assert got == [(topics[k % 2], f"cmd-{k}".encode()) for k in range(5)]
    assert rounds == [False] * 5
