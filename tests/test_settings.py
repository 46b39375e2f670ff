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


def test_a_relative_path_in_the_environment_is_relative_to_the_working_folder(
    tmp_path, monkeypatch
):
    """It was resolved against the config file's folder, as a path in the file is."""
    from gateway import settings

    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "g.toml").write_text('[gateway]\nledger = "in-file.jsonl"\n')
    work = tmp_path / "work"
    work.mkdir()
    (work / "gw.password").write_text("secret\n")
    monkeypatch.chdir(work)
    s = settings.load(
        conf_dir / "g.toml",
        env={"GATEWAY_BROKER_PASSWORD_FILE": "gw.password", "GATEWAY_GATEWAY_OUTBOX": "o.sqlite"},
    )
    assert s.broker.password_file == str(work / "gw.password")
    assert s.gateway.outbox == str(work / "o.sqlite")
    assert s.gateway.ledger == str(conf_dir / "in-file.jsonl")  # the file's: its folder's


def test_two_camera_tables_of_one_source_are_refused(tmp_path):
    (tmp_path / "g.toml").write_text(
        '[[camera]]\nsource = "clip.mp4"\nname = "front"\n\n'
        '[[camera]]\nsource = "clip.mp4"\nname = "rear"\n'
    )
    with pytest.raises(ConfigError, match=r"\[\[camera\]\] #2 has the source of \[\[camera\]\] #1"):
        settings.load(tmp_path / "g.toml", env={})


def test_a_misspelt_consent_category_is_named_with_the_closest(tmp_path):
    from gateway.app import _apply_config_consent
    from gateway.telemetry.consent import ConsentState
    from gateway.telemetry.policy import load_policy

    with pytest.raises(ConfigError, match="no category 'locaton' \\(did you mean location\\?\\)"):
        _apply_config_consent(ConsentState(), ["locaton:3"], load_policy(None), 0.0)


def test_a_misspelt_environment_variable_is_refused_and_a_bad_value_does_not_blame_the_file(
    tmp_path,
):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[gateway]\nvin = "FROMFILE"\n')
    # a key no section has, in a known section's variable: it was ignored in silence
    with pytest.raises(ConfigError) as err:
        settings.load(cfg, env={"GATEWAY_BROKER_URI": "mqtt://elsewhere:1"})
    assert str(err.value) == (
        "the environment variable GATEWAY_BROKER_URI names no setting: [broker] has no key "
        "'uri' (did you mean GATEWAY_BROKER_URL?)"
    )
    with pytest.raises(ConfigError, match="GATEWAY_REPLAY_ZZZ names no setting.*known: "):
        settings.load(cfg, env={"GATEWAY_REPLAY_ZZZ": "1"})
    # a known name in other case is not read (the environment's names are case-sensitive):
    # refused too, not ignored
    with pytest.raises(ConfigError) as err:
        settings.load(cfg, env={"GATEWAY_BROKER_Url": "mqtt://elsewhere:1"})
    assert str(err.value) == (
        "the environment variable GATEWAY_BROKER_Url names no setting: the names are in "
        "capitals (did you mean GATEWAY_BROKER_URL?)"
    )
    # variables of no section are other programs' (and GATEWAY_CACHE_DIR is the gateway's)
    s = settings.load(cfg, env={"GATEWAY_IP": "10.0.0.1", "GATEWAY_CACHE_DIR": "off"})
    assert s.gateway.vin == "FROMFILE"
    # a bad value from the environment is the variable's, not the file's
    with pytest.raises(ConfigError) as err:
        settings.load(cfg, env={"GATEWAY_GATEWAY_WINDOW": "soon"})
    assert str(err.value).startswith("[gateway].window must be")
    assert "GATEWAY_GATEWAY_WINDOW" in str(err.value) and str(cfg) not in str(err.value)
