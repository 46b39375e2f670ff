"""The cantools reference decoder: golden values from the real log, counting, multiplexing."""

from __future__ import annotations

import cantools
import numpy as np
import pytest

from gateway.canbus.dbc import ChannelDbcs
from gateway.canbus.decode import CantoolsDecoder
from gateway.canbus.replay import iter_log
from gateway.records import FrameBatchBuilder
from tests.conftest import KONA, KONA_CSV, SHARED_CAN


def _kona_decoder(wanted=None):
    return CantoolsDecoder(
        ChannelDbcs.from_specs(
            {
                "can0": str(KONA / "kona_pcan.cantools.dbc"),
                "can1": str(KONA / "kona_ccan.cantools.dbc"),
            }
        ),
        wanted=wanted,
    )


def test_decoding_the_real_log_matches_cantools_decode_message_frame_by_frame():
    db = cantools.database.load_file(str(KONA / "kona_pcan.cantools.dbc"))
    dec = _kona_decoder()
    total_unknown = 0
    for batch in iter_log(KONA_CSV):
        result = dec.decode(batch)
        total_unknown += sum(result.stats.unknown_id.values())
        series = {s.name: s for s in result.series}
        soc = series.get("BMS_542.SocDisp")
        if soc is None:
            continue
        mask = (batch.arbitration_id == 0x542) & (batch.channel == batch.channels.index("can0"))
        expect = [
            db.decode_message(0x542, bytes(batch.data[i, : batch.dlc[i]]), allow_truncated=True)[
                "SocDisp"
            ]
            for i in np.flatnonzero(mask)
        ]
        assert soc.value.tolist() == expect
        assert soc.timestamp.tolist() == batch.timestamp[mask].tolist()
    assert total_unknown > 0  # C-CAN ids the DBC does not know are counted, not raised


def test_truncated_frames_decode_what_fits_and_enums_stay_numeric_with_names():
    b = FrameBatchBuilder()
    b.add(
        1.0, "can0", 0x541, bytes([0x03])
    )  # BodyState (0x541) is 8 bytes; 1 byte carries IgnitionSw
    dec = _kona_decoder()
    out = {s.name: s for s in dec.decode(b.build()).series}
    ign = out["BodyState.IgnitionSw"]
    assert ign.value.tolist() == [3.0]
    assert ign.choices is not None and ign.choices[3.0] == "On"


def test_unknown_ids_error_and_remote_frames_are_counted_per_id():
    b = FrameBatchBuilder()
    b.add(1.0, "can0", 0x7FF, bytes(8))
    b.add(1.1, "can0", 0x7FF, bytes(8))
    b.add(1.2, "can0", 0x542, bytes(8), is_remote=True)
    b.add(1.3, "can0", 0x542, bytes(8), is_error=True)
    stats = _kona_decoder().decode(b.build()).stats
    assert stats.unknown_id == {0x7FF: 2}
    assert stats.skipped_special == 2
    assert stats.decoded == 0


def test_wanted_limits_the_output_to_named_signals():
    batch = next(iter_log(KONA_CSV))
    names = {s.name for s in _kona_decoder({"BMS_542.SocDisp"}).decode(batch).series}
    assert names <= {"BMS_542.SocDisp"}


def test_multiplexed_tesla_vin_frames_decode_only_the_active_branch():
    path = SHARED_CAN / "tesla_model3_dbc_only" / "Model3CAN.dbc"
    if not path.exists():
        pytest.skip("shared Tesla DBC absent")
    dbcs = ChannelDbcs.from_specs([str(path)])
    msg = dbcs.for_channel("can0")[0].get_message_by_frame_id(0x405)
    data = msg.encode({"mux405": 17, "VINB405": int.from_bytes(b"ABC1234", "little")}, strict=False)
    b = FrameBatchBuilder()
    b.add(0.0, "can0", 0x405, data)
    names = {s.name for s in CantoolsDecoder(dbcs).decode(b.build()).series}
    assert "ID405VIN.VINB405" in names
    assert "ID405VIN.VINA405" not in names and "ID405VIN.VINC405" not in names
