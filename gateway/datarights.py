"""Local data rights: export and delete what the gateway keeps on the device."""

from __future__ import annotations

from gateway.egress.outbox import Outbox
from gateway.egress.schema import unpack
from gateway.telemetry.policy import Category

# which waiting messages carry each category's data
_SCHEMAS_BY_CATEGORY = {
    Category.LOCATION: {"gateway.location", "gateway.trip"},
    Category.VEHICLE_STATUS: {"gateway.signals"},
    Category.DRIVING_BEHAVIOUR: {"gateway.signals", "gateway.trip"},
    Category.EXTERIOR_CAMERA: {"gateway.camera"},
}


def delete_category(outbox: Outbox, category: Category | None) -> int:
    """Remove waiting messages holding ``category`` (all when None); returns how many."""
    if category is None:
        return outbox.delete_all()
    schemas = _SCHEMAS_BY_CATEGORY.get(category, set())
    doomed = [p for p in outbox.peek(10**9) if p.schema in schemas]
    for p in doomed:
        outbox.ack(p)
    return len(doomed)


def export_outbox(outbox: Outbox) -> list[dict[str, object]]:
    out = []
    for p in outbox.peek(10**9):
        try:
            body = unpack(p.payload)
        except Exception:  # a damaged row is exported as such
            body = {"error": "undecodable"}
        out.append({"topic": p.topic, "seq": p.seq, "created": p.created, "body": body})
    return out
