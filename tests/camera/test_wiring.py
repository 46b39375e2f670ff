"""The gateway's camera stages come from ``--video`` and ``[[camera]]`` tables."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.camera.options import Method
from gateway.camera.wiring import camera_stages
from gateway.errors import CameraError, ConfigError
from gateway.settings import CameraSource, Settings
from tests.camera.conftest import DEMO_CLIP


def _settings(tmp_path, **kw) -> Settings:
    s = Settings()
    return dataclasses.replace(
        s,
        gateway=dataclasses.replace(s.gateway, ledger=str(tmp_path / "l.jsonl"), window=5.0),
        **kw,
    )


def test_a_bare_video_gets_the_defaults_and_a_store_beside_the_ledger(tmp_path):
    (stage,) = camera_stages([str(DEMO_CLIP)], _settings(tmp_path))
    assert stage.name == "front" and stage.window == 5.0 and stage.speed == 1.0
    assert stage.anonymiser.s.method is Method.GAUSSIAN
    assert (
        stage.store is not None and stage.store.dir == tmp_path / "frames" / Settings().gateway.vin
    )
    assert stage.dropped == 0


def test_a_camera_table_sets_name_method_and_detection_rate(tmp_path):
    cam = CameraSource(source=str(DEMO_CLIP), name="rear", method="fill", detect_every=3, memory=2)
    s = _settings(tmp_path, camera=[cam])
    s = dataclasses.replace(
        s,
        gateway=dataclasses.replace(s.gateway, state_dir=str(tmp_path / "state")),
        replay=dataclasses.replace(s.replay, fast=True),
    )
    (stage,) = camera_stages([cam.source], s)
    assert stage.name == "rear" and stage.speed is None
    assert stage.anonymiser.s.method is Method.FILL
    assert stage.anonymiser.s.detect_every == 3 and stage.anonymiser.s.memory == 2
    assert stage.store is not None and stage.store.dir.parent == tmp_path / "state" / "frames"
    widths = [(d.width, type(d).__name__) for d in stage.anonymiser.detector.detectors]
    assert widths == [(640, "FaceDetector"), (960, "PlateDetector")]  # the measured defaults


def test_a_camera_table_sets_the_detector_input_widths(tmp_path):
    cam = CameraSource(source="synthetic", face_width=480, plate_width=640)
    (stage,) = camera_stages([cam.source], _settings(tmp_path, camera=[cam]))
    assert [d.width for d in stage.anonymiser.detector.detectors] == [480, 640]
    assert stage.anonymiser.s.detector.plate_width == 640


def test_plates_run_in_three_strips_unless_a_camera_table_says_otherwise(tmp_path):
    (default,) = camera_stages(["synthetic"], _settings(tmp_path))
    assert default.anonymiser.detector.detectors[1].strips == 3
    cam = CameraSource(source="synthetic", plate_strips=1)
    (stage,) = camera_stages([cam.source], _settings(tmp_path, camera=[cam]))
    assert stage.anonymiser.detector.detectors[1].strips == 1


def test_two_clips_get_two_names(tmp_path):
    a, b = camera_stages([str(DEMO_CLIP), "synthetic"], _settings(tmp_path))
    assert (a.name, b.name) == ("front", "front-2")


@pytest.mark.parametrize(
    ("cam", "error", "needle"),
    [
        (CameraSource(source="missing.mp4"), CameraError, "no such video file"),
        (CameraSource(source="synthetic", method="swirl"), ConfigError, "swirl"),
        (CameraSource(source="synthetic", detect_every=0), ConfigError, "detect_every"),
        (CameraSource(source="synthetic", plate_width=64), ConfigError, "plate_width"),
        (CameraSource(source="synthetic", plate_strips=0), ConfigError, "plate_strips"),
        (CameraSource(source="synthetic", plate_strips=5), ConfigError, "plate_strips"),
    ],
)
def test_bad_camera_settings_fail_before_anything_runs(tmp_path, cam, error, needle):
    with pytest.raises(error, match=needle):
        camera_stages([cam.source], _settings(tmp_path, camera=[cam]))


def test_photos_of_a_folder_are_each_detected_on_their_own(tmp_path):
    """An image folder was streamed like a video: with detect_every 3 the photos between two
    detections got only the boxes of other pictures (faces left unblurred in the frame store),
    and the frame memory carried boxes onto the next, unrelated photos."""
    import asyncio

    from gateway.camera.anonymiser import FrameAnonymiser
    from gateway.camera.detect import load_detectors
    from gateway.camera.options import AnonymiserSettings
    from gateway.camera.source import read_image
    from tests.conftest import shared_or_skip

    faces = shared_or_skip("data", "vision", "faces")
    photos = sorted(p for p in faces.iterdir() if p.suffix == ".jpg")[:12]
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, p in enumerate(photos):  # links, not copies: the photos stay in ../shared
        (folder / f"{i:02d}.jpg").symlink_to(p)
    cam = CameraSource(source=str(folder), name="photos", detect_every=3, memory=5)
    s = dataclasses.replace(_settings(tmp_path, camera=[cam]), replay=Settings().replay)
    s = dataclasses.replace(s, replay=dataclasses.replace(s.replay, fast=True))
    (stage,) = camera_stages([cam.source], s)
    assert (stage.anonymiser.s.detect_every, stage.anonymiser.s.memory) == (1, 0)
    # the faces the stream blurs are the faces found on each photo alone, no more, no fewer
    alone = FrameAnonymiser(load_detectors(stage.anonymiser.s.detector),
                            AnonymiserSettings(detector=stage.anonymiser.s.detector))  # fmt: skip
    try:
        want = [alone.process(f).faces for f in _frames(folder, read_image)]
    finally:
        alone.close()
    got = []

    async def emit(summary) -> None:
        got.append(summary)

    asyncio.run(stage.run(emit, asyncio.Event()))
    assert sum(w > 0 for w in want) >= 8  # the positive control: photos with faces
    assert sum(x.faces_blurred for x in got) == sum(want)
    assert sum(x.frames_anonymised for x in got) == len(photos)


def _frames(folder, read):
    from gateway.camera.source import Frame

    return [Frame(i, i / 10, read(p), p.name) for i, p in enumerate(sorted(folder.iterdir()))]


def test_a_camera_mounted_on_its_side_is_turned_upright_before_detection(tmp_path, astronaut):
    import asyncio

    import cv2

    # GIVEN the photos a camera turned a quarter to the left takes (the same portrait, 3 times)
    folder = tmp_path / "side"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), cv2.rotate(astronaut, cv2.ROTATE_90_COUNTERCLOCKWISE))

    def faces(rotate: int) -> int:
        cam = CameraSource(source=str(folder), name="side", rotate=rotate)
        (stage,) = camera_stages([cam.source], _settings(tmp_path, camera=[cam]))
        got = []

        async def emit(summary) -> None:
            got.append(summary)

        stage.speed = None
        asyncio.run(stage.run(emit, asyncio.Event()))
        return sum(s.faces_blurred for s in got)

    # THEN turned back (rotate = 90), the frames are upright (as stored: the portrait's own
    # height and width) and the face is found on every photo
    assert faces(90) == 3
    stored = sorted((tmp_path / "frames").rglob("*.jpg"))
    assert stored and all(cv2.imread(str(f)).shape == astronaut.shape for f in stored)
    with pytest.raises(ConfigError, match="rotate must be one of 0, 90, 180, 270"):
        camera_stages([str(folder)], _settings(tmp_path, camera=[
            CameraSource(source=str(folder), rotate=45)]))  # fmt: skip


def test_the_second_look_at_the_edges_is_off_in_the_stream_unless_a_camera_table_asks(tmp_path):
    # (it doubles the detection time: a 1280x720 stream 29 -> 13 frames/s here)
    (default,) = camera_stages(["synthetic"], _settings(tmp_path))
    assert default.anonymiser.detector.edges is False
    cam = CameraSource(source="synthetic", edges=True)
    (stage,) = camera_stages([cam.source], _settings(tmp_path, camera=[cam]))
    assert stage.anonymiser.detector.edges is True
