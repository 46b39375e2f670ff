"""The camera stage: fail closed (a detector that raises, hangs or falls behind -> dropped frames,
counted, never stored), windows of video time, work off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from gateway.camera.anonymiser import FrameAnonymiser
from gateway.camera.detect import Box, Kind
from gateway.camera.options import AnonymiserSettings
from gateway.camera.pipeline import CameraStage
from gateway.camera.source import Frame, SyntheticSource
from gateway.camera.store import FrameStore, StoreSettings
from gateway.records import CameraSummary


class Raising:
    def detect(self, frame):
        raise RuntimeError("inference engine crashed")


class Hanging:
    def __init__(self) -> None:
        self.release = threading.Event()

    def detect(self, frame):
        self.release.wait(5)
        return []


class Flaky:
    """Finds one face, but raises on every frame index in ``fail_on``."""

    def __init__(self, fail_on: set[int]) -> None:
        self.fail_on, self.calls = fail_on, 0

    def detect(self, frame):
        i = self.calls
        self.calls += 1
        if i in self.fail_on:
            raise RuntimeError("boom")
        return [Box(Kind.FACE, 10, 10, 20, 20, 0.9)]


def _run(stage: CameraStage, stop: asyncio.Event | None = None) -> list[CameraSummary]:
    out: list[CameraSummary] = []

    async def emit(summary: CameraSummary) -> None:
        out.append(summary)

    asyncio.run(stage.run(emit, stop or asyncio.Event()))
    return out


def _stage(tmp_path, detector, *, count=50, window=1.0, speed=None, **kw) -> CameraStage:
    settings = AnonymiserSettings(**kw)
    return CameraStage(
        SyntheticSource(count=count, size=(64, 36), fps=25.0),
        FrameAnonymiser(detector, settings),
        name="front",
        window=window,
        speed=speed,
        store=FrameStore(tmp_path / "frames", "front", StoreSettings(every_s=0.0)),
    )


def test_a_detector_that_raises_drops_every_frame_and_stores_none(tmp_path):
    stage = _stage(tmp_path, Raising())
    summaries = _run(stage)
    assert stage.dropped == 50
    assert sum(s.frames_dropped for s in summaries) == 50
    assert sum(s.frames_anonymised for s in summaries) == 0
    assert {s.health for s in summaries} == {"failed"}
    assert list((tmp_path / "frames").iterdir()) == []


def test_a_detector_that_hangs_times_out_and_its_frames_are_dropped(tmp_path):
    det = Hanging()
    stage = _stage(tmp_path, det, count=6, timeout_s=0.2)
    try:
        summaries = _run(stage)
    finally:
        det.release.set()
    assert stage.dropped == 6  # one timed out, the rest found the detector still busy
    assert sum(s.frames_seen for s in summaries) == 6
    assert list((tmp_path / "frames").iterdir()) == []


def _push_all(anon: FrameAnonymiser, frames: list[Frame]) -> dict[int, tuple[int, ...] | None]:
    """frame index -> the boxes applied (as x positions), or None when dropped."""
    got = {}
    for f in frames:
        for o in anon.push(f):
            got[o.frame.index] = None if o.anonymised is None else tuple(b.x for b in o.boxes)
    for o in anon.flush():
        got[o.frame.index] = None if o.anonymised is None else tuple(b.x for b in o.boxes)
    anon.close()
    return got


def test_a_failed_detection_drops_its_frame_and_the_frames_held_for_it(tmp_path):
    # detection on every 3rd frame; the second detection (on frame 3) fails: frames 1-3 are
    # dropped, and frame 4 must detect again (it has no detection of its own k-frame group)
    det = Flaky(fail_on={1})
    anon = FrameAnonymiser(det, AnonymiserSettings(detect_every=3, memory=0))
    img = np.zeros((36, 64, 3), np.uint8)
    got = _push_all(anon, [Frame(i, i / 25, img) for i in range(7)])
    assert [i for i, boxes in sorted(got.items()) if boxes is None] == [1, 2, 3]
    assert sorted(got) == list(range(7))
    assert det.calls == 4  # frames 0, 3 (failed), 4, 6


def test_a_face_appearing_between_detections_is_blurred_from_its_first_frame():
    class Appears:
        def detect(self, frame):  # the face is there from frame 1 on (marked by a white pixel)
            return [Box(Kind.FACE, 10, 10, 20, 20, 0.9)] if frame[0, 0, 0] else []

    frames = []
    for i in range(7):
        img = np.zeros((36, 64, 3), np.uint8)
        img[0, 0] = 255 if i >= 1 else 0
        frames.append(Frame(i, i / 25, img))
    anon = FrameAnonymiser(Appears(), AnonymiserSettings(detect_every=3, memory=0))
    got = _push_all(anon, frames)
    # frame 0 is detected (nothing there); frames 1 and 2 are held until frame 3's detection
    assert got[0] == ()
    assert all(got[i] for i in range(1, 7)), got


def test_frames_come_out_in_order_and_none_is_lost_at_the_end():
    anon = FrameAnonymiser(Flaky(set()), AnonymiserSettings(detect_every=4))
    img = np.zeros((36, 64, 3), np.uint8)
    order = []
    for i in range(10):
        order += [o.frame.index for o in anon.push(Frame(i, i / 25, img))]
    order += [o.frame.index for o in anon.flush()]
    anon.close()
    assert order == list(range(10))


def test_summaries_follow_video_time_and_the_last_window_is_flushed(tmp_path):
    stage = _stage(tmp_path, Flaky(set()), count=60, window=1.0)
    summaries = _run(stage)
    # 60 frames at 25 fps = 2.4 s of video: windows [0,1), [1,2), [2,2.4)
    assert [s.start for s in summaries] == [0.0, 1.0, 2.0]
    assert [s.frames_seen for s in summaries] == [25, 25, 10]
    assert summaries[-1].end == pytest.approx(2.4)
    assert all(s.faces_blurred == s.frames_anonymised for s in summaries)
    assert {s.health for s in summaries} == {"ok"}
    assert stage.dropped == 0
    stored = list((tmp_path / "frames").iterdir())
    assert len(stored) == 60


def test_paced_replay_gives_the_same_summaries_as_fast(tmp_path):
    fast = _run(_stage(tmp_path / "a", Flaky(set()), count=20, window=0.4))
    paced = _run(_stage(tmp_path / "b", Flaky(set()), count=20, window=0.4, speed=4.0))
    strip = lambda ss: [(s.start, s.frames_seen, s.frames_anonymised, s.faces_blurred) for s in ss]  # noqa: E731
    assert strip(fast) == strip(paced)


def test_blurring_runs_beside_the_next_detection_and_windows_wait_for_it(tmp_path):
    spans: dict[str, list[tuple[float, float]]] = {"detect": [], "render": []}

    class Slow:
        def detect(self, frame):
            t0 = time.monotonic()
            time.sleep(0.03)
            spans["detect"].append((t0, time.monotonic()))
            return [Box(Kind.FACE, 10, 10, 20, 20, 0.9)]

    class SlowBlur(FrameAnonymiser):
        def render(self, plans):
            t0 = time.monotonic()
            time.sleep(0.03)
            out = super().render(plans)
            spans["render"].append((t0, time.monotonic()))
            return out

    stage = CameraStage(
        # 16 fps and 0.25 s windows: frame times and window edges exact in binary
        SyntheticSource(count=40, size=(64, 36), fps=16.0),
        SlowBlur(Slow(), AnonymiserSettings(detect_every=2)),
        name="front",
        window=0.25,  # 4 frames: windows close while their last frames are still being blurred
        speed=None,
        store=FrameStore(tmp_path / "frames", "front", StoreSettings(every_s=0.0)),
    )
    summaries = _run(stage)
    assert [s.frames_seen for s in summaries] == [4] * 10
    # a window summarised before its frames were blurred would count fewer of them
    assert [s.frames_anonymised for s in summaries] == [4] * 10
    assert len(list((tmp_path / "frames").iterdir())) == 40
    # some detection ran while the frames of the one before it were being blurred
    renders = spans["render"]
    assert any(r0 < d0 < r1 for d0, _ in spans["detect"] for r0, r1 in renders)


def test_the_event_loop_keeps_running_while_inference_is_slow(tmp_path):
    class Slow:
        def detect(self, frame):
            time.sleep(0.1)  # blocking, like a real network
            return []

    stage = _stage(tmp_path, Slow(), count=10)
    ticks: list[float] = []

    async def main() -> None:
        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.005)

        t = asyncio.create_task(ticker())

        async def emit(summary):
            pass

        await stage.run(emit, asyncio.Event())
        t.cancel()

    asyncio.run(main())
    gaps = np.diff(ticks)
    # ~1 s of inference, ticking every 5 ms: a loop blocked by inference would tick ~10 times
    assert len(ticks) > 50, len(ticks)
    assert np.percentile(gaps, 95) < 0.05, gaps.max()  # never waits for a 0.1 s inference


def test_stop_ends_the_stage_and_flushes_what_it_saw(tmp_path):
    stage = _stage(tmp_path, Flaky(set()), count=10_000, speed=1.0)

    async def main() -> list[CameraSummary]:
        stop = asyncio.Event()
        out: list[CameraSummary] = []

        async def emit(summary):
            out.append(summary)

        task = asyncio.create_task(stage.run(emit, stop))
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.wait_for(task, 5)
        return out

    out = asyncio.run(main())
    assert out and 0 < sum(s.frames_seen for s in out) < 100


def test_drops_are_warned_once_per_reason_then_at_most_every_ten_seconds_with_a_count(
    tmp_path, caplog
):
    from gateway.camera.anonymiser import Outcome
    from gateway.camera.pipeline import WARN_EVERY_S

    stage = _stage(tmp_path, Raising(), count=1)
    image = np.zeros((36, 64, 3), np.uint8)

    def drop(i: int, at: float, reason: str) -> None:
        stage._warn_drop(Outcome(Frame(i, i / 25, image), None, error=reason), at)

    with caplog.at_level("WARNING", logger="gateway.camera"):
        for i in range(100):  # ten seconds of a camera the device cannot keep up with
            drop(i, i * WARN_EVERY_S / 100, "behind the camera's pace")
        drop(100, 0.5, "detection failed")  # another reason is said at once
        drop(101, WARN_EVERY_S, "behind the camera's pace")
        drop(102, WARN_EVERY_S + 1, "behind the camera's pace")
        drop(103, WARN_EVERY_S + 2, "behind the camera's pace")
        stage._warn_rest()  # the end of the run: what no warning has counted yet
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "camera front: frame 0 dropped: behind the camera's pace",
        "camera front: frame 100 dropped: detection failed",
        "camera front: frame 101 dropped: behind the camera's pace (99 more since the last warning)",
        "camera front: 2 more frame(s) dropped since the last warning: behind the camera's pace",
    ]
    stage._read.shutdown()
    stage._work.shutdown()


def test_while_collection_is_stopped_no_frame_is_detected_stored_or_counted(tmp_path):
    stage = _stage(tmp_path, Flaky(set()), count=50, window=10.0, detect_every=2)
    calls = [0]

    def collecting() -> bool:  # the owner stops collection for frames 11..30, then resumes
        calls[0] += 1
        return not 11 <= calls[0] <= 30

    stage.collecting = collecting
    summaries = _run(stage)
    assert sum(s.frames_seen for s in summaries) == 30 and stage.not_collected == 20
    assert sum(s.frames_anonymised for s in summaries) == 30 and stage.dropped == 0
    stored = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "frames").iterdir())
    assert len(stored) == 30  # the store numbers what it keeps: 30 frames, none of the stop
