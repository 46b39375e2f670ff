"""Camera sources and their one-line errors."""

from __future__ import annotations

import pytest

from gateway.camera.source import (
    DeviceSource,
    ImageFolderSource,
    SyntheticSource,
    VideoFileSource,
    open_source,
)
from gateway.errors import CameraError
from tests.camera.conftest import ASTRONAUT, DEMO_CLIP


def test_the_demo_clip_reads_with_its_own_frame_rate():
    src = open_source(str(DEMO_CLIP))
    assert isinstance(src, VideoFileSource)
    assert src.fps == 15 and src.size == (640, 360)
    frames = list(src.frames())
    assert len(frames) == 90
    assert frames[30].t == pytest.approx(2.0)


def test_an_image_folder_is_frames_in_name_order(tmp_path):
    import shutil

    for name in ("b.jpg", "a.jpg"):
        shutil.copy(ASTRONAUT, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    src = open_source(str(tmp_path))
    assert isinstance(src, ImageFolderSource)
    assert [f.name for f in src.frames()] == ["a.jpg", "b.jpg"]


def test_synthetic_frames():
    frames = list(SyntheticSource(count=5, size=(64, 36)).frames())
    assert len(frames) == 5 and frames[0].image.shape == (36, 64, 3)


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: str(p / "missing.mp4"), "no such video file or image folder"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no images in this folder"),
        (lambda p: _write(p / "x.mp4", "not a video"), "cannot read a frame"),
        (lambda p: "", "camera source is empty"),
        (lambda p: "/dev/video99", "no such camera device"),
    ],
)
def test_unusable_sources_are_one_line_camera_errors(tmp_path, make, needle):
    with pytest.raises(CameraError) as err:
        open_source(make(tmp_path))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_device_source_is_live():
    assert DeviceSource.live and not VideoFileSource.live
