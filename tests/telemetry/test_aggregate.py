"""Windows on frame time; the same summaries however the stream is cut into batches."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.records import Sentinels, SignalSeries, choices_for
from gateway.telemetry.aggregate import WindowAggregator


def _series(ts, vals, choices=None):
    return SignalSeries("M.S", np.asarray(ts, float), np.asarray(vals, float), "V", choices)


def test_count_min_max_mean_last_per_window():
    agg = WindowAggregator(10.0)
    agg.add([_series([1, 2, 9.99, 10, 15], [5, 1, 3, 7, 9])])
    out = agg.flush()
    assert [(w.start, w.end) for w in out] == [(0.0, 10.0), (10.0, 20.0)]
    a = out[0].signals["M.S"]
    assert (a.count, a.min, a.max, a.last) == (3, 1.0, 5.0, 3.0)
    assert a.mean == 3.0
    b = out[1].signals["M.S"]
    assert (b.count, b.min, b.max, b.mean, b.last) == (2, 7.0, 9.0, 8.0, 9.0)


def test_windows_are_emitted_only_when_the_watermark_passes_their_end():
    agg = WindowAggregator(10.0)
    agg.add([_series([1, 2], [1, 2])])
    assert agg.advance(9.9) == []
    assert [w.start for w in agg.advance(10.0)] == [0.0]
    # a sample for a window already emitted is late: counted, not merged
    agg.add([_series([3], [100])])
    assert agg.late_samples == 1
    assert agg.flush() == []


def test_enum_signals_report_last_state_name_and_state_counts():
    agg = WindowAggregator(60.0)
    agg.add([_series([1, 2, 3, 4], [0, 4, 3, 3], {0.0: "Off", 3.0: "On", 4.0: "Starting"})])
    a = agg.flush()[0].signals["M.S"]
    assert a.last == "On"
    assert a.states == {"Off": 1, "On": 2, "Starting": 1}
    assert a.mean is None


def test_non_finite_values_are_counted_and_left_out():
    agg = WindowAggregator(10.0)
    agg.add([_series([1, 2, 3], [1.0, np.nan, np.inf])])
    assert agg.invalid_samples == 2
    assert agg.flush()[0].signals["M.S"].count == 1


def test_times_whose_window_number_does_not_fit_64_bits_are_invalid_not_a_window():
    # a damaged log line "(1e300) can0 ..." parses; its window number would overflow int64
    agg = WindowAggregator(60.0)
    agg.add([_series([-1e300, 5, 30, 70, 1e300, np.nan], [1, 2, 3, 4, 5, 6])])
    assert agg.invalid_samples == 3
    assert [(w.start, w.signals["M.S"].count) for w in agg.flush()] == [(0.0, 2), (60.0, 1)]


def test_timestamps_going_backwards_inside_a_batch_still_give_the_latest_as_last():
    agg = WindowAggregator(10.0)
    agg.add([_series([5, 1, 3], [50, 10, 30])])
    a = agg.flush()[0].signals["M.S"]
    assert a.last == 50.0 and a.count == 3


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200),
    cuts=st.lists(st.integers(0, 200), max_size=6),
)
def test_any_batching_of_a_stream_gives_bit_identical_aggregates(values, cuts):
    ts = np.arange(len(values)) * 0.7
    vals = np.array(values, float)

    def run(pieces):
        agg = WindowAggregator(10.0)
        out = []
        for lo, hi in pieces:
            if hi > lo:
                agg.add([_series(ts[lo:hi], vals[lo:hi])])
                out += agg.advance(ts[hi - 1])
        return out + agg.flush()

    bounds = sorted({0, len(values), *(c for c in cuts if c <= len(values))})
    whole = run([(0, len(values))])
    pieces = run(list(zip(bounds[:-1], bounds[1:], strict=True)))
    assert [
        (w.start, {k: (a.count, a.min, a.max, a.last) for k, a in w.signals.items()}) for w in whole
    ] == [
        (w.start, {k: (a.count, a.min, a.max, a.last) for k, a in w.signals.items()})
        for w in pieces
    ]
    # the mean is exactly rounded, so it does not depend on the batching either
    assert [w.signals["M.S"].mean for w in whole] == [w.signals["M.S"].mean for w in pieces]


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=120),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_order_of_samples_inside_a_batch_does_not_matter(values, seed):
    ts = np.arange(len(values)) * 0.7  # across several 10 s windows
    vals = np.array(values, float)
    mixed = np.random.default_rng(seed).permutation(len(values))

    def run(order):
        agg = WindowAggregator(10.0)
        agg.add([_series(ts[order], vals[order])])
        return [
            (w.start, {k: (a.count, a.min, a.max, a.last, a.mean) for k, a in w.signals.items()})
            for w in agg.flush()
        ]

    assert run(mixed) == run(np.arange(len(values)))


def test_sentinel_values_of_a_numeric_signal_are_left_out_not_averaged():
    # a 10-bit speed, 0.5 km/h per bit, raw 1023 = "SNA": 511.5 km/h is not a speed
    sna = choices_for(10, {511.5: "ESP_VEHICLE_SPEED_SNA"})
    assert isinstance(sna, Sentinels)
    assert not isinstance(choices_for(3, {1.0: "P", 4.0: "D"}), Sentinels)  # a real enum
    agg = WindowAggregator(10.0)
    agg.add(
        [
            SignalSeries(
                "S.speed",
                np.array([1.0, 2.0, 3.0, 4.0]),
                np.array([40.0, 511.5, 50.0, 511.5]),
                "kph",
                sna,
            )
        ]
    )
    (w,) = agg.flush()
    a = w.signals["S.speed"]
    assert (a.count, a.min, a.max, a.mean, a.last) == (2, 40.0, 50.0, 45.0, 50.0)
    assert agg.invalid_samples == 2


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.0, 7.0, -0.0]), min_size=1, max_size=150),
    times=st.lists(st.floats(0, 55, allow_nan=False), min_size=1, max_size=150),
    cuts=st.lists(st.integers(0, 150), max_size=5),
)
def test_state_counts_per_window_are_the_samples_of_each_state(values, times, cuts):
    """Counted for a whole batch at once (one sort), they equal a count per window and state,
    however the stream is cut, with times out of order inside a batch and several windows."""
    from collections import Counter

    n = min(len(values), len(times))
    ts, vals = np.array(times[:n]), np.array(values[:n])
    names = {0.0: "Off", 1.0: "Acc", 2.0: "On", 3.0: "Start"}  # 7.0: no name
    want: dict[float, Counter] = {}
    for t, v in zip(ts.tolist(), vals.tolist(), strict=True):
        want.setdefault(np.floor(t / 10.0) * 10.0, Counter())[names.get(v, v)] += 1
    bounds = sorted({0, n, *(c for c in cuts if c <= n)})
    agg = WindowAggregator(10.0)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        if hi > lo:
            agg.add([_series(ts[lo:hi], vals[lo:hi], names)])
    got = {w.start: w.signals["M.S"].states for w in agg.flush()}
    assert got == {k: dict(c) for k, c in want.items()}


def test_a_name_seen_with_and_without_state_names_counts_as_its_window_began():
    """Two DBCs can give one ``Msg.Sig`` name with a value table on one channel and without
    it on another: a window counts states if it was opened by the series with names."""
    names = {0.0: "Off", 1.0: "On"}
    agg = WindowAggregator(10.0)
    agg.add([_series([1, 2], [1, 1], names)])  # window 0 opened with names
    agg.add([_series([3, 11], [0, 1])])  # no names: still counted in window 0; window 1 not
    agg.add([_series([12], [1], names)])
    w0, w1 = agg.flush()
    assert w0.signals["M.S"].states == {"On": 2, "Off": 1} and w0.signals["M.S"].count == 3
    assert w1.signals["M.S"].states is None and w1.signals["M.S"].count == 2


def test_names_only_at_the_edges_of_the_raw_range_mark_a_numeric_signal():
    def sentinels(length, raw, **kw):
        return isinstance(choices_for(length, {float(r): f"N{r}" for r in raw}, raw=raw, **kw),
                          Sentinels)  # fmt: skip

    # a 12-bit torque naming 0, 4094 and 4095 (opendbc EPAS_torsionBarTorque): numeric
    assert sentinels(12, [0, 4094, 4095])
    assert sentinels(8, [-128, 0, 126, 127], signed=True)
    # names inside the range: an enumeration (ACChargingCurrent 0/1/2; ACC distances 0..200,
    # 255 SNA; a parking distance naming 1 and 500 as well)
    assert not sentinels(8, [0, 1, 2])
    assert not sentinels(8, [0, 33, 66, 100, 133, 166, 200, 255])
    assert not sentinels(9, [0, 1, 500, 511])
    # a multiplexer's names name its values, however few (Model 3 CC_chgStatus2Index 0 "Mux0")
    assert sentinels(8, [0]) and not sentinels(8, [0], multiplexer=True)
    # short signals are enumerations
    assert not sentinels(3, [0, 6, 7])


def test_values_near_the_largest_float_have_a_mean_and_do_not_end_the_gateway():
    """Their sum passes the largest float: fsum raised OverflowError, and a replay of a float64
    signal reading 9e307 ended with a traceback. The mean is the exact one, rounded once."""
    from fractions import Fraction

    vals = [9e307] * 50 + [1.7e308] * 49 + [-1.2e308, 3.0]
    agg = WindowAggregator(100.0)
    agg.add([_series(np.arange(len(vals), dtype=float) * 0.5, vals)])
    (w,) = agg.flush()
    a = w.signals["M.S"]
    exact = sum(Fraction(v) for v in vals) / len(vals)
    assert a.mean == pytest.approx(float(exact), rel=1e-15)
    assert (a.count, a.min, a.max, a.last) == (101, -1.2e308, 1.7e308, 3.0)


def test_a_window_keeps_the_clock_time_it_began_collecting_at():
    # GIVEN batches taken in at clock times 100, 200 and 300
    agg = WindowAggregator(10.0)
    agg.add([_series([1, 2], [1, 2])], now=100.0)
    agg.add([_series([3, 12], [3, 4])], now=200.0)  # window 0 again; window 1 begins
    agg.add([_series([25], [5])], now=300.0)
    # THEN each window says when its first samples came, not its last
    assert [(w.start, w.opened) for w in agg.flush()] == [
        (0.0, 100.0),
        (10.0, 200.0),
        (20.0, 300.0),
    ]


def test_discarded_signals_are_forgotten_and_a_window_left_empty_opens_anew():
    # GIVEN two signals in window 0, one of them in window 1 too
    agg = WindowAggregator(10.0)
    agg.add([_series([1, 2], [1, 2]), SignalSeries("M.T", np.array([3.0]), np.array([7.0]), "V")])
    agg.add([_series([11], [5])], now=50.0)
    # WHEN M.S is discarded, then a sample of window 1 comes again
    assert agg.discard({"M.S"}) == (2, 3)
    agg.add([_series([12], [9])], now=80.0)
    # THEN window 0 has only M.T, and window 1 only the later sample, opened when it came
    w0, w1 = agg.flush()
    assert set(w0.signals) == {"M.T"}
    assert w1.signals["M.S"].count == 1 and w1.signals["M.S"].last == 9 and w1.opened == 80.0
    assert agg.discard() == (0, 0)  # nothing open any more
