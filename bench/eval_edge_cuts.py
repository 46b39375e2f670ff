"""Recall of faces and plates cut by the frame's edge (a face or plate entering the camera's view).

Each labelled box of the photos in ``../shared/data/vision`` (as ``eval_anonymisation``) is cut
by one edge of its photo: the photo is cropped so that only ``--inside`` of the box's height
(top, bottom) or width (left, right) is left in it. The crop goes through the detectors as an
image does (``load_detectors().detect``), once as the stream's detectors run and once with
their second look at the frame mirrored at its edges (``DetectorSettings.edges``, what
``gateway anonymize`` does), and the box counts as found when the detected boxes (of either
kind: a face blurred as a plate is blurred) cover at least ``--cover`` of its visible part. A
box too close to its photo's far side to be cut so is skipped.

    .venv/bin/python bench/eval_edge_cuts.py [--inside 0.5,0.7] [--every 3] [--widths stream]

Skipped, with a message and exit status 0, when the data folder is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.eval_anonymisation import VISION, XYWH, load_set  # noqa: E402
from gateway.camera.detect import Box, load_detectors  # noqa: E402
from gateway.camera.options import DetectorSettings  # noqa: E402

EDGES = ("top", "bottom", "left", "right")


def cut(img: np.ndarray, box: XYWH, edge: str, inside: float) -> tuple[np.ndarray, XYWH] | None:
    """The photo cropped so that ``inside`` of ``box`` is left at ``edge``, and the box's
    visible part in the crop; None if the crop would be degenerate."""
    h, w = img.shape[:2]
    x, y, bw, bh = box
    if edge == "top":
        y0 = int(round(y + (1 - inside) * bh))
        crop, vis = img[y0:], (x, 0.0, bw, y + bh - y0)
    elif edge == "bottom":
        y1 = int(round(y + inside * bh))
        crop, vis = img[:y1], (x, y, bw, y1 - y)
    elif edge == "left":
        x0 = int(round(x + (1 - inside) * bw))
        crop, vis = img[:, x0:], (0.0, y, x + bw - x0, bh)
    else:
        x1 = int(round(x + inside * bw))
        crop, vis = img[:, :x1], (x, y, x1 - x, bh)
    if min(crop.shape[:2]) < 32 or vis[2] < 4 or vis[3] < 4:
        return None
    return np.ascontiguousarray(crop), vis


def covered(shape: tuple[int, ...], vis: XYWH, boxes: list[Box]) -> float:
    """The share of ``vis`` inside the union of ``boxes`` (all clipped to the image)."""
    h, w = shape[:2]
    mask = np.zeros((h, w), np.bool_)
    for b in boxes:
        x0, y0 = max(0, int(b.x)), max(0, int(b.y))
        x1, y1 = min(w, int(np.ceil(b.x + b.w))), min(h, int(np.ceil(b.y + b.h)))
        if x1 > x0 and y1 > y0:
            mask[y0:y1, x0:x1] = True
    x0, y0 = max(0, int(vis[0])), max(0, int(vis[1]))
    x1, y1 = min(w, int(np.ceil(vis[0] + vis[2]))), min(h, int(np.ceil(vis[1] + vis[3])))
    if x1 <= x0 or y1 <= y0:
        return 1.0
    return float(mask[y0:y1, x0:x1].mean())


def run(
    detect: Callable[[np.ndarray], list[Box]], insides: list[float], every: int, cover: float
) -> dict[tuple[str, str, float], tuple[int, int]]:
    """(class, edge, inside) -> (found, boxes)."""
    out: dict[tuple[str, str, float], tuple[int, int]] = {}
    for cls in ("faces", "plates"):
        items = [(p, b) for p, boxes in load_set(cls, None) for b in boxes][::every]
        for path, box in items:
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is None:
                continue
            for edge in EDGES:
                for inside in insides:
                    made = cut(img, box, edge, inside)
                    if made is None:
                        continue
                    crop, vis = made
                    found, n = out.get((cls, edge, inside), (0, 0))
                    hit = covered(crop.shape, vis, detect(crop)) >= cover
                    out[(cls, edge, inside)] = (found + hit, n + 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inside", default="0.5,0.7", help="shares of each box left inside")
    ap.add_argument("--every", type=int, default=3, help="every n-th labelled box")
    ap.add_argument("--cover", type=float, default=0.5, help="share of the visible part covered")
    ap.add_argument(
        "--widths",
        choices=["stream", "own"],
        default="own",
        help="the detectors' input widths: the stream's (640/960 per 1280 px), or each image's "
        "own, as gateway anonymize runs them (default)",
    )
    args = ap.parse_args(argv)
    if not VISION.is_dir():
        print(f"no labelled photos at {VISION}: skipped")
        return 0
    insides = [float(v) for v in args.inside.split(",")]
    res = {}
    for edges in (False, True):
        widths = {"face_width": 0, "plate_width": 0} if args.widths == "own" else {}
        det = load_detectors(DetectorSettings(edges=edges, **widths))  # type: ignore[arg-type]
        t0 = time.perf_counter()
        res[edges] = run(det.detect, insides, args.every, args.cover)
        det.close()
        print(f"edges={edges}: {time.perf_counter() - t0:.0f} s", flush=True)
    print("| class | edge | " + " | ".join(f"{v:.0%} inside" for v in insides) + " |")
    print("|---|---|" + "---:|" * len(insides))
    for cls in ("faces", "plates"):
        for edge in EDGES:
            cells = []
            for v in insides:
                (f0, n), (f1, _) = (
                    res[False].get((cls, edge, v), (0, 0)),
                    res[True].get((cls, edge, v), (0, 0)),
                )
                cells.append(f"{f0 / n:.2f} -> {f1 / n:.2f} of {n}" if n else "-")
            print(f"| {cls} | {edge} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
