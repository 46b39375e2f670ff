"""DBC loading: strict first, then strict=False, then the missing-section repair; else a
one-line DbcError naming the file."""

from __future__ import annotations

import logging

import pytest

from gateway.canbus import dbc as dbc_module
from gateway.canbus.dbc import ChannelDbcs, load_dbc
from gateway.errors import DbcError
from tests.conftest import KONA, SHARED_CAN


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Each file is parsed and warned about once per process; these tests watch the warning."""
    dbc_module._load_cached.cache_clear()


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


def test_channel_specs_map_channels_and_wildcard():
    d = ChannelDbcs.from_specs(
        [f"can1={KONA / 'kona_ccan.cantools.dbc'}", str(KONA / "kona_pcan.cantools.dbc")]
    )
    assert len(d.for_channel("can1")[0].messages) == 2
    assert len(d.for_channel("can7")[0].messages) == 107
