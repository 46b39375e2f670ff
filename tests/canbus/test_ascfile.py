"""The ASC reader (numpy for the data lines, python-can for the rest) reads what python-can's
ASCReader reads, line for line, bad lines included."""

from __future__ import annotations

import os
import random
from pathlib import Path

import can
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.canbus import ascfile, replay
from gateway.canbus.chunking import FAST, PACED
from gateway.records import ReadStats
from tests.canbus.test_candump import kona_log, rows
from tests.conftest import SHARED_CAN


def legacy(path: Path) -> tuple[list[tuple], ReadStats]:
    """python-can's ASCReader frame by frame, as the gateway read ASC before (the channels of
    a file with a channel 0 one up: python-can counts from Vector's 1)."""
    stats = ReadStats()
    msgs = replay._iter_python_can_text(path, replay.LogFormat.ASC, stats)
    if ascfile.first_channel(path) == 0:
        msgs = replay._from_channel_0(msgs)
    return rows(list(replay._batches_from_messages(msgs, stats, FAST))), stats


def fast(path: Path, chunking=FAST) -> tuple[list[tuple], ReadStats]:
    stats = ReadStats()
    return rows(list(replay.iter_log(path, stats, chunking))), stats


def assert_same(path: Path) -> list[tuple]:
    got, s1 = fast(path)
    want, s2 = legacy(path)
    assert got == want
    assert (s1.bad_lines, s1.first_bad) == (s2.bad_lines, s2.first_bad)
    return got


@pytest.mark.parametrize("name", ["bms_idle_log_30sec.asc", "issue_1256.asc", "logfile.asc"])
def test_real_asc_logs_read_as_python_can_reads_them(name):
    found = sorted(SHARED_CAN.rglob(name))
    if not found:
        pytest.skip(f"{name} is not in ../shared/data/can")
    assert assert_same(found[0])


def test_a_vector_asc_of_the_kona_drive_takes_the_vector_path(tmp_path, monkeypatch):
    path = tmp_path / "kona.asc"
    with can.ASCWriter(str(path)) as writer:
        for msg in can.LogReader(str(kona_log())):
            writer.on_message_received(msg)
    calls = []
    real = ascfile.python_can_line
    monkeypatch.setattr(ascfile, "python_can_line", lambda t, b: calls.append(t) or real(t, b))
    got, stats = fast(path)
    assert len(got) == 39546 and stats.bad_lines == 0
    assert len(calls) <= 5, calls  # the trigger and "Start of measurement" lines, no frame
    monkeypatch.setattr(ascfile, "python_can_line", real)
    assert got == legacy(path)[0]
    assert fast(path, PACED)[0] == got


def _random_messages(rng: random.Random, n: int) -> list[can.Message]:
    out, t = [], 1.0
    for _ in range(n):
        t += rng.random() * 0.01
        kind = rng.random()
        ext = rng.random() < 0.3
        fid = rng.randrange(0x20000000 if ext else 0x800)
        channel = rng.choice([0, 1, 2, 9, 12])
        if kind < 0.05:
            msg = can.Message(timestamp=t, is_error_frame=True, channel=channel)
        elif kind < 0.12:
            msg = can.Message(
                timestamp=t,
                arbitration_id=fid,
                is_extended_id=ext,
                is_remote_frame=True,
                dlc=rng.randrange(9),
                channel=channel,
            )
        elif kind < 0.2:
            size = rng.choice([0, 8, 12, 16, 32, 64])
            msg = can.Message(
                timestamp=t,
                arbitration_id=fid,
                is_extended_id=ext,
                is_fd=True,
                data=rng.randbytes(size),
                channel=channel,
                bitrate_switch=rng.random() < 0.5,
            )
        else:
            msg = can.Message(
                timestamp=t,
                arbitration_id=fid,
                is_extended_id=ext,
                data=rng.randbytes(rng.randrange(9)),
                channel=channel,
            )
        out.append(msg)
    return out


_MUTANTS = b"0123456789abcdefABCDEFxX .\t\rdDrRTx\x00\xc3\xa9/:-"


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 150),
    mutations=st.integers(0, 30),
    crlf=st.booleans(),
)
def test_mutated_asc_logs_read_as_python_can_reads_them(tmp_path_factory, seed, n, mutations, crlf):
    rng = random.Random(seed)
    path = tmp_path_factory.mktemp("asc") / "gen.asc"
    with can.ASCWriter(str(path)) as writer:
        for msg in _random_messages(rng, n):
            writer.on_message_received(msg)
    lines = [bytearray(x) for x in path.read_bytes().split(b"\n")]
    body = [i for i, line in enumerate(lines) if line[:1] == b" " or line[:1].isdigit()]
    for _ in range(mutations):
        line = lines[rng.choice(body)] if body else None
        if not line:
            continue
        at = rng.randrange(len(line))
        op = rng.random()
        if op < 0.4:
            line[at] = rng.choice(_MUTANTS)
        elif op < 0.7:
            line.insert(at, rng.choice(_MUTANTS))
        else:
            del line[at]
    if rng.random() < 0.3:  # the same file with tabs, as CANalyzer writes some fields
        lines = [line.replace(b"  ", b"\t", 1) for line in lines]
    path.write_bytes((b"\r\n" if crlf else b"\n").join(bytes(x) for x in lines))
    assert_same(path)


def test_decimal_base_and_odd_lines_go_to_python_can(tmp_path):
    path = tmp_path / "dec.asc"
    path.write_text(
        "date Mon Jan 01 00:00:00.000 2024\n"
        "base dec  timestamps absolute\n"
        "internal events logged\n"
        "Begin Triggerblock Mon Jan 01 00:00:00.000 2024\n"
        "   0.000000 Start of measurement\n"
        "   0.100000 1  291             Rx   d 2 17 255\n"
        "   0.200000 1  291             Rx   d 2 17 256\n"
        "   0.300000 2  1000x           Tx   d 1 1\n"
        "End TriggerBlock\n"
    )
    got = assert_same(path)
    assert [r[2] for r in got] == [291, 1000]
    _, stats = fast(path)
    assert stats.bad_lines == 1 and stats.first_bad[0][0] == 7  # byte 256


@pytest.mark.parametrize("base", ["hex", "dec"])
def test_the_first_frame_after_a_header_without_an_events_line_is_read(tmp_path, base):
    # GIVEN an ASC whose header is a date and a base line, then frames at once (no "internal
    # events logged", no "Begin Triggerblock"): python-can's header code drops that frame
    head = f"date Wed Jun 12 01:23:45 pm 2024\nbase {base}  timestamps absolute\n"
    body = "   0.001000 1  109   Rx   d 2 10 20\n   0.002000 1  200   Rx   d 1 30\n"
    short, full = tmp_path / "short.asc", tmp_path / "full.asc"
    short.write_text(head + body)
    full.write_text(head + "internal events logged\n" + body)
    # THEN both of the gateway's ways of reading it read both frames, as with the events line
    assert [r[2] for r in fast(full)[0]] == [0x109, 0x200] if base == "hex" else [109, 200]
    assert fast(short)[0] == fast(full)[0]
    assert legacy(short)[0] == legacy(full)[0] == fast(full)[0]
    assert fast(short)[1].bad_lines == legacy(short)[1].bad_lines == 0


def test_a_header_longer_than_64_kib_is_read_by_python_can(tmp_path):
    path = tmp_path / "long-header.asc"
    comments = "".join(f"// comment {i:06d} {'x' * 80}\n" for i in range(900))
    path.write_text(
        "date Mon Jan 01 00:00:00.000 2024\nbase hex  timestamps absolute\n"
        + comments
        + "internal events logged\nBegin Triggerblock Mon Jan 01 00:00:00.000 2024\n"
        "   0.100000 1  123             Rx   d 1 AB\n"
    )
    with open(path, "rb") as fh:
        assert len(fh.read(1 << 16)) == 1 << 16
    assert ascfile.iter_asc(path, ReadStats(), chunk_frames=10, chunk_seconds=1.0) is None
    assert [r[8] for r in assert_same(path)] == [b"\xab"]


HEADER = (
    "date Mon Jan 01 00:00:00.000 2024\nbase hex  timestamps absolute\ninternal events logged\n"
)
LINE = "   0.200000 1  456             Rx   d 2 33 44\n"


@pytest.mark.parametrize(
    "text",
    [
        # found in review: a damaged time of 16+ digits on an otherwise valid data line
        HEADER + "1700000000.123456? 1 123 Rx d 1 11\n" + LINE,
        HEADER + "9999999999999999a.0 1 123 Rx d 1 11\n" + LINE,
        # a base python-can refuses ("HEX"): its reader counts the line and reads on
        HEADER.replace("base hex", "base HEX") + LINE,
        HEADER.replace("base hex", "base DEC") + LINE,
        # lines python-can reads whatever their length, and lines ended by a lone CR
        HEADER + LINE * 50 + "   0.3 1 457 Rx d 2 55 66" + " 0" * 40_000 + "\n" + LINE,
        HEADER + LINE * 50 + LINE.replace("\n", "\r") * 300 + LINE,
        HEADER + "// " + "x" * 70_000 + "\n" + LINE,
    ],
    ids=[
        "time-16-digits",
        "time-exponent-like",
        "base-HEX",
        "base-DEC",
        "long-line",
        "lone-CR",
        "long-comment",
    ],
)
def test_review_cases_read_as_python_can_reads_them_at_any_block_size(tmp_path, text):
    path = tmp_path / "case.asc"
    path.write_bytes(text.encode())
    want, wstats = legacy(path)
    assert fast(path)[0] == want
    for block in (7, 100, 4096):
        stats = ReadStats()
        batches = ascfile.iter_asc(
            path, stats, chunk_frames=50, chunk_seconds=1.0, block_bytes=block
        )
        if batches is None:  # the header goes to python-can: the whole file does
            continue
        assert rows(list(batches)) == want
        assert (stats.bad_lines, stats.first_bad) == (wstats.bad_lines, wstats.first_bad)


def _written(path: Path, channels: list[int]) -> None:
    """An ASC from python-can's writer, which writes an int channel c as c + 1."""
    with can.ASCWriter(str(path)) as writer:
        for i, c in enumerate(channels):
            writer.on_message_received(
                can.Message(
                    timestamp=1.0 + i / 100,
                    arbitration_id=0x100 + c,
                    is_extended_id=False,
                    channel=c,
                    data=b"\x01",
                )
            )


@pytest.mark.parametrize("long_header", [False, True], ids=["vector-path", "python-can-path"])
def test_an_asc_numbering_its_channels_from_0_keeps_channels_0_and_1_apart(
    tmp_path, caplog, long_header
):
    caplog.set_level("INFO", "gateway")
    # GIVEN an ASC with frames on channels 0, 1 and 2 (python-can's writer writes c + 1)
    path = tmp_path / "from0.asc"
    _written(path, [-1, 0, 1, -1, 1])
    text = path.read_text()
    assert [line.split()[1] for line in text.splitlines() if "Rx" in line] == list("01202")
    if long_header:  # a header over 64 KiB: python-can reads the whole file
        head, sep, body = text.partition("internal events logged\n")
        path.write_text(head + "".join(f"// {'x' * 90}\n" for i in range(800)) + sep + body)
        assert ascfile.iter_asc(path, ReadStats(), chunk_frames=10, chunk_seconds=1.0) is None
    # WHEN it is read
    got, stats = fast(path)
    # THEN channel 0 is can0, 1 is can1, 2 is can2: no two channels merge, and it is said
    assert [(r[1], r[2]) for r in got] == [
        ("can0", 0x0FF),
        ("can1", 0x100),
        ("can2", 0x101),
        ("can0", 0x0FF),
        ("can2", 0x101),
    ]
    assert stats.bad_lines == 0
    assert "numbers its channels from 0" in caplog.text and str(path) in caplog.text


def test_an_asc_numbering_from_1_reads_as_python_can_numbers_it(tmp_path, caplog):
    caplog.set_level("INFO", "gateway")
    # GIVEN Vector's numbering (channels 1 and 2), with lines holding " 0 " elsewhere: id 0,
    # a frame of no bytes, a comment, and a channel 0 only in a line that is no frame
    path = tmp_path / "from1.asc"
    _written(path, [0, 1, 0])
    text = path.read_text().replace(
        "End TriggerBlock",
        "   2.000000 1  0               Rx   d 0\n"
        "// 1.0 0 comment\n"
        "   2.100000 Start of measurement 0 \n"
        "End TriggerBlock",
    )
    path.write_text(text)
    got = assert_same(path)
    # THEN channel 1 is can0 and 2 is can1, as python-can numbers them, without a word
    assert [r[1] for r in got] == ["can0", "can1", "can0", "can0"]
    assert ascfile.first_channel(path) == 1
    assert "numbers its channels from 0" not in caplog.text


_FD_LINE = (
    "   {t:.6f} CANFD {ch:3d} Rx        123                                   1 0 8  8 "
    "11 22 33 44 55 66 77 88        0    0   3000 00000000 00000000 00000000 00000000 "
    "00000000\n"
)


@pytest.mark.parametrize(
    ("body", "first"),
    [
        # CAN FD on channel 1: every line holds " 0 " (its flags), none is on channel 0
        ("".join(_FD_LINE.format(t=i / 10, ch=1) for i in range(50)), 1),
        # ... and one FD frame on channel 0, after them
        ("".join(_FD_LINE.format(t=i / 10, ch=1 - (i == 49)) for i in range(50)), 0),
        # a classic frame on channel 0 between tabs
        ("   0.100000 1  123             Rx   d 1 00\n\t0.200000\t0\t124\tRx\td 1 00\n", 0),
        # the first line of the body, right after the header, on channel 0
        ("   0.100000 0  123             Rx   d 1 00\n", 0),
    ],
    ids=["fd-on-1", "fd-on-0", "tabs", "first-line"],
)
def test_the_first_channel_is_found_in_every_kind_of_line(tmp_path, body, first):
    path = tmp_path / "x.asc"
    head = "date Thu Nov 9 10:00:00.000 am 2023\nbase hex  timestamps absolute\n"
    path.write_text(head + body)
    assert ascfile.first_channel(path) == first
    assert ascfile.first_channel(path, len(head)) == first
    # a file rewritten since is searched again (the result is kept per file and version)
    path.write_text(head + body.replace(" 0 ", " 1 ").replace("\t0\t", "\t1\t"))
    os.utime(path, ns=(1, 1))
    assert ascfile.first_channel(path) == 1
