"""Builds the camera stages the gateway runs from its settings (``[[camera]]`` tables and
``gateway replay --video``)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from gateway.camera.anonymiser import FrameAnonymiser
from gateway.camera.detect import load_detectors
from gateway.camera.options import (
    AnonymiserSettings,
    DetectorSettings,
    Method,
    check_camera,
)
from gateway.camera.pipeline import CameraStage, store_dir
from gateway.camera.source import RotatedSource, open_source
from gateway.camera.store import FrameStore, StoreSettings

log = logging.getLogger("gateway.camera")

# The stream's detector input widths: measured on ../shared/data/vision, faces at 640 px and plates
# at 960 px keep recall >= 0.95 for 640x360 and 1280x720 frames (bench/eval_anonymisation.py).
STREAM_DETECTOR = DetectorSettings()


def camera_settings(spec: str, settings: Any) -> Any:
    """The ``[[camera]]`` table naming this source, or the defaults for a bare ``--video``."""
    from gateway.settings import CameraSource

    for cam in settings.camera:
        if cam.source == spec:
            return cam
    return CameraSource(source=spec)


def camera_stages(videos: list[str], settings: Any) -> list[CameraStage]:
    """One stage per source; a source that cannot be opened fails here, before anything runs."""
    stages: list[CameraStage] = []
    names: set[str] = set()
    g = settings.gateway
    speed = None if settings.replay.fast else settings.replay.speed
    for spec in dict.fromkeys(videos):  # a source named twice runs once
        cam = camera_settings(spec, settings)
        name = cam.name
        if name in names:  # two --video clips: front, front-2, ...
            name = f"{cam.name}-{len(names) + 1}"
        names.add(name)
        check_camera(cam, f"camera {name}")
        detector = dataclasses.replace(
            STREAM_DETECTOR,
            face_width=cam.face_width,
            plate_width=cam.plate_width,
            plate_strips=cam.plate_strips,
            edges=cam.edges,
        )
        source = open_source(spec)
        if cam.rotate:
            source = RotatedSource(source, cam.rotate)
        detect_every, memory = cam.detect_every, cam.memory
        if source.stills and (detect_every, memory) != (1, 0):
            # photos, not a video: a photo held between two detections would get the boxes of
            # two other pictures, and the frame memory would carry boxes onto unrelated ones
            log.info(
                "camera %s: %s holds photos: each is detected on its own (detect_every %d and "
                "memory %d are for videos)",
                name,
                spec,
                detect_every,
                memory,
            )
            detect_every, memory = 1, 0
        anonymiser = FrameAnonymiser(
            load_detectors(detector),
            AnonymiserSettings(
                method=Method.parse(cam.method),
                detect_every=detect_every,
                memory=memory,
                detector=detector,
            ),
        )
        store = FrameStore(store_dir(g), name, StoreSettings())
        log.info("camera %s: %s -> %s", name, spec, Path(store.dir))
        stages.append(
            CameraStage(source, anonymiser, name=name, window=g.window, speed=speed, store=store)
        )
    return stages
