"""Render ``demo_clip.mp4``: a 640x360, 15 fps, 6 s clip the project may ship.

The scene is drawn here: a road, the public-domain NASA astronaut portrait (Eileen Collins,
``tests/data/astronaut.jpg``, from scikit-image's data) panning and growing as if walking
towards the camera, and a car-like block with a rendered blue licence plate driving the other
way. Run from the repository root: ``.venv/bin/python can_fixtures/camera/make_demo_clip.py``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
W, H, FPS, SECONDS = 640, 360, 15, 6


def plate(text: str = "A 12345") -> np.ndarray:
    """A blue plate with a white border and white characters, like a Chinese civil plate."""
    p = np.zeros((44, 140, 3), np.uint8)
    p[:] = (160, 60, 10)  # BGR blue
    cv2.rectangle(p, (2, 2), (137, 41), (245, 245, 245), 2)
    cv2.putText(p, text, (9, 32), cv2.FONT_HERSHEY_SIMPLEX, 0.95, (250, 250, 250), 2, cv2.LINE_AA)
    return p


def background() -> np.ndarray:
    bg = np.zeros((H, W, 3), np.uint8)
    sky = np.linspace(210, 150, H // 2, dtype=np.uint8)
    bg[: H // 2] = np.stack([sky, sky - 10, sky - 30], axis=1)[:, None, :]
    bg[H // 2 :] = (90, 90, 95)
    for x in range(0, W, 80):  # lane marks
        cv2.rectangle(bg, (x, H - 60), (x + 40, H - 54), (230, 230, 230), -1)
    return bg


def frame(i: int, face: np.ndarray, bg: np.ndarray, lp: np.ndarray) -> np.ndarray:
    t = i / (FPS * SECONDS)
    img = bg.copy()
    # the car: a dark body with the plate, driving right to left
    cx = int(W - 60 - t * 380)
    cv2.rectangle(img, (cx - 150, 150), (cx + 30, 300), (40, 40, 120), -1)
    cv2.rectangle(img, (cx - 130, 160), (cx + 10, 210), (160, 140, 120), -1)
    py, px = 235, cx - 130
    img[py : py + lp.shape[0], px : px + lp.shape[1]] = lp
    # the person: the portrait walking left to right and growing
    size = int(150 + 90 * t)
    person = cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA)
    x0, y0 = int(20 + t * 200), 30
    img[y0 : y0 + size, x0 : x0 + size] = person
    return img


def main() -> None:
    face = cv2.imread(str(ROOT / "tests" / "data" / "astronaut.jpg"))
    if face is None:
        raise SystemExit("tests/data/astronaut.jpg not found")
    out = HERE / "demo_clip.mp4"
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (W, H))
    if not writer.isOpened():
        raise SystemExit("OpenCV cannot write mp4v video here")
    bg, lp = background(), plate()
    for i in range(FPS * SECONDS):
        writer.write(frame(i, face, bg, lp))
    writer.release()
    print(f"{out}: {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
