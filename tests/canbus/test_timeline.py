"""A replayed log's frame times: a frame far off the log's time, which the log does not follow,
is dropped and counted; a time that moves for good (a gap, a step back) is taken; and the same
frames are kept however the log is cut into chunks."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from gateway.canbus.replay import ReplaySource
from gateway.canbus.timeline import STEP_FRAMES, TimeLine
from gateway.records import FrameBatch, ReadStats
from tests.conftest import FIXTURES, KONA_CANDUMP, KONA_CCAN, KONA_PCAN


def _batch(ts, channel=None, channels=("can0",)) -> FrameBatch:
    n = len(ts)
    return FrameBatch(
        timestamp=np.asarray(ts, np.float64),
        channel=np.zeros(n, np.uint16) if channel is None else np.asarray(channel, np.uint16),
        channels=channels,
        arbitration_id=np.arange(n, dtype=np.uint32),  # (a frame's number: which were kept)
        is_extended=np.zeros(n, np.bool_),
        is_remote=np.zeros(n, np.bool_),
        is_error=np.zeros(n, np.bool_),
        is_fd=np.zeros(n, np.bool_),
        dlc=np.full(n, 8, np.uint8),
        data=np.zeros((n, 8), np.uint8),
    )


def _run(ts, cuts):
    """The frames kept (by number) and where the log's time went back, ``ts`` cut at ``cuts``."""
    stats = ReadStats(path="x.log")
    line = TimeLine(stats)
    whole = _batch(ts)
    kept: list[int] = []
    steps: list[int] = []
    bounds = [0, *sorted(set(cuts)), len(ts)]
    pieces = [
        whole.select(np.arange(lo, hi))
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        if hi > lo
    ]
    out = [p for piece in pieces for p in line.feed(piece)] + list(line.finish())
    for stepped, part in out:
        if stepped:
            steps.append(int(part.arbitration_id[0]))
        kept += part.arbitration_id.tolist()
    return kept, steps, stats


def _drive(n=400, start=1000.0, rate=0.01):
    return list(start + rate * np.arange(n))


@pytest.mark.parametrize("jump", [30.0, 86_400.0, -86_400.0, -30.0])
def test_a_lone_frame_far_off_the_logs_time_is_dropped_and_counted(jump):
    ts = _drive()
    ts[150] += jump
    kept, steps, stats = _run(ts, [])
    assert kept == [i for i in range(400) if i != 150] and steps == []
    assert stats.off_time == 1
    assert stats.first_off_time == [f"frame 151: time {ts[150]:.6f}, {jump:+.1f} s"]


def test_a_short_run_off_the_logs_time_is_dropped_a_long_one_is_a_gap_or_a_step_back():
    ts = _drive(600)
    ts[100 : 100 + STEP_FRAMES - 1] = [t + 500 for t in ts[100 : 100 + STEP_FRAMES - 1]]
    ts[300:] = [t + 3600 for t in ts[300:]]  # the car was off for an hour: a gap
    kept, steps, stats = _run(ts, [])
    assert kept == [i for i in range(600) if not 100 <= i < 100 + STEP_FRAMES - 1]
    assert steps == [] and stats.steps_back == 0 and stats.off_time == STEP_FRAMES - 1
    ts = _drive(600)
    ts[300:] = [t - 3600 for t in ts[300:]]  # two recordings in one file: a step back
    kept, steps, stats = _run(ts, [])
    assert kept == list(range(600)) and steps == [300] and stats.steps_back == 1
    assert stats.first_steps == ["frame 301: -3600.0 s"]


def test_a_sparse_log_and_a_last_frame_after_a_gap_are_taken_whole():
    # one frame every 30 s (a log of one slow message): every frame is off the time of the one
    # before, and the time never comes back
    ts = list(1000.0 + 30.0 * np.arange(50))
    for cuts in ([], [1, 2, 3, 17], list(range(1, 50))):
        kept, steps, stats = _run(ts, cuts)
        assert kept == list(range(50)) and steps == [] and stats.off_time == 0


@pytest.mark.parametrize("where", ["first", "last"])
def test_a_damaged_first_or_last_frame_of_a_dense_log_is_dropped(where):
    # (a paced replay waited a day on either; a first frame a day ahead made the rest a step
    # back, unpaced)
    ts = _drive(300)
    at = 0 if where == "first" else 299
    ts[at] += 86_400.0
    for cuts in ([], [1], [2, 299], list(range(1, 300))):
        kept, steps, stats = _run(ts, cuts)
        assert kept == [i for i in range(300) if i != at] and steps == [], cuts
        assert stats.off_time == 1 and stats.first_off_time[0].startswith(f"frame {at + 1}:")
    # a sparse log's last frame, an hour after the one before it, is its own
    sparse = list(1000.0 + 30.0 * np.arange(10))
    kept, _, stats = _run([*sparse, sparse[-1] + 3600], [])
    assert kept == list(range(11)) and stats.off_time == 0


def test_buses_on_clocks_of_their_own_are_taken_as_they_are():
    # a log merged from two buses whose clocks were never set alike (can1 1.7e9 s ahead): each
    # frame is far off the one before it; every frame was dropped or a step back
    ts = np.array(_drive(2000))
    channel = np.arange(2000) % 2
    ts[channel == 1] += 1.7e9
    stats = ReadStats(path="x.log")
    line = TimeLine(stats)
    batch = _batch(ts, channel=channel, channels=("can0", "can1"))
    out = [p for half in (batch.select(np.arange(0, 999)), batch.select(np.arange(999, 2000)))
           for p in line.feed(half)] + list(line.finish())  # fmt: skip
    assert sum(len(p) for _, p in out) == 2000 and not any(s for s, _ in out)
    assert stats.separate_clocks and stats.off_time == 0 and stats.steps_back == 0


def test_times_that_are_not_numbers_are_left_to_the_aggregator():
    ts = _drive()
    ts[10] = float("nan")
    ts[399] = float("inf")
    kept, steps, stats = _run(ts, [])
    assert kept == list(range(400)) and stats.off_time == 0


def test_the_same_frames_are_kept_wherever_the_chunks_are_cut():
    # (--fast and --speed X cut a log differently; a paced chunk ends at the frame a quarter
    # of a second after its first: a frame stamped ahead always ends one)
    rng = np.random.default_rng(7)
    for trial in range(200):
        ts = _drive(300, rate=float(rng.choice([0.001, 0.01, 0.5, 30.0])))
        for _ in range(int(rng.integers(0, 4))):  # lone frames and short runs off the time
            at, width = int(rng.integers(0, 299)), int(rng.integers(1, 4))
            jump = float(rng.choice([-1e5, -40.0, 25.0, 1e6]))
            for i in range(at, min(at + width, 300)):
                ts[i] += jump
        if trial % 3 == 0:  # and a step back or a gap for good
            at = int(rng.integers(50, 280))
            ts[at:] = [t + float(rng.choice([-7200.0, 900.0])) for t in ts[at:]]
        whole = _run(ts, [])
        for _ in range(3):
            cuts = rng.integers(1, 300, int(rng.integers(1, 40))).tolist()
            assert _run(ts, cuts)[:2] == whole[:2], (trial, cuts)
        assert _run(ts, list(range(1, 300)))[:2] == whole[:2]  # one frame a chunk


def test_channels_of_a_held_frame_and_the_next_chunk_are_numbered_as_the_next_chunk_does():
    from gateway.canbus.timeline import _concat

    a = _batch([1.0, 2.0], channel=[0, 1], channels=("can1", "can0"))
    b = _batch([3.0], channel=[0], channels=("can0",))
    both = _concat(a, b)
    assert both.channels == ("can0", "can1")
    assert [both.channels[c] for c in both.channel] == ["can1", "can0", "can0"]


def _kona_with(tmp_path, edit):
    lines = KONA_CANDUMP.read_text().splitlines()
    edit(lines)
    path = tmp_path / "kona.log"
    path.write_text("\n".join(lines) + "\n")
    return path


def _moved(lines, i, seconds):
    t, rest = lines[i].split(" ", 1)
    lines[i] = f"({float(t.strip('()')) + seconds:.6f}) {rest}"


@pytest.mark.parametrize("speed", [None, 50.0])
def test_a_replay_drops_a_frame_stamped_a_day_ahead_and_is_not_held_by_it(tmp_path, speed):
    # A frame a day ahead closed every window open (a fast replay lost their summaries) and
    # held a paced one for a day (at --speed 50, half an hour) without a word.
    path = _kona_with(tmp_path, lambda lines: _moved(lines, 25_000, 86_400))

    async def collect(src):
        return [b async for b in src.batches()]

    src = ReplaySource([path], speed=speed)
    ts = np.concatenate([b.timestamp for b in asyncio.run(collect(src))])
    plain = ReplaySource([KONA_CANDUMP], speed=None)
    ref = np.concatenate([b.timestamp for b in asyncio.run(collect(plain))])
    assert ts.size == ref.size - 1 and ts.max() < ref.max() + 1
    assert src.stats[0].off_time == 1 and src.clock_steps == 0


@pytest.mark.broker
def test_the_summaries_of_a_log_with_a_damaged_time_are_those_of_the_log(tmp_path, broker, vin):
    import re

    from gateway.egress.ledger import read_entries

    damaged = _kona_with(tmp_path, lambda lines: _moved(lines, 25_000, 30))

    def replay(log, name):
        proc = subprocess.run(
            [sys.executable, "-m", "gateway", "replay", str(log),
             "--dbc", f"can0={KONA_PCAN}", "--dbc", f"can1={KONA_CCAN}", "--fast",
             "--window", "1", "--broker", broker.url, "--vin", f"{vin}{name}",
             "--ledger", str(tmp_path / f"{name}.jsonl"),
             "--outbox", str(tmp_path / f"{name}.sqlite")],
            capture_output=True, text=True, cwd=FIXTURES.parent,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        summaries = [
            e["bytes"]
            for _, e, _ in read_entries(tmp_path / f"{name}.jsonl")
            if e and e.get("kind") == "egress" and e.get("schema") == "gateway.signals"
        ]
        said = proc.stdout + proc.stderr
        released = int(re.search(r"released (\d+) message", said).group(1))
        return summaries, released, said

    plain, n_plain, _ = replay(KONA_CANDUMP, "a")
    got, n_got, said = replay(damaged, "b")
    # (the +30 s frame closed the windows of the ignition's last seconds: 13 of 15 left)
    assert (got, n_got) == (plain, n_plain) and len(plain) > 3
    assert "skipped 1 frame(s) whose time was far off the log's" in said
    assert "frame 25,001: time" in said and "+30.0 s" in said
    assert "came after their window" not in said


def test_a_paced_replay_is_paced_on_the_new_time_after_a_step_back(tmp_path, monkeypatch):
    # after a step back the frames were all overdue on the old time: the rest of the log went
    # out at once (an hour of frame time unpaced, for a longer log)
    def back(lines):
        for i in range(len(lines) // 2, len(lines)):
            _moved(lines, i, -3600.0)

    path = _kona_with(tmp_path, back)
    now = [0.0]
    slept: list[float] = []

    async def sleep(delay, *a, **k):
        slept.append(delay)
        now[0] += delay

    monkeypatch.setattr(asyncio, "sleep", sleep)
    src = ReplaySource([path], speed=1.0, clock=lambda: now[0])

    async def drain():
        async for _ in src.batches():
            pass

    asyncio.run(drain())
    assert src.clock_steps == 1
    assert 10.0 < sum(slept) < 11.5  # the log's 10.85 s of frames, both halves paced


def test_a_log_whose_time_goes_back_many_times_says_so_once_and_counts_them_all(tmp_path, caplog):
    """Each step back logged a warning with the running total: a non-monotonic log of 119
    steps printed 119 lines. One line now, and the report's count."""

    def back(lines):  # every 2,000 frames from the 5,000th, the time goes back an hour
        for start in range(5_000, len(lines) - 2_000, 2_000):
            for i in range(start, len(lines)):
                _moved(lines, i, -3600.0)

    path = _kona_with(tmp_path, back)

    async def drain(src):
        async for _ in src.batches():
            pass

    src = ReplaySource([path], speed=None)
    with caplog.at_level("WARNING"):
        asyncio.run(drain(src))
    assert src.clock_steps >= 10 and src.stats[0].steps_back == src.clock_steps
    said = [r for r in caplog.records if "time goes back" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
