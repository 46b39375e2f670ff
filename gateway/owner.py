"""The owner's side of the channel: subscribe, unpack, drop redeliveries, show."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiomqtt

from gateway.egress.mqtt import (
    SubscriptionRefused,
    describe_error,
    make_client,
    message_queue,
    subscribe,
)
from gateway.egress.schema import Topics, unpack
from gateway.errors import BrokerError
from gateway.settings import BrokerSettings

log = logging.getLogger("gateway.owner")


@dataclass
class OwnerView:
    """Keeps what an owner has seen; drops a redelivery: a message whose ``seq`` it has seen
    with the same payload. A ``seq`` seen with another payload is a new message (a gateway that
    started again on a new outbox and ledger numbers from 0 again): shown, and counted."""

    seen: dict[int, bytes] = field(default_factory=dict)  # seq -> digest of its payload
    duplicates: int = 0
    reused: int = 0  # messages whose seq an earlier, different message had
    undecodable: int = 0

    def accept(self, topic: str, payload: bytes) -> dict[str, Any] | None:
        try:
            body = unpack(payload)
        except Exception:  # a foreign or damaged payload is shown as such, not fatal
            self.undecodable += 1
            return {"topic": topic, "error": "not a msgpack payload", "bytes": len(payload)}
        if not isinstance(body, dict):
            self.undecodable += 1
            return {"topic": topic, "error": "not a map"}
        seq = body.get("seq")
        if isinstance(seq, int):
            digest = hashlib.blake2b(payload, digest_size=16).digest()
            before = self.seen.get(seq)
            if before == digest:
                self.duplicates += 1
                return None
            if before is not None:
                self.reused += 1
            self.seen[seq] = digest
        return {"topic": topic, **body}


def _fmt_value(v: Any, key: str = "") -> str:
    is_time = key in ("at", "start", "end", "until") or key.endswith("_until")
    if is_time and isinstance(v, int | float) and v > 1e8:
        import datetime

        try:
            return datetime.datetime.fromtimestamp(v, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        except (OverflowError, OSError, ValueError):  # beyond year 9999: the number itself
            return f"{v:g}"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}:{_fmt_value(x, k)}" for k, x in v.items()) + "}"
    return str(v)


def _window_text(a: float, b: float) -> str:
    """A window's start and end: as UTC when they are UNIX times (a live bus, most loggers),
    else as the log's own seconds (a logger that counts from its start: the Kona's 1952.0)."""
    if a > 1e8:
        start, end = _fmt_value(a, "at"), _fmt_value(b, "at")
        if start[:10] == end[:10]:  # the same day: its date once
            end = end[11:]
        return f"{start}..{end}"
    return f"{a:.1f}..{b:.1f} s (log time)"


def format_message(msg: dict[str, Any]) -> str:
    stream = msg["topic"].rsplit("/owner/", 1)[-1]
    head = f"[{stream:<8}]"
    if "seq" in msg:
        head += f" #{msg['seq']:<5}"
    if "window" in msg:
        head += " " + _window_text(*msg["window"])
    if msg.get("schema") == "gateway.signals":
        lines = [head]
        for name, vals in msg["signals"].items():
            unit = vals.get("unit", "")
            parts = "  ".join(f"{k}={_fmt_value(v)}" for k, v in vals.items() if k != "unit")
            lines.append(f"    {name:<22} {parts} {unit}".rstrip())
        return "\n".join(lines)
    skip = {"topic", "schema", "v", "seq", "salt", "window", "policy"}
    return (
        head + "  " + "  ".join(f"{k}={_fmt_value(v, k)}" for k, v in msg.items() if k not in skip)
    )


async def watch(
    broker: BrokerSettings,
    topics: Topics,
    *,
    as_json: bool = False,
    count: int | None = None,
    idle_timeout: float | None = None,
    out: TextIO = sys.stdout,
    on_message: Callable[[dict[str, Any]], None] | None = None,
    ready: asyncio.Event | None = None,
    hint_after: float | None = 5.0,
) -> OwnerView:
    """Print what arrives on the owner's topics until ``count`` messages or ``idle_timeout``
    seconds without one. ``hint_after`` seconds without any message at all after the first
    subscription (not even a retained one): a warning says what such silence can mean."""
    view = OwnerView()
    shown = 0
    mine = (topics.consent_set, topics.command)  # the owner's own commands, as JSON
    connected, delay = False, 0.5
    lost_at: float | None = None  # when the connection was lost (counts as idle time)
    heard = asyncio.Event()  # anything arrived (a gateway's retained status does at once)
    hinting: asyncio.Task[None] | None = None

    async def hint(after: float) -> None:
        # Mosquitto's ACL grants a subscription that the login may not read, then sends
        # nothing: without this, that silence looks like a gateway with nothing to say
        await asyncio.sleep(after)
        if not heard.is_set():
            log.warning(
                "nothing arrived on %s within %g s, not even a gateway's retained status: no "
                "gateway for VIN %s has connected to this broker yet, or the broker does not "
                "let this login read these topics (its ACL)",
                topics.all,
                after,
                topics.vin,
            )

    try:
        while True:
            try:
                async with make_client(broker, identifier=None) as client:
                    await subscribe(client, topics.all)
                    connected, delay, lost_at = True, 0.5, None
                    if hinting is None and hint_after is not None:
                        hinting = asyncio.create_task(hint(hint_after))
                    if ready is not None:
                        ready.set()
                    async with message_queue(client) as incoming:
                        while count is None or shown < count:
                            try:
                                message = await incoming.get(idle_timeout)
                            except TimeoutError:
                                break
                            heard.set()
                            if str(message.topic) in mine:
                                continue
                            payload = message.payload if isinstance(message.payload, bytes) else b""
                            msg = view.accept(str(message.topic), payload)
                            if msg is None:
                                continue
                            shown += 1
                            if on_message is not None:
                                on_message(msg)
                            if as_json:
                                out.write(
                                    json.dumps(msg, ensure_ascii=False, sort_keys=False) + "\n"
                                )
                            else:
                                out.write(format_message(msg) + "\n")
                            with contextlib.suppress(Exception):
                                out.flush()
                return view
            except SubscriptionRefused as exc:
                raise BrokerError(describe_error(broker, exc)) from exc
            except aiomqtt.MqttError as exc:
                if not connected:  # never reached: the address or the login is wrong
                    raise BrokerError(describe_error(broker, exc)) from exc
                # lost after it worked (a broker restart): messages meanwhile are not seen. With
                # --idle-timeout, the time without a broker is idle time too
                now = time.monotonic()
                lost_at = now if lost_at is None else lost_at
                if idle_timeout is not None and now - lost_at >= idle_timeout:
                    raise BrokerError(describe_error(broker, exc)) from exc
                wait = delay
                if idle_timeout is not None:  # the last attempt at the end of the idle time
                    wait = min(wait, lost_at + idle_timeout - now)
                log.warning("%s; reconnecting in %.1f s", describe_error(broker, exc), wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, broker.backoff_max)
    finally:
        if hinting is not None:
            hinting.cancel()
