"""Settings: file < environment < command line; every mistake named."""

from __future__ import annotations

import pytest

from gateway import settings
from gateway.errors import ConfigError


def test_precedence_file_then_environment_then_overrides(tmp_path):
    cfg = tmp_path / "g.toml"
    cfg.write_text(
        "[gateway]\nvin = 'FROMFILE'\nwindow = 30\n[broker]\nurl = 'mqtt://10.0.0.1:1883'\n"
    )
    s = settings.load(cfg, env={})
    assert (s.gateway.vin, s.gateway.window, s.broker.port) == ("FROMFILE", 30.0, 1883)
    s = settings.load(cfg, env={"GATEWAY_GATEWAY_VIN": "FROMENV"})
    assert s.gateway.vin == "FROMENV"
    s = settings.load(cfg, env={"GATEWAY_GATEWAY_VIN": "FROMENV"}, overrides={"gateway.vin": "CLI"})
    assert s.gateway.vin == "CLI"


def test_paths_in_a_config_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    cfg = tmp_path / "sub" / "g.toml"
    cfg.write_text(
        "[gateway]\nledger = 'l.jsonl'\n[[can]]\nlogs = ['a.log']\n[dbc]\ncan0 = 'p.dbc'\n"
    )
    s = settings.load(cfg, env={})
    assert s.gateway.ledger == str(tmp_path / "sub" / "l.jsonl")
    assert s.can[0].logs == [str(tmp_path / "sub" / "a.log")]
    assert s.dbc == {"can0": [str(tmp_path / "sub" / "p.dbc")]}


def test_environment_values_are_type_checked():
    with pytest.raises(ConfigError, match=r"window must be a number"):
        settings.load(None, env={"GATEWAY_GATEWAY_WINDOW": "soon"})


@pytest.mark.parametrize("url", ["http://x:1", "mqtt://:1883", "mqtt://host:notaport"])
def test_bad_broker_urls_are_refused(url):
    with pytest.raises(ConfigError, match=r"\[broker\]\.url"):
        settings.load(None, env={}, overrides={"broker.url": url})


def test_the_option_reference_lists_every_option():
    doc = settings.describe()
    for key in ("vin", "window", "topic_prefix", "password_file", "interface", "detect_every"):
        assert f"`{key}`" in doc
    assert "(secret)" in doc
