"""Local data rights: export and delete what the gateway keeps on the device."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.egress.outbox import Outbox, Pending
from gateway.egress.schema import unpack
from gateway.telemetry.policy import Category

# CAMERA-SEQ-UNIXTIME.jpg: the name of every frame the camera's store keeps
FRAME_FILE = re.compile(r"^(?P<camera>[\w.-]+)-(?P<seq>\d{9})-(?P<at>\d+)\.jpg$")

# which waiting messages carry each category's data
_SCHEMAS_BY_CATEGORY = {
    Category.LOCATION: {"gateway.location", "gateway.trip"},
    Category.VEHICLE_STATUS: {"gateway.signals"},
    Category.DRIVING_BEHAVIOUR: {"gateway.signals", "gateway.trip"},
    Category.EXTERIOR_CAMERA: {"gateway.camera"},
}


def delete_category(
    outbox: Outbox, category: Category | None
) -> tuple[list[Pending], list[Pending]]:
    """Remove waiting messages holding ``category`` (all when None): returns them, and those
    of them already handed to the MQTT client in the batch being sent (they may leave). A
    batch a publisher read before sends none of the others (``Outbox.withdraw``)."""
    doomed = outbox.peek(10**9)
    if category is not None:
        schemas = _SCHEMAS_BY_CATEGORY.get(category, set())
        doomed = [p for p in doomed if p.schema in schemas]
    flying = outbox.sent_or_sending(doomed)
    outbox.withdraw(doomed)
    return doomed, flying


def on_record(items: Sequence[Pending], in_flight: Sequence[Pending] = ()) -> dict[str, Any]:
    """What the ledger keeps of deleted messages: each one's seq and payload's sha256, as for
    the messages it drops (an egress line is then told apart from a message that never left),
    and the seqs of those already handed to the MQTT client when the delete came (they may
    have left)."""
    return {
        "seqs": [p.seq for p in items],
        "sha256": [hashlib.sha256(p.payload).hexdigest() for p in items],
        **({"in_flight": [p.seq for p in in_flight]} if in_flight else {}),
    }


def export_outbox(outbox: Outbox) -> list[dict[str, object]]:
    out = []
    for p in outbox.peek(10**9):
        try:
            body = unpack(p.payload)
        except Exception:  # a damaged row is exported as such
            body = {"error": "undecodable"}
        out.append({"topic": p.topic, "seq": p.seq, "created": p.created, "body": body})
    return out


def stored_frames(folder: Path) -> list[Path]:
    """The anonymised frames the camera stages keep in ``folder`` (every camera's)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if FRAME_FILE.match(p.name) and p.is_file())


def export_frames(folder: Path) -> dict[str, Any]:
    """What the export says of the stored frames: where they are and each file (the images
    stay files, to be copied from there; they are anonymised, as every frame the store takes)."""
    files = []
    for p in stored_frames(folder):
        m = FRAME_FILE.match(p.name)
        assert m is not None
        files.append(
            {"file": p.name, "camera": m["camera"], "at": int(m["at"]), "bytes": p.stat().st_size}
        )
    return {"folder": str(folder), "files": files}


def delete_frames(folder: Path, category: Category | None) -> tuple[int, int]:
    """Remove the stored frames for ``category`` (exterior_camera, or all when None): how many
    were removed, and how many could not be (no permission, a read-only disk): said and
    recorded by the caller, never a reason to leave the rest or the record undone."""
    if category not in (None, Category.EXTERIOR_CAMERA):
        return 0, 0
    removed = failed = 0
    for p in [*stored_frames(folder), *folder.glob("*.part")] if folder.is_dir() else []:
        try:
            p.unlink()
            removed += p.suffix == ".jpg"
        except FileNotFoundError:
            pass
        except OSError:
            failed += 1
    return removed, failed
