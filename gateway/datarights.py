"""Local data rights: export and delete what the gateway keeps on the device."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from gateway.egress.outbox import Outbox, Withdrawn
from gateway.egress.schema import unpack
from gateway.telemetry.policy import Category

# CAMERA-SEQ-UNIXTIME.jpg: the name of every frame the camera's store keeps
FRAME_FILE = re.compile(r"^(?P<camera>[\w.-]+)-(?P<seq>\d{9})-(?P<at>\d+)\.jpg$")

# the messages that may carry each category's data, for rows an outbox of an older version
# wrote, which did not keep their categories: a summary of signals may hold a signal of any
# category but the camera's (the policy of its day is not known here); gone with the rest
_LEGACY_SCHEMAS = {
    Category.LOCATION: {"gateway.location", "gateway.trip", "gateway.signals"},
    Category.VEHICLE_STATUS: {"gateway.signals"},
    Category.DRIVING_BEHAVIOUR: {"gateway.signals", "gateway.trip"},
    Category.CABIN: {"gateway.signals"},
    Category.BIOMETRIC: {"gateway.signals"},
    Category.EXTERIOR_CAMERA: {"gateway.camera"},
}


def delete_category(outbox: Outbox, category: Category | None) -> Withdrawn:
    """Remove waiting messages holding data of ``category`` (all when None): each one's seq
    and digest, and those of them already handed to the MQTT client in the batch being sent
    (they may leave). A batch a publisher read before sends none of the others
    (``Outbox.withdraw``). The outbox is read a row at a time: a week's backlog is not held in
    memory. Each message's categories are those the egress guard found in it: a summary of
    signals goes if any of its signals is of ``category`` (under the policy it was made by)."""
    if category is None:
        return outbox.withdraw_category(None)
    return outbox.withdraw_category(category.value, _LEGACY_SCHEMAS[category])


def on_record(deleted: Withdrawn) -> dict[str, Any]:
    """What the ledger keeps of deleted messages: each one's seq and payload's sha256, as for
    the messages it drops (an egress line is then told apart from a message that never left),
    and the seqs of those already handed to the MQTT client when the delete came (they may
    have left)."""
    return {
        "seqs": deleted.seqs,
        "sha256": deleted.sha256,
        **({"in_flight": deleted.in_flight} if deleted.in_flight else {}),
    }


def export_outbox(outbox: Outbox) -> Iterator[dict[str, object]]:
    """Each waiting message as the export shows it, read from the outbox one at a time."""
    for p in outbox.each_waiting():
        try:
            body = unpack(p.payload)
        except Exception:  # a damaged row is exported as such
            body = {"error": "undecodable"}
        yield {"topic": p.topic, "seq": p.seq, "created": p.created, "body": body}


def write_export(out: TextIO, fields: dict[str, Any], outbox: Iterable[Any]) -> int:
    """``fields`` with ``"outbox": [...]`` after the first of them, as ``json.dumps(...,
    indent=1)`` writes it, the outbox's items written one at a time (a week's backlog is not
    held in memory as objects, nor as text). How many items were written."""
    items = iter(fields.items())
    key, value = next(items)
    out.write(f'{{\n {json.dumps(key)}: {_nested(value)},\n "outbox": [')
    n = 0
    for item in outbox:
        out.write(("\n" if n == 0 else ",\n") + _nested(item, "  ", first=True))
        n += 1
    out.write("\n ]" if n else "]")
    for key, value in items:
        out.write(f",\n {json.dumps(key)}: {_nested(value)}")
    out.write("\n}\n")
    return n


def _nested(value: Any, indent: str = " ", first: bool = False) -> str:
    """``value`` as ``json.dumps(indent=1)`` writes it at the depth ``indent`` gives."""
    text = json.dumps(value, indent=1, default=str).replace("\n", "\n" + indent)
    return indent + text if first else text


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
