"""What may travel on the owner channel: topics, payload schemas, and msgpack encoding.

Topic layout (``PREFIX`` defaults to ``vehicles``)::

    PREFIX/VIN/owner/status        retained  online/offline (also the MQTT last will)
    PREFIX/VIN/owner/signals                 window summaries of permitted signals
    PREFIX/VIN/owner/location                coarsened positions (only with consent)
    PREFIX/VIN/owner/trips                   trip summaries
    PREFIX/VIN/owner/camera                  camera summaries (counts, never pixels)
    PREFIX/VIN/owner/health                  gateway health
    PREFIX/VIN/owner/ledger                  periodic digest of the audit ledger
    PREFIX/VIN/owner/consent       retained  current consent and collection state
    PREFIX/VIN/owner/consent/set   inbound   owner grants / withdraws consent
    PREFIX/VIN/owner/command       inbound   owner stop / resume / delete

Every payload is a msgpack map with ``schema`` and ``v``; stream payloads carry ``seq``, a
per-vehicle sequence number that survives restarts, so the owner can drop redeliveries, and
``salt``, 32 random hex digits (see ``SALT``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack


class Stream(Enum):
    STATUS = "status"
    SIGNALS = "signals"
    LOCATION = "location"
    TRIPS = "trips"
    CAMERA = "camera"
    HEALTH = "health"
    LEDGER = "ledger"
    CONSENT = "consent"


INBOUND = ("consent/set", "command")


@dataclass(frozen=True)
class Topics:
    """The owner channel's topic names for one vehicle."""

    prefix: str
    vin: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.vin}/owner"

    def stream(self, stream: Stream) -> str:
        return f"{self.base}/{stream.value}"

    def stream_name(self, name: str) -> str:
        return f"{self.base}/{name}"

    @property
    def consent_set(self) -> str:
        return f"{self.base}/consent/set"

    @property
    def command(self) -> str:
        return f"{self.base}/command"

    @property
    def all(self) -> str:
        return f"{self.base}/#"


@dataclass(frozen=True)
class Schema:
    """The fields one kind of outgoing message may carry, and their types."""

    name: str
    version: int
    stream: Stream
    fields: Mapping[str, type | tuple[type, ...]]
    sequenced: bool = True
    retained: bool = False


_NUM = (int, float)
SCHEMAS: dict[str, Schema] = {
    s.name: s
    for s in (
        Schema(
            "gateway.status",
            1,
            Stream.STATUS,
            {"state": str, "at": _NUM, "reason": str, "collection": str},
            sequenced=False,
            retained=True,
        ),
        Schema(
            "gateway.signals", 1, Stream.SIGNALS, {"window": list, "policy": str, "signals": dict}
        ),
        Schema(
            "gateway.location",
            1,
            Stream.LOCATION,
            {
                "window": list,
                "policy": str,
                "lat": _NUM,
                "lon": _NUM,
                "grid_m": _NUM,
                "consent_until": _NUM,
            },
        ),
        Schema(
            "gateway.trip",
            1,
            Stream.TRIPS,
            {
                "window": list,
                "policy": str,
                "start": _NUM,
                "end": _NUM,
                "duration_s": _NUM,
                "distance_km": _NUM,
                "energy_kwh": _NUM,
                "avg_speed_kph": _NUM,
                "start_area": dict,
                "end_area": dict,
            },
        ),
        Schema(
            "gateway.camera",
            1,
            Stream.CAMERA,
            {
                "window": list,
                "policy": str,
                "camera": str,
                "frames_seen": int,
                "frames_anonymised": int,
                "frames_dropped": int,
                "faces_blurred": int,
                "plates_blurred": int,
                "fps": _NUM,
                "health": str,
            },
        ),
        Schema(
            "gateway.health",
            1,
            Stream.HEALTH,
            {
                "at": _NUM,
                "uptime_s": _NUM,
                "frames_per_s": dict,
                "frames": int,
                "bad_frames": int,
                "decode_errors": int,
                "unknown_ids": int,
                "dropped_frames": int,
                "outbox_depth": int,
                "reconnects": int,
                "blocked": int,
                "cpu_percent": _NUM,
                "rss_mb": _NUM,
                "storage": str,
            },
        ),
        Schema("gateway.ledger", 1, Stream.LEDGER, {"at": _NUM, "entries": int, "head": str}),
        Schema(
            "gateway.consent",
            1,
            Stream.CONSENT,
            {"at": _NUM, "collection": str, "grants": dict, "last_change": dict},
            sequenced=False,
            retained=True,
        ),
    )
}

# the random hex of a sequenced message (``EgressGuard.release``): what makes its sha256 in the
# audit ledger a commitment that cannot be searched for by trying the values it may hold
SALT = "salt"
HEADER_FIELDS = ("schema", "v", "seq", SALT)


def pack(body: Mapping[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def unpack(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False, strict_map_key=True)
