"""Bad input, fuzzed: readers, decoders, policy, guard and settings never crash or hang, and
every bad frame is counted. Plus a checked-in corpus of nasty files."""

from __future__ import annotations

import itertools
import random
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.canbus.dbc import ChannelDbcs
from gateway.canbus.decode import CantoolsDecoder
from gateway.canbus.replay import iter_log
from gateway.egress.guard import EgressGuard, Outgoing
from gateway.egress.schema import HEADER_FIELDS, SCHEMAS, Topics, unpack
from gateway.errors import ConfigError, GatewayError
from gateway.records import FrameBatchBuilder, ReadStats
from gateway.telemetry.aggregate import WindowAggregator
from gateway.telemetry.policy import load_policy, parse_policy
from tests.conftest import KONA, SHARED_CAN

CORPUS = Path(__file__).parent / "corpus"
FUZZ = settings(
    max_examples=75,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _read_all(path: Path) -> tuple[int, ReadStats]:
    stats = ReadStats()
    n = 0
    for b in iter_log(path, stats):
        n += len(b)
        assert b.data.shape[0] == len(b) and (b.dlc <= b.data.shape[1]).all()
    return n, stats


# -- readers ------------------------------------------------------------------------------
def _candump_line(rng: random.Random) -> str:
    fid = rng.randrange(0x800)
    data = bytes(rng.randrange(256) for _ in range(rng.randrange(9)))
    return f"({rng.uniform(0, 1e9):.6f}) can{rng.randrange(3)} {fid:03X}#{data.hex().upper()}\n"


def _gvret_line(rng: random.Random) -> str:
    n = rng.randrange(9)
    data = ",".join(f"{rng.randrange(256):02X}" for _ in range(n))
    return (
        f"{rng.randrange(10**10)},{rng.randrange(0x800):08X},false,{rng.randrange(2)},{n},{data}\n"
    )


_CORRUPTIONS = st.one_of(
    st.text(min_size=0, max_size=80),
    st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
    st.sampled_from(
        [
            "(",
            "()",
            "(1.0) can0",
            "(1.0) can0 123#",
            "(x) can0 123#00",
            "(1.0) can0 XYZ#00",
            "(1.0) can0 123#0",
            "(1.0) can0 123##",
            "(nan) can0 123#00",
            "(1e999) can0 1#00",
            ",,,,",
            "Time Stamp",
            "1,2,3",
            "0,00000100,false,0,9,00",
        ]
    ),
)


@FUZZ
@given(
    seed=st.integers(0, 2**32),
    corruptions=st.lists(_CORRUPTIONS, max_size=12),
    kind=st.sampled_from(["candump", "gvret"]),
)
@example(seed=0, corruptions=["\x85"], kind="candump")
@example(seed=0, corruptions=["\u2028"], kind="gvret")
def test_text_readers_survive_random_corruption(tmp_path_factory, seed, corruptions, kind):
    rng = random.Random(seed)
    make = _candump_line if kind == "candump" else _gvret_line
    good = [make(rng) for _ in range(rng.randrange(1, 40))]
    lines = list(good)
    for c in corruptions:
        lines.insert(rng.randrange(len(lines) + 1), c.replace("\n", " ").replace("\r", " ") + "\n")
    path = tmp_path_factory.mktemp("fz") / ("f.log" if kind == "candump" else "f.csv")
    header = "Time Stamp,ID,Extended,Bus,LEN,D1,D2,D3,D4,D5,D6,D7,D8\n" if kind == "gvret" else ""
    path.write_text(header + "".join(lines), encoding="utf-8", errors="replace")
    n, stats = _read_all(path)
    assert n == stats.frames
    assert n >= len(good)  # every good line is read (a corruption may happen to be valid too)
    # blank as the reader sees bytes: str.strip() would also strip U+0085 or U+2028, which are
    # not blank to a byte-level log reader (hypothesis found "\x85" alone on a line)
    nonblank = sum(1 for ln in lines if ln.encode("utf-8", "replace").strip())
    assert n + stats.bad_lines <= nonblank


@FUZZ
@given(
    seed=st.integers(0, 2**32),
    ops=st.lists(st.sampled_from(["flip", "drop", "dup", "junk"]), min_size=1, max_size=10),
    name=st.sampled_from(["asc", "trc"]),
)
# found by this test: a TRC start time too large for a date (OverflowError out of python-can)
@example(seed=10672, ops=["flip", "flip", "flip"], name="trc")
def test_python_can_text_readers_survive_mutations(tmp_path_factory, seed, ops, name):
    src = (
        KONA / "bms_idle_log_30sec.asc"
        if name == "asc"
        else SHARED_CAN / "python_can_testdata" / "test_CanMessage_V2_1.trc"
    )
    if not src.exists():
        pytest.skip(f"{src} absent")
    rng = random.Random(seed)
    lines = src.read_text().splitlines(keepends=True)[:400]
    for op in ops:
        i = rng.randrange(len(lines))
        if op == "flip":
            ln = list(lines[i])
            if ln:
                ln[rng.randrange(len(ln))] = rng.choice(string.printable[:94])
            lines[i] = "".join(ln)
        elif op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        else:
            lines.insert(
                i, "".join(rng.choice(string.printable) for _ in range(rng.randrange(60))) + "\n"
            )
    path = tmp_path_factory.mktemp("m") / f"m.{name}"
    path.write_text("".join(lines))
    n, stats = _read_all(path)
    assert n == stats.frames


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.iterdir() if p.suffix != ".md"))
def test_corpus_of_nasty_files_reads_without_crashing(name):
    path = CORPUS / name
    try:
        n, stats = _read_all(path)
    except GatewayError as exc:  # refused as a whole with a one-line reason is fine too
        assert name == "binary_garbage.log" or "unknown" in str(exc), exc
        return
    assert n + stats.bad_lines > 0 or name == "binary_garbage.log"


def test_corpus_expectations():
    import can

    path = CORPUS / "truncated.candump.log"
    n, stats = _read_all(path)
    complete = path.read_text().count("\n")
    assert (n, stats.bad_lines) == (complete, 1)
    # CAN FD, error, remote and extended frames: the same frames python-can's reader sees
    path = CORPUS / "fd_error_remote.log"
    n, stats = _read_all(path)
    assert (n, stats.bad_lines) == (len(list(can.LogReader(str(path)))), 0)
    n, stats = _read_all(CORPUS / "gvret_nasty.csv")
    assert (n, stats.bad_lines) == (2, 4)
    n, stats = _read_all(CORPUS / "nasty.asc")
    assert (n, stats.bad_lines) == (3, 1)


def test_a_ten_megabyte_line_is_one_bad_line(tmp_path):
    p = tmp_path / "big.log"
    with open(p, "w") as fh:
        fh.write("(1.000000) can0 123#0011\n")
        fh.write("(1.100000) can0 123#" + "A" * (10 * 1024 * 1024) + "\n")
        fh.write("(1.200000) can0 124#2233\n")
    n, stats = _read_all(p)
    assert (n, stats.bad_lines) == (2, 1)


def test_timestamps_going_backwards_are_counted_late_not_crashing():
    dbcs = ChannelDbcs.from_specs([str(KONA / "kona_pcan.cantools.dbc")])
    dec = CantoolsDecoder(dbcs)
    agg = WindowAggregator(5.0)
    windows = []
    for b in iter_log(CORPUS / "time_backwards.log"):
        agg.add(dec.decode(b).series)
        windows += agg.advance(float(b.timestamp.max()))
    windows += agg.flush()
    # frames at t = 5, 6 and 2 arrive after t = 12 closed the windows before 10 s
    per_frame = len(dbcs.for_channel("can0")[0].get_message_by_frame_id(0x542).signals)
    assert agg.late_samples == 3 * per_frame
    assert [w.start for w in windows] == [10.0]
    assert windows[0].signals["BMS_542.SocDisp"].count == 5


# -- decoders -----------------------------------------------------------------------------
def _fixture_dbcs() -> list[Path]:
    paths = sorted(KONA.glob("*.cantools.dbc"))
    tesla = SHARED_CAN / "tesla_model3_dbc_only"
    paths += [
        tesla / n
        for n in (
            "Model3CAN.dbc",
            "opendbc_tesla_model3_party.dbc",
            "opendbc_tesla_model3_vehicle.dbc",
            "opendbc_tesla_powertrain.dbc",
            "opendbc_tesla_can.cantools.dbc",
        )
        if (tesla / n).exists()
    ]
    return paths


def _decoders(path: Path):
    dbcs = ChannelDbcs.from_specs([str(path)])
    out = [CantoolsDecoder(dbcs)]
    try:
        from gateway.canbus.fastdecode import VectorDecoder

        out.append(VectorDecoder(dbcs))
    except ImportError:
        pass
    return dbcs, out


@pytest.mark.parametrize("dbc", _fixture_dbcs(), ids=lambda p: p.name)
def test_decoders_never_raise_on_random_frames_for_every_message(dbc):
    dbcs, decoders = _decoders(dbc)
    db = dbcs.for_channel("can0")[0]
    rng = random.Random(dbc.name)
    b = FrameBatchBuilder()
    ids = [m.frame_id for m in db.messages] + [rng.randrange(0x800) for _ in range(20)]
    for i, fid in itertools.product(range(6), ids):
        n = rng.choice([0, 1, 3, 7, 8, 8, 8, 12, 64])
        b.add(
            float(i),
            "can0",
            fid,
            bytes(rng.randrange(256) for _ in range(n)),
            is_remote=rng.random() < 0.02,
            is_error=rng.random() < 0.02,
            is_fd=n > 8,
        )
    batch = b.build()
    for dec in decoders:
        st_ = dec.decode(batch).stats
        assert st_.frames == len(batch)
        assert st_.decoded + sum(st_.unknown_id.values()) + sum(
            st_.errors.values()
        ) + st_.skipped_special == len(batch)


# -- policy, guard, settings --------------------------------------------------------------
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(
    raw=st.dictionaries(
        st.sampled_from(["policy", "signal", "trips", "other"]), _values, max_size=3
    )
)
def test_policy_parser_raises_only_config_errors(raw):
    try:
        parse_policy(raw, "fuzz.toml")
    except ConfigError:
        pass
    except (TypeError, AttributeError, ValueError) as exc:  # pragma: no cover - a finding
        raise AssertionError(f"policy parser crashed on {raw!r}: {exc!r}") from exc


_guard_values = st.recursive(
    st.one_of(
        _scalars,
        st.binary(max_size=16),
        st.builds(lambda n: np.zeros(n, np.uint8), st.integers(0, 8)),
        st.floats(allow_infinity=True, allow_nan=True),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=80),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4),
    ),
    max_leaves=20,
)


@FUZZ
@given(
    schema=st.sampled_from(sorted(SCHEMAS) + ["gateway.raw", ""]),
    body=st.dictionaries(st.text(max_size=10), _guard_values, max_size=5),
    rules=st.lists(st.text(max_size=20), max_size=3),
)
def test_guard_never_raises_and_only_releases_plain_declared_payloads(schema, body, rules):
    seq = itertools.count()
    g = EgressGuard(
        load_policy(None),
        Topics("vehicles", "V"),
        consent_ok=lambda c: True,
        consent_snapshot=lambda: {},
        next_seq=lambda: next(seq),
    )
    msg = g.release(Outgoing(schema, body, tuple(rules)))
    if msg is None:
        assert g.blocked == 1
        return
    decoded = unpack(msg.payload)
    assert decoded["schema"] in SCHEMAS
    assert set(decoded) - set(HEADER_FIELDS) <= set(SCHEMAS[decoded["schema"]].fields)

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, bool | int | float | str)

    assert plain(decoded)


@FUZZ
@given(
    raw=st.dictionaries(
        st.sampled_from(["gateway", "broker", "replay", "can", "camera", "dbc", "x"]),
        _values,
        max_size=4,
    )
)
def test_settings_loader_raises_only_config_errors(tmp_path_factory, raw):
    import tomllib

    from gateway import settings as settings_mod

    path = tmp_path_factory.mktemp("cfg") / "g.toml"
    path.write_text("")
    orig = tomllib.load
    try:
        settings_mod.tomllib.load = lambda fh: raw  # type: ignore[assignment]
        settings_mod.load(path, env={})
    except ConfigError:
        pass
    finally:
        settings_mod.tomllib.load = orig  # type: ignore[assignment]
