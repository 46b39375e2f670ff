"""Quality harness for camera anonymisation (issue 4): recall, precision, pixels altered, fps.

Runs the stream's detectors on the labelled real photos in ``../shared/data/vision`` (faces and
plates; ``gt.json`` = file -> [x, y, w, h] boxes), each photo letterboxed into a 640x360 and a
1280x720 camera frame, and prints per class:

- recall and precision at IoU >= 0.3 (every photo detected on its own: ``detect_every`` 1);
- pixels altered: for each detected true box, the share of its pixels that differ after
  anonymisation (mean, minimum, and how many boxes reach 95%);
- stream: the photos played as a video (each photo for a few frames, panning sideways) through
  the real ``CameraStage`` (decode-ahead thread, worker thread, detection on every k-th frame
  with boxes carried, frame memory, fast mode) -> frames per second on this machine; and the same
  frames through the same anonymiser synchronously -> per-frame recall of the boxes actually
  applied, and their pixels altered.

Skipped, with a message and exit status 0, when the data folder is absent.

    .venv/bin/python bench/eval_anonymisation.py [--sizes 640x360,1280x720] [--detect-every 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.camera.anonymiser import (  # noqa: E402
    FrameAnonymiser,
    Outcome,
)
from gateway.camera.anonymize import anonymize  # noqa: E402
from gateway.camera.detect import Box, Kind, load_detectors  # noqa: E402
from gateway.camera.options import AnonymiserSettings, DetectorSettings, Method  # noqa: E402
from gateway.camera.pipeline import CameraStage  # noqa: E402
from gateway.camera.source import Frame  # noqa: E402

SHARED = Path(os.environ.get("GATEWAY_SHARED", ROOT.parent / "shared"))
VISION = SHARED / "data" / "vision"
CLASSES = {"faces": Kind.FACE, "plates": Kind.PLATE}
IOU = 0.3

XYWH = tuple[float, float, float, float]


def letterbox(
    img: np.ndarray, width: int, height: int, dx: int = 0
) -> tuple[np.ndarray, float, int, int]:
    """``img`` scaled to fit a ``width`` x ``height`` black frame, centred, moved ``dx`` px."""
    ih, iw = img.shape[:2]
    s = min(width / iw, height / ih)
    nw, nh = round(iw * s), round(ih * s)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    small = cv2.resize(img, (nw, nh), interpolation=interp)
    out = np.zeros((height, width, 3), np.uint8)
    ox, oy = (width - nw) // 2 + dx, (height - nh) // 2
    x0, x1 = max(ox, 0), min(ox + nw, width)
    out[oy : oy + nh, x0:x1] = small[:, x0 - ox : x1 - ox]
    return out, s, ox, oy


def iou(a: XYWH, b: XYWH) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter + 1e-9)


def altered_share(before: np.ndarray, after: np.ndarray, box: XYWH) -> float:
    h, w = before.shape[:2]
    x0, y0 = max(int(round(box[0])), 0), max(int(round(box[1])), 0)
    x1, y1 = min(int(round(box[0] + box[2])), w), min(int(round(box[1] + box[3])), h)
    if x1 <= x0 or y1 <= y0:
        return 1.0
    diff = np.any(before[y0:y1, x0:x1] != after[y0:y1, x0:x1], axis=2)
    return float(diff.mean())


@dataclass
class Tally:
    true: int = 0
    found: int = 0
    dets: int = 0
    false: int = 0
    altered: list[float] = field(default_factory=list)

    def add(self, gt: list[XYWH], dets: list[XYWH], before: np.ndarray, after: np.ndarray) -> None:
        self.true += len(gt)
        self.dets += len(dets)
        for g in gt:
            if any(iou(g, d) >= IOU for d in dets):
                self.found += 1
                self.altered.append(altered_share(before, after, g))
        self.false += sum(not any(iou(g, d) >= IOU for g in gt) for d in dets)

    def row(self) -> str:
        rec = self.found / self.true if self.true else float("nan")
        prec = 1 - self.false / self.dets if self.dets else float("nan")
        alt = self.altered or [float("nan")]
        ok = sum(a >= 0.95 for a in self.altered)
        return (
            f"recall {rec:.3f} ({self.found}/{self.true})  precision {prec:.3f}  "
            f"altered mean {statistics.fmean(alt):.3f} min {min(alt):.3f} "
            f">=95%: {ok}/{len(self.altered)}"
        )


def load_set(cls: str, limit: int | None) -> list[tuple[Path, list[XYWH]]]:
    gt = json.loads((VISION / cls / "gt.json").read_text())
    items = [(VISION / cls / name, [tuple(b) for b in boxes]) for name, boxes in sorted(gt.items())]
    if limit:
        step = max(1, len(items) // limit)
        items = items[::step][:limit]
    return items  # type: ignore[return-value]


def as_xywh(boxes: list[Box], kind: Kind) -> list[XYWH]:
    return [(b.x, b.y, b.w, b.h) for b in boxes if b.kind is kind]


def eval_photos(
    size: tuple[int, int], settings: AnonymiserSettings, limit: int | None
) -> dict[str, Tally]:
    """Every photo on its own, detection on every frame."""
    detector = load_detectors(settings.detector)
    out: dict[str, Tally] = {}
    for cls, kind in CLASSES.items():
        tally = out[cls] = Tally()
        for path, boxes in load_set(cls, limit):
            img = cv2.imread(str(path))
            frame, s, ox, oy = letterbox(img, *size)
            gt = [(x * s + ox, y * s + oy, w * s, h * s) for x, y, w, h in boxes]
            dets = detector.detect(frame)
            anon = anonymize(frame, dets, settings.method, settings.margin)
            tally.add(gt, as_xywh(dets, kind), frame, anon.image)
    detector.close()
    return out


@dataclass
class StreamClip:
    """The labelled photos as a video: ``per`` frames each, panning ``pan`` px per frame."""

    size: tuple[int, int]
    photos: list[tuple[Path, list[XYWH], Kind]]
    per: int = 7
    pan: float = 4.0
    fps: float = 25.0
    live: bool = False
    name: str = "bench"

    def total(self) -> int:
        return len(self.photos) * self.per

    def frames_with_truth(self) -> Iterator[tuple[Frame, list[XYWH], Kind]]:
        i = 0
        scale = self.size[0] / 1280
        for path, boxes, kind in self.photos:
            base, s, ox, oy = letterbox(cv2.imread(str(path)), *self.size)
            for j in range(self.per):
                # pan by copying columns (about what decoding a frame costs, not a resize)
                dx = round((j - self.per // 2) * self.pan * scale)
                frame = np.zeros_like(base)
                if dx >= 0:
                    frame[:, dx:] = base[:, : base.shape[1] - dx]
                else:
                    frame[:, :dx] = base[:, -dx:]
                gt = [(x * s + ox + dx, y * s + oy, w * s, h * s) for x, y, w, h in boxes]
                yield Frame(i, i / self.fps, frame), gt, kind
                i += 1

    def frames(self) -> Iterator[Frame]:
        for frame, _, _ in self.frames_with_truth():
            yield frame


def stream_photos(limit: int | None) -> list[tuple[Path, list[XYWH], Kind]]:
    return [(p, b, kind) for cls, kind in CLASSES.items() for p, b in load_set(cls, limit)]


def stream_fps(clip: StreamClip, settings: AnonymiserSettings) -> tuple[float, int, int]:
    """Frames per second of the real camera stage, as fast as it can go."""
    stage = CameraStage(
        clip,  # type: ignore[arg-type]
        FrameAnonymiser(load_detectors(settings.detector), settings),
        name="bench",
        window=1e9,
        speed=None,
    )

    async def emit(summary: object) -> None:
        pass

    t0 = time.perf_counter()
    asyncio.run(stage.run(emit, asyncio.Event()))
    wall = time.perf_counter() - t0
    return stage.anonymised / wall, stage.anonymised, stage.dropped


def stream_quality(clip: StreamClip, settings: AnonymiserSettings) -> dict[str, Tally]:
    """The same frames through the same anonymiser, synchronously, checking each frame's
    applied boxes (detected, carried or remembered) against that frame's truth."""
    anon = FrameAnonymiser(load_detectors(settings.detector), settings)
    out = {cls: Tally() for cls in CLASSES}
    names = {kind: cls for cls, kind in CLASSES.items()}
    truth: dict[int, tuple[list[XYWH], Kind]] = {}

    def check(outcomes: list[Outcome]) -> None:
        for o in outcomes:
            gt, kind = truth.pop(o.frame.index)
            after = o.anonymised.image if o.anonymised is not None else o.frame.image
            applied = as_xywh(list(o.boxes), kind)
            out[names[kind]].add(gt, applied, o.frame.image, after)

    for frame, gt, kind in clip.frames_with_truth():
        truth[frame.index] = (gt, kind)
        check(anon.push(frame))
    check(anon.flush())
    anon.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="640x360,1280x720")
    ap.add_argument("--detect-every", type=int, default=2, help="stream: k (default 2)")
    ap.add_argument("--memory", type=int, default=5)
    ap.add_argument("--method", default="gaussian", choices=[m.value for m in Method])
    ap.add_argument("--margin", type=float, default=AnonymiserSettings().margin)
    ap.add_argument("--limit", type=int, default=0, help="photos per class (0: all)")
    ap.add_argument("--stream-limit", type=int, default=40, help="stream: photos per class")
    ap.add_argument(
        "--per",
        type=int,
        default=7,
        help="stream: frames per photo (7: the cuts to a new photo fall on every phase of k)",
    )
    ap.add_argument("--threads", type=int, default=0, help="cv2.setNumThreads (0: default)")
    ap.add_argument(
        "--parallel",
        action=argparse.BooleanOptionalAction,
        default=DetectorSettings().parallel,
        help="faces and plates in two threads at once (default: one after the other, as the "
        "stream runs them)",
    )
    ap.add_argument(
        "--face-width", type=int, default=DetectorSettings().face_width, help="face input width"
    )
    ap.add_argument(
        "--plate-width", type=int, default=DetectorSettings().plate_width, help="plate input width"
    )
    ap.add_argument(
        "--plate-strips",
        type=int,
        default=DetectorSettings().plate_strips,
        help="plate input in this many overlapping strips",
    )
    ap.add_argument(
        "--edges",
        action=argparse.BooleanOptionalAction,
        default=DetectorSettings().edges,
        help="a second look at the frame mirrored at its edges (default: as the stream, off)",
    )
    ap.add_argument("--no-stream", action="store_true", help="photos only")
    ap.add_argument("--no-photos", action="store_true", help="stream only")
    ap.add_argument("--fps-only", action="store_true", help="stream: skip the quality pass")
    ap.add_argument(
        "--repeat", type=int, default=1, help="stream: time it N times, print the median"
    )
    args = ap.parse_args(argv)
    if (
        not (VISION / "faces" / "gt.json").is_file()
        or not (VISION / "plates" / "gt.json").is_file()
    ):
        print(
            f"eval-anonymisation: SKIPPED: {VISION} is absent (the labelled photos are not "
            "beside the repository); nothing was measured"
        )
        return 0
    if args.threads:
        cv2.setNumThreads(args.threads)
    det = DetectorSettings(
        threads=args.threads,
        parallel=args.parallel,
        face_width=args.face_width,
        plate_width=args.plate_width,
        plate_strips=args.plate_strips,
        edges=args.edges,
    )
    photo_settings = AnonymiserSettings(
        method=Method(args.method), margin=args.margin, detect_every=1, memory=0, detector=det
    )
    stream_settings = AnonymiserSettings(
        method=Method(args.method),
        margin=args.margin,
        detect_every=args.detect_every,
        memory=args.memory,
        detector=det,
    )
    print(
        f"OpenCV {cv2.__version__}, {os.cpu_count()} CPUs, cv2 threads {cv2.getNumThreads()}, "
        f"{'parallel' if det.parallel else 'sequential'} detectors; "
        f"faces at {det.face_width} px score {det.face_score}, plates at {det.plate_width} px "
        f"in {det.plate_strips} strip(s) score {det.plate_score}; {args.method}, margin {photo_settings.margin}; IoU >= {IOU}"
    )
    print(f"data: {VISION}")
    for spec in args.sizes.split(","):
        w, h = (int(v) for v in spec.lower().split("x"))
        print(f"\n== {w}x{h}")
        if not args.no_photos:
            t0 = time.perf_counter()
            photos = eval_photos((w, h), photo_settings, args.limit or None)
            n = sum(len(load_set(c, args.limit or None)) for c in CLASSES)
            print(
                f"  photos, each detected on its own ({n} frames, "
                f"{1000 * (time.perf_counter() - t0) / n:.0f} ms/frame incl. reading):"
            )
            for cls, tally in photos.items():
                print(f"  {cls:<6} {tally.row()}")
        if args.no_stream:
            continue
        clip = StreamClip((w, h), stream_photos(args.stream_limit or None), per=args.per)
        runs = [stream_fps(clip, stream_settings) for _ in range(max(1, args.repeat))]
        fps = statistics.median(r[0] for r in runs)
        _, done, dropped = runs[0]
        each = f" (runs: {', '.join(f'{r[0]:.1f}' for r in runs)})" if len(runs) > 1 else ""
        print(
            f"  stream: {clip.total()} frames ({clip.per} per photo, panning), detect every "
            f"{args.detect_every}, memory {args.memory}: {fps:.1f} frames/s{each} "
            f"({done} anonymised, {dropped} dropped)"
        )
        if args.fps_only:
            continue
        for cls, tally in stream_quality(clip, stream_settings).items():
            print(f"  stream {cls:<6} {tally.row()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
