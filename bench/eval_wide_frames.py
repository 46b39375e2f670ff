"""Recall of the stream's detectors (their defaults) on wide camera frames: each labelled photo
of ``../shared/data/vision`` at its own size in the bottom-right corner of a grey WxH frame, as
a wide camera sees a small face or plate; a box counts as found at IoU >= 0.3. Skipped, with a
message and exit status 0, when the data folder is absent.

    .venv/bin/python bench/eval_wide_frames.py [--sizes 1280x720,1920x1080,3840x2160]
        [--step 3] [--fixed]

``--fixed``: the detectors at 640/960 px whatever the frame's width (before stream_width).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_anonymisation import iou  # noqa: E402
from gateway.camera import detect  # noqa: E402
from gateway.camera.options import DetectorSettings  # noqa: E402

VISION = ROOT.parent / "shared" / "data" / "vision"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1280x720,1920x1080,3840x2160")
    ap.add_argument("--step", type=int, default=3, help="every k-th photo (default 3)")
    ap.add_argument("--fixed", action="store_true", help="640/960 px whatever the frame")
    args = ap.parse_args()
    if not VISION.is_dir():
        print(f"no labelled photos at {VISION}: skipped")
        return 0
    if args.fixed:
        detect.STREAM_REF_WIDTH = 10**9
    det = detect.load_detectors(DetectorSettings())
    for size in args.sizes.split(","):
        w_frame, h_frame = map(int, size.split("x"))
        for cls, kind in (("faces", detect.Kind.FACE), ("plates", detect.Kind.PLATE)):
            labels = json.loads((VISION / cls / "gt.json").read_text())
            found = total = frames = 0
            took = 0.0
            for name, boxes in list(labels.items())[:: args.step]:
                photo = cv2.imread(str(VISION / cls / name))
                h, w = photo.shape[:2]
                if w > w_frame or h > h_frame:
                    continue
                frame = np.full((h_frame, w_frame, 3), 90, np.uint8)
                ox, oy = w_frame - w, h_frame - h
                frame[oy:, ox:] = photo
                t0 = time.perf_counter()
                got = [(b.x, b.y, b.w, b.h) for b in det.detect(frame) if b.kind is kind]
                took += time.perf_counter() - t0
                frames += 1
                for x, y, bw, bh in boxes:
                    total += 1
                    found += any(iou((x + ox, y + oy, bw, bh), d) >= 0.3 for d in got)
            print(
                f"{size} {cls}: {found}/{total} = {found / max(total, 1):.3f} "
                f"({took / max(frames, 1):.3f} s a frame for both detectors, {frames} frames)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
