"""iter_candump reads what python-can's CanutilsLogReader reads, and survives what it cannot."""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

import can
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.canbus import candump
from gateway.canbus.candump import iter_candump, parse_line, parse_threads
from gateway.records import FrameBatch, ReadStats
from tests.conftest import SHARED_CAN

ROOT = Path(__file__).resolve().parents[2]


def kona_log() -> Path:
    for base in (ROOT / "can_fixtures", ROOT.parent / "shared" / "data" / "can"):
        found = sorted(base.rglob("*.candump.log")) if base.is_dir() else []
        if found:
            return found[0]
    pytest.skip("no Kona candump log in can_fixtures/ or ../shared/data/can")


def rows(batches: list[FrameBatch]) -> list[tuple]:
    out = []
    for b in batches:
        for i in range(len(b)):
            n = int(b.dlc[i])
            out.append(
                (
                    float(b.timestamp[i]),
                    b.channels[b.channel[i]],
                    int(b.arbitration_id[i]),
                    bool(b.is_extended[i]),
                    bool(b.is_remote[i]),
                    bool(b.is_error[i]),
                    bool(b.is_fd[i]),
                    n,
                    b"" if b.is_remote[i] else bytes(b.data[i, :n]),
                )
            )
            assert not b.data[i, n:].any(), "bytes past dlc must be zero"
    return out


def python_can_rows(path: Path) -> list[tuple]:
    return [
        (
            m.timestamp,
            str(m.channel),
            m.arbitration_id,
            m.is_extended_id,
            m.is_remote_frame,
            m.is_error_frame,
            m.is_fd,
            m.dlc,
            bytes(m.data or b""),
        )
        for m in can.CanutilsLogReader(str(path))
    ]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_real_kona_log_equals_python_can(workers: int) -> None:
    stats = ReadStats()
    batches = list(iter_candump(kona_log(), stats, workers=workers, block_bytes=1 << 16))
    assert rows(batches) == python_can_rows(kona_log())
    assert stats.frames == 39546 and stats.bad_lines == 0
    assert all(b.data.shape[1] == 8 for b in batches)
    assert batches[-1].channels == ("can0", "can1")


def random_line(rng: random.Random, t: float) -> str:
    kind = rng.random()
    channel = rng.choice(["can0", "can1", "vcan0", "slcan12"])
    ext = rng.random() < 0.3
    fid = rng.randrange(0x20000000 if ext else 0x800)
    ident = f"{fid:08X}" if ext else f"{fid:03X}"
    if kind < 0.1:
        return f"({t:.6f}) {channel} {ident}#R" + rng.choice(["", "0", "3", "8"])
    if kind < 0.3:
        n = rng.choice([0, 1, 5, 8, 12, 16, 20, 24, 32, 48, 64])
        flags = rng.randrange(8)  # python-can reads the flag digit as decimal
        return f"({t:.6f}) {channel} {ident}##{flags}" + rng.randbytes(n).hex().upper()
    n = rng.randrange(9)
    line = f"({t:.6f}) {channel} {ident}#" + rng.randbytes(n).hex().upper()
    return line + rng.choice(["", "", " R", " T"])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(0, 300),
    start=st.sampled_from([0.0, 1953.6135, 1700000000.123456]),
)
def test_generated_logs_equal_python_can(
    tmp_path_factory: pytest.TempPathFactory, seed: int, n: int, start: float
) -> None:
    rng = random.Random(seed)
    t = start
    lines = []
    for _ in range(n):
        t += rng.random() * 0.01
        lines.append(random_line(rng, t))
    path = tmp_path_factory.mktemp("gen") / "gen.log"
    path.write_text("".join(line + "\n" for line in lines))
    stats = ReadStats()
    blocks = rng.choice([256, 4096, 1 << 20])
    got = rows(list(iter_candump(path, stats, block_bytes=blocks, workers=rng.choice([0, 1, 2]))))
    assert got == python_can_rows(path)
    assert stats.bad_lines == 0 and stats.frames == n


def test_error_frames_keep_channel_class_and_data() -> None:
    text = (
        "(1.000000) can0 123#11\n"
        "(2.000000) can1 20000080#0000000000000000\n"  # CAN_ERR_FLAG | CAN_ERR_BUSERROR
        "(3.000000) can1 20000004#0004000000000000\n"
    )  # controller problem
    got = rows(list(iter_candump(io.BytesIO(text.encode()))))
    assert got[1] == (2.0, "can1", 0x80, True, False, True, False, 8, bytes(8))
    assert got[2][2:6] == (0x4, True, False, True)
    assert [m.is_error_frame for m in can.CanutilsLogReader(io.StringIO(text))] == [
        False,
        True,
        False,
    ]  # python-can wants the bus-error class bit as well


GARBAGE = [
    b"(1953.6135",  # truncated
    b"(1953.613500) can0 1G9#0001",  # non-hex id
    b"(1953.613500) can0 109#00ZZ",  # non-hex data
    b"(1953.613500) can0 109#000",  # odd number of digits
    b"(1953.613500) can0 109#000102030405060708",  # 9 bytes in a classic frame
    b"(1953.613500) can0 109##1000102030405060708",  # 9 bytes is no CAN FD length
    b"\x00\xff\xfe\x13garbage\x80\x81",  # binary noise
    b"(nan) can0 109#00",
    b"(1953.613500) can0",
    b"(1953.613500) can0 109#R9",
    b"1953.613500 can0 109#00",
]


def test_garbage_lines_are_counted_with_line_numbers_and_skipped() -> None:
    good = b"(1.500000) can0 109#000100FFFFFF0F3D"
    lines = [good]
    for g in GARBAGE:
        lines += [g, good]
    lines.insert(3, b"(2.0) can0 1" + b"A" * 10_000_000)  # a 10 MB line
    lines.insert(4, b"")
    lines.insert(5, b"   ")
    data = b"\n".join(lines) + b"\n" + b"(9.000000) can0 7FF#01"  # no newline at the end
    for block, workers in ((1 << 22, 0), (1000, 1), (97, 0), (97, 2)):
        stats = ReadStats()
        got = rows(list(iter_candump(io.BytesIO(data), stats, block_bytes=block, workers=workers)))
        assert len(got) == len(GARBAGE) + 2 and got[-1][2] == 0x7FF
        assert all(r[:3] == (1.5, "can0", 0x109) for r in got[:-1])
        assert stats.bad_lines == len(GARBAGE) + 1
        assert [n for n, _ in stats.first_bad] == [2, 4, 7, 9, 11]
        assert "too long" in stats.first_bad[1][1]


def test_crlf_text_files_and_leading_spaces() -> None:
    text = "(1.000000) can0 123#11\r\n  (2.000000) can0 123#22  \r\n"
    got = rows(list(iter_candump(io.StringIO(text))))
    assert [(r[0], r[8]) for r in got] == [(1.0, b"\x11"), (2.0, b"\x22")]


@pytest.mark.parametrize("block_bytes", [1, 2, 3, 5, 8, 17, 1 << 16])
@pytest.mark.parametrize(
    "text",
    [
        "(1.5) can0 123#11\r(1.6) can0 123#22\r(1.7) can0 123#33\r",  # old Mac line ends
        "(1.5) can0 123#11\r\n(1.6) can0 123#22\r(1.7) can0 123#33",  # mixed, no last end
        "(1.5) can0 123#11\r\r(1.6) can0 1x3#22\r\n\r\n(1.7) can0 123#33\n",  # blank, bad
    ],
)
def test_lines_ended_by_a_lone_cr_are_lines_as_python_can_reads_them(
    tmp_path: Path, text: str, block_bytes: int
) -> None:
    """python-can reads text with universal newlines: a lone CR ends a line (it used to run the
    lines of such a file into one, read as a single bad line). Frames and bad line numbers
    stay the same however the reads split a CRLF."""
    path, ref = tmp_path / "cr.log", tmp_path / "ref.log"
    path.write_bytes(text.encode())
    ref.write_bytes(text.replace("(1.6) can0 1x3#22", "").encode())  # python-can stops there
    stats = ReadStats()
    got = rows(list(iter_candump(path, stats, block_bytes=block_bytes)))
    assert got == python_can_rows(ref)
    assert len(got) == 3 - ("1x3" in text)
    assert [n for n, _ in stats.first_bad] == ([3] if "1x3" in text else [])


def reference_chunks(ts: list[float], frames: int, seconds: float) -> list[int]:
    """Chunk sizes as gateway.canbus.replay cuts python-can messages."""
    sizes, n, start = [], 0, None
    for t in ts:
        start = t if start is None else start
        n += 1
        if n >= frames or t - start >= seconds:
            sizes.append(n)
            n, start = 0, None
    return sizes + ([n] if n else [])


@settings(max_examples=20, deadline=None)
@given(
    gaps=st.lists(st.floats(0, 0.3), max_size=400),
    frames=st.integers(1, 50),
    seconds=st.sampled_from([0.05, 0.5, 1.0]),
    block=st.sampled_from([64, 333, 1 << 16]),
)
def test_chunks_depend_on_content_only(
    gaps: list[float], frames: int, seconds: float, block: int
) -> None:
    ts = np.cumsum([1000.0, *gaps]).round(6).tolist()
    text = "".join(f"({t:.6f}) can{i % 2} 123#{i % 256:02X}\n" for i, t in enumerate(ts))
    got = list(
        iter_candump(
            io.BytesIO(text.encode()),
            chunk_frames=frames,
            max_chunk_seconds=seconds,
            block_bytes=block,
        )
    )
    parsed = [float(f"{t:.6f}") for t in ts]
    assert [len(b) for b in got] == reference_chunks(parsed, frames, seconds)
    # channel indices are stable across chunks: in order of first appearance
    assert all(b.channels == ("can0", "can1")[: len(b.channels)] for b in got)


def test_parse_line_reasons() -> None:
    assert parse_line("   ") is None
    assert parse_line("(1.0) can0 123#1122") == (
        1.0,
        "can0",
        0x123,
        False,
        False,
        False,
        False,
        2,
        b"\x11\x22",
    )
    assert parse_line("(1.0) can0 123#R5")[4:8] == (True, False, False, 5)  # type: ignore[index]
    assert parse_line("(1.0) can0 123#1122334455667788_9")[7] == 8  # type: ignore[index]
    assert isinstance(parse_line("(1.0) can0 123#112"), str)


def _line_by_line(data: bytes) -> tuple[list[tuple], list[int]]:
    """What the per-line parser alone makes of ``data``: frames, and numbers of bad lines."""
    frames, bad = [], []
    data = re.sub(rb"\r(?!\n)", b"\n", data)  # a lone CR ends a line, as python-can reads text
    for no, raw in enumerate(data.split(b"\n"), 1):
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            got = parse_line(raw.decode("ascii"))
        except UnicodeDecodeError:
            got = "not ASCII"
        if isinstance(got, str):
            bad.append(no)
        elif got is not None:
            ts, ch, fid, ext, rem, err, fd, n, payload = got
            frames.append((ts, ch, fid, ext, rem, err, fd, n, payload))
    return frames, bad


_MUTANTS = b"0123456789abcdefABCDEF#.() RrT_\t\r\x00\x85-+eE:xX"


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(1, 200),
    mutations=st.integers(0, 40),
    start=st.sampled_from([0.5, 1953.6135, 1700000000.123456, 123456789012.5]),
)
def test_vector_paths_agree_with_the_line_parser_on_mutated_logs(seed, n, mutations, start):
    """Every fast path of the block parser must give, line for line, what ``parse_line`` gives:
    the same frame or the same verdict of a bad line, whatever the damage."""
    rng = random.Random(seed)
    t = start
    lines = []
    for _ in range(n):
        t += rng.random() * 0.01
        lines.append(bytearray(random_line(rng, t).encode()))
    for _ in range(mutations):
        line = lines[rng.randrange(len(lines))]
        if not line:
            continue
        at = rng.randrange(len(line))
        marks = [i for i, c in enumerate(line) if c in b" #.()"]
        if marks and rng.random() < 0.5:  # the separators are where layouts are told apart
            at = rng.choice(marks)
        op = rng.random()
        if op < 0.4:
            line[at] = rng.choice(_MUTANTS)
        elif op < 0.7:
            line.insert(at, rng.choice(_MUTANTS))
        else:
            del line[at]
    data = b"\n".join(bytes(x) for x in lines) + rng.choice([b"\n", b""])
    want_frames, want_bad = _line_by_line(data)
    stats = ReadStats()
    got = rows(list(iter_candump(io.BytesIO(data), stats, block_bytes=rng.choice([97, 4096]))))
    assert [b for b, _ in stats.first_bad] == want_bad[: len(stats.first_bad)]
    assert stats.bad_lines == len(want_bad)
    want = [
        (f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], b"" if f[4] else f[8]) for f in want_frames
    ]
    assert got == want


@pytest.mark.parametrize("seed", range(4))
def test_many_channels_and_names_with_bytes_no_name_may_hold(seed, monkeypatch):
    """Channel names are grouped per block: one comparison each for the first eight, one sort
    past them. Twenty names of one length, and some of that length with a control or
    non-ASCII byte (each such line is bad), must read as the line parser reads them."""
    rng = random.Random(seed)
    good = [f"c{i:03d}" for i in range(20)]
    bad = ["c\x0001", "c\x8501", "c\x7f01", "c\t001", "\x00\x00\x00\x00"]
    lines = []
    for i in range(rng.randrange(200, 900)):
        name = rng.choice(bad) if rng.random() < 0.05 else rng.choice(good[: rng.choice([2, 20])])
        payload = rng.randbytes(rng.randrange(9)).hex()
        lines.append(f"({1000 + i * 0.001:.6f}) {name} {rng.randrange(0x800):03X}#{payload}")
    data = ("\n".join(lines) + "\n").encode("latin-1")
    want_frames, want_bad = _line_by_line(data)
    fast = [0]  # lines the one-pass classic parser took (the others would still parse, slower)
    classic = candump._parse_classic

    def counting(*args):
        out = classic(*args)
        fast[0] += int(out[0].sum()) if out is not None else 0
        return out

    monkeypatch.setattr(candump, "_parse_classic", counting)
    stats = ReadStats()
    batches = list(iter_candump(io.BytesIO(data), stats, block_bytes=rng.choice([4096, 1 << 16])))
    assert stats.bad_lines == len(want_bad) > 0
    assert [b for b, _ in stats.first_bad] == want_bad[: len(stats.first_bad)]
    assert rows(batches) == [(*f[:8], f[8]) for f in want_frames]
    assert fast[0] == len(want_frames)
    seen = list(dict.fromkeys(f[1] for f in want_frames))
    assert list(batches[-1].channels[: len(seen)]) == seen  # numbered in order of appearance


def _python_can_written(tmp_path: Path, source: Path) -> Path:
    """``source`` (any format python-can reads) written as candump by python-can itself, which
    puts a direction (" R"/" T") after every frame."""
    out = tmp_path / (source.stem + ".log")
    with can.CanutilsLogWriter(str(out)) as writer:
        for msg in can.LogReader(str(source)):
            writer.on_message_received(msg)
    return out


@pytest.mark.parametrize(
    "name", ["bms_idle_log_30sec.asc", "issue_1256.asc", "test_CanMessage_V2_1.trc"]
)
def test_logs_written_by_python_can_read_the_same_and_take_the_vector_path(
    tmp_path, monkeypatch, name
):
    found = sorted(SHARED_CAN.rglob(name))
    if not found:
        pytest.skip(f"{name} is not in ../shared/data/can")
    log = _python_can_written(tmp_path, found[0])
    calls = []
    real = candump.parse_line
    monkeypatch.setattr(candump, "parse_line", lambda text: calls.append(text) or real(text))
    stats = ReadStats()
    got = rows(list(iter_candump(log, stats)))
    assert got == python_can_rows(log)
    assert stats.bad_lines == 0 and len(got) > 0
    # lines of the one common layout, direction included, never reach the per-line parser
    assert len(calls) <= max(2, len(got) // 100), calls[:3]


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (3, 2), (4, 2), (16, 2)])
def test_parse_threads_leave_a_core_to_the_pipeline(
    cores: int, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "gateway.canbus.candump.os.sched_getaffinity", lambda pid: set(range(cores))
    )
    assert parse_threads() == threads


def test_more_channel_names_than_a_channel_number_holds_is_one_error(tmp_path):
    from gateway.errors import LogFormatError
    from gateway.records import ReadStats

    # GIVEN a "log" with 65,537 different channel names (channel numbers are 16 bits)
    log = tmp_path / "many.log"
    log.write_text("".join(f"({i}.0) c{i} 101#1234\n" for i in range(65_537)))
    # THEN reading it is one error naming the file (it was an OverflowError traceback)
    with pytest.raises(LogFormatError, match=r"many\.log: more than 65,536 different channel"):
        for _ in candump.iter_candump(log, ReadStats(path=str(log)), workers=0):
            pass


def test_a_remote_frames_length_is_no_payload(tmp_path):
    from gateway.canbus.candump import iter_candump

    log = tmp_path / "remote.log"
    log.write_text("(1.000000) can0 123#R5\n(1.100000) can0 124#R\n(1.200000) can0 125#0102\n")
    (batch,) = list(iter_candump(log, workers=0))
    assert batch.is_remote.tolist() == [True, True, False]
    assert batch.raw_bytes == 2  # the data frame's two bytes; the remote frames carry none


@pytest.mark.parametrize("workers", [0, 1])
def test_a_channel_named_beyond_ascii_is_read_as_python_can_reads_it(tmp_path, workers):
    from gateway.canbus.candump import iter_candump
    from gateway.records import ReadStats

    log = tmp_path / "utf8.log"
    log.write_bytes(
        "(1.000000) cän0 123#0102\n(1.100000) can0 124#03\n".encode()
        + b"(1.200000) c\xffn0 125#04\n"  # not UTF-8: a bad line, as python-can cannot read it
    )
    stats = ReadStats()
    (batch,) = list(iter_candump(log, stats, workers=workers))
    got = [
        (batch.channels[c], int(i))
        for c, i in zip(batch.channel, batch.arbitration_id, strict=True)
    ]
    text = "(1.000000) cän0 123#0102\n(1.100000) can0 124#03\n"
    want = [(m.channel, m.arbitration_id) for m in can.CanutilsLogReader(io.StringIO(text))]
    assert got == want == [("cän0", 0x123), ("can0", 0x124)]
    assert stats.bad_lines == 1 and stats.first_bad[0] == (3, "not UTF-8 text")
