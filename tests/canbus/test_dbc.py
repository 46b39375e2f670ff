"""DBC loading: strict first, then strict=False, then the missing-section repair; else a
one-line DbcError naming the file."""

from __future__ import annotations

import logging
import os
import time

import pytest

from gateway import cachedir
from gateway.canbus import dbc as dbc_module
from gateway.canbus.dbc import ChannelDbcs, load_dbc
from gateway.errors import DbcError
from tests.conftest import KONA, SHARED_CAN


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Each file is parsed and warned about once per process; these tests watch the warning."""
    dbc_module._forget()


def test_original_kona_dbc_without_bs_bu_sections_loads_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        db = load_dbc(KONA / "kona_pcan.dbc")
    assert len(db.messages) == 107
    assert "BS_:/BU_:" in caplog.text
    ref = load_dbc(KONA / "kona_pcan.cantools.dbc")
    assert [m.name for m in db.messages] == [m.name for m in ref.messages]


def test_model3_dbc_needs_strict_false_and_says_so(caplog):
    path = SHARED_CAN / "tesla_model3_dbc_only" / "Model3CAN.dbc"
    if not path.exists():
        pytest.skip("shared Tesla DBC absent")
    with caplog.at_level(logging.WARNING):
        db = load_dbc(path)
    assert "strict=False" in caplog.text
    assert db.get_message_by_frame_id(0x405).is_multiplexed()


def test_garbage_dbc_raises_dbc_error_naming_the_file(tmp_path):
    p = tmp_path / "garbage.dbc"
    p.write_bytes(b"\x00\xff not a dbc \x01")
    with pytest.raises(DbcError, match="garbage.dbc"):
        load_dbc(p)


_NO_SECTIONS = (  # a hand-written DBC as real ones often are: no BS_:/BU_: sections
    'VERSION ""\n'  # line 1
    "\n"
    "NS_ :\n"
    "\n"
    "BO_ 100 Speed: 8 ECU\n"  # line 5
    ' SG_ kph : 0|16@1+ (0.1,0) [0|300] "km/h" XXX\n'
    ' SG_ gear : 16|8@1+ (1,0) [0|3] "" XXX\n'
    "\n"
    "BO_ 200 Doors: 8 ECU\n"  # line 9
    ' SG_ open : 0|8@1+ (1,0) [0|255] "" XXX\n'
    "\n"
)


def test_a_syntax_error_is_said_at_the_files_own_line_after_the_sections_are_added(tmp_path):
    # GIVEN a DBC without BS_:/BU_: (the repair adds 4 lines) and a typo on its line 10
    p = tmp_path / "typo.dbc"
    p.write_text(_NO_SECTIONS.replace("0|8@1+", "0|8@1x"))
    # THEN the error names line 10 of the file, not the missing sections at line 5
    with pytest.raises(DbcError, match=r"typo\.dbc: .* at line 10, column") as err:
        load_dbc(p)
    assert "SG_ open" in str(err.value)


def test_value_tables_of_signals_it_does_not_define_are_left_out_with_a_warning(tmp_path, caplog):
    # GIVEN a DBC cantools refuses for a VAL_ (over two lines) and a SIG_VALTYPE_ of signals
    # no message has, as opendbc's tesla_can.dbc does, beside a VAL_ that is used
    p = tmp_path / "dangling.dbc"
    p.write_text(
        _NO_SECTIONS
        + 'VAL_ 100 gear 0 "P" 1 "R" 2 "N" 3 "D" ;\n'
        + 'VAL_ 100 limit 0 "NONE"\n 1 "SLOW" ;\n'
        + "SIG_VALTYPE_ 200 torque : 1;\n"
    )
    with caplog.at_level(logging.WARNING):
        db = load_dbc(p)
    # THEN it loads, says what it left out, and keeps the value table that is used
    assert "left out 2 VAL_/SIG_VALTYPE_" in caplog.text
    assert "VAL_ 100 limit" in caplog.text and "SIG_VALTYPE_ 200 torque" in caplog.text
    decoded = db.decode_message(100, bytes([10, 0, 3, 0, 0, 0, 0, 0]))
    assert str(decoded["gear"]) == "D" and decoded["kph"] == 1.0


def test_a_dbc_naming_an_attribute_it_never_defines_is_said_so(tmp_path):
    p = tmp_path / "attr.dbc"
    p.write_text('VERSION ""\nBS_:\nBU_: E\nBO_ 100 X: 8 E\n SG_ a : 0|8@1+ (1,0) [0|0] "" E\n'
                 'BA_ "Foo" BO_ 100 3;\n')  # fmt: skip
    with pytest.raises(DbcError, match=r"attr\.dbc: .*refers to 'Foo', which it does not define"):
        load_dbc(p)


@pytest.mark.parametrize("form", ["UTF-16", "binary"])
def test_a_dbc_that_is_no_text_is_said_so_in_a_short_line(tmp_path, form):
    p = tmp_path / "odd.dbc"
    if form == "UTF-16":
        p.write_bytes(_NO_SECTIONS.encode("utf-16"))
    else:
        p.write_bytes(bytes(range(1, 256)) * 40)  # no NUL byte in it
    with pytest.raises(DbcError) as err:
        load_dbc(p)
    assert str(err.value) == (
        f"{p}: not a DBC: binary data, or text saved as UTF-16 (save it as UTF-8 or cp1252 text)"
    )


@pytest.mark.parametrize("content", [b"", b"\n \r\n\t", b"\xef\xbb\xbf\n"])
def test_an_empty_dbc_is_said_to_be_empty(tmp_path, content):
    # it was "Invalid syntax at line 2, column 1" (a file of 0 bytes has no line 2)
    p = tmp_path / "empty.dbc"
    p.write_bytes(content)
    with pytest.raises(DbcError) as err:
        load_dbc(p)
    assert str(err.value) == f"{p}: the DBC is empty ({len(content)} bytes, no message in it)"


def test_channel_specs_map_channels_and_wildcard():
    d = ChannelDbcs.from_specs(
        [f"can1={KONA / 'kona_ccan.cantools.dbc'}", str(KONA / "kona_pcan.cantools.dbc")]
    )
    assert len(d.for_channel("can1")[0].messages) == 2
    assert len(d.for_channel("can7")[0].messages) == 107


def _entries(root):
    return sorted((root / "dbc").glob("*.pickle")) if (root / "dbc").is_dir() else []


def test_parsed_dbc_is_cached_on_disk_and_warns_again_when_read_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING):
        first = load_dbc(KONA / "kona_pcan.dbc")
    entries = _entries(tmp_path / "cache")
    assert len(entries) == 1
    assert entries[0].stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cache" / "dbc").stat().st_mode & 0o777 == 0o700
    dbc_module._forget()
    caplog.clear()
    parsed = []
    monkeypatch.setattr(dbc_module, "_parse", lambda *a: parsed.append(a) or None)
    with caplog.at_level(logging.WARNING):
        again = load_dbc(KONA / "kona_pcan.dbc")
    assert parsed == [], "the second load must come from the cache"
    assert "BS_:/BU_:" in caplog.text  # the repair is still reported
    assert [m.name for m in again.messages] == [m.name for m in first.messages]
    frame = bytes(range(8))
    for m in first.messages[:20]:
        data = frame[: m.length]
        assert again.get_message_by_name(m.name).decode(data, allow_truncated=True) == m.decode(
            data, allow_truncated=True
        )


def test_cache_entry_others_can_write_or_that_is_damaged_is_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    load_dbc(KONA / "kona_ccan.cantools.dbc")
    (entry,) = _entries(tmp_path / "cache")
    real = dbc_module._parse
    calls = []

    def counting(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(dbc_module, "_parse", counting)
    os.chmod(entry, 0o666)  # group/world-writable: someone else could have put a pickle here
    dbc_module._forget()
    assert len(load_dbc(KONA / "kona_ccan.cantools.dbc").messages) > 0
    assert len(calls) == 1
    entry.write_bytes(b"not a pickle")
    os.chmod(entry, 0o600)
    dbc_module._forget()
    assert len(load_dbc(KONA / "kona_ccan.cantools.dbc").messages) > 0
    assert len(calls) == 2
    hit = dbc_module._cache_get(entry)  # rewritten with the good parse
    assert hit is not None and hit[0].messages


def test_a_cache_entry_reached_through_a_link_is_not_loaded(tmp_path, monkeypatch):
    # a folder (or entry) swapped for a symbolic link after it was checked would be followed
    # by an open of the path: entries are opened inside their folder's descriptor, unfollowed
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    dbc_module.load_plans(KONA / "kona_ccan.cantools.dbc")
    (plans,) = sorted((tmp_path / "cache" / "dbc").glob("*.plans"))
    (model,) = _entries(tmp_path / "cache")
    assert dbc_module._plans_get(plans) is not None and dbc_module._cache_get(model) is not None
    other = tmp_path / "other"
    other.symlink_to(plans.parent, target_is_directory=True)
    assert dbc_module._plans_get(other / plans.name) is None
    assert dbc_module._cache_get(other / model.name) is None
    (plans.parent / "link.plans").symlink_to(plans)
    assert dbc_module._plans_get(plans.parent / "link.plans") is None


def test_a_plans_entry_others_can_write_or_that_is_damaged_is_compiled_again(tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    path = KONA / "kona_ccan.cantools.dbc"
    first = dbc_module.load_plans(path)
    (entry,) = sorted((tmp_path / "cache" / "dbc").glob("*.plans"))
    assert entry.stat().st_mode & 0o777 == 0o600

    def again() -> int:
        """Load the plans as a new process would; the entry's inode (a rewrite makes a new
        file: mkstemp, then rename)."""
        dbc_module._plans_cached.cache_clear()
        assert dbc_module.load_plans(path).names == first.names
        return entry.stat().st_ino

    ino = entry.stat().st_ino
    assert again() == ino  # read from the cache
    os.chmod(entry, 0o666)  # others could have written it: not trusted, compiled again
    assert again() != ino
    ino = entry.stat().st_ino
    assert entry.stat().st_mode & 0o777 == 0o600
    entry.write_bytes(b"not a pickle")
    assert again() != ino
    assert dbc_module._plans_get(entry) is not None  # rewritten


def test_a_dbc_is_compiled_in_a_child_and_said_about_once(tmp_path, monkeypatch, caplog):
    """On a cache miss the DBC is parsed and compiled by a forked child that fills the cache;
    its warnings are said here, once. Where no child can do it, it is done here."""
    from gateway.canbus import parseproc

    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = parseproc.in_child
    monkeypatch.setattr(parseproc, "in_child", lambda *a: calls.append(1) or real(*a))
    with caplog.at_level(logging.WARNING):
        plans = dbc_module.load_plans(KONA / "kona_pcan.dbc")
    assert calls == [1] and plans.names
    assert dbc_module._load_cached.cache_info().currsize == 0  # the model never came here
    assert caplog.text.count("BS_:/BU_:") == 1
    assert sorted(p.suffix for p in (tmp_path / "cache" / "dbc").iterdir()) == [".pickle", ".plans"]
    dbc_module._forget()
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "other"))
    monkeypatch.setattr(parseproc, "in_child", lambda *a: None)  # no child could be made
    again = dbc_module.load_plans(KONA / "kona_pcan.dbc")
    assert again.names == plans.names and again.needs_model is False
    assert sorted(p.suffix for p in (tmp_path / "other" / "dbc").iterdir()) == [".pickle", ".plans"]


def test_an_unwritable_cache_makes_no_child_parse_in_vain(tmp_path, monkeypatch):
    from gateway.canbus import parseproc

    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "dbc").mkdir(parents=True, mode=0o700)
    monkeypatch.setattr(dbc_module.os, "access", lambda *a: False)  # as if read-only
    calls = []
    monkeypatch.setattr(parseproc, "in_child", lambda *a: calls.append(1))
    assert dbc_module.load_plans(KONA / "kona_ccan.cantools.dbc").names
    assert calls == []


def test_cache_off(tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAY_CACHE_DIR", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    load_dbc(KONA / "kona_ccan.cantools.dbc")
    assert dbc_module.cache_dir() is None
    assert not any(tmp_path.rglob("*.pickle"))


def test_a_cache_that_cannot_be_written_or_found_never_stops_a_load(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(afile))
    assert load_dbc(KONA / "kona_ccan.cantools.dbc").messages
    shared = tmp_path / "shared"
    (shared / "dbc").mkdir(parents=True)
    os.chmod(shared / "dbc", 0o777)  # others may write here: no pickle is written into it
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(shared))
    dbc_module._forget()
    assert load_dbc(KONA / "kona_ccan.cantools.dbc").messages
    assert list(shared.rglob("*")) == [shared / "dbc"]
    monkeypatch.delenv("GATEWAY_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(dbc_module.Path, "home", staticmethod(no_home))
    assert dbc_module.cache_dir() is None
    dbc_module._forget()
    assert load_dbc(KONA / "kona_ccan.cantools.dbc").messages


DUP_DBC = (
    'VERSION ""\n\nNS_ :\n\nBS_:\n\nBU_: ECU\n\n'
    'BO_ 256 MsgA: 8 ECU\n SG_ A : 0|8@1+ (1,0) [0|255] "" ECU\n\n'
    'BO_ 256 MsgB: 8 ECU\n SG_ B : 0|8@1+ (1,0) [0|255] "" ECU\n'
)


@pytest.mark.parametrize("load", ["model", "plans"])
def test_cantools_own_warnings_are_said_again_from_the_cache(tmp_path, monkeypatch, caplog, load):
    """cantools logs some problems itself while it parses (a message that overwrites another):
    they are kept in the cache entry (cantools' model, or the plans a child compiles) and said
    again, once, on every run."""
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    dup = tmp_path / "dup.dbc"
    dup.write_text(DUP_DBC)
    loader = load_dbc if load == "model" else dbc_module.load_plans
    for _ in range(2):  # parsed, then read from the cache
        dbc_module._forget()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            loader(dup)
        assert caplog.text.count("identical masked frame ids") == 1 and "dup.dbc" in caplog.text
    assert len(_entries(tmp_path / "cache")) == 1


@pytest.mark.parametrize(
    "path",
    sorted((KONA.parent).rglob("*.dbc")),
    ids=lambda p: p.name,
)
@pytest.mark.parametrize("source", ["parsed", "from the cache"])
def test_the_slimmed_model_decodes_and_describes_every_signal_as_cantools_does(
    path, source, tmp_path, monkeypatch
):
    """load_dbc drops DBC attributes and comments (memory); everything the gateway reads from a
    message or a signal stays as cantools' own, non-strict load of the file has it, whether
    parsed or read back from the cache (stored a message at a time)."""
    import cantools
    import numpy as np

    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    ours = load_dbc(path)
    if source == "from the cache":
        dbc_module._forget()
        monkeypatch.setattr(dbc_module, "_parse", None)  # a parse would fail
        ours = load_dbc(path)
    try:
        ref = cantools.database.load_file(str(path), strict=False)
    except Exception:  # noqa: BLE001 - a file only the repairs can load
        lines = list(enumerate(path.read_bytes().decode("cp1252").splitlines(), start=1))
        repaired = dbc_module._add_missing_sections(lines) or []
        ref = cantools.database.load_string("\n".join(ln for _, ln in repaired), strict=False)
    assert [m.name for m in ours.messages] == [m.name for m in ref.messages]
    for m, r in zip(ours.messages, ref.messages, strict=True):  # the lookups find the same
        by_name = ours.get_message_by_name(m.name)
        assert by_name.name == ref.get_message_by_name(r.name).name
        got = ours.get_message_by_frame_id(m.frame_id)
        assert got.name == ref.get_message_by_frame_id(r.frame_id).name
        # ... among the database's own messages, not copies of them
        assert any(by_name is x for x in ours.messages) and any(got is x for x in ours.messages)
    rng = np.random.default_rng(7)
    for a, b in zip(ours.messages, ref.messages, strict=True):
        assert (a.frame_id, a.is_extended_frame, a.length, a.cycle_time, a.senders) == (
            b.frame_id,
            b.is_extended_frame,
            b.length,
            b.cycle_time,
            b.senders,
        )
        assert a.dbc is None and all(s.dbc is None and s.comments is None for s in a.signals)
        for sa, sb in zip(a.signals, b.signals, strict=True):
            keys = ("name", "start", "length", "byte_order", "is_signed", "scale", "offset")
            keys += ("minimum", "maximum", "unit", "choices", "is_multiplexer", "multiplexer_ids")
            assert [getattr(sa, k) for k in keys] == [getattr(sb, k) for k in keys]
        for data in rng.integers(0, 256, (20, max(a.length, 1)), dtype=np.uint8):
            got, want = _decoded(a, bytes(data)), _decoded(b, bytes(data))
            assert got == want, (path.name, a.name)


def _decoded(msg, data: bytes):
    try:
        return msg.decode(data, decode_choices=True, allow_truncated=True)
    except Exception as exc:  # noqa: BLE001 - the same failure on both sides is equal too
        return type(exc).__name__


def _warm(tmp_path, monkeypatch, path):
    """The plans and the model of ``path`` in a cache of this test; then a "new process"."""
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    ChannelDbcs.from_specs([str(path)])
    dbc_module._forget()


def test_load_notes_are_said_once_whether_plans_model_or_both_are_loaded(
    tmp_path, monkeypatch, caplog
):
    path = tmp_path / "kona_pcan.dbc"  # the original: loaded after adding BS_:/BU_:
    path.write_bytes((KONA / "kona_pcan.dbc").read_bytes())
    _warm(tmp_path, monkeypatch, path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        dbcs = ChannelDbcs.from_specs([str(path)])
        assert dbcs.for_channel("can0")[0].messages  # the model, loaded now
        load_dbc(path)
    assert caplog.text.count("BS_:/BU_:") == 1


def test_a_dbc_changed_after_start_is_never_mixed_with_the_plans_read_at_start(
    tmp_path, monkeypatch
):
    path = tmp_path / "ccan.dbc"
    text = (KONA / "kona_ccan.cantools.dbc").read_text()
    path.write_text(text)
    _warm(tmp_path, monkeypatch, path)
    dbcs = ChannelDbcs.from_specs([str(path)])  # plans from the cache; no model needed
    path.write_text(text.replace("BO_ ", "BO_  "))  # edited while the gateway runs
    with pytest.raises(DbcError, match="changed or removed since the gateway read it"):
        dbcs.for_channel("can0")
    path.unlink()
    with pytest.raises(DbcError, match="ccan.dbc"):
        dbcs.for_channel("can0")


def test_plans_that_need_cantools_model_load_it_at_start(tmp_path, monkeypatch):
    """A DBC with messages cantools decodes itself: its model is loaded with the plans, so a
    later change of the file cannot reach a running decoder."""
    from gateway.canbus import signalplan
    from gateway.canbus.fastdecode import VectorDecoder
    from gateway.records import FrameBatchBuilder

    path = tmp_path / "ccan.dbc"
    path.write_text((KONA / "kona_ccan.cantools.dbc").read_text())
    with monkeypatch.context() as m:  # every plan: "cantools decodes this message"
        m.setattr(signalplan, "_layout_ok", lambda signals, length: False)
        _warm(tmp_path, monkeypatch, path)
    dbcs = ChannelDbcs.from_specs([str(path)])
    path.unlink()
    db = load_dbc(KONA / "kona_ccan.cantools.dbc")  # the same messages
    b = FrameBatchBuilder()
    for i, msg in enumerate(db.messages):
        b.add(float(i), "can0", msg.frame_id, bytes(range(msg.length)))
    got = VectorDecoder(dbcs).decode(b.build())
    assert got.stats.decoded == len(db.messages) and got.series


def test_a_damaged_plan_inside_a_readable_entry_is_built_again():
    import pickle

    from gateway.canbus.signalplan import DbcPlans

    db = load_dbc(KONA / "kona_ccan.cantools.dbc")
    state = pickle.loads(pickle.dumps(DbcPlans.of(db, build=True)))
    state.plans[0] = b"not a pickle"
    state.database = lambda: db
    assert state.plan(0) == DbcPlans.of(db).plan(0)


def test_policy_signals_in_no_dbc_are_found_and_said(caplog):
    import logging

    from gateway.app import say_missing
    from gateway.canbus.dbc import ChannelDbcs
    from gateway.telemetry.policy import parse_policy
    from tests.conftest import KONA_PCAN

    def policy(*signals):
        return parse_policy({"signal": [{"signal": s} for s in signals]}, "p.toml")

    dbcs = ChannelDbcs.from_specs({"can0": str(KONA_PCAN)})
    wanted = {"BMS_542.SocDisp", "BMS_542.SocDsip", "NoSuchMessage.X"}
    # a typo in a signal, and a message the DBC lacks; the real one is found
    assert dbcs.missing(wanted) == ["BMS_542.SocDsip", "NoSuchMessage.X"]
    with caplog.at_level(logging.INFO, logger="gateway"):
        say_missing(policy(*sorted(wanted)), dbcs)
        said = [r.levelno for r in caplog.records if "policy:" in r.getMessage()]
        # the typo (its message is in the DBC): a warning; another vehicle's signal: with -v
        assert said == [logging.WARNING, logging.INFO]
        before = len(caplog.records)
        say_missing(policy("A.b", "C.d"), dbcs)  # none defined: a warning
        assert [r.levelno for r in caplog.records[before:]][-1] == logging.WARNING


def _aged(path, days):
    t = path.stat().st_mtime - days * 86400
    os.utime(path, (t, t))


def test_entries_unused_for_a_month_go_when_a_new_one_is_written(tmp_path, monkeypatch):
    # GIVEN a cache holding entries of earlier versions, some used lately, and a link and a
    # file of somebody else's kind that are not entries
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "dbc"
    folder.mkdir(parents=True, mode=0o700)
    old, lately = folder / ("a" * 64 + ".pickle"), folder / ("b" * 64 + ".plans")
    for p in (old, lately, folder / "notes.txt"):
        p.write_bytes(b"x" * 1000)
    _aged(old, cachedir.UNUSED_DAYS + 1)
    _aged(lately, cachedir.UNUSED_DAYS - 1)
    _aged(folder / "notes.txt", 400)
    (folder / ("c" * 64 + ".pickle")).symlink_to(old)
    torn = folder / ".x.pickle.0123.tmp"  # left by a process killed while it wrote
    torn.write_bytes(b"x")
    _aged(torn, 1)
    # WHEN a DBC not yet in it is loaded
    load_dbc(KONA / "kona_ccan.cantools.dbc")
    # THEN the entry unused for a month and the torn write are gone, the rest is kept
    names = {p.name for p in folder.iterdir()}
    assert old.name not in names and torn.name not in names
    assert {lately.name, "notes.txt", "c" * 64 + ".pickle"} <= names
    assert len([p for p in _entries(tmp_path / "cache") if not p.is_symlink()]) == 1  # the new


def test_the_least_recently_used_entries_go_when_the_folder_is_over_its_size(tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "dbc"
    folder.mkdir(parents=True, mode=0o700)
    ages = {f"{i:064x}.pickle": i for i in range(1, 6)}  # days since each was last used
    for name, days in ages.items():
        (folder / name).write_bytes(b"x" * 100_000)
        _aged(folder / name, days)
    path = KONA / "kona_ccan.cantools.dbc"
    load_dbc(path)
    (new,) = set(_entries(tmp_path / "cache")) - {folder / n for n in ages}
    # a cap for 2.5 old entries besides the new one: the 3 least recently used go at the next write
    monkeypatch.setattr("gateway.cachedir.FOLDER_BYTES", new.stat().st_size + 250_000)
    new.unlink()
    dbc_module._forget()
    load_dbc(path)
    left = {p.name for p in folder.iterdir()} & set(ages)  # (a real key may begin with 0 too)
    assert left == {f"{1:064x}.pickle", f"{2:064x}.pickle"}
    assert new.exists()


def test_an_entry_read_is_marked_used_at_most_once_a_day(tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    path = KONA / "kona_ccan.cantools.dbc"
    load_dbc(path)
    (entry,) = _entries(tmp_path / "cache")
    _aged(entry, 0.5)
    half_a_day = entry.stat().st_mtime
    dbc_module._forget()
    load_dbc(path)
    assert entry.stat().st_mtime == half_a_day  # (an SD card is not written at every start)
    _aged(entry, 40)
    dbc_module._forget()
    load_dbc(path)
    assert time.time() - entry.stat().st_mtime < 60  # used: kept by the next pruning


def test_a_cache_folder_that_cannot_be_listed_is_not_pruned_and_the_load_goes_on(
    tmp_path, monkeypatch
):
    # (out of file descriptors, say: scandir opens one of its own)
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))

    def refuse(*a, **k):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(cachedir.os, "scandir", refuse)
    assert len(load_dbc(KONA / "kona_ccan.cantools.dbc").messages) > 0
    monkeypatch.undo()
    assert len(_entries(tmp_path / "cache")) == 1  # written, not pruned


def test_the_model_is_kept_while_the_plans_of_the_same_dbc_are_used(tmp_path, monkeypatch):
    # A replay reads only the vector decoder's plans (and marks them used); cantools' model of
    # the same DBC, read by `--decoder cantools`, must not age out beside them.
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "dbc"
    folder.mkdir(parents=True, mode=0o700)
    key, gone = "d" * 64, "e" * 64
    for name in (key + ".pickle", key + ".plans", gone + ".pickle", gone + ".plans"):
        (folder / name).write_bytes(b"x" * 1000)
        _aged(folder / name, cachedir.UNUSED_DAYS + 5)
    _aged(folder / (key + ".plans"), -(cachedir.UNUSED_DAYS + 4))  # used a day ago
    load_dbc(KONA / "kona_ccan.cantools.dbc")  # writes an entry: the folder is pruned
    names = {p.name for p in folder.iterdir()}
    assert {key + ".pickle", key + ".plans"} <= names
    assert not {gone + ".pickle", gone + ".plans"} & names
