"""Anonymisation (pure): detail is removed, the margin and plate polygons are honoured, the input
is never modified, and the frame memory carries boxes over missed detections."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest

from gateway.camera.anonymize import (
    AnonymisedFrame,
    FrameMemory,
    Method,
    _gaussian_kernel,
    anonymize,
    blackout,
    region_mask,
)
from gateway.camera.detect import Box, Kind
from gateway.errors import ConfigError
from tests.camera.conftest import crop, detail


@pytest.mark.parametrize(("method", "keep"), [(Method.GAUSSIAN, 0.05), (Method.FILL, 0.0)])
def test_the_face_box_loses_most_of_its_detail(detector, astronaut, method, keep):
    boxes = detector.detect(astronaut)
    face = next(b for b in boxes if b.kind is Kind.FACE)
    before = crop(astronaut, face)
    out = anonymize(astronaut, boxes, method)
    after = crop(out.image, face)
    assert detail(before) > 200  # a real face has detail to lose
    assert detail(after) <= keep * detail(before), (detail(before), detail(after))
    assert after.var() < 0.2 * before.var()
    assert out.faces == 1


def _changes(gray: np.ndarray) -> float:
    """Share of neighbouring pixels (across and down) that differ: ~1 for a photo of a face,
    about 2 / block size for a picture made of constant blocks."""
    g = gray.astype(np.int16)
    return float(((np.diff(g, axis=1) != 0).mean() + (np.diff(g, axis=0) != 0).mean()) / 2)


def test_pixelation_turns_the_face_into_a_few_constant_blocks(detector, astronaut):
    # edge energy is the wrong yardstick here: block edges are edges, wherever the grid falls
    boxes = detector.detect(astronaut)
    face = next(b for b in boxes if b.kind is Kind.FACE)
    before = crop(astronaut, face)
    after = crop(anonymize(astronaut, boxes, Method.PIXELATE).image, face)
    assert _changes(before) > 0.5
    # about 6 blocks across the face: a change at most every ~face/6 pixels, plus the grid lines
    assert _changes(after) <= 3 * 6 / max(face.w, face.h) + 0.02, _changes(after)
    assert _changes(after) < 0.2 * _changes(before)


def test_the_input_frame_is_left_untouched(astronaut):
    copy = astronaut.copy()
    anonymize(astronaut, [Box(Kind.FACE, 100, 100, 80, 80, 0.9)], Method.FILL)
    assert np.array_equal(copy, astronaut)


def test_every_pixel_of_the_box_and_its_margin_is_altered_and_nothing_else():
    img = np.full((200, 300, 3), 200, np.uint8)
    img[::2, ::2] = 10  # texture everywhere, so every blurred pixel changes
    out = anonymize(img, [Box(Kind.FACE, 100, 50, 40, 60, 0.9)], Method.GAUSSIAN, margin=0.25)
    changed = np.any(out.image != img, axis=2)
    # box 100..140 x 50..110 plus 10 px / 15 px margins
    assert changed[35:125, 90:150].mean() > 0.99
    assert not changed[:30].any() and not changed[130:].any()
    assert not changed[:, :85].any() and not changed[:, 155:].any()


@pytest.mark.parametrize("sigma", [1.0, 2.5, 4.8, 7.3, 9.6])
def test_the_blur_is_opencvs_gaussian_blur_rounded_to_the_nearest_level(sigma):
    # the anonymiser filters with the kernel GaussianBlur would use, as floats (faster); the
    # reference is GaussianBlur on floats, with the same kernel width as its 8-bit path
    img = np.random.default_rng(7).integers(0, 256, (40, 57, 3), dtype=np.uint8)
    k = _gaussian_kernel(sigma)
    ours = cv2.sepFilter2D(img, -1, k, k, borderType=cv2.BORDER_REPLICATE)
    width = round(sigma * 6 + 1) | 1
    exact = cv2.GaussianBlur(
        img.astype(np.float32), (width, width), sigma, borderType=cv2.BORDER_REPLICATE
    )
    assert ours.dtype == np.uint8
    assert np.abs(ours - exact).max() <= 0.5 + 1e-3


def _blurred(shape: tuple[int, ...], box: Box) -> tuple[np.ndarray, tuple[int, ...], Any]:
    """Which pixels of a textured image (every blurred pixel changes) a Gaussian blur of ``box``
    altered, the region ``region_mask`` gives for it, and its polygon mask."""
    img = np.full(shape, 200, np.uint8)
    img[::2, ::2] = 10
    region = region_mask(img.shape, box, 0.6)
    assert region is not None
    out = anonymize(img, [box], Method.GAUSSIAN, 0.6).image
    changed = out != img if img.ndim == 2 else np.any(out != img, axis=2)
    return changed, region[0], region[1]


@pytest.mark.parametrize(
    ("w", "h"), [(1, 1), (5, 5), (23, 30), (37, 41), (61, 20), (150, 151), (333, 9), (4000, 3000)]
)
def test_a_blurred_box_of_any_size_alters_its_whole_region_and_nothing_else(w, h):
    # the blurred copy is shrunk by a whole factor: the rows and columns past its last whole
    # block must be covered too
    changed, (x0, y0, x1, y1), _ = _blurred((900, 1000, 3), Box(Kind.FACE, 211, 307, w, h, 0.9))
    assert changed[y0:y1, x0:x1].all()
    changed[y0:y1, x0:x1] = False
    assert not changed.any()


@pytest.mark.parametrize("size", [12, 30, 45, 80, 200, 600])
def test_the_blur_erases_detail_a_fifth_of_the_object_wide_at_every_size(size):
    # a checkerboard of squares an eighth of the object: a blur of sigma a fifth of the object
    # leaves nothing of it, whether the copy is blurred as it is (small objects) or shrunk
    # first; a blur of half a pixel of the shrunk copy would leave a third of it or more
    side = max(1, size // 8)
    yy, xx = np.indices((1400, 1400))
    img = np.where((yy // side + xx // side) % 2 == 0, 28, 228).astype(np.uint8)
    img = np.dstack([img] * 3)
    box = Box(Kind.FACE, 101, 103, size, size, 0.9)
    out = anonymize(img, [box], Method.GAUSSIAN, 0.6).image
    before, after = crop(img, box).astype(float), crop(out, box).astype(float)
    assert before.std() > 90
    assert after.std() < 0.05 * before.std(), after.std()


@pytest.mark.parametrize("shape", [(120, 220, 3), (120, 220)])
def test_a_blurred_plate_alters_its_polygon_and_box_and_nothing_else(shape):
    corners = ((50.0, 40.0), (130.0, 30.0), (130.0, 50.0), (50.0, 60.0))
    plate = Box(Kind.PLATE, 50, 38, 60, 20, 0.9, corners)
    changed, (x0, y0, x1, y1), mask = _blurred(shape, plate)
    assert mask is not None and not mask.all()
    assert np.array_equal(changed[y0:y1, x0:x1], mask > 0)
    changed[y0:y1, x0:x1] = False
    assert not changed.any()


def test_a_plate_is_obscured_as_its_corner_polygon_plus_the_box():
    img = np.zeros((100, 200, 3), np.uint8)
    img[::2, ::2] = 255
    # a slanted plate: the polygon reaches beyond its (narrow) box on the right
    corners = ((50.0, 40.0), (130.0, 30.0), (130.0, 50.0), (50.0, 60.0))
    plate = Box(Kind.PLATE, 50, 38, 60, 20, 0.9, corners)
    region = region_mask(img.shape, plate, 0.0)
    assert region is not None
    (x0, y0, x1, y1), mask = region
    assert x1 >= 130 and mask is not None
    assert mask[:, 0].any() and not mask[-1, -1] and not mask[0, 0]  # a polygon, not the rectangle
    out = anonymize(img, [plate], Method.FILL, margin=0.0)
    assert out.plates == 1
    assert (out.image[45, 52:128] == 0).all()  # along the plate
    assert (out.image[2::2, 2::2][:5] == 255).all()  # far away: untouched


def test_boxes_outside_the_frame_are_clipped_or_skipped():
    img = np.full((50, 50, 3), 128, np.uint8)
    out = anonymize(
        img,
        [Box(Kind.FACE, -20, -20, 30, 30, 0.9), Box(Kind.FACE, 500, 500, 10, 10, 0.9)],
        Method.FILL,
    )
    assert (out.image[:5, :5] == 0).all()
    assert out.faces == 1


def test_blackout_keeps_nothing():
    frame = blackout(np.full((10, 10, 3), 99, np.uint8), index=3, t=0.1)
    assert isinstance(frame, AnonymisedFrame) and not frame.image.any()


def test_frame_memory_applies_a_box_to_the_next_n_frames_only():
    mem = FrameMemory(2)
    face = Box(Kind.FACE, 1, 1, 5, 5, 0.9)
    mem.update(10, [face])
    mem.update(11, [])  # a missed detection
    assert mem.boxes(11) == [face]
    assert mem.boxes(12) == [face]
    assert mem.boxes(13) == []


def test_unknown_method_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="expected one of gaussian, pixelate, fill"):
        Method.parse("swirl")
    assert Method.parse(" Pixelate ") is Method.PIXELATE
