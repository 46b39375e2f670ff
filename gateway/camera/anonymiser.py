"""The anonymiser: which frames are detected, which boxes cover each frame, and failing closed.

Detection runs on every ``detect_every``-th frame (k). The frames in between are held back (at
most k - 1 of them) until the next detection, and each is covered by the boxes of the detection
before it *and* the one after it, plus the frame memory (boxes of the last ``memory`` frames).
So a face that appears between two detections is blurred from its first frame on, at the cost
of k - 1 frames of latency; with k = 1 nothing is held back.

Fail closed: if a detection raises, does not answer within ``timeout_s``, or the detector is
still busy with an earlier frame, that frame and the frames held back for it are dropped, never
returned unblurred. Synchronous and single-caller: the stage runs it in a worker thread.
``push`` is ``plan`` (detect and decide each frame's boxes) then ``render`` (blur them); the
stage runs ``render`` in a thread of its own, beside the next ``plan``.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from gateway.camera.anonymize import AnonymisedFrame, FrameMemory, anonymize
from gateway.camera.detect import Box, Detector, Kind
from gateway.camera.options import AnonymiserSettings
from gateway.camera.source import Frame
from gateway.errors import ConfigError


class DetectionFailed(Exception):
    """This frame has no trustworthy detection: it must be dropped."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one frame: anonymised (with the boxes applied) or dropped (``error``)."""

    frame: Frame
    anonymised: AnonymisedFrame | None
    boxes: tuple[Box, ...] = ()
    faces: int = 0  # found by the detections that cover this frame
    plates: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """A frame whose fate is decided: the boxes that cover it, or the reason it is dropped
    (``error``). ``FrameAnonymiser.render`` turns plans into outcomes; the camera stage runs
    that beside the next detection."""

    frame: Frame
    boxes: tuple[Box, ...] = ()
    faces: int = 0
    plates: int = 0
    error: str | None = None


def _counts(boxes: list[Box]) -> tuple[int, int]:
    faces = sum(b.kind is Kind.FACE for b in boxes)
    return faces, len(boxes) - faces


class FrameAnonymiser:
    """``push(frame)`` returns the outcomes that became final (in frame order; possibly none
    while a frame is held back); ``flush()`` finishes the frames held back at the end."""

    def __init__(self, detector: Detector, settings: AnonymiserSettings) -> None:
        if settings.detect_every < 1:
            raise ConfigError(f"detect_every must be >= 1, got {settings.detect_every}")
        self.detector = detector
        self.s = settings
        self.memory = FrameMemory(settings.memory + settings.detect_every - 1)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gateway-detect-call")
        self._running: Future[list[Box]] | None = None
        self._held: list[Frame] = []
        self._last_ok: int | None = None
        self._last_counts = (0, 0)

    @property
    def held(self) -> list[Frame]:
        """Frames waiting for the next detection."""
        return list(self._held)

    def _detect(self, frame: Frame) -> list[Box]:
        if self._running is not None and not self._running.done():
            raise DetectionFailed("the detector is still busy with an earlier frame")
        fut = self._running = self._pool.submit(self.detector.detect, frame.image)
        try:
            return fut.result(timeout=self.s.timeout_s)
        except FutureTimeout:
            raise DetectionFailed(f"no detection within {self.s.timeout_s:g} s") from None
        except Exception as exc:  # noqa: BLE001 - any detector failure means: drop the frame
            raise DetectionFailed(f"detector failed: {exc!r}") from exc

    def _anonymize(self, frame: Frame, boxes: list[Box]) -> AnonymisedFrame:
        return anonymize(
            frame.image, boxes, self.s.method, self.s.margin, index=frame.index, t=frame.t
        )

    def _resolve(self, frame: Frame) -> list[Plan]:
        """Detect on ``frame``; decide the frames held back before it, then ``frame`` itself."""
        held, self._held = self._held, []
        try:
            found = self._detect(frame)
        except DetectionFailed as exc:
            return [Plan(f, error=str(exc)) for f in (*held, frame)]
        before = self._last_counts
        now = _counts(found)
        out: list[Plan] = []
        for f in held:
            boxes = self.memory.boxes(f.index) + found  # the detections before and after it
            faces, plates = max(before[0], now[0]), max(before[1], now[1])
            out.append(Plan(f, tuple(boxes), faces, plates))
        self.memory.update(frame.index, found)
        self._last_ok, self._last_counts = frame.index, now
        out.append(Plan(frame, tuple(self.memory.boxes(frame.index)), *now))
        return out

    def plan(self, frame: Frame) -> list[Plan]:
        """The frames decided by ``frame`` (in frame order; none while it is held back)."""
        k, last = self.s.detect_every, self._last_ok
        due = (
            last is None
            or frame.index % k == 0
            or not 0 <= frame.index - last < k
            or len(self._held) >= k - 1
        )
        if not due:
            self._held.append(frame)
            return []
        return self._resolve(frame)

    def plan_flush(self) -> list[Plan]:
        """At the end of the source: detect on the last frame held back, deciding them all."""
        if not self._held:
            return []
        last = self._held.pop()
        return self._resolve(last)

    def render(self, plans: list[Plan]) -> list[Outcome]:
        """Each plan's outcome: its frame anonymised with its boxes, or dropped. Touches no
        state of the anonymiser, so it may run in another thread beside ``plan``."""
        return [
            Outcome(p.frame, None, error=p.error)
            if p.error is not None
            else Outcome(
                p.frame, self._anonymize(p.frame, list(p.boxes)), p.boxes, p.faces, p.plates
            )
            for p in plans
        ]

    def push(self, frame: Frame) -> list[Outcome]:
        return self.render(self.plan(frame))

    def flush(self) -> list[Outcome]:
        """At the end of the source: detect on the last frame held back, finishing them all."""
        return self.render(self.plan_flush())

    def process(self, frame: Frame) -> Outcome:
        """One frame on its own (a photo): detected, anonymised, or raises ``DetectionFailed``."""
        self.reset()
        (outcome,) = self.render(self._resolve(frame))
        if outcome.anonymised is None:
            raise DetectionFailed(outcome.error or "detection failed")
        return outcome

    def reset(self) -> None:
        """Forget every box: the next frame is unrelated to the last."""
        self.memory = FrameMemory(self.memory.n)
        self._held = []
        self._last_ok = None
        self._last_counts = (0, 0)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.detector, "close", None)
        if close is not None:
            close()
