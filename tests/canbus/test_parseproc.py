"""The candump parse in a process of its own gives what the parse in this process gives: the
same chunks, bit for bit, the same counts and bad lines; its errors arrive here; it never
outlives the reading, or the gateway."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gateway.canbus import candump, parseproc
from gateway.canbus.candump import iter_candump
from gateway.localbroker import pid_alive
from gateway.records import FrameBatch, ReadStats
from tests.conftest import KONA_CANDUMP, ROOT

pytestmark = pytest.mark.skipif(not parseproc.available(), reason="no fork or one core")

FIELDS = (
    "timestamp",
    "channel",
    "arbitration_id",
    "is_extended",
    "is_remote",
    "is_error",
    "is_fd",
    "dlc",
    "data",
)


def forked(path: Path, stats: ReadStats, **kw: object) -> list[FrameBatch]:
    args = {"chunk_frames": 8192, "max_chunk_seconds": 0.25, "block_bytes": 1 << 19, **kw}
    return list(parseproc.iter_candump_forked(path, stats, **args))  # type: ignore[arg-type]


def stream(
    path: Path, frames: int, stats: ReadStats | None = None, block_bytes: int = 4096
) -> Iterator[FrameBatch]:
    """The forked parse of ``path`` in chunks of ``frames`` frames (no time limit)."""
    return parseproc.iter_candump_forked(
        path,
        stats if stats is not None else ReadStats(),
        chunk_frames=frames,
        max_chunk_seconds=1e9,
        block_bytes=block_bytes,
    )


def assert_same(a: list[FrameBatch], b: list[FrameBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.channels == y.channels
        for f in FIELDS:
            u, v = getattr(x, f), getattr(y, f)
            assert u.dtype == v.dtype and u.shape == v.shape, f
            assert np.array_equal(u.view(np.uint8), v.view(np.uint8)), f
            assert v.flags.writeable, f


def damaged(tmp_path: Path) -> Path:
    """The real Kona log with bad lines here and there (and one overlong), as a replay meets."""
    lines = KONA_CANDUMP.read_bytes().splitlines(keepends=True)[:30000]
    rng = np.random.default_rng(5)
    for i in sorted(rng.choice(len(lines), 40, replace=False).tolist(), reverse=True):
        lines.insert(int(i), [b"garbage\n", b"(12.5) can0 12#XYZ\n", b"x" * 900 + b"\n"][i % 3])
    path = tmp_path / "damaged.log"
    path.write_bytes(b"".join(lines))
    return path


@pytest.fixture(params=["child", "gateway", "alternately"])
def who_parses(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Which process parses the blocks: the child alone; the gateway every block (as when it
    has read all and waits each time); or each every other block. The list collects the
    blocks the gateway parsed (their lines)."""
    mode = request.param
    flip = itertools.cycle([True, False])
    monkeypatch.setattr(  # the fork inherits it
        parseproc,
        "_waiting",
        lambda w, ahead: mode == "gateway" or (mode == "alternately" and next(flip)),
    )
    here: list[int] = []
    real = candump.parse_block

    def counted(buf: bytes) -> candump.Parsed:
        parsed = real(buf)
        here.append(parsed[3])
        return parsed

    monkeypatch.setattr(candump, "parse_block", counted)  # only this process's calls land here
    return here


def _expect_parsed_here(who: str, here: list[int], blocks: int) -> None:
    if who == "child":
        assert here == []
    elif who == "gateway":
        assert len(here) == blocks
    else:
        assert len(here) == (blocks + 1) // 2


def _block_count(path: Path, block_bytes: int) -> int:
    with path.open("rb") as fh:
        return sum(1 for _ in candump._blocks(fh, ReadStats(), block_bytes))


@pytest.mark.parametrize("chunking", [(8192, 0.25), (32768, float("inf"))])
def test_the_forked_parse_equals_the_parse_here(
    tmp_path: Path,
    chunking: tuple,
    who_parses: list[int],
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bit for bit, the same counts and bad lines (numbered in the file), whichever process
    parsed which block."""
    who = request.node.callspec.params["who_parses"]
    frames, seconds = chunking
    for path, block in ((KONA_CANDUMP, 1 << 19), (damaged(tmp_path), 4096)):
        here, there = ReadStats(path=str(path)), ReadStats(path=str(path))
        ref = list(
            iter_candump(
                path,
                here,
                chunk_frames=frames,
                max_chunk_seconds=seconds,
                block_bytes=block,
                workers=0,
            )
        )
        who_parses.clear()  # the parse here, for the reference: not the gateway's
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="gateway.canbus.parseproc"):
            got = forked(
                path, there, chunk_frames=frames, max_chunk_seconds=seconds, block_bytes=block
            )
        blocks = _block_count(path, block)
        _expect_parsed_here(who, who_parses, blocks)
        assert f"{len(who_parses)} of {blocks} blocks parsed by the gateway" in caplog.text
        assert_same(ref, got)
        assert there == here
    assert here.bad_lines > 0 and here.first_bad  # the damaged log did have bad lines


def test_the_child_leaves_a_block_to_the_gateway_only_when_it_has_read_all() -> None:
    r, w = os.pipe()
    try:
        assert parseproc._waiting(w, None)  # nothing in the pipe
        os.write(w, b"x")
        assert not parseproc._waiting(w, None)  # the gateway has not read it yet
        os.read(r, 1)
        ahead = parseproc._HeadStart(w, 1 << 20)
        assert not parseproc._waiting(w, ahead)  # the gateway has not started reading
        ahead.reading = True
        assert parseproc._waiting(w, ahead)
        ahead.views.append(memoryview(b"held"))
        assert not parseproc._waiting(w, ahead)  # it holds something not yet sent
    finally:
        os.close(r)
        os.close(w)


def test_stats_follow_each_chunk_for_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import health

    before = health.rss_mb()
    monkeypatch.setattr(parseproc, "peak_combined_kb", 0)  # what earlier tests left here
    stats = ReadStats()
    seen = []
    for b in stream(KONA_CANDUMP, 4096, stats, block_bytes=1 << 16):
        seen.append((stats.frames, stats.bytes_read, len(b)))
    assert len(seen) > 5
    assert [f for f, _, _ in seen] == list(np.cumsum([n for _, _, n in seen]))
    assert all(a[1] <= b[1] for a, b in zip(seen, seen[1:], strict=False))
    assert seen[-1][1] == KONA_CANDUMP.stat().st_size
    # this process's memory and the child's own (and the pipe's 1 MiB), together
    assert parseproc.peak_combined_kb / 1024 > before + 2


def test_an_error_in_the_child_is_raised_here(monkeypatch: pytest.MonkeyPatch) -> None:
    real = candump._parse_block
    calls = []

    def third_fails(*args: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("no memory for block 3")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(candump, "_parse_block", third_fails)  # the fork inherits it
    monkeypatch.setattr(parseproc, "_waiting", lambda w, ahead: False)  # the child parses all
    got = []
    with pytest.raises(MemoryError, match="block 3"):
        for b in stream(KONA_CANDUMP, 100):
            got.append(b)
    assert got  # the chunks before the error arrived


@pytest.fixture
def long_log(tmp_path: Path) -> Path:
    """The Kona log three times (3.5 MB of chunks): more than the pipe holds, so the child is
    still at work while the tests look at it."""
    path = tmp_path / "kona_x3.log"
    path.write_bytes(KONA_CANDUMP.read_bytes() * 3)
    return path


def _spy_forks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    pids: list[int] = []
    real_fork = os.fork

    def fork() -> int:
        pid = real_fork()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(parseproc.os, "fork", fork)
    return pids


def test_a_log_file_is_parsed_in_a_child_unless_turned_off_or_not_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = _spy_forks(monkeypatch)
    ref = list(iter_candump(KONA_CANDUMP, workers=0))
    assert_same(ref, list(iter_candump(KONA_CANDUMP)))
    assert len(pids) == 1
    monkeypatch.setenv("GATEWAY_PARSE_PROCESS", "0")
    assert_same(ref, list(iter_candump(KONA_CANDUMP)))
    monkeypatch.delenv("GATEWAY_PARSE_PROCESS")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["cp", str(KONA_CANDUMP), str(fifo)])
    try:
        assert_same(ref, list(iter_candump(fifo)))
    finally:
        writer.wait(10)
    assert len(pids) == 1  # neither with the switch off nor for a pipe


def test_an_error_that_cannot_cross_the_pipe_still_arrives_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Odd(Exception):
        def __reduce__(self) -> object:
            raise TypeError("cannot pickle this")

    def fails(*args: object) -> object:
        raise Odd("block parser broke")

    monkeypatch.setattr(candump, "_parse_block", fails)
    monkeypatch.setattr(parseproc, "_waiting", lambda w, ahead: False)  # the child parses all
    with pytest.raises(RuntimeError, match="Odd: block parser broke"):
        list(stream(KONA_CANDUMP, 100))


def test_a_child_that_dies_is_an_error_saying_how(
    long_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = _spy_forks(monkeypatch)
    it = stream(long_log, 256)
    next(it)
    os.kill(pids[0], signal.SIGKILL)
    with pytest.raises(RuntimeError, match="ended unexpectedly .killed by SIGKILL"):
        for _ in it:
            pass
    assert not parseproc._live


def test_a_failed_fork_parses_here(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(parseproc.os, "fork", no_fork)
    fds = len(os.listdir("/proc/self/fd"))
    ref = list(iter_candump(KONA_CANDUMP, workers=0))
    assert_same(ref, forked(KONA_CANDUMP, ReadStats()))
    assert len(os.listdir("/proc/self/fd")) == fds  # the pipe was closed


def test_a_reading_stopped_early_ends_the_child(
    long_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids = _spy_forks(monkeypatch)
    it = stream(long_log, 64)
    next(it)
    it.close()
    (pid,) = pids
    assert not pid_alive(pid)  # killed and reaped: no zombie either
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def test_the_child_ends_when_the_gateway_is_killed(long_log: Path) -> None:
    """A gateway killed hard (SIGKILL) leaves no parse process behind: its next write fails."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "import gateway.canbus.parseproc as pp\n"
        "from gateway.records import ReadStats\n"
        "real = pp.os.fork\n"
        "def fork():\n"
        "    pid = real()\n"
        "    if pid:\n"
        "        print(pid, flush=True)\n"
        "    return pid\n"
        "pp.os.fork = fork\n"
        "it = pp.iter_candump_forked(Path(sys.argv[1]), ReadStats(), chunk_frames=64,\n"
        "                            max_chunk_seconds=1e9, block_bytes=4096)\n"
        "next(it)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(long_log)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        assert pid_alive(child)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            # reaped by init once it exits; until then a zombie reads as "Z" in its stat
            try:
                state = Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0]
            except FileNotFoundError:
                break
            if state == "Z":
                break
            time.sleep(0.05)
        else:
            pytest.fail("the parse process outlived the killed gateway")
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_the_health_counts_the_parse_process_cpu_and_memory(
    long_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import health

    before = parseproc.cpu_seconds()
    it = stream(long_log, 256)
    next(it)
    assert len(parseproc._live) == 1 and parseproc.private_mb() > 0
    for _ in it:
        pass
    assert not parseproc._live
    assert parseproc.cpu_seconds() > before  # the ended child's CPU, from wait4
    mon = health.HealthMonitor()
    monkeypatch.setattr(parseproc, "cpu_seconds", lambda: before + 1000.0)
    assert mon.snapshot()["cpu_percent"] > 1000  # 1000 s of a child's CPU since the last one


# -- the early start of a fast replay (parseproc.start_early) -------------------------------
FAST = {"chunk_frames": 32768, "max_chunk_seconds": float("inf"), "block_bytes": 1 << 19}


def _kona_times(tmp_path: Path, n: int) -> Path:
    path = tmp_path / f"kona_x{n}.log"
    path.write_bytes(KONA_CANDUMP.read_bytes() * n)
    return path


def _started_early(tmp_path: Path, n: int) -> tuple[Path, int]:
    """The Kona log ``n`` times, its parse started early: (the log, the child's pid)."""
    path = _kona_times(tmp_path, n)
    assert parseproc.start_early(path, block_bytes=FAST["block_bytes"])  # type: ignore[arg-type]
    ((pid, _),) = parseproc._early.values()
    return path, pid


def _position(pid: int, path: Path) -> int | None:
    """Where the process ``pid`` reads ``path`` (its file offset); None once it closed it."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if Path(os.readlink(fd)) == path:
                for line in Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines():
                    if line.startswith("pos:"):
                        return int(line.split()[1])
        except OSError:
            continue
    return None


@pytest.fixture
def no_early_left() -> Iterator[None]:
    yield
    parseproc.drop_early()


def test_a_child_started_early_is_taken_over_and_parses_the_same(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_early_left: None,
    who_parses: list[int],
    request: pytest.FixtureRequest,
) -> None:
    path, pid = _started_early(tmp_path, 4)
    forks = _spy_forks(monkeypatch)  # from here on: no other child
    here, there = ReadStats(path=str(path)), ReadStats(path=str(path))
    ref = list(iter_candump(path, here, workers=0, **FAST))  # type: ignore[arg-type]
    who_parses.clear()
    got = forked(path, there, **FAST)
    who = request.node.callspec.params["who_parses"]
    if who == "child":
        assert who_parses == []
    else:  # the head start first: the gateway parses once it has read all the child held
        assert who_parses
    assert forks == [] and not parseproc._early
    assert_same(ref, got)
    assert there == here
    assert not pid_alive(pid)  # ended with its last chunk, and reaped


def _still(pid: int, path: Path) -> int:
    """Wait until the child ``pid`` stops reading ``path``: it holds what it may and sleeps in a
    write to the pipe (state S, its read position still; one merely not scheduled would be R).
    Its read position then."""
    last, still_since, deadline = -1, time.monotonic(), time.monotonic() + 60
    while time.monotonic() < deadline:
        pos = _position(pid, path)
        if pos is None:  # not opened yet, or closed: read to the end, nothing bounds it
            assert last < 0, "the child read the whole log"
            time.sleep(0.01)
            continue
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if pos != last or state != "S":
            last, still_since = pos, time.monotonic()
        elif time.monotonic() - still_since > 1.0:
            return last
        time.sleep(0.02)
    pytest.fail("the child never stopped reading")


def _frame_bytes() -> float:
    """Bytes a Kona frame takes in the pipe (and in the head start): a parsed block's."""
    with KONA_CANDUMP.open("rb") as fh:
        block = int(FAST["block_bytes"])
        buf, _ = next(candump._blocks(fh, ReadStats(), block))
    parsed = candump.parse_block(buf)
    return sum(v.nbytes for v in parseproc._parts("block", 0, (parsed, 0))) / len(parsed[0])


def test_a_child_started_early_parses_ahead_of_the_pipe_while_the_gateway_starts(
    tmp_path: Path, no_early_left: None
) -> None:
    path, pid = _started_early(tmp_path, 20)  # 791k frames: far more than the head start holds
    frames_read = _still(pid, path) / (path.stat().st_size / (20 * 39546))
    per_frame = _frame_bytes()
    # without a head start it reads what the pipe holds, and a chunk or two (one written, one
    # parsed, ~65k frames); with it, HEAD_START_BYTES more (~310k frames), and not much more
    import fcntl

    ((_, r),) = parseproc._early.values()
    pipe = fcntl.fcntl(r, 1032) / per_frame  # F_GETPIPE_SZ: what the kernel granted
    head = parseproc.HEAD_START_BYTES / per_frame
    chunk = FAST["chunk_frames"]
    assert pipe + 0.9 * head < frames_read < pipe + head + 3 * chunk  # type: ignore[operator]
    parseproc.drop_early()
    assert not pid_alive(pid) and not parseproc._early


def test_a_child_started_early_parses_on_as_the_replay_reads(
    tmp_path: Path, no_early_left: None
) -> None:
    """Once the replay reads, the child parses on as soon as it holds less than its head
    start, instead of first waiting until the replay has read all it holds (~40 ms of a
    million-frame replay in which the child sat idle), and holds no more than that."""
    path, pid = _started_early(tmp_path, 20)
    per_byte = 20 * 39546 / path.stat().st_size  # frames per byte of the log
    before = _still(pid, path) * per_byte
    stats = ReadStats(path=str(path))
    chunks = parseproc.iter_candump_forked(path, stats, **FAST)  # type: ignore[arg-type]
    taken = [next(chunks) for _ in range(4)]  # it took the early child over
    assert not parseproc._early and sum(len(c) for c in taken) == 4 * FAST["chunk_frames"]
    after = _still(pid, path) * per_byte
    # four chunks read; the child parsed about as many more (a block's worth of lines is
    # read ahead of a chunk), where it would not have parsed one until the replay had read
    # the ~310k frames it held; and no more: what it holds stays within its head start
    chunk = FAST["chunk_frames"]
    assert 3 * chunk < after - before < 6 * chunk  # type: ignore[operator]
    chunks.close()  # the replay stops: the child is ended
    assert not pid_alive(pid)


def test_messages_larger_than_the_pipe_are_not_held_back_once_the_replay_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_early_left: None
) -> None:
    """A chunk larger than the pipe reaches the replay only through writes that wait for it to
    read: the child must not hold a head start of them once the replay reads (it would send
    each only when the next is parsed, and keep ~8 MiB to the end)."""
    monkeypatch.setattr(parseproc, "_PIPE_BYTES", 1 << 16)  # 64 KiB: every chunk is larger
    path, pid = _started_early(tmp_path, 20)
    per_byte = 20 * 39546 / path.stat().st_size
    _still(pid, path)  # it holds its head start
    stats = ReadStats(path=str(path))
    chunks = parseproc.iter_candump_forked(path, stats, **FAST)  # type: ignore[arg-type]
    read = sum(len(next(chunks)) for _ in range(16))  # more than the head start held
    ahead = _still(pid, path) * per_byte - read
    chunk = FAST["chunk_frames"]
    # a chunk being written, one parsed, a block of lines read ahead; not ~310k frames
    assert 0 < ahead < 3 * chunk  # type: ignore[operator]
    rest = list(chunks)
    here = ReadStats(path=str(path))
    ref = list(iter_candump(path, here, workers=0, **FAST))  # type: ignore[arg-type]
    assert sum(len(c) for c in rest) + read == sum(len(c) for c in ref)
    assert stats == here
    assert not pid_alive(pid)


def test_a_log_changed_since_the_early_start_is_parsed_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_early_left: None
) -> None:
    path, stale = _started_early(tmp_path, 2)
    with path.open("ab") as fh:
        fh.write(b"(1673000000.000000) can0 123#11\n")
    forks = _spy_forks(monkeypatch)
    here, there = ReadStats(path=str(path)), ReadStats(path=str(path))
    ref = list(iter_candump(path, here, workers=0, **FAST))  # type: ignore[arg-type]
    assert_same(ref, forked(path, there, **FAST))
    assert len(forks) == 1 and there == here and there.frames == 2 * 39546 + 1
    # and the stale one was ended when the replay reached the log, not left holding memory
    assert not parseproc._early and not pid_alive(stale)


def test_a_dbc_compiled_in_a_child_ends_an_early_start_first(
    tmp_path: Path, no_early_left: None
) -> None:
    """Three processes at once (gateway, DBC compile, early parse) took 99 MB on a DBC's first
    replay: the early one goes, and the replay forks its parse when it reaches the log."""
    path, pid = _started_early(tmp_path, 2)
    assert parseproc.in_child(int, "7") == 7
    assert not parseproc._early and not pid_alive(pid)


def test_no_early_start_where_the_parse_runs_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_PARSE_PROCESS", "0")
    assert not parseproc.start_early(_kona_times(tmp_path, 1), block_bytes=1 << 19)
    assert not parseproc._early


_SIGNAL_AT_FORK = """
import asyncio, os, signal, time
from gateway.canbus import parseproc

hits = []

async def main():
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: hits.append(1))
    for _ in range(300):
        pid, r, w = parseproc._fork()
        if pid == 0:
            time.sleep(0.02)
            os._exit(0)
        os.kill(pid, signal.SIGTERM)  # timeout's SIGTERM to the group, at the worst moment
        os.waitpid(pid, 0)
        os.close(r)
        await asyncio.sleep(0.001)  # the loop reads its wake-up socket
    print(len(hits))

asyncio.run(main())
"""


def test_a_stop_signal_that_reaches_a_child_as_it_is_forked_is_not_the_gateways():
    """The child shares the gateway's asyncio wake-up socket until it lets go of it: a
    SIGTERM that reached it before then was written there, and the gateway took it for a
    second stop signal of its own (which ends the wait to drain). Signals are blocked across
    the fork now, until the child has its own handlers."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AT_FORK],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"
