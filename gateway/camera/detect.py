"""Detection: faces (YuNet-n through ``cv2.FaceDetectorYN``) and licence plates (``clp_det``, a
RetinaFace-style network through ``cv2.dnn``), both from the ONNX files in ``models/``.

Thresholds are chosen for recall: a missed face is a leak, a blurred lamp post is not. Each
detector runs on a copy of the frame scaled to its own input width (``DetectorSettings``), which is
where most of the speed comes from; boxes are scaled back to frame pixels.
"""

from __future__ import annotations

import contextlib
import enum
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from gateway.camera.options import PLATE_STRIPS, DetectorSettings
from gateway.errors import ConfigError

Image = npt.NDArray[np.uint8]

# Detector inputs: shrunk bilinearly (the same recall as INTER_AREA on ../shared/data/vision and
# several ms faster per 1280x720 frame); enlarged with INTER_AREA (two more plates of 260 found
# at 640x360 than bilinear)
SHRINK, ENLARGE = cv2.INTER_LINEAR, cv2.INTER_AREA
MODELS = Path(__file__).resolve().parents[2] / "models"
FACE_MODEL = "yunet_n_640_640.onnx"
PLATE_MODEL = "clp_det.onnx"  # dynamic input shape: needs OpenCV >= 5


class Kind(enum.Enum):
    FACE = "face"
    PLATE = "plate"


@dataclass(frozen=True, slots=True)
class Box:
    """A detection in frame pixels. ``corners`` (plates only): 4 (x, y) points, clockwise from
    top-left, as the network gives them."""

    kind: Kind
    x: float
    y: float
    w: float
    h: float
    score: float
    corners: tuple[tuple[float, float], ...] | None = None

    def shifted(self, dx: float, dy: float) -> Box:
        corners = None
        if self.corners is not None:
            corners = tuple((px + dx, py + dy) for px, py in self.corners)
        return Box(self.kind, self.x + dx, self.y + dy, self.w, self.h, self.score, corners)

    def scaled(self, f: float) -> Box:
        corners = None
        if self.corners is not None:
            corners = tuple((px * f, py * f) for px, py in self.corners)
        return Box(self.kind, self.x * f, self.y * f, self.w * f, self.h * f, self.score, corners)


class Detector(Protocol):
    def detect(self, frame: Image) -> list[Box]: ...


def _model(name: str) -> Path:
    path = MODELS / name
    if not path.is_file():
        raise ConfigError(f"{path}: detector model missing (the repository's models/ folder)")
    return path


@contextlib.contextmanager
def _unreadable_model(path: Path) -> Iterator[None]:
    """OpenCV's error on a damaged model file (cut short, overwritten), as one line."""
    try:
        yield
    except cv2.error as exc:
        said = [ln for ln in str(exc).splitlines() if "error:" in ln] or [str(exc)]
        why = said[0].split("error:", 1)[-1].strip()
        raise ConfigError(
            f"{path}: not a model OpenCV can read (damaged or cut short? `git checkout -- "
            f"models/` restores the shipped one): {why[:160]}"
        ) from None


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    """OpenCV 5 warns on stderr that YuNet's target setting is unsupported; harmless here."""
    logging_api = getattr(cv2.utils, "logging", None)
    if logging_api is None:  # pragma: no cover - builds without the logging API
        yield
        return
    old = logging_api.getLogLevel()
    logging_api.setLogLevel(logging_api.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        logging_api.setLogLevel(old)


# ``width`` 0: the frame's own width, but no wider than this (a 6000-pixel photo through the
# networks at full size took minutes and gigabytes; 2560 keeps a 40-pixel face of a 1920x1080
# frame whole)
NATIVE_MAX_WIDTH = 2560
# the most pixels a frame is enlarged to for a network (a 2560x1440 frame's)
MAX_ENLARGED_AREA = 2560 * 1440
# a plate detector at the frame's own width (``width`` 0) looks again at SECOND_SCALE_WIDTH
# when that is wider than SECOND_SCALE_ABOVE (see PlateDetector.detect)
SECOND_SCALE_ABOVE, SECOND_SCALE_WIDTH = 1600, 1280
# and a narrower one looks again at this many times its first width (see PlateDetector.detect)
SECOND_LOOK_UP = 1.5
SECOND_LOOK_SCORE = 0.2  # what that look finds must score this much


# a stream's detector widths (face_width, plate_width) are what a frame up to this wide is seen
# at; a wider frame is seen proportionally wider (the same shrink), up to NATIVE_MAX_WIDTH: at
# 640/960 whatever the camera, the labelled photos at their own size in a 1920x1080 frame kept
# face recall 0.66 (0.79 in a 1280x720 one) and in a 3840x2160 frame 0.26, plates 0.63
STREAM_REF_WIDTH = 1280


def stream_width(width: int, w: int) -> int:
    """The width a stream's detector set to ``width`` sees a frame ``w`` pixels wide at."""
    if width <= 0 or w <= STREAM_REF_WIDTH:
        return width
    return max(width, min(round(width * w / STREAM_REF_WIDTH), NATIVE_MAX_WIDTH))


def _own_width(w: int, floor: int) -> int:
    """The width a network sees a frame ``w`` pixels wide at when ``_scale_for`` is given
    ``width`` 0: its own, but at least ``floor`` and at most ``NATIVE_MAX_WIDTH``."""
    return min(max(w, floor), NATIVE_MAX_WIDTH)


def _scale_for(frame: Image, width: int, floor: int = 0) -> tuple[Image, float]:
    """The frame resized to ``width`` (aspect kept) and the factor back to frame pixels.
    ``width`` 0: its own width, but at least ``floor`` (a small photo is enlarged to what the
    network finds faces and plates at, as the stream does) and at most ``NATIVE_MAX_WIDTH``."""
    h, w = frame.shape[:2]
    if width <= 0:
        width = _own_width(w, floor)
    if width > w and width * width * h > MAX_ENLARGED_AREA * w:
        # a narrow image (a 33x4000 strip) widened to ``floor`` would be tens of megapixels
        # tall (7.5 GB for the networks): it is enlarged only to that area, if at all
        width = max(w, int((MAX_ENLARGED_AREA * w / h) ** 0.5))
    if width == w:
        return frame, 1.0
    height = max(1, round(h * width / w))
    small = cv2.resize(frame, (width, height), interpolation=SHRINK if width < w else ENLARGE)
    return small, w / width


# a photo wider than NATIVE_MAX_WIDTH, at ``width`` 0, is seen whole at that width and also in
# tiles at its own scale: a face of 40-90 pixels in a 6000x4000 photo, shrunk 2.3 times for the
# whole, was missed (face recall 0.87 on such a canvas of the labelled photos, plates 0.90).
# Tiles are as large as the biggest frame a network takes here (2560x1440: its memory), and
# overlap by TILE_OVERLAP pixels: a smaller face or plate lies whole in one tile; a larger one is
# at least 55 pixels in the whole, seen at 2560 (a 6000-pixel photo's), where it is found
TILE_OVERLAP = 128


def _tiles(frame: Image) -> list[tuple[int, int, Image]]:
    """(top, left, view) of each tile of a photo wider than NATIVE_MAX_WIDTH (equal tiles,
    spread evenly, each overlapping the next by at least TILE_OVERLAP); none for another."""
    h, w = frame.shape[:2]
    if w <= NATIVE_MAX_WIDTH:
        return []
    tw, th = NATIVE_MAX_WIDTH, MAX_ENLARGED_AREA // NATIVE_MAX_WIDTH

    def starts(n: int, t: int) -> list[int]:
        if n <= t:
            return [0]
        k = 1 + -(-(n - t) // (t - TILE_OVERLAP))
        return [round(i * (n - t) / (k - 1)) for i in range(k)]

    return [(y, x, frame[y : y + th, x : x + tw]) for y in starts(h, th) for x in starts(w, tw)]


EDGE_SAME = 0.3  # boxes of one kind overlapping this much (IoU) are one object


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0.0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    both = ix * iy
    return both / (a.w * a.h + b.w * b.h - both) if both > 0 else 0.0


def _merged(boxes: list[Box], score: float, nms: float) -> list[Box]:
    """One box per object seen in the whole and in tiles: OpenCV's NMS over all of them."""
    if len(boxes) < 2:
        return boxes
    rects = [[b.x, b.y, b.w, b.h] for b in boxes]
    keep = cv2.dnn.NMSBoxes(rects, [b.score for b in boxes], score, nms)
    return [boxes[i] for i in np.asarray(keep, dtype=int).ravel()]


class FaceDetector:
    """YuNet-n. Any input size works through ``setInputSize``."""

    def __init__(self, score: float = 0.25, nms: float = 0.3, width: int = 640) -> None:
        self.score, self.nms, self.width = score, nms, width
        path = _model(FACE_MODEL)
        with _quiet_opencv(), _unreadable_model(path):
            self._net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score, nms, 5000)
        self._size: tuple[int, int] | None = None

    def detect(self, frame: Image) -> list[Box]:
        boxes = self._detect(frame, stream_width(self.width, frame.shape[1]))
        if self.width <= 0:
            tiles = _tiles(frame)
            for y, x, tile in tiles:
                boxes += [b.shifted(x, y) for b in self._detect(tile, 0)]
            if tiles:
                boxes = _merged(boxes, self.score, self.nms)
        return boxes

    def _detect(self, frame: Image, width: int) -> list[Box]:
        small, f = _scale_for(frame, width, floor=DetectorSettings.face_width)
        size = (small.shape[1], small.shape[0])
        if size != self._size:
            self._net.setInputSize(size)
            self._size = size
        _, faces = self._net.detect(small)
        if faces is None:
            return []
        return [
            Box(
                Kind.FACE,
                float(r[0]) * f,
                float(r[1]) * f,
                float(r[2]) * f,
                float(r[3]) * f,
                float(r[14]),
            )
            for r in faces
        ]


@cache
def _priors(width: int, height: int) -> npt.NDArray[np.float32]:
    """RetinaFace anchors (cx, cy, w, h) normalised to the input size, in the network's order."""
    out: list[npt.NDArray[np.float32]] = []
    for step, sizes in ((8, (24, 48)), (16, (96, 192)), (32, (384, 768))):
        fh, fw = -(-height // step), -(-width // step)
        ys, xs = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        cx = ((xs + 0.5) * step / width).ravel()
        cy = ((ys + 0.5) * step / height).ravel()
        per = [
            np.stack([cx, cy, np.full_like(cx, s / width), np.full_like(cx, s / height)], axis=1)
            for s in sizes
        ]
        # anchors of one cell are adjacent: (cell0 s0, cell0 s1, cell1 s0, ...)
        out.append(np.stack(per, axis=1).reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


class PlateDetector:
    """clp_det: box + 4 corners per plate. Input BGR minus (104, 117, 123); variances 0.1/0.2.

    With ``strips`` > 1 the scaled frame goes through the network as that many horizontal
    strips of equal height, each overlapping the next by ``STRIP_OVERLAP`` pixels, and one NMS
    merges their boxes. The network's working memory follows its input area: at 960x540, three
    strips of 244 rows peak ~30 MB lower than the whole frame. A plate up to ``STRIP_OVERLAP``
    pixels tall (at the input width) lies whole in at least one strip; a taller one is seen
    whole or in parts, and every part found is boxed (docs/camera.md, "Memory")."""

    MEAN = (104.0, 117.0, 123.0)
    STRIP_OVERLAP = 96  # rows two neighbouring strips share, at the network's input scale

    def __init__(
        self,
        score: float = 0.1,
        nms: float = 0.3,
        width: int = 960,
        strips: int = DetectorSettings.plate_strips,
        second_look: bool = DetectorSettings.plate_second_look,
    ) -> None:
        if strips not in PLATE_STRIPS:
            raise ConfigError(
                f"plate detector: strips must be {PLATE_STRIPS[0]} to {PLATE_STRIPS[-1]}, got {strips}"
            )
        self.score, self.nms, self.width, self.strips = score, nms, width, strips
        self.second_look = second_look
        if int(cv2.__version__.split(".")[0]) < 5:
            raise ConfigError(
                f"the plate detector needs OpenCV >= 5 (dynamic input shapes), found "
                f"{cv2.__version__}: pip install 'opencv-python-headless>=5'"
            )
        # one network serves every input size (OpenCV 5 re-plans when the shape changes)
        path = _model(PLATE_MODEL)
        with _unreadable_model(path):
            self._net = cv2.dnn.readNetFromONNX(str(path))

    def _strip_rows(self, h: int) -> list[tuple[int, int]]:
        """(top, bottom) of each strip; equal heights, so the network plans one shape. A
        frame no taller than ``strips`` overlaps is small enough to go whole: cut, it would
        mostly be read twice."""
        n = self.strips
        if n == 1 or h <= n * self.STRIP_OVERLAP:
            return [(0, h)]
        tall = -(-(h + (n - 1) * self.STRIP_OVERLAP) // n)
        return [
            (round(k * (h - tall) / (n - 1)), round(k * (h - tall) / (n - 1)) + tall)
            for k in range(n)
        ]

    def _forward(self, img: Image) -> tuple[Any, Any, Any, Any]:
        """(top-left xy, wh, corner points, scores) of every anchor over the score threshold,
        in ``img`` pixels."""
        h, w = img.shape[:2]
        net = self._net
        net.setInput(cv2.dnn.blobFromImage(img, 1.0, (w, h), self.MEAN, swapRB=False))
        loc, conf, landms = net.forward(["loc", "conf", "landms"])
        scores = conf[0, :, 1]
        keep = np.flatnonzero(scores >= self.score)
        pri = _priors(w, h)[keep]
        loc, landms, scores = loc[0, keep], landms[0, keep], scores[keep]
        cxcy = pri[:, :2] + loc[:, :2] * 0.1 * pri[:, 2:]
        wh = pri[:, 2:] * np.exp(loc[:, 2:] * 0.2)
        scale = np.array([w, h], np.float32)
        xy = (cxcy - wh / 2) * scale
        pts = (pri[:, None, :2] + landms.reshape(-1, 4, 2) * 0.1 * pri[:, None, 2:]) * scale
        return xy, wh * scale, pts, scores

    def detect(self, frame: Image) -> list[Box]:
        parts = [self._candidates(frame, stream_width(self.width, frame.shape[1]))]
        first = _own_width(frame.shape[1], DetectorSettings.plate_width)
        if self.width <= 0 and first > SECOND_SCALE_ABOVE:
            # at the full width of a large photo, a plate close to the camera is larger than
            # the network's largest anchors and goes unseen (3 of 60 plates of 2560-pixel
            # photos): a second look at a smaller scale, the boxes of both merged
            parts.append(self._candidates(frame, SECOND_SCALE_WIDTH))
        elif self.second_look and self.width <= 0 and first * SECOND_LOOK_UP <= NATIVE_MAX_WIDTH:
            # a smaller photo: a second look 1.5 times larger, where the network scores a
            # small or faint plate higher (a legible 90x29 plate of a 640-pixel photo scored
            # 0.06 at 960), keeping what scores SECOND_LOOK_SCORE there. The labelled plates
            # (IoU >= 0.3): as they are 256 -> 260 of 260, at half size 254 -> 258; boxes on
            # no labelled plate 75 -> 99 and 39 -> 62 (0.1 kept 133 and 79); ~3x the time
            xy, whp, pts, scores = self._candidates(frame, int(first * SECOND_LOOK_UP))
            sure = scores >= SECOND_LOOK_SCORE
            parts.append((xy[sure], whp[sure], pts[sure], scores[sure]))
        if self.width <= 0:
            for y, x, tile in _tiles(frame):
                xy, whp, pts, scores = self._candidates(tile, 0)
                offset = np.array([x, y], np.float32)
                parts.append((xy + offset, whp, pts + offset, scores))
        xy, whp, pts, scores = (np.concatenate(c) for c in zip(*parts, strict=True))
        if len(scores) == 0:
            return []
        rects = [
            [float(a), float(b), float(c), float(d)] for (a, b), (c, d) in zip(xy, whp, strict=True)
        ]
        idx = cv2.dnn.NMSBoxes(rects, scores.astype(float).tolist(), self.score, self.nms)
        out = []
        for i in np.asarray(idx, dtype=int).ravel():
            (x, y, bw, bh) = rects[i]
            corners = tuple((float(px), float(py)) for px, py in pts[i])
            out.append(Box(Kind.PLATE, x, y, bw, bh, float(scores[i]), corners))
        return out

    def _candidates(self, frame: Image, width: int) -> tuple[Any, Any, Any, Any]:
        """(top-left xy, wh, corner points, scores) over the score threshold, the frame seen
        at ``width``, in frame pixels."""
        small, f = _scale_for(frame, width, floor=DetectorSettings.plate_width)
        rows = self._strip_rows(small.shape[0])
        parts = []
        for k, (top, bottom) in enumerate(rows):
            xy, whp, pts, scores = self._forward(small[top:bottom])
            if len(rows) > 1:
                # each strip keeps the boxes centred in its own share of the frame (cut in the
                # middle of each overlap): a plate seen whole by two strips is kept once, and
                # the strip's cut edge, which the network takes for an image border, does not
                # add boxes where the neighbour sees the real picture
                lo = (top + rows[k - 1][1]) / 2 - top if k else -np.inf
                hi = (rows[k + 1][0] + bottom) / 2 - top if k + 1 < len(rows) else np.inf
                cy = xy[:, 1] + whp[:, 1] / 2
                mine = (cy >= lo) & (cy < hi)
                xy, whp, pts, scores = xy[mine], whp[mine], pts[mine], scores[mine]
            if top:
                xy[:, 1] += top
                pts[:, :, 1] += top
            parts.append((xy, whp, pts, scores))
        xy, whp, pts, scores = (np.concatenate(c) for c in zip(*parts, strict=True))
        return xy * f, whp * f, pts * f, scores


# the frame is mirrored at its edges by this share of its longer side for the second look
EDGE_MIRROR = 0.1
# a box of the second look is kept if this share of it, at least, lies in the frame: one that
# the mirror completes is about half in it; one found in the mirror image alone is not, nor
# one where the frame is mirrored both ways, at a corner (a quarter: a false face there)
EDGE_INSIDE = 0.4


class CombinedDetector:
    """Faces and plates on one frame; with ``parallel`` the two networks run in two threads at
    once (each network then runs single-threaded inside, which uses 2 cores better).

    With ``edges``, a second look at the frame mirrored at its edges (``EDGE_MIRROR``): a face
    or plate cut by the edge, half in the frame, is completed by its mirror image into one the
    networks find. Cut so, they were mostly missed; the labelled photos cut by one edge
    (``bench/eval_edge_cuts.py``), half inside, plates 0.03-0.70 -> 0.87-0.98, faces 0.43-0.92
    -> 0.57-0.97, by edge (docs/camera.md). The boxes it adds are those that cross the frame's
    edge, at least ``EDGE_INSIDE`` in it (not the mirror image's own), and are no box of the
    first look again. Twice the detection time."""

    def __init__(
        self, detectors: Sequence[Detector], parallel: bool = True, edges: bool = False
    ) -> None:
        self.detectors = list(detectors)
        self.edges = edges
        self._pool = (
            ThreadPoolExecutor(len(self.detectors), thread_name_prefix="gateway-detect")
            if parallel and len(self.detectors) > 1
            else None
        )
        self._lock = threading.Lock()  # one frame at a time: each network is not reentrant

    def detect(self, frame: Image) -> list[Box]:
        with self._lock:
            boxes = self._each(frame)
            if self.edges:
                boxes += self._at_edges(frame, boxes)
            return boxes

    def _each(self, frame: Image) -> list[Box]:
        if self._pool is None:
            return [b for d in self.detectors for b in d.detect(frame)]
        futures = [self._pool.submit(d.detect, frame) for d in self.detectors]
        return [b for fut in futures for b in fut.result()]

    def _at_edges(self, frame: Image, seen: list[Box]) -> list[Box]:
        h, w = frame.shape[:2]
        p = max(8, round(EDGE_MIRROR * max(h, w)))
        mirrored: Any = cv2.copyMakeBorder(frame, p, p, p, p, cv2.BORDER_REFLECT_101)
        added: list[Box] = []
        for b in self._each(mirrored):
            b = b.shifted(-p, -p)
            inside = max(0.0, min(b.x + b.w, w) - max(b.x, 0.0)) * max(
                0.0, min(b.y + b.h, h) - max(b.y, 0.0)
            )
            if inside < EDGE_INSIDE * b.w * b.h or inside == b.w * b.h:
                continue  # in the mirror image, or inside the frame: the first look's
            if any(o.kind is b.kind and _iou(o, b) >= EDGE_SAME for o in seen + added):
                continue
            added.append(b)
        return added

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def load_detectors(settings: DetectorSettings | None = None) -> CombinedDetector:
    """Both detectors, loaded from ``models/`` (never from the network)."""
    s = settings or DetectorSettings()
    if s.threads:
        cv2.setNumThreads(s.threads)
    return CombinedDetector(
        [
            FaceDetector(s.face_score, s.nms, s.face_width),
            PlateDetector(s.plate_score, s.nms, s.plate_width, s.plate_strips, s.plate_second_look),
        ],
        parallel=s.parallel,
        edges=s.edges,
    )
