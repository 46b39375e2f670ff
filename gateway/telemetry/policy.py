"""The policy: what may leave the vehicle, in which form, at what precision. Default deny.

A signal the policy does not name is never decoded for egress, never aggregated, never sent.
A named signal leaves only as the aggregates the policy lists, rounded to its quantum, and, for
a sensitive category, only while the owner's consent for that category is valid.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError
from gateway.records import SignalAggregate, WindowSummary
from gateway.settings import read_toml
from gateway.telemetry.trips import TripConfig

log = logging.getLogger(__name__)


class Category(Enum):
    VEHICLE_STATUS = "vehicle_status"
    DRIVING_BEHAVIOUR = "driving_behaviour"
    LOCATION = "location"
    CABIN = "cabin"
    EXTERIOR_CAMERA = "exterior_camera"
    BIOMETRIC = "biometric"

    @property
    def sensitive(self) -> bool:
        """GB/T 41871-2022: location/trajectory, cabin audio/video and biometrics need their
        own consent; vehicle status and aggregate driving data do not."""
        return self in (
            Category.LOCATION,
            Category.CABIN,
            Category.EXTERIOR_CAMERA,
            Category.BIOMETRIC,
        )


class Aggregate(Enum):
    COUNT = "count"
    MIN = "min"
    MAX = "max"
    MEAN = "mean"
    LAST = "last"
    STATES = "states"


class LocationAxis(Enum):
    LATITUDE = "latitude"
    LONGITUDE = "longitude"


@dataclass(frozen=True)
class SignalRule:
    """What the policy lets out of one signal: its name outside, category and aggregates."""

    signal: str  # "Message.Signal" in the DBC
    publish_as: str
    category: Category
    aggregates: tuple[Aggregate, ...]
    quantum: float | None = None
    location: LocationAxis | None = None

    @functools.cached_property
    def rule_id(self) -> str:
        return f"signal:{self.signal}"

    @functools.cached_property
    def allowed(self) -> frozenset[str]:
        """The keys its published values may have: its aggregates and the unit."""
        return frozenset(a.value for a in self.aggregates) | {"unit"}


@dataclass(frozen=True)
class Policy:
    """The rules of what may leave the car: a signal without a rule never leaves."""

    name: str
    version: int
    rules: Mapping[str, SignalRule]
    max_consent_days: float = 30.0
    location_grid_m: float = 1000.0
    location_min_interval_s: float = 60.0
    location_min_change_m: float = 200.0
    location_retention_days: float = 7.0
    camera_summaries: bool = True
    source: str = "<built-in>"
    digest: str = ""
    geofences: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    trips: TripConfig = field(default_factory=TripConfig)

    @property
    def ident(self) -> str:
        return f"{self.name}@{self.version}"

    def wanted_signals(self) -> set[str]:
        """Every signal decoded at all: the named ones, and those trips are computed from
        (which stay in the vehicle; only the trip summary may leave)."""
        return set(self.rules) | self.trips.signals

    def location_rules(self) -> dict[LocationAxis, SignalRule]:
        return {r.location: r for r in self.rules.values() if r.location is not None}

    def by_publish_name(self) -> Mapping[str, SignalRule]:
        # read-only: the map is the policy's own, shared by every caller
        return types.MappingProxyType(self._by_publish_name)

    @functools.cached_property
    def _by_publish_name(self) -> dict[str, SignalRule]:
        # once per policy (the guard asks for every message); a policy's rules do not change
        return {r.publish_as: r for r in self.rules.values()}


def quantize(value: float, quantum: float | None) -> float:
    """Round to the nearest multiple of ``quantum`` and to the quantum's decimals, so that
    0.5-steps come out as 36.5 and never as 36.50000000000001."""
    if quantum is None or not math.isfinite(value):
        return value
    steps = value / quantum
    if not math.isfinite(steps):  # (9e307 in steps of 0.5: a whole number far past 2**53,
        return value  # on every grid of a quantum under 1 already; round() would overflow)
    return round(round(steps) * quantum, _decimals(quantum))


@functools.lru_cache(maxsize=256)
def _decimals(quantum: float) -> int:
    """The decimals of ``quantum`` as written (0.5 -> 1, 0.01 -> 2, 60 -> 0); a policy has a
    handful of quanta, and every published number is rounded to one (cached: 2 us a call)."""
    digits, _, exp = repr(float(quantum)).lower().partition("e")  # 0.5, 1e-05, 2.5e-07
    whole, _, frac = digits.partition(".")
    frac = frac.rstrip("0")
    return max(0, len(frac) - int(exp or 0))


def _text(v: float) -> str:
    """A number as a state key: 3 not 3.0 (as the keys of earlier versions), 2.5 as 2.5."""
    return str(int(v)) if v.is_integer() else repr(v)


def on_grid(value: float, quantum: float | None) -> bool:
    if quantum is None:
        return True
    return quantize(value, quantum) == value


def render_signal(rule: SignalRule, agg: SignalAggregate) -> dict[str, Any]:
    """The published form of one signal's window: only the permitted aggregates, rounded."""
    out: dict[str, Any] = {}
    for a in rule.aggregates:
        if a is Aggregate.COUNT:
            out["count"] = agg.count
        elif a is Aggregate.STATES:
            if agg.states is not None:
                states: dict[str, int] = {}
                for k, n in agg.states.items():  # a value without a name: rounded, as text
                    key = k if isinstance(k, str) else _text(quantize(float(k), rule.quantum))
                    states[key] = states.get(key, 0) + n
                out["states"] = states
        elif a is Aggregate.LAST and isinstance(agg.last, str):
            out["last"] = agg.last
        else:
            v = getattr(agg, a.value)
            if v is not None:
                out[a.value] = quantize(float(v), rule.quantum)
    if agg.unit:
        out["unit"] = agg.unit
    return out


def permitted_signals(
    policy: Policy, summary: WindowSummary, consent_ok: Any
) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:
    """(published signals, rule ids used, rule ids withheld for lack of consent).
    ``consent_ok(category) -> bool``. Location signals are not handled here (see location)."""
    out: dict[str, dict[str, Any]] = {}
    used: list[str] = []
    withheld: list[str] = []
    for name, agg in summary.signals.items():
        rule = policy.rules.get(name)
        if rule is None or rule.location is not None:
            continue
        if rule.category.sensitive and not consent_ok(rule.category):
            withheld.append(rule.rule_id)
            continue
        rendered = render_signal(rule, agg)
        if len(rendered) - ("unit" in rendered) < len(rule.aggregates):
            _say_no_aggregate(rule, agg, rendered)  # some do not exist for this signal
        if rendered.keys() <= {"unit"}:
            continue
        out[rule.publish_as] = rendered
        used.append(rule.rule_id)
    return out, used, withheld


_NO_AGGREGATE_SAID: set[str] = set()  # rules warned about, once per process


def _say_no_aggregate(rule: SignalRule, agg: SignalAggregate, rendered: Mapping[str, Any]) -> None:
    """Once per rule: a list of states has no min/max/mean, a number no states. A rule none of
    whose aggregates exists is never published (it published an empty entry in every window);
    one some of whose aggregates do not exist is published without them."""
    if rule.rule_id in _NO_AGGREGATE_SAID:
        return
    _NO_AGGREGATE_SAID.add(rule.rule_id)
    kind = "a list of states (value names in the DBC)" if agg.states is not None else "a number"
    fits = "count, last, states" if agg.states is not None else "count, min, max, mean, last"
    missing = [a.value for a in rule.aggregates if a.value not in rendered]
    if len(missing) == len(rule.aggregates):
        what = (
            f"none of its aggregates ({', '.join(missing)}) exists for it, so it is never published"
        )
    else:
        what = (
            f"{missing[0]} does not exist for it and is left out"
            if len(missing) == 1
            else f"{', '.join(missing)} do not exist for it and are left out"
        )
    log.warning("policy: %s is %s: %s; give some of: %s", rule.signal, kind, what, fits)


_POLICY_KEYS = {
    "name",
    "version",
    "max_consent_days",
    "location_grid_m",
    "location_min_interval_s",
    "location_min_change_m",
    "location_retention_days",
    "camera_summaries",
    "geofence",
}
_RULE_KEYS = {"signal", "publish_as", "category", "aggregates", "quantum", "location"}


def _enum(cls: Any, value: Any, where: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(
            f"{where} must be one of {', '.join(m.value for m in cls)}, got {value!r}"
        ) from None


def parse_policy(raw: Mapping[str, Any], source: str, digest: str = "") -> Policy:
    for key in raw:
        if key not in ("policy", "signal", "trips"):
            raise ConfigError(f"{source}: unknown section [{key}] (known: policy, signal, trips)")
    head = raw.get("policy", {})
    if not isinstance(head, Mapping):
        raise ConfigError(f"{source}: [policy] must be a table")
    signals = raw.get("signal", [])
    if not isinstance(signals, list) or not all(isinstance(r, Mapping) for r in signals):
        raise ConfigError(f"{source}: [[signal]] must be an array of tables")
    trips = raw.get("trips", {})
    if not isinstance(trips, Mapping):
        raise ConfigError(f"{source}: [trips] must be a table")
    for key in head:
        if key not in _POLICY_KEYS:
            raise ConfigError(
                f"{source}: [policy]: unknown key {key!r} (known: {', '.join(sorted(_POLICY_KEYS))})"
            )
    rules: dict[str, SignalRule] = {}
    for i, r in enumerate(signals, start=1):
        where = f"{source}: [[signal]] #{i}"
        for key in r:
            if key not in _RULE_KEYS:
                raise ConfigError(
                    f"{where}: unknown key {key!r} (known: {', '.join(sorted(_RULE_KEYS))})"
                )
        sig = r.get("signal")
        if not isinstance(sig, str) or not all(sig.partition(".")[::2]):
            raise ConfigError(f"{where}.signal must be 'Message.Signal', got {sig!r}")
        if sig in rules:
            raise ConfigError(f"{where}.signal {sig!r} is named twice")
        aggs = r.get("aggregates", ["last"])
        if not isinstance(aggs, list) or not aggs or not all(isinstance(a, str) for a in aggs):
            raise ConfigError(f"{where}.aggregates must be a non-empty list of names")
        for key in ("publish_as", "category", "location"):
            if key in r and not (isinstance(r[key], str) and r[key].strip()):
                raise ConfigError(f"{where}.{key} must be a non-empty string, got {r[key]!r}")
        quantum = r.get("quantum")
        if quantum is not None and (
            not isinstance(quantum, int | float)
            or isinstance(quantum, bool)
            or not MIN_QUANTUM <= quantum <= MAX_QUANTUM
        ):
            raise ConfigError(
                f"{where}.quantum must be a number from {MIN_QUANTUM:g} to {MAX_QUANTUM:g}, "
                f"got {quantum!r}"
            )
        loc = r.get("location")
        rule = SignalRule(
            signal=sig,
            publish_as=str(r.get("publish_as", sig)),
            category=_enum(Category, r.get("category", "vehicle_status"), f"{where}.category"),
            aggregates=tuple(_enum(Aggregate, a, f"{where}.aggregates") for a in aggs),
            quantum=float(quantum) if quantum is not None else None,
            location=_enum(LocationAxis, loc, f"{where}.location") if loc is not None else None,
        )
        if rule.location is not None and rule.category is not Category.LOCATION:
            raise ConfigError(f'{where}: a location signal must have category = "location"')
        if rule.location is None and _LOOKS_LIKE_POSITION.search(sig):
            log.warning(
                '%s (%s): its name says it is a position, but it has no location = "latitude" '
                'or "longitude": it leaves as exact window values, not as coarsened positions%s',
                where,
                sig,
                "" if rule.category.sensitive else ", and without consent",
            )
        rules[sig] = rule
    by_name: dict[str, list[str]] = {}
    for r in rules.values():
        by_name.setdefault(r.publish_as, []).append(r.signal)
    for name, sigs in by_name.items():
        if len(sigs) > 1:
            raise ConfigError(
                f"{source}: publish_as {name!r} is used by two signals ({sigs[0]}, {sigs[1]})"
            )
    axes: dict[LocationAxis, list[str]] = {}
    for r in rules.values():
        if r.location is not None:
            axes.setdefault(r.location, []).append(r.signal)
    for axis, sigs in axes.items():
        if len(sigs) > 1:
            raise ConfigError(
                f'{source}: location = "{axis.value}" is given to two signals '
                f"({sigs[0]}, {sigs[1]}): a position has one of each"
            )
    if len(axes) == 1:
        (axis,) = axes
        raise ConfigError(
            f'{source}: location = "{axis.value}" ({axes[axis][0]}) without a signal for the '
            "other axis: no position could be published (give both, or neither)"
        )

    def num(key: str, default: float) -> float:
        v = head.get(key, default)
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{source}: [policy].{key} must be a positive number, got {v!r}")
        top = _POLICY_MAX.get(key)
        if top is not None and v > top[0]:
            raise ConfigError(
                f"{source}: [policy].{key} must be at most {top[0]:g} ({top[1]}), got {v!r}"
            )
        return float(v)

    version = head.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"{source}: [policy].version must be an integer from 1, got {version!r}")
    fences = head.get("geofence", [])
    if not isinstance(fences, list) or not all(isinstance(f, Mapping) for f in fences):
        raise ConfigError(f"{source}: [policy].geofence must be an array of tables")
    from gateway.telemetry.location import parse_geofences

    parse_geofences(fences, source)  # a bad fence fails now, naming itself
    if "name" in head and not (isinstance(head["name"], str) and head["name"].strip()):
        raise ConfigError(f"{source}: [policy].name must be a non-empty string")
    if not isinstance(head.get("camera_summaries", True), bool):
        raise ConfigError(f"{source}: [policy].camera_summaries must be true or false")
    # below this a "coarsened" position is the fix itself (the GPS is good to a few metres):
    # a policy may ask for coarser positions, never for exact ones under the name of a grid
    if num("location_grid_m", 1000.0) < MIN_LOCATION_GRID_M:
        raise ConfigError(
            f"{source}: [policy].location_grid_m must be at least {MIN_LOCATION_GRID_M:g} m, "
            f"got {num('location_grid_m', 1000.0):g}"
        )
    return Policy(
        name=str(head.get("name", Path(source).stem)),
        version=version,
        rules=rules,
        max_consent_days=num("max_consent_days", 30.0),
        location_grid_m=num("location_grid_m", 1000.0),
        location_min_interval_s=num("location_min_interval_s", 60.0),
        location_min_change_m=num("location_min_change_m", 200.0),
        location_retention_days=num("location_retention_days", 7.0),
        camera_summaries=bool(head.get("camera_summaries", True)),
        source=source,
        digest=digest,
        geofences=tuple(fences),
        trips=TripConfig.parse(trips, source),
    )


# a signal named so is a position: a warning when it is not a location signal
_LOOKS_LIKE_POSITION = re.compile(r"latitude|longitude", re.IGNORECASE)

DEFAULT_POLICY = "policy_default.toml"
MIN_LOCATION_GRID_M = 100.0
# a quantum below this is no rounding (and 1e-310 overflowed the rounding); above, no value
MIN_QUANTUM, MAX_QUANTUM = 1e-9, 1e12
# upper limits of [policy] numbers, and why
_POLICY_MAX = {
    # a consent that lasts decades is the "always allow" the rules forbid
    "max_consent_days": (365.0, "a consent must expire; renew it instead"),
    # coarser than this is no position (and a grid of 30,000 km gave longitudes of 13,474)
    "location_grid_m": (100_000.0, "100 km"),
}


def load_policy(path: str | Path | None = None) -> Policy:
    """The policy in ``path``, or the bundled default policy."""
    if not path:
        # the package's own file (importlib.resources would import zipfile for it)
        data = (Path(__file__).parents[1] / "data" / DEFAULT_POLICY).read_bytes()
        import tomllib

        return parse_policy(
            tomllib.loads(data.decode()),
            f"<default policy {DEFAULT_POLICY}>",
            hashlib.sha256(data).hexdigest(),
        )
    p = Path(path)
    raw = read_toml(p, "policy file")
    return parse_policy(raw, str(p), hashlib.sha256(p.read_bytes()).hexdigest())
