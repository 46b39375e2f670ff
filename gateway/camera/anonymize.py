"""Anonymisation: blur, pixelate or fill every detected face and plate, with a margin; plates as
the polygon of their 4 corners; a frame memory so one missed detection does not leak.

Pure: takes a frame and boxes, returns a new frame; no files, no clock, no threads.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from gateway.camera.detect import Box, Image, Kind
from gateway.camera.options import DEFAULT_MARGIN, Method
from gateway.errors import ConfigError


@dataclass(frozen=True, slots=True)
class AnonymisedFrame:
    """A frame after anonymisation: the only image type the frame store accepts."""

    image: Image
    index: int
    t: float  # seconds of video time
    faces: int
    plates: int


def region_mask(
    shape: tuple[int, ...], box: Box, margin: float
) -> tuple[tuple[int, int, int, int], Image | None] | None:
    """The rectangle (x0, y0, x1, y1) to alter, clipped to the frame, and for plates with corners
    a mask of the polygon inside it (None: the whole rectangle). ``margin`` is a share of the
    box size added on every side."""
    fh, fw = shape[:2]
    mx, my = box.w * margin, box.h * margin
    x0, y0 = int(np.floor(box.x - mx)), int(np.floor(box.y - my))
    x1, y1 = int(np.ceil(box.x + box.w + mx)), int(np.ceil(box.y + box.h + my))
    poly = None
    if box.corners is not None and len(box.corners) == 4:
        pts = np.array(box.corners, np.float32)
        centre = pts.mean(axis=0)
        # grow the polygon by the margin (plus one pixel for rounding) around its centre
        span = np.maximum(pts.max(axis=0) - pts.min(axis=0), 1.0)
        grow = 1.0 + 2.0 * margin + 2.0 / span
        poly = (pts - centre) * grow + centre
        px0, py0 = np.floor(poly.min(axis=0)).astype(int)
        px1, py1 = np.ceil(poly.max(axis=0)).astype(int)
        # the region is the union of the margin box and the polygon's bounding box
        x0, y0, x1, y1 = min(x0, px0), min(y0, py0), max(x1, px1), max(y1, py1)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, fw), min(y1, fh)
    if x1 <= x0 or y1 <= y0:
        return None
    if poly is None:
        return (x0, y0, x1, y1), None
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(mask, [np.round(poly - (x0, y0)).astype(np.int32)], 255)
    # the axis-aligned margin box is altered too: the polygon only adds to it
    bx0 = max(int(np.floor(box.x - mx)) - x0, 0)
    by0 = max(int(np.floor(box.y - my)) - y0, 0)
    bx1 = min(int(np.ceil(box.x + box.w + mx)) - x0, x1 - x0)
    by1 = min(int(np.ceil(box.y + box.h + my)) - y0, y1 - y0)
    if bx1 > bx0 and by1 > by0:
        mask[by0:by1, bx0:bx1] = 255
    return (x0, y0, x1, y1), mask


BLUR_ACROSS = 24  # pixels across the object in the copy that is blurred (Gaussian)


def _obscure(roi: Image, method: Method, box: Box) -> Image:
    h, w = roi.shape[:2]
    size = max(box.w, box.h, 1.0)
    if method is Method.FILL:
        return np.zeros_like(roi)
    if method is Method.PIXELATE:
        # ~6 blocks across the object, whatever its size (8 left a face's layout readable)
        bs = max(2, int(round(size / 6)))
        small = cv2.resize(roi, (max(1, w // bs), max(1, h // bs)), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
    # Gaussian: sigma a fifth of the object, so eyes, mouth and characters merge; computed on a
    # copy shrunk by a whole factor n to ~24 pixels across the object (the result is just as
    # smooth and large kernels stay cheap). A whole factor takes OpenCV's block-average path
    # (3-4x faster than INTER_AREA at a fractional scale); the up to n - 1 rows and columns
    # past the last whole block are covered by stretching the result over the whole region.
    n = max(1, round(size / BLUR_ACROSS))
    sw, sh = max(1, w // n), max(1, h // n)
    small = roi
    if n > 1:
        small = cv2.resize(roi[: sh * n, : sw * n], (sw, sh), interpolation=cv2.INTER_AREA)
    kernel = _gaussian_kernel(max(1.0, round(size / n / 5.0, 1)))  # few kernels to cache
    blurred = cv2.sepFilter2D(small, -1, kernel, kernel, borderType=cv2.BORDER_REPLICATE)
    return blurred if n == 1 else cv2.resize(blurred, (w, h), interpolation=cv2.INTER_LINEAR)


@functools.lru_cache(maxsize=256)
def _gaussian_kernel(sigma: float) -> npt.NDArray[Any]:
    """The kernel ``cv2.GaussianBlur`` uses for 8-bit images at ``sigma`` (6 sigma wide), as
    floats: ``sepFilter2D`` with it gives the blur rounded to the nearest level, 3-5x faster
    than GaussianBlur's own 8-bit path at these widths, whose fixed-point sums are up to 2
    levels off (tests/camera/test_anonymize.py)."""
    ksize = int(round(sigma * 6 + 1)) | 1
    kernel = cv2.getGaussianKernel(ksize, sigma, cv2.CV_32F)
    kernel.setflags(write=False)  # shared by every caller, in every thread
    return kernel


def anonymize(
    frame: Image,
    boxes: Iterable[Box],
    method: Method = Method.GAUSSIAN,
    margin: float = DEFAULT_MARGIN,
    *,
    index: int = 0,
    t: float = 0.0,
) -> AnonymisedFrame:
    """A copy of ``frame`` with every box obscured; the input is left untouched."""
    out = frame.copy()
    faces = plates = 0
    for box in boxes:
        region = region_mask(out.shape, box, margin)
        if region is None:
            continue
        (x0, y0, x1, y1), mask = region
        roi = out[y0:y1, x0:x1]
        done = _obscure(roi, method, box)
        if mask is None:
            roi[...] = done
        else:
            # OpenCV's masked copy writes into the frame's view in place, ~70x faster than
            # numpy's broadcast ``where``; numpy's only if OpenCV had to allocate instead
            if cv2.copyTo(done, mask, roi) is not roi:
                np.copyto(roi, done, where=(mask > 0)[..., None] if roi.ndim == 3 else mask > 0)
        if box.kind is Kind.FACE:
            faces += 1
        else:
            plates += 1
    return AnonymisedFrame(out, index, t, faces, plates)


def blackout(frame: Image, *, index: int = 0, t: float = 0.0) -> AnonymisedFrame:
    """Fail closed: the whole frame filled (used when detection failed and frames are kept)."""
    return AnonymisedFrame(np.zeros_like(frame), index, t, 0, 0)


class FrameMemory:
    """Boxes detected in the last ``n`` detection results stay applied: a face found in frame
    100 is also blurred in frames 101..100+n, so one missed detection does not leak it."""

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ConfigError(f"camera memory must be >= 0 frames, got {n}")
        self.n = n
        self._seen: deque[tuple[int, tuple[Box, ...]]] = deque()

    def update(self, index: int, boxes: Sequence[Box]) -> None:
        """Record the boxes detected on frame ``index``."""
        self._seen.append((index, tuple(boxes)))

    def boxes(self, index: int) -> list[Box]:
        """Every box to apply to frame ``index``: detected on it or on the ``n`` frames before
        it. Older entries are forgotten."""
        while self._seen and self._seen[0][0] < index - self.n:
            self._seen.popleft()
        return [b for i, bs in self._seen if i <= index for b in bs]

    def latest(self) -> int | None:
        """Index of the newest detection result, if any."""
        return self._seen[-1][0] if self._seen else None
