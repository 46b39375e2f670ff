"""The on-device frame store: a bounded ring buffer of anonymised frames with a retention period.

Only ``AnonymisedFrame`` values are accepted, so an unblurred frame cannot be written by mistake;
a frame is written to a temporary name and renamed, so a crash never leaves a partial file.
Nothing here talks to the network: frames stay on the device.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import cv2

from gateway.camera.anonymize import AnonymisedFrame
from gateway.datarights import FRAME_FILE
from gateway.errors import StorageError, make_folder

log = logging.getLogger("gateway.camera.store")


@dataclass(frozen=True)
class StoreSettings:
    """How many anonymised frames the on-device store keeps, for how long and how often."""

    max_frames: int = 600  # per camera
    retention_s: float = 24 * 3600.0
    every_s: float = 1.0  # keep at most one frame per this many seconds of video time
    quality: int = 85


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name) or "camera"


class FrameStore:
    """``DIR/CAMERA-SEQ-UNIXTIME.jpg``; the oldest go first when over ``max_frames`` or older than
    ``retention_s``. ``now`` is always a parameter (wall-clock seconds)."""

    def __init__(self, directory: str | Path, camera: str, settings: StoreSettings) -> None:
        self.dir = Path(directory)
        self.camera = _safe(camera)
        self.settings = settings
        make_folder(self.dir, "frame store")
        seqs = [int(m["seq"]) for _, m in self._entries()]
        self._seq = max(seqs, default=-1) + 1
        self._last_t: float | None = None
        self.written = 0

    def _entries(self) -> list[tuple[Path, re.Match[str]]]:
        out = []
        for p in self.dir.iterdir():
            m = FRAME_FILE.match(p.name)
            if m and m["camera"] == self.camera:
                out.append((p, m))
        out.sort(key=lambda e: int(e[1]["seq"]))
        return out

    def due(self, t: float) -> bool:
        """Whether a frame at video time ``t`` would be kept (the store keeps one per
        ``every_s``); lets the caller skip encoding frames that would not be kept."""
        return self._last_t is None or t - self._last_t >= self.settings.every_s or t < self._last_t

    def put(self, frame: AnonymisedFrame, now: float) -> Path | None:
        if not isinstance(frame, AnonymisedFrame):
            raise TypeError("the frame store only accepts anonymised frames")
        if not self.due(frame.t):
            return None
        ok, data = cv2.imencode(
            ".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, self.settings.quality]
        )
        if not ok:
            raise StorageError(f"{self.dir}: could not encode frame {frame.index}")
        path = self.dir / f"{self.camera}-{self._seq:09d}-{int(now)}.jpg"
        tmp = path.with_suffix(".part")
        try:
            tmp.write_bytes(data.tobytes())
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"{path}: cannot write the frame ({exc.strerror})") from exc
        self._seq += 1
        self._last_t = frame.t
        self.written += 1
        self.prune(now)
        return path

    def prune(self, now: float) -> int:
        """Remove frames over the count or past the retention period; returns how many."""
        entries = self._entries()
        over = max(0, len(entries) - self.settings.max_frames)
        removed = 0
        for i, (p, m) in enumerate(entries):
            if i < over or now - int(m["at"]) > self.settings.retention_s:
                try:
                    p.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def frames(self) -> list[Path]:
        return [p for p, _ in self._entries()]
