"""The MQTT edge: drains the outbox to the broker with QoS 1, reconnecting with capped,
jittered exponential backoff (aiomqtt 2.x does not reconnect by itself), keeps the retained
status topic and its last will, and hands inbound owner commands to the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from gateway.egress.guard import Released
from gateway.egress.outbox import Outbox, Pending
from gateway.errors import BrokerError, GatewayError
from gateway.settings import BrokerSettings

log = logging.getLogger(__name__)

StatusFactory = Callable[[str, str], Released | None]  # (state, reason) -> status message
# (topic, payload, retained): a retained message was stored by the broker, not sent now
InboundHandler = Callable[[str, bytes, bool], Awaitable[None]]


# aiomqtt's own log (paho's too): what it says on a lost or failed connection ("Could not
# gracefully disconnect: 4", "failed to receive on socket") the publisher says in one line
_CLIENT_LOG = logging.getLogger("gateway.egress.aiomqtt")


def _client_log() -> logging.Logger:
    """aiomqtt's (and paho's) logger: silent unless debugging (-vv), when it says everything.
    Its errors are the socket's ("failed to receive on socket: [Errno 104] ..."), said raw
    before the gateway's own line on the same failure (``describe_error``)."""
    debug = logging.getLogger().isEnabledFor(logging.DEBUG)
    _CLIENT_LOG.setLevel(logging.DEBUG if debug else logging.CRITICAL)
    return _CLIENT_LOG


def quiet_lost_connections(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An event loop's exception handler for the gateway: what aiomqtt leaves behind a lost
    connection (a callback on its closed socket, an error nobody awaited) is logged at debug
    level; the publisher says the loss itself, once. Anything else as asyncio says it."""
    exc = context.get("exception")
    unread = "never retrieved" in str(context.get("message", ""))
    if (unread and isinstance(exc, aiomqtt.MqttCodeError)) or (
        "handle" in context and isinstance(exc, OSError) and exc.errno == errno.EBADF
    ):
        log.debug("after a lost connection: %s (%r)", context.get("message"), exc)
        return
    loop.default_exception_handler(context)


@contextlib.asynccontextmanager
async def _connection(
    client: aiomqtt.Client, on_connack: Callable[[], None] | None = None
) -> AsyncIterator[aiomqtt.Client]:
    """``async with client``, and then the error of a lost connection read: aiomqtt's exit
    returns early when the connection is already gone, and asyncio said "Future exception
    was never retrieved" (MqttCodeError 'Unexpected disconnection') for each one lost before
    the message reader saw it. ``on_connack`` is called once the broker accepted the
    connection, even one it closes at once (its last will is the broker's from then on)."""
    first = getattr(client, "_disconnected", None)  # aiomqtt 2's (see below)
    entered = False
    try:
        async with client:
            entered = True
            if on_connack is not None:
                on_connack()
            # a connection closed within its CONNACK's read: aiomqtt replaces the future that
            # holds its error with a new one, which nothing completes, and the publisher
            # waited for PUBACKs that never came as though connected
            paho = getattr(client, "_client", None)
            if paho is not None and not paho.is_connected():
                raise aiomqtt.MqttError("the broker closed the connection right after accepting it")
            yield client
    except BaseException:
        if not entered:
            # no CONNACK (a timeout, a refusal, a cancellation: a Ctrl-C, the first connection
            # of a run that stops): aiomqtt leaves paho's socket open, to be said unclosed
            # when collected
            close = getattr(getattr(client, "_client", None), "_sock_close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        raise
    finally:
        # the error of the lost connection is read: in the future aiomqtt made first, which
        # it drops when the loss came while connecting, or in the one after it
        for lost in (first, getattr(client, "_disconnected", None)):
            if isinstance(lost, asyncio.Future) and lost.done() and not lost.cancelled():
                lost.exception()


def _drop(client: aiomqtt.Client) -> None:
    """End the connection without a DISCONNECT: the broker takes it as lost and publishes the
    client's last will. (Shut down, not closed: the socket stays the client's to close.)"""
    paho = getattr(client, "_client", None)  # aiomqtt 2's paho client
    sock = paho.socket() if paho is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


async def _unless_lost(reader: asyncio.Task[None], step: Coroutine[Any, Any, Any]) -> Any:
    """``step``'s result, or ``MqttError`` as soon as ``reader`` (the connection's message
    reader) ends: the connection is lost, and no PUBACK or SUBACK will come."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.wait({task, reader}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task
        raise aiomqtt.MqttError("the connection to the broker was lost")
    return task.result()


# aiomqtt's timeout for a CONNACK, SUBACK or the status' PUBACK; the first connection of a
# run, which tells whether the broker is there at all, waits less
DEFAULT_TIMEOUT = 10.0
FIRST_CONNECT_TIMEOUT = 5.0


def make_client(
    broker: BrokerSettings,
    *,
    identifier: str | None,
    will: aiomqtt.Will | None = None,
    clean_session: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> aiomqtt.Client:
    tls_params = None
    if broker.tls:
        tls_params = aiomqtt.TLSParameters(
            ca_certs=broker.tls_ca or None, cert_reqs=ssl.CERT_REQUIRED
        )
    return aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=identifier,
        will=will,
        username=broker.username or None,
        password=broker.secret() or None,
        tls_params=tls_params,
        tls_insecure=broker.tls_insecure if broker.tls else None,
        keepalive=broker.keepalive,
        timeout=timeout,
        logger=_client_log(),
        clean_session=clean_session,
        # each PUBLISH goes out when it is made, not held for the ACK of the one before
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    )


def _ack_at_once(client: aiomqtt.Client) -> None:
    """While PUBACKs are awaited, ACK the broker's TCP segments at once (Linux TCP_QUICKACK,
    which the kernel clears again by itself, so it is set before each wait). Mosquitto holds
    a small segment (a PUBACK) until the one before it is ACKed (Nagle: its set_tcp_nodelay is
    off by default), and an ACK with no data of ours to ride on is delayed by up to 40 ms: with
    several publishes in flight, the last PUBACKs of every burst waited those 40 ms. aiomqtt
    gives no handle on the socket but paho's (``Client._client``): without one, or elsewhere
    than Linux, nothing is set."""
    quickack = getattr(socket, "TCP_QUICKACK", None)
    paho = getattr(client, "_client", None)
    if quickack is None or paho is None:
        return
    sock = paho.socket()
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)


class MessageQueue:
    """aiomqtt's incoming messages, read by ONE task into a queue that callers may wait on with
    a timeout. Waiting on aiomqtt's ``__anext__`` with ``asyncio.wait_for`` is not safe: a
    timeout that cancels it just as a message arrives drops that message (seen in this
    project's tests on Python 3.11); ``asyncio.Queue.get`` is safe to cancel."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self._q: asyncio.Queue[aiomqtt.Message | BaseException] = asyncio.Queue()
        self._task = asyncio.create_task(self._read(client))

    async def _read(self, client: aiomqtt.Client) -> None:
        try:
            async for m in client.messages:
                self._q.put_nowait(m)
        except aiomqtt.MqttError as exc:
            self._q.put_nowait(exc)

    async def get(self, timeout: float | None = None) -> aiomqtt.Message:
        """The next message; ``TimeoutError`` after ``timeout`` s; the reader's MqttError."""
        item = await (asyncio.wait_for(self._q.get(), timeout) if timeout else self._q.get())
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def message_queue(client: aiomqtt.Client) -> AsyncIterator[MessageQueue]:
    q = MessageQueue(client)
    try:
        yield q
    finally:
        await q.close()


class SubscriptionRefused(aiomqtt.MqttError):
    """The broker answered a SUBSCRIBE with a failure code (MQTT 3.1.1's 0x80, or an MQTT 5
    reason such as "Not authorized"). Mosquitto's own ACL file does not do this: it grants
    the subscription and then delivers nothing the login may not read."""


async def subscribe(client: aiomqtt.Client, topic: str, *, qos: int = 1) -> None:
    """``client.subscribe``, returning on the SUBACK; raises ``SubscriptionRefused`` when the
    broker refused the topic (aiomqtt returns the refusal as a value, easy to overlook)."""
    codes = await client.subscribe(topic, qos=qos)
    refused = [c for c in codes if getattr(c, "is_failure", c == 0x80)]
    if refused:
        why = ", ".join(c.getName() if hasattr(c, "getName") else f"code {c}" for c in refused)
        raise SubscriptionRefused(
            f"the broker refused the subscription to {topic} ({why}): may this login read it?"
        )


def describe_error(broker: BrokerSettings, exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if text == "Operation timed out":  # aiomqtt's, for any answer that did not come
        text += (
            " (no MQTT answer in time: a port of another service, a TLS port that needs "
            "mqtts://, or a stalled broker)"
        )
    if broker.tls and not broker.tls_by_url:
        text += " (TLS is on because tls_ca is set, though the URL does not say mqtts://)"
    return f"broker {broker.url}: {text}"


# publishes awaiting their PUBACK at once (aiomqtt warns of more than 10 pending calls)
IN_FLIGHT = 8
# how long a PUBACK may take before the connection counts as lost (aiomqtt's default timeout)
ACK_TIMEOUT = 10.0
QUICK_DROP_S = 5.0  # a connection lost this soon after it was made is a quick drop
QUICK_DROPS_SAID = 3  # so many in a row are said as a likely client id clash


@dataclass
class MqttPublisher:
    """Sends the outbox to the broker in order, and deletes what the broker acknowledged."""

    broker: BrokerSettings
    outbox: Outbox
    identifier: str
    status: StatusFactory
    inbound_topics: tuple[str, ...] = ()
    on_inbound: InboundHandler | None = None
    on_sent: Callable[[int], None] = lambda n: None
    # checked again just before a message is sent: consent may have lapsed since it was queued
    # (withdrawn, expired, a new ignition cycle); what fails is deleted, after ``on_withheld``
    may_send: Callable[[Pending], bool] = lambda p: True
    on_withheld: Callable[[list[Pending]], None] = lambda items: None
    # a waiting message whose bytes are not on record (``Outbox.unchanged``): not sent, and
    # removed from the outbox after this is told
    on_changed: Callable[[Pending], None] = lambda item: None
    # the last will ("offline"); ``on_will_sent`` is told before the first CONNECT that carries
    # it (see ``run``), and the same will goes with every attempt until a broker accepts one
    will_status: Callable[[], Released | None] | None = None
    on_will_sent: Callable[[Released], None] = lambda msg: None
    # after each connection's "online" status: the number of the connection (1, 2, ...); a
    # broker restarted without persistence has lost the retained states (consent) meanwhile
    on_connected: Callable[[int], None] = lambda n: None
    connections: int = 0
    backoff_initial: float = 0.2
    ack_timeout: float = ACK_TIMEOUT
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    answered: asyncio.Event = field(default_factory=asyncio.Event)  # a CONNACK came, once
    # set once the broker acknowledged the subscriptions to ``inbound_topics``: an owner's
    # command sent before that may be lost (a subscription is not retroactive)
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    reconnects: int = 0
    sent: int = 0
    last_error: str | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    acked: asyncio.Event = field(default_factory=asyncio.Event)  # set after each drained batch
    _deadline: asyncio.Timeout | None = None  # of the PUBACK awaited now, if one is
    _lost: bool = False  # the connection was lost (reset on each new one)

    def __post_init__(self) -> None:
        self.outbox.subscribe(self._wake.set)

    async def run(self, stop: asyncio.Event, *, first_must_connect: bool = False) -> None:
        """Publish until ``stop`` is set; then drain what waits if connected and return. If the
        broker is away when ``stop`` is set, return at once: the outbox keeps the rest.
        ``first_must_connect``: a first attempt that gets no CONNACK (within 5 s) raises a
        one-line ``BrokerError``, before a replay starts, instead of retrying."""
        delay = self.backoff_initial
        connected_at: float | None = None  # when the last connection was made
        sent_at_connect = 0  # messages acknowledged before it
        quick_drops = 0  # connections in a row lost soon after they were made
        # the last will on record that no broker has accepted a connection with yet. A broker
        # holds a will from the moment it reads the CONNECT, not from its CONNACK: with the
        # CONNACK late (past the connect timeout) or never read (the gateway killed), the
        # broker published an "offline" that the ledger, told at the CONNACK, never had. So
        # it is on the record before its first CONNECT, and goes with each attempt until one
        # is accepted (one line for an hour of attempts, not one per attempt; an attempt
        # that never reached a broker leaves a line for bytes that did not leave, never the
        # other way round). The next connection's will is a new one, on the record again
        pending_will: Released | None = None
        while True:
            if pending_will is None:
                pending_will = (
                    self.will_status()
                    if self.will_status
                    else self.status("offline", "connection lost")
                )
                if pending_will is not None:
                    self.on_will_sent(pending_will)
            will_msg = pending_will
            will = (
                aiomqtt.Will(will_msg.topic, will_msg.payload, qos=1, retain=True)
                if will_msg is not None
                else None
            )
            try:
                first = first_must_connect and not self.reconnects  # (each failure counts)
                client = make_client(
                    self.broker,
                    identifier=self.identifier,
                    will=will,
                    timeout=FIRST_CONNECT_TIMEOUT if first else DEFAULT_TIMEOUT,
                )

                def took_will() -> None:  # accepted: the next connection has a will of its own
                    nonlocal pending_will
                    pending_will = None

                async with _connection(client, took_will):
                    self._lost = False
                    self.connected.set()
                    self.answered.set()
                    connected_at = time.monotonic()
                    sent_at_connect = self.sent
                    self.last_error = None
                    # reads the owner's commands; ends (as aiomqtt's message iterator does)
                    # when the connection is lost, which ends a wait for PUBACKs at once.
                    # Started first: a connection lost right after its CONNACK (a broker that
                    # closes it) ends the steps below too, and its error is read, not left to
                    # asyncio's "Future exception was never retrieved"
                    reader = asyncio.create_task(self._read_inbound(client))
                    reader.add_done_callback(self._connection_lost)
                    try:
                        # subscribed before "online" is said: an owner who sees it can be heard
                        for topic in self.inbound_topics:
                            try:  # returns on the SUBACK
                                await _unless_lost(reader, subscribe(client, topic))
                            except SubscriptionRefused as exc:
                                # the owner's commands (a withdrawal among them) cannot reach
                                # this gateway: said every time, sending goes on
                                log.error("%s; the owner's commands cannot reach the gateway", exc)
                        await _unless_lost(reader, self._publish_status(client, "online", ""))
                        self.connections += 1
                        try:
                            self.on_connected(self.connections)
                        except Exception as exc:  # noqa: BLE001 - the publisher goes on
                            log.error("after connecting: %s", exc)
                        self.listening.set()
                        await self._drain_until(client, stop)
                        try:
                            await self._publish_status(client, "offline", "stopped")
                        except GatewayError:
                            # the stop cannot be recorded (the ledger failed): the connection
                            # ends without a DISCONNECT, so that the broker publishes the last
                            # will ("offline", on the record since the CONNACK); else the owner
                            # would go on seeing the retained "online"
                            _drop(client)
                            raise
                    finally:
                        reader.remove_done_callback(self._connection_lost)
                        reader.cancel()
                        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                            await reader
                    self.connected.clear()
                    self.listening.clear()
                    return
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self.listening.clear()
                self.last_error = describe_error(self.broker, exc)
                if first and connected_at is None:  # no CONNACK: refused, unreachable, silent
                    raise BrokerError(self.last_error) from exc
                if stop.is_set():
                    depth, held = self.outbox.depth(), len(self.outbox.memory_only())
                    where = (
                        f"{depth - held} stay in the outbox file; {held} held in memory only "
                        "(the file could not take them) are lost when the gateway stops"
                        if held
                        else "they stay in the outbox"
                    )
                    log.warning("%s; %d message(s) not sent: %s", self.last_error, depth, where)
                    return
                self.reconnects += 1
                lasted = None if connected_at is None else time.monotonic() - connected_at
                if lasted is not None and (lasted >= QUICK_DROP_S or self.sent > sent_at_connect):
                    # a connection that held (or delivered): the next attempt is quick again.
                    # Not one lost within seconds with nothing delivered (a broker that closes
                    # each connection after its CONNACK, a second gateway of this vehicle):
                    # reset at each CONNACK, the wait stayed at its first 0.1-0.2 s, and every
                    # attempt ledgered a last will
                    delay = self.backoff_initial
                # lost within seconds of connecting, again and again: the broker closes an old
                # connection when a client with the same id connects (a second gateway of this
                # vehicle), and the two take turns; said once, with the id
                if lasted is not None and lasted < QUICK_DROP_S:
                    quick_drops += 1
                    if quick_drops == QUICK_DROPS_SAID:
                        log.warning(
                            "the broker closed the connection %d times within seconds of "
                            "connecting: is another client connected with the client id %r (a "
                            "second gateway of this vehicle)? Each takes the other's place "
                            "([broker].client_id)",
                            quick_drops,
                            self.identifier,
                        )
                else:
                    quick_drops = 0
                connected_at = None
                wait = delay * random.uniform(0.5, 1.0)  # jittered: said as it will be
                log.warning("%s; reconnecting in %.1f s", self.last_error, wait)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=wait)
                delay = min(delay * 2, self.broker.backoff_max)

    async def _publish_status(self, client: aiomqtt.Client, state: str, reason: str) -> None:
        msg = self.status(state, reason)
        if msg is not None:
            await client.publish(msg.topic, msg.payload, qos=1, retain=True)

    async def _drain_until(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        while True:
            if self._lost:  # found while idle: reconnect now, not at the next send (the owner's
                # commands cannot reach a gateway whose subscription went with its connection)
                raise aiomqtt.MqttError("the connection to the broker was lost")
            self._wake.clear()
            batch = self.outbox.peek(200)
            # pipelined: up to IN_FLIGHT publishes are handed to the client ahead of the one
            # whose PUBACK is awaited next, in order (tasks start in the order they are made).
            # One at a time, each waited a round trip: ~200 us here, a mobile uplink's RTT in
            # a car; the 395 summaries of a 1M-frame Model 3 replay, 80 -> 43-55 ms
            sends: list[asyncio.Future[bool | None]] = []
            done: list[Pending] = []  # acknowledged by the broker
            late: list[Pending] = []  # refused by ``may_send`` at the moment of sending
            settled = 0  # items of ``batch`` whose send was awaited
            # one deadline for the PUBACK awaited next, moved on after each: aiomqtt's own
            # timeout per publish runs each through asyncio.wait_for, a task and a timer more
            # per message (400 summaries drained: 41-49 -> 34-39 ms, best of 30, two series)
            loop = asyncio.get_running_loop()
            # a retained state put meanwhile (the answer to an owner's command) goes before the
            # rest of the batch: no more of it is started, and the next peek puts it first
            states = self.outbox.retained_put
            try:
                async with asyncio.timeout(None) as deadline:
                    self._deadline = deadline
                    for i, item in enumerate(batch):
                        while len(sends) < min(len(batch), i + IN_FLIGHT) and (
                            states == self.outbox.retained_put
                        ):
                            nxt = batch[len(sends)]
                            sends.append(asyncio.ensure_future(self._send(client, nxt)))
                        if i == len(sends):
                            break
                        if not sends[i].done():  # its PUBACK is awaited (else: no wait at all)
                            _ack_at_once(client)
                            deadline.reschedule(loop.time() + self.ack_timeout)
                        sent = await sends[i]
                        if sent:
                            done.append(item)
                            self.sent += 1
                            self.on_sent(1)
                        elif sent is False:
                            late.append(item)
                        settled = i + 1  # (None: deleted meanwhile, on the record already)
            except TimeoutError:
                if self._lost:
                    raise aiomqtt.MqttError("connection lost while PUBACKs were awaited") from None
                raise aiomqtt.MqttError(
                    f"no PUBACK within {self.ack_timeout:g} s (operation timed out)"
                ) from None
            finally:
                self._deadline = None
                # after a failure: what was acknowledged meanwhile leaves the outbox too (its
                # PUBACK came), the rest stays; nothing is left unretrieved. But a retained
                # message behind the one that failed stays too, to be sent again after it: the
                # broker keeps the last retained message of a topic, and the one that failed
                # (sent again later) may be an older state of the same topic
                for item, send in zip(batch[settled:], sends[settled:], strict=False):
                    if not send.done():
                        send.cancel()
                    elif send.cancelled() or send.exception() is not None or send.result() is None:
                        continue  # not sent, or deleted meanwhile (None)
                    elif not send.result():
                        late.append(item)
                    elif not item.retain:
                        done.append(item)
                        self.sent += 1
                        self.on_sent(1)
                if late:  # on the record first, then out of the outbox: never sent
                    self.on_withheld(late)
                self.outbox.ack_many(late + done)  # one commit for the PUBACKs of the batch
                self.outbox.batch_done()
                self.acked.set()
            if batch:
                continue
            if stop.is_set():
                return
            waiter = asyncio.create_task(self._wake.wait())
            stopper = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()

    async def _send(self, client: aiomqtt.Client, item: Pending) -> bool | None:
        """Publish ``item`` and await its PUBACK: True. False, and nothing sent, if
        ``may_send`` refuses it now: asked here, right before the PUBLISH is written (consent
        withdrawn while the batch was being sent stops what was not written yet); None, and
        nothing sent, if the owner deleted it since the batch was read, or its bytes in the
        outbox are not those on record (``on_changed``)."""
        if not self.outbox.waiting(item):
            return None
        if not self.outbox.unchanged(item):
            self.on_changed(item)
            self.outbox.withdraw([item])
            return None
        if not self.may_send(item):
            return False
        self.outbox.sending(item)
        # no timeout of aiomqtt's here: the drain's deadline bounds the wait
        await client.publish(item.topic, item.payload, qos=1, retain=item.retain, timeout=math.inf)
        # acknowledged: noted at once (a disk failure meanwhile must not send it again), even
        # while the PUBACK of one before it is still awaited; a retained message only in its
        # turn (see _drain_until: sent again, it is the broker's last state of its topic)
        if not item.retain:
            self.outbox.note_acked(item)
        return True

    def _connection_lost(self, reader: asyncio.Task[None]) -> None:
        """The inbound reader ended by itself: the connection is gone. A wait for PUBACKs
        ends now (its deadline moved to now), not after ``ack_timeout``."""
        self._lost = True
        if self._deadline is not None:
            self._deadline.reschedule(asyncio.get_running_loop().time())
        self._wake.set()  # an idle drain wakes, and reconnects

    async def _read_inbound(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if self.on_inbound is None:
                continue
            payload = (
                message.payload
                if isinstance(message.payload, bytes)
                else str(message.payload).encode()
            )
            try:
                await self.on_inbound(str(message.topic), payload, bool(message.retain))
            except Exception:  # an owner's bad command must never stop publishing
                log.exception("inbound message on %s could not be handled", message.topic)
