"""Fixtures of the camera tests: the shipped public-domain photo and demo clip, and the detectors
(loaded once per session: the real ONNX models in models/)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from gateway.camera.detect import CombinedDetector, load_detectors

ROOT = Path(__file__).resolve().parents[2]
ASTRONAUT = ROOT / "tests" / "data" / "astronaut.jpg"  # NASA portrait, public domain
DEMO_CLIP = ROOT / "can_fixtures" / "camera" / "demo_clip.mp4"
VFR_CLIP = ROOT / "tests" / "data" / "vfr_testsrc.mkv"  # variable frame rate, see tests/data


@pytest.fixture(scope="session")
def detector() -> CombinedDetector:
    d = load_detectors()
    yield d
    d.close()


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    img = cv2.imread(str(ASTRONAUT))
    assert img is not None, ASTRONAUT
    return img


def detail(gray: np.ndarray) -> float:
    """Edge energy: the variance of the Laplacian, which a blur removes."""
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def crop(img: np.ndarray, box) -> np.ndarray:
    x, y, w, h = (int(round(v)) for v in (box.x, box.y, box.w, box.h))
    return cv2.cvtColor(img[max(y, 0) : y + h, max(x, 0) : x + w], cv2.COLOR_BGR2GRAY)


def grey_clip_and_its_first_half(
    folder: Path, frames: int, fps: float, size: tuple[int, int], step: int
) -> tuple[Path, Path]:
    """An MJPG clip of ``frames`` grey frames (``step`` brighter each) of ``size`` (width,
    height) at ``fps``, and a copy cut at half its bytes: a recording cut short."""
    full = folder / "full.avi"
    w = cv2.VideoWriter(str(full), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for i in range(frames):
        w.write(np.full((size[1], size[0], 3), i * step, np.uint8))
    w.release()
    cut = folder / "cut.avi"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return full, cut
