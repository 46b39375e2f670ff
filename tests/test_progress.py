"""The progress bar: what a user watching a long replay or synth sees last."""

from __future__ import annotations

import io

from gateway.progress import Progress
from gateway.synth import synthesise
from tests.conftest import FIXTURES


def _last(text: str) -> str:
    return text.rstrip("\n").split("\r")[-1]


def test_the_bar_ends_at_what_was_reached_even_if_the_last_updates_came_too_fast():
    out = io.StringIO()
    bar = Progress("replay", stream=out, enabled=True, min_interval=3600)
    bar.update(10, 0, 100)  # shown
    bar.update(50, 50, 100)  # too soon after: not shown now
    bar.update(100, 100, 100)
    assert "0.0%" in _last(out.getvalue())
    bar.close()
    assert "100.0%" in _last(out.getvalue()) and "100 frames" in _last(out.getvalue())
    assert out.getvalue().endswith("\n")


def test_a_bar_that_was_never_shown_prints_nothing_at_close():
    out = io.StringIO()
    Progress("replay", stream=out, enabled=False).close()
    bar = Progress("replay", stream=out, enabled=True)
    bar.close()
    assert out.getvalue() == ""


def test_synth_ends_its_bar_at_100_percent(tmp_path, capsys):
    dbc = FIXTURES / "model3" / "Model3CAN.dbc"
    r = synthesise(dbc, tmp_path / "d.log", minutes=1, seed=3, progress=True)
    last = _last(capsys.readouterr().err)
    assert "100.0%" in last and f"{r.frames:,} frames" in last
