"""Every user mistake: one line naming the file, line or key; non-zero exit; no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.localbroker import free_port
from tests.conftest import (
    FIXTURES,
    KONA_CSV,
    KONA_PCAN,
    assert_one_line_error,
    gateway_settings,
    ledger_held,
    run_gateway,
)


def _replay(tmp_path, *args, broker="mqtt://127.0.0.1:1"):
    return run_gateway(
        "replay",
        *args,
        "--broker",
        broker,
        "--ledger",
        str(tmp_path / "l.jsonl"),
        "--outbox",
        str(tmp_path / "o.sqlite"),
        "-q",
    )


def _replay_with_policy(tmp_path, broker, log, dbc, rules: str):
    """A fast replay of ``log`` under a policy of ``rules`` (its [[signal]] tables); it must
    succeed."""
    policy = tmp_path / "mine.toml"
    policy.write_text('[policy]\nname = "mine"\n' + rules)
    proc = _replay(
        tmp_path, str(log), "--dbc", str(dbc), "--policy", str(policy), "--fast",
        broker=broker.url,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc


def test_missing_log_file_is_named(tmp_path):
    missing = tmp_path / "nope.log"
    proc = _replay(tmp_path, str(missing), "--dbc", str(KONA_PCAN))
    assert_one_line_error(proc, str(missing), "not found")


def test_unknown_log_format_is_named(tmp_path):
    weird = tmp_path / "capture.xyz"
    weird.write_bytes(b"\x00\x01garbage that is no CAN log\n" * 10)
    proc = _replay(tmp_path, str(weird), "--dbc", str(KONA_PCAN))
    assert_one_line_error(proc, str(weird), "unknown log format")


def test_csv_of_unknown_layout_names_line_1(tmp_path):
    weird = tmp_path / "other.csv"
    weird.write_text("a,b,c\n1,2,3\n")
    proc = _replay(tmp_path, str(weird), "--dbc", str(KONA_PCAN))
    assert_one_line_error(proc, f"{weird}:1", "unknown CSV layout")


def test_dbc_that_cantools_refuses_even_non_strict_is_named(tmp_path):
    bad = tmp_path / "broken.dbc"
    bad.write_text(
        'VERSION ""\n\nBO_ 100 Foo: 8 XXX\n SG_ Bar : 0|8@1+ (1,0) [0|255] "" XXX\n'
        "BO_ this is not dbc at all\n"
    )
    proc = _replay(tmp_path, str(KONA_CSV), "--dbc", str(bad))
    assert_one_line_error(proc, str(bad), "cannot load this DBC")


def test_missing_dbc_is_named(tmp_path):
    proc = _replay(tmp_path, str(KONA_CSV), "--dbc", f"can0={tmp_path / 'x.dbc'}")
    assert_one_line_error(proc, "x.dbc", "not found")


def test_broker_that_refuses_the_connection_is_named(tmp_path):
    url = f"mqtt://127.0.0.1:{free_port()}"
    proc = _replay(tmp_path, str(KONA_CSV), "--dbc", f"can0={KONA_PCAN}", "--fast", broker=url)
    line = assert_one_line_error(proc, url)
    assert proc.returncode == 3
    assert "refused" in line.lower() or "connect" in line.lower()
    # the ledger's start entry has its stop: the run did not start, it was not cut short
    verify = run_gateway("audit", "verify", str(tmp_path / "l.jsonl"))
    assert verify.returncode == 0 and "no stop entry" not in verify.stdout + verify.stderr


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ("[gateway]\nvinn = 'X'\n", ["unknown key 'vinn'", "[gateway]"]),
        ("[gateway]\nwindow = 'soon'\n", ["[gateway].window", "must be a number"]),
        ("[broker]\nport = 1883\n", ["unknown key 'port'", "[broker]"]),
        ("[gatway]\n", ["unknown section [gatway]"]),
        ("[[can]]\nlogs = ['a.log']\ninterface = 'virtual'\n", ["[[can]] #1", "either logs or"]),
        ("[gateway\n", ["invalid TOML", "line 1"]),
    ],
)
def test_config_mistakes_name_the_file_and_key(tmp_path, toml, needles):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(toml)
    proc = run_gateway("config", "--config", str(cfg))
    assert_one_line_error(proc, str(cfg), *needles)


def test_policy_mistake_names_the_rule(tmp_path):
    pol = tmp_path / "p.toml"
    pol.write_text("[[signal]]\nsignal = 'BMS_542.SocDisp'\ncategory = 'secret'\n")
    proc = _replay(tmp_path, str(KONA_CSV), "--dbc", f"can0={KONA_PCAN}", "--policy", str(pol))
    assert_one_line_error(proc, str(pol), "[[signal]] #1.category")


def test_garbage_lines_in_a_log_are_skipped_counted_and_reported(tmp_path, broker):
    lines = KONA_CSV.read_text().splitlines(keepends=True)
    corrupt = (
        lines[:200]
        + [
            "1953999999,0000ZZZZ,false,0,8,00,01\n",
            "\x00\x7f\xfe binary noise\n",
            "1953613500,00000109,false,0,8,00,01,00\n",
            "truncated,\n",
        ]
        + lines[200:400]
    )
    bad = tmp_path / "corrupt.csv"
    bad.write_text("".join(corrupt))
    proc = _replay(tmp_path, str(bad), "--dbc", f"can0={KONA_PCAN}", "--fast", broker=broker.url)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "skipped 4 bad line(s)" in proc.stderr
    assert "line 202" in proc.stderr  # the first garbage line, counting the header as line 1
    assert "replayed 399 frames" in proc.stderr


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        # a folder or file that cannot be made, where the user pointed the output
        (lambda p: ["replay", str(KONA_CSV), "--ledger", str(_file(p) / "l.jsonl")], "cannot"),
        (lambda p: ["data", "export", "--out", str(_file(p) / "x.json")], "cannot write"),
        (lambda p: ["validate", "--out", str(_file(p))], "cannot create the report folder"),
        (lambda p: ["validate", "--broker", f"mqtt://127.0.0.1:{free_port()}"], "subscribe"),
        (lambda p: ["anonymize", str(VFR), str(p / "none" / "o.mp4")], "no such folder"),
        (lambda p: ["synth", "--route", str(p / "r.csv"), "--out", str(p / "s.log")], "(No such"),
    ],
)
def test_outputs_that_cannot_be_written_and_an_absent_broker_are_one_line(tmp_path, argv, needle):
    args = argv(tmp_path)
    if args[0] == "replay":
        args += ["--dbc", str(KONA_PCAN), "--fast", "--outbox", str(tmp_path / "o.sqlite")]
    elif args[0] == "data":
        from gateway.egress.outbox import Outbox

        Outbox(tmp_path / "o.sqlite").close()  # an outbox to export
        (tmp_path / "l.jsonl").touch()  # and the gateway's (empty) ledger
        args += ["--ledger", str(tmp_path / "l.jsonl"), "--outbox", str(tmp_path / "o.sqlite")]
    proc = run_gateway(*args, cwd=tmp_path)
    assert_one_line_error(proc, needle)
    assert proc.returncode != 0


VFR = Path(__file__).parent / "data" / "vfr_testsrc.mkv"


def _file(p):
    f = p / "a-file"
    f.write_text("not a folder")
    return f


def test_a_ledger_line_nested_too_deep_for_json_is_a_bad_line_not_a_crash(tmp_path):
    led = tmp_path / "l.jsonl"
    led.write_text("[" * 100_000 + "\n")
    proc = run_gateway("audit", "verify", str(led))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{led}:1" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[gateway]\nvin = 'A/#'\n", "gateway.toml: [gateway].vin must be one MQTT topic level"),
        ("[gateway]\nvin = ''\n", "gateway.toml: [gateway].vin must be one MQTT topic level"),
        ("[broker]\ntopic_prefix = 'a/+'\n", "gateway.toml: [broker].topic_prefix"),
        ("[gateway]\nwindow = 1e-300\n", "gateway.toml: [gateway].window must be 0.001"),
        ("[gateway]\nhealth_interval = -1\n", "gateway.toml: [gateway].health_interval"),
        ("[gateway]\ndigest_interval = -1\n", "gateway.toml: [gateway].digest_interval"),
        ("[broker]\nkeepalive = -5\n", "gateway.toml: [broker].keepalive must be 0 to"),
        ("[broker]\nbackoff_max = 0\n", "gateway.toml: [broker].backoff_max must be 0.1"),
        (
            "[[can]]\ninterface = 'virtual'\nchannel = 'a'\noptions = { channel = 'b' }\n",
            "gateway.toml: [[can]] #1: options may not hold channel",
        ),
        ("[broker]\nurl = 'http://x:1883'\n", "gateway.toml: [broker].url 'http://x:1883'"),
        (
            "[[can]]\ninterface = 'socketcan'\nchannel = ''\n",
            "gateway.toml: [[can]] #1: give either logs or interface and channel",
        ),
        (
            "[[can]]\ninterface = 'virtual'\nchannel = 'a'\n[[can]]\ninterface = 'virtual'\n"
            "channel = 'a'\nname = 'can1'\n",
            "gateway.toml: [[can]] #2 is the bus of [[can]] #1",
        ),
        (
            "[[can]]\ninterface = 'virtual'\nchannel = 'a'\nname = 'can0'\n[[can]]\n"
            "interface = 'virtual'\nchannel = 'b'\nname = 'can0'\n",
            "gateway.toml: [[can]] #2 and #1 are both named 'can0'",
        ),
        ("[[can]]\nlogs = ['x.log']\nbitrate = 500000\n", "are for a live bus"),
        ("[[camera]]\nname = 'front'\n", "gateway.toml: [[camera]] #1: source is missing"),
        ("[[can]]\ninterface = 'virtual'\nchannel = 'a'\noptions = 5\n", "options must be a table"),
        ("[replay]\nspeed = -1\n", "gateway.toml: [replay].speed"),
        ("[replay]\nspeed = nan\n", "gateway.toml: [replay].speed"),
        (
            "[[can]]\ninterface = 'virtual'\nchannel = 'x'\nbitrate = -5\n",
            "gateway.toml: [[can]] #1: bitrate must be",
        ),
        # and what `run` would refuse, which `config` now finds too (named in the value)
        ("[gateway]\npolicy = 'nope.toml'\n", "nope.toml"),
        ("[dbc]\ncan0 = 'missing.dbc'\n", "missing.dbc: DBC file not found"),
        ("[[can]]\nlogs = ['nope.log']\n", "nope.log"),
        (
            "[gateway]\nconsent = ['telepathy:7']\n",
            "gateway.toml: [gateway].consent 'telepathy:7'",
        ),
        (
            "[gateway]\nconsent = ['location:forever']\n",
            "gateway.toml: [gateway].consent 'location:forever'",
        ),
        (
            "[gateway]\nconsent = ['location:999']\n",
            "gateway.toml: [gateway].consent 'location:999' refused",
        ),
        (
            "[[camera]]\nsource = 'x.mp4'\nmethod = 'blur'\n",
            "gateway.toml: [[camera]] #1: anonymisation method 'blur'",
        ),
        (
            "[[camera]]\nsource = 'x.mp4'\n[[camera]]\nsource = 'y.mp4'\nplate_strips = 9\n",
            "gateway.toml: [[camera]] #2: plate_strips must be",
        ),
        (
            "[[camera]]\nsource = 'x.mp4'\ndetect_every = 0\n",
            "gateway.toml: [[camera]] #1: detect_every must be",
        ),
        (
            "[[can]]\ninterface = 'nosuch'\nchannel = 'x'\n",
            "gateway.toml: [[can]] #1: interface 'nosuch' is not one python-can knows",
        ),
        # a VIN and a prefix name the owner's topics: what a subscriber could not type is refused
        ("[gateway]\nvin = 'WVW ZZZ'\n", "[gateway].vin must be one MQTT topic level (it holds a"),
        ('[gateway]\nvin = "A\\tB"\n', "[gateway].vin must be one MQTT topic level (it holds a"),
        ("[broker]\ntopic_prefix = 'fleet/'\n", "[broker].topic_prefix must be MQTT topic levels"),
        ("[broker]\ntopic_prefix = 'a//b'\n", "(an empty level"),
        # found by a sweep: said only when a connection was tried, or with the password echoed
        ("[broker]\ntls_ca = 'nope.crt'\n", "[broker].tls_ca"),
        ("[broker]\npassword_file = 'nope.pw'\n", "nope.pw: cannot read the broker password"),
        ("[broker]\nurl = 'mqtt://u:s3cret@127.0.0.1:1883'\n", "not in the URL"),
        ("[broker]\ntopic_prefix = '$SYS'\n", "are the broker's own"),
    ],
)
def test_values_out_of_range_in_a_config_are_named(tmp_path, toml, needle):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(toml)
    proc = run_gateway("config", "--config", str(cfg), cwd=tmp_path)
    assert_one_line_error(proc, needle)
    assert "s3cret" not in proc.stderr  # a password in a URL is never echoed


def test_replay_options_out_of_range_are_named(tmp_path):
    proc = _replay(tmp_path, str(KONA_CSV), "--dbc", str(KONA_PCAN), "--speed", "nan")
    assert_one_line_error(proc, "--speed must be a positive number")
    # argparse's own mistakes are one line too, as for any option of the wrong type
    proc = _replay(tmp_path, str(KONA_CSV), "--dbc", str(KONA_PCAN), "--drain-timeout", "-1")
    assert proc.returncode == 2
    assert_one_line_error(proc, "argument --drain-timeout: must be 0 or more seconds, got -1")


def test_control_bytes_quoted_from_a_file_are_escaped_in_the_error(tmp_path):
    bad = tmp_path / "ctrl.dbc"
    # (mostly text: a file of control bytes is refused as binary data without quoting it)
    bad.write_bytes(b'VERSION ""\nBO_ \x1b[31m junk ' + b"x" * 300 + b"\n")
    proc = _replay(tmp_path, str(KONA_CSV), "--dbc", str(bad))
    line = assert_one_line_error(proc, str(bad))
    assert "\x1b" not in proc.stderr
    assert "\\x1b" in line


@pytest.mark.broker
def test_a_dbc_saved_with_a_byte_order_mark_loads(tmp_path, broker):
    bom = tmp_path / "bom.dbc"
    bom.write_bytes(b"\xef\xbb\xbf" + KONA_PCAN.read_bytes())
    proc = _replay(tmp_path, str(KONA_CSV), "--dbc", str(bom), "--fast", broker=broker.url)
    assert "byte-order mark" in proc.stderr and "decoded 29,586 frames" in proc.stderr


@pytest.mark.parametrize(
    ("spec", "needle"),
    [(lambda p: str(p), "is a folder, not a DBC file"), (lambda p: "can0=", "no file given")],
)
def test_a_dbc_spec_that_names_no_file_says_what_it_names(tmp_path, spec, needle):
    proc = _replay(tmp_path, str(KONA_CSV), "--dbc", spec(tmp_path))
    assert_one_line_error(proc, needle)


@pytest.mark.parametrize("command", [["export"], ["delete", "--category", "location"]])
def test_data_commands_on_a_missing_or_damaged_outbox_say_so(tmp_path, command):
    common = ["--ledger", str(tmp_path / "l.jsonl"), "--outbox", str(tmp_path / "o.sqlite")]
    # a missing outbox: it was made empty, and an empty export looked like "nothing kept"
    proc = run_gateway("data", *command, *common)
    assert_one_line_error(proc, "o.sqlite: no outbox here")
    assert not (tmp_path / "o.sqlite").exists()
    # no ledger beside it: a new one was made in the working folder, the action recorded there
    (tmp_path / "o.sqlite").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    proc = run_gateway("data", *command, *common)
    assert_one_line_error(proc, "l.jsonl: no ledger here")
    assert not (tmp_path / "l.jsonl").exists()
    # a damaged one
    (tmp_path / "l.jsonl").touch()
    proc = run_gateway("data", *command, *common)
    assert_one_line_error(proc, "o.sqlite", "damaged")


def test_a_replay_onto_a_damaged_outbox_stops_before_losing_what_waits_in_it(tmp_path):
    (tmp_path / "o.sqlite").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    proc = _replay(tmp_path, str(KONA_CSV), "--dbc", str(KONA_PCAN), "--fast")
    assert_one_line_error(proc, "o.sqlite: the outbox is damaged", "Move it aside")
    assert proc.returncode == 4


def test_a_later_log_that_is_not_what_its_name_says_fails_before_the_replay(tmp_path):
    junk = tmp_path / "junk.blf"
    junk.write_bytes(b"this is no BLF")
    proc = _replay(tmp_path, str(KONA_CSV), str(junk), "--dbc", str(KONA_PCAN), "--fast")
    assert_one_line_error(proc, "junk.blf: not a BLF file")
    assert "replayed" not in proc.stderr  # nothing ran: not half a replay, then an error


@pytest.mark.broker
def test_overlapping_dbcs_and_a_dbc_for_a_silent_channel_are_said(tmp_path, broker):
    twin = tmp_path / "twin.dbc"
    twin.write_bytes(KONA_PCAN.read_bytes())
    proc = _replay(
        tmp_path, str(KONA_CSV), "--dbc", f"can0={KONA_PCAN}", "--dbc", f"can0={twin}",
        "--dbc", f"vcan0={KONA_PCAN}", "--fast", broker=broker.url,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"are in {KONA_PCAN} too; on can0 the first DBC given decodes them" in proc.stderr
    assert "no frames on vcan0, which a DBC is given for" in proc.stderr


def test_a_bad_value_names_the_environment_variable_or_option_it_came_from(tmp_path):
    proc = run_gateway("config", env={"GATEWAY_GATEWAY_WINDOW": "abc"})
    assert_one_line_error(
        proc, "[gateway].window", "set by the environment variable GATEWAY_GATEWAY_WINDOW"
    )
    proc = _replay(tmp_path, str(KONA_CSV), "--dbc", str(KONA_PCAN), "--window", "-1")
    assert_one_line_error(proc, "[gateway].window", "set by the option --window")


def test_data_commands_beside_a_running_gateway_change_nothing(tmp_path):
    from gateway.egress.outbox import Outbox
    from tests.egress.test_outbox import _released

    # GIVEN an outbox with 5 waiting messages, and a gateway process holding the ledger
    ob = Outbox(tmp_path / "o.sqlite")
    ob.put_many(_released(ob, 5))
    ob.close()
    common = ["--ledger", str(tmp_path / "l.jsonl"), "--outbox", str(tmp_path / "o.sqlite")]
    with ledger_held(tmp_path / "l.jsonl"):
        # WHEN the owner deletes and exports beside it
        delete = run_gateway("data", "delete", "--category", "all", *common)
        export = run_gateway("data", "export", "--out", str(tmp_path / "x.json"), *common)
    # THEN both are refused before they touch anything (the rows were deleted, unrecorded)
    for p in (delete, export):
        assert_one_line_error(p, "in use by another gateway process")
    assert not (tmp_path / "x.json").exists()
    ob = Outbox(tmp_path / "o.sqlite")
    assert ob.depth() == 5
    ob.close()


def test_a_gateway_that_fails_to_start_does_not_keep_its_ledger_locked(tmp_path):

    from gateway.app import Gateway
    from gateway.egress.ledger import Ledger
    from gateway.errors import StorageError

    (tmp_path / "o.sqlite").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    s = gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]})
    with pytest.raises(StorageError, match="damaged") as failed:
        Gateway(s, [])
    # while the failure is still referenced (a retry in the same process), the lock is free
    assert failed.value is not None
    Ledger(tmp_path / "l.jsonl").close()


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        # argparse's own mistakes: one line too, naming the option, not its usage text first
        (["replay", str(KONA_CSV), "--window", "abc"], ["--window", "gateway replay --help"]),
        (["owner", "--count", "-1"], ["--count", "must be 1 or more"]),
        (["owner", "--idle-timeout", "-1"], ["--idle-timeout"]),
        (["data", "delete"], ["--category", "required"]),
        (["nosuch"], ["invalid choice", "gateway --help"]),
        # an empty channel name before '=' (was taken as a channel named '')
        (["replay", str(KONA_CSV), "--dbc", f"={KONA_PCAN}"], ["--dbc", "no channel before"]),
        # another log without its DBCs (the bundled Model 3 DBC was used, and said "no leak")
        (["validate", "--log", str(KONA_CSV)], ["--log needs the DBCs"]),
        # a category with stop was dropped without a word; delete without one deleted all
        (["consent", "stop", "location"], ["consent stop takes no category"]),
        (["consent", "delete"], ["consent delete needs a category (or all)"]),
        # the option's consents are its mistakes, not the config file's
        (["validate", "--consent", "location:999"], ["--consent 'location:999' refused"]),
        (["validate", "--consent", "forever"], ["--consent 'forever': expected CATEGORY:DAYS"]),
        # a policy file is named as one (it was "config file not found")
        (
            ["replay", str(KONA_CSV), "--dbc", str(KONA_PCAN), "--policy", "/nope.toml"],
            ["/nope.toml: policy file not found"],
        ),
        (["replay", str(KONA_CSV), "--broker", "http://x:1"], ["[broker].url", "scheme"]),
    ],
)
def test_command_line_mistakes_are_one_line_naming_the_option(argv, needles):
    proc = run_gateway(*argv)
    assert proc.returncode == 2
    assert "usage:" not in proc.stderr
    assert_one_line_error(proc, *needles)


def test_the_replay_help_example_names_a_bundled_log():
    """Its example named a file that is not in can_fixtures/ (a newcomer's first try)."""
    import re

    from tests.conftest import FIXTURES

    proc = run_gateway("replay", "--help")
    named = re.findall(r"can_fixtures/(\S+\.(?:log|csv|asc|dbc))", proc.stdout)
    assert named and all((FIXTURES / n).is_file() for n in named), named


def test_a_mistyped_policy_signal_is_a_warning_with_the_name_it_was_probably_meant_to_be(
    tmp_path, broker
):
    """A signal whose message the DBC has but not the signal itself (a typo, another version of
    the DBC) can never be published: said at once, not only with -v, with the closest name."""
    proc = _replay_with_policy(
        tmp_path, broker, KONA_CSV, KONA_PCAN,
        '[[signal]]\nsignal = "BMS_542.SocDsip"\npublish_as = "soc"\n'
        '[[signal]]\nsignal = "BMS_542.SocDisp"\npublish_as = "soc2"\n'
        '[[signal]]\nsignal = "OtherCar.Speed"\npublish_as = "speed"\n',
    )  # fmt: skip
    warned = [ln for ln in proc.stderr.splitlines() if "warning: policy:" in ln]
    assert warned == [
        "gateway: warning: policy: message BMS_542 of the DBCs has no signal SocDsip "
        "(did you mean BMS_542.SocDisp?): it is never published"
    ]
    # a signal of another vehicle's DBC is only said with -v (one policy may serve several)
    assert "OtherCar" not in proc.stderr


def test_the_report_counts_what_was_withheld_and_why(tmp_path, broker):
    """Window values withheld for lack of consent, and GPS fixes that never left, are counted
    in the report (they were counted nowhere a user could see)."""
    proc = _replay_with_policy(
        tmp_path, broker,
        FIXTURES / "model3" / "model3_synthetic_drive.log", FIXTURES / "model3" / "Model3CAN.dbc",
        '[[signal]]\nsignal = "ID155WheelAngles.ESP_vehicleSpeed"\npublish_as = "speed"\n'
        'category = "cabin"\naggregates = ["mean"]\nquantum = 5\n'
        '[[signal]]\nsignal = "ID04FGPSLatLong.GPSLatitude04F"\npublish_as = "lat"\n'
        'category = "location"\nlocation = "latitude"\n'
        '[[signal]]\nsignal = "ID04FGPSLatLong.GPSLongitude04F"\npublish_as = "lon"\n'
        'category = "location"\nlocation = "longitude"\n',
    )  # fmt: skip
    import re

    m = re.search(
        r"(\d+) window values of sensitive signals were withheld .*\(cabin (\d+)\)", proc.stderr
    )
    assert m and int(m.group(1)) == int(m.group(2)) > 0, proc.stderr
    m = re.search(r"GPS fixes that never left: ([\d,]+) without location consent", proc.stderr)
    assert m and int(m.group(1).replace(",", "")) > 0, proc.stderr


def _vehicle_v(tmp_path):
    """The options naming vehicle V's ledger and outbox in ``tmp_path``, for `gateway data`."""
    return [
        "--vin",
        "V",
        "--ledger",
        str(tmp_path / "l.jsonl"),
        "--outbox",
        str(tmp_path / "o.sqlite"),
    ]


def test_data_delete_all_withdraws_the_consent_grants_too(tmp_path):
    """Its help says "all: every one, and the consent grants"; the grants were kept."""
    import json
    import time

    from gateway.egress.outbox import Outbox
    from gateway.telemetry.consent import ConsentState
    from gateway.telemetry.policy import Category
    from tests.egress.test_outbox import _released

    ob = Outbox(tmp_path / "o.sqlite")
    ob.put_many(_released(ob, 3))
    ob.close()
    state = ConsentState()
    state.grant(Category.LOCATION, time.time() + 3600, time.time(), 30)
    consent = tmp_path / "consent-V.json"  # _released's vehicle
    state.save(consent)
    (tmp_path / "l.jsonl").touch()
    common = _vehicle_v(tmp_path)
    proc = run_gateway("data", "delete", "--category", "all", *common)
    assert proc.returncode == 0, proc.stderr
    assert "deleted 3 waiting message(s) of category all and withdrew the consent for location" in (
        proc.stdout
    )
    assert json.loads(consent.read_text())["grants"] == {}
    assert ConsentState.load(consent).grants == {}


def _config_with_signal(tmp_path, signal: str):
    """A config whose policy publishes one signal, with the Kona P-CAN DBC on can0."""
    (tmp_path / "mine.toml").write_text(
        f'[policy]\nname = "mine"\n[[signal]]\nsignal = "{signal}"\npublish_as = "soc"\n'
    )
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\npolicy = "mine.toml"\n[dbc]\ncan0 = "{KONA_PCAN}"\n')
    return cfg


def test_gateway_config_warns_of_policy_signals_its_dbcs_lack(tmp_path):
    """The policy's typos were said only when a run started; config checks without running."""
    cfg = _config_with_signal(tmp_path, "BMS_542.SocDsip")
    proc = run_gateway("config", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "config OK" in proc.stdout
    assert "no signal SocDsip (did you mean BMS_542.SocDisp?)" in proc.stderr


def test_another_vehicles_ledger_or_outbox_is_refused(tmp_path, broker):
    """Two gateways configured with the same files: B sent A's waiting summaries under B's
    login (the broker's ACL drops them after a PUBACK: lost), exported and deleted them as B's,
    and the two vehicles' records interleaved in one hash chain."""
    from gateway.egress.ledger import Ledger
    from gateway.egress.outbox import Outbox
    from tests.egress.test_outbox import _released

    # GIVEN vehicle V's ledger, and 3 of its summaries waiting in the outbox (each recorded)
    led = Ledger(tmp_path / "l.jsonl")
    led.append("start", vin="V")
    ob = Outbox(tmp_path / "o.sqlite")
    waiting = _released(ob, 3)
    for m in waiting:
        led.append("egress", topic=m.topic, seq=m.seq, schema=m.schema, sha256=m.sha256)
    led.close()
    ob.put_many(waiting)
    ob.close()
    common = ["--ledger", str(tmp_path / "l.jsonl"), "--outbox", str(tmp_path / "o.sqlite")]
    # WHEN vehicle B runs, exports or deletes on the same files: refused, nothing touched
    b = _replay(
        tmp_path, str(KONA_CSV), "--dbc", str(KONA_PCAN), "--fast", "--vin", "VEHICLEB",
        broker=broker.url,
    )  # fmt: skip
    assert_one_line_error(b, "o.sqlite: holds summaries for vehicles/V, not vehicles/VEHICLEB")
    for data in (["export"], ["delete", "--category", "all"]):
        proc = run_gateway("data", *data, "--vin", "VEHICLEB", *common)
        assert_one_line_error(proc, "holds summaries for vehicles/V, not vehicles/VEHICLEB")
        assert "give --vin V;" in proc.stderr  # (a forgotten --vin is the likelier mistake)
    ob = Outbox(tmp_path / "o.sqlite")
    assert ob.depth() == 3
    ob.close()
    # THEN vehicle V itself sends them
    v = run_gateway(
        "replay", str(KONA_CSV), "--dbc", str(KONA_PCAN), "--fast", "--vin", "V",
        "--broker", broker.url, *common, "-q",
    )  # fmt: skip
    assert v.returncode == 0, v.stderr
    # and with the outbox empty, V's ledger is still refused to B
    b = _replay(
        tmp_path, str(KONA_CSV), "--dbc", str(KONA_PCAN), "--fast", "--vin", "VEHICLEB",
        broker=broker.url,
    )  # fmt: skip
    assert_one_line_error(b, "l.jsonl: the audit ledger of vehicle V, not VEHICLEB")
    assert "give --vin V;" in b.stderr


def test_a_config_or_password_file_that_is_not_utf8_is_one_line(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_bytes(b"\xff\xfe[gateway]\n")
    assert_one_line_error(run_gateway("config", "--config", str(cfg)), "not UTF-8 text")
    (tmp_path / "pw").write_bytes(b"\xff\xfe\n")
    cfg.write_text('[broker]\nusername = "u"\npassword_file = "pw"\n')
    proc = run_gateway("owner", "--config", str(cfg), "--count", "1", "--idle-timeout", "1")
    assert_one_line_error(proc, "pw: cannot read the broker password (not UTF-8 text)")


def test_a_topic_prefix_with_a_leading_slash_is_still_taken(tmp_path):
    """Legal MQTT (an empty first level) and in use: refusing it stopped such a deployment."""
    cfg = tmp_path / "gateway.toml"
    cfg.write_text("[broker]\ntopic_prefix = '/fleet'\n")
    proc = run_gateway("config", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr


def test_a_port_that_accepts_but_does_not_speak_mqtt_is_said_to_be_one(tmp_path):
    import socket
    import threading

    # GIVEN a TCP service that accepts connections and never answers (an HTTP server does so)
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True).start()
    try:
        url = f"mqtt://127.0.0.1:{server.getsockname()[1]}"
        proc = run_gateway(
            "replay", str(FIXTURES / "kona_ev_2019" / "bms_idle_log_30sec.asc"), "--dbc", str(KONA_PCAN), "--fast",
            "-q", "--broker", url, "--ledger", str(tmp_path / "l.jsonl"),
            "--outbox", str(tmp_path / "o.sqlite"),
        )  # fmt: skip
    finally:
        for s in (*held, server):
            s.close()
    # THEN the one line says what a timeout there can mean, not only that it timed out
    assert_one_line_error(proc, url, "no MQTT answer in time", "mqtts://")


@pytest.mark.broker
def test_a_log_without_a_single_frame_is_named_in_the_report(tmp_path, broker):
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.asc"  # text, but no frame (binary data is refused at once)
    noise.write_text("date Mon Jan 01 00:00:00.000 2024\nbase hex  timestamps absolute\n" * 20)
    proc = _replay(
        tmp_path, str(empty), str(noise), str(KONA_CSV), "--dbc", str(KONA_PCAN), "--fast",
        broker=broker.url,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if "no frame in it" in ln]
    assert [ln.split(":")[0].strip() for ln in said] == [str(empty), str(noise)], proc.stderr


def test_a_gateway_refused_for_a_busy_outbox_leaves_no_empty_ledger_behind(tmp_path):
    from gateway.app import Gateway
    from gateway.egress.outbox import Outbox
    from gateway.errors import StorageError

    held = Outbox(tmp_path / "o.sqlite")  # another gateway's, running
    try:
        with pytest.raises(StorageError, match="in use by another gateway process"):
            Gateway(gateway_settings(tmp_path, {"can0": [str(KONA_PCAN)]}), [])
    finally:
        held.close()
    assert not (tmp_path / "l.jsonl").exists()


def test_the_tls_hint_names_tls_ca_only_when_the_url_does_not_ask_for_tls():
    from gateway.egress.mqtt import describe_error
    from gateway.settings import BrokerSettings

    err = OSError("SSL: WRONG_VERSION_NUMBER")
    for url in ("mqtts://h:8883", "ssl://h:8883"):
        assert "tls_ca" not in describe_error(BrokerSettings(url=url, tls_ca="ca.pem"), err)
    said = describe_error(BrokerSettings(url="mqtt://h:1883", tls_ca="ca.pem"), err)
    assert "TLS is on because tls_ca is set" in said


def test_gateway_config_warns_of_a_misspelt_message_and_a_missing_camera_clip(tmp_path):
    cfg = _config_with_signal(tmp_path, "BMS_54.SocDisp")
    proc = run_gateway("config", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "BMS_54.SocDisp is in none of the DBCs given (did you mean BMS_542?)" in proc.stderr
    cfg.write_text(cfg.read_text() + '[[camera]]\nsource = "nope.mp4"\n')
    proc = run_gateway("config", "--config", str(cfg), cwd=tmp_path)
    assert_one_line_error(proc, "[[camera]] #1: source", "nope.mp4: no such video file")


def test_an_empty_ledger_does_not_verify_as_ok(tmp_path):
    (tmp_path / "l.jsonl").write_text("")
    proc = run_gateway("audit", "verify", str(tmp_path / "l.jsonl"))
    assert proc.returncode == 1 and "ledger OK" not in proc.stdout
    assert "holds no entry: nothing to verify" in proc.stderr


def test_data_delete_takes_every_consent_category(tmp_path):
    from gateway.egress.ledger import Ledger
    from gateway.egress.outbox import Outbox

    led = Ledger(tmp_path / "l.jsonl")
    led.append("start", vin="V")
    led.close()
    Outbox(tmp_path / "o.sqlite").close()
    common = _vehicle_v(tmp_path)
    for category in ("cabin", "biometric"):
        proc = run_gateway("data", "delete", "--category", category, *common)
        assert proc.returncode == 0 and "deleted 0 waiting message(s)" in proc.stdout, proc.stderr


def test_gateway_config_warns_of_a_live_bus_no_dbc_applies_to(tmp_path):
    # GIVEN the README's vcan recipe with the DBC on can0 and the bus named by its channel
    cfg = _config_with_signal(tmp_path, "BMS_542.SocDisp")
    cfg.write_text(cfg.read_text() + "[[can]]\ninterface = 'socketcan'\nchannel = 'vcan0'\n")
    proc = run_gateway("config", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[[can]] #1: no DBC applies to bus 'vcan0' ([dbc] names can0)" in proc.stderr
    # THEN named as the [dbc] names it, it is quiet
    cfg.write_text(cfg.read_text() + "name = 'can0'\n")
    proc = run_gateway("config", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0 and "no DBC applies" not in proc.stderr, proc.stderr


def test_gateway_config_suggests_no_far_message_for_another_vehicle_s_signals(tmp_path):
    """The bundled policy serves a Kona and a Model 3: checked with the Kona's DBC, its Model 3
    signals drew warnings with far suggestions ("ID118DriveSystemStatus ... did you mean
    InverterStatus?"), which a replay did not say."""
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[dbc]\ncan0 = "{KONA_PCAN}"\n')
    proc = run_gateway("config", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "did you mean" not in proc.stderr and "ID118DriveSystemStatus" not in proc.stderr


def test_one_file_given_as_both_the_ledger_and_the_outbox_is_named(tmp_path):
    # it was "the outbox is in use by another gateway process", which was not what was wrong
    same = str(tmp_path / "files")
    for argv in (["data", "export"], ["replay", str(KONA_CSV), "--dbc", str(KONA_PCAN)]):
        proc = run_gateway(*argv, "--ledger", same, "--outbox", same, cwd=tmp_path)
        assert_one_line_error(proc, "given as both the ledger and the outbox")
