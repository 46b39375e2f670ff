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
from tests.camera.conftest import ASTRONAUT, DEMO_CLIP, VFR_CLIP, grey_clip_and_its_first_half


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


def _gradient(path, w=64, h=36):
    import cv2
    import numpy as np

    cv2.imwrite(
        str(path), np.tile(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (h, 1, 3))
    )


def _stream(source):
    import asyncio

    from gateway.camera.anonymiser import FrameAnonymiser
    from gateway.camera.options import AnonymiserSettings
    from gateway.camera.pipeline import CameraStage

    class NoFaces:
        def detect(self, frame):
            return []

    stage = CameraStage(source, FrameAnonymiser(NoFaces(), AnonymiserSettings()), name="c",
                        window=60.0, speed=None, store=None)  # fmt: skip
    out = []

    async def emit(summary) -> None:
        out.append(summary)

    asyncio.run(stage.run(emit, asyncio.Event()))
    return out


def test_an_unreadable_photo_of_a_folder_is_a_frame_seen_and_dropped(tmp_path, caplog):
    for name in ("a.jpg", "c.png"):
        _gradient(tmp_path / name)
    (tmp_path / "b.jpg").write_text("not a photo")
    (tmp_path / "d.gif").write_bytes(b"GIF89a")  # read by name; not a GIF inside
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "sub").mkdir()
    (summary,) = _stream(open_source(str(tmp_path)))
    assert (summary.frames_seen, summary.frames_anonymised, summary.frames_dropped) == (4, 2, 2)
    assert summary.health == "degraded"
    said = caplog.text
    assert "1 file(s) not read, not named as images (notes.txt)" in said
    assert "1 sub-folder(s) not read (sub)" in said


def test_a_camera_that_never_opens_says_failed_in_a_summary():
    # /dev/null exists but is no V4L2 device: the stage fails before its first frame
    (summary,) = _stream(DeviceSource("/dev/null"))
    assert summary.health == "failed" and summary.frames_seen == 0


def test_a_video_cut_short_says_how_many_of_its_frames_were_read(tmp_path, caplog):
    _, cut = grey_clip_and_its_first_half(tmp_path, 40, 10.0, (64, 36), 5)
    src = VideoFileSource(cut)
    n = len(list(src.frames()))
    assert 0 < n < 40
    assert f"{n} of the 40 frames its header declares could be read" in caplog.text


@pytest.mark.parametrize(
    ("name", "declared", "frames"),
    [
        # Matroska keeps no frame count: OpenCV's (80) is its duration times the nominal rate,
        # more than the 50 frames of a clip whose rate varies
        ("vfr_testsrc.mkv", 80, 50),
        # `ffmpeg -f segment` keeps each segment's times: this one starts at 2.4 s, and
        # Matroska's duration (OpenCV's count: 40) counts from 0: 16 frames from its start
        ("segment_testsrc.mkv", 16, 16),
        # an MP4's count is its header's, of frames from its start: its frames' times from 0
        # (8 s on) are not compared with it, as a Matroska segment's are
        ("offset_testsrc.mp4", 60, 60),
    ],
)
def test_a_clip_read_whole_is_not_said_to_be_cut_short_and_its_first_half_is(
    tmp_path, caplog, name, declared, frames
):
    clip = VFR_CLIP.with_name(name)
    src = VideoFileSource(clip)
    assert src.total() == declared and len(list(src.frames())) == frames
    assert not src.cut_short and "header declares" not in caplog.text
    cut = tmp_path / f"cut{clip.suffix}"
    cut.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    half = VideoFileSource(cut)
    n = len(list(half.frames()))
    assert 0 < n < frames and half.cut_short
    assert f"{n} of the {declared} frames its header declares could be read" in caplog.text


def test_a_raw_stream_with_no_frame_count_has_no_total(caplog):
    # a raw H.264 stream (no container): OpenCV's count is a large negative number, which the
    # progress display took for the total
    src = VideoFileSource(VFR_CLIP.with_name("testsrc.h264"))
    assert src.total() is None and len(list(src.frames())) == 10
    assert not src.cut_short and "header declares" not in caplog.text


def test_a_single_photo_and_jfif_photos_are_camera_sources(tmp_path):
    _gradient(tmp_path / "one.jpg")
    (tmp_path / "two.jfif").write_bytes((tmp_path / "one.jpg").read_bytes())
    assert [f.name for f in open_source(str(tmp_path / "two.jfif")).frames()] == ["two.jfif"]
    assert [f.name for f in open_source(str(tmp_path)).frames()] == ["one.jpg", "two.jfif"]


def test_unreadable_photos_are_one_reason_in_the_warnings(tmp_path, caplog):
    _gradient(tmp_path / "a.jpg")
    for i in range(4):
        (tmp_path / f"bad{i}.jpg").write_text("not a photo")
    (summary,) = _stream(open_source(str(tmp_path)))
    assert summary.frames_dropped == 4
    said = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(said) == 2, said  # the first at once, the rest counted at the end
    assert "unreadable image" in said[0] and "3 more frame(s) dropped" in said[1]


def test_an_animated_gif_is_a_clip_and_a_still_gif_a_photo(tmp_path):
    import cv2
    import numpy as np

    frames = [np.full((36, 64, 3), i * 40, np.uint8) for i in range(5)]
    cv2.imwritemulti(str(tmp_path / "anim.gif"), frames)
    cv2.imwrite(str(tmp_path / "still.gif"), frames[0])
    assert isinstance(open_source(str(tmp_path / "anim.gif")), VideoFileSource)
    assert len(list(open_source(str(tmp_path / "anim.gif")).frames())) == 5
    assert isinstance(open_source(str(tmp_path / "still.gif")), ImageFolderSource)
