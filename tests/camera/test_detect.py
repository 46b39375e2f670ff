"""Real inference with the shipped ONNX models on images the project may ship."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from gateway.camera.detect import (
    MODELS,
    DetectorSettings,
    FaceDetector,
    Kind,
    PlateDetector,
    _priors,
    load_detectors,
)
from tests.camera.conftest import DEMO_CLIP


def test_the_astronauts_face_is_found_where_it_is(detector, astronaut):
    boxes = detector.detect(astronaut)
    faces = [b for b in boxes if b.kind is Kind.FACE]
    assert len(faces) == 1, boxes
    f = faces[0]
    # the face of the 512x512 portrait: around x 180-270, y 55-180
    cx, cy = f.x + f.w / 2, f.y + f.h / 2
    assert 200 < cx < 250 and 90 < cy < 140, f
    assert 60 < f.w < 140 and f.score > 0.5


def test_the_rendered_plate_in_the_demo_clip_is_found_with_its_corners(detector):
    cap = cv2.VideoCapture(str(DEMO_CLIP))
    ok, frame = cap.read()
    cap.release()
    assert ok
    plates = [b for b in detector.detect(frame) if b.kind is Kind.PLATE]
    assert len(plates) >= 1
    p = max(plates, key=lambda b: b.score)
    # make_demo_clip.py draws a 140x44 plate at x = 640 - 60 - 130 = 450, y = 235 in frame 0
    assert abs(p.x - 450) < 15 and abs(p.y - 235) < 10 and abs(p.w - 140) < 25, p
    assert p.corners is not None and len(p.corners) == 4
    xs = [x for x, _ in p.corners]
    assert min(xs) < p.x + 20 and max(xs) > p.x + p.w - 20


def test_detection_is_scaled_back_to_frame_pixels(astronaut):
    # the same face, found on a 2x frame by a detector that runs at a fixed 640 px width
    det = FaceDetector(width=640)
    small = det.detect(astronaut)
    big = det.detect(cv2.resize(astronaut, (1024, 1024)))
    assert len(small) == len(big) == 1
    assert big[0].x == pytest.approx(2 * small[0].x, abs=8)
    assert big[0].w == pytest.approx(2 * small[0].w, abs=10)


def test_a_blank_frame_has_no_detections(detector):
    assert detector.detect(np.zeros((360, 640, 3), np.uint8)) == []


def test_plate_priors_match_the_network_outputs():
    net = PlateDetector(width=640)._net
    img = np.zeros((360, 640, 3), np.uint8)
    net.setInput(cv2.dnn.blobFromImage(img, 1.0, (640, 360), PlateDetector.MEAN))
    loc = net.forward("loc")
    assert loc.shape[1] == len(_priors(640, 360))


def test_models_load_from_the_repository_not_the_network():
    assert (MODELS / "yunet_n_640_640.onnx").is_file()
    assert (MODELS / "clp_det.onnx").is_file()
    assert (MODELS / "LICENSES.md").is_file()


def test_sequential_and_parallel_detection_agree(astronaut):
    a = load_detectors(DetectorSettings(parallel=False))
    b = load_detectors(DetectorSettings(parallel=True))
    try:
        assert a.detect(astronaut) == b.detect(astronaut)
    finally:
        a.close()
        b.close()
