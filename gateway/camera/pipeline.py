"""The camera stage: source -> anonymiser (detect every k-th frame, boxes carried both ways,
frame memory, fail closed) -> on-device store, and a ``CameraSummary`` of counts per window of
video time (frame index / fps), so the replay speed does not change the summaries.

Decoding runs in one worker thread (a frame ahead), inference in another and blurring in a
third (beside the next inference), so the event loop and the CAN path on it never wait for
them. Dropped frames (detection failed, or a paced replay fell behind like a real camera would)
are counted, never stored, never sent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.camera.anonymiser import (
    AnonymiserSettings,
    DetectionFailed,
    FrameAnonymiser,
    Outcome,
    Plan,
)
from gateway.camera.source import Frame, FrameSource, Unreadable
from gateway.camera.store import FrameStore, StoreSettings
from gateway.errors import CameraError, StorageError
from gateway.records import CameraSummary
from gateway.settings import GatewaySettings

log = logging.getLogger("gateway.camera")

WARN_EVERY_S = 10.0  # at most one warning per drop reason and camera in this many seconds


@dataclass
class _Window:
    """One camera window's counts, published as a summary when it closes."""

    index: int
    start: float
    seen: int = 0
    anonymised: int = 0
    dropped: int = 0
    faces: int = 0
    plates: int = 0
    wall0: float = 0.0
    wall1: float = 0.0
    last_t: float = 0.0
    source_failed: bool = False

    def summary(self, camera: str, window: float, fps_src: float, partial: bool) -> CameraSummary:
        end = self.start + window
        if partial:
            end = min(end, self.last_t + 1.0 / fps_src)
        wall = self.wall1 - self.wall0
        fps = self.anonymised / wall if wall > 0 and self.anonymised > 1 else 0.0
        health = "ok"
        if self.source_failed:
            health = "failed"
        elif self.dropped:
            health = "failed" if self.anonymised == 0 else "degraded"
        return CameraSummary(
            camera,
            self.start,
            end,
            self.seen,
            self.anonymised,
            self.dropped,
            self.faces,
            self.plates,
            fps,
            health,
        )


UNREADABLE = "unreadable image"  # the drop reason of a photo that could not be read


def _no_image(item: object) -> Frame:
    """The frame of an unreadable image (its number, time and name; no pixels)."""
    assert isinstance(item, Unreadable)
    return Frame(item.index, item.t, np.zeros((0, 0, 3), np.uint8), item.name)


def _read_error(fut: asyncio.Future[list[Outcome]]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("camera: blurring that ended after the stage: %r", fut.exception())


class CameraStage:
    """One camera: ``await stage.run(emit, stop)``; ``dropped`` counts dropped frames so far."""

    def __init__(
        self,
        source: FrameSource,
        anonymiser: FrameAnonymiser,
        *,
        name: str,
        window: float,
        speed: float | None = 1.0,
        store: FrameStore | None = None,
        clock: Callable[[], float] = time.time,
        collecting: Callable[[], bool] = lambda: True,
    ) -> None:
        self.source = source
        # False while the owner has stopped collection (or camera consent is required and not
        # given): frames are read, as a camera keeps delivering, and neither detected, stored
        # nor counted as seen
        self.collecting = collecting
        self.not_collected = 0
        self.anonymiser = anonymiser
        self.name = name
        self.window = window
        self.speed = speed  # None: as fast as possible
        self.store = store
        self.clock = clock
        self.dropped = 0
        self.seen = 0
        self.anonymised = 0
        self._windows: dict[int, _Window] = {}
        self._warned: dict[str, tuple[float, int]] = {}  # reason -> (last warning, drops since)
        self._read = ThreadPoolExecutor(1, thread_name_prefix=f"gateway-camera-read-{name}")
        self._work = ThreadPoolExecutor(1, thread_name_prefix=f"gateway-camera-work-{name}")
        # the frames decided by one detection are blurred (and stored) here, while the work
        # thread runs the next detection: ~1.1x the frames per second at 1280x720 on 2 cores
        self._blur = ThreadPoolExecutor(1, thread_name_prefix=f"gateway-camera-blur-{name}")

    # -- in the blur thread ------------------------------------------------------------------
    def _keep(self, outcomes: list[Outcome]) -> list[Outcome]:
        """Store what is due; a frame the store cannot take is still anonymised (and counted)."""
        if self.store is not None:
            for o in outcomes:
                if o.anonymised is not None and self.store.due(o.anonymised.t):
                    try:
                        self.store.put(o.anonymised, self.clock())
                    except StorageError as exc:
                        log.error("camera %s: %s", self.name, exc)
        return outcomes

    def _render(self, plans: list[Plan]) -> list[Outcome]:
        return self._keep(self.anonymiser.render(plans))

    # -- on the event loop -------------------------------------------------------------------
    def _window_of(self, t: float) -> _Window:
        w = math.floor(t / self.window)
        win = self._windows.get(w)
        if win is None:
            win = self._windows[w] = _Window(w, w * self.window, wall0=time.monotonic())
        return win

    def _count(self, outcomes: list[Outcome]) -> None:
        now = time.monotonic()
        for o in outcomes:
            win = self._window_of(o.frame.t)
            win.wall1 = now
            if o.anonymised is None:
                win.dropped += 1
                self.dropped += 1
                self._warn_drop(o, now)
                continue
            win.anonymised += 1
            win.faces += o.faces
            win.plates += o.plates
            self.anonymised += 1

    def _warn_drop(self, o: Outcome, now: float) -> None:
        """The first drop for a reason is said at once; later ones at most every
        ``WARN_EVERY_S`` seconds, with how many there were (a camera the device cannot keep up
        with drops most frames: one line each would bury everything else)."""
        reason = o.error or "not anonymised"
        # unreadable photos are one reason, whatever file each is (their paths differ)
        key = UNREADABLE if reason.startswith(UNREADABLE) else reason
        last, since = self._warned.get(key, (-math.inf, 0))
        if now - last < WARN_EVERY_S:
            self._warned[key] = (last, since + 1)
            return
        more = f" ({since} more since the last warning)" if since else ""
        log.warning("camera %s: frame %d dropped: %s%s", self.name, o.frame.index, reason, more)
        self._warned[key] = (now, 0)

    def _warn_rest(self) -> None:
        """At the end: the drops no warning has counted yet."""
        for reason, (_, since) in self._warned.items():
            if since:
                log.warning(
                    "camera %s: %d more frame(s) dropped since the last warning: %s",
                    self.name,
                    since,
                    reason,
                )
        self._warned.clear()

    async def _emit_before(
        self, w: float, emit: Callable[[CameraSummary], Awaitable[None]]
    ) -> None:
        """Emit every window that ends before window index ``w`` (all its frames are final)."""
        fps = self.source.fps or 25.0
        for i in sorted(self._windows):
            if i >= w:
                break
            win = self._windows.pop(i)
            await emit(win.summary(self.name, self.window, fps, partial=False))

    async def run(
        self, emit: Callable[[CameraSummary], Awaitable[None]], stop: asyncio.Event
    ) -> None:
        loop = asyncio.get_running_loop()
        frames = self.source.frames()
        fps_src = self.source.fps or 25.0
        pace = None if self.source.live else self.speed
        sentinel = object()

        def next_frame() -> object:
            return next(frames, sentinel)

        t_wall0 = time.monotonic()
        reading = loop.run_in_executor(self._read, next_frame)
        rendering: asyncio.Future[list[Outcome]] | None = None  # the last frames decided
        blurring: list[Plan] = []  # their plans
        try:
            while not stop.is_set():
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not reading.done():
                    break
                try:
                    item = reading.result()
                except CameraError as exc:
                    log.error("camera %s: %s", self.name, exc)
                    # said in a summary, even before a first frame (a device that never opened)
                    win = (
                        self._windows[max(self._windows)] if self._windows else self._window_of(0.0)
                    )
                    win.source_failed = True
                    break
                if item is sentinel:
                    break
                reading = loop.run_in_executor(self._read, next_frame)  # decode ahead
                if not self.collecting():
                    self.not_collected += 1
                    if self.anonymiser.held:  # the frames held for a detection: decided now,
                        # on the last of them, not by a frame after the stop
                        if rendering is not None:
                            self._count(await rendering)
                            rendering, blurring = None, []
                        last = await loop.run_in_executor(self._work, self.anonymiser.plan_flush)
                        self._count(await loop.run_in_executor(self._blur, self._render, last))
                    continue
                frame = item if isinstance(item, Frame) else _no_image(item)
                win = self._window_of(frame.t)
                win.seen += 1
                win.last_t = max(win.last_t, frame.t)
                self.seen += 1
                if isinstance(item, Unreadable):  # a photo of a folder: seen, and dropped
                    self._count([Outcome(frame, None, error=f"{UNREADABLE}: {item.reason}")])
                    continue
                if pace is not None:
                    late = time.monotonic() - (t_wall0 + frame.t / pace)
                    if late < 0:
                        await asyncio.sleep(-late)
                    elif late > max(0.2, 2.0 / (fps_src * pace)):
                        # a real camera does not wait for us: too far behind, skip this frame
                        self._count([Outcome(frame, None, error="behind the camera's pace")])
                        continue
                plans = await loop.run_in_executor(self._work, self.anonymiser.plan, frame)
                if rendering is not None and (plans or rendering.done()):
                    self._count(await rendering)  # in frame order: one rendering at a time
                    rendering, blurring = None, []
                if plans:
                    rendering = loop.run_in_executor(self._blur, self._render, plans)
                    blurring = plans
                held = self.anonymiser.held
                oldest = min((f.t for f in (*(p.frame for p in blurring), *held)), default=frame.t)
                await self._emit_before(math.floor(oldest / self.window), emit)
            # the end (or stop): finish the frames held back, then every window left
            if rendering is not None:
                self._count(await rendering)
                rendering = None
            last = await loop.run_in_executor(self._work, self.anonymiser.plan_flush)
            self._count(await loop.run_in_executor(self._blur, self._render, last))
            self._warn_rest()
            for i in sorted(self._windows):
                win = self._windows.pop(i)
                await emit(win.summary(self.name, self.window, fps_src, partial=True))
        finally:
            reading.cancel()
            close = getattr(frames, "close", None)
            if close is not None:
                self._read.submit(close)
            self._read.shutdown(wait=False)
            self._work.shutdown(wait=False)
            self._blur.shutdown(wait=False)
            if rendering is not None:  # cancelled or failed while blurring: its frames are
                # blurred (or not stored) all the same; its error, if any, is not left unread
                rendering.add_done_callback(_read_error)
            self.anonymiser.close()


def store_dir(g: GatewaySettings) -> Path:
    """Where anonymised frames are kept (``g``: the ``[gateway]`` settings): ``frames`` in
    the state folder (``state_dir``, or beside the ledger)."""
    return g.frames_path


__all__ = [
    "AnonymiserSettings",
    "CameraStage",
    "DetectionFailed",
    "FrameAnonymiser",
    "FrameStore",
    "StoreSettings",
    "store_dir",
]
