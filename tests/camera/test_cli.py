"""``gateway anonymize``: a folder gives blurred copies with the same names and formats; every
mistake is one line and exit status 2."""

from __future__ import annotations

import re
import shutil

import cv2
import numpy as np
import pytest

import gateway.cli as gateway_cli
from gateway.camera.detect import Kind
from tests.camera.conftest import (
    ASTRONAUT,
    DEMO_CLIP,
    VFR_CLIP,
    crop,
    detail,
    grey_clip_and_its_first_half,
)


@pytest.fixture
def gateway(monkeypatch, capsys):
    """``gateway`` as the console script runs it (in-process, to share the loaded models)."""
    if "gateway.camera.cli" not in gateway_cli._EXTRA_COMMANDS:
        monkeypatch.setattr(
            gateway_cli, "_EXTRA_COMMANDS", (*gateway_cli._EXTRA_COMMANDS, "gateway.camera.cli")
        )

    def run(*argv: str) -> tuple[int, str]:
        code = gateway_cli.main(list(argv))
        return code, capsys.readouterr().err

    return run


def _one_error(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("gateway: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_folder_gives_blurred_copies_with_the_same_names_and_formats(
    tmp_path, gateway, detector, astronaut
):
    src = tmp_path / "photos"
    src.mkdir()
    shutil.copy(ASTRONAUT, src / "portrait.jpg")
    cv2.imwrite(str(src / "portrait.png"), astronaut)
    (src / "readme.txt").write_text("not an image")
    (src / "more").mkdir()
    code, err = gateway("anonymize", str(src), str(tmp_path / "out"), "-q")
    assert code == 0, err
    assert "2 image(s)" in err and "2 face(s)" in err
    assert "1 sub-folder(s) not read (more)" in err
    assert "1 file(s) not read, not named as images (readme.txt)" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["portrait.jpg", "portrait.png"]
    with open(tmp_path / "out" / "portrait.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "out" / "portrait.jpg", "rb") as f:
        assert f.read(3) == b"\xff\xd8\xff"
    face = next(b for b in detector.detect(astronaut) if b.kind is Kind.FACE)
    png = cv2.imread(str(tmp_path / "out" / "portrait.png"))
    # the face lost its detail...
    assert detail(crop(png, face)) < 0.05 * detail(crop(astronaut, face))
    # ...and lossless stayed lossless: away from the face, every pixel is the original's
    assert np.array_equal(png[300:], astronaut[300:])
    # the originals are untouched
    assert cv2.imread(str(src / "portrait.png")).tobytes() == astronaut.tobytes()


def test_a_single_image_with_options(tmp_path, gateway, astronaut):
    out = tmp_path / "pix.png"
    code, err = gateway(
        "anonymize", str(ASTRONAUT), str(out), "--method", "fill", "--margin", "0", "-q"
    )
    assert code == 0, err
    img = cv2.imread(str(out))
    assert (img == 0).all(axis=2).sum() > 5000  # a filled face box


def test_a_video_gives_a_video_of_the_same_length(tmp_path, gateway):
    out = tmp_path / "clip.mp4"
    code, err = gateway("anonymize", str(DEMO_CLIP), str(out), "--detect-every", "3", "-q")
    assert code == 0, err
    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 90
    cap.release()
    # the clip's one face and one plate on each of its 90 frames (at a score near the threshold
    # the plate network may add a box elsewhere: extra blur, never less)
    faces, plates = (int(re.search(rf"(\d+) {k}\(s\)", err).group(1)) for k in ("face", "plate"))
    assert faces == 90 and 90 <= plates <= 110, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (lambda p: [str(p / "nope"), str(p / "o")], "no such image, folder or video"),
        (lambda p: [_bad_jpeg(p), str(p / "o.jpg")], "not an image OpenCV can read"),
        (lambda p: [_empty(p), str(p / "o")], "no images in this folder"),
        (lambda p: [str(ASTRONAUT), str(p / "o.jpg"), "--margin", "-1"], "--margin"),
        (lambda p: [str(ASTRONAUT), str(p / "o.jpg"), "--face-score", "2"], "--face-score"),
        (lambda p: [str(ASTRONAUT), str(p / "o.jpg"), "--plate-strips", "0"], "--plate-strips"),
        (lambda p: [str(ASTRONAUT), str(p / "o.txt")], "must be an image file"),
        (lambda p: [str(DEMO_CLIP), str(p / "o.gif")], "a video's output must end in"),
        # 1 px found nothing and said nothing; 30000 px ran out of time and took 24 GB
        (lambda p: [str(ASTRONAUT), str(p / "o.jpg"), "--face-width", "1"], "--face-width"),
        (lambda p: [str(ASTRONAUT), str(p / "o.jpg"), "--plate-width", "30000"], "--plate-width"),
        (lambda p: [_here(p), str(p)], "must not overwrite the input"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(tmp_path, gateway, argv, needle):
    code, err = gateway("anonymize", *argv(tmp_path), "-q")
    assert code == 2
    assert needle in _one_error(err)


def test_a_cut_png_is_one_line_that_says_what_the_image_library_found(
    tmp_path, monkeypatch, capfd, astronaut
):
    """libpng writes its own "libpng error: ..." to the process's stderr (descriptor 2, past
    Python's sys.stderr); it used to stand on a line of its own beside the gateway's error.
    Now it is part of that one line, and nothing else reaches the terminal."""
    if "gateway.camera.cli" not in gateway_cli._EXTRA_COMMANDS:
        monkeypatch.setattr(
            gateway_cli, "_EXTRA_COMMANDS", (*gateway_cli._EXTRA_COMMANDS, "gateway.camera.cli")
        )
    ok, data = cv2.imencode(".png", astronaut)
    assert ok
    cut = tmp_path / "cut.png"
    cut.write_bytes(data.tobytes()[: data.size // 2])
    code = gateway_cli.main(["anonymize", str(cut), str(tmp_path / "o.png"), "-q"])
    err = capfd.readouterr().err
    assert code == 2
    line = _one_error(err)
    assert "cut.png: not an image OpenCV can read (" in line and "PNG" in line, err
    assert err.strip() == line, err  # no line of the library's own
    assert not (tmp_path / "o.png").exists()


def _huge_png(path):
    """A valid PNG of 118 bytes whose header says 40000 x 40000 pixels."""
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + chunk(b"IEND", b"")
    )


def test_an_image_whose_header_claims_a_billion_pixels_is_one_unreadable_file(tmp_path, gateway):
    """OpenCV raises for it (more than 2**30 pixels) where it returns None for other damage:
    a traceback, and the photos after it in the folder were never written."""
    src = tmp_path / "in"
    src.mkdir()
    _huge_png(src / "a-huge.png")
    shutil.copy(ASTRONAUT, src / "b-good.jpg")
    code, err = gateway("anonymize", str(src), str(tmp_path / "out"), "-q")
    assert code == 1 and "Traceback" not in err
    assert "a-huge.png: not an image OpenCV can read" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b-good.jpg"]
    code, err = gateway("anonymize", str(src / "a-huge.png"), str(tmp_path / "o.png"), "-q")
    assert code == 2 and "a-huge.png: not an image OpenCV can read" in _one_error(err)


def test_an_output_that_is_a_hard_link_of_the_input_is_refused_and_the_input_kept(
    tmp_path, gateway
):
    """Compared by path, a hard link is another file: the video written over it left the
    original an empty AVI (exit 0)."""
    import os

    src = tmp_path / "a.mp4"
    shutil.copy(DEMO_CLIP, src)
    os.link(src, tmp_path / "b.mp4")
    before = src.read_bytes()
    code, err = gateway("anonymize", str(src), str(tmp_path / "b.mp4"), "-q")
    assert code == 2 and "must not overwrite the input" in _one_error(err)
    assert src.read_bytes() == before


def test_an_unreadable_image_in_a_folder_is_reported_and_the_rest_written(tmp_path, gateway):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(ASTRONAUT, src / "good.jpg")
    (src / "bad.jpg").write_bytes(b"not a jpeg")
    code, err = gateway("anonymize", str(src), str(tmp_path / "out"), "-q")
    assert code == 1
    assert "bad.jpg" in err and "Traceback" not in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.jpg"]


def test_an_image_that_cannot_be_opened_is_counted_and_the_rest_written(
    tmp_path, gateway, monkeypatch
):
    """No permission to read one photo (root reads every file, so the read is made to fail as
    for another user): it is counted, and the photos after it are still anonymised."""
    from gateway.camera import source

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        shutil.copy(ASTRONAUT, src / name)
    real = source.np.fromfile

    def fromfile(path, *args, **kwargs):
        if str(path).endswith("b.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(source.np, "fromfile", fromfile)
    code, err = gateway("anonymize", str(src), str(tmp_path / "out"), "-q")
    assert code == 1 and "Traceback" not in err
    assert "b.jpg: cannot read: Permission denied" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.jpg", "c.jpg"]


@pytest.mark.parametrize(("suffix", "size"), [(".avi", (641, 361)), (".mp4", (640, 360))])
def test_an_odd_sized_video_keeps_its_size_in_avi_and_says_so_otherwise(
    tmp_path, gateway, suffix, size
):
    cap = cv2.VideoCapture(str(DEMO_CLIP))
    src = tmp_path / "odd.avi"
    w = cv2.VideoWriter(
        str(src), cv2.CAP_OPENCV_MJPEG, cv2.VideoWriter_fourcc(*"MJPG"), 10, (641, 361)
    )
    for _ in range(3):
        ok, frame = cap.read()
        assert ok
        w.write(cv2.resize(frame, (641, 361)))
    w.release()
    code, err = gateway("anonymize", str(src), str(tmp_path / f"out{suffix}"), "-q")
    assert code == 0, err
    out = cv2.VideoCapture(str(tmp_path / f"out{suffix}"))
    ok, frame = out.read()
    assert ok and (frame.shape[1], frame.shape[0]) == size
    assert ("are written 640x360" in err) == (suffix != ".avi")


@pytest.mark.parametrize("size", [(500, 375), (400, 400)])
def test_transparency_turns_with_the_exif_orientation(tmp_path, gateway, size):
    """A PNG stored turned, with an EXIF orientation (6: turn 90 degrees clockwise to show):
    OpenCV shows its colours upright, and its transparency must turn with them (it was put
    back unturned: on a square image, the wrong area became see-through)."""
    import struct
    import zlib

    upright = cv2.resize(cv2.imread(str(ASTRONAUT)), size)
    alpha = np.full(upright.shape[:2], 255, np.uint8)
    alpha[:, :150] = 0  # the left 150 columns, as shown, are transparent
    stored = cv2.rotate(np.dstack([upright, alpha]), cv2.ROTATE_90_COUNTERCLOCKWISE)
    png = cv2.imencode(".png", stored)[1].tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    exif = b"II*\0" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x112, 3, 1, 6) + b"\0" * 4
    src = tmp_path / "turned.png"
    src.write_bytes(png[:33] + chunk(b"eXIf", exif) + png[33:])
    assert cv2.imread(str(src)).shape[:2] == upright.shape[:2]  # OpenCV shows it upright
    code, err = gateway("anonymize", str(src), str(tmp_path / "out.png"), "-q")
    assert code == 0, err
    out = cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED)
    assert out.shape == (*upright.shape[:2], 4)
    assert np.array_equal(out[:, :, 3], alpha)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_a_16_bit_png_stays_16_bit(tmp_path, gateway, astronaut, channels):
    """It came out 8-bit: the format's depth is kept (the blur works at 8 bits, so a sample
    is scaled back: 0-255 to 0-65535)."""
    img = astronaut if channels == 3 else cv2.cvtColor(astronaut, cv2.COLOR_BGR2GRAY)
    if channels == 4:
        img = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    wide = img.astype(np.uint16) * np.uint16(257)  # exactly what 8 bits scale back to
    src = tmp_path / "deep.png"
    cv2.imwrite(str(src), wide)
    code, err = gateway("anonymize", str(src), str(tmp_path / "out.png"), "-q")
    assert code == 0, err
    out = cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16 and out.shape == wide.shape
    assert np.array_equal(out[300:], wide[300:])  # lossless away from the face
    assert not np.array_equal(out[:300], wide[:300])  # and the face blurred


def test_a_16_bit_png_of_12_bit_data_is_seen_at_its_own_range(
    tmp_path, gateway, detector, astronaut
):
    """A sensor's 12-bit samples (0-4095) in a 16-bit PNG were read as their container's top 8
    bits (0-15): too dark for a face to be found, and the output, once its levels were
    stretched, showed the face."""
    x = astronaut.astype(np.uint16)
    low = np.random.default_rng(5).integers(0, 16, x.shape, dtype=np.uint16)
    deep = (x << np.uint16(4)) | low  # a sensor's 12 bits, the photo in their top 8
    src = tmp_path / "sensor.png"
    cv2.imwrite(str(src), deep)
    code, err = gateway("anonymize", str(src), str(tmp_path / "out.png"), "-q")
    assert code == 0, err
    out = cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16 and out.shape == deep.shape and int(out.max()) <= 4095
    # away from the face every sample keeps the 8 bits the anonymiser works at, at 12 bits
    # (the 4 below are rebuilt from them)
    assert np.array_equal(out[300:] >> np.uint16(4), deep[300:] >> np.uint16(4))
    # and the face blurred: its detail, stretched to 8 bits, is gone
    face = next(b for b in detector.detect(astronaut) if b.kind is Kind.FACE)
    seen = (out >> np.uint16(4)).astype(np.uint8)
    assert detail(crop(seen, face)) < 0.05 * detail(crop(astronaut, face))


def _here(p) -> str:
    """An image whose output would be its own folder: the same name, over the original."""
    shutil.copy(ASTRONAUT, p / "photo.jpg")
    return str(p / "photo.jpg")


def _bad_jpeg(p) -> str:
    (p / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return str(p / "broken.jpg")


def _empty(p) -> str:
    (p / "empty").mkdir()
    return str(p / "empty")


def test_a_small_face_in_a_large_frame_is_found_and_transparency_and_grey_are_kept(
    tmp_path, gateway, detector, astronaut
):
    # GIVEN the portrait shrunk to a 56-pixel-wide face in the corner of a 2400x1350 frame
    # (the stream's 640-pixel face input shrinks such a face to 15 pixels: not found)
    face = next(b for b in detector.detect(astronaut) if b.kind is Kind.FACE)
    k = 56 / face.w
    small = cv2.resize(astronaut, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
    big = np.zeros((1350, 2400, 4), np.uint8)
    big[:, :, 3] = 128  # half transparent
    y0, x0 = 1350 - small.shape[0], 2400 - small.shape[1]
    big[y0:, x0:, :3] = small
    big[y0:, x0:, 3] = 255
    cv2.imwrite(str(tmp_path / "big.png"), big)
    cv2.imwrite(str(tmp_path / "grey.png"), cv2.cvtColor(astronaut, cv2.COLOR_BGR2GRAY))
    # WHEN both are anonymised at the defaults
    for name in ("big", "grey"):
        code, err = gateway(
            "anonymize", str(tmp_path / f"{name}.png"), str(tmp_path / f"o-{name}.png"), "-q"
        )
        assert code == 0 and "1 face(s)" in err, err
    # THEN the small face lost its detail, and the alpha channel is the original's
    out = cv2.imread(str(tmp_path / "o-big.png"), cv2.IMREAD_UNCHANGED)
    assert out.shape == big.shape and np.array_equal(out[:, :, 3], big[:, :, 3])
    fx, fy, fw, fh = (int(v * k) for v in (face.x, face.y, face.w, face.h))
    before = cv2.cvtColor(small[fy : fy + fh, fx : fx + fw], cv2.COLOR_BGR2GRAY)
    after = cv2.cvtColor(
        out[y0 + fy : y0 + fy + fh, x0 + fx : x0 + fx + fw, :3], cv2.COLOR_BGR2GRAY
    )
    assert detail(after) < 0.2 * detail(before)
    # and a greyscale image stays one channel
    assert cv2.imread(str(tmp_path / "o-grey.png"), cv2.IMREAD_UNCHANGED).ndim == 2


def test_a_video_cut_short_is_said_and_a_slow_frame_rate_is_kept(tmp_path, gateway):
    # GIVEN a 30-frame MJPG clip at 0.5 frames/s (a time-lapse), and its first half
    full, cut = grey_clip_and_its_first_half(tmp_path, 30, 0.5, (320, 240), 8)
    # WHEN both are anonymised
    code, err = gateway("anonymize", str(full), str(tmp_path / "o-full.avi"), "-q")
    assert code == 0 and "of the 30 frames" not in err, err
    code, err = gateway("anonymize", str(cut), str(tmp_path / "o-cut.avi"), "-q")
    # THEN the cut one says how much of it could be read; the rate is the source's
    assert code == 0 and "of the 30 frames its header declares could be read" in err, err
    assert err.count("frames its header declares") == 1, err  # (it was said twice)
    cap = cv2.VideoCapture(str(tmp_path / "o-full.avi"))
    assert cap.get(cv2.CAP_PROP_FPS) == pytest.approx(0.5, abs=0.01)
    # a clip of variable frame rate, whose header's count is an estimate, is not "cut short"
    code, err = gateway("anonymize", str(VFR_CLIP), str(tmp_path / "o-vfr.avi"), "-q")
    assert code == 0 and "header declares" not in err, err
    assert cv2.VideoCapture(str(tmp_path / "o-vfr.avi")).get(cv2.CAP_PROP_FRAME_COUNT) == 50
    cap.release()


@pytest.mark.parametrize("name", ["out.mp4", "out.png"])
def test_a_folder_of_images_to_a_file_name_is_refused_and_makes_no_folder(tmp_path, gateway, name):
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), np.zeros((40, 60, 3), np.uint8))
    code, err = gateway("anonymize", str(src), str(tmp_path / name), "-q")
    assert code == 2 and "a folder of images is written to a folder" in err, err
    assert not (tmp_path / name).exists()  # (a folder of that name was made)


def test_the_second_plate_look_is_for_photos_not_videos(tmp_path, gateway, monkeypatch):
    # (on a clip it took 2.5x the time and found no plate more: a video's plate is seen in
    # frame after frame)
    from gateway.camera import batch

    seen = []
    real = batch.load_detectors

    def spy(settings):  # type: ignore[no-untyped-def]
        seen.append(settings.plate_second_look)
        return real(settings)

    monkeypatch.setattr(batch, "load_detectors", spy)
    photo = tmp_path / "p.png"
    cv2.imwrite(str(photo), np.zeros((60, 80, 3), np.uint8))
    full, _ = grey_clip_and_its_first_half(tmp_path, 4, 5.0, (160, 120), 2)
    assert gateway("anonymize", str(photo), str(tmp_path / "o.png"), "-q")[0] == 0
    assert gateway("anonymize", str(full), str(tmp_path / "o.avi"), "-q")[0] == 0
    assert seen == [True, False]


def test_names_that_are_not_utf8_are_read_or_refused_in_one_line_never_a_crash(tmp_path):
    """OpenCV takes a name as UTF-8: a Latin-1 name (a FAT stick, a Windows zip) crashed the
    whole process with a segfault in imcount (TIFF, WebP, GIF), VideoCapture and VideoWriter.
    In a separate process: a crash is an exit status here, not the end of the test run."""
    import os

    from tests.conftest import run_gateway

    src = tmp_path / "in"
    src.mkdir()
    photo = cv2.imread(str(ASTRONAUT))
    latin = os.fsdecode(b"\xe9t\xe9")  # "été" in Latin-1: not UTF-8
    cv2.imencode(".tif", photo)[1].tofile(str(src / f"{latin}.tif"))
    cv2.imencode(".jpg", photo)[1].tofile(str(src / "plain.jpg"))
    # a folder holding one: both images are anonymised
    done = run_gateway("anonymize", str(src), str(tmp_path / "out"), "-q", timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f"{latin}.tif", "plain.jpg"]
    )
    # a video of such a name, or an output of one: one line, exit 2
    clip = tmp_path / f"clip{latin}.avi"
    shutil.copy(DEMO_CLIP, tmp_path / "plain.mp4")
    os.rename(tmp_path / "plain.mp4", clip)
    for argv in (
        [str(clip), str(tmp_path / "o.avi")],
        [str(DEMO_CLIP), str(tmp_path / f"o{latin}.avi")],
    ):
        proc = run_gateway("anonymize", *argv, "-q", timeout=120)
        assert proc.returncode == 2, (argv, proc.returncode, proc.stderr)
        assert "not UTF-8" in _one_error(proc.stderr)


def test_gateway_anonymize_blurs_a_plate_cut_by_the_images_edge(tmp_path, gateway):
    from bench.eval_edge_cuts import cut

    # GIVEN the demo clip's first frame with its plate (140x44 at 450, 235) cut in half by the
    # image's top edge
    cap = cv2.VideoCapture(str(DEMO_CLIP))
    ok, frame = cap.read()
    cap.release()
    assert ok
    image, (x, y, w, h) = cut(frame, (450.0, 235.0, 140.0, 44.0), "top", 0.5)
    src = tmp_path / "cut.png"
    cv2.imwrite(str(src), image)
    half = (slice(int(y), int(y + h)), slice(int(x) + 10, int(x + w) - 10))
    # WHEN it is anonymised, with the second look at the image mirrored at its edges (the
    # default) and without it
    changed = {}
    for flag in ("--edges", "--no-edges"):
        out = tmp_path / f"out{flag}.png"
        code, err = gateway("anonymize", str(src), str(out), "-q", flag)
        assert code == 0, err
        after = cv2.imread(str(out))
        changed[flag] = float(np.any(after[half] != image[half], axis=2).mean())
    # THEN the visible half of the plate is blurred by default, and was left as it was
    assert changed["--edges"] > 0.95
    assert changed["--no-edges"] < 0.05
