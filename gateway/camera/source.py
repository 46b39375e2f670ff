"""Camera sources: video files (anything OpenCV reads), image folders, V4L2 devices
(``/dev/videoN``) and a synthetic source for tests.

Every source is a blocking iterator of ``(index, t, frame)`` with ``t`` in seconds of video time
(frame index / fps for recordings, elapsed wall time for a live device); callers run it in a
worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from gateway.camera.detect import Image
from gateway.errors import CameraError

log = logging.getLogger("gateway.camera.source")

# still images OpenCV reads and writes back in the same format (not .jfif, which it cannot
# write; not GIF or 1-bit PBM, which would lose an animation's frames or the blur's grey levels)
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
)
# still images a camera source reads (nothing is written back in their format: .jfif is JPEG;
# of a GIF, the first frame)
READ_SUFFIXES = IMAGE_SUFFIXES | {".jfif", ".gif"}
# formats that can hold several images in one file
_PAGED = frozenset({".tif", ".tiff", ".gif", ".webp"})


@dataclass(frozen=True, slots=True)
class Frame:
    """One camera frame: its number, time in seconds and image."""

    index: int
    t: float
    image: Image
    name: str = ""  # file name, for image folders


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A file of an image folder that could not be read: a frame seen and dropped."""

    index: int
    t: float
    name: str
    reason: str


class FrameSource(Protocol):
    name: str
    fps: float
    live: bool  # a device paces itself; recordings are paced by the caller
    # the frames are unrelated photos, not a video: each is detected on its own (a held frame
    # or the frame memory would cover it with the boxes of other pictures)
    stills: bool

    def frames(self) -> Iterator[Frame | Unreadable]: ...

    def total(self) -> int | None: ...


def _cv_quiet() -> None:
    # OpenCV prints its own warnings for unreadable files, and FFmpeg its own errors ("moov
    # atom not found"); the gateway reports them as one line. FFmpeg's level is read when
    # OpenCV first opens a video (a user's own OPENCV_FFMPEG_LOGLEVEL is kept)
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
    with contextlib.suppress(AttributeError):  # builds without the logging API
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


class VideoFileSource:
    live = False
    stills = False

    def __init__(self, path: str | Path, *, say_cut_short: bool = True) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.say_cut_short = say_cut_short  # (``gateway anonymize`` says it with its output)
        if not self.path.is_file():
            raise CameraError(f"{self.path}: no such video file")
        _cv_quiet()
        cap = cv2.VideoCapture(opencv_name(self.path))
        ok = cap.isOpened()
        first = cap.read()[1] if ok else None
        fps = cap.get(cv2.CAP_PROP_FPS) if ok else 0.0
        # (a raw .h264 stream has no count: OpenCV gives a negative number)
        self._count = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT))) if ok else 0
        # Matroska (and WebM) keep no count: OpenCV's is its duration, which counts from time
        # 0, times the rate; a clip that starts later (a segment ``ffmpeg -f segment`` cut
        # from a longer recording) holds that many frames fewer. (OpenCV's PTS is in frames
        # of the nominal rate, from time 0.)
        self._matroska = _starts_with(self.path, b"\x1a\x45\xdf\xa3")  # (EBML)
        self._start = max(0.0, cap.get(cv2.CAP_PROP_PTS)) if ok and self._matroska else 0.0
        self._count = max(0, self._count - round(self._start))
        cap.release()
        if first is None:
            raise CameraError(
                f"{self.path}: OpenCV cannot read a frame from this video (not a video, or cut "
                "short before its first frame or its index)"
            )
        # a time-lapse at 0.5 fps is a real rate; 0, NaN or absurd values mean "not known"
        self.fps = fps if 0.01 <= fps <= 1000.0 else 25.0
        self.size = (first.shape[1], first.shape[0])
        self.cut_short = False  # known once ``frames`` has been read to its end

    def total(self) -> int | None:
        return self._count or None

    def frames(self) -> Iterator[Frame]:
        cap = cv2.VideoCapture(opencv_name(self.path))
        i = 0
        last_ms = -1.0  # the stream time of the last frame read
        last_pts = -1.0  # its presentation time in frames of the nominal rate, from time 0
        try:
            while True:
                ok, img = cap.read()
                if not ok or img is None:
                    break
                last_ms = cap.get(cv2.CAP_PROP_POS_MSEC)
                if self._matroska:  # (its count is from time 0: see ``__init__``)
                    last_pts = cap.get(cv2.CAP_PROP_PTS)
                yield Frame(i, i / self.fps, img)
                i += 1
        finally:
            cap.release()
        if self._matroska:  # its duration counts from time 0 (see ``__init__``)
            last_ms = max(last_ms, (last_pts - self._start) * 1000.0 / self.fps)
        self.cut_short = self._cut_short(i, last_ms)
        if self.say_cut_short and self.cut_short:
            log.warning(
                "%s: %d of the %d frames its header declares could be read", self.path, i,
                self._count,
            )  # fmt: skip

    def _cut_short(self, read: int, last_ms: float) -> bool:
        """Whether the file ended before its header says (a file cut short decodes to its
        cut, then stops). The count is an estimate where the container keeps none (Matroska,
        WebM: its duration times the rate), more than the frames of a clip of variable frame
        rate: a clip whose last frame came at the end of its duration was read whole. For
        Matroska ``last_ms`` is the later of the last frame's time in the stream and its time
        from the first frame by OpenCV's PTS (the stream's time of a B-frame stream can lag
        it). Not for other containers: an MP4's count is its header's."""
        if not self._count or read >= self._count:
            return False
        step_ms = 1000.0 / self.fps
        return not (last_ms > 0 and last_ms + 1.5 * step_ms >= self._count * step_ms)


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError:
        return False


def read_image(path: Path) -> Image:
    """An image file as BGR uint8; unreadable files raise ``CameraError``, with what the
    image library said of it. A file it read in part (a JPEG cut short: the rest grey) is
    read, with a warning."""
    _cv_quiet()
    try:
        data = np.fromfile(str(path), np.uint8) if path.is_file() else None
    except OSError as exc:  # no permission, a disk error: this image, not the whole run
        raise CameraError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    img: Any = None
    said: list[str] = []
    if data is not None and data.size:
        with native_messages(said):
            try:
                img = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
                if img is not None and img.dtype == np.uint16:
                    img = (img >> np.uint16(sample_bits(img) - 8)).astype(np.uint8)
                elif img is not None and img.dtype != np.uint8:  # (float TIFFs: as OpenCV
                    img = cv2.imdecode(data, cv2.IMREAD_COLOR)  # reads them)
            except cv2.error as exc:  # (a header claiming more than 2**30 pixels: OpenCV
                # refuses it with an error, where it returns None for other damage; it
                # ended the anonymize run, or a whole replay with a camera folder)
                said.append(str(exc).strip().splitlines()[-1].strip())
                img = None
    why = f" ({'; '.join(dict.fromkeys(said))})" if said else ""
    if img is None:
        raise CameraError(f"{path}: not an image OpenCV can read{why}")
    if said:
        log.warning("%s: the image library reported a fault, read as far as it goes%s", path, why)
    if path.suffix.lower() in _PAGED and (pages := _pages(path)) > 1:
        log.warning("%s: holds %d images; only the first is read", path, pages)
    return img


_NATIVE_LIMIT = 4096  # bytes of a library's messages kept for one image
# OpenCV's own log prefix: "[ERROR:0@0.244] global grfmt_png.cpp:297 readHeader "
_CV_LOG = re.compile(r"^\[\s*[A-Z]+:\d+@[\d.]+\]\s+(?:global\s+)?\S+:\d+\s+\w+\s+")


_native = threading.Lock()  # held while stderr is redirected (``native_messages``)
_native_file: Any = None  # the file it is redirected to, made once, emptied for each image


@contextlib.contextmanager
def native_messages(said: list[str]) -> Iterator[None]:
    """What the C libraries under OpenCV write to the process's stderr meanwhile (libpng's
    "libpng error: PNG input buffer is incomplete", libjpeg's "Corrupt JPEG data: ...") goes
    into ``said``, a line each, instead of onto the terminal beside the gateway's own one-line
    error. The stderr of the whole process is redirected, so a line another thread writes
    meanwhile lands there too (and is shown with the image's message, not lost). One thread
    at a time: while another holds the redirection (a second camera's reader), nothing is
    captured (two nested ones, undone out of order, would leave stderr in a file), and the
    decoding is not made to wait. Nor where stderr cannot be redirected (no descriptor 2).
    One file serves every image (made for each, it cost ~0.25 ms an image)."""
    global _native_file
    if not _native.acquire(blocking=False):
        yield
        return
    try:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            saved = None
        if saved is None:
            yield
            return
        try:
            if _native_file is None:
                import tempfile

                _native_file = tempfile.TemporaryFile()  # noqa: SIM115 - kept for the process
            tmp = _native_file
            tmp.seek(0)
            tmp.truncate()
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                tmp.seek(0)
                text = tmp.read(_NATIVE_LIMIT).decode("utf-8", "replace")
            said += [_CV_LOG.sub("", line).strip() for line in text.splitlines() if line.strip()]
        finally:
            os.close(saved)
    finally:
        _native.release()


def sample_bits(img: Any) -> int:
    """The bits a 16-bit image's samples use, 8 to 16 (12 for a sensor's 0-4095 data). Such an
    image is read as its top 8 used bits: OpenCV's own reading keeps the container's top 8
    (0-15 of 12-bit data), a frame so dark that no face was found in it, and the output, at
    its depth again, showed them all once its levels were stretched."""
    return max(8, int(img.max(initial=0)).bit_length())


def _pages(path: Path) -> int:
    """How many images a file holds (a multi-page TIFF, an animated GIF or WebP); 1 if OpenCV
    cannot tell."""
    try:
        return int(cv2.imcount(opencv_name(path)))
    except (cv2.error, CameraError):  # (a name OpenCV cannot take: the first image is read)
        return 1


def opencv_name(path: Path) -> str:
    """``path`` as OpenCV opens it (video files, page counts, video output). OpenCV takes a
    name as UTF-8: one that is not (Latin-1 from a FAT stick or a Windows zip, which Python
    holds as surrogates) crashed the whole process, the CAN replay with it (a segfault in
    VideoCapture, VideoWriter and imcount). Images are read from their bytes, whatever the
    name."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise CameraError(
            f"{path}: OpenCV cannot open a file whose name is not UTF-8 text: rename it"
        ) from None
    return name


def folder_images(folder: Path, suffixes: frozenset[str]) -> list[Path]:
    """The image files of ``folder`` (by name, ``suffixes``), sorted; what is passed over (other
    files, broken links, sub-folders) is said in a warning, never skipped in silence."""
    entries = sorted(folder.iterdir())
    files = [p for p in entries if p.is_file() and p.suffix.lower() in suffixes]
    folders = [p.name for p in entries if p.is_dir()]
    taken = set(files)
    others = [p.name for p in entries if not p.is_dir() and p not in taken]
    for names, what in ((others, "file(s) not read, not named as images"),
                        (folders, "sub-folder(s) not read")):  # fmt: skip
        if names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            log.warning("%s: %d %s (%s)", folder, len(names), what, shown)
    return files


class ImageFolderSource:
    """The images of a folder in name order (or one image file), as frames at ``fps``; an
    image that cannot be read is a frame seen and dropped (``Unreadable``)."""

    live = False
    stills = True

    def __init__(self, path: str | Path, fps: float = 10.0) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.fps = fps
        if self.path.is_file() and self.path.suffix.lower() in READ_SUFFIXES:
            self.files = [self.path]
            return
        if not self.path.is_dir():
            raise CameraError(f"{self.path}: no such image folder")
        self.files = folder_images(self.path, READ_SUFFIXES)
        if not self.files:
            raise CameraError(
                f"{self.path}: no images in this folder ({', '.join(sorted(READ_SUFFIXES))})"
            )

    def total(self) -> int | None:
        return len(self.files)

    def frames(self) -> Iterator[Frame | Unreadable]:
        for i, p in enumerate(self.files):
            try:
                img = read_image(p)
            except CameraError as exc:
                yield Unreadable(i, i / self.fps, p.name, str(exc))
                continue
            yield Frame(i, i / self.fps, img, p.name)


class DeviceSource:
    """A V4L2 device (``/dev/video0`` on the Pi); ``t`` is wall time since opening."""

    live = True
    stills = False

    def __init__(self, path: str, width: int = 1280, height: int = 720, fps: float = 15.0) -> None:
        self.name = path
        self.fps = fps
        self.width, self.height = width, height
        if not Path(path).exists():
            raise CameraError(f"{path}: no such camera device")

    def total(self) -> int | None:
        return None

    def frames(self) -> Iterator[Frame]:
        _cv_quiet()
        cap = cv2.VideoCapture(self.name, cv2.CAP_V4L2)
        if not cap.isOpened():
            raise CameraError(f"{self.name}: cannot open the camera device")
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
        cap.set(cv2.CAP_PROP_FPS, self.fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a backlog
        t0 = time.monotonic()
        try:
            i = 0
            while True:
                ok, img = cap.read()
                if not ok or img is None:
                    raise CameraError(f"{self.name}: the camera stopped delivering frames")
                yield Frame(i, time.monotonic() - t0, img)
                i += 1
        finally:
            cap.release()


class SyntheticSource:
    """Rendered frames (moving rectangles on a gradient) for tests: no faces, no files."""

    live = False
    stills = False

    def __init__(
        self, count: int = 100, size: tuple[int, int] = (640, 360), fps: float = 25.0
    ) -> None:
        self.name = "synthetic"
        self.count, self.size, self.fps = count, size, fps

    def total(self) -> int | None:
        return self.count

    def frames(self) -> Iterator[Frame]:
        w, h = self.size
        base = np.tile(np.linspace(40, 200, w, dtype=np.uint8)[None, :, None], (h, 1, 3))
        for i in range(self.count):
            img = base.copy()
            x = (i * 7) % max(1, w - 60)
            cv2.rectangle(img, (x, h // 3), (x + 60, h // 3 + 40), (30, 30, 220), -1)
            yield Frame(i, i / self.fps, img)


class RotatedSource:
    """The frames of ``source`` turned ``degrees`` clockwise (90, 180, 270): a camera mounted
    on its side or upside down gives the detectors upright faces and level plates."""

    _CODES = {
        90: cv2.ROTATE_90_CLOCKWISE,
        180: cv2.ROTATE_180,
        270: cv2.ROTATE_90_COUNTERCLOCKWISE,
    }

    def __init__(self, source: FrameSource, degrees: int) -> None:
        self.source, self.code = source, self._CODES[degrees]
        self.name, self.fps = source.name, source.fps
        self.live, self.stills = source.live, source.stills

    def total(self) -> int | None:
        return self.source.total()

    def frames(self) -> Iterator[Frame | Unreadable]:
        frames = self.source.frames()
        try:
            for f in frames:
                if isinstance(f, Frame):
                    turned: Image = cv2.rotate(f.image, self.code)  # type: ignore[assignment]
                    f = Frame(f.index, f.t, turned, f.name)
                yield f
        finally:
            close = getattr(frames, "close", None)
            if close is not None:
                close()


def open_source(spec: str) -> FrameSource:
    """A source from its config string: a video file, an image folder, ``/dev/videoN``,
    or ``synthetic``."""
    if not spec:
        raise CameraError(
            "camera source is empty: give a video file, image folder, /dev/videoN or 'synthetic'"
        )
    if spec == "synthetic":
        return SyntheticSource()
    if spec.startswith("/dev/video"):
        return DeviceSource(spec)
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix.lower() == ".gif" and _pages(p) > 1:
        return VideoFileSource(p)  # an animated GIF is a clip
    if p.is_dir() or (p.is_file() and p.suffix.lower() in READ_SUFFIXES):
        return ImageFolderSource(p)
    if not p.exists():
        raise CameraError(f"{p}: no such video file or image folder")
    return VideoFileSource(p)
