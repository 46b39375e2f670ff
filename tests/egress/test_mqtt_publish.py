"""The publisher hands several publishes to the client at once (IN_FLIGHT) and still delivers
the outbox in order, each acknowledged message once; a failure leaves the rest waiting."""

from __future__ import annotations

import asyncio
import socket
import warnings

import aiomqtt
import pytest

from gateway.egress import mqtt
from gateway.egress.mqtt import MqttPublisher, make_client
from gateway.egress.outbox import Outbox
from gateway.egress.schema import unpack
from gateway.settings import BrokerSettings
from tests.egress.test_outbox import _released


@pytest.mark.broker
def test_a_pipelined_drain_delivers_every_message_once_in_order(tmp_path, broker, listen):
    # GIVEN 500 summaries waiting (more than one batch of 200 the publisher takes at a time)
    ob = Outbox(tmp_path / "o.sqlite")
    released = _released(ob, 500)
    ob.put_many(released)
    lst = listen(broker.url, "vehicles/V/owner/#")
    pub = MqttPublisher(BrokerSettings(url=broker.url), ob, "gw-test", status=lambda s, r: None)

    # WHEN the publisher drains them and stops
    async def drain() -> None:
        stop = asyncio.Event()
        stop.set()
        await pub.run(stop)

    asyncio.run(drain())
    got = [unpack(m.payload)["seq"] for m in lst.settle()]
    # THEN each arrived once, in the order released, and nothing is left
    assert got == [m.seq for m in released]
    assert pub.sent == 500 and ob.depth() == 0


@pytest.mark.broker
def test_publishes_leave_without_waiting_for_the_previous_ack(broker):
    """TCP_NODELAY on the client's socket (several publishes are in flight at once)."""

    async def check() -> int:
        async with make_client(BrokerSettings(url=broker.url), identifier=None) as client:
            mqtt._ack_at_once(client)  # and this finds the socket and sets it without error
            return client._client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    assert asyncio.run(check()) != 0


def test_a_failed_publish_leaves_it_and_the_rest_in_the_outbox(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite")
    released = _released(ob, 12)
    seqs = [m.seq for m in released]
    ob.put_many(released)
    failing = seqs[3]  # the fourth
    pub = MqttPublisher(BrokerSettings(), ob, "id", status=lambda s, r: None)
    started: list[int] = []

    class Client:
        async def publish(self, topic, payload, qos, retain):
            seq = unpack(payload)["seq"]
            started.append(seq)
            await asyncio.sleep(0.001 * (seq % 3))  # the PUBACKs come in a jumbled order
            if seq == failing:
                raise aiomqtt.MqttError("connection lost")

    async def drain() -> None:
        stop = asyncio.Event()
        stop.set()
        with pytest.raises(aiomqtt.MqttError):
            await pub._drain_until(Client(), stop)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Task exception was never retrieved"
        asyncio.run(drain())
    # several were in flight at once; the first three went, the fourth failed: it and all
    # after it wait for the next connection, but for those acknowledged meanwhile
    assert len(started) > 4
    assert pub.sent == 3
    left = [p.seq for p in ob.peek(100)]
    assert left[0] == failing and left == sorted(left)
    assert set(seqs[3:]) - set(left) <= set(started) - {failing}
