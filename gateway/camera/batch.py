"""``gateway anonymize INPUT OUTPUT``: blur faces and plates in an image, a folder of images or a
video, with the same detectors and settings as the stream."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from gateway.camera.anonymiser import (
    DetectionFailed,
    FrameAnonymiser,
    Outcome,
)
from gateway.camera.anonymize import blackout
from gateway.camera.detect import load_detectors
from gateway.camera.options import (
    DETECTOR_WIDTHS,
    PLATE_STRIPS,
    AnonymiserSettings,
    DetectorSettings,
    Method,
)
from gateway.camera.source import (
    IMAGE_SUFFIXES,
    READ_SUFFIXES,
    Frame,
    VideoFileSource,
    folder_images,
    opencv_name,
    read_image,
    sample_bits,
)
from gateway.errors import CameraError, ConfigError, StorageError, make_folder

log = logging.getLogger("gateway.camera.batch")


_VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


@dataclass
class _Tally:
    """Counts of an offline anonymisation run."""

    files: int = 0
    frames: int = 0
    faces: int = 0
    plates: int = 0
    failed: int = 0
    blacked: int = 0


def _check(args: argparse.Namespace) -> AnonymiserSettings:
    if not 0.0 <= args.margin <= 2.0:
        raise ConfigError(f"--margin must be between 0 and 2, got {args.margin}")
    for name in ("face_score", "plate_score"):
        v = getattr(args, name)
        if not 0.0 < v < 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be between 0 and 1, got {v}")
    for name in ("face_width", "plate_width"):
        v = getattr(args, name)
        if v != 0 and v not in DETECTOR_WIDTHS:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be 0 (the image's own) or "
                f"{DETECTOR_WIDTHS[0]} to {DETECTOR_WIDTHS[-1]}, got {v}"
            )
    if args.plate_strips not in PLATE_STRIPS:
        raise ConfigError(
            f"--plate-strips must be {PLATE_STRIPS[0]} to {PLATE_STRIPS[-1]}, got {args.plate_strips}"
        )
    if args.detect_every < 1:
        raise ConfigError(f"--detect-every must be >= 1, got {args.detect_every}")
    if args.memory < 0:
        raise ConfigError(f"--memory must be >= 0, got {args.memory}")
    return AnonymiserSettings(
        method=Method(args.method),
        margin=args.margin,
        detect_every=args.detect_every,
        memory=args.memory,
        timeout_s=60.0,  # offline: a slow machine is not a failure
        detector=DetectorSettings(
            face_score=args.face_score,
            plate_score=args.plate_score,
            face_width=args.face_width,
            plate_width=args.plate_width,
            plate_strips=args.plate_strips,
            edges=args.edges,
        ),
    )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _write_image(path: Path, image: object) -> None:
    suffix = path.suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if suffix in (".jpg", ".jpeg") else []
    ok, data = cv2.imencode(suffix, image, params)  # type: ignore[call-overload]
    if not ok:
        raise StorageError(f"{path}: OpenCV cannot encode {suffix} images")
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_bytes(data.tobytes())
        tmp.replace(path)
    except OSError as exc:
        raise StorageError(f"{path}: cannot write ({exc.strerror})") from exc


_ALPHA_SUFFIXES = {".png", ".webp", ".tif", ".tiff"}
_WIDE_SUFFIXES = {".png", ".tif", ".tiff"}  # formats that hold 16 bits per sample


def _like_source(src: Path, dst: Path, image: Any) -> Any:
    """The anonymised BGR ``image`` given the source's greyscale, its alpha channel and its 16
    bits per sample back where the output format holds them (detection and blurring work on
    8-bit BGR; a transparent area must not turn visible)."""
    try:
        data = np.fromfile(str(src), np.uint8)
    except OSError:  # read a moment ago: the anonymised image stands as it is
        return image
    raw = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if raw is None:
        return image
    wide = raw.dtype == np.uint16 and dst.suffix.lower() in _WIDE_SUFFIXES
    # the bits its colour samples use (read_image saw their top 8): 16, or 12 for a sensor's
    bits = sample_bits(raw if raw.ndim == 2 else raw[:, :, :3]) if wide else 8

    def depth(img: Any) -> Any:
        # 8 bits back to the source's, the top ones repeated below (0-255 -> 0-4095 for 12
        # bits; x 257 for 16): every sample keeps the 8 bits the anonymiser works at, those
        # below are rebuilt from them (exact for a value that 8 bits scale to, not else)
        if not wide:
            return img
        v = img.astype(np.uint16)
        return (v << np.uint16(bits - 8)) | (v >> np.uint16(16 - bits))

    if raw.ndim == 2:
        return depth(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    if raw.shape[2] == 4 and dst.suffix.lower() in _ALPHA_SUFFIXES:
        alpha: Any = raw[:, :, 3]
        if raw.dtype != np.uint8 and not wide:
            alpha = (alpha // 256).astype(np.uint8) if raw.dtype == np.uint16 else None
        alpha = _turned_as_read(data, alpha) if alpha is not None else None
        if alpha is not None and alpha.shape == image.shape[:2]:
            return np.dstack([depth(image), alpha])
        log.warning("%s: its transparency could not be placed; written without it", dst)
    return depth(image)


# the 8 ways an EXIF orientation turns an image (rotations, mirrors, transpositions)
_TURNS = (
    lambda a: a,
    lambda a: np.rot90(a, -1),
    lambda a: np.rot90(a, 2),
    lambda a: np.rot90(a, 1),
    lambda a: a[:, ::-1],
    lambda a: a[::-1],
    lambda a: a.swapaxes(0, 1),
    lambda a: np.rot90(a, 2).swapaxes(0, 1),
)


def _turned_as_read(data: Any, alpha: Any) -> Any:
    """``alpha`` (as stored) turned the way OpenCV turned the colour pixels by the file's
    EXIF orientation (an unchanged read ignores it); None if no turn explains it."""
    plain = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    read = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if plain is None or read is None:
        return None
    for turn in _TURNS:
        turned = turn(plain)
        if turned.shape == read.shape and np.array_equal(turned, read):
            return np.ascontiguousarray(turn(alpha))
    return None


def _image(anon: FrameAnonymiser, src: Path, dst: Path, tally: _Tally) -> None:
    img = read_image(src)
    try:  # images are independent: process() forgets every earlier box
        outcome = anon.process(Frame(0, 0.0, img, src.name))
    except DetectionFailed as exc:
        raise CameraError(f"{src}: {exc}; nothing written") from exc
    assert outcome.anonymised is not None
    _write_image(dst, _like_source(src, dst, outcome.anonymised.image))
    tally.files += 1
    tally.frames += 1
    tally.faces += outcome.faces
    tally.plates += outcome.plates


def _folder(anon: FrameAnonymiser, src: Path, dst: Path, progress: object, tally: _Tally) -> None:
    # (what is not read is not written: said, rather than leave its photos unnoticed)
    files = folder_images(src, IMAGE_SUFFIXES)
    if not files:
        raise CameraError(f"{src}: no images in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if dst.resolve() == src.resolve():
        raise ConfigError(f"{dst}: the output folder must not be the input folder")
    if not dst.is_dir() and dst.suffix.lower() in (*IMAGE_SUFFIXES, *_VIDEO_CODECS):
        # (a folder named like one was made, without a word)
        raise ConfigError(
            f"{dst}: a folder of images is written to a folder, and this names an image or "
            "video file; give a folder"
        )
    make_folder(dst, "output folder")
    for i, p in enumerate(files):
        try:
            _image(anon, p, dst / p.name, tally)
        except CameraError as exc:
            tally.failed += 1
            log.warning("%s", exc)
        progress.update(i + 1, i + 1, len(files), unit="images")  # type: ignore[attr-defined]


def _video(anon: FrameAnonymiser, src: Path, dst: Path, progress: object, tally: _Tally) -> None:
    if src.suffix.lower() in READ_SUFFIXES:  # an image this command does not write back
        raise ConfigError(
            f"{src}: a {src.suffix} image is not written back as one (OpenCV cannot write "
            ".jfif; a GIF would lose its animation): convert it to .jpg or .png first"
        )
    source = VideoFileSource(src, say_cut_short=False)  # said below, with the output
    fourcc = _VIDEO_CODECS.get(dst.suffix.lower())
    if fourcc is None:
        raise ConfigError(
            f"{dst}: {src.name} is read as a video (an image's name ends in "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}), and a video's output must end in "
            f"{', '.join(_VIDEO_CODECS)}"
        )
    # .avi through OpenCV's own MJPEG writer, which keeps any frame size (FFmpeg's writers
    # round an odd width or height down to an even one without a word), where it takes the
    # clip (not a rate below 1 frame/s)
    code = cv2.VideoWriter_fourcc(*fourcc)
    writer = cv2.VideoWriter()
    name = opencv_name(dst)
    own = dst.suffix.lower() == ".avi" and writer.open(
        name, cv2.CAP_OPENCV_MJPEG, code, source.fps, source.size
    )
    if not own:
        writer = cv2.VideoWriter(name, code, source.fps, source.size)
    w, h = source.size
    if not own and (w % 2 or h % 2):
        log.warning(
            "%s: %dx%d frames are written %dx%d (this codec needs even sizes; .avi keeps them)",
            dst,
            w,
            h,
            w - w % 2,
            h - h % 2,
        )
    if not writer.isOpened():
        if not dst.parent.is_dir():
            raise StorageError(f"{dst}: no such folder: {dst.parent}")
        raise StorageError(f"{dst}: OpenCV cannot write this video")
    total = source.total()

    def write(outcomes: list[Outcome]) -> None:
        for o in outcomes:
            if o.anonymised is None:  # fail closed: a black frame keeps the video's timing
                log.warning("frame %d written black: %s", o.frame.index, o.error)
                image = blackout(o.frame.image).image
                tally.blacked += 1
            else:
                image = o.anonymised.image
                tally.faces += o.faces
                tally.plates += o.plates
            if (image.shape[1], image.shape[0]) != source.size:
                image = cv2.resize(image, source.size)
            writer.write(image)
            tally.frames += 1
            progress.update(tally.frames, tally.frames, total)  # type: ignore[attr-defined]

    try:
        for frame in source.frames():
            write(anon.push(frame))
        write(anon.flush())
    finally:
        writer.release()
    tally.files = 1
    if source.cut_short:
        log.warning(
            "%s: %d of the %d frames its header declares could be read: the rest is not in %s",
            src,
            tally.frames,
            total,
            dst,
        )


def run(args: argparse.Namespace) -> int:
    from gateway.progress import Progress

    settings = _check(args)
    src, dst = Path(args.input).expanduser(), Path(args.output).expanduser()
    if not src.exists():
        raise CameraError(f"{src}: no such image, folder or video")
    if src.is_file() and src.suffix.lower() not in IMAGE_SUFFIXES:  # a video: see options
        detector = dataclasses.replace(settings.detector, plate_second_look=False)
        settings = dataclasses.replace(settings, detector=detector)
    if src.is_file() and src.suffix.lower() in IMAGE_SUFFIXES and dst.is_dir():
        dst = dst / src.name  # into a folder: the same name (not over the input itself)
    # (the same file by any name: a hard link resolves to a path of its own, and writing the
    # video over it left the original an empty AVI)
    if src.is_file() and dst.exists() and _same_file(src, dst):
        raise ConfigError(f"{dst}: the output must not overwrite the input")
    anon = FrameAnonymiser(load_detectors(settings.detector), settings)
    progress = Progress("anonymize", enabled=False if args.quiet else None)
    tally = _Tally()
    t0 = time.monotonic()
    try:
        if src.is_dir():
            _folder(anon, src, dst, progress, tally)
        elif src.suffix.lower() in IMAGE_SUFFIXES:
            if dst.suffix.lower() not in IMAGE_SUFFIXES:
                raise ConfigError(f"{dst}: the output of an image must be an image file")
            _image(anon, src, dst, tally)
        else:
            _video(anon, src, dst, progress, tally)
    finally:
        progress.close()
        anon.close()
    elapsed = time.monotonic() - t0
    what = (
        f"{tally.frames} frame(s)"
        if src.is_file() and tally.files == 1 and src.suffix.lower() not in IMAGE_SUFFIXES
        else f"{tally.files} image(s)"
    )
    print(
        f"anonymised {what} in {elapsed:.1f} s: {tally.faces} face(s), {tally.plates} plate(s) "
        f"blurred ({args.method}, margin {args.margin:g}) -> {dst}",
        file=sys.stderr,
    )
    if tally.blacked:
        print(f"{tally.blacked} frame(s) written black: detection failed", file=sys.stderr)
    if tally.failed:
        print(
            f"gateway: error: {tally.failed} image(s) could not be read; see the warnings above",
            file=sys.stderr,
        )
        return 1
    return 0
