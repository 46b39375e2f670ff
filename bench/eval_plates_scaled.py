"""Plates in large photos: the labelled plate photos of ../shared/data/vision enlarged (2x by
default), each seen at its own width as ``gateway anonymize`` sees it; how many labelled plates
the plate network's first look alone misses, and how many it misses with its second look
(``PlateDetector.detect``). A plate counts as found at IoU >= 0.3 with a box.

    .venv/bin/python bench/eval_plates_scaled.py [--scale 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.camera.detect import SECOND_SCALE_ABOVE, PlateDetector  # noqa: E402

PLATES = ROOT.parent / "shared" / "data" / "vision" / "plates"


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=2.0, help="enlargement of each photo")
    scale = ap.parse_args().scale
    if not (PLATES / "gt.json").is_file():
        raise SystemExit(f"{PLATES}: the labelled plate photos are not there")
    truth = json.loads((PLATES / "gt.json").read_text())
    det = PlateDetector(width=0)
    total = wide = first_missed = missed = 0
    for name, boxes in sorted(truth.items()):
        img = cv2.imread(str(PLATES / name))
        big = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        wide += big.shape[1] > SECOND_SCALE_ABOVE
        found = [(b.x, b.y, b.w, b.h) for b in det.detect(big)]
        xy, wh, _, _ = det._candidates(big, 0)  # the first look alone, before NMS
        first = [(*a, *b) for a, b in zip(xy.tolist(), wh.tolist(), strict=True)]
        for x, y, w, h in boxes:
            g = (x * scale, y * scale, w * scale, h * scale)
            total += 1
            first_missed += not any(_iou(g, d) >= 0.3 for d in first)
            missed += not any(_iou(g, d) >= 0.3 for d in found)
    print(
        f"{total} plates in {len(truth)} photos enlarged {scale:g}x ({wide} wider than "
        f"{SECOND_SCALE_ABOVE} px): missed by the first look alone {first_missed}, "
        f"with the second look {missed}"
    )


if __name__ == "__main__":
    main()
