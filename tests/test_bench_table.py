"""``make bench``'s table judges each of the issue's targets on the figure it prints."""

from __future__ import annotations

from bench.run import CAMERA_720P, DECODE, E2E, RSS_CAN, Table


def test_a_ratio_is_judged_as_printed() -> None:
    t = Table()
    t.ratio("end to end, a", 1_996_000, 100_000, E2E)  # 19.96x, printed 20.0x
    t.ratio("end to end, b", 1_994_000, 100_000, E2E)  # 19.94x, printed 19.9x
    t.ratio("candump parse", 5_000_000, 100_000, None)
    assert [r[3] for r in t.rows] == ["20.0x", "19.9x", "50.0x"]
    assert t.rows[0][4] == "target >= 20x: met"
    assert t.rows[1][4] == "target >= 20x: NOT MET"
    assert t.rows[2][4] == ""
    assert t.checked == 2
    assert t.missed == ["end to end, b: 19.9x (target >= 20x)"]


def test_bounds_from_above_and_notes() -> None:
    t = Table()
    t.add("peak RSS", "80", note="runs 79-80", target=RSS_CAN, value=80)
    t.add("peak RSS, more", "81", target=RSS_CAN, value=81)
    t.add("camera", "14.9", target=CAMERA_720P, value=14.9)
    t.add("latency", "0.13")
    assert t.rows[0][4] == "target <= 80 MB: met; runs 79-80"
    assert t.rows[1][4] == "target <= 80 MB: NOT MET"
    assert t.rows[2][4] == "target >= 15 frames/s: NOT MET"
    assert t.rows[3][1:] == ("0.13", "", "", "")
    assert t.summary() == (
        "the issue's targets: 1 of 3 met; NOT MET: peak RSS, more: 81 MB (target <= 80 MB); "
        "camera: 14.9 frames/s (target >= 15 frames/s)"
    )


def test_summary_when_all_held_and_when_a_target_was_not_measured() -> None:
    t = Table()
    t.ratio("decode only", 3_100_000, 100_000, DECODE)
    assert t.summary() == "the issue's targets: 1 of 1 met"
    t.unmeasured.append("camera frames/s at 1280x720 (no labelled photos)")
    assert t.summary().endswith("; not measured: camera frames/s at 1280x720 (no labelled photos)")


def test_markdown_has_every_row_and_the_verdict() -> None:
    t = Table()
    t.ratio("end to end", 1_000_000, 100_000, E2E)
    t.add("peak RSS", "90", target=RSS_CAN, value=90)
    lines = t.markdown().splitlines()
    assert lines[0] == "| measure | gateway | standard tool | ratio | target, notes |"
    assert lines[1] == "|---|---:|---:|---:|---|"
    assert lines[2] == "| end to end | 1,000,000 | 100,000 | 10.0x | target >= 20x: NOT MET |"
    assert lines[3] == "| peak RSS | 90 |  |  | target <= 80 MB: NOT MET |"
    assert lines[-1] == t.summary()
    assert lines[-1].startswith("the issue's targets: 0 of 2 met; NOT MET: end to end: 10.0x (")
