"""Log readers: every format python-can reads plus GVRET CSV; bad lines counted, never fatal."""

from __future__ import annotations

import asyncio
from pathlib import Path

import can
import numpy as np
import pytest

from gateway.canbus.replay import LogFormat, ReplaySource, detect_format, iter_log
from gateway.errors import LogFormatError
from gateway.records import ReadStats
from tests.conftest import KONA, KONA_CANDUMP, KONA_CSV, SHARED_CAN

PYCAN_FILES = [
    "logfile.asc",
    "issue_1256.asc",
    "test_CanMessage.blf",
    "test_CanFdMessage64.blf",
    "test_CanMessage_V1_1.trc",
    "test_CanMessage_V2_1.trc",
]


def _frames(path: Path, stats: ReadStats | None = None):
    out = []
    for b in iter_log(path, stats):
        for i in range(len(b)):
            out.append(
                (
                    float(b.timestamp[i]),
                    b.channels[b.channel[i]],
                    int(b.arbitration_id[i]),
                    bool(b.is_extended[i]),
                    bool(b.is_remote[i]),
                    bool(b.is_error[i]),
                    bool(b.is_fd[i]),
                    bytes(b.data[i, : b.dlc[i]]),
                )
            )
    return out


def _pycan(path: Path):
    out = []
    for m in can.LogReader(str(path)):
        out.append(
            (
                float(m.timestamp),
                m.arbitration_id,
                m.is_extended_id,
                m.is_remote_frame,
                m.is_error_frame,
                m.is_fd,
                bytes(m.data),
            )
        )
    return out


@pytest.mark.parametrize("name", PYCAN_FILES)
def test_python_can_formats_read_the_same_frames_as_python_can(name):
    path = SHARED_CAN / "python_can_testdata" / name
    if not path.exists():
        pytest.skip(f"{path} absent (../shared not beside the repository)")
    ours = [(f[0], *f[2:]) for f in _frames(path)]
    assert ours == _pycan(path)
    assert ours


def test_gvret_csv_equals_the_candump_conversion_of_the_same_capture():
    a = _frames(KONA_CSV)
    b = [(round(ts, 6), *rest) for ts, *rest in _frames(KONA_CANDUMP)]
    assert len(a) == 39_546
    assert [(round(ts, 6), *rest) for ts, *rest in a] == b


def test_gvret_with_a_dir_column_and_extended_ids(tmp_path):
    p = tmp_path / "dir.csv"
    p.write_text(
        "Time Stamp,ID,Extended,Dir,Bus,LEN,D1,D2,D3,D4,D5,D6,D7,D8\n"
        "1000000,18DAF110,true,Rx,1,3,01,02,03\n"
        "2000000,00000123,false,Tx,0,8,01,02,03,04,05,06,07,08\n"
    )
    frames = _frames(p)
    assert frames[0][:4] == (1.0, "can1", 0x18DAF110, True)
    assert frames[0][-1] == b"\x01\x02\x03"
    assert frames[1][1:4] == ("can0", 0x123, False)


def test_gvret_bad_lines_of_every_kind_are_counted_never_raised(tmp_path):
    """A 400-digit time overflowed the division into seconds (a traceback); a length of 9 or
    10 is no CAN or CAN FD length; a byte order mark (Excel's "CSV UTF-8") is no header."""
    p = tmp_path / "g.csv"
    p.write_bytes(
        b"\xef\xbb\xbfTime Stamp,ID,Extended,Bus,LEN,D1,D2,D3,D4,D5,D6,D7,D8,D9\n"
        b"1000000,109,false,0,1,11\n" + b"9" * 400 + b",109,false,0,1,11\n"
        b"1000050,109,false,0,9,1,2,3,4,5,6,7,8,9\n"
        b"1000100,109,false,0,1,22\n"
    )
    assert detect_format(p) is LogFormat.GVRET_CSV
    stats = ReadStats()
    frames = _frames(p, stats)
    assert [(f[0], f[-1]) for f in frames] == [(1.0, b"\x11"), (1.0001, b"\x22")]
    assert [n for n, _ in stats.first_bad] == [3, 4]
    assert "not a CAN or CAN FD length" in stats.first_bad[1][1]


def test_a_python_can_csv_with_a_byte_order_mark_is_read(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes(
        b"\xef\xbb\xbftimestamp,arbitration_id,extended,remote,error,dlc,data\n"
        b"1.5,0x123,1,0,0,2,ESI=\n"
    )
    assert detect_format(p) is LogFormat.PYTHON_CAN_CSV
    stats = ReadStats()
    assert [f[2] for f in _frames(p, stats)] == [0x123] and stats.bad_lines == 0


@pytest.mark.parametrize(
    "text",
    [
        "",  # what python-can's TRCWriter leaves when it logged nothing
        ";$FILEVERSION=2.1\n;$STARTTIME=44548.6028595139\n;$COLUMNS=N,O,T,B,I,d,R,L,D\n",
        ";$FILEVERSION=2.1\n;$STARTTIME=44548.6028595139\n;$COLUMNS=N,O,T,B,I,d,R,L,D\n\n"
        "      1     17535.400 DT 1  00000100 Tx -  8    00 00 00 00 00 00 00 00\n",
    ],
)
def test_a_trc_without_data_lines_or_with_a_blank_after_its_header_has_no_bad_line(tmp_path, text):
    """python-can's header reading hands back the line that ended it, even an empty one or
    the header's last comment, and then failed to parse it: a bad line that is not there."""
    p = tmp_path / "t.trc"
    p.write_text(text)
    stats = ReadStats()
    frames = _frames(p, stats)
    assert stats.bad_lines == 0, stats.first_bad
    assert len(frames) == text.count(" DT ")
    assert stats.stopped_early is None


def test_kona_asc_numbered_from_zero_is_channel_can0():
    frames = _frames(KONA / "bms_idle_log_30sec.asc")
    assert {f[1] for f in frames} == {"can0"}
    assert len(frames) == 5934


def _with_garbage(src: Path, dst: Path, after: int, garbage: list[str]) -> Path:
    lines = src.read_text().splitlines(keepends=True)
    dst.write_text("".join(lines[:after] + garbage + lines[after:]))
    return dst


def test_asc_bad_lines_are_counted_and_reading_resumes(tmp_path):
    src = KONA / "bms_idle_log_30sec.asc"
    good = _frames(src)
    bad = _with_garbage(
        src,
        tmp_path / "bad.asc",
        20,
        [
            "   0.160000 1  594  Rx   d 8 ZZ 21 34 21 A0 61 04 20\n",
            "   0.160100 1  5QQ  Rx   d 8 00 00\n",
        ],
    )
    stats = ReadStats()
    frames = _frames(bad, stats)
    assert stats.bad_lines == 2
    assert stats.first_bad[0][0] == 21
    assert frames == good


def test_blank_lines_in_a_python_can_csv_are_passed_over_not_counted_bad(tmp_path):
    # GIVEN a python-can CSV with a blank line inside and blank lines at its end (as an
    # editor or a concatenation leaves them); python-can's own reader fails on each
    src = tmp_path / "plain.csv"
    with can.CSVWriter(src) as w:
        for i in range(6):
            w.on_message_received(can.Message(timestamp=1.0 + i, arbitration_id=0x100 + i))
    lines = src.read_text().splitlines(keepends=True)
    blank = tmp_path / "blank.csv"
    blank.write_text("".join([*lines[:3], "\n", " \n", *lines[3:], "\n", "\n"]))
    stats = ReadStats()
    # THEN the same frames, no bad line, and every byte counted as read
    assert _frames(blank, stats) == _frames(src)
    assert stats.bad_lines == 0, stats.first_bad
    assert stats.bytes_read == blank.stat().st_size


def test_a_trc_with_no_frame_says_how_much_of_it_was_read(tmp_path):
    src = SHARED_CAN / "python_can_testdata" / "test_CanMessage_V2_1.trc"
    if not src.exists():
        pytest.skip("shared python-can test data absent")
    header = tmp_path / "header_only.trc"
    header.write_text("".join(ln for ln in src.read_text().splitlines(True) if ln.startswith(";")))
    stats = ReadStats()
    assert _frames(header, stats) == []
    assert stats.bytes_read == len(header.read_text())  # (was 0: "no frame in it (0 bytes read)")


def test_trc_bad_line_is_counted(tmp_path):
    src = SHARED_CAN / "python_can_testdata" / "test_CanMessage_V2_1.trc"
    if not src.exists():
        pytest.skip("shared python-can test data absent")
    lines = src.read_text().splitlines(keepends=True)
    first_data = next(i for i, ln in enumerate(lines) if not ln.startswith(";"))
    bad = _with_garbage(
        src, tmp_path / "bad.trc", first_data + 2, ["      3   notanumber DT 0001 Rx - 0\n"]
    )
    stats = ReadStats()
    frames = _frames(bad, stats)
    assert stats.bad_lines == 1
    assert len(frames) == len(_frames(src))


@pytest.mark.parametrize("start", ["nan", "1e400", "9" * 20, "abc", ""])
def test_trc_unreadable_start_time_is_counted_and_every_frame_read(tmp_path, start):
    """A header line python-can cannot read stops its header there; the reading goes on with the
    rest of the header (the columns), so no frame is lost: times are offsets from the log's
    start, as for a TRC file with no start time. (A start time too large for a date raised an
    OverflowError out of the replay; one that was no number lost every frame, uncounted.)"""
    src = SHARED_CAN / "python_can_testdata" / "test_CanMessage_V2_1.trc"
    if not src.exists():
        pytest.skip("shared python-can test data absent")
    lines = src.read_text().splitlines(keepends=True)
    assert lines[1].startswith(";$STARTTIME=")
    lines[1] = f";$STARTTIME={start}\n"
    bad = tmp_path / "start.trc"
    bad.write_text("".join(lines))
    stats = ReadStats()
    frames = _frames(bad, stats)
    good = _frames(src)
    assert stats.bad_lines == 1 and stats.first_bad[0][0] == 2
    assert [f[1:] for f in frames] == [f[1:] for f in good]  # all but the time: the same frames
    assert frames[0][0] == pytest.approx(17.5354)  # the first message's offset, 17535.4 ms
    start_time = good[0][0] - frames[0][0]
    assert [f[0] + start_time for f in frames] == pytest.approx([f[0] for f in good])


def test_trc_header_that_does_not_fit_its_lines_is_said(tmp_path):
    """python-can passes over a line of a type it does not know without a word; with a comma
    lost from the columns, that is every line. The replay says so instead of reading nothing
    in silence; a header with no lines after it, or a healthy file, says nothing."""
    src = SHARED_CAN / "python_can_testdata" / "test_CanMessage_V2_1.trc"
    if not src.exists():
        pytest.skip("shared python-can test data absent")
    lines = src.read_text().splitlines(keepends=True)
    data = [ln for ln in lines if not ln.startswith(";")]
    assert lines[2].startswith(";$COLUMNS=N,O,")
    cases = {
        "columns.trc": [lines[0], lines[1], lines[2].replace("N,O,", "NO,"), *lines[3:]],
        "header.trc": [ln for ln in lines if ln.startswith(";")],
        "healthy.trc": lines,
    }
    said = {}
    for name, text in cases.items():
        (tmp_path / name).write_text("".join(text))
        stats = ReadStats()
        said[name] = (len(_frames(tmp_path / name, stats)), stats.bad_lines, stats.stopped_early)
    assert said["columns.trc"][:2] == (0, len(data))  # each line of a type it does not know
    assert f"read no frame from the {len(data)} line(s) after its header" in said["columns.trc"][2]
    assert said["header.trc"] == (0, 0, None)
    assert said["healthy.trc"] == (len(_frames(src)), 0, None)


def test_python_can_csv_bad_line_is_counted(tmp_path):
    p = tmp_path / "pc.csv"
    with can.CSVWriter(str(p)) as w:
        for i in range(5):
            w.on_message_received(
                can.Message(
                    timestamp=float(i),
                    arbitration_id=0x100 + i,
                    data=bytes([i] * 8),
                    is_extended_id=False,
                )
            )
    lines = p.read_text().splitlines(keepends=True)
    p.write_text("".join(lines[:3] + ["garbage,line\n"] + lines[3:]))
    stats = ReadStats()
    frames = _frames(p, stats)
    assert detect_format(p) is LogFormat.PYTHON_CAN_CSV
    assert stats.bad_lines == 1 and stats.first_bad[0][0] == 4
    assert [f[2] for f in frames] == [0x100, 0x101, 0x102, 0x103, 0x104]


def test_truncated_blf_keeps_what_was_read(tmp_path):
    src = SHARED_CAN / "python_can_testdata" / "test_CanMessage.blf"
    if not src.exists():
        pytest.skip("shared python-can test data absent")
    data = src.read_bytes()
    p = tmp_path / "cut.blf"
    p.write_bytes(data[: len(data) - 40])
    stats = ReadStats()
    frames = _frames(p, stats)  # must not raise
    assert len(frames) <= 2


@pytest.mark.parametrize("obj_type", [0x7F, 1])  # a type python-can skips; a CAN message
def test_a_blf_object_that_declares_no_size_ends_the_reading_instead_of_hanging_it(
    tmp_path, obj_type
):
    """python-can steps from BLF object to object by each one's declared size: an object of
    size 0 was stepped to for good (100 % of a core, deaf to Ctrl-C), or its frame repeated
    without end (a 5-frame file replayed megabytes). The objects before it are read, and the
    reading stops there, said. Read in a process of its own, so a hang fails the test."""
    import struct
    import subprocess
    import sys

    src = tmp_path / "five.blf"
    with can.BLFWriter(str(src), compression_level=0) as w:
        for i in range(5):
            w.on_message_received(
                can.Message(timestamp=1.0 + i, arbitration_id=0x100 + i, data=bytes([i] * 8))
            )
    data = bytearray(src.read_bytes())
    at = -1
    for _ in range(4):  # the container's LOBJ, then the objects of messages 0x100-0x102
        at = data.index(b"LOBJ", at + 1)
    struct.pack_into("<II", data, at + 8, 0, obj_type)  # the third message: size 0
    bad = tmp_path / "bad.blf"
    bad.write_bytes(bytes(data))
    code = (
        "import sys\n"
        "from gateway.canbus.replay import iter_log\n"
        "from gateway.records import ReadStats\n"
        "st = ReadStats()\n"
        "ids = [int(i) for b in iter_log(sys.argv[1], st) for i in b.arbitration_id]\n"
        "print(ids, st.stopped_early)\n"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the reading of a BLF with an object of size 0 never ended")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("[256, 257] "), proc.stdout
    assert "corrupt object (it declares 0 bytes" in proc.stdout


def test_unknown_suffix_is_sniffed_or_refused(tmp_path):
    p = tmp_path / "capture.txt"
    p.write_text(KONA_CANDUMP.read_text()[:2000])
    assert detect_format(p) is LogFormat.CANDUMP
    # an ASC whose date line has a comma ("date Thu, 09 Nov 2023 ..."): it was "unknown CSV"
    a = tmp_path / "noext"
    a.write_text(
        "date Thu, 09 Nov 2023 20:36:33 GMT\nbase hex  timestamps absolute\n"
        "begin triggerblock\n   0.153600 1  594\tRx   d 1 34\nend triggerblock\n"
    )
    assert detect_format(a) is LogFormat.ASC
    assert len(_frames(a, ReadStats())) == 1
    q = tmp_path / "x.bin"
    q.write_bytes(b"\x00" * 100)
    with pytest.raises(LogFormatError, match="unknown log format"):
        detect_format(q)


@pytest.mark.parametrize("name", ["z.log.gz", "z.asc.gz", "z.csv.gz", "capture.gz", "z.log"])
def test_a_compressed_log_is_refused_in_one_line_not_read_as_csv(tmp_path, name):
    import gzip

    p = tmp_path / name
    p.write_bytes(gzip.compress(b"(1.000000) can0 123#11223344\n" * 50))
    with pytest.raises(LogFormatError, match="a compressed file; decompress it first"):
        detect_format(p)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("z.log", "candump"), ("z.asc", "Vector ASC"), ("z.trc", "PEAK TRC"), ("z.csv", "CSV")],
)
def test_binary_data_named_as_a_text_log_is_refused_in_one_line(tmp_path, name, kind):
    # (it used to be read as lines: thousands of bad lines, no frame, exit 0)
    p = tmp_path / name
    p.write_bytes(bytes((i * 151 + 7) % 256 for i in range(5000)))
    with pytest.raises(LogFormatError, match=f"binary data, not the {kind} text log its name"):
        detect_format(p)


def test_a_short_text_log_cut_by_a_power_cut_is_still_read_as_text(tmp_path):
    # GIVEN a candump log whose end a power cut filled with NUL bytes, as file systems do
    p = tmp_path / "cut.log"
    p.write_bytes(b"(1.000000) can0 123#1122\n" * 20 + b"\x00" * 4096)  # (a whole block)
    # THEN it is a candump log: its 20 frames are read, the NULs are one bad line
    assert detect_format(p) is LogFormat.CANDUMP
    stats = ReadStats()
    assert len(_frames(p, stats)) == 20 and stats.bad_lines == 1


@pytest.mark.parametrize("name", ["drive.log", "drive.asc", "drive.csv"])
def test_a_blf_file_under_a_text_logs_name_is_said_to_be_one(tmp_path, name):
    p = tmp_path / name
    with can.BLFWriter(p) as w:
        w.on_message_received(can.Message(timestamp=1.0, arbitration_id=0x123, data=b"\x01"))
    with pytest.raises(LogFormatError, match=r"a BLF file \(it starts with 'LOGG'\), .*drive\.blf"):
        detect_format(p)


def test_an_empty_csv_is_a_log_with_no_frame_like_any_other_empty_log(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_bytes(b"")
    assert detect_format(p) is LogFormat.PYTHON_CAN_CSV

    async def collect():
        return [b async for b in ReplaySource([p], speed=None).batches()]

    assert sum(len(b) for b in asyncio.run(collect())) == 0


def test_later_files_are_shifted_so_time_never_runs_backwards():
    src = ReplaySource([KONA_CSV, KONA_CSV], speed=None)

    async def collect():
        return [b async for b in src.batches()]

    batches = asyncio.run(collect())
    ts = np.concatenate([b.timestamp for b in batches])
    assert ts.size == 2 * 39_546
    first, second = ts[:39_546], ts[39_546:]
    assert second.min() > first.max()
    assert np.allclose(np.diff(second), np.diff(first))


def test_progress_runs_once_over_all_the_logs_by_bytes(tmp_path):
    """One bar for the whole replay (it went from 0 to 100 % again for every file)."""
    small = tmp_path / "small.log"
    small.write_text("".join(f"({i}.000000) can0 123#11223344\n" for i in range(5000)))
    seen: list[tuple[int, int]] = []
    src = ReplaySource(
        [KONA_CSV, small, KONA_CANDUMP],
        speed=None,
        on_progress=lambda stats, done, total: seen.append((done, total)),
    )

    async def drain():
        async for _ in src.batches():
            pass

    asyncio.run(drain())
    size = sum(p.stat().st_size for p in (KONA_CSV, small, KONA_CANDUMP))
    assert {total for _, total in seen} == {size}
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == size
    assert any(KONA_CSV.stat().st_size < d < size for d in done)  # in the files after the first


@pytest.mark.parametrize("speed", [20.0, 1e9])
def test_paced_replay_yields_to_the_event_loop(speed):
    # GIVEN a replay at 20x real time of a 10.8 s log (about 0.5 s of sleeping), or at a pace
    # no machine keeps (always behind it: it never slept, and no other task ran till its end)
    src = ReplaySource([KONA_CSV], speed=speed)
    ticks = 0

    async def ticker(stop: asyncio.Event):
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)  # a turn each time the replay lets one go

    batches = 0

    async def main():
        nonlocal batches
        stop = asyncio.Event()
        t = asyncio.create_task(ticker(stop))
        n = 0
        async for b in src.batches():
            n += len(b)
            batches += 1
        stop.set()
        await t
        return n

    # THEN another task had a turn between the batches (a replay that never yields leaves it
    # 1). Counted in turns, not in 10 ms ticks: on a loaded machine the replay fell behind
    # its pace, slept no more, and 10 ms ticks counted 2 where the turns were there)
    assert asyncio.run(main()) == 39_546
    assert batches >= 4 and ticks >= batches // 2, (ticks, batches)


@pytest.mark.parametrize("text", ["", "not a frame\nnor this\n"])
def test_a_loop_over_logs_without_frames_ends_instead_of_spinning(tmp_path, text, caplog):
    # GIVEN an empty log, or one of bad lines only, replayed with --loop
    log_path = tmp_path / "nothing.log"
    log_path.write_text(text)
    src = ReplaySource([log_path], speed=None, loop=True)

    async def main():
        return [b async for b in src.batches()]

    # WHEN it is replayed: THEN it ends at once (it read nothing again forever, never waiting,
    # so not even a signal could stop it) and says why
    assert asyncio.run(asyncio.wait_for(main(), 10)) == []
    assert "hold no frames" in caplog.text


def test_a_blf_cut_short_says_so(tmp_path):
    import can

    from gateway.canbus.replay import iter_log
    from gateway.records import ReadStats

    # GIVEN a BLF of 3,000 frames, and the same file cut after 7,000 bytes
    full = tmp_path / "full.blf"
    w = can.BLFWriter(str(full))
    for i in range(3000):
        w.on_message_received(can.Message(timestamp=i * 0.01, arbitration_id=0x542, data=bytes(8)))
    w.stop()
    cut = tmp_path / "cut.blf"
    cut.write_bytes(full.read_bytes()[:7000])
    counts = {}
    for f in (full, cut):
        stats = ReadStats(path=str(f))
        counts[f.name] = (sum(len(b) for b in iter_log(f, stats)), stats.stopped_early)
    # THEN the whole file reads whole and quietly; the cut one reads less and says why
    assert counts["full.blf"] == (3000, None)
    n, why = counts["cut.blf"]
    assert 0 < n < 3000 and "7,000 of the" in why and "cut short" in why


def _python_can_files(tmp_path: Path, *suffixes: str) -> dict[str, Path]:
    """The same 100 frames written by python-can's own writers, one file per suffix."""
    msgs = [
        can.Message(timestamp=100 + i * 0.01, arbitration_id=0x100 + i % 5, channel=0,
                    data=bytes([i % 256] * 8), is_extended_id=False)
        for i in range(100)
    ]  # fmt: skip
    out = {}
    for suffix in suffixes:
        out[suffix] = tmp_path / f"good{suffix}"
        with can.Logger(str(out[suffix])) as w:
            for m in msgs:
                w.on_message_received(m)
    return out


@pytest.mark.parametrize(
    ("suffix", "reasons"),
    [(".asc", ("not a line of an ASC log", "without its direction")),
     (".trc", ("a type TRC does not define", "Failed to parse"))],
)  # fmt: skip
def test_a_garbage_line_and_a_line_cut_short_are_counted_where_python_can_is_silent(
    tmp_path, suffix, reasons
):
    good = _python_can_files(tmp_path, suffix)[suffix]
    lines = good.read_text().splitlines()
    k = len(lines) // 2
    lines[k] = "this is !! not a frame ### 12 zz"
    lines[k + 4] = lines[k + 4][: len(lines[k + 4]) // 2]
    bad = tmp_path / f"bad{suffix}"
    bad.write_text("\n".join(lines) + "\n")
    # python-can loses both frames without a word ...
    assert len(_pycan(bad)) == len(_pycan(good)) - 2
    # ... the gateway loses them too, but counts both lines, with their numbers and why
    stats = ReadStats()
    assert len(_frames(bad, stats)) == 98
    assert stats.bad_lines == 2, stats.first_bad
    assert [n for n, _ in stats.first_bad] == [k + 1, k + 5]
    for (_, why), reason in zip(stats.first_bad, reasons, strict=True):
        assert reason in why


@pytest.mark.parametrize("name", PYCAN_FILES)
def test_python_cans_own_test_logs_have_no_bad_line(name):
    # events, statistics, status and warning records are lines of the formats, not damage
    path = SHARED_CAN / "python_can_testdata" / name
    if not path.exists():
        pytest.skip(f"{path} absent (../shared not beside the repository)")
    stats = ReadStats()
    assert _frames(path, stats) and stats.bad_lines == 0, stats.first_bad


def test_logs_named_otherwise_are_read_by_their_contents(tmp_path):
    files = _python_can_files(tmp_path, ".blf", ".trc", ".log")
    want = _frames(files[".log"])
    for suffix, fmt in ((".blf", LogFormat.BLF), (".trc", LogFormat.TRC)):
        renamed = tmp_path / f"recording_{suffix[1:]}"
        renamed.write_bytes(files[suffix].read_bytes())
        assert detect_format(renamed) is fmt
        assert [f[2:] for f in _frames(renamed)] == [f[2:] for f in want]
    # a candump log saved with a byte order mark keeps its first frame
    bom = tmp_path / "bom.log"
    bom.write_bytes(b"\xef\xbb\xbf" + files[".log"].read_bytes())
    stats = ReadStats()
    assert _frames(bom, stats) == want and stats.bad_lines == 0


def test_two_logs_read_side_by_side_each_count_their_own_bad_lines(tmp_path):
    import logging

    from gateway.canbus import replay

    files = _python_can_files(tmp_path, ".trc")
    lines = files[".trc"].read_text().splitlines()
    k = len(lines) // 2
    lines[k] = lines[k][: len(lines[k]) // 2]  # cut short: python-can logs "Failed to parse"
    lines[k + 2] = "this is !! not a frame"  # a type TRC does not define
    bad = tmp_path / "bad.trc"
    bad.write_text("\n".join(lines) + "\n")
    logger = logging.getLogger("can.io")
    before = logger.propagate
    a, b = ReadStats(), ReadStats()
    # WHEN both are read a message at a time, in turn (two [[can]] sources), and the one that
    # began first ends first
    ga = replay._iter_python_can_text(bad, LogFormat.TRC, a)
    gb = replay._iter_python_can_text(files[".trc"], LogFormat.TRC, b)
    n_a = n_b = 0
    for _ in zip(ga, gb, strict=False):
        n_a, n_b = n_a + 1, n_b + 1
    n_a += sum(1 for _ in ga)
    assert logger.propagate is False  # the other one still reads
    n_b += sum(1 for _ in gb)
    # THEN each file's report holds its own bad lines, and python-can's logging is as it was
    assert (a.bad_lines, b.bad_lines) == (2, 0), (a.first_bad, b.first_bad)
    assert (n_a, n_b) == (98, 100)
    assert logger.propagate == before


def test_a_later_file_is_shifted_from_its_own_times_not_by_the_shift_of_the_one_before(tmp_path):
    # GIVEN a log of absolute times, one of times from 0 (as python-can writes ASC and BLF),
    # and the first again: the third was shifted by the second's offset too, and began half an
    # hour of frame time after the second ended (a paced replay sat idle that long)
    relative = tmp_path / "relative.log"
    relative.write_text("".join(f"({i / 100:.6f}) can0 123#11223344\n" for i in range(500)))
    src = ReplaySource([KONA_CANDUMP, relative, KONA_CANDUMP], speed=None)

    async def collect():
        return [b async for b in src.batches()]

    ts = np.concatenate([b.timestamp for b in asyncio.run(collect())])
    n = (ts.size - 500) // 2
    first, second, third = ts[:n], ts[n : n + 500], ts[n + 500 :]
    # THEN each begins just after the one before ended, keeping its own spacing
    assert 0 < second[0] - first.max() < 0.01 and 0 < third[0] - second.max() < 0.01
    assert np.allclose(np.diff(third), np.diff(first))
    # and a file whose own times begin after the last end keeps them
    later = tmp_path / "later.log"
    later.write_text(f"({first.max() + 60:.6f}) can0 123#11\n")
    src = ReplaySource([KONA_CANDUMP, later], speed=None)
    last = np.concatenate([b.timestamp for b in asyncio.run(collect())])[-1]
    assert abs(last - (first.max() + 60)) < 1e-6


def test_a_python_can_csv_whose_lines_end_in_a_lone_cr_is_read(tmp_path):
    """Its format was told by the first line split at a newline: the whole file was one line,
    and it was refused as an "unknown CSV layout", though python-can reads it."""
    p = tmp_path / "cr.csv"
    with can.CSVWriter(str(p)) as w:
        for i in range(5):
            w.on_message_received(
                can.Message(timestamp=1.0 + i, arbitration_id=0x100 + i, data=bytes([i] * 8))
            )
    p.write_bytes(p.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r"))
    assert detect_format(p) is LogFormat.PYTHON_CAN_CSV
    stats = ReadStats()
    assert [f[2] for f in _frames(p, stats)] == [0x100, 0x101, 0x102, 0x103, 0x104]
    assert stats.bad_lines == 0
