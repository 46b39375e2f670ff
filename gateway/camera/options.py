"""The camera's settings: plain types with no OpenCV import, so that building the command line
(``gateway --help``, every ``gateway replay``) does not load OpenCV and its ~40 MB."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import ConfigError


class Method(enum.Enum):
    GAUSSIAN = "gaussian"
    PIXELATE = "pixelate"
    FILL = "fill"

    @classmethod
    def parse(cls, text: str | Method) -> Method:
        if isinstance(text, Method):
            return text
        try:
            return cls(text.strip().lower())
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ConfigError(f"anonymisation method {text!r}: expected one of {names}") from None


PLATE_STRIPS = range(1, 5)  # the plate_strips a setting may ask for
# the detector input widths a setting may ask for (1 px found nothing; 30000 px took 24 GB)
DETECTOR_WIDTHS = range(160, 4097)


@dataclass(frozen=True)
class DetectorSettings:
    """How the detectors run. Widths are the detector input widths: the frame is scaled to that
    width (keeping its aspect) before inference. 0 means the frame's own width, up to 2560 (what
    ``gateway anonymize`` uses: offline, recall on small faces matters more than speed)."""

    face_score: float = 0.25
    plate_score: float = 0.1
    nms: float = 0.3
    face_width: int = 640
    plate_width: int = 960
    # the plate network's input in this many overlapping strips: 3 keeps peak memory with one
    # camera under 150 MB at the same recall (docs/camera.md, "Memory")
    plate_strips: int = 3
    threads: int = 0  # cv2.setNumThreads; 0 leaves OpenCV's default
    # faces and plates in two threads at once; with plates in strips, one after the other is
    # both faster (17 vs 16.5 frames/s at 1280x720) and smaller (141 vs 146 MB) on 2 cores
    parallel: bool = False
    # at the frame's own width (0), the plate network looks at a photo narrower than 1600
    # pixels a second time, 1.5 times larger (PlateDetector.detect): a photo, not a video,
    # whose plate is seen in frame after frame (2.5x the time of gateway anonymize on a clip)
    plate_second_look: bool = True
    # a second look at the frame mirrored at its edges, for the faces and plates the edge cuts
    # (CombinedDetector): twice the detection time, so off in the stream by default (a 1280x720
    # stream 29 -> 13 frames/s here), on in gateway anonymize
    edges: bool = False


# grown on every side of a detected box, as a share of its size: YuNet's boxes are tighter than
# a labelled face (chin, ears, hair); at 0.6 every detected true face and plate of the labelled
# photos has >= 95 % of its pixels altered, at 0.4 three faces in 244 did not
DEFAULT_MARGIN = 0.6


@dataclass(frozen=True)
class AnonymiserSettings:
    """How detected faces and plates are blurred, and how often the detectors run."""

    method: Method = Method.GAUSSIAN
    margin: float = DEFAULT_MARGIN
    detect_every: int = 1
    memory: int = 5
    timeout_s: float = 2.0
    detector: DetectorSettings = field(default_factory=DetectorSettings)


ROTATIONS = (0, 90, 180, 270)  # degrees clockwise, as [[camera]] rotate takes them


def check_camera(cam: Any, where: str) -> None:
    """A ``[[camera]]`` table's values, checked without a camera (when the settings are read).
    ``where`` begins each error: ``camera front``, ``gateway.toml: [[camera]] #1``."""
    if cam.detect_every < 1:
        raise ConfigError(f"{where}: detect_every must be >= 1, got {cam.detect_every}")
    if cam.memory < 0:
        raise ConfigError(f"{where}: memory must be >= 0, got {cam.memory}")
    for key in ("face_width", "plate_width"):
        if getattr(cam, key) not in DETECTOR_WIDTHS:
            raise ConfigError(
                f"{where}: {key} must be {DETECTOR_WIDTHS[0]} to {DETECTOR_WIDTHS[-1]} "
                f"pixels, got {getattr(cam, key)}"
            )
    if cam.plate_strips not in PLATE_STRIPS:
        raise ConfigError(
            f"{where}: plate_strips must be {PLATE_STRIPS[0]} to {PLATE_STRIPS[-1]}, "
            f"got {cam.plate_strips}"
        )
    if cam.rotate not in ROTATIONS:
        raise ConfigError(f"{where}: rotate must be one of 0, 90, 180, 270, got {cam.rotate!r}")
    try:
        Method.parse(cam.method)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
