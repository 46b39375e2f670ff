"""``gateway validate``: the test-bench verdict that nothing raw left the vehicle.

It replays a drive with canaries injected (unique exact GPS points, a VIN, distinctive raw
payloads), subscribes as an independent observer to EVERY topic on the broker (``#``), and
searches every byte that left for every canary: as raw bytes, as hex (also with a space, colon
or dash between bytes), decimal and base64 text (at any alignment, standard and URL-safe, also
broken into lines), an exact position also as a binary float or
integer (float64, float32, int32 of 1e-7 degrees; either byte order), and as numbers close
enough to a true position to identify it. It also checks that every message seen
on the broker has its line in the audit ledger. A report (Markdown and JSON) names every leak;
any leak makes the command exit 1.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway.app import Gateway
from gateway.canbus.dbc import ChannelDbcs
from gateway.canbus.replay import ReplaySource, iter_log
from gateway.egress.ledger import read_entries
from gateway.egress.mqtt import make_client, message_queue, subscribe
from gateway.egress.schema import SALT, unpack
from gateway.errors import BrokerError, ConfigError, make_folder
from gateway.localbroker import LocalBroker
from gateway.settings import BrokerSettings, Settings
from gateway.telemetry.location import on_location_grid
from gateway.telemetry.policy import Category, LocationAxis, Policy, load_policy

POSITION_TOLERANCE_DEG = 0.05  # a number this close to a true coordinate identifies the place


# the health message's measures of the gateway's own process, rounded to 0.1: never CAN data
OWN_FIGURES = frozenset({"cpu_percent", "rss_mb", "uptime_s"})


def _coarse(x: float) -> bool:
    """Given to 0.1 or coarser (31.2, 121): the gateway's own figures are like that (CPU
    31.2 %, 121.4 MB), and judged alone as a coordinate, a CPU load that happened to fall in
    the drive's band of latitudes was a false leak; such numbers count only in pairs."""
    return abs(x * 10 - round(x * 10)) <= 1e-9 * max(1.0, abs(x))


@dataclass
class Canaries:
    """What must never leave: exact positions, the VIN, distinctive raw payloads."""

    positions: list[tuple[float, float]] = field(default_factory=list)
    vin: str = ""
    payloads: list[bytes] = field(default_factory=list)


@dataclass
class Observed:
    """One message seen on the broker by the validator."""

    topic: str
    payload: bytes
    retain: bool


@dataclass
class Leak:
    """A problem in a message that left: a canary, a position too precise or sent without
    consent, or bytes with no ledger line."""

    kind: str
    topic: str
    detail: str


def _frames(path: Path) -> Iterator[tuple[float, str, int, bool, bytes]]:
    for b in iter_log(path):
        for i in range(len(b)):
            if b.is_error[i] or b.is_remote[i]:
                continue
            yield (
                float(b.timestamp[i]),
                b.channels[b.channel[i]],
                int(b.arbitration_id[i]),
                bool(b.is_extended[i]),
                bytes(b.data[i, : b.dlc[i]]),
            )


def _candump_line(ts: float, ch: str, fid: int, ext: bool, data: bytes) -> str:
    ident = f"{fid:08X}" if ext else f"{fid:03X}"
    sep = "##0" if len(data) > 8 else "#"
    return f"({ts:.6f}) {ch} {ident}{sep}{data.hex().upper()}\n"


def _location_message(dbcs: ChannelDbcs, policy: Policy) -> Any:
    """The message carrying positions: the one the policy names for location, else (a policy
    that does not treat location as location is exactly what must be caught) the first DBC
    message with a latitude and a longitude signal."""
    rules = policy.location_rules()
    if LocationAxis.LATITUDE in rules and LocationAxis.LONGITUDE in rules:
        msg_name, lat_sig = rules[LocationAxis.LATITUDE].signal.split(".", 1)
        lon_sig = rules[LocationAxis.LONGITUDE].signal.split(".", 1)[1]
        for db in dbcs.all_databases():
            try:
                return db.get_message_by_name(msg_name), lat_sig, lon_sig
            except KeyError:
                continue
    for words in (("latitude", "longitude"), ("lat", "lon"), ("lat", "lng")):
        for db in dbcs.all_databases():
            for m in db.messages:
                lat = [x.name for x in m.signals if words[0] in _name_words(x.name)]
                lon = [x.name for x in m.signals if words[1] in _name_words(x.name)]
                if lat and lon:
                    return m, lat[0], lon[0]
    return None, None, None


def _name_words(name: str) -> set[str]:
    """A signal name's words: GNSS_Lat04F -> {gnss, lat, f}; GPSLatitude04F -> {gps, latitude,
    f}; a word inside another (lateral, longAccel) is not one."""
    return {w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+", name)}


def build_canary_log(
    src: Path, out: Path, dbcs: ChannelDbcs, policy: Policy, seed: int = 7
) -> tuple[Canaries, list[tuple[float, float]], int]:
    """Copy ``src`` to ``out`` (candump) with canary frames spread through it. Returns the
    canaries, every true position in the log (decoded), and the frame count."""
    rng = random.Random(seed)
    frames = list(_frames(src))
    if not frames:
        raise ConfigError(f"{src}: no frames to validate with")
    t0, t1 = frames[0][0], frames[-1][0]
    channel = frames[0][1]
    can = Canaries(
        vin="CANARY" + "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ0123456789") for _ in range(11))
    )
    extra: list[tuple[float, str, int, bool, bytes]] = []
    loc_msg, lat_sig, lon_sig = _location_message(dbcs, policy)
    true_positions: list[tuple[float, float]] = []
    if loc_msg is not None:
        for _, _, fid, _, data in frames:
            if fid == loc_msg.frame_id:
                try:
                    v = loc_msg.decode(data, decode_choices=False, allow_truncated=True)
                    true_positions.append((float(v[lat_sig]), float(v[lon_sig])))
                except Exception:  # a damaged frame carries no position
                    continue
        base = true_positions[len(true_positions) // 2] if true_positions else (30.0, 120.0)
        for i in range(12):
            lat = round(base[0] + rng.uniform(-0.3, 0.3), 6)
            lon = round(base[1] + rng.uniform(-0.3, 0.3), 6)
            can.positions.append((lat, lon))
            ts = t0 + (t1 - t0) * (i + 0.5) / 12
            fields = {s.name: (s.initial or 0) for s in loc_msg.signals}
            fields.update({lat_sig: lat, lon_sig: lon})
            try:
                data = loc_msg.encode(fields, strict=False)
            except Exception as exc:  # noqa: BLE001 - cantools raises assorted errors here
                raise ConfigError(
                    f"validate: cannot write canary positions into {loc_msg.name} with this "
                    f"DBC ({type(exc).__name__}: {exc})"
                ) from exc
            extra.append((ts, channel, loc_msg.frame_id, loc_msg.is_extended_frame, data))
    # the VIN, and distinctive raw payloads, on an id no DBC knows and on ids the policy denies
    vin_bytes = can.vin.encode()
    unknown = next(
        i for i in range(0x6F0, 0x7FF) if not any(_has_id(db, i) for db in dbcs.all_databases())
    )
    denied = [
        m
        for db in dbcs.all_databases()
        for m in db.messages
        if m.length == 8
        and not any(f"{m.name}.{s.name}" in policy.wanted_signals() for s in m.signals)
    ][:3]
    for k in range(0, len(vin_bytes), 7):
        extra.append((t0 + 0.01 * k, channel, unknown, False, bytes([k]) + vin_bytes[k : k + 7]))
    for i in range(24):
        payload = bytes(rng.randrange(256) for _ in range(8))
        can.payloads.append(payload)
        fid = unknown if i % 2 == 0 or not denied else denied[i % len(denied)].frame_id
        extra.append((t0 + (t1 - t0) * (i + 0.25) / 24, channel, fid, fid > 0x7FF, payload))
    merged = sorted(frames + extra, key=lambda f: f[0])
    with open(out, "w") as fh:
        fh.writelines(_candump_line(*f) for f in merged)
    return can, true_positions + can.positions, len(merged)


def _has_id(db: Any, fid: int) -> bool:
    try:
        db.get_message_by_frame_id(fid)
        return True
    except KeyError:
        return False


def _numbers(obj: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """(where, number) for every number in a payload, numbers written as text included."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, int | float):
        yield path, float(obj)
    elif isinstance(obj, str):
        for tok in obj.replace(",", " ").split():
            try:
                yield path, float(tok)
            except ValueError:
                continue
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(k, f"{path}.{k}".lstrip("."))
            yield from _numbers(v, f"{path}.{k}".lstrip("."))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


def _grid_values(body: Any, grid_m: float) -> set[float]:
    """Numbers that are legitimately coarsened positions (location payloads, trip areas)."""
    out: set[float] = set()
    if not isinstance(body, dict):
        return out
    pairs = []
    if body.get("schema") == "gateway.location":
        pairs.append((body.get("lat"), body.get("lon")))
    for key in ("start_area", "end_area"):
        if isinstance(body.get(key), dict):
            pairs.append((body[key].get("lat"), body[key].get("lon")))
    for lat, lon in pairs:
        if (
            isinstance(lat, int | float)
            and isinstance(lon, int | float)
            and on_location_grid(float(lat), float(lon), grid_m)
        ):
            out.update((float(lat), float(lon)))
    return out


def search(
    observed: list[Observed],
    canaries: Canaries,
    positions: list[tuple[float, float]],
    location_consent: bool,
    grid_m: float,
) -> list[Leak]:
    leaks: list[Leak] = []
    coords = np.array(sorted({c for p in positions for c in p}))
    # a true position as integers of 1e-5, 1e-6 or 1e-7 degrees (E5/E6/E7, as GPS receivers
    # and many DBCs carry it), to the last digit: 31221968 is 31.221968 deg. Judged as a pair,
    # a latitude and the longitude of the same position in one message: over a drive's few
    # square kilometres, single integers of that size fall on some coordinate far too often
    # (a frame count, an odometer in metres)
    scaled: tuple[dict[int, set[int]], dict[int, set[int]]] = ({}, {})
    for i, pos in enumerate(positions):
        for axis in (0, 1):
            for k in (5, 6, 7):
                for d in (-1, 0, 1):
                    scaled[axis].setdefault(round(pos[axis] * 10.0**k) + d, set()).add(i)
    lats = np.array([p[0] for p in positions], np.float64)
    lons = np.array([p[1] for p in positions], np.float64)
    text_needles = [canaries.vin.encode(), *_base64_forms(canaries.vin.encode())]
    binary_needles: list[tuple[bytes, str]] = []
    for lat, lon in canaries.positions:
        text_needles += [
            f"{lat:.6f}".encode(),
            f"{lon:.6f}".encode(),
            str(round(lat * 1e6)).encode(),
            str(round(lon * 1e6)).encode(),
        ]
        for x in (lat, lon):
            binary_needles += [(form, f"{x!r} as {how}") for how, form in _binary_forms(x)]
    payload_forms = [(raw, _hex_forms(raw), _base64_forms(raw)) for raw in canaries.payloads]
    vin_base64 = _base64_forms(canaries.vin.encode())
    for m in observed:
        blob = m.topic.encode() + b"\x00" + _unsalted(m.payload)
        lines = _unbroken(blob)  # base64 (e-mail breaks it every 76 characters) or hex in lines
        for raw, hexes, b64 in payload_forms:
            if raw in blob or any(f in lines for f in hexes) or any(f in lines for f in b64):
                leaks.append(Leak("raw CAN payload", m.topic, f"canary payload {raw.hex()}"))
        for needle in text_needles:
            if needle in blob or (needle in vin_base64 and needle in lines):
                leaks.append(Leak("canary text", m.topic, f"{needle.decode()!r} appears"))
        for needle, what in binary_needles:
            if needle in blob:
                leaks.append(Leak("canary position, binary", m.topic, f"{what} appears"))
        try:
            body = unpack(m.payload)
        except Exception:  # not ours: judged by the byte search above only
            continue
        allowed = _grid_values(body, grid_m) if location_consent else set()
        why = (
            "position without location consent"
            if not location_consent
            else "position finer than the policy grid"
        )
        coarse: list[tuple[str, float]] = []
        ints: list[tuple[str, int]] = []  # integers that may be a position's E5/E6/E7
        for where, x in _numbers(body):
            if coords.size == 0 or not np.isfinite(x) or x in allowed:
                continue
            if abs(x) >= 1e5 and x == int(x):
                ints.append((where, int(x)))
                continue
            near = np.min(np.abs(coords - x))
            if near >= POSITION_TOLERANCE_DEG:
                continue
            if _coarse(x):  # judged only as one of a latitude/longitude pair, below
                if where.rsplit(".", 1)[-1] not in OWN_FIGURES:
                    coarse.append((where, x))
                continue
            leaks.append(
                Leak(why, m.topic, f"{where} = {x!r} is {near:.6f} deg from a true coordinate")
            )
        leaks += _coarse_pairs(coarse, lats, lons, why, m.topic)
        leaks += _scaled_pairs(ints, scaled, positions, why, m.topic)
    return leaks


def _hex_forms(raw: bytes) -> list[bytes]:
    """``raw`` as hex text, either case, unseparated or with a space, colon or dash between
    bytes (as candump, Wireshark and many loggers print it)."""
    text = raw.hex()
    forms = [text] + [raw.hex(sep) for sep in " :-"] if len(raw) > 1 else [text]
    return [f.encode() for form in forms for f in (form, form.upper())]


def _unbroken(blob: bytes) -> bytes:
    """``blob`` without line breaks and other white space, also as JSON escapes them (``\\n``),
    and with JSON's ``\\/`` as ``/``: base64 or hex broken into lines reads whole again."""
    if not any(c in blob for c in (b"\n", b"\r", b"\\n", b"\\r", b"\\/")):
        return blob
    blob = blob.replace(b"\\r", b"").replace(b"\\n", b"").replace(b"\\/", b"/")
    return b"".join(blob.split())


def _base64_forms(raw: bytes) -> list[bytes]:
    """``raw`` as it reads inside any base64 text, standard or URL-safe: base64 encodes 3 bytes
    as 4 characters, so bytes that start 0, 1 or 2 bytes into a group read differently; of each
    alignment, the characters that ``raw`` alone decides (those shared with the bytes around
    it are left out). Nothing for fewer than 6 bytes: a needle that short would be found by
    chance."""
    if len(raw) < 6:
        return []
    forms = []
    for shift in (0, 1, 2):
        text = base64.b64encode(bytes(shift) + raw)
        first = -(-8 * shift // 6)  # the first character made of raw's bits alone
        last = 8 * (shift + len(raw)) // 6  # past the last one
        form = text[first:last]
        forms += [form, form.translate(_URL_SAFE)]
    return list(dict.fromkeys(forms))


_URL_SAFE = bytes.maketrans(b"+/", b"-_")
_ULPS = 3  # float64 neighbours searched on either side of an exact coordinate


_SALT_FORM = re.compile(rb"\xd9\x20([0-9a-f]{32})")  # msgpack's str8 of 32 characters


def _unsalted(payload: bytes) -> bytes:
    """``payload`` with its salt (``schema.SALT``: 32 random hex digits) made zeros: random
    bytes where a 4-byte needle (a float32 coordinate) matches once in ~10^9 messages are not
    searched. Only a salt of that exact form, where msgpack puts the value of a key "salt", is
    made zeros, and only if it is the message's salt; anything else in it is searched as every
    other byte."""
    key = b"\xa4salt"
    at = payload.find(key)
    while at >= 0:
        m = _SALT_FORM.match(payload, at + len(key))
        if m:
            try:
                salt = unpack(payload).get(SALT)
            except Exception:  # not ours: every byte is searched
                return payload
            if salt == m.group(1).decode():
                return payload[: m.start(1)] + b"0" * 32 + payload[m.end(1) :]
        at = payload.find(key, at + 1)
    return payload


def _binary_forms(x: float) -> list[tuple[str, bytes]]:
    """An exact coordinate as a program may pack it: float64 and float32, and int32 of 1e-7
    degrees (as GPS receivers carry it), each in either byte order. As float64, also the
    numbers a few units in the last place off: decoded from the DBC's integer and scale
    (121337214 * 1e-6 is 121.33721399999999, not 121.337214), a canary is seldom the very
    float it was written as."""
    e7 = round(x * 1e7)
    near = [x]
    for _ in range(_ULPS):
        near = [math.nextafter(near[0], -math.inf), *near, math.nextafter(near[-1], math.inf)]
    forms = [("float64", struct.pack(order, v)) for v in near for order in ("<d", ">d")]
    forms += [("float32", struct.pack("<f", x)), ("float32", struct.pack(">f", x))]
    if -(2**31) <= e7 < 2**31:
        forms += [("int32 of 1e-7 deg", struct.pack("<i", e7))]
        forms += [("int32 of 1e-7 deg", struct.pack(">i", e7))]
    return forms


def _scaled_pairs(
    found: list[tuple[str, int]],
    scaled: tuple[dict[int, set[int]], dict[int, set[int]]],
    positions: list[tuple[float, float]],
    why: str,
    topic: str,
) -> list[Leak]:
    """A latitude and the longitude of one true position, both as integers of 1e-5 to 1e-7
    degrees, in one message."""
    for wa, a in found:
        for wb, b in found:
            both = scaled[0].get(a, set()) & scaled[1].get(b, set())
            if wa != wb and both:
                lat, lon = positions[min(both)]
                return [
                    Leak(
                        why,
                        topic,
                        f"{wa} = {a} and {wb} = {b} are the true position {lat}, {lon} in "
                        "integer units of 1e-5 to 1e-7 degrees",
                    )
                ]
    return []


def _coarse_pairs(
    found: list[tuple[str, float]], lats: Any, lons: Any, why: str, topic: str
) -> list[Leak]:
    """Numbers given to 0.1 or coarser that make a latitude and a longitude of one true position
    together (a CPU load alone that falls in the drive's band of latitudes is no position; 31.2
    and 121.5 side by side place the car within about 11 km)."""
    for i, (wa, a) in enumerate(found):
        for j, (wb, b) in enumerate(found):
            if i == j:
                continue
            pair = (np.abs(lats - a) < POSITION_TOLERANCE_DEG) & (
                np.abs(lons - b) < POSITION_TOLERANCE_DEG
            )
            if pair.any():
                return [Leak(why, topic, f"{wa} = {a!r} and {wb} = {b!r} make a true position")]
    return []


class _Observer:
    """Subscribes to everything on the broker, as an independent observer: anonymous (with
    TLS and its CA when the broker URL is mqtts://)."""

    def __init__(self, broker: BrokerSettings) -> None:
        self.messages: list[Observed] = []
        self._ready, self._stop = threading.Event(), threading.Event()
        self._broker = dataclasses.replace(broker, username="", password="", password_file="")
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            why = f": {self._error}" if self._error is not None else ""
            raise BrokerError(f"validate: cannot subscribe to # on {broker.url}{why}")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # noqa: BLE001 - said by __init__ as one line, not a traceback
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        async with make_client(self._broker, identifier=None) as client:
            await subscribe(client, "#")
            self._ready.set()
            async with message_queue(client) as incoming:
                while not self._stop.is_set():
                    try:
                        m = await incoming.get(0.1)
                    except TimeoutError:
                        continue
                    payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                    self.messages.append(Observed(str(m.topic), payload, bool(m.retain)))

    def stop(self, quiet: float = 0.7) -> list[Observed]:
        n = -1
        while len(self.messages) != n:
            n = len(self.messages)
            time.sleep(quiet)
        self._stop.set()
        self._thread.join(5)
        return self.messages


@dataclass
class ValidateResult:
    """The validator's verdict: the leaks found and the run's report."""

    leaks: list[Leak]
    report: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.leaks


def run_validation(
    settings: Settings,
    log: Path,
    out_dir: Path,
    *,
    policy: Policy | None = None,
    broker_url: str | None = None,
) -> ValidateResult:
    make_folder(out_dir, "report folder")
    policy = policy or load_policy(settings.gateway.policy or None)
    dbcs = ChannelDbcs.from_specs(settings.dbc)
    canary_log = out_dir / "canary-drive.log"
    canaries, positions, n_frames = build_canary_log(log, canary_log, dbcs, policy)
    broker = None
    if broker_url is None:
        broker = LocalBroker()
        broker.start()
        broker_url = broker.url
    try:
        # validate's own broker is plain and open: the config's TLS and login are not for it
        bench = (
            dataclasses.replace(
                settings.broker,
                url=broker_url,
                tls_ca="",
                tls_insecure=False,
                username="",
                password="",
                password_file="",
            )
            if broker is not None
            # a client id of its own on a broker a gateway of this VIN may be connected to:
            # with the same id (gateway-VIN), the broker closes the other's connection
            else dataclasses.replace(
                settings.broker,
                url=broker_url,
                client_id=settings.broker.client_id
                or f"gateway-{settings.gateway.vin}-validate-{os.getpid()}",
            )
        )
        s = dataclasses.replace(
            settings,
            broker=bench,
            gateway=dataclasses.replace(
                settings.gateway,
                ledger=str(out_dir / "ledger.jsonl"),
                outbox=str(out_dir / "outbox.sqlite"),
                state_dir=str(out_dir),
            ),
        )
        for stale in (out_dir / "ledger.jsonl", out_dir / "outbox.sqlite"):
            stale.unlink(missing_ok=True)
        observer = _Observer(s.broker)
        source = ReplaySource([canary_log], speed=None)
        gw = Gateway(s, [source], policy=policy)
        location_consent = gw.consent.ok(Category.LOCATION, time.time())
        run = asyncio.run(gw.run(drain_timeout=30))
        # a retained message delivered on subscribing was on the broker before this run (another
        # vehicle's status, an earlier run's): not this run's egress, and not judged
        observed = [m for m in observer.stop() if not m.retain]
    finally:
        if broker is not None:
            broker.close()
    leaks = search(observed, canaries, positions, location_consent, policy.location_grid_m)
    # every byte on the broker must have its line in the ledger
    ledgered: dict[str, dict[str, Any]] = {}
    blocked: list[dict[str, Any]] = []
    for _, entry, _ in read_entries(out_dir / "ledger.jsonl"):
        if entry and entry.get("kind") == "egress":
            ledgered[entry["sha256"]] = entry
        elif entry and entry.get("kind") == "blocked":
            blocked.append({"schema": entry.get("schema"), "reason": entry.get("reason")})
    classes: Counter[str] = Counter()
    bytes_by_class: Counter[str] = Counter()
    for m in observed:
        entry = ledgered.get(hashlib.sha256(m.payload).hexdigest())
        if entry is None:
            leaks.append(
                Leak("unledgered egress", m.topic, f"{len(m.payload)} bytes with no ledger entry")
            )
            continue
        key = f"{entry['schema']} [{', '.join(entry.get('rules') or ['-'])}]"
        classes[key] += 1
        bytes_by_class[key] += len(m.payload)
    bytes_out = sum(len(m.payload) for m in observed)
    report = {
        "verdict": ("no leak" if positions else "no leak found, positions NOT checked")
        if not leaks
        else "LEAK",
        "input": str(log),
        "canary_log": str(canary_log),
        "frames_in": n_frames,
        "raw_bytes_in": run.raw_bytes,
        "messages_out": len(observed),
        "bytes_out": bytes_out,
        "bytes_out_share": round(bytes_out / run.raw_bytes, 6) if run.raw_bytes else None,
        "policy": policy.ident,
        "location_consent": location_consent,
        # fixes of the drive held back inside each fence (with location consent): a fence the
        # drive passes through that holds none is not where it was meant to be
        "geofences": dict(getattr(run, "positions_by_fence", {}) or {}),
        "canaries": {
            "positions": len(canaries.positions),
            "vin": canaries.vin,
            "raw_payloads": len(canaries.payloads),
            "true_positions_checked": len(positions),
        },
        "egress_by_schema_and_rule": {
            k: {"messages": classes[k], "bytes": bytes_by_class[k]} for k in sorted(classes)
        },
        "blocked": blocked,
        "leaks": [dataclasses.asdict(x) for x in leaks[:200]],
        "leak_count": len(leaks),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(_markdown(report))
    return ValidateResult(leaks, report)


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Residency validation: **{r['verdict']}**",
        "",
        f"- input: `{r['input']}` with canaries injected (`{r['canary_log']}`)",
        f"- policy: `{r['policy']}`; location consent during the run: {r['location_consent']}",
        *(
            [
                "- GPS fixes of the drive inside each geofence (held back): "
                + ", ".join(f"{k} {v:,}" for k, v in r["geofences"].items())
                + " (a fence the drive passes through that holds none is not where it was meant)"
            ]
            if r.get("geofences")
            else []
        ),
        f"- in: {r['frames_in']:,} CAN frames, {r['raw_bytes_in']:,} payload bytes",
        f"- out: {r['messages_out']} MQTT messages, {r['bytes_out']:,} bytes "
        f"({(r['bytes_out_share'] or 0) * 100:.3f}% of the bytes in), seen by an observer "
        "subscribed to `#`",
        f"- canaries searched for in every byte out: {r['canaries']['positions']} exact GPS "
        f"points (plus {r['canaries']['true_positions_checked'] - r['canaries']['positions']} "
        f"true positions of the drive, within {POSITION_TOLERANCE_DEG} deg, numbers given "
        "to 0.1 or coarser excepted), the VIN "
        f"`{r['canaries']['vin']}`, {r['canaries']['raw_payloads']} distinctive raw payloads "
        "(as bytes, hex, decimal and base64; positions also as binary numbers)",
        "",
        "## Egress by schema and rule",
        "",
        "| schema [rules] | messages | bytes |",
        "|---|---|---|",
    ]
    for k, v in r["egress_by_schema_and_rule"].items():
        lines.append(f"| {k} | {v['messages']} | {v['bytes']} |")
    lines += ["", f"## Blocked by the guard: {len(r['blocked'])}", ""]
    lines += [f"- {b['schema']}: {b['reason']}" for b in r["blocked"][:50]]
    lines += ["", f"## Leaks: {r['leak_count']}", ""]
    lines += [f"- **{x['kind']}** on `{x['topic']}`: {x['detail']}" for x in r["leaks"]]
    if not r["leaks"]:
        lines.append("None: no canary, no position, no raw payload, no unledgered byte left.")
    return "\n".join(lines) + "\n"
