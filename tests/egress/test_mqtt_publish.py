"""The publisher hands several publishes to the client at once (IN_FLIGHT) and still delivers
the outbox in order, each acknowledged message once; a failure leaves the rest waiting."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import types

import aiomqtt
import pytest

from gateway.egress import mqtt
from gateway.egress.guard import Outgoing
from gateway.egress.mqtt import MqttPublisher, make_client
from gateway.egress.outbox import Outbox
from gateway.egress.schema import unpack
from gateway.settings import BrokerSettings
from tests.egress.test_outbox import _guard, _released


def _publisher(url: str, ob: Outbox, **callbacks) -> MqttPublisher:  # type: ignore[no-untyped-def]
    """The publisher these tests drive: vehicle V's outbox ``ob`` to the broker at ``url``, no
    status messages, and the ``callbacks`` a test watches or sets."""
    return MqttPublisher(
        BrokerSettings(url=url), ob, "gw-test", status=lambda s, r: None, **callbacks
    )


def _run_stopped(pub: MqttPublisher, within: float | None = None) -> None:
    """``pub.run`` with its stop already set: it drains what waits and returns (at once if
    the broker is away: the outbox keeps the rest)."""

    async def drain() -> None:
        stop = asyncio.Event()
        stop.set()
        await asyncio.wait_for(pub.run(stop), within)

    asyncio.run(drain())


@pytest.mark.broker
def test_a_pipelined_drain_delivers_every_message_once_in_order(tmp_path, broker, listen):
    # GIVEN 500 summaries waiting (more than one batch of 200 the publisher takes at a time)
    ob = Outbox(tmp_path / "o.sqlite")
    released = _released(ob, 500)
    ob.put_many(released)
    lst = listen(broker.url, "vehicles/V/owner/#")
    pub = _publisher(broker.url, ob)

    # WHEN the publisher drains them and stops
    _run_stopped(pub)
    got = [unpack(m.payload)["seq"] for m in lst.settle()]
    # THEN each arrived once, in the order released, and nothing is left
    assert got == [m.seq for m in released]
    assert pub.sent == 500 and ob.depth() == 0


@pytest.mark.broker
def test_a_message_refused_at_the_moment_of_sending_does_not_leave(tmp_path, broker, listen):
    """Consent withdrawn while a batch of 200 is being sent: what was not written yet stays
    in the car (``may_send`` is asked right before each PUBLISH, not once per batch: it let
    ~200 positions out after a withdrawal). Only the publishes already handed to the client,
    at most IN_FLIGHT, can have left; the rest is withheld, on the record, and not kept."""
    ob = Outbox(tmp_path / "o.sqlite")
    released = _released(ob, 500)
    ob.put_many(released)
    lst = listen(broker.url, "vehicles/V/owner/#")
    withdrawn = [False]
    withheld: list = []

    def on_sent(n: int) -> None:
        if pub.sent == 100:
            withdrawn[0] = True  # as the owner's command handler would, between two PUBACKs

    pub = _publisher(
        broker.url,
        ob,
        on_sent=on_sent,
        may_send=lambda p: not withdrawn[0],
        on_withheld=withheld.extend,
    )

    _run_stopped(pub)
    got = [unpack(m.payload)["seq"] for m in lst.settle()]
    assert got == [m.seq for m in released[: len(got)]]
    assert 100 <= len(got) <= 100 + mqtt.IN_FLIGHT
    assert sorted(p.seq for p in withheld) == [m.seq for m in released[len(got) :]]
    assert ob.depth() == 0


@pytest.mark.broker
def test_a_connection_lost_while_pubacks_are_awaited_is_noticed_at_once(tmp_path, private_broker):
    """The broker goes away mid-drain: the wait for the PUBACKs in flight ends when the
    connection is lost, not after the ACK timeout (here 60 s), so a broker that is back
    within the backoff gets the rest; the rest waits in the outbox meanwhile."""
    ob = Outbox(tmp_path / "o.sqlite")
    ob.put_many(_released(ob, 500))

    def on_sent(n: int) -> None:
        if pub.sent == 50:
            private_broker.stop()  # SIGTERM, waited for: the connection is reset

    pub = _publisher(
        private_broker.url,
        ob,
        on_sent=on_sent,
        ack_timeout=60.0,
    )

    _run_stopped(pub, 30)
    assert pub.last_error is not None and "connection lost" in pub.last_error
    assert 50 <= pub.sent < 500 and ob.depth() == 500 - pub.sent


@pytest.mark.broker
def test_publishes_leave_without_waiting_for_the_previous_ack(broker):
    """TCP_NODELAY on the client's socket (several publishes are in flight at once)."""

    async def check() -> int:
        async with make_client(BrokerSettings(url=broker.url), identifier=None) as client:
            return client._client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    assert asyncio.run(check()) != 0


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="Linux only")
def test_a_wait_for_a_puback_acks_the_brokers_segments_at_once():
    """``_ack_at_once`` sets TCP_QUICKACK on the client's socket (paho's, behind aiomqtt)."""
    calls = []

    class Recording(socket.socket):
        def setsockopt(self, *args):
            calls.append(args)
            super().setsockopt(*args)

    class Paho:
        def __init__(self, sock):
            self.sock = sock

        def socket(self):
            return self.sock

    class Client:
        pass

    with Recording(socket.AF_INET, socket.SOCK_STREAM) as sock:
        client = Client()
        client._client = Paho(sock)
        mqtt._ack_at_once(client)
    assert calls == [(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)]


def test_a_slow_but_steady_link_is_not_taken_for_a_lost_one(tmp_path):
    """``ack_timeout`` bounds the wait for each PUBACK, not for a whole batch: 20 PUBACKs
    0.05 s apart (1 s in all) with a 0.15 s timeout all arrive, and everything is sent."""
    ob = Outbox(tmp_path / "o.sqlite")
    ob.put_many(_released(ob, 20))
    pub = MqttPublisher(BrokerSettings(), ob, "id", status=lambda s, r: None, ack_timeout=0.15)

    class Client:  # one PUBACK every 0.05 s, in order
        due = 0.0

        async def publish(self, topic, payload, qos, retain, timeout=None):
            loop = asyncio.get_running_loop()
            Client.due = max(Client.due, loop.time()) + 0.05
            await asyncio.sleep(Client.due - loop.time())

    async def drain() -> None:
        stop = asyncio.Event()
        stop.set()
        await pub._drain_until(Client(), stop)

    asyncio.run(drain())
    assert pub.sent == 20 and ob.depth() == 0


def _drain_with_a_failure(tmp_path, caplog, later_fail: bool):
    """12 messages; the fourth's publish fails (and, if ``later_fail``, all after it too)."""
    ob = Outbox(tmp_path / "o.sqlite")
    released = _released(ob, 12)
    seqs = [m.seq for m in released]
    ob.put_many(released)
    pub = MqttPublisher(BrokerSettings(), ob, "id", status=lambda s, r: None)
    started: list[int] = []

    class Client:
        async def publish(self, topic, payload, qos, retain, timeout=None):
            seq = unpack(payload)["seq"]
            started.append(seq)
            await asyncio.sleep(0)
            if seq == seqs[3] or (later_fail and seq > seqs[3]):
                raise aiomqtt.MqttError("connection lost")

    async def drain() -> None:
        stop = asyncio.Event()
        stop.set()
        with pytest.raises(aiomqtt.MqttError):
            await pub._drain_until(Client(), stop)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(drain())
        gc.collect()  # a task whose exception nobody read says so when it is collected
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    return seqs, started, pub, [p.seq for p in ob.peek(100)]


def test_a_retained_message_behind_a_failed_one_is_sent_again_after_it(tmp_path):
    """The broker keeps a topic's last retained message. If an older consent state fails and
    a newer one behind it was acknowledged, the older one is sent again later: the newer one
    must follow it again, or the broker would keep the older state."""
    ob = Outbox(tmp_path / "o.sqlite")
    g = _guard(ob)
    states = [
        g.release(
            Outgoing(
                "gateway.consent",
                {"at": float(i), "collection": "on", "grants": {}, "last_change": {}},
            )
        )
        for i in range(6)
    ]
    ob.put_many([*_released(ob, 2), *states])  # two summaries, then six consent states
    pub = MqttPublisher(BrokerSettings(), ob, "id", status=lambda s, r: None)
    retained: dict[str, float] = {}  # what the broker would keep, per topic

    class Client:
        def __init__(self, failing: float | None) -> None:
            self.failing = failing

        async def publish(self, topic, payload, qos, retain, timeout=None):
            at = unpack(payload).get("at")
            await asyncio.sleep(0)
            if at is not None and at == self.failing:
                raise aiomqtt.MqttError("connection lost")
            if retain:
                retained[topic] = at

    async def drain(client: Client) -> None:
        stop = asyncio.Event()
        stop.set()
        await pub._drain_until(client, stop)

    with pytest.raises(aiomqtt.MqttError):
        asyncio.run(drain(Client(failing=1.0)))  # states 2-5 were acknowledged behind it
    left = [unpack(p.payload).get("at") for p in ob.peek(100)]
    assert left == [1.0, 2.0, 3.0, 4.0, 5.0]  # the summaries and state 0 left the outbox
    asyncio.run(drain(Client(failing=None)))  # the connection is back
    assert ob.depth() == 0
    assert retained == {"vehicles/V/owner/consent": 5.0}  # the newest state, as released


def test_a_failed_publish_leaves_it_and_the_rest_in_the_outbox(tmp_path, caplog):
    seqs, started, pub, left = _drain_with_a_failure(tmp_path, caplog, later_fail=True)
    assert started == seqs[: mqtt.IN_FLIGHT]  # eight in flight at once, in order
    assert pub.sent == 3 and left == seqs[3:]


def test_what_was_acknowledged_while_one_before_it_failed_leaves_the_outbox(tmp_path, caplog):
    seqs, started, pub, left = _drain_with_a_failure(tmp_path, caplog, later_fail=False)
    # the four after the failed one were in flight and acknowledged: sent, not sent again
    assert started == seqs[: mqtt.IN_FLIGHT]
    assert pub.sent == mqtt.IN_FLIGHT - 1
    assert left == [seqs[3], *seqs[mqtt.IN_FLIGHT :]]


async def _silent_broker(received: list[int]) -> asyncio.Server:
    """A broker that accepts the connection (CONNACK) and then answers nothing: no PUBACK
    ever comes. It notes the type of every packet it reads, and closes on a DISCONNECT."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                kind = (await reader.readexactly(1))[0] >> 4
                size, shift = 0, 0
                while True:  # the remaining length: a varint
                    b = (await reader.readexactly(1))[0]
                    size |= (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        break
                await reader.readexactly(size)
                received.append(kind)
                if kind == 1:  # CONNECT
                    writer.write(b"\x20\x02\x00\x00")
                    await writer.drain()
                elif kind == 14:  # DISCONNECT
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def test_a_broker_that_never_acknowledges_leaves_everything_in_the_outbox(tmp_path):
    """No PUBACK within ack_timeout: the connection counts as lost, said as such, and nothing
    leaves the outbox; the wait is bounded, however many publishes were in flight."""
    ob = Outbox(tmp_path / "o.sqlite")
    released = _released(ob, 20)
    ob.put_many(released)
    received: list[int] = []

    async def drain() -> float:
        server = await _silent_broker(received)
        port = server.sockets[0].getsockname()[1]
        pub = MqttPublisher(
            BrokerSettings(url=f"mqtt://127.0.0.1:{port}"),
            ob,
            "gw-test",
            status=lambda s, r: None,
            ack_timeout=0.3,
        )
        stop = asyncio.Event()
        stop.set()  # drain what waits, then return: with the broker silent, at the timeout
        t0 = asyncio.get_running_loop().time()
        async with server:
            await asyncio.wait_for(pub.run(stop), timeout=10)
        assert pub.sent == 0 and "no PUBACK within 0.3 s" in (pub.last_error or "")
        return asyncio.get_running_loop().time() - t0

    took = asyncio.run(drain())
    assert 0.3 <= took < 5
    assert received.count(3) == mqtt.IN_FLIGHT  # PUBLISH: eight in flight, then the wait
    assert ob.depth() == 20 and [p.seq for p in ob.peek(100)] == [m.seq for m in released]


def test_another_client_with_the_same_id_is_said_once(tmp_path, broker, caplog):
    """Two gateways of one vehicle (same client id) take each other's place at the broker,
    again and again; each only said 'reconnecting'."""
    ob = Outbox(tmp_path / "o.sqlite")
    pub = MqttPublisher(
        BrokerSettings(url=broker.url, backoff_max=0.2), ob, "gw-twin", status=lambda s, r: None
    )

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(pub.run(stop))
        await asyncio.wait_for(pub.connected.wait(), 10)
        for _ in range(12):  # the twin connects, is thrown out when the gateway comes back
            with contextlib.suppress(aiomqtt.MqttError):
                async with make_client(BrokerSettings(url=broker.url), identifier="gw-twin"):
                    await asyncio.sleep(0.3)
            if "second gateway of this vehicle" in caplog.text:
                break
        stop.set()
        await asyncio.wait_for(task, 15)

    with caplog.at_level(logging.WARNING, logger="gateway.egress.mqtt"):
        asyncio.run(main())
    ob.close()
    said = [r for r in caplog.records if "second gateway of this vehicle" in r.message]
    assert len(said) == 1 and "'gw-twin'" in said[0].message


@pytest.mark.parametrize("in_file", [True, False])
def test_what_a_stop_leaves_unsent_is_said_where_it_waits(tmp_path, caplog, in_file):
    from gateway.localbroker import free_port

    # GIVEN 5 summaries waiting in the file, or in memory only (a file that could not be made)
    ob = Outbox(tmp_path / "o.sqlite" if in_file else None)
    ob.put_many(_released(ob, 5))
    pub = MqttPublisher(BrokerSettings(url=f"mqtt://127.0.0.1:{free_port()}"), ob, "gw-test",
                        status=lambda s, r: None)  # fmt: skip
    # WHEN the publisher stops without a broker
    with caplog.at_level(logging.WARNING, logger="gateway.egress.mqtt"):
        _run_stopped(pub, within=10)
    # THEN the warning says where they wait: in the file, or lost with the process
    (said,) = [r.getMessage() for r in caplog.records if "not sent" in r.getMessage()]
    if in_file:
        assert said.endswith("5 message(s) not sent: they stay in the outbox")
    else:
        assert "0 stay in the outbox file; 5 held in memory only" in said and "lost" in said
    ob.close()


@pytest.mark.broker
def test_messages_the_owner_deletes_while_a_batch_is_being_sent_do_not_leave(
    tmp_path, broker, listen
):
    """The owner's delete came while the publisher held a batch it had read from the outbox:
    the reply said the messages were removed, and the batch sent them all anyway."""
    from gateway.datarights import delete_category

    ob = Outbox(tmp_path / "o.sqlite")
    released = _released(ob, 300)
    ob.put_many(released)
    lst = listen(broker.url, "vehicles/V/owner/#")
    withheld: list = []

    flying: list = []

    def on_sent(n: int) -> None:
        if pub.sent == 100:  # the owner's delete, between two PUBACKs
            flying.extend(delete_category(ob, None).in_flight)

    pub = _publisher(
        broker.url,
        ob,
        on_sent=on_sent,
        on_withheld=withheld.extend,
    )
    _run_stopped(pub)
    got = [unpack(m.payload)["seq"] for m in lst.settle()]
    # THEN what was already handed to the client may have left (at most IN_FLIGHT), nothing
    # after it; none of it counts as withheld (the delete is its record), and none is left
    assert 100 <= len(got) <= 100 + mqtt.IN_FLIGHT
    assert got == [m.seq for m in released[: len(got)]]
    assert pub.sent == len(got) and withheld == [] and ob.depth() == 0
    # and the delete was told which of them had left or were on their way: exactly those
    assert sorted(flying) == got


@pytest.mark.broker
def test_a_waiting_row_changed_in_the_outbox_file_while_running_is_not_sent(
    tmp_path, broker, listen
):
    """The outbox file was checked against the ledger only at the start: a row changed while
    the gateway ran (sqlite3 UPDATE, the broker away) left with bytes no ledger line holds."""
    import sqlite3

    ob = Outbox(tmp_path / "o.sqlite")
    ob.expect([])  # as the gateway does once the waiting rows are checked against the ledger
    released = _released(ob, 10)
    ob.put_many(released)
    with sqlite3.connect(tmp_path / "o.sqlite") as db:
        db.execute(
            "UPDATE outbox SET payload = ? WHERE seq = ?", (b"\x81\xa1x\xa1y", released[3].seq)
        )
    lst = listen(broker.url, "vehicles/V/owner/#")
    changed: list = []
    pub = _publisher(
        broker.url, ob,
        on_changed=changed.append,
    )  # fmt: skip
    _run_stopped(pub)
    got = [m.payload for m in lst.settle()]
    # THEN the nine others left as released, that one did not, it was told, and nothing waits
    assert got == [m.payload for i, m in enumerate(released) if i != 3]
    assert [p.seq for p in changed] == [released[3].seq] and ob.depth() == 0


def test_a_broker_that_closes_each_connection_after_its_connack_is_retried_with_backoff(
    tmp_path,
):
    """Each CONNACK used to reset the wait to its first 0.1-0.2 s (a reconnection 5-10 times a
    second, each with a ledgered last will), and asyncio said "Future exception was never
    retrieved" for each lost connection."""
    attempts = 0

    async def closes_after_connack(reader, writer):  # type: ignore[no-untyped-def]
        nonlocal attempts
        attempts += 1
        await reader.read(1024)  # CONNECT
        writer.write(bytes([0x20, 0x02, 0x00, 0x00]))  # CONNACK, accepted (MQTT 3.1.1)
        await writer.drain()
        writer.close()

    unretrieved: list[str] = []
    wills: list[object] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(repr(ctx)[:300]))
        server = await asyncio.start_server(closes_after_connack, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ob = Outbox(tmp_path / "o.sqlite")
        ob.put_many(_released(ob, 3))
        pub = _publisher(f"mqtt://127.0.0.1:{port}", ob)
        pub.backoff_initial = 0.05
        # each connection's last will: the broker holds it from the CONNACK on, and publishes
        # it when the connection closes, so each is on the record (it was not, for a
        # connection closed right away)
        will = types.SimpleNamespace(topic="vehicles/V/owner/status", payload=b"offline")
        pub.will_status = lambda: will
        pub.on_will_sent = lambda msg: wills.append(msg)
        stop = asyncio.Event()
        task = asyncio.create_task(pub.run(stop))
        await asyncio.sleep(2.5)
        stop.set()
        await asyncio.wait_for(task, 10)
        server.close()
        gc.collect()  # an unretrieved exception is said when its future is collected
        await asyncio.sleep(0)

    asyncio.run(main())
    # THEN the waits double (0.05, 0.1, 0.2, ... s: about 6 attempts in 2.5 s, not ~30), and
    # no lost connection leaves an exception nobody read
    assert 3 <= attempts <= 9, attempts
    assert not unretrieved, unretrieved
    assert len(wills) == attempts
