"""VectorDecoder equals CantoolsDecoder bit for bit, on every DBC the project uses."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from pathlib import Path

import cantools
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import records
from gateway.canbus import fastdecode, signalplan
from gateway.canbus.candump import iter_candump
from gateway.canbus.dbc import ChannelDbcs, load_dbc
from gateway.canbus.decode import CantoolsDecoder
from gateway.canbus.fastdecode import VectorDecoder
from gateway.records import DecodedBatch, FrameBatch, FrameBatchBuilder

ROOT = Path(__file__).resolve().parents[2]
SHARED_CAN = ROOT.parent / "shared" / "data" / "can"


def find_data(pattern: str) -> list[Path]:
    """Files named ``pattern`` in ``can_fixtures/`` or, failing that, in ../shared/data/can."""
    for base in (ROOT / "can_fixtures", SHARED_CAN):
        found = sorted(base.rglob(pattern)) if base.is_dir() else []
        if found:
            return found
    return []


def project_dbcs() -> list[Path]:
    """The DBCs the project uses; an original with a ``.cantools.dbc`` copy is replaced by it
    (cantools cannot load opendbc_tesla_can.dbc). Nothing is loaded at collection time: the
    loader warns once per file, and test_dbc wants to see that warning."""
    found = (
        find_data("kona_*.cantools.dbc")
        + find_data("Model3CAN.dbc")
        + find_data("opendbc_tesla_*.dbc")
    )
    return [p for p in found if not p.with_name(p.stem + ".cantools.dbc").exists()]


@functools.cache
def loaded(path: Path) -> cantools.database.can.Database:
    return load_dbc(path)


DBC_PATHS = project_dbcs()

SYNTHETIC_DBC = """VERSION ""
NS_ :
BS_:
BU_: N

BO_ 256 Floats: 16 N
 SG_ F32le : 0|32@1- (1,0) [0|0] "" N
 SG_ F32be : 39|32@0- (1,0) [0|0] "" N
 SG_ F64le : 64|64@1- (2,0.5) [0|0] "" N

BO_ 2147558216 Wide: 64 N
 SG_ U64le : 3|64@1+ (1,0) [0|0] "" N
 SG_ S64be : 87|64@0- (1,0) [0|0] "" N
 SG_ S62be : 172|62@0- (0.001,3) [0|0] "" N
 SG_ Big : 400|60@1+ (1000,7) [0|0] "" N
 SG_ IntScale : 464|20@1- (3,0.25) [0|0] "" N
 SG_ Tail : 504|8@1+ (0.5,-10) [0|0] "" N

BO_ 512 Nested: 8 N
 SG_ Top M : 0|4@1+ (1,0) [0|15] "" N
 SG_ A m0 : 8|8@1+ (1,0) [0|0] "" N
 SG_ Sub m1M : 4|4@1+ (1,0) [0|15] "" N
 SG_ B m0 : 16|8@1- (1,0) [0|0] "" N
 SG_ C m2 : 23|16@0+ (0.1,0) [0|0] "" N
 SG_ Shared m2 : 40|8@1+ (1,-100) [0|0] "" N
 SG_ Plain : 56|8@1+ (1,0) [0|0] "" N

BO_ 768 Overlap: 8 N
 SG_ X : 0|16@1+ (1,0) [0|0] "" N
 SG_ Y : 8|16@1+ (1,0) [0|0] "" N

BO_ 769 TooLong: 2 N
 SG_ Z : 0|8@1+ (1,0) [0|0] "" N
 SG_ W : 8|16@1+ (1,0) [0|0] "" N

SIG_VALTYPE_ 256 F32le : 1;
SIG_VALTYPE_ 256 F32be : 1;
SIG_VALTYPE_ 256 F64le : 2;
VAL_ 512 Top 0 "zero" 1 "one" 2 "two" 3 "three";
SG_MUL_VAL_ 512 A Top 0-0;
SG_MUL_VAL_ 512 Sub Top 1-1;
SG_MUL_VAL_ 512 B Sub 0-0;
SG_MUL_VAL_ 512 C Sub 2-3;
SG_MUL_VAL_ 512 Shared Top 2-3;
"""


@functools.cache
def synthetic() -> cantools.database.can.Database:
    db = cantools.database.load_string(SYNTHETIC_DBC, database_format="dbc", strict=False)
    assert isinstance(db, cantools.database.can.Database)
    return db


def assert_same(ref: DecodedBatch, got: DecodedBatch) -> None:
    assert got.stats == ref.stats
    assert [s.name for s in got.series] == [s.name for s in ref.series]
    for r, g in zip(ref.series, got.series, strict=True):
        assert g.timestamp.dtype == np.float64 and g.value.dtype == np.float64
        assert np.array_equal(g.timestamp, r.timestamp), r.name
        # bit for bit: -0.0 and NaN payloads included
        assert np.array_equal(g.value.view(np.uint64), r.value.view(np.uint64)), r.name
        assert (g.unit, g.choices) == (r.unit, r.choices), r.name


def both(dbcs: ChannelDbcs, batch: FrameBatch, wanted: set[str] | None = None) -> VectorDecoder:
    vec = VectorDecoder(dbcs, wanted)
    assert_same(CantoolsDecoder(dbcs, wanted).decode(batch), vec.decode(batch))
    return vec


def random_batch(
    rng: np.random.Generator,
    db: cantools.database.can.Database,
    per_message: int,
    channels: tuple[str, ...] = ("can0",),
    full_share: float = 0.6,
) -> FrameBatch:
    """``per_message`` frames of every message (random length, random or low-bit bytes so
    that multiplexers hit valid and invalid values), unknown ids and special frames, shuffled."""
    ids = [m.frame_id for m in db.messages for _ in range(per_message)]
    lengths = [m.length for m in db.messages for _ in range(per_message)]
    ids += [0x7FE, 0x1ABCDEF] * 5
    lengths += [8] * 10
    n = len(ids)
    width = 64 if max(lengths) > 8 else 8
    full = rng.random(n) < full_share
    dlc = np.where(full, np.minimum(lengths, width), rng.integers(0, width + 1, n))
    data = rng.integers(0, 256, (n, width), dtype=np.uint8)
    low = rng.random(n) < 0.5
    data[low] &= rng.choice(np.array([0x01, 0x03, 0x07, 0x31], np.uint8), (int(low.sum()), 1))
    data[np.arange(width)[None, :] >= dlc[:, None]] = 0
    order = rng.permutation(n)
    fid = np.array(ids, np.uint32)[order]
    return FrameBatch(
        timestamp=np.cumsum(rng.random(n)) + 1000.0,
        channel=rng.integers(0, len(channels), n).astype(np.uint16),
        channels=channels,
        arbitration_id=fid,
        is_extended=fid > 0x7FF,
        is_remote=rng.random(n) < 0.01,
        is_error=rng.random(n) < 0.01,
        is_fd=np.full(n, width > 8),
        dlc=dlc[order].astype(np.uint8),
        data=data[order],
    )


@pytest.fixture(params=["flat", "grouped"])
def small_groups(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Decode every group of plain messages on the flat path, or everything per group."""
    if request.param == "grouped":
        monkeypatch.setattr(fastdecode, "FLAT_MAX_GROUP", 0)
    else:
        monkeypatch.setattr(fastdecode, "FLAT_MAX_GROUP", 1 << 30)
        monkeypatch.setattr(fastdecode, "FLAT_MIN_GROUPS", 0)
    return str(request.param)


@pytest.mark.parametrize("path", DBC_PATHS, ids=lambda p: p.name)
def test_every_message_of_every_project_dbc_decodes_equal(path: Path, small_groups: str) -> None:
    db = loaded(path)
    assert db is not None
    batch = random_batch(np.random.default_rng(6), db, per_message=120, channels=("c0", "c1"))
    vec = both(ChannelDbcs({"*": [db]}), batch)
    assert vec.fallback_messages() == []


@pytest.mark.parametrize("path", DBC_PATHS, ids=lambda p: p.name)
def test_large_groups_of_whole_frames_decode_as_one_matrix_equal(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every frame as long as its message: each plain message's group takes _decode_matrix
    monkeypatch.setattr(fastdecode, "FLAT_MAX_GROUP", 0)
    used = []
    matrix = VectorDecoder._decode_matrix

    def spy(self: VectorDecoder, plan: signalplan._Plan, *args: object) -> bool:
        done = matrix(self, plan, *args)  # type: ignore[arg-type]
        used.append(done)
        return done

    monkeypatch.setattr(VectorDecoder, "_decode_matrix", spy)
    db = loaded(path)
    assert db is not None
    rng = np.random.default_rng(9)
    batch = random_batch(rng, db, per_message=150, channels=("c0", "c1"), full_share=1.0)
    both(ChannelDbcs({"*": [db]}), batch)
    wanted = {f"{m.name}.{s.name}" for m in db.messages for s in m.signals if rng.random() < 0.3}
    both(ChannelDbcs({"*": [db]}), batch, wanted)
    # one signal per message: a matrix of a single row, whatever its scale and offset
    for _ in range(3):
        one = {
            f"{m.name}.{m.signals[rng.integers(len(m.signals))].name}"
            for m in db.messages
            if m.signals
        }
        both(ChannelDbcs({"*": [db]}), batch, one)
    assert used and all(used)


def test_small_groups_take_the_flat_path_only_when_there_are_many(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flat path's cost per batch pays only for many small groups: with fewer than
    FLAT_MIN_GROUPS, each is decoded as a matrix. Either way the result is cantools'."""
    flat = []
    decode_flat = VectorDecoder._decode_flat

    def spy(self: VectorDecoder, *args: object) -> None:
        flat.append(len(args[1]))  # type: ignore[arg-type]
        decode_flat(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(VectorDecoder, "_decode_flat", spy)
    db = loaded(next(p for p in DBC_PATHS if p.name == "Model3CAN.dbc"))
    assert db is not None
    plain = [m for m in db.messages if not m.is_multiplexed()]
    rng = np.random.default_rng(12)
    for n in (signalplan.FLAT_MIN_GROUPS - 1, signalplan.FLAT_MIN_GROUPS):
        some = cantools.database.can.Database(plain[:n])
        batch = random_batch(rng, some, per_message=5, full_share=1.0)
        flat.clear()
        both(ChannelDbcs({"*": [some]}), batch)
        assert bool(flat) == (n >= signalplan.FLAT_MIN_GROUPS)
    assert fastdecode.FLAT_MIN_GROUPS == signalplan.FLAT_MIN_GROUPS


OVERLAP_64 = """VERSION ""
BU_: N
BO_ 300 Whole: 8 N
 SG_ All : 0|64@1+ (0.5,0) [0|0] "" N
 SG_ Head : 7|8@0- (1,0) [0|0] "" N
"""


def test_an_unsigned_64_bit_field_beside_a_signed_one_keeps_its_top_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a little- and a big-endian signal may overlap (cantools reads each on its own): the
    # matrix reads signed rows as int64, which must not turn the unsigned 64-bit one negative
    monkeypatch.setattr(fastdecode, "FLAT_MAX_GROUP", 0)
    db = cantools.database.load_string(OVERLAP_64, database_format="dbc", strict=False)
    b = FrameBatchBuilder()
    rng = np.random.default_rng(3)
    for i in range(200):
        b.add(float(i), "can0", 300, bytes(rng.integers(0, 256, 8, dtype=np.uint8)))
    batch = b.build()
    both(ChannelDbcs({"*": [db]}), batch)
    # alone, or beside other unsigned rows, it is read as uint64 (the others fit int64)
    for text in (OVERLAP_64.replace("@0-", "@0+"), OVERLAP_64.split(" SG_ Head")[0]):
        db = cantools.database.load_string(text, database_format="dbc", strict=False)
        both(ChannelDbcs({"*": [db]}), batch)


def test_synthetic_corners_decode_equal() -> None:
    # float32/64 both byte orders, 64-bit and 9-byte-spanning signals in a 64-byte FD frame,
    # exact big integers, nested multiplexing, overlapping signals (bitstruct then fails
    # every frame), a signal past the end
    batch = random_batch(np.random.default_rng(7), synthetic(), per_message=400)
    vec = both(ChannelDbcs({"*": [synthetic()]}), batch)
    assert vec.fallback_messages() == []


def test_messages_without_a_plan_are_decoded_by_cantools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signalplan, "_layout_ok", lambda signals, length: False)
    db = loaded(find_data("Model3CAN.dbc")[0]) if find_data("Model3CAN.dbc") else synthetic()
    assert db is not None
    batch = random_batch(np.random.default_rng(9), db, per_message=20, channels=("a", "b"))
    vec = both(ChannelDbcs({"*": [db]}), batch)
    assert len(vec.fallback_messages()) > 1


def test_signal_past_message_end_fails_every_frame_like_cantools() -> None:
    b = FrameBatchBuilder()
    for i in range(5):
        b.add(float(i), "can0", 769, bytes([i, 2]))
    got = VectorDecoder(ChannelDbcs({"*": [synthetic()]})).decode(b.build())
    assert got.series == [] and got.stats.errors == {769: 5} and got.stats.decoded == 0


def test_unknown_nested_multiplexer_value_makes_the_frame_an_error() -> None:
    b = FrameBatchBuilder()
    b.add(1.0, "can0", 512, bytes([0x11, 1, 2, 3, 4, 5, 6, 7]))  # Top=1, Sub=1: no branch
    b.add(2.0, "can0", 512, bytes([0x21, 1, 2, 3, 4, 5, 6, 7]))  # Top=1, Sub=2: C
    b.add(3.0, "can0", 512, bytes([0x01]))  # Top=1, Sub=0, B does not fit: Top and Sub only
    dbcs = ChannelDbcs({"*": [synthetic()]})
    batch = b.build()
    got = VectorDecoder(dbcs).decode(batch)
    assert got.stats.errors == {512: 1} and got.stats.decoded == 2
    assert {s.name: s.timestamp.tolist() for s in got.series} == {
        "Nested.Top": [2.0, 3.0],
        "Nested.Sub": [2.0, 3.0],
        "Nested.C": [2.0],
        "Nested.Plain": [2.0],
    }
    assert_same(CantoolsDecoder(dbcs).decode(batch), got)


FRAME = st.tuples(
    st.integers(0, 10**6),  # picks the message (or an unknown id)
    st.integers(0, 64),  # length before clipping to the message's
    st.booleans(),  # full length
    st.binary(min_size=64, max_size=64),
    st.sampled_from([0xFF, 0x03, 0x01]),  # byte mask: low values hit multiplexer branches
    st.integers(0, 40),  # 0: remote, 1: error
    st.integers(0, 1),  # channel
)


def frames_to_batch(db: cantools.database.can.Database, frames: list[tuple]) -> FrameBatch:
    msgs = db.messages
    b = FrameBatchBuilder(channels=["can0", "can1"])
    for i, (pick, n, full, payload, mask, special, ch) in enumerate(frames):
        if pick % 11 == 0:
            fid, length = (0x7FD, 8) if pick % 2 else (0x1FFFFFF0, 8)
        else:
            m = msgs[pick % len(msgs)]
            fid, length = m.frame_id, m.length
        n = length if full else min(n, max(length + 4, 8))
        data = bytes(x & mask for x in payload[: min(n, 64)])
        b.add(
            i * 0.01,
            f"can{ch}",
            fid,
            data,
            is_extended=fid > 0x7FF,
            is_remote=special == 0,
            is_error=special == 1,
            is_fd=len(data) > 8,
        )
    return b.build()


@pytest.mark.parametrize("path", [*DBC_PATHS, None], ids=lambda p: p.name if p else "synthetic")
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(frames=st.lists(FRAME, max_size=40))
def test_random_frames_decode_equal(path: Path | None, frames: list[tuple]) -> None:
    db = loaded(path) if path is not None else synthetic()
    assert db is not None
    batch = frames_to_batch(db, frames)
    for least in (0, signalplan.FLAT_MIN_GROUPS):  # small groups on the flat path, or not
        with _flat_path_from(least):
            # the same database on two channels: one series gathers samples from both, in
            # frame order
            both(ChannelDbcs({"can0": [db], "can1": [db]}), batch)


@contextlib.contextmanager
def _flat_path_from(least: int) -> Iterator[None]:
    """``FLAT_MIN_GROUPS`` set to ``least`` (hypothesis tests cannot take monkeypatch)."""
    before = fastdecode.FLAT_MIN_GROUPS
    fastdecode.FLAT_MIN_GROUPS = least
    try:
        yield
    finally:
        fastdecode.FLAT_MIN_GROUPS = before


def group_number_types(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The dtype of the frames' group numbers of each batch of standard ids decoded from now
    on (None for a batch that takes the general way), in a list that fills as they decode."""
    types: list[object] = []
    standard_groups = VectorDecoder._standard_groups

    def spy(self: VectorDecoder, *args: object) -> object:
        got = standard_groups(self, *args)  # type: ignore[arg-type]
        types.append(None if got is None else got.gid.dtype)
        return got

    monkeypatch.setattr(VectorDecoder, "_standard_groups", spy)
    return types


@pytest.mark.parametrize("least", [0, signalplan.FLAT_MIN_GROUPS])
def test_standard_ids_of_many_messages_and_special_frames_decode_equal(
    least: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More than 254 (channel, id) pairs to decode in one batch of standard ids: the frames'
    group numbers are 16-bit; error and remote frames among them are left out."""
    monkeypatch.setattr(fastdecode, "FLAT_MIN_GROUPS", least)
    numbers = group_number_types(monkeypatch)
    db = loaded(next(p for p in DBC_PATHS if p.name == "Model3CAN.dbc"))
    assert db is not None
    batch = random_batch(np.random.default_rng(21), db, per_message=20, channels=("c0", "c1"))
    std = batch.select(np.flatnonzero(batch.arbitration_id <= 0x7FF))
    assert (std.is_error | std.is_remote).any()
    both(ChannelDbcs({"*": [db]}), std)
    assert numbers == [np.uint16]


@pytest.mark.parametrize("least", [0, signalplan.FLAT_MIN_GROUPS])
@pytest.mark.parametrize("wanted", [None, {"ID3E3VCRIGHT_lightStatus.VCRIGHT_brakeLightStatus"}])
def test_one_decoder_numbers_codes_as_they_first_appear(
    least: int, wanted: set[str] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decoder numbers each (channel, id) once and keeps the numbers from batch to batch.
    Batches that bring new ids, some in no DBC, until more than 254 ids need numbers (the
    numbers widen from 8 to 16 bits between batches), then batches of ids seen before, and a
    batch whose channel list is the other way round: each decodes as the reference does,
    per-id counts of unknown ids included. With one signal wanted, most ids need no decoding
    (they share one number), and the numbers stay 8-bit."""
    monkeypatch.setattr(fastdecode, "FLAT_MIN_GROUPS", least)
    widths = group_number_types(monkeypatch)
    db = loaded(next(p for p in DBC_PATHS if p.name == "Model3CAN.dbc"))
    assert db is not None
    rng = np.random.default_rng(5)
    batch = random_batch(rng, db, per_message=6, channels=("c0", "c1"))
    std = batch.select(np.flatnonzero(batch.arbitration_id <= 0x7FF))
    std.arbitration_id[::7] = rng.integers(0, 0x800, len(std.arbitration_id[::7]))  # unknowns
    by_id = np.argsort(std.arbitration_id.astype(np.int64) + (std.channel << 11), kind="stable")
    parts = np.array_split(by_id, 6)
    dbcs = ChannelDbcs({"*": [db]})
    vec, ref = VectorDecoder(dbcs, wanted), CantoolsDecoder(dbcs, wanted)
    for part in [*parts, np.arange(len(std)), parts[0]]:
        b = std.select(np.sort(part))
        assert_same(ref.decode(b), vec.decode(b))
    swapped = dataclasses.replace(std, channels=std.channels[::-1])
    assert_same(ref.decode(swapped), vec.decode(swapped))
    assert widths[0] == np.uint8
    assert widths[-2] == (np.uint16 if wanted is None else np.uint8)


def kona_log() -> Path:
    logs = find_data("*.candump.log")
    if not logs:
        pytest.skip("no Kona candump log in can_fixtures/ or ../shared/data/can")
    return logs[0]


def kona_dbcs(spec: str) -> ChannelDbcs:
    pcan, ccan, bcan = (find_data(f"kona_{x}.cantools.dbc") for x in ("pcan", "ccan", "bcan"))
    if not (pcan and ccan and bcan):
        pytest.skip("Kona DBCs not found")
    if spec == "per-channel":
        return ChannelDbcs({"can0": [load_dbc(pcan[0])], "can1": [load_dbc(ccan[0])]})
    return ChannelDbcs({"*": [load_dbc(ccan[0]), load_dbc(pcan[0]), load_dbc(bcan[0])]})


def concat(batches: list[FrameBatch]) -> FrameBatch:
    assert len({b.channels for b in batches[1:]}) <= 1
    return FrameBatch(
        *(
            np.concatenate([getattr(b, f.name) for b in batches])
            if f.name != "channels"
            else batches[-1].channels
            for f in dataclasses.fields(FrameBatch)
        )
    )


@pytest.mark.parametrize("spec", ["per-channel", "all-on-every-channel"])
def test_real_kona_log_decodes_equal_whole_file_and_per_chunk(spec: str) -> None:
    dbcs = kona_dbcs(spec)
    chunks = list(iter_candump(kona_log()))
    whole = concat(chunks)
    assert len(whole) == 39546
    vec = both(dbcs, whole)
    assert vec.decode(whole).stats.decoded > 20000
    for chunk in chunks[::5]:
        both(dbcs, chunk)


def test_wanted_limits_the_series_and_still_routes_multiplexers() -> None:
    dbcs = ChannelDbcs({"*": [synthetic()]})
    batch = random_batch(np.random.default_rng(8), synthetic(), per_message=200)
    wanted = {"Nested.C", "Nested.Shared", "Wide.Tail", "Floats.F32be", "Nowhere.Nothing"}
    vec = both(dbcs, batch, wanted)
    names = {s.name for s in vec.decode(batch).series}
    assert names == wanted - {"Nowhere.Nothing"}
    assert both(dbcs, batch, set()).decode(batch).series == []
    # standard ids only: frames of messages with nothing wanted are counted without decoding,
    # multiplexed ones are still routed (their unknown values are errors, as in cantools)
    std = batch.select(np.flatnonzero(batch.arbitration_id <= 0x7FF))
    for w in (wanted, set(), {"Nested.C"}):
        both(dbcs, std, w)


def test_kona_wanted_and_stats_match_the_reference() -> None:
    dbcs = kona_dbcs("per-channel")
    batch = concat(list(iter_candump(kona_log())))
    both(dbcs, batch, {"BMS_542.SocDisp", "Batt_HV_Status.VBatt", "VCU_200.Range"})


@pytest.mark.parametrize("least", [0, signalplan.FLAT_MIN_GROUPS])
def test_one_decoder_over_batches_whose_channel_lists_differ(
    least: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What each (channel, id) needs is remembered per channel list: the same channel codes
    naming other channels in a later batch must be looked up anew (per-channel DBCs, so the
    P-CAN ids on can1 are unknown), batch after batch with one decoder."""
    monkeypatch.setattr(fastdecode, "FLAT_MIN_GROUPS", least)
    dbcs = kona_dbcs("per-channel")
    batch = concat(list(iter_candump(kona_log())))
    swapped = dataclasses.replace(batch, channels=batch.channels[::-1])
    renamed = dataclasses.replace(batch, channels=("can0", "vcan9"))
    wanted = {"BMS_542.SocDisp", "VCU_200.Range", "ESP12.CYL_PRES"}
    # error frames whose id (their class) is wider than a standard id, among standard frames
    errors = batch.select(np.arange(len(batch)))
    errors.is_error[::97] = True
    errors.arbitration_id[::97] = 0x1FFFFFFF
    for w in (wanted, None):
        vec, ref = VectorDecoder(dbcs, w), CantoolsDecoder(dbcs, w)
        for b in (batch, swapped, renamed, batch, errors, swapped):
            assert_same(ref.decode(b), vec.decode(b))


NEGATIVE_SCALE = """VERSION ""
BU_: N
BO_ 300 Current: 8 N
 SG_ Amps : 0|16@1- (-0.1,0) [0|0] "A" N
 SG_ Flow : 16|8@1+ (-1,0) [0|0] "" N
"""


@pytest.mark.parametrize("wanted", [None, {"Current.Flow"}])
def test_zero_times_a_negative_scale_is_plus_zero_as_in_cantools(wanted) -> None:
    """cantools computes raw * scale + offset: 0 * -0.1 is -0.0, and adding the offset 0
    makes it +0.0. The matrix path (more than 32 frames of one message) must not skip that."""
    db = cantools.database.load_string(NEGATIVE_SCALE, database_format="dbc")
    b = FrameBatchBuilder()
    for i in range(40):
        b.add(float(i), "can0", 300, bytes([0, 0, i % 3, 0, 0, 0, 0, 0]))
    vec = both(ChannelDbcs({"*": [db]}), b.build(), wanted)
    assert vec._columns, "the matrix path was not taken"


def test_standard_ids_never_build_64_bit_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of standard ids groups on 16-bit codes; the 64-bit path is for the rest."""
    dbcs = kona_dbcs("per-channel")
    batch = concat(list(iter_candump(kona_log())))

    def refuse(keys: object) -> None:
        raise AssertionError("64-bit keys built for a batch of standard ids")

    monkeypatch.setattr(fastdecode, "_group_order", refuse)
    both(dbcs, batch)
    both(dbcs, batch, {"BMS_542.SocDisp"})


def test_a_series_is_immutable_and_read_by_name() -> None:
    from gateway.records import SignalSeries

    ts, val = np.array([1.0, 2.0]), np.array([3.0, -0.0])
    s = SignalSeries("M.S", ts, val, "V", {1.0: "ON"})
    assert s.name == "M.S" and s.timestamp is ts and s.value is val
    assert s.unit == "V" and s.choices == {1.0: "ON"}
    assert SignalSeries("M.S", ts, val).unit == "" and SignalSeries("M.S", ts, val).choices is None
    with pytest.raises(AttributeError):
        s.name = "X"  # type: ignore[misc]


def test_empty_and_all_special_batches() -> None:
    dbcs = ChannelDbcs({"*": [synthetic()]})
    both(dbcs, FrameBatch.empty(("can0",)))
    b = FrameBatchBuilder()
    b.add(1.0, "can0", 512, b"\x00" * 8, is_remote=True)
    b.add(2.0, "can0", 0, b"", is_error=True)
    batch = b.build()
    assert both(dbcs, batch).decode(batch).stats.skipped_special == 2


def _cached_paths(tmp_path: Path) -> list[Path]:
    """The project's DBCs and the synthetic corner cases, as files."""
    corners = tmp_path / "corners.dbc"
    corners.write_text(SYNTHETIC_DBC)
    return [*DBC_PATHS, corners]


def test_plans_read_back_from_the_cache_decode_as_cantools_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay reads a DBC's decode plans from the cache, without cantools: they must decode
    every message as cantools does, the messages cantools decodes itself through its model,
    loaded then (from the cache too)."""
    from gateway.canbus import dbc as dbc_module

    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    paths = _cached_paths(tmp_path)
    for path in paths:  # parsed, compiled and cached
        dbc_module._forget()
        with monkeypatch.context() as m:
            if path.name == "corners.dbc":  # every plan of it: "cantools decodes this one"
                m.setattr(signalplan, "_layout_ok", lambda signals, length: False)
            ChannelDbcs.from_specs([str(path)])
    dbc_module._forget()
    monkeypatch.setattr(dbc_module, "_parse", None)  # neither a parse ...
    monkeypatch.setattr(signalplan, "_build_plan", None)  # ... nor a plan built here
    rng = np.random.default_rng(11)
    fallbacks = 0
    for path in paths:
        cached = ChannelDbcs.from_specs([str(path)])
        db = cantools.database.load_file(str(path), database_format="dbc", strict=False)
        batch = random_batch(rng, db, per_message=40, channels=("c0", "c1"))
        ref = CantoolsDecoder(ChannelDbcs({"*": [db]})).decode(batch)
        vec = VectorDecoder(cached)
        assert_same(ref, vec.decode(batch))
        fallbacks += len(vec.fallback_messages())
        wanted = {f"{m.name}.{s.name}" for m in db.messages for s in m.signals[::3]}
        ref = CantoolsDecoder(ChannelDbcs({"*": [db]}), wanted).decode(batch)
        assert_same(ref, VectorDecoder(cached, wanted).decode(batch))
    assert fallbacks >= 3  # the corner cases' messages went through cantools


@pytest.mark.parametrize("path", DBC_PATHS, ids=lambda p: p.name)
def test_the_plans_find_the_message_cantools_finds_for_every_id(path: Path) -> None:
    db = loaded(path)
    plans = signalplan.DbcPlans.of(db)
    ids = [*range(0x800), *(m.frame_id for m in db.messages), 0x800, 0x1FFFFFFF, 0x80000123]
    for fid in ids:
        try:
            want = db.get_message_by_frame_id(fid).name
        except KeyError:
            want = None
        n = plans.number(fid)
        assert (None if n is None else plans.names[n]) == want, hex(fid)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-(2**40), 2**40), max_size=50)
    | st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), max_size=50)
)
def test_distinct_is_np_unique(values: list) -> None:
    a = np.array(values, np.float64 if any(isinstance(v, float) for v in values) else np.int64)
    got = records.distinct(a)
    want = np.unique(a)
    assert got.dtype == want.dtype
    assert got.tolist() == want.tolist()


_EXT_LOW_DBC = """VERSION ""
BS_:
BU_: N
BO_ 2147483904 ExtLow: 8 N
 SG_ L1 : 0|8@1+ (1,0) [0|0] "" N
BO_ 256 StdSame: 8 N
 SG_ S1 : 0|16@1+ (1,0) [0|0] "" N
BO_ 2147483905 ExtOnly: 8 N
 SG_ E : 0|8@1+ (1,0) [0|0] "" N
"""


def test_an_extended_id_below_0x800_is_not_the_standard_message_of_that_id() -> None:
    """An extended 0x100 was decoded with the standard 0x100's layout, and an extended 0x101
    was an unknown id: cantools' lookup needs the extended flag (``force_extended_id``) for
    ids below 0x800, and both decoders now pass the frame's."""
    db = cantools.database.load_string(_EXT_LOW_DBC, database_format="dbc")
    b = FrameBatchBuilder(channels=["can0"])
    payload = bytes.fromhex("1122334455667788")
    frames = [(0x100, False), (0x100, True), (0x101, True), (0x101, False)]
    for i, (fid, ext) in enumerate(frames):
        b.add(i * 0.1, "can0", fid, payload, is_extended=ext)
    batch = b.build()
    for decoder in (CantoolsDecoder, VectorDecoder):
        out = decoder(ChannelDbcs({"*": [db]}), None).decode(batch)
        got = {s.name: s.value.tolist() for s in out.series}
        want = {}
        for fid, ext in frames[:3]:
            msg = db.get_message_by_frame_id(fid, force_extended_id=ext)
            for name, value in msg.decode(payload).items():
                want[f"{msg.name}.{name}"] = [float(value)]
        assert got == want, decoder
        assert out.stats.unknown_id == {0x101: 1} and out.stats.decoded == 3


_ODD_VALUES_DBC = """VERSION ""
BS_:
BU_: N
BO_ 1281 F16: 8 N
 SG_ Half : 0|16@1- (1,0) [0|0] "" N
BO_ 100 Huge: 8 N
 SG_ H : 0|32@1+ (1E300,0) [0|0] "" N
 SG_ K : 32|8@1+ (1,0) [0|0] "" N
BO_ 101 Other: 8 N
 SG_ O : 0|8@1+ (1,0) [0|0] "" N
SIG_VALTYPE_ 1281 Half : 1;
"""


@pytest.mark.parametrize(
    ("fid", "payload"),
    [
        (1281, "ff7f000000000000"),  # half NaNs with payloads: cantools gives the plain NaN
        (1281, "017c000000000000"),
        (1281, "01fe000000000000"),  # a negative one
        (100, "ffffffff05000000"),  # 4.3e309 as an exact integer: past float64's range
    ],
)
def test_odd_values_decode_as_cantools_gives_them_and_never_fail_the_batch(fid, payload):
    """A half-precision NaN kept its payload bits (cantools gives the plain NaN); a value past
    float64's range (cantools: an exact int) raised OverflowError and lost the whole batch."""
    db = cantools.database.load_string(_ODD_VALUES_DBC, database_format="dbc")
    b = FrameBatchBuilder(channels=["can0"])
    b.add(0.0, "can0", fid, bytes.fromhex(payload))
    b.add(0.1, "can0", 101, bytes.fromhex("2a00000000000000"))  # in the same batch
    dbcs, batch = ChannelDbcs({"*": [db]}), b.build()
    both(dbcs, batch)
    out = VectorDecoder(dbcs, None).decode(batch)
    got = {s.name: s.value[0] for s in out.series}
    assert got["Other.O"] == 42.0
    want = db.get_message_by_frame_id(fid).decode(bytes.fromhex(payload))
    for name, value in want.items():
        mine = got[f"{db.get_message_by_frame_id(fid).name}.{name}"]
        if isinstance(value, float) and np.isnan(value):
            assert np.isnan(mine) and np.signbit(mine) == np.signbit(value)
            assert np.float64(mine).view(np.uint64) == np.float64(value).view(np.uint64)
        else:
            assert mine == (value if abs(value) < 1e308 else np.inf)
