"""The egress guard: the last step before anything is handed to the MQTT client. Fails closed.

It passes only payloads of a schema the policy allows, with only the fields that schema has,
only plain values (no bytes, no arrays: an image or a raw CAN frame cannot pass), and, for
signal and location payloads, only permitted signals and aggregates, on their precision grid,
under valid consent. Everything else is dropped, counted, logged and recorded in the ledger.
The only way to obtain a ``Released`` message, the one type the outbox and the publisher
accept, is through ``EgressGuard.release``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.egress.schema import HEADER_FIELDS, SALT, SCHEMAS, Schema, Stream, Topics, pack
from gateway.telemetry.policy import Aggregate, Category, Policy, on_grid

log = logging.getLogger(__name__)

MAX_PAYLOAD = 64 * 1024
_TOKEN = object()


@dataclass(frozen=True)
class Outgoing:
    """A payload a stage wants to send: schema name, body (without header fields), and the
    policy rules that allowed its content."""

    schema: str
    body: Mapping[str, Any]
    rules: tuple[str, ...] = ()


@dataclass(frozen=True)
class Released:
    """A message the guard let out: topic, encoded payload, schema, and its per-vehicle
    ``seq`` from the outbox counter (None for a schema without one)."""

    topic: str
    payload: bytes
    schema: str
    seq: int | None
    rules: tuple[str, ...]
    consent: Mapping[str, float]
    retain: bool
    # the categories of the data it carries (``Category`` values): an owner's delete of a
    # category removes what waits of it (``datarights.delete_category``)
    categories: tuple[str, ...] = ()
    _token: object = field(repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self._token is not _TOKEN:
            raise TypeError("Released messages are created only by EgressGuard.release")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()


class Blocked(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _plain(value: Any, path: str) -> None:
    """Only msgpack-native plain values; reject bytes, arrays and every other object."""
    try:
        _check_plain(value)
    except _NotPlain as exc:
        raise Blocked(f"{path}{''.join(reversed(exc.where))}: {exc.reason}") from None


class _NotPlain(Exception):
    """Why a value is not plain; ``where`` collects its path on the way out (built only for
    a value that is refused: a path per value checked was a third of the guard's time)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.where: list[str] = []


def _check_plain(value: Any) -> None:
    t = type(value)
    if t is float:
        if not math.isfinite(value):
            raise _NotPlain("not a finite number")
        return
    if t is int or value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise _NotPlain("not a finite number")
        raise _NotPlain(f"{type(value).__name__} is not a plain number")
    if t is dict:
        for k, v in value.items():
            if not isinstance(k, str):
                raise _NotPlain(f"non-string key {k!r}")
            try:
                _check_plain(v)
            except _NotPlain as exc:
                exc.where.append(f".{k}")
                raise
        return
    if t is list or t is tuple:
        if len(value) > 64:
            raise _NotPlain(f"list of {len(value)} items (bulk data is not a summary)")
        for i, v in enumerate(value):
            try:
                _check_plain(v)
            except _NotPlain as exc:
                exc.where.append(f"[{i}]")
                raise
        return
    raise _NotPlain(
        f"{type(value).__module__}.{type(value).__name__} may not leave "
        "(binary, array or object data)"
    )


ConsentView = Callable[[Category], bool]


@dataclass
class EgressGuard:
    """The last check before anything leaves: schema, policy and consent, per message."""

    policy: Policy
    topics: Topics
    consent_ok: ConsentView
    consent_snapshot: Callable[[], Mapping[str, float]]
    next_seq: Callable[[], int]
    on_block: Callable[[Outgoing, str], None] = lambda out, reason: None
    # a number taken for a message then blocked (too large) is handed out again
    give_back: Callable[[int], None] = lambda seq: None
    blocked: int = 0
    passed: int = 0

    def release(self, out: Outgoing) -> Released | None:
        """The packed, sequenced message, or None (counted, logged, ``on_block``) if it may
        not leave."""
        try:
            schema = self._check(out)
        except Blocked as exc:
            self.blocked += 1
            log.warning("egress blocked (%s): %s", out.schema, exc.reason)
            self.on_block(out, exc.reason)
            return None
        body: dict[str, Any] = {"schema": schema.name, "v": schema.version}
        seq = None
        if schema.sequenced:
            seq = self.next_seq()
            body["seq"] = seq
            # 128 random bits in every message of data: the ledger keeps each message's
            # sha256, and without them a holder of the ledger could find a message of few
            # possible values by hashing each (every position of a 50 km square in each
            # window: 3.7 s), deleted ones included. With them, only the holder of the
            # message can match it to its line (``schema.SALT``)
            body[SALT] = os.urandom(16).hex()
        body.update(out.body)
        payload = pack(body)
        if len(payload) > MAX_PAYLOAD:
            self.blocked += 1
            if seq is not None:
                self.give_back(seq)
            self.on_block(out, f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
            return None
        self.passed += 1
        return Released(
            self.topics.stream(schema.stream),
            payload,
            schema.name,
            seq,
            out.rules,
            dict(self.consent_snapshot()),
            schema.retained,
            categories_of(self.policy, schema, out.body),
            _TOKEN,
        )

    def _check(self, out: Outgoing) -> Schema:
        schema = SCHEMAS.get(out.schema)
        if schema is None:
            raise Blocked(f"schema {out.schema!r} is not declared")
        if schema.stream is Stream.CAMERA and not self.policy.camera_summaries:
            raise Blocked("the policy does not permit camera summaries")
        if not isinstance(out.body, Mapping):
            raise Blocked("body is not a map")
        for key, value in out.body.items():
            if key in HEADER_FIELDS:
                raise Blocked(f"field {key!r} is set by the guard, not the sender")
            expected = schema.fields.get(key)
            if expected is None:
                raise Blocked(f"field {key!r} is not in schema {schema.name}")
            _plain(value, key)
            if not isinstance(value, expected) or isinstance(value, bool) and expected is not bool:
                raise Blocked(f"field {key!r} has type {type(value).__name__}")
        if "policy" in schema.fields and out.body.get("policy") != self.policy.ident:
            raise Blocked(
                f"payload names policy {out.body.get('policy')!r}, "
                f"not the one in force ({self.policy.ident})"
            )
        if schema.stream is Stream.SIGNALS:
            self._check_signals(out)
        elif schema.stream is Stream.LOCATION:
            self._check_location(out)
        elif schema.stream is Stream.TRIPS:
            from gateway.telemetry.location import on_location_grid

            for key in ("start_area", "end_area"):
                if key not in out.body:
                    continue
                if not self.consent_ok(Category.LOCATION):
                    raise Blocked(f"{key} without location consent")
                area = out.body[key]
                if set(area) != {"lat", "lon"} or not on_location_grid(
                    float(area["lat"]), float(area["lon"]), self.policy.location_grid_m
                ):
                    raise Blocked(f"{key} is not a coarsened position")
        return schema

    def _check_signals(self, out: Outgoing) -> None:
        rules = self.policy.by_publish_name()
        signals = out.body.get("signals", {})
        for name, values in signals.items():
            rule = rules.get(name)
            if rule is None:
                raise Blocked(f"signal {name!r} is not permitted by policy {self.policy.ident}")
            if rule.location is not None:
                raise Blocked(f"location signal {name!r} may only leave on the location stream")
            if rule.category.sensitive and not self.consent_ok(rule.category):
                raise Blocked(f"signal {name!r} ({rule.category.value}) without valid consent")
            if rule.rule_id not in out.rules:
                raise Blocked(f"signal {name!r} is not covered by the rules the sender named")
            if not isinstance(values, dict):
                raise Blocked(f"signal {name!r}: values must be a map")
            for agg, v in values.items():
                if agg not in rule.allowed:
                    raise Blocked(f"signal {name!r}: aggregate {agg!r} is not permitted")
                if agg == "states" and Aggregate.STATES not in rule.aggregates:
                    raise Blocked(f"signal {name!r}: states not permitted")
                if agg in ("count", "unit"):
                    continue
                # a state's name may stand for a value; a number may not hide as text: a
                # string that reads as a number must be on the grid as a number must
                if agg == "states":
                    if not isinstance(v, dict):
                        raise Blocked(f"signal {name!r}: states must be a map")
                    numbers = [
                        float(k) if isinstance(k, int | float) and not isinstance(k, bool)
                        else _as_number(k)
                        for k in v
                    ]  # fmt: skip
                elif isinstance(v, str) and agg == "last":
                    numbers = [_as_number(v)]
                elif isinstance(v, int | float) and not isinstance(v, bool):
                    numbers = [float(v)]
                else:
                    raise Blocked(f"signal {name!r}: {agg}={v!r} is not a number")
                for number in numbers:
                    if number is not None and not on_grid(number, rule.quantum):
                        raise Blocked(
                            f"signal {name!r}: {agg} {v!r} is finer than the permitted "
                            f"precision {rule.quantum}"
                        )

    def _check_location(self, out: Outgoing) -> None:
        from gateway.telemetry.location import on_location_grid

        if not self.consent_ok(Category.LOCATION):
            raise Blocked("position without valid location consent")
        lat, lon = out.body.get("lat"), out.body.get("lon")
        if not isinstance(lat, int | float) or not isinstance(lon, int | float):
            raise Blocked("position without lat/lon")
        if not on_location_grid(float(lat), float(lon), self.policy.location_grid_m):
            raise Blocked(
                f"position {lat},{lon} is finer than the {self.policy.location_grid_m} m grid"
            )


def categories_of(policy: Policy, schema: Schema, body: Mapping[str, Any]) -> tuple[str, ...]:
    """The categories of the data in a message of ``schema`` (sorted ``Category`` values): a
    summary's signals' under ``policy`` (a name it does not know: none), a position, a trip's
    driving data and its areas, a camera summary's counts; none for the gateway's own state
    (status, consent, health, the ledger's digest)."""
    found: set[Category] = set()
    if schema.stream is Stream.SIGNALS:
        rules = policy.by_publish_name()
        signals = body.get("signals")
        found = {rules[n].category for n in signals or () if n in rules}
    elif schema.stream is Stream.LOCATION:
        found = {Category.LOCATION}
    elif schema.stream is Stream.TRIPS:
        found = {Category.DRIVING_BEHAVIOUR}
        if "start_area" in body or "end_area" in body:
            found.add(Category.LOCATION)
    elif schema.stream is Stream.CAMERA:
        found = {Category.EXTERIOR_CAMERA}
    return tuple(sorted(c.value for c in found))


def _as_number(x: object) -> float | None:
    """A state key or a ``last`` text as a number if it reads as a finite one ("-13.18"), else
    None (a state's name such as "DI_GEAR_D", or "SNA")."""
    if not isinstance(x, str):
        return None
    try:
        number = float(x)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
