"""The ledger chain: verifies when clean, names the first bad line on any tampering."""

from __future__ import annotations

import io
import json

import pytest

from gateway.audit import verify_ledger
from gateway.egress.ledger import Ledger, verify_chain
from gateway.errors import AuditError, StorageError
from gateway.telemetry.policy import load_policy


@pytest.fixture
def ledger_file(tmp_path):
    path = tmp_path / "ledger.jsonl"
    led = Ledger(path, fsync=False)
    p = load_policy(None)
    led.append(
        "start",
        gateway="t",
        vin="V",
        policy=p.ident,
        policy_sha256=p.digest,
        policy_source=p.source,
    )
    for i in range(5):
        led.append(
            "egress",
            topic="vehicles/V/owner/signals",
            seq=i,
            schema="gateway.signals",
            sha256="ab" * 32,
            bytes=100,
            rules=["signal:BMS_542.SocDisp"],
            consent={},
        )
    led.append("blocked", schema="gateway.signals", reason="test", rules=[])
    led.close()
    return path


def test_a_clean_ledger_verifies_and_is_rechecked_against_its_policy(ledger_file):
    result = verify_ledger(ledger_file)
    assert result.entries == 7 and result.rechecked == 5
    assert "ledger OK" in result.summary()


def test_reopening_continues_the_chain(ledger_file):
    led = Ledger(ledger_file, fsync=False)
    led.append("event", note="again")
    led.close()
    assert verify_chain(ledger_file).entries == 8


def _lines(p):
    return p.read_text().splitlines(keepends=True)


def test_a_changed_byte_is_caught_at_its_line(ledger_file):
    lines = _lines(ledger_file)
    lines[3] = lines[3].replace('"seq":2', '"seq":9')
    ledger_file.write_text("".join(lines))
    with pytest.raises(AuditError, match=r":4: content does not match"):
        verify_chain(ledger_file)


def test_a_removed_line_is_caught(ledger_file):
    lines = _lines(ledger_file)
    del lines[2]
    ledger_file.write_text("".join(lines))
    with pytest.raises(AuditError, match=r":3: entry number"):
        verify_chain(ledger_file)


def test_reordered_lines_are_caught(ledger_file):
    lines = _lines(ledger_file)
    lines[2], lines[3] = lines[3], lines[2]
    ledger_file.write_text("".join(lines))
    with pytest.raises(AuditError, match=r":3:"):
        verify_chain(ledger_file)


def test_a_rehashed_forgery_that_breaks_the_chain_is_caught(ledger_file):
    lines = _lines(ledger_file)
    entry = json.loads(lines[4])
    entry["seq"] = 99
    from gateway.egress.ledger import entry_hash

    entry["hash"] = entry_hash(entry["prev"], entry)
    lines[4] = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    ledger_file.write_text("".join(lines))
    with pytest.raises(AuditError, match=r":6: does not chain"):
        verify_chain(ledger_file)


def test_egress_under_a_rule_the_policy_lacks_fails_the_recheck(tmp_path):
    path = tmp_path / "l.jsonl"
    led = Ledger(path, fsync=False)
    p = load_policy(None)
    led.append("start", policy=p.ident, policy_sha256=p.digest)
    led.append("egress", schema="gateway.signals", rules=["signal:Secret.Thing"], consent={})
    led.close()
    with pytest.raises(AuditError, match=r":2: .*Secret.Thing"):
        verify_ledger(path)


def test_location_egress_without_consent_fails_the_recheck(tmp_path):
    path = tmp_path / "l.jsonl"
    led = Ledger(path, fsync=False, clock=lambda: 1000.0)
    p = load_policy(None)
    led.append("start", policy=p.ident, policy_sha256=p.digest)
    led.append(
        "egress",
        schema="gateway.location",
        rules=["signal:ID04FGPSLatLong.GPSLatitude04F"],
        consent={"location": 999.0},
    )
    led.close()
    with pytest.raises(AuditError, match="without valid consent"):
        verify_ledger(path)


def test_a_torn_last_line_from_a_power_cut_is_cut_off_and_recorded(ledger_file):
    with open(ledger_file, "ab") as fh:
        fh.write(b'{"i":7,"at":1.0,"kind":"egr')
    led = Ledger(ledger_file, fsync=False)
    led.close()
    report = verify_chain(ledger_file)
    assert report.entries == 8 and report.kinds["recovered"] == 1


@pytest.mark.parametrize(
    "damage",
    [
        bytes(range(256)) * 78 + b"\x00\x01",  # not a ledger at all, no newline at its end
        b'{"i":7,"at":1.0,"kind":"egress"}\n{"i":8,"at"',  # a bad entry before the torn one
    ],
)
def test_a_damaged_ledger_is_refused_untouched_not_cut(tmp_path, ledger_file, damage):
    """Only a torn write after a good entry is cut off (and the cut recorded): anything else
    is evidence for the user to examine, refused as it is (it was cut, then refused, so the
    cut went unrecorded)."""
    path = tmp_path / "damaged.jsonl"
    path.write_bytes(ledger_file.read_bytes() + damage if b"{" in damage[:1] else damage)
    before = path.read_bytes()
    with pytest.raises(StorageError, match="damaged"):
        Ledger(path, fsync=False)
    assert path.read_bytes() == before


def test_a_group_fsyncs_its_lines_once_when_it_ends(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr("gateway.egress.ledger.os.fsync", lambda fd: synced.append(fd))
    led = Ledger(tmp_path / "l.jsonl")
    led.append("event", note="alone")
    assert len(synced) == 1  # outside a group, every line is synced at once
    with led.group():
        for i in range(5):
            led.append("event", note=i)
            assert not led.durable
        with led.group():  # a nested group ends with its outer one
            led.append("event", note="inner")
        assert len(synced) == 1
    assert len(synced) == 2 and led.durable
    assert verify_chain(tmp_path / "l.jsonl").entries == 7
    # an exception inside still syncs what was written, and goes on
    with pytest.raises(RuntimeError), led.group():
        led.append("event", note="before the error")
        raise RuntimeError("boom")
    assert len(synced) == 3 and led.durable
    led.close()


def test_a_group_whose_sync_fails_is_not_durable_and_says_so(tmp_path, monkeypatch):
    led = Ledger(tmp_path / "l.jsonl")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gateway.egress.ledger.os.fsync", full)
    with pytest.raises(StorageError, match="l.jsonl: cannot append.*No space"), led.group():
        led.append("event", note="x")
    assert not led.durable
    led.close()


class _FailingWrites(io.FileIO):
    """A ledger file whose next ``fail`` writes run out of space after half their bytes."""

    fail = 0

    def write(self, b):
        if _FailingWrites.fail:
            _FailingWrites.fail -= 1
            super().write(bytes(b)[: len(b) // 2])
            raise OSError(28, "No space left on device")
        return super().write(b)


def test_a_group_that_cannot_be_written_leaves_the_file_and_chain_as_before(tmp_path):
    path = tmp_path / "l.jsonl"
    led = Ledger(path, fsync=False)
    led.append("event", note="before")
    size = path.stat().st_size
    led._fh.close()
    led._fh = _FailingWrites(str(path), "ab")
    _FailingWrites.fail = 1
    with pytest.raises(StorageError, match="No space"), led.group():
        for i in range(300):  # more than any buffer: the group is written once, at its end
            led.append("egress", seq=i)
    assert not led.durable and path.stat().st_size == size  # the half-written bytes are cut
    assert led.count == 1 and led.max_seq == -1
    led.append("event", note="after")  # chains to the last line on the disk
    assert led.durable
    led.close()
    assert verify_chain(path).entries == 2


def test_reopening_finds_the_highest_seq_from_the_end(tmp_path):
    """The newest entry with a seq holds the highest (seqs only grow); entries without one
    (stop, start, blocked, a nested "seq" that is not the entry's) are passed over."""
    from gateway.egress import ledger as ledger_mod

    path = tmp_path / "l.jsonl"
    led = Ledger(path, fsync=False)
    assert led.max_seq == -1
    for i in range(40):
        led.append("egress", seq=i, schema="gateway.signals")
    led.append("blocked", schema="gateway.signals", reason="test", rules=[])
    led.append("event", detail={"seq": 999})  # not a top-level seq
    led.append("stop", reason="stopped")
    led.close()
    again = Ledger(path, fsync=False)
    assert again.max_seq == 39
    again.append("start", gateway="t")
    again.close()
    third = Ledger(path, fsync=False)
    third.close()
    assert third.max_seq == 39
    # read back a block at a time: every line, last first, whatever the block size
    data = path.read_bytes()
    for block in (7, 100, 1 << 16):
        with open(path, "rb") as fh:
            got = list(ledger_mod._lines_backwards(fh, len(data), block))
        assert got == data.split(b"\n")[::-1]


def test_the_highest_seq_is_found_behind_a_mebibyte_of_entries_without_one(tmp_path):
    path = tmp_path / "l.jsonl"
    led = Ledger(path, fsync=False)
    led.append("egress", seq=50, schema="gateway.signals")
    for _ in range(6000):  # ~1.3 MB of entries without a seq
        led.append("blocked", schema="gateway.signals", reason="test", rules=[])
    led.close()
    assert path.stat().st_size > 1 << 20
    again = Ledger(path, fsync=False)
    again.close()
    assert again.max_seq == 50


def test_a_last_entry_longer_than_any_read_block_reopens(tmp_path):
    """A ``dropped`` entry lists every message it drops: 2,000 of them make a 150 KB line,
    longer than the blocks the ledger reads its tail in. The ledger must still open after it
    and chain to it."""
    path = tmp_path / "l.jsonl"
    led = Ledger(path, fsync=False)
    led.append("egress", seq=1, schema="gateway.signals")
    led.append("dropped", reason="full", seqs=list(range(2000)), sha256=["ab" * 32] * 2000)
    led.close()
    assert path.read_bytes().splitlines()[-1].__len__() > 1 << 17
    again = Ledger(path, fsync=False)
    assert again.count == 2 and again.max_seq == 1
    again.append("start", gateway="t")
    again.close()
    assert verify_chain(path).entries == 3


def test_a_torn_line_longer_than_a_mebibyte_cuts_only_itself(ledger_file):
    before = verify_chain(ledger_file).entries
    with open(ledger_file, "ab") as fh:
        fh.write(b'{"i":7,"kind":"dropped","seqs":[' + b"1," * (600 * 1024))  # no newline
    led = Ledger(ledger_file, fsync=False)
    led.close()
    report = verify_chain(ledger_file)
    assert report.entries == before + 1 and report.kinds["recovered"] == 1


def test_a_second_writer_is_refused_while_the_first_holds_the_ledger(ledger_file):
    # GIVEN a ledger open for writing (a running gateway)
    first = Ledger(ledger_file, fsync=False)
    # WHEN a second writer opens it (e.g. `gateway data delete` beside a replay)
    with pytest.raises(StorageError, match="in use by another gateway process"):
        Ledger(ledger_file, fsync=False)
    # THEN the first one goes on, and the chain still verifies; once it is closed, the next
    # writer continues the chain
    first.append("event", note="still the only writer")
    first.close()
    second = Ledger(ledger_file, fsync=False)
    second.append("event", note="after the first")
    second.close()
    assert verify_chain(ledger_file).entries == 9


def test_the_lock_is_refused_to_another_process_and_released_when_it_dies(ledger_file):
    from tests.conftest import ledger_held

    with ledger_held(ledger_file), pytest.raises(StorageError, match="in use"):
        Ledger(ledger_file, fsync=False)
    Ledger(ledger_file, fsync=False).close()  # the kernel released the dead writer's lock


def test_a_ledger_whose_end_was_cut_off_at_a_line_says_its_run_has_no_stop(tmp_path):
    # GIVEN two runs, each closed by a stop entry; then the last two lines cut off
    path = tmp_path / "ledger.jsonl"
    for _ in range(2):
        led = Ledger(path, fsync=False)
        led.append("start", gateway="t", vin="V", policy="p", policy_sha256="0", policy_source="")
        led.append("event", note="x")
        led.append("stop", reason="end")
        led.close()
    whole = verify_ledger(path)
    assert whole.notes == []
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]))
    # THEN the chain still verifies (a cut at a line boundary leaves no trace in it), but the
    # summary notes that the last run has no stop entry
    cut = verify_ledger(path)
    assert len(cut.notes) == 1 and "started at line 4" in cut.notes[0]
    assert "note: the last run" in cut.summary()


def test_a_policy_given_that_is_not_the_runs_says_so(tmp_path):
    """The entries of a run under another policy than the file given were counted as not
    re-checked because "their policy file was not given", although one was."""
    from pathlib import Path

    import gateway

    path = tmp_path / "l.jsonl"
    led = Ledger(path, fsync=False)
    led.append("start", policy="leaky@1", policy_sha256="ab" * 32, consent={})
    led.append(
        "egress",
        topic="t",
        seq=0,
        schema="gateway.signals",
        sha256="00",
        bytes=1,
        rules=[],
        consent={},
    )
    led.append("stop")
    led.close()
    default = Path(gateway.__file__).parent / "data" / "policy_default.toml"
    text = verify_ledger(path, str(default)).summary()
    assert "1 not re-checked: their policy (leaky@1 sha256 abababababab)" in text
    assert "is not among the files given (owner-default@1 sha256 " in text
    assert "was not given (--policy FILE)" in verify_ledger(path).summary()


def test_a_ledger_spanning_two_versions_of_a_policy_is_rechecked_against_both(tmp_path):
    """A policy author raises the version when the rules change, as docs/policy.md says; one
    --policy could then never re-check the whole ledger."""
    import hashlib

    from gateway.telemetry.policy import load_policy

    v1, v2 = tmp_path / "v1.toml", tmp_path / "v2.toml"
    rule = '[[signal]]\nsignal = "A.B"\npublish_as = "b"\nquantum = {q}\n'
    v1.write_text('[policy]\nname = "fleet"\nversion = 1\n' + rule.format(q=1))
    v2.write_text('[policy]\nname = "fleet"\nversion = 2\n' + rule.format(q=5))
    path = tmp_path / "l.jsonl"
    led = Ledger(path, fsync=False)
    for f in (v1, v2):
        p = load_policy(f)
        assert p.digest == hashlib.sha256(f.read_bytes()).hexdigest()
        led.append("start", policy=p.ident, policy_sha256=p.digest, consent={})
        led.append(
            "egress", topic="t", seq=0, schema="gateway.signals", sha256="00", bytes=1,
            rules=["signal:A.B"], consent={},
        )  # fmt: skip
        led.append("stop")
    led.close()
    one = verify_ledger(path, str(v2))
    assert one.rechecked == 1 and one.unchecked == 1 and one.unused == []
    assert "their policy (fleet@1 sha256 " in one.summary()
    both = verify_ledger(path, [str(v1), str(v2)])
    assert both.rechecked == 2 and both.unchecked == 0 and both.unused == []


@pytest.mark.parametrize(
    "forge",
    [
        # a line added by hand: the gateway chained on from its "hash" "x"
        lambda lines, last: lines + ['{"i":999,"kind":"egress","hash":"x","prev":"y"}\n'],
        # a self-consistent line (its own hash right) that does not link to the one before
        lambda lines, last: lines + [_rehashed({**last, "i": last["i"] + 1, "prev": "0" * 64})],
        # the last line's content changed, its hash left as it was
        lambda lines, last: lines[:-1] + [lines[-1].replace('"reason":"test"', '"reason":"tost"')],
    ],
)
def test_a_last_line_that_does_not_continue_the_chain_is_not_built_on(ledger_file, forge):
    """The gateway took the last line's hash as the chain's head without checking it: a line
    appended by hand was built on, and every line the gateway wrote after it failed
    verification. It is refused untouched, naming the file, as a damaged one is."""
    lines = _lines(ledger_file)
    ledger_file.write_text("".join(forge(lines, json.loads(lines[-1]))))
    before = ledger_file.read_bytes()
    with pytest.raises(StorageError, match="does not continue the chain"):
        Ledger(ledger_file, fsync=False)
    assert ledger_file.read_bytes() == before


def test_a_ledger_of_one_line_reopens_and_one_whose_first_line_is_forged_does_not(tmp_path):
    path = tmp_path / "one.jsonl"
    Ledger(path, fsync=False).close()  # (nothing appended: an empty file)
    led = Ledger(path, fsync=False)
    led.append("event", note="first")
    led.close()
    Ledger(path, fsync=False).close()
    path.write_text(path.read_text().replace('"note":"first"', '"note":"forged"'))
    with pytest.raises(StorageError, match="does not continue the chain"):
        Ledger(path, fsync=False)


def test_a_ledger_whose_line_ends_were_changed_to_crlf_fails_verification(ledger_file):
    """Reading in text mode turned "\\r\\n" into "\\n" before the canonical-form check, and
    a file with every line end changed verified as unchanged."""
    ledger_file.write_bytes(ledger_file.read_bytes().replace(b"\n", b"\r\n"))
    with pytest.raises(AuditError, match=":1: not in canonical form"):
        verify_chain(ledger_file)


def _rehashed(entry):
    from gateway.egress.ledger import _canonical, entry_hash

    entry = {k: v for k, v in entry.items() if k != "hash"}
    entry["hash"] = entry_hash(entry["prev"], entry)
    return _canonical(entry).decode() + "\n"


def test_verify_says_a_torn_last_line_is_a_write_cut_short_and_what_the_gateway_does_with_it(
    ledger_file,
):
    """It said only "not a ledger entry (damaged line ...)", as for a line changed by hand."""
    ledger_file.write_bytes(ledger_file.read_bytes() + b'{"i":7,"at":1.0,"ki')
    with pytest.raises(AuditError, match=r":8: the last line was cut short .* the 7 line\(s\)"):
        verify_chain(ledger_file)
    ledger_file.write_bytes(ledger_file.read_bytes() + b"nd\n")  # ended: damaged, not torn
    with pytest.raises(AuditError, match=":8: not a ledger entry"):
        verify_chain(ledger_file)
