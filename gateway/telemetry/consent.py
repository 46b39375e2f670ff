"""The owner's consent, per sensitive category, with an expiry; and the one-touch stop.

Pure state plus a small JSON persistence. Time is always a parameter (wall-clock seconds):
consent is a legal fact of the real world, so it expires on the wall clock, not frame time.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from gateway.errors import StorageError
from gateway.telemetry.policy import Category


class Collection(Enum):
    ON = "on"
    STOPPED = "stopped"


class ConsentRefused(ValueError):
    """A grant that may not be accepted; the message is the reason told to the owner."""


@dataclass
class ConsentState:
    """The owner's grants (category -> valid until) and whether collection is on."""

    grants: dict[Category, float] = field(default_factory=dict)  # category -> valid until
    collection: Collection = Collection.ON
    persist_across_ignition: bool = False
    last_change: dict[str, Any] = field(default_factory=dict)
    stops: int = 0  # one-touch stops in this process (not saved): a stop between two batches
    # category -> since when its grant has been valid without a break, for grants given in
    # this process (not saved): data collected before that moment may not leave under it. A
    # grant loaded from the file has none: it held before anything this process collected
    since: dict[Category, float] = field(default_factory=dict)

    def ok(self, category: Category, now: float) -> bool:
        if self.collection is Collection.STOPPED:
            return False
        if not category.sensitive:
            return True
        until = self.grants.get(category)
        return until is not None and now < until

    def ok_since(self, category: Category, start: float, now: float) -> bool:
        """``ok`` now, and, for a sensitive category, its grant valid without a break since
        ``start`` (a window that began collecting then): a grant given, or given again after
        a withdrawal or an expiry, after ``start`` does not cover what was collected before
        it. A grant that expired since ``start`` fails ``ok``; one given again after its
        expiry starts a new ``since``."""
        if not self.ok(category, now):
            return False
        return not category.sensitive or self.since.get(category, -math.inf) <= start

    def collecting(self) -> bool:
        return self.collection is Collection.ON

    def grant(
        self,
        category: Category,
        until: float | None,
        now: float,
        max_days: float,
        source: str = "owner",
    ) -> None:
        if not category.sensitive:
            raise ConsentRefused(f"{category.value} needs no separate consent")
        if until is None or not math.isfinite(until):
            raise ConsentRefused("a consent must have an expiry ('always allow' is not offered)")
        if until <= now:
            raise ConsentRefused("the expiry is in the past")
        if until - now > max_days * 86400 + 1e-6:
            raise ConsentRefused(
                f"the expiry is more than the policy's maximum of {max_days:g} days away"
            )
        before = self.grants.get(category)
        if before is None or before <= now:  # not valid up to now: a new unbroken span begins
            self.since[category] = now
        self.grants[category] = until
        self.last_change = {
            "at": now,
            "action": "grant",
            "category": category.value,
            "until": until,
            "by": source,
        }

    def withdraw(self, category: Category | None, now: float, source: str = "owner") -> None:
        if category is None:
            self.grants.clear()
            self.since.clear()
        else:
            self.grants.pop(category, None)
            self.since.pop(category, None)
        self.last_change = {
            "at": now,
            "action": "withdraw",
            "category": category.value if category else "all",
            "by": source,
        }

    def stop(self, now: float, source: str = "owner") -> None:
        self.collection = Collection.STOPPED
        self.stops += 1
        self.last_change = {"at": now, "action": "stop", "by": source}

    def resume(self, now: float, source: str = "owner") -> None:
        self.collection = Collection.ON
        self.last_change = {"at": now, "action": "resume", "by": source}

    def new_ignition_cycle(self, now: float) -> None:
        """Sensitive collection starts off at each ignition cycle unless the owner chose
        otherwise."""
        if not self.persist_across_ignition and self.grants:
            self.grants.clear()
            self.since.clear()
            self.last_change = {"at": now, "action": "ignition-reset", "by": "gateway"}

    def snapshot(self, now: float) -> dict[str, float]:
        return {
            c.value: until
            for c, until in sorted(self.grants.items(), key=lambda kv: kv[0].value)
            if until > now
        }

    def public(self, now: float) -> dict[str, Any]:
        return {
            "at": now,
            "collection": self.collection.value,
            "grants": {k: {"until": v} for k, v in self.snapshot(now).items()},
            "last_change": dict(self.last_change),
        }

    # -- persistence ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "grants": {c.value: u for c, u in self.grants.items()},
            "collection": self.collection.value,
            "persist_across_ignition": self.persist_across_ignition,
            "last_change": self.last_change,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ConsentState:
        return cls(
            grants={Category(k): float(v) for k, v in raw.get("grants", {}).items()},
            collection=Collection(raw.get("collection", "on")),
            persist_across_ignition=bool(raw.get("persist_across_ignition", False)),
            last_change=dict(raw.get("last_change", {})),
        )

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as fh:
                fh.write(json.dumps(self.to_json(), indent=1))
                fh.flush()
                os.fsync(fh.fileno())  # on the disk before it replaces the last state
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):  # (a full disk left an empty one behind)
                tmp.unlink()
            raise StorageError(f"{path}: cannot save the consent state: {exc.strerror}") from exc

    @classmethod
    def load(cls, path: Path) -> ConsentState:
        try:
            return cls.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return cls()
        except (ValueError, KeyError, TypeError):
            return cls()


_CONSENT_KEYS = frozenset({"category", "grant", "days", "until", "persist_across_ignition"})
_COMMAND_KEYS = frozenset({"command", "category"})


@dataclass(frozen=True)
class OwnerCommand:
    """One message from the owner: consent/set or command, parsed (JSON or msgpack)."""

    action: str  # grant | withdraw | stop | resume | delete | persist
    category: Category | None = None
    until: float | None = None
    persist: bool | None = None


_SHOWN = 40  # characters of an owner's value that a refusal quotes back


def _shown(value: Any) -> str:
    """``value`` as a refusal quotes it: its repr, cut short (a 60 kB key came back whole on
    the retained consent topic and in the ledger)."""
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[: _SHOWN - 3]}..."


def _decode(payload: bytes) -> dict[str, Any]:
    try:
        raw = json.loads(payload.decode("utf-8"))
    # (RecursionError: a message nested deeper than the interpreter's stack, '[' * 100000,
    # went past every handler: the command was neither answered nor recorded)
    except (UnicodeDecodeError, ValueError, RecursionError):
        import msgpack

        try:
            raw = msgpack.unpackb(payload, raw=False)
        except Exception as exc:  # msgpack raises several types on garbage
            raise ConsentRefused("the message is neither JSON nor msgpack") from exc
    if not isinstance(raw, dict):
        raise ConsentRefused("the message must be a map")
    return raw


def parse_owner_message(kind: str, payload: bytes, now: float) -> OwnerCommand:
    """``kind`` is "consent/set" or "command". Examples::

    consent/set  {"category": "location", "grant": true, "days": 7}
    consent/set  {"category": "location", "grant": true, "until": 1767225600}
    consent/set  {"category": "location", "grant": false}
    consent/set  {"persist_across_ignition": true}
    command      {"command": "stop"} | {"command": "resume"}
    command      {"command": "delete", "category": "location"}
    """
    raw = _decode(payload)
    known = _COMMAND_KEYS if kind == "command" else _CONSENT_KEYS
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise ConsentRefused(
            f"unknown key {_shown(unknown[0])} (known: {', '.join(sorted(known))})"
        )
    cat = None
    if "category" in raw and raw["category"] not in (None, "all"):
        try:
            cat = Category(raw["category"])
        except (ValueError, TypeError):
            raise ConsentRefused(f"unknown category {_shown(raw['category'])}") from None
    if kind == "command":
        action = raw.get("command")
        if action not in ("stop", "resume", "delete"):
            raise ConsentRefused("command must be stop, resume or delete")
        return OwnerCommand(str(action), cat)
    # a consent is given by true alone: "false", 0 or "no" must never read as a yes
    if "persist_across_ignition" in raw:
        if not isinstance(raw["persist_across_ignition"], bool) or len(raw) > 1:
            raise ConsentRefused("persist_across_ignition must be true or false, alone")
        return OwnerCommand("persist", persist=raw["persist_across_ignition"])
    grant = raw.get("grant")
    if not isinstance(grant, bool):
        raise ConsentRefused(f"grant must be true or false, got {_shown(grant)}")
    if cat is None and grant:
        raise ConsentRefused("a grant names one category")
    if not grant:
        return OwnerCommand("withdraw", cat)
    until = raw.get("until")
    if until is None and "days" in raw:
        days = raw["days"]
        if isinstance(days, bool) or not isinstance(days, int | float) or not days > 0:
            raise ConsentRefused(f"days must be a positive number, got {_shown(days)}")
        try:
            until = now + float(days) * 86400
        except OverflowError:  # an integer too large for a float
            until = math.inf
        if not math.isfinite(until):
            raise ConsentRefused("days: the expiry is beyond any policy's maximum")
    if until is not None and (isinstance(until, bool) or not isinstance(until, int | float)):
        raise ConsentRefused("until must be a Unix time")
    if until is not None:
        try:
            until = float(until)
        except OverflowError:
            raise ConsentRefused("until: the expiry is beyond any policy's maximum") from None
    return OwnerCommand("grant", cat, float(until) if until is not None else None)
