"""``gateway validate``: passes on the default policy, fails naming the leak otherwise."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from gateway.egress.schema import pack
from gateway.validate import Canaries, Observed, search
from tests.conftest import FIXTURES, SHARED_CAN, run_gateway

pytestmark = pytest.mark.broker


def _dbc():
    for p in (
        FIXTURES / "model3" / "Model3CAN.dbc",
        SHARED_CAN / "tesla_model3_dbc_only" / "Model3CAN.dbc",
    ):
        if p.exists():
            return p
    pytest.skip("Model3CAN.dbc not found")


@pytest.fixture(scope="module")
def drive(tmp_path_factory):
    """A small drive written here with the real DBC: GPS at 1 Hz moving ~15 m/s, SOC falling."""
    from gateway.canbus.dbc import load_dbc

    db = load_dbc(_dbc())
    gps, soc = db.get_message_by_name("ID04FGPSLatLong"), db.get_message_by_name("ID292BMS_SOC")
    lines = []
    for i in range(400):
        t = 1_800_000_000.0 + i
        g = gps.encode(
            {
                "GPSLatitude04F": round(31.22 + i * 1e-4, 6),
                "GPSLongitude04F": round(121.45 + i * 1e-4, 6),
                "GPSAccuracy04F": 1.0,
            }
        )
        f = {s.name: 0 for s in soc.signals}
        f["SOCUI292"] = round(80 - i * 0.01, 1)
        lines.append(f"({t:.6f}) can0 04F#{g.hex().upper()}\n")
        lines.append(f"({t + 0.5:.6f}) can0 292#{soc.encode(f, strict=False).hex().upper()}\n")
    path = tmp_path_factory.mktemp("drive") / "drive.log"
    path.write_text("".join(lines))
    return path


def _validate(tmp_path, drive, *extra):
    return run_gateway(
        "validate",
        "--log",
        str(drive),
        "--dbc",
        str(_dbc()),
        "--out",
        str(tmp_path / "report"),
        *extra,
    )


def test_default_policy_passes_and_the_report_says_what_was_searched(tmp_path, drive):
    proc = _validate(tmp_path, drive)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verdict: no leak" in proc.stdout
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["verdict"] == "no leak" and report["leak_count"] == 0
    assert report["canaries"]["positions"] == 12 and report["canaries"]["raw_payloads"] == 24
    assert report["canaries"]["true_positions_checked"] == 400 + 12
    assert not any(k.startswith("gateway.location") for k in report["egress_by_schema_and_rule"])
    assert (
        (tmp_path / "report" / "report.md")
        .read_text()
        .startswith("# Residency validation: **no leak**")
    )


def test_a_locked_down_brokers_gateway_config_validates_on_validates_own_broker(tmp_path, drive):
    """A broker-config gateway config (TLS CA, user, password file) given to validate without
    --broker: validate's own plain broker was spoken to with TLS ('connection reset')."""
    (tmp_path / "ca.crt").write_text("not read: validate's own broker is plain\n")
    (tmp_path / "gw.password").write_text("secret\n")
    cfg = tmp_path / "gateway-V.toml"
    cfg.write_text(
        '[broker]\nurl = "mqtts://127.0.0.1:8883"\ntls_ca = "ca.crt"\nusername = "gateway-V"\n'
        'password_file = "gw.password"\n'
    )
    proc = _validate(tmp_path, drive, "--config", str(cfg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verdict: no leak" in proc.stdout


def test_with_location_consent_coarse_positions_pass(tmp_path, drive):
    proc = _validate(tmp_path, drive, "--consent", "location:1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert any(k.startswith("gateway.location") for k in report["egress_by_schema_and_rule"])


def test_a_policy_that_permits_raw_location_fails_naming_the_leak(tmp_path, drive):
    leaky = tmp_path / "leaky.toml"
    leaky.write_text(
        '[[signal]]\nsignal = "ID04FGPSLatLong.GPSLatitude04F"\npublish_as = "lat"\n'
        'aggregates = ["last"]\n'
    )
    proc = _validate(tmp_path, drive, "--policy", str(leaky))
    assert proc.returncode == 1
    assert "verdict: LEAK" in proc.stdout
    assert "position without location consent" in proc.stdout and "signals.lat.last" in proc.stdout


def test_location_consented_but_not_coarsened_is_caught(tmp_path, drive):
    sloppy = tmp_path / "sloppy.toml"
    sloppy.write_text(
        '[[signal]]\nsignal = "ID04FGPSLatLong.GPSLongitude04F"\npublish_as = "lon"\n'
        'category = "location"\naggregates = ["last"]\n'
    )
    proc = _validate(tmp_path, drive, "--policy", str(sloppy), "--consent", "location:1")
    assert proc.returncode == 1
    assert "position finer than the policy grid" in proc.stdout


def test_retained_messages_already_on_a_shared_broker_are_not_this_runs_egress(
    tmp_path, drive, broker
):
    import asyncio

    import aiomqtt

    # GIVEN a shared broker holding retained messages of another vehicle (and of earlier runs)
    host, port = broker.url.removeprefix("mqtt://").split(":")

    async def retain() -> None:
        async with aiomqtt.Client(host, int(port)) as c:
            await c.publish("vehicles/OTHERVIN/status", b"someone else's", qos=1, retain=True)
            await c.publish(
                "vehicles/OTHERVIN/owner/consent", pack({"lat": 31.2345}), qos=1, retain=True
            )

    asyncio.run(retain())
    # WHEN validate runs against it
    proc = _validate(tmp_path, drive, "--broker", broker.url)
    # THEN they are not judged: no unledgered egress, no position
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verdict: no leak" in proc.stdout


def test_validate_on_a_broker_a_gateway_of_its_vin_is_connected_to_leaves_it_connected(
    tmp_path, drive, broker
):
    # validate spoke to an existing broker as gateway-VIN, the id of a gateway of that VIN: the
    # broker closed the running gateway's connection ("connection lost; reconnecting")
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    up, lost = threading.Event(), threading.Event()
    gw = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="gateway-TESTVIN0000000001")
    gw.on_connect = lambda *a: up.set()
    gw.on_disconnect = lambda *a: lost.set()
    host, port = broker.url.removeprefix("mqtt://").split(":")
    gw.connect(host, int(port))
    gw.loop_start()
    try:
        assert up.wait(5)
        proc = _validate(tmp_path, drive, "--broker", broker.url)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert not lost.is_set()
    finally:
        gw.disconnect()
        gw.loop_stop()
        gw.on_connect = gw.on_disconnect = None


def test_search_finds_raw_payloads_as_bytes_and_hex_and_the_vin():
    can = Canaries(
        positions=[], vin="CANARY12345678901", payloads=[bytes.fromhex("0123456789abcdef")]
    )
    observed = [
        Observed("t/a", b"xx\x01\x23\x45\x67\x89\xab\xcd\xefyy", False),
        Observed("t/b", pack({"note": "0123456789ABCDEF"}), False),
        Observed("t/c", pack({"v": "CANARY12345678901"}), False),
        Observed("t/d", pack({"ok": 1.5}), False),
    ]
    leaks = search(observed, can, [], False, 1000)
    assert sorted((lk.kind, lk.topic) for lk in leaks) == [
        ("canary text", "t/c"),
        ("raw CAN payload", "t/a"),
        ("raw CAN payload", "t/b"),
    ]


@pytest.mark.parametrize("shift", [0, 1, 2])
def test_a_canary_payload_or_the_vin_in_base64_is_found_at_any_alignment(shift):
    # a sloppy uplink puts binary into JSON as base64: the payload may start anywhere in the
    # 3-byte groups of what was encoded, and the alphabet may be the URL-safe one
    raw = bytes.fromhex("f255ff867cf954ff94")
    can = Canaries(positions=[], vin="CANARY12345678901", payloads=[raw])
    before = bytes(range(7, 7 + shift))
    # (at every alignment its base64 holds both + and /, which the URL-safe alphabet replaces)
    assert {"+", "/"} <= set(base64.b64encode(before + raw).decode())
    std = base64.b64encode(before + raw + b"\x99\x98").decode()
    observed = [
        Observed("t/json", json.dumps({"blob": std}).encode(), False),
        Observed("t/url", pack({"b": base64.urlsafe_b64encode(before + raw).decode()}), False),
        Observed("t/vin", base64.b64encode(before + b"CANARY12345678901"), False),
        # other bytes in base64, and the payload cut short: nothing
        Observed("t/other", base64.b64encode(before + raw[:5] + bytes(4)), False),
    ]
    leaks = search(observed, can, [], False, 1000)
    assert sorted((lk.kind, lk.topic) for lk in leaks) == [
        ("canary text", "t/vin"),
        ("raw CAN payload", "t/json"),
        ("raw CAN payload", "t/url"),
    ]


def test_a_canary_in_base64_broken_into_lines_or_in_separated_hex_is_found():
    # e-mail's base64 breaks lines every 76 characters (in JSON the break reads "\\n"); loggers
    # print bytes as "01 23 ..", "01:23:.." or "01-23-.."
    raw = bytes.fromhex("f255ff867cf954ff94")
    can = Canaries(positions=[], vin="CANARY12345678901", payloads=[raw])
    filler = bytes(range(50, 105))  # puts the payload across the first line break
    mime = base64.encodebytes(filler + raw + bytes(40))
    assert mime.index(b"\n") < len(base64.b64encode(filler + raw))
    vin_mime = base64.encodebytes(filler + b"CANARY12345678901")
    observed = [
        Observed("t/mime", pack({"blob": mime.decode()}), False),
        Observed("t/json", json.dumps({"blob": mime.decode()}).encode(), False),
        Observed("t/crlf", mime.replace(b"\n", b"\r\n"), False),
        Observed("t/vin", json.dumps({"v": vin_mime.decode()}).encode(), False),
        Observed("t/colon", pack({"d": raw.hex(":")}), False),
        Observed("t/spaced", ("DATA " + raw.hex(" ").upper()).encode(), False),
        Observed("t/dash", raw.hex("-").encode(), False),
        Observed("t/slash", json.dumps({"b": mime.decode()}).replace("/", "\\/").encode(), False),
        Observed("t/hexlines", (raw[:4].hex(" ") + "\n" + raw[4:].hex(" ")).encode(), False),
        # other bytes broken into lines, and the payload cut short: nothing
        Observed("t/other", base64.encodebytes(filler + raw[:5] + bytes(40)), False),
        Observed("t/short", raw[:5].hex(" ").encode(), False),
    ]
    leaks = search(observed, can, [], False, 1000)
    assert sorted((lk.kind, lk.topic) for lk in leaks) == [
        ("canary text", "t/vin"),
        *[("raw CAN payload", t) for t in ("t/colon", "t/crlf", "t/dash", "t/hexlines")],
        ("raw CAN payload", "t/json"),
        ("raw CAN payload", "t/mime"),
        ("raw CAN payload", "t/slash"),
        ("raw CAN payload", "t/spaced"),
    ]


def test_an_exact_canary_position_packed_as_a_binary_number_is_found():
    lat, lon = 31.2219683, 121.337214
    can = Canaries(positions=[(lat, lon)], vin="CANARY12345678901")
    decoded = 121337214 * 1e-6  # as the gateway decodes it from a DBC of 1e-6 degrees
    assert decoded != lon
    observed = [
        Observed("t/f64", b"hdr" + struct.pack("<d", lat), False),
        Observed("t/decoded", b"hdr" + struct.pack(">d", decoded), False),
        Observed("t/f32", b"hdr" + struct.pack(">f", lat), False),
        Observed("t/e7", b"hdr" + struct.pack("<i", round(lon * 1e7)), False),
        Observed("t/near", b"hdr" + struct.pack("<d", lat + 1e-4), False),  # another place
    ]
    leaks = search(observed, can, [], False, 1000)
    assert sorted({(lk.kind, lk.topic) for lk in leaks}) == [
        ("canary position, binary", "t/decoded"),
        ("canary position, binary", "t/e7"),
        ("canary position, binary", "t/f32"),
        ("canary position, binary", "t/f64"),
    ]


def test_a_position_is_judged_by_its_precision_not_by_a_figure_that_falls_near_it():
    # GIVEN a drive around (31.234567, 121.456789)
    truth = [(31.234567, 121.456789), (31.240001, 121.460002)]
    can = Canaries(positions=[], vin="CANARY12345678901")
    observed = [  # the gateway's own figures that happen to fall in the drive's band
        Observed("v/owner/health", pack({"cpu_percent": 31.2, "rss_mb": 121.5, "n": 31}), False),
        Observed("v/owner/signals", pack({"lat": 31.234567}), False),  # exact: a leak
        Observed("v/owner/signals", pack({"lon": 121.46}), False),  # 0.01: finer than 0.1
        Observed("v/owner/trip", pack({"a": 31.2, "b": 121.5}), False),  # a coarse pair
    ]
    leaks = search(observed, can, truth, False, 1000)
    # THEN the figures pass, both coordinates given finer than 0.1 are leaks, and so is a
    # latitude and longitude pair at 0.1 (about 11 km, without consent)
    assert [(lk.topic, lk.detail.split(" = ")[0]) for lk in leaks] == [
        ("v/owner/signals", "lat"),
        ("v/owner/signals", "lon"),
        ("v/owner/trip", "a"),
    ]


def test_a_position_as_integers_of_micro_degrees_is_a_leak():
    """A policy that publishes GPS signals of another DBC's scale (1e-6 degrees) put the exact
    position out as 31221968 and 121456789, and the search, in degrees only, said no leak."""
    truth = [(31.221968, 121.456789), (31.23, 121.46)]
    can = Canaries(positions=[], vin="CANARY12345678901")
    observed = [
        Observed("v/owner/signals", pack({"a": {"last": 31221968.0}, "b": 121456789}), False),
        Observed("v/owner/signals", pack({"x": 312219680, "y": 1214567890}), False),  # E7
        # a latitude alone, and numbers merely of that size: not judged (see search())
        Observed("v/owner/signals", pack({"odometer_m": 31221968, "frames": 12146000}), False),
        Observed("v/owner/signals", pack({"lat_e6": 31221968, "lon_e6": 121460000}), False),
    ]
    leaks = search(observed, can, truth, False, 1000)
    # THEN both encoded pairs are found, and nothing else
    assert [lk.detail.split(" = ")[0] for lk in leaks] == ["a.last", "x"]
    assert "31.221968, 121.456789" in leaks[0].detail


def test_bundled_synthetic_drive_validates_with_no_leak(tmp_path):
    assert (FIXTURES / "model3" / "model3_synthetic_drive.log").exists()
    proc = run_gateway("validate", "--out", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verdict: no leak" in proc.stdout


def test_gps_signals_found_by_their_name_words_and_a_log_without_them_is_said(tmp_path, drive):
    # GIVEN the Model 3 DBC with its GPS signals renamed GNSS_Lat04F / GNSS_Lon04F, and a
    # policy that publishes the latitude as a plain vehicle status
    text = _dbc().read_text(encoding="cp1252")
    renamed = tmp_path / "gnss.dbc"
    renamed.write_text(
        text.replace("GPSLatitude04F", "GNSS_Lat04F").replace("GPSLongitude04F", "GNSS_Lon04F"),
        encoding="cp1252",
    )
    leaky = tmp_path / "leaky.toml"
    leaky.write_text(
        '[[signal]]\nsignal = "ID04FGPSLatLong.GNSS_Lat04F"\npublish_as = "lat"\n'
        'aggregates = ["last"]\n'
    )
    args = ["--log", str(drive), "--dbc", str(renamed), "--policy", str(leaky)]
    proc = run_gateway("validate", *args, "--out", str(tmp_path / "r1"))
    # THEN the leak is found (the positions were not searched at all before: 'no leak')
    assert proc.returncode == 1 and "position without location consent" in proc.stdout
    # and a log whose DBC has no position signal at all is not called clean without a word
    kona = run_gateway(
        "validate", "--log", str(FIXTURES / "kona_ev_2019" /
        "230112-7-2019-pcan-ccan-power-off-on-ready-off.converted.candump.log"),
        "--dbc", str(FIXTURES / "kona_ev_2019" / "kona_pcan.cantools.dbc"),
        "--out", str(tmp_path / "r2"),
    )  # fmt: skip
    assert kona.returncode == 0 and "positions NOT checked" in kona.stdout


def test_the_salt_is_not_searched_but_anything_else_under_its_name_is():
    """A message's salt (32 random hex digits) is made zeros before the byte search, so that a
    4-byte needle cannot match random bytes; a value of another form under that name, or the
    same digits elsewhere in the message, is searched as every other byte."""
    from gateway.egress.schema import pack
    from gateway.validate import _unsalted

    salt = "0123456789abcdef" * 2
    payload = pack({"schema": "gateway.signals", "seq": 1, "salt": salt, "signals": {}})
    assert salt.encode() not in _unsalted(payload) and len(_unsalted(payload)) == len(payload)
    for other in (
        {"schema": "gateway.signals", "salt": "X" + salt[1:]},  # not hex
        {"schema": "gateway.signals", "salt": salt + "00"},  # longer
        {"schema": "gateway.signals", "note": {"salt": salt}, "salt": "f" * 32},  # elsewhere
    ):
        packed = pack(other)
        kept = _unsalted(packed)
        assert (salt.encode() in kept) == (salt.encode() in packed), other


def test_the_report_counts_the_fixes_inside_each_geofence_so_a_misplaced_one_shows(tmp_path, drive):
    """A fence typed with a wrong digit inside the valid ranges cannot be refused when the
    policy is read, and validate said "no leak" while positions by the intended place left:
    the report now counts the fixes held back inside each fence, and a fence the drive passes
    through that holds none stands out."""
    from importlib import resources

    text = resources.files("gateway.data").joinpath("policy_default.toml").read_text()
    # the drive runs from (31.22, 121.45) north-east, 1e-4 deg a second, for 400 s
    text += "\n[[policy.geofence]]\nname = 'on_route'\nlat = 31.23\nlon = 121.46\nradius_m = 300\n"
    text += "\n[[policy.geofence]]\nname = 'typo'\nlat = 31.23\nlon = 112.46\nradius_m = 300\n"
    policy = tmp_path / "fenced.toml"
    policy.write_text(text)
    proc = _validate(tmp_path, drive, "--policy", str(policy), "--consent", "location:1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fences = json.loads((tmp_path / "report" / "report.json").read_text())["geofences"]
    assert list(fences) == ["on_route"] + ["typo"]
    assert fences["on_route"] > 0 and fences["typo"] == 0, fences
    assert f"inside each geofence (held back): on_route {fences['on_route']}, typo 0" in proc.stdout
    assert "typo 0" in (tmp_path / "report" / "report.md").read_text()
