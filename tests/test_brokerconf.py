"""`gateway broker-config` against a real Mosquitto running the generated configuration: only
a vehicle's owner reads its channel, a gateway writes only its own prefix, TLS works, and no
generated password shows up where it should not."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway import brokerconf, cli
from gateway.brokerconf import BrokerPlan, acl_rules, hash_password, verify_password
from gateway.egress.schema import unpack
from gateway.errors import BrokerError
from gateway.localbroker import find_mosquitto, free_port, wait_for_port
from gateway.settings import load
from tests.conftest import KONA, KONA_PCAN, assert_one_line_error, run_gateway

pytestmark = pytest.mark.broker
LOG = KONA / "bms_idle_log_30sec.asc"  # 30 s of a real Kona EV P-CAN: a quick replay
NOT_AUTHORISED = 135  # MQTT 5 reason code in a PUBACK for a publish the ACL denies


# -- the bench: one generated configuration, one Mosquitto, for the whole file ---------------
@dataclass
class Bench:
    out: Path
    port: int
    tls_port: int
    vin_a: str
    vin_b: str
    stdout: str
    admin_password: str

    def password(self, user: str) -> str:
        return (self.out / "secrets" / f"{user}.password").read_text().strip()

    def secrets(self) -> list[str]:
        return [p.read_text().strip() for p in (self.out / "secrets").iterdir()]

    @property
    def ca(self) -> Path:
        return self.out / "tls" / "ca.crt"


def _generate(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="gateway")
    brokerconf.add_parser(parser.add_subparsers())
    args = parser.parse_args(["broker-config", *argv])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        assert args.func(args) == 0
    return buf.getvalue()


@pytest.fixture(scope="module")
def bench() -> Iterator[Bench]:
    # a world-traversable folder: Mosquitto started as root drops to the `mosquitto` account,
    # exactly as it does under systemd on the Pi, and must still reach its files
    with tempfile.TemporaryDirectory(prefix="gateway-brokerconf-") as tmp:
        os.chmod(tmp, 0o755)
        out = Path(tmp) / "broker"
        port, tls_port = free_port(), free_port()
        while tls_port == port:
            tls_port = free_port()
        suffix = uuid.uuid4().hex[:12].upper()
        vin_a, vin_b = f"VINA{suffix}", f"VINB{suffix}"
        stdout = _generate(
            ["--out", str(out), "--vin", vin_a, "--vin", vin_b,
             "--owner", f"alice={vin_a}", "--owner", f"bob={vin_b}",
             "--bind", "127.0.0.1", "--port", str(port),
             "--tls", "--tls-port", str(tls_port)]
        )  # fmt: skip
        # a test-only observer with read access to everything, to see what the ACL lets through
        admin_password = "admin-" + uuid.uuid4().hex
        with open(out / "passwd", "a") as fh:
            fh.write(f"admin:{hash_password(admin_password)}\n")
        with open(out / "acl", "a") as fh:
            fh.write("\nuser admin\ntopic read #\n")
        proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(out / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            try:
                wait_for_port("127.0.0.1", port)
                wait_for_port("127.0.0.1", tls_port)
            except BrokerError:
                log = out / "mosquitto.log"
                text = log.read_text(errors="replace") if log.exists() else "(no log)"
                pytest.fail(f"mosquitto did not start with the generated config: {text[-500:]}")
            yield Bench(out, port, tls_port, vin_a, vin_b, stdout, admin_password)
        finally:
            proc.terminate()
            proc.wait(10)


# -- an MQTT client of the test (paho, synchronous) ------------------------------------------
@dataclass
class Client:
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: Path | None = None
    protocol: int = mqtt.MQTTv311
    connect_timeout: float = 5.0
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    connected: bool = False
    refused: str = ""

    def __post_init__(self) -> None:
        self._answer = threading.Event()
        self.lost = threading.Event()  # set when an established connection drops
        self._acks: dict[int, threading.Event] = {}
        self.reasons: dict[int, int] = {}
        self._c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="test-" + uuid.uuid4().hex[:10],
            protocol=self.protocol,
        )
        if self.username is not None:
            self._c.username_pw_set(self.username, self.password)
        if self.ca is not None:
            self._c.tls_set(ca_certs=str(self.ca))
        self._c.on_connect = self._on_connect
        self._c.on_disconnect = self._on_disconnect
        self._c.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self._c.on_subscribe = self._on_ack
        self._c.on_publish = self._on_publish
        try:
            self._c.connect("127.0.0.1", self.port, keepalive=30)
        except OSError as exc:  # ssl.SSLError is an OSError
            self.refused = f"{type(exc).__name__}: {exc}"
            return
        self._c.loop_start()
        if not self._answer.wait(self.connect_timeout):
            self.refused = self.refused or "no CONNACK"
        if not self.connected:
            self.close()

    def _on_connect(self, c, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            self.refused = str(reason_code)
        else:
            self.connected = True
        self._answer.set()

    def _on_disconnect(self, c, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if self.connected:
            self.lost.set()
        else:
            self.refused = self.refused or f"disconnected: {reason_code}"
            self._answer.set()

    def _on_ack(self, c, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        self._acks.setdefault(mid, threading.Event()).set()

    def _on_publish(self, c, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        self.reasons[mid] = reason_code.value
        self._acks.setdefault(mid, threading.Event()).set()

    def _wait(self, mid: int) -> None:
        assert self._acks.setdefault(mid, threading.Event()).wait(5), f"no ack for mid {mid}"

    def subscribe(self, *topics: str) -> Client:
        for topic in topics:
            _, mid = self._c.subscribe(topic, qos=1)
            self._wait(mid)
        return self

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish with QoS 1 and wait for the PUBACK; returns its reason code (MQTT 5)."""
        info = self._c.publish(topic, payload, qos=1)
        self._wait(info.mid)
        return self.reasons.get(info.mid, 0)

    def wait_for(self, payload: bytes, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p == payload for _, p in self.messages):
                return
            time.sleep(0.02)
        raise AssertionError(f"{payload!r} did not arrive; got {self.messages}")

    def settle(self, quiet: float = 0.3, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        """Wait until nothing arrived for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        n = -1
        while n != len(self.messages) and time.monotonic() < deadline:
            n = len(self.messages)
            time.sleep(quiet)
        return self.messages

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._c.disconnect()
        self._c.loop_stop()
        # paho's client refers back to this one through its callbacks: without them it is
        # freed (and its socket pair closed) when this one is, not by a later collection
        # that says the pair unclosed inside another test
        c = self._c
        c.on_connect = c.on_disconnect = c.on_message = c.on_subscribe = c.on_publish = None


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def _client(made: list[Client], *args: object, **kwargs: object) -> Client:
    c = Client(*args, **kwargs)  # type: ignore[arg-type]
    made.append(c)
    return c


def _marker(name: str) -> bytes:
    return f"{name}-{uuid.uuid4().hex}".encode()


# -- the channel is the owner's alone ---------------------------------------------------------
def test_only_the_vehicles_owner_receives_its_channel(bench, clients):
    a, port = bench.vin_a, bench.port
    # GIVEN listeners on VIN A's channel: its owner (the positive control), an anonymous
    # client, its owner's name with a wrong password, and the owner of another vehicle
    alice = _client(clients, port, "alice", bench.password("alice"))
    alice_tls = _client(clients, bench.tls_port, "alice", bench.password("alice"), ca=bench.ca)
    anonymous = _client(clients, port)
    wrong = _client(clients, port, "alice", "not-" + bench.password("alice"))
    wrong_tls = _client(clients, bench.tls_port, "alice", "x", ca=bench.ca)
    bob = _client(clients, port, "bob", bench.password("bob"))
    assert alice.connected and alice_tls.connected and bob.connected
    assert not anonymous.connected and "authori" in anonymous.refused.lower()
    assert not wrong.connected and "authori" in wrong.refused.lower()
    assert not wrong_tls.connected
    for c in (alice, alice_tls):
        c.subscribe(f"vehicles/{a}/owner/#")
    bob.subscribe(f"vehicles/{a}/owner/#", f"vehicles/{a}/#", "#")  # Mosquitto grants the
    # subscription and filters on delivery, so bob's subscribe succeeds but must yield nothing
    # WHEN VIN A's gateway publishes on several streams
    gateway = _client(clients, port, f"gateway-{a}", bench.password(f"gateway-{a}"))
    sent = []
    for stream in ("signals", "health", "trips", "consent"):
        sent.append(_marker(stream))
        assert gateway.publish(f"vehicles/{a}/owner/{stream}", sent[-1]) == 0
    # THEN the owner receives every message, on both listeners ...
    for c in (alice, alice_tls):
        c.wait_for(sent[-1])
        assert [p for _, p in c.messages if p in sent] == sent
    time.sleep(0.3)  # the broker fanned out to everyone at once; let it land
    # ... and nobody else receives anything at all
    assert bob.messages == []
    for c in (anonymous, wrong, wrong_tls):
        assert c.messages == []


def test_a_gateway_cannot_publish_outside_its_own_owner_prefix(bench, clients):
    a, b, port = bench.vin_a, bench.vin_b, bench.port
    # GIVEN an observer allowed to read everything, and VIN B's owner and gateway listening
    admin = _client(clients, port, "admin", bench.admin_password).subscribe("#")
    bob = _client(clients, port, "bob", bench.password("bob")).subscribe(f"vehicles/{b}/owner/#")
    gateway_b = _client(clients, port, f"gateway-{b}", bench.password(f"gateway-{b}"))
    gateway_b.subscribe(f"vehicles/{b}/owner/consent/set", f"vehicles/{b}/owner/command")
    # WHEN VIN A's gateway (MQTT 5, to see the broker's verdict) publishes on foreign topics
    gateway_a = _client(
        clients, port, f"gateway-{a}", bench.password(f"gateway-{a}"), protocol=mqtt.MQTTv5
    )
    foreign = [
        f"vehicles/{b}/owner/signals",  # a summary in another vehicle's name
        f"vehicles/{b}/owner/command",  # an owner command to another vehicle
        f"vehicles/{b}/owner/consent/set",
        f"vehicles/{a}/status",  # its own VIN, but outside owner/
        f"vehicles/{a}",
        "vehicles/broadcast",
        "elsewhere/anything",
    ]
    for topic in foreign:
        assert gateway_a.publish(topic, _marker("foreign")) == NOT_AUTHORISED, topic
    control = _marker("own")
    assert gateway_a.publish(f"vehicles/{a}/owner/signals", control) == 0
    # THEN only its own-prefix publish arrives (it was sent last, on the same connection)
    admin.wait_for(control)
    time.sleep(0.3)
    assert not [t for t, _ in admin.messages if t in foreign]
    assert bob.messages == [] and gateway_b.messages == []


def test_an_owner_commands_only_their_own_vehicle_and_cannot_forge_summaries(bench, clients):
    a, b, port = bench.vin_a, bench.vin_b, bench.port
    admin = _client(clients, port, "admin", bench.admin_password).subscribe("vehicles/#")
    gw = {
        vin: _client(clients, port, f"gateway-{vin}", bench.password(f"gateway-{vin}")).subscribe(
            f"vehicles/{vin}/owner/consent/set", f"vehicles/{vin}/owner/command"
        )
        for vin in (a, b)
    }
    alice = _client(clients, port, "alice", bench.password("alice"), protocol=mqtt.MQTTv5)
    # WHEN alice (owner of A) sends consent and commands to A, to B, and a fake summary for A
    denied = {
        f"vehicles/{b}/owner/consent/set": _marker("consent-b"),
        f"vehicles/{b}/owner/command": _marker("stop-b"),
        f"vehicles/{a}/owner/signals": _marker("forged"),
        f"vehicles/{a}/owner/status": _marker("forged-status"),
    }
    for topic, payload in denied.items():
        assert alice.publish(topic, payload) == NOT_AUTHORISED, topic
    mine = [_marker("consent-a"), _marker("stop-a")]
    assert alice.publish(f"vehicles/{a}/owner/consent/set", mine[0]) == 0
    assert alice.publish(f"vehicles/{a}/owner/command", mine[1]) == 0
    # THEN A's gateway receives her two messages; B's gateway and the observer see no denied one
    gw[a].wait_for(mine[1])
    assert [p for _, p in gw[a].messages] == mine
    admin.wait_for(mine[1])
    time.sleep(0.3)
    assert gw[b].messages == []
    assert not set(denied.values()) & {p for _, p in admin.messages}


def test_a_plain_connection_to_the_tls_port_fails(bench, clients):
    plain = _client(clients, bench.tls_port, "alice", bench.password("alice"), connect_timeout=2.0)
    assert not plain.connected
    # the same credentials over TLS do connect: the failure above is the missing TLS
    assert _client(clients, bench.tls_port, "alice", bench.password("alice"), ca=bench.ca).connected
    # AND the gateway's tools, pointed at it with mqtt://, say so in one line: paho's own
    # "failed to receive on socket: [Errno 104] ..." came first, as a second error line
    proc = run_gateway(
        "owner", "--broker", f"mqtt://127.0.0.1:{bench.tls_port}", "--vin", bench.vin_a, timeout=60
    )
    assert proc.returncode == 3
    assert_one_line_error(proc, "mqtts://")


# -- the real gateway through the locked broker ----------------------------------------------
@pytest.mark.parametrize("how", ["toml-over-tls", "environment-over-plain-mqtt"])
def test_the_gateway_publishes_through_the_locked_broker_and_its_owner_receives(
    bench, clients, tmp_path, how
):
    a = bench.vin_a
    alice = _client(clients, bench.tls_port, "alice", bench.password("alice"), ca=bench.ca)
    alice.subscribe(f"vehicles/{a}/owner/#")
    bob = _client(clients, bench.port, "bob", bench.password("bob")).subscribe("#")
    anonymous = _client(clients, bench.port)
    assert not anonymous.connected
    ledger = tmp_path / "ledger.jsonl"
    common = ["--dbc", str(KONA_PCAN), "--fast", "--window", "5", "-q",
              "--ledger", str(ledger), "--outbox", str(tmp_path / "outbox.sqlite")]  # fmt: skip
    if how == "toml-over-tls":
        toml = bench.out / f"gateway-{a}.toml"
        assert load(toml).broker.url.startswith("mqtts://")
        proc = run_gateway("-vv", "replay", str(LOG), *common, "--config", str(toml))
    else:
        env = {
            "GATEWAY_BROKER_USERNAME": f"gateway-{a}",
            "GATEWAY_BROKER_PASSWORD_FILE": str(bench.out / "secrets" / f"gateway-{a}.password"),
        }
        url = f"mqtt://127.0.0.1:{bench.port}"
        proc = run_gateway("-vv", "replay", str(LOG), *common, "--broker", url, "--vin", a, env=env)
    assert proc.returncode == 0, proc.stderr
    # every message the gateway sent reached the owner (plus retained ones of earlier runs)
    sent = int(re.search(r"sent (\d+) to", proc.stderr).group(1))  # type: ignore[union-attr]
    received = alice.settle()
    assert sent > 0 and len(received) >= sent
    signals = [unpack(p) for t, p in received if t.endswith("/owner/signals")]
    assert signals and all(s["schema"] == "gateway.signals" for s in signals)
    assert "battery.soc" in set().union(*(s["signals"] for s in signals))
    assert bob.messages == []
    # no generated password in anything the gateway wrote, even at debug level
    written = proc.stdout + proc.stderr + ledger.read_text()
    assert "Not authori" not in proc.stderr
    for secret in bench.secrets():
        assert secret not in written


def test_a_gateway_with_a_wrong_password_stops_with_one_line_that_does_not_echo_it(bench, tmp_path):
    wrong = tmp_path / "wrong.password"
    wrong.write_text("guess-" + uuid.uuid4().hex + "\n")
    proc = run_gateway(
        "replay", str(LOG), "--dbc", str(KONA_PCAN), "--fast", "-q",
        "--config", str(bench.out / f"gateway-{bench.vin_a}.toml"),
        "--ledger", str(tmp_path / "l.jsonl"), "--outbox", str(tmp_path / "o.sqlite"),
        env={"GATEWAY_BROKER_PASSWORD_FILE": str(wrong)},
    )  # fmt: skip
    line = assert_one_line_error(proc, "authori")
    assert wrong.read_text().strip() not in proc.stdout + proc.stderr, line


# -- the generated files ---------------------------------------------------------------------
def test_generated_files_keep_every_password_private(bench):
    out = bench.out
    secrets = bench.secrets()
    assert len(secrets) == 4 and len(set(secrets)) == 4
    assert all(len(s) >= 32 for s in secrets)
    assert (out / "secrets").stat().st_mode & 0o777 == 0o700
    for p in (out / "secrets").iterdir():
        assert p.stat().st_mode & 0o777 == 0o600, p
    for key in ("ca.key", "server.key"):
        assert (out / "tls" / key).stat().st_mode & 0o777 == 0o600
    # the password file holds only hashes, each one verifying against its user's secret
    entries = dict(line.split(":", 1) for line in (out / "passwd").read_text().splitlines() if line)
    for user in ("alice", "bob", f"gateway-{bench.vin_a}", f"gateway-{bench.vin_b}"):
        assert entries[user].startswith("$7$")
        assert verify_password(bench.password(user), entries[user])
    # no password in the config, ACL, client configs, broker log, or the command's output
    texts = [bench.stdout, (out / "mosquitto.log").read_text(errors="replace")]
    texts += [(out / name).read_text() for name in ("mosquitto.conf", "acl", "passwd")]
    texts += [p.read_text() for p in out.glob("*.toml")]
    for secret in secrets:
        assert all(secret not in text for text in texts)
    assert "secrets" in bench.stdout  # it says where they are instead
    # each client config loads and yields its user's password from the file
    for toml in out.glob("*.toml"):
        s = load(toml, env={})
        assert s.broker.secret() == bench.password(s.broker.username)


def test_the_acl_grants_exactly_the_owner_channel_table():
    plan = BrokerPlan(Path("/x"), ("V1", "V2"), owners=(("ann", "V1"), ("ben", "V1")))
    assert acl_rules(plan) == [
        ("gateway-V1", "write", "vehicles/V1/owner/#"),
        ("gateway-V1", "read", "vehicles/V1/owner/consent/set"),
        ("gateway-V1", "read", "vehicles/V1/owner/command"),
        ("gateway-V2", "write", "vehicles/V2/owner/#"),
        ("gateway-V2", "read", "vehicles/V2/owner/consent/set"),
        ("gateway-V2", "read", "vehicles/V2/owner/command"),
        ("ann", "read", "vehicles/V1/owner/#"),
        ("ann", "write", "vehicles/V1/owner/consent/set"),
        ("ann", "write", "vehicles/V1/owner/command"),
        ("ben", "read", "vehicles/V1/owner/#"),
        ("ben", "write", "vehicles/V1/owner/consent/set"),
        ("ben", "write", "vehicles/V1/owner/command"),
    ]


def test_the_password_hash_is_the_one_mosquitto_passwd_writes(tmp_path):
    exe = shutil.which("mosquitto_passwd")
    if exe is None:
        pytest.skip("mosquitto_passwd is not installed")
    f = tmp_path / "pw"
    f.touch(mode=0o600)
    subprocess.run([exe, "-b", str(f), "u", "test-only-password"], check=True)
    encoded = f.read_text().strip().split(":", 1)[1]
    assert verify_password("test-only-password", encoded)
    assert not verify_password("test-only-passwore", encoded)
    salt = __import__("base64").b64decode(encoded.split("$")[3])
    assert hash_password("test-only-password", salt=salt) == encoded


# -- as a command ----------------------------------------------------------------------------
def _cli(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(cli, "_EXTRA_COMMANDS", ("gateway.brokerconf",))
    rc = cli.main(["broker-config", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc: int, err: str, *needles: str) -> None:
    proc = subprocess.CompletedProcess([], rc, "", err)
    assert_one_line_error(proc, *needles)


def test_an_existing_configuration_is_kept_unless_forced_and_force_rotates(
    monkeypatch, capsys, tmp_path
):
    out = tmp_path / "b"
    rc, stdout, _ = _cli(monkeypatch, capsys, "--out", str(out), "--vin", "V1", "--user", "")
    assert rc == 0
    old = (out / "secrets" / "owner-V1.password").read_text().strip()
    assert old not in stdout
    rc, _, err = _cli(monkeypatch, capsys, "--out", str(out), "--vin", "V1", "--user", "")
    _one_line_error(rc, err, str(out), "--force")
    assert (out / "secrets" / "owner-V1.password").read_text().strip() == old
    rc, _, _ = _cli(monkeypatch, capsys, "--out", str(out), "--vin", "V1", "--user", "", "--force")
    assert rc == 0
    new = (out / "secrets" / "owner-V1.password").read_text().strip()
    entry = next(
        ln.split(":", 1)[1]
        for ln in (out / "passwd").read_text().splitlines()
        if ln.startswith("owner-V1:")
    )
    assert new != old and verify_password(new, entry) and not verify_password(old, entry)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--vin", "V1", "--owner", "ann=V2"], "V2 is not one of the --vin"),
        (["--vin", "V1/+"], "--vin"),
        (["--vin", "V1", "--prefix", "cars/#"], "--prefix"),
        (["--vin", "V1", "--tls-only"], "--tls-only needs --tls"),
        (["--vin", "V1", "--owner", "gateway-V1=V1"], "gateway-"),
        (["--vin", "V1", "--tls", "--port", "8883"], "must differ"),
        (["--vin", "V1", "--tls", "--hostname", "a b\nsubjectAltName=DNS:x"], "not a host name"),
        (["--vin", "V1", "--bind", "[::1]"], "without brackets"),
        (["--vin", "V1", "--tls-port", "8884"], "--tls-port needs --tls"),
    ],
)
def test_bad_options_are_one_line_errors(monkeypatch, capsys, tmp_path, argv, needle):
    rc, _, err = _cli(monkeypatch, capsys, "--out", str(tmp_path / "b"), *argv)
    _one_line_error(rc, err, needle)
    assert not (tmp_path / "b").exists()


def test_an_unwritable_folder_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "b"
    rc, _, err = _cli(monkeypatch, capsys, "--out", str(out), "--vin", "V1", "--user", "")
    _one_line_error(rc, err, "cannot write")


def test_tls_without_openssl_is_a_clear_one_line_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    rc, _, err = _cli(monkeypatch, capsys, "--out", str(tmp_path / "b"), "--vin", "V1", "--tls")
    _one_line_error(rc, err, "openssl", "apt-get install openssl")
    assert not (tmp_path / "b").exists()


def test_force_keeps_the_bench_ca_unless_new_ca_is_asked_for(monkeypatch, capsys, tmp_path):
    out = tmp_path / "b"
    args = ["--out", str(out), "--vin", "V1", "--user", "", "--tls"]

    def certs() -> tuple[bytes, bytes]:
        return (out / "tls" / "ca.crt").read_bytes(), (out / "tls" / "server.crt").read_bytes()

    assert _cli(monkeypatch, capsys, *args)[0] == 0
    ca, server = certs()
    assert _cli(monkeypatch, capsys, *args, "--force")[0] == 0
    assert certs()[0] == ca and certs()[1] != server  # clients keep their ca.crt
    assert _cli(monkeypatch, capsys, *args, "--force", "--new-ca")[0] == 0
    assert certs()[0] != ca
    rc, _, err = _cli(monkeypatch, capsys, *args, "--new-ca")
    _one_line_error(rc, err, "--force")


def test_rotated_passwords_take_effect_when_mosquitto_reloads():
    # GIVEN a running broker with a generated configuration and a working owner password
    root = Path(tempfile.mkdtemp(prefix="gateway-rotate-"))
    os.chmod(root, 0o755)
    out, port = root / "b", free_port()
    argv = ["--out", str(out), "--vin", "V1", "--bind", "127.0.0.1", "--port", str(port)]
    _generate(argv)
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(out / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    made: list[Client] = []
    try:
        wait_for_port("127.0.0.1", port)
        old = (out / "secrets" / "owner-V1.password").read_text().strip()
        session = _client(made, port, "owner-V1", old)
        assert session.connected
        # WHEN the configuration is generated again with --force and Mosquitto gets SIGHUP
        _generate([*argv, "--force"])
        proc.send_signal(signal.SIGHUP)
        new = (out / "secrets" / "owner-V1.password").read_text().strip()
        # THEN the session opened with the old password is closed by the broker, the old
        # password is refused from then on, and the new one accepted
        assert session.lost.wait(5)
        deadline = time.monotonic() + 5
        while _client(made, port, "owner-V1", old).connected and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _client(made, port, "owner-V1", old).connected
        assert _client(made, port, "owner-V1", new).connected
    finally:
        for c in made:
            c.close()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(root)


def test_each_vehicles_gateway_config_has_its_own_ledger_and_outbox(bench):
    """With the defaults, the gateways of one generated folder shared one outbox: one sent
    the other's waiting summaries under its own login (dropped by the ACL: lost)."""
    a = load(bench.out / f"gateway-{bench.vin_a}.toml").gateway
    b = load(bench.out / f"gateway-{bench.vin_b}.toml").gateway
    assert a.ledger != b.ledger and a.outbox != b.outbox
    assert Path(a.outbox).parent == bench.out  # beside the configs, not the working folder


def test_an_owner_view_the_acl_keeps_silent_says_what_the_silence_can_mean(bench, clients, caplog):
    import asyncio
    import logging

    from gateway.egress.schema import Topics
    from gateway.owner import watch
    from gateway.settings import BrokerSettings

    a = bench.vin_a
    # GIVEN VIN A's gateway has left its retained status on the locked broker
    gateway = _client(clients, bench.port, f"gateway-{a}", bench.password(f"gateway-{a}"))
    status = _marker("status")
    gateway._c.publish(f"vehicles/{a}/owner/status", status, qos=1, retain=True).wait_for_publish(5)

    def watch_as(user: str) -> list[str]:
        caplog.clear()
        broker = BrokerSettings(
            url=f"mqtt://127.0.0.1:{bench.port}", username=user, password=bench.password(user)
        )
        with caplog.at_level(logging.WARNING, logger="gateway.owner"):
            asyncio.run(
                watch(broker, Topics("vehicles", a), idle_timeout=1.5, hint_after=0.5,
                      out=io.StringIO())
            )  # fmt: skip
        return [r.getMessage() for r in caplog.records if r.name == "gateway.owner"]

    # WHEN the owner of another vehicle watches VIN A (Mosquitto grants the subscription and
    # then delivers nothing), THEN a warning names the ACL as a likely cause
    said = watch_as("bob")
    assert len(said) == 1 and "ACL" in said[0] and a in said[0], said
    # AND the owner, who receives the retained status at once, is told nothing of the kind
    assert watch_as("alice") == []


def test_a_subscription_the_broker_refuses_is_an_error_not_silence():
    import asyncio

    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from gateway.egress.mqtt import SubscriptionRefused, subscribe

    class Refusing:  # a broker that says so in its SUBACK (Mosquitto with an ACL does not)
        def __init__(self, code: int) -> None:
            self.code = code

        async def subscribe(self, topic: str, qos: int = 0) -> list[ReasonCode]:
            return [ReasonCode(PacketTypes.SUBACK, identifier=self.code)]

    for code in (0x80, 0x87):  # MQTT 3.1.1's failure; MQTT 5's "Not authorized"
        with pytest.raises(SubscriptionRefused, match="refused the subscription to a/#"):
            asyncio.run(subscribe(Refusing(code), "a/#"))  # type: ignore[arg-type]
    asyncio.run(subscribe(Refusing(1), "a/#"))  # type: ignore[arg-type]  # granted QoS 1


def test_a_tls_ca_with_a_plain_url_says_that_tls_is_on(bench, tmp_path):
    # tls_ca turns TLS on whatever the URL's scheme (docs/config.md); a handshake against a
    # plain port then fails with an SSL error that alone would not say why TLS was tried
    proc = run_gateway(
        "replay", str(LOG), "--dbc", str(KONA_PCAN), "--fast", "-q",
        "--broker", f"mqtt://127.0.0.1:{bench.port}", "--vin", bench.vin_a,
        "--ledger", str(tmp_path / "l.jsonl"), "--outbox", str(tmp_path / "o.sqlite"),
        env={"GATEWAY_BROKER_TLS_CA": str(bench.ca)},
    )  # fmt: skip
    assert_one_line_error(proc, "TLS is on because tls_ca is set")


def test_an_ipv6_bind_address_gives_a_broker_its_clients_reach(monkeypatch, capsys):
    # GIVEN a configuration bound to the IPv6 loopback, with TLS (the address goes into the
    # server certificate as an IP entry)
    with tempfile.TemporaryDirectory(prefix="gateway-brokerconf-") as tmp:
        os.chmod(tmp, 0o755)
        out = Path(tmp) / "b"
        port, tls_port = free_port(), free_port()
        argv = ["--out", str(out), "--vin", "V6", "--bind", "::1", "--port", str(port),
                "--tls", "--tls-port", str(tls_port)]  # fmt: skip
        rc, _, err = _cli(monkeypatch, capsys, *argv)
        assert rc == 0, err
        config = load(out / "owner-V6.toml")
        assert config.broker.url == f"mqtts://[::1]:{tls_port}"
        proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(out / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port("::1", tls_port)
            # WHEN the owner connects with its generated config, THEN the broker (and its TLS
            # certificate) accept it at the IPv6 address
            import asyncio

            from gateway.egress.mqtt import make_client

            async def connect() -> None:
                async with make_client(config.broker, identifier=None):
                    pass

            asyncio.run(connect())
        finally:
            proc.terminate()
            proc.wait(10)


def test_a_vehicle_left_without_an_owner_is_warned_of(monkeypatch, capsys, tmp_path):
    argv = ["--out", str(tmp_path / "b"), "--vin", "V1", "--vin", "V2", "--owner", "ann=V1",
            "--user", ""]  # fmt: skip
    rc, _, err = _cli(monkeypatch, capsys, *argv)
    assert rc == 0
    warnings = [ln for ln in err.splitlines() if ln.startswith("gateway: warning:")]
    assert len(warnings) == 1 and "V2 has no owner" in warnings[0], err


def test_force_with_fewer_users_removes_the_files_of_the_users_gone(monkeypatch, capsys, tmp_path):
    out = tmp_path / "b"
    assert _cli(monkeypatch, capsys, "--out", str(out), "--vin", "V1", "--vin", "V2",
                "--user", "")[0] == 0  # fmt: skip
    ledger = out / "data" / "kept.jsonl"  # a file of the user's own, beside the generated ones
    ledger.write_text("{}\n")
    rc, stdout, _ = _cli(monkeypatch, capsys, "--out", str(out), "--vin", "V1", "--force",
                         "--user", "")  # fmt: skip
    assert rc == 0 and "owner-V2" in stdout and "gateway-V2" in stdout
    for user in ("gateway-V2", "owner-V2"):
        assert not (out / f"{user}.toml").exists()
        assert not (out / "secrets" / f"{user}.password").exists()
    for user in ("gateway-V1", "owner-V1"):
        assert (out / f"{user}.toml").is_file()
        assert (out / "secrets" / f"{user}.password").is_file()
    assert ledger.is_file()
