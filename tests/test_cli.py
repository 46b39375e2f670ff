"""The command line as a user meets it: help, run + SIGTERM, owner view, audit, data rights."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.canbus import parseproc
from gateway.egress.schema import unpack
from tests.conftest import (
    KONA_CANDUMP,
    KONA_CCAN,
    KONA_CSV,
    KONA_PCAN,
    ROOT,
    assert_one_line_error,
    gateway_settings,
    replay_args,
    run_gateway,
)

COMMANDS = ["replay", "run", "owner", "audit", "config", "consent", "data"]


def _vehicle(tmp_path, vin) -> list[str]:
    """The vehicle's options: its VIN, ledger and outbox in ``tmp_path``."""
    return [
        "--vin",
        vin,
        "--ledger",
        str(tmp_path / "l.jsonl"),
        "--outbox",
        str(tmp_path / "o.sqlite"),
    ]


def _kona_replay(tmp_path, broker, vin, *extra: str) -> list[str]:
    """`gateway replay` of the real Kona log to the test broker, its files in ``tmp_path``."""
    return [
        "replay",
        str(KONA_CSV),
        "--dbc",
        f"can0={KONA_PCAN}",
        "--fast",
        "--broker",
        broker.url,
        *extra,
        *_vehicle(tmp_path, vin),
        "-q",
    ]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command):
    proc = run_gateway(command, "--help")
    assert proc.returncode == 0
    assert "usage: gateway " + command in proc.stdout
    assert len(proc.stdout.splitlines()) > 5


def test_no_command_prints_help_and_fails():
    proc = run_gateway()
    assert proc.returncode == 2 and "COMMAND" in proc.stderr


def test_the_config_reference_in_docs_is_current():
    proc = run_gateway("config", "--doc")
    assert proc.stdout == (ROOT / "docs" / "config.md").read_text()


@pytest.mark.broker
def test_run_stops_cleanly_on_sigterm_and_flushes_the_open_window(tmp_path, broker, vin, listen):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[gateway]
vin = "{vin}"
window = 60
ledger = "ledger.jsonl"
outbox = "outbox.sqlite"
[broker]
url = "{broker.url}"
[replay]
speed = 1.0
[[can]]
logs = ["{KONA_CSV}"]
[dbc]
can0 = "{KONA_PCAN}"
""")
    lst = listen(broker.url, f"vehicles/{vin}/owner/#")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(4.0)  # the 10.8 s log is replayed in real time: stop it in the middle
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    msgs = lst.settle()
    signals = [unpack(m.payload) for m in msgs if m.topic.endswith("/signals")]
    assert len(signals) == 1, "the open window is flushed at stop"
    status = [unpack(m.payload) for m in msgs if m.topic.endswith("/status")]
    assert status[-1]["state"] == "offline" and status[-1]["reason"] == "stopped"
    assert (tmp_path / "ledger.jsonl").exists()
    verify = run_gateway("audit", "verify", str(tmp_path / "ledger.jsonl"))
    assert verify.returncode == 0 and "ledger OK" in verify.stdout


def test_run_collects_with_the_broker_down_and_delivers_on_the_next_run(tmp_path, vin, listen):
    from gateway.localbroker import LocalBroker

    # GIVEN the vehicle's service, configured for a broker that is not there yet
    broker = LocalBroker(workdir=tmp_path / "mosquitto")
    broker.workdir.mkdir()
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[gateway]
vin = "{vin}"
window = 5
ledger = "ledger.jsonl"
outbox = "outbox.sqlite"
[broker]
url = "{broker.url}"
[replay]
fast = true
[[can]]
logs = ["{KONA_CSV}"]
[dbc]
can0 = "{KONA_PCAN}"
""")
    # WHEN it runs: it collects anyway, and says the summaries wait (exit 3, not a refusal)
    first = run_gateway("run", "--config", str(cfg), "--drain-timeout", "1", cwd=tmp_path)
    assert first.returncode == 3, first.stderr
    assert "wait in" in first.stderr and "released 0 " not in first.stderr
    # THEN with the broker up, the next run delivers what waited, and its own
    broker.start()
    try:
        lst = listen(broker.url, f"vehicles/{vin}/owner/#")
        second = run_gateway("run", "--config", str(cfg), cwd=tmp_path)
        assert second.returncode == 0, second.stderr
        signals = [m for m in lst.settle() if m.topic.endswith("/signals")]
    finally:
        broker.close()
    windows = [unpack(m.payload)["window"] for m in signals]
    assert len(windows) == 2 * 3 and len({tuple(w) for w in windows}) == 3  # 10.8 s in 5 s


@pytest.mark.broker
def test_owner_json_prints_one_object_per_message(tmp_path, broker, vin):
    owner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "owner",
            "--vin",
            vin,
            "--broker",
            broker.url,
            "--json",
            "--idle-timeout",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # the owner says on stderr when the broker acknowledged its subscription (a fixed sleep
    # here could start the replay before it, under load)
    said = owner.stderr.readline()
    assert "subscribed" in said, said
    rep = run_gateway(*_kona_replay(tmp_path, broker, vin, "--window", "5"))
    assert rep.returncode == 0, rep.stderr
    out, err = owner.communicate(timeout=30)
    lines = [json.loads(ln) for ln in out.splitlines()]
    schemas = [ln["schema"] for ln in lines]
    assert schemas.count("gateway.signals") == 3
    assert all(ln["topic"].startswith(f"vehicles/{vin}/owner/") for ln in lines)


@pytest.mark.broker
def test_audit_verify_passes_then_fails_after_one_byte_changes(tmp_path, broker, vin):
    ledger = tmp_path / "l.jsonl"
    rep = run_gateway(*_kona_replay(tmp_path, broker, vin))
    assert rep.returncode == 0, rep.stderr
    ok = run_gateway("audit", "verify", str(ledger))
    assert ok.returncode == 0, ok.stderr
    data = bytearray(ledger.read_bytes())
    i = data.index(b'"bytes":') + 8
    data[i] = ord("9") if data[i] != ord("9") else ord("8")
    ledger.write_bytes(bytes(data))
    bad = run_gateway("audit", "verify", str(ledger))
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert f"{ledger}:" in bad.stderr and "was changed" in bad.stderr


@pytest.mark.broker
def test_lines_cut_from_the_end_of_a_ledger_are_found_by_the_digest_the_owner_received(
    tmp_path, broker, vin, listen
):
    """A ledger cut short at its end is still a valid chain (nothing after the cut to break);
    the digest published to the owner (entries, head) is the anchor outside the vehicle."""
    ledger = tmp_path / "l.jsonl"
    lst = listen(broker.url, f"vehicles/{vin}/owner/ledger")
    rep = run_gateway(*_kona_replay(tmp_path, broker, vin))
    assert rep.returncode == 0, rep.stderr
    digest = unpack(lst.settle()[-1].payload)
    spec = f"{digest['entries']}:{digest['head']}"
    ok = run_gateway("audit", "verify", str(ledger), "--digest", spec)
    assert ok.returncode == 0, ok.stderr
    assert "holds the 1 digest(s) the owner was sent" in ok.stdout
    # the owner view's own spelling, and a 16-digit head, are taken too
    short = f"entries={digest['entries']} head={digest['head'][:16]}"
    assert run_gateway("audit", "verify", str(ledger), "--digest", short).returncode == 0
    # WHEN the last lines (the digest's own egress entry and the stop entry among them) go
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text("".join(lines[: digest["entries"] - 1]))  # the digested entry goes too
    assert run_gateway("audit", "verify", str(ledger)).returncode == 0  # the chain alone: valid
    bad = run_gateway("audit", "verify", str(ledger), "--digest", spec)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert f"but the ledger has {digest['entries'] - 1}: its last 1 line(s) were removed" in (
        bad.stderr
    )
    # a rewritten ledger (a valid chain of other entries) does not hold the digest either
    other = tmp_path / "other"
    other.mkdir()
    assert run_gateway(*_kona_replay(other, broker, vin, "--window", "5")).returncode == 0
    bad = run_gateway("audit", "verify", str(other / "l.jsonl"), "--digest", spec)
    assert bad.returncode == 1
    assert "is not the one the owner was sent a digest of" in bad.stderr, bad.stderr
    # a mistyped digest is the option's mistake
    assert_one_line_error(
        run_gateway("audit", "verify", str(ledger), "--digest", "36"), "--digest '36': expected"
    )


@pytest.mark.broker
def test_audit_verify_against_another_policy_file_than_the_runs_fails(tmp_path, broker, vin):
    """--policy asks for a re-check against that file; if it is not the file the run used (an
    edit without a new version, say), nothing was re-checked: exit 1, both files' SHA-256."""
    import gateway

    ledger = tmp_path / "l.jsonl"
    default = Path(gateway.__file__).parent / "data" / "policy_default.toml"
    mine = tmp_path / "mine.toml"
    mine.write_text(default.read_text().replace('name = "owner-default"', 'name = "mine"'))
    run = run_gateway(*_kona_replay(tmp_path, broker, vin, "--policy", str(mine)))
    assert run.returncode == 0, run.stderr
    assert run_gateway("audit", "verify", str(ledger), "--policy", str(mine)).returncode == 0
    edited = tmp_path / "edited.toml"
    edited.write_text(mine.read_text().replace("quantum = 0.5", "quantum = 0.1", 1))
    proc = run_gateway("audit", "verify", str(ledger), "--policy", str(edited))
    assert proc.returncode == 1, proc.stdout
    assert "not re-checked: their policy (mine@1 sha256 " in proc.stdout
    assert "is not among the files given (mine@1 sha256 " in proc.stdout
    assert "is the policy of no run in this ledger" in proc.stdout


@pytest.mark.broker
def test_consent_command_reaches_the_owner_topic(broker, vin, listen):
    lst = listen(broker.url, f"vehicles/{vin}/owner/consent/set")
    proc = run_gateway(
        "consent", "grant", "location", "--days", "7", "--vin", vin, "--broker", broker.url,
        "--wait", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    msgs = lst.settle()
    assert json.loads(msgs[0].payload) == {"category": "location", "grant": True, "days": 7.0}


@pytest.mark.broker
def test_consent_prints_the_running_gateways_answer_and_fails_on_a_refusal(tmp_path, broker, vin):
    # GIVEN a gateway replaying in real time (10.8 s)
    gw = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "replay",
            str(KONA_CSV),
            "--dbc",
            f"can0={KONA_PCAN}",
            "--speed",
            "1",
            "--broker",
            broker.url,
            *_vehicle(tmp_path, vin),
            "-q",
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    common = ["--vin", vin, "--broker", broker.url, "--wait", "2"]
    try:
        for _ in range(4):  # until it has subscribed to the owner's commands
            ok = run_gateway("consent", "grant", "location", "--days", "7", *common)
            if ok.returncode == 0:
                break
        refused = run_gateway("consent", "grant", "location", "--days", "400", *common)
        deleted = run_gateway("consent", "delete", "vehicle_status", *common)
        no_gateway = run_gateway(
            "consent", "stop", "--vin", "NOBODY", "--broker", broker.url, "--wait", "1"
        )
    finally:
        gw.terminate()
        gw.wait(timeout=30)
    # THEN the owner sees the grant, the refusal and its reason, and that nobody answered
    assert ok.returncode == 0 and "gateway: grant" in ok.stdout and "location until" in ok.stdout
    assert refused.returncode == 1 and "refused" in refused.stderr and "30 days" in refused.stderr
    assert no_gateway.returncode == 1 and "no answer" in no_gateway.stderr
    # and how many waiting messages a delete removed (it answered "delete" only)
    assert deleted.returncode == 0 and re.search(
        r"gateway: delete: \d+ waiting message\(s\) removed", deleted.stdout
    ), deleted.stdout


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["grant", "location", "--days", "0"], "--days must be a positive number"),
        (["grant", "location", "--days", "nan"], "--days must be a positive number"),
        (["grant", "vehicle_status", "--days", "3"], "not a sensitive category"),
    ],
)
def test_consent_arguments_the_gateway_would_refuse_are_refused_here(argv, needle):
    proc = run_gateway("consent", *argv, "--broker", "mqtt://127.0.0.1:1")
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_consent_grant_without_days_is_refused():
    proc = run_gateway("consent", "grant", "location")
    assert proc.returncode == 2 and "expires" in proc.stderr


def test_data_export_and_delete_act_on_the_outbox_with_ledger_evidence(tmp_path, vin):
    import asyncio

    from gateway.app import Gateway
    from gateway.canbus.replay import ReplaySource
    from gateway.localbroker import free_port

    # GIVEN summaries waiting in the outbox: the broker was never reachable during the run
    url = f"mqtt://127.0.0.1:{free_port()}"
    common = _vehicle(tmp_path, vin)
    s = gateway_settings(
        tmp_path, {"can0": [str(KONA_PCAN)]}, url=url, vin=vin, window=5.0, decoder="cantools"
    )
    gw = Gateway(s, [ReplaySource([KONA_CSV], speed=None)])
    report = asyncio.run(gw.run(require_broker=False, drain_timeout=0.2))
    assert report.outbox_left >= 3
    # WHEN the owner exports, then deletes the vehicle-status data
    export = run_gateway("data", "export", "--out", str(tmp_path / "export.json"), *common)
    assert export.returncode == 0, export.stderr
    data = json.loads((tmp_path / "export.json").read_text())
    assert len(data["outbox"]) == report.outbox_left
    assert (tmp_path / "export.json").stat().st_mode & 0o777 == 0o600  # as the outbox is
    dashed = run_gateway("data", "export", "--out", "-", *common, cwd=tmp_path)
    assert json.loads(dashed.stdout) == data and not (tmp_path / "-").exists()
    delete = run_gateway("data", "delete", "--category", "vehicle_status", *common)
    assert delete.returncode == 0, delete.stderr
    # THEN the signal summaries are gone, the rest waits, and both acts are in the ledger
    from gateway.egress.outbox import Outbox

    left = Outbox(tmp_path / "o.sqlite").peek(1000)
    assert left and all(p.schema != "gateway.signals" for p in left)
    ledger = (tmp_path / "l.jsonl").read_text()
    assert '"kind":"data-export"' in ledger and '"kind":"data-delete"' in ledger
    # each deleted message by its seq and sha256: its egress line is told apart from one
    # that left (the entry held only a count)
    gone = [p for p in data["outbox"] if p["body"]["schema"] == "gateway.signals"]
    (entry,) = [json.loads(x) for x in ledger.splitlines() if '"kind":"data-delete"' in x]
    assert sorted(entry["seqs"]) == sorted(p["seq"] for p in gone) and len(entry["sha256"]) == len(
        gone
    )
    verify = run_gateway("audit", "verify", str(tmp_path / "l.jsonl"))
    assert verify.returncode == 0, verify.stderr


def test_data_delete_of_a_sensitive_category_takes_the_summaries_holding_its_signals(tmp_path, vin):
    """`data delete --category cabin` (or biometric, or location for a signal of that
    category without a position) deleted nothing: a summary of signals counted as vehicle
    status and driving data only."""
    import asyncio

    from gateway.app import Gateway
    from gateway.canbus.replay import ReplaySource
    from gateway.egress.outbox import Outbox

    signals = {
        "vehicle_status": "BMS_542.SocDisp",
        "cabin": "Batt_HV_Status.VBatt",
        "biometric": "BatteryCharging.Voltage_12V",
        "location": "StabilityControl.LAT_ACCEL",
    }

    # GIVEN the summaries of four runs waiting (the broker was never reachable), each run
    # under a policy that lets out one signal, of one category, with the owner's consent
    def waiting():
        ob = Outbox(tmp_path / "o.sqlite")
        try:
            return ob.peek(10_000)
        finally:
            ob.close()

    made: dict[str, set[int]] = {}
    for category, dbc_signal in signals.items():
        policy = tmp_path / f"{category}.toml"
        policy.write_text(
            f'[policy]\nname = "{category}"\nversion = 1\n\n[[signal]]\nsignal = "{dbc_signal}"\n'
            f'publish_as = "x.{category}"\ncategory = "{category}"\naggregates = ["last"]\n'
        )
        before = {p.seq for p in waiting()}
        s = gateway_settings(
            tmp_path,
            {"can0": [str(KONA_PCAN)]},
            vin=vin,
            window=5.0,
            policy=str(policy),
            consent=["cabin:7", "biometric:7", "location:7"],
        )
        report = asyncio.run(
            Gateway(s, [ReplaySource([KONA_CSV], speed=None)]).run(
                require_broker=False, drain_timeout=0.2
            )
        )
        assert report.outbox_left
        made[category] = {
            p.seq for p in waiting() if p.seq not in before and p.schema == "gateway.signals"
        }
        assert made[category], category
    # WHEN the owner deletes each category THEN exactly the summaries of its run go
    kept = ["cabin", "biometric", "location", "vehicle_status"]
    while kept:
        category = kept.pop(0)
        delete = run_gateway("data", "delete", "--category", category, *_vehicle(tmp_path, vin))
        assert delete.returncode == 0, delete.stderr
        assert f"deleted {len(made[category])} waiting message(s)" in delete.stdout, delete.stdout
        left = {p.seq for p in waiting()}
        assert not made[category] & left
        assert all(made[c] <= left for c in kept)
    assert waiting() and not any(p.schema == "gateway.signals" for p in waiting())
    verify = run_gateway("audit", "verify", str(tmp_path / "l.jsonl"))
    assert verify.returncode == 0, verify.stderr


@pytest.mark.broker
def test_the_collector_is_off_during_start_up_and_comes_back_as_it_was(
    tmp_path, broker, vin, monkeypatch
):
    """`main` pauses the cyclic collector while it imports and loads DBCs, freezes what start-up
    made once the pipeline is built, and gives an in-process caller its collector back."""
    import gc

    from gateway import cli
    from gateway.app import Gateway
    from gateway.canbus.dbc import ChannelDbcs

    seen: dict[str, tuple[bool, int]] = {}
    load, run = ChannelDbcs.from_specs.__func__, Gateway.run

    def loading(cls, *a, **k):
        seen["load"] = (gc.isenabled(), gc.get_freeze_count())
        return load(cls, *a, **k)

    async def running(self, *a, **k):
        seen["run"] = (gc.isenabled(), gc.get_freeze_count())
        return await run(self, *a, **k)

    monkeypatch.setattr(ChannelDbcs, "from_specs", classmethod(loading))
    monkeypatch.setattr(Gateway, "run", running)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    code = cli.main(_kona_replay(tmp_path, broker, vin))
    assert code == 0
    assert seen["load"] == (False, 0)
    assert seen["run"][0] and seen["run"][1] > 0
    assert gc.isenabled() and gc.get_freeze_count() == 0
    # a user's mistake: the same
    assert cli.main(["replay", str(tmp_path / "missing.log"), "--dbc", str(KONA_PCAN)]) != 0
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()
    try:
        assert cli.main(["config", "--doc"]) == 0
        assert not gc.isenabled()
    finally:
        gc.enable()


def _python(
    code: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -c code args`` from the project's root, which must succeed: its output."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_the_console_script_freezes_what_is_left_before_the_interpreter_exits():
    probe = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
        "from gateway.cli import entry\n"
        "sys.exit(entry(['config', '--doc']))\n"
    )
    assert _python(probe).stdout.rstrip().endswith("frozen at exit: True")


def test_the_console_script_keeps_numpy_from_starting_idle_blas_threads():
    """numpy's OpenBLAS starts a spinning thread per further core at import; the console
    script asks it for no extra thread (the gateway does no linear algebra), unless the user
    set the number."""
    probe = (
        "import os, sys\n"
        "from gateway.cli import entry\n"
        "entry(['config', '--doc'])\n"
        "import numpy\n"
        "print('THREADS', len(os.listdir('/proc/self/task')), os.environ.get('OPENBLAS_NUM_THREADS'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = _python(probe, env=env).stdout.splitlines()[-1]
    assert out == "THREADS 1 1"
    out = _python(probe, env={**env, "OPENBLAS_NUM_THREADS": "2"}).stdout.splitlines()[-1]
    assert out.endswith(" 2")  # the user's choice stands


def test_a_replay_leaves_urllib_request_unloaded_and_it_loads_whole_at_its_first_use(
    tmp_path, broker, vin
):
    """paho imports ``urllib.request`` (and ``http.client``, ``email``: ~8 ms of a replay's
    start) only for a proxy it looks up with PySocks installed. The console script puts a
    stand-in there that imports the module at the first name read from it."""
    from tests.conftest import KONA, KONA_CANDUMP, replay_args

    probe = (
        "import atexit, sys\n"
        "def said():\n"
        "    loaded = [m for m in ('http.client', 'email.parser') if m in sys.modules]\n"
        "    print('LOADED', loaded, type(sys.modules['urllib.request']).__name__)\n"
        "    import urllib.request\n"
        "    from urllib.request import getproxies\n"
        "    import urllib.request as again\n"
        "    real = sys.modules['urllib.request']\n"
        "    print('USED', hasattr(urllib.request, 'proxy_bypass'), type(real).__name__,\n"
        "          getproxies is real.getproxies, urllib.request is real,\n"
        "          again.urlopen is real.urlopen, 'http.client' in sys.modules)\n"
        "atexit.register(said)\n"
        "from gateway._start import main\n"
        "sys.argv[0] = 'gateway'\n"
        "sys.exit(main())\n"
    )
    dbcs = [f"can0={KONA / 'kona_pcan.cantools.dbc'}", f"can1={KONA / 'kona_ccan.cantools.dbc'}"]
    args = replay_args(KONA_CANDUMP, dbcs, broker.url, vin, tmp_path, "--fast", "-q")
    out = _python(probe, *args).stdout.splitlines()
    assert "LOADED [] _LaterModule" in out
    assert "USED True module True True True True" in out


def test_a_replay_imports_neither_cantools_nor_python_can(tmp_path, broker, vin):
    """A candump replay decodes with the DBC's plans, without cantools and python-can (~45 ms
    of start-up here, and their memory); the first run parses and compiles the DBC in a child
    process, which fills the cache for the next runs. Nor does it import ``numpy.ma``, which
    numpy's first ``np.unique`` call imports (10-17 ms; see ``records.distinct``)."""
    from tests.conftest import KONA, KONA_CANDUMP, replay_args

    code = (
        "import sys\n"
        "from gateway.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('IMPORTED', sorted(m for m in ('can', 'cantools', 'numpy.ma') if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    dbcs = [f"can0={KONA / 'kona_pcan.dbc'}", f"can1={KONA / 'kona_ccan.cantools.dbc'}"]
    env = {**os.environ, "GATEWAY_CACHE_DIR": str(tmp_path / "cache")}
    seen = []
    for _ in range(2):
        args = replay_args(KONA_CANDUMP, dbcs, broker.url, vin, tmp_path, "--fast", "-q")
        proc = _python(code, *args, env=env)
        assert proc.stderr.count("BS_:/BU_:") == 1  # the repair of the DBC, said once each time
        seen.append(next(ln for ln in proc.stdout.splitlines() if ln.startswith("IMPORTED")))
    assert seen == ["IMPORTED []", "IMPORTED []"]
    assert len(list((tmp_path / "cache" / "dbc").glob("*.plans"))) == 2


def test_a_stop_signal_to_the_whole_process_group_stops_a_fast_replay_cleanly(
    tmp_path, broker, vin
):
    """``timeout`` and systemd send SIGTERM to the process group, the candump parse process
    included: the gateway stops as on its own SIGTERM, and leaves no process behind."""
    from tests.conftest import KONA, KONA_CANDUMP, replay_args

    dbcs = [f"can0={KONA / 'kona_pcan.cantools.dbc'}", f"can1={KONA / 'kona_ccan.cantools.dbc'}"]
    args = replay_args(KONA_CANDUMP, dbcs, broker.url, vin, tmp_path, "--fast", "--loop", "-q")
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        time.sleep(2.0)  # well into the laps
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err  # as on the gateway's own SIGTERM
        assert "Traceback" not in err and "gateway: error" not in err, err
        assert "replayed" in out + err
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # nobody left in the group


@pytest.mark.broker
def test_samples_that_come_after_their_window_are_counted_in_the_report(tmp_path, broker, vin):
    # GIVEN a log whose time goes back after a window was published (BMS_542: SocDisp; 1 s
    # windows, the chunks of a paced replay ending a quarter of a second after their first)
    log = tmp_path / "back.log"
    log.write_text(
        "".join(f"({9 + i / 100:.2f}) can0 542#1234000000000000\n" for i in range(20))
        + "(10.0) can0 542#1234000000000000\n"
        "(10.1) can0 542#1235000000000000\n"
        "(11.5) can0 542#1236000000000000\n"
        "(10.95) can0 542#1237000000000000\n"
        "(12.0) can0 542#1238000000000000\n"
    )
    args = [
        "replay", str(log), "--dbc", f"can0={KONA_PCAN}", "--window", "1", "--speed", "10000",
        "--broker",
        broker.url, "--vin", vin, "--ledger", str(tmp_path / "l.jsonl"), "--outbox",
        str(tmp_path / "o.sqlite"), "-q",
    ]  # fmt: skip
    proc = run_gateway(*args)
    # THEN the sample at 10.95 s, in no summary, is said
    assert proc.returncode == 0, proc.stderr
    assert "1 signal samples came after their window had been published" in proc.stderr


@pytest.mark.broker
def test_the_report_counts_files_given_and_laps_read(tmp_path, broker, vin):
    twice = run_gateway(*_kona_replay(tmp_path, broker, vin)[:2], str(KONA_CSV),
                        *_kona_replay(tmp_path, broker, vin)[2:])  # fmt: skip
    assert twice.returncode == 0, twice.stderr
    assert "from 2 file(s) in" in twice.stderr  # the same log given twice: no laps


@pytest.mark.broker
@pytest.mark.skipif(
    not parseproc.available(), reason="no fork or one core: parsed in threads, not started early"
)
def test_a_fast_replay_of_a_candump_log_takes_over_the_parse_started_early(tmp_path, broker, vin):
    """The log starts being parsed while the gateway starts (parseproc.start_early); the
    replay takes that process over (said at -vv), and publishes what a paced replay does."""
    dbcs = ["--dbc", f"can0={KONA_PCAN}", "--dbc", f"can1={KONA_CCAN}"]
    for _ in range(2):  # a first replay of a DBC compiles it, and ends the early start first
        fast = run_gateway(
            "-vv", "replay", str(KONA_CANDUMP), *dbcs, "--fast", "--broker", broker.url,
            *_vehicle(tmp_path, vin), "-q", env={"GATEWAY_PARSE_PROCESS": "1"},
        )  # fmt: skip
        assert fast.returncode == 0, fast.stderr
    assert "parsing started early, in process" in fast.stderr
    assert "takes over the parse started early" in fast.stderr
    (tmp_path / "paced").mkdir()
    paced = run_gateway(
        "-vv", "replay", str(KONA_CANDUMP), *dbcs, "--speed", "200", "--broker", broker.url,
        *_vehicle(tmp_path / "paced", vin), "-q",
    )  # fmt: skip
    assert paced.returncode == 0, paced.stderr
    assert "started early" not in paced.stderr
    # fast from the config file, not the command line: started early too
    (tmp_path / "cfg").mkdir()
    cfg = tmp_path / "cfg" / "gateway.toml"
    cfg.write_text("[replay]\nfast = true\n")
    from_config = run_gateway(
        "-vv", "replay", str(KONA_CANDUMP), *dbcs, "--config", str(cfg), "--broker", broker.url,
        *_vehicle(tmp_path / "cfg", vin), "-q", env={"GATEWAY_PARSE_PROCESS": "1"},
    )  # fmt: skip
    assert from_config.returncode == 0, from_config.stderr
    assert "takes over the parse started early" in from_config.stderr
    # the same frames, decoded the same
    counts = [
        [ln for ln in proc.stderr.splitlines() if ln.startswith("decoded ")]
        for proc in (fast, paced)
    ]
    assert counts[0] and counts[0] == counts[1]


def test_a_replay_that_fails_after_the_early_start_leaves_no_parse_process(tmp_path, monkeypatch):
    from gateway import cli
    from gateway.localbroker import pid_alive

    monkeypatch.delenv("GATEWAY_PARSE_PROCESS", raising=False)
    started: list[int] = []
    real = parseproc.start_early

    def spy(*a, **k):
        ok = real(*a, **k)
        started.extend(pid for pid, _ in parseproc._early.values())
        return ok

    monkeypatch.setattr(parseproc, "start_early", spy)
    missing = tmp_path / "missing.dbc"
    code = cli.main(
        ["replay", str(KONA_CANDUMP), "--dbc", str(missing), "--fast", "-q",
         *_vehicle(tmp_path, "TESTVIN0000000001")]
    )  # fmt: skip
    assert code != 0
    if parseproc.available():
        assert len(started) == 1
    assert not parseproc._early
    assert not any(pid_alive(pid) for pid in started)  # killed and reaped


def test_a_core_command_is_parsed_before_numpy_or_asyncio_is_imported():
    """So that a fast replay starts parsing its log ~0.1 s into the process (start_early),
    parsing the command line imports neither numpy, asyncio nor the stages' sub-commands;
    the full parser (``gateway --help``) still lists them."""
    code = (
        "import sys\n"
        "from gateway.cli import build_parser\n"
        "build_parser(['-v', 'replay', 'x.log', '--fast']).parse_args(['replay', 'x.log'])\n"
        "print(sorted(m for m in ('numpy', 'asyncio', 'gateway.synth', 'gateway.brokerconf',\n"
        "      'gateway.camera.cli', 'aiomqtt') if m in sys.modules))\n"
    )
    assert _python(code).stdout.strip() == "[]"
    for asked in (["--help"], ["-h", "replay"]):  # the top-level help, before a command too
        full = run_gateway(*asked)
        assert all(c in full.stdout for c in ("synth", "broker-config", "anonymize")), asked


def test_the_report_of_a_live_bus_says_so_and_consent_times_are_readable(capsys):
    """A live bus was reported as 'replayed N frames from 0 file(s)'; the consent command
    printed grants until a raw UNIX time."""
    from gateway.app import RunReport
    from gateway.cli import _print_report, _utc
    from gateway.records import ReadStats
    from gateway.settings import load

    report = RunReport(frames=7522)
    _print_report(report, load(None, env={}), 2.0, live=1)
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("read 7,522 frames from 1 live bus(es) in 2.0 s")
    # (as `gateway run` reports it: with the bus's read stats, which are no file's)
    report.read = [ReadStats(path="CAN bus can0 (virtual:x)", live=True, frames=7522)]
    _print_report(report, load(None, env={}), 2.0, live=1)
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("read 7,522 frames from 1 live bus(es) in 2.0 s"), first
    _print_report(report, load(None, env={}), 2.0, files=2)
    assert capsys.readouterr().err.startswith("replayed 7,522 frames from 2 file(s) in")
    assert _utc(1_000_000_000.25) == "2001-09-09 01:46:40 UTC" and _utc(None) == "None"


def test_a_replay_while_collection_was_stopped_names_no_silent_channel(capsys):
    # frames that came while collection was stopped are not counted per channel (a stop hides
    # the bus's activity): "no frames on can0 ... (the log's channels: none)" was said of a
    # log full of can0 frames
    import dataclasses

    from gateway.app import RunReport
    from gateway.cli import _print_report
    from gateway.settings import load

    s = dataclasses.replace(load(None, env={}), dbc={"can0": ["a.dbc"]})
    _print_report(RunReport(frames=500, frames_while_stopped=500), s, 1.0, files=1)
    assert "no frames on" not in capsys.readouterr().err
    _print_report(RunReport(frames=500), s, 1.0, files=1)  # (no stop: said, as before)
    assert "no frames on can0, which a DBC is given for" in capsys.readouterr().err


def test_a_mistyped_option_names_the_commands_help_and_the_option_meant():
    proc = run_gateway("replay", "x.log", "--dcb", "a.dbc")
    assert proc.returncode == 2 and proc.stderr == (
        "gateway: error: unrecognized arguments: --dcb a.dbc; did you mean --dbc? "
        "(see: gateway replay --help)\n"
    )
    proc = run_gateway("--bogus")  # no command: the top help, and nothing close to guess
    assert proc.stderr == "gateway: error: unrecognized arguments: --bogus (see: gateway --help)\n"
    proc = run_gateway("data", "export", "--outt", "x.json")  # a command's command: its help
    assert proc.stderr == (
        "gateway: error: unrecognized arguments: --outt x.json; did you mean --out? "
        "(see: gateway data export --help)\n"
    )


def test_data_export_and_delete_offer_only_the_options_they_use():
    for action in ("export", "delete"):
        said = run_gateway("data", action, "--help").stdout
        assert "--ledger" in said and "--outbox" in said and "--vin" in said
        for unused in ("--broker", "--policy", "--window", "--decoder"):
            assert unused not in said, (action, unused)


def test_a_log_whose_ids_are_almost_all_in_no_dbc_asks_whether_the_dbc_is_the_right_one(
    capsys,
):
    from gateway.app import RunReport
    from gateway.cli import _print_report
    from gateway.settings import load

    report = RunReport(frames=39546)
    report.decode.decoded = 2898
    report.decode.unknown_id = {0x100 + i: 36648 // 52 for i in range(52)}
    _print_report(report, load(None, env={}), 1.0, files=1)
    assert "93% of the frames have ids in no DBC given" in capsys.readouterr().err
    report.decode.decoded = 24262  # the Kona log with its own P-CAN DBC: 39 % unknown
    report.decode.unknown_id = {0x100 + i: 15284 // 52 for i in range(52)}
    _print_report(report, load(None, env={}), 1.0, files=1)
    assert "ids in no DBC given" not in capsys.readouterr().err


def test_data_export_lists_and_delete_removes_the_stored_camera_frames(tmp_path, vin):
    from gateway.egress.ledger import Ledger
    from gateway.egress.outbox import Outbox

    # GIVEN a vehicle's ledger and outbox, and two anonymised frames its camera kept
    led = Ledger(tmp_path / "l.jsonl")
    led.append("start", vin=vin)
    led.close()
    Outbox(tmp_path / "o.sqlite").close()
    frames = tmp_path / "frames" / vin
    frames.mkdir(parents=True)
    kept = [frames / "front-000000001-1750000000.jpg", frames / "rear-000000002-1750000001.jpg"]
    for f in kept:
        f.write_bytes(b"\xff\xd8 an anonymised frame")
    (frames / "notes.txt").write_text("not a frame")
    theirs = tmp_path / "frames" / "OTHERVIN000000001" / "front-000000001-1750000000.jpg"
    theirs.parent.mkdir()  # another vehicle whose config shares this folder: never touched
    theirs.write_bytes(b"\xff\xd8 its frame")
    common = _vehicle(tmp_path, vin)
    # WHEN the owner exports: the frames are listed, with where they are
    assert run_gateway("data", "export", "--out", str(tmp_path / "x.json"), *common).returncode == 0
    exported = json.loads((tmp_path / "x.json").read_text())["frames"]
    assert exported["folder"] == str(frames)
    assert [(f["file"], f["camera"]) for f in exported["files"]] == [
        (kept[0].name, "front"), (kept[1].name, "rear")]  # fmt: skip
    # AND deleting another category keeps them; deleting exterior_camera removes them
    other = run_gateway("data", "delete", "--category", "vehicle_status", *common)
    assert other.returncode == 0 and all(f.exists() for f in kept)
    camera = run_gateway("data", "delete", "--category", "exterior_camera", *common)
    assert camera.returncode == 0 and "2 stored camera frame(s)" in camera.stdout
    assert not any(f.exists() for f in kept) and (frames / "notes.txt").exists()
    assert theirs.exists()
    entries = [json.loads(ln) for ln in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert [e.get("frames_removed") for e in entries if e["kind"] == "data-delete"] == [0, 2]


def test_frames_that_cannot_be_deleted_are_counted_and_the_rest_go(tmp_path, monkeypatch, capsys):
    from pathlib import Path as P

    from gateway import cli
    from gateway.egress.ledger import Ledger
    from gateway.egress.outbox import Outbox

    led = Ledger(tmp_path / "l.jsonl")
    led.append("start", vin="V")
    led.close()
    Outbox(tmp_path / "o.sqlite").close()
    frames = tmp_path / "frames" / "V"
    frames.mkdir(parents=True)
    names = [f"front-00000000{i}-1750000000.jpg" for i in range(3)]
    for n in names:
        (frames / n).write_bytes(b"\xff\xd8")
    real = P.unlink

    def unlink(self, missing_ok=False):  # one frame the disk will not let go (root ignores modes)
        if self.name == names[1]:
            raise PermissionError(1, "Operation not permitted", str(self))
        return real(self, missing_ok)

    monkeypatch.setattr(P, "unlink", unlink)
    try:
        rc = cli.main(["data", "delete", "--category", "all", "--vin", "V",
                       "--ledger", str(tmp_path / "l.jsonl"),
                       "--outbox", str(tmp_path / "o.sqlite")])  # fmt: skip
    finally:
        monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 4 and "1 stored camera frame(s)" in err and "could not be deleted" in err
    assert sorted(p.name for p in frames.iterdir()) == [names[1]]
    (entry,) = [json.loads(ln) for ln in (tmp_path / "l.jsonl").read_text().splitlines()
                if json.loads(ln)["kind"] == "data-delete"]  # fmt: skip
    assert (entry["frames_removed"], entry["frames_failed"]) == (2, 1)


def test_the_category_choices_are_the_policys_categories():
    from gateway.cli import CATEGORY_CHOICES
    from gateway.telemetry.policy import Category

    assert set(CATEGORY_CHOICES) == {c.value for c in Category} | {"all"}


@pytest.mark.broker
def test_the_owner_s_stop_is_answered_within_the_wait_during_a_fast_replay(tmp_path, broker, vin):
    """A fast --loop replay (docs/broker.md's bench) queued summaries faster than the publisher
    got the event loop to send them (one turn every 0.1 s: ~3 a second), and the stop's answer
    waited behind them: `gateway consent stop` said "no answer" after 5 s, the status came 17 s
    later. Now the retained states go first, and a batch being sent makes way for them."""
    import signal
    import subprocess
    import sys
    import time

    args = replay_args(
        KONA_CANDUMP, [f"can0={KONA_PCAN}", f"can1={KONA_CCAN}"], broker.url, vin, tmp_path,
        "--fast", "--loop", "-q", "--window", "1",
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(6)  # the queue builds up
        owner = ["--broker", broker.url, "--vin", vin]
        stop = run_gateway("consent", "stop", *owner, timeout=60)
        resume = run_gateway("consent", "resume", *owner, timeout=60)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert stop.returncode == 0 and "collection stopped" in stop.stdout, stop.stderr
    assert resume.returncode == 0 and "collection on" in resume.stdout, resume.stderr
    assert "came while the owner had stopped collection" in err, err
    assert "; stopped by SIGINT" in err, err  # (the report says why the replay ended)


@pytest.mark.parametrize(
    "argv, level",
    [
        (["replay", "x.log", "-vv"], 2),
        (["-v", "replay", "x.log"], 1),
        (["replay", "x.log"], 0),
        (["data", "delete", "--category", "all", "-v"], 1),
    ],
)
def test_verbose_may_follow_the_command(argv, level):
    """`gateway replay ... -v` was refused ("unrecognized arguments: -v"): only `gateway -v
    replay ...` worked."""
    from gateway.cli import build_parser

    assert build_parser(argv).parse_args(argv).verbose == level


def test_ctrl_c_while_the_gateway_is_still_importing_is_interrupted_not_a_traceback(
    monkeypatch, capsys
):
    # (in the first ~0.1 s the gateway's modules are being imported: a Ctrl-C then was a
    # traceback of KeyboardInterrupt from `from gateway.cli import entry`)
    import builtins

    from gateway import _start

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "gateway.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    assert _start.main() == 130
    assert capsys.readouterr().err == "gateway: interrupted\n"


def test_ctrl_c_inside_numpys_import_is_interrupted_not_a_broken_install(monkeypatch, capsys):
    # numpy turns a KeyboardInterrupt inside the import of its C extensions into an
    # ImportError ("Importing the numpy C-extensions failed"): a traceback blaming the install
    import builtins

    from gateway import _start

    real_import = builtins.__import__

    def numpy_interrupted(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "gateway.cli":
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as exc:
                raise ImportError("Importing the numpy C-extensions failed.") from exc
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", numpy_interrupted)
    assert _start.main() == 130
    assert capsys.readouterr().err == "gateway: interrupted\n"
    # (an ImportError of its own is not taken for a Ctrl-C)
    monkeypatch.setattr(builtins, "__import__", real_import)
    monkeypatch.setitem(sys.modules, "gateway.cli", None)  # import of it fails
    with pytest.raises(ImportError):
        _start.main()


_ENDING = r"""
import atexit, os, sys, threading, time
# run by the interpreter's teardown (where it waits for threads), if it runs
threading._register_atexit(lambda: os.write(2, b"torn down\n"))
atexit.register(lambda: print("atexit ran", file=sys.stderr))
if "--thread" in sys.argv:
    sys.argv.remove("--thread")
    def late():
        time.sleep(0.3)
        print("thread done", file=sys.stderr)
    threading.Thread(target=late).start()
from gateway._start import main
sys.exit(main())
"""


def _ending(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _ENDING, "config", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60,
    )


def test_a_command_that_returns_ends_the_process_without_the_teardown_its_output_complete(
    tmp_path,
):
    # the console script skips the interpreter's teardown (12 ms of a 1M-frame replay); the
    # atexit handlers still run and stdout, a pipe (block-buffered), is flushed whole
    proc = _ending(tmp_path, "--doc")
    assert proc.returncode == 0, proc.stderr
    assert "atexit ran" in proc.stderr
    assert "torn down" not in proc.stderr
    full = subprocess.run(  # the command run as a function, the interpreter ending as usual
        [sys.executable, "-c", "import sys; from gateway.cli import entry; sys.exit(entry())"]
        + ["config", "--doc"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60,
    )
    assert proc.stdout == full.stdout and len(proc.stdout) > 1000
    # an error's exit code is kept
    bad = _ending(tmp_path, "--config", str(tmp_path / "missing.toml"))
    assert bad.returncode == 2 and "atexit ran" in bad.stderr and "torn down" not in bad.stderr


def test_a_thread_still_running_at_the_end_is_waited_for_as_the_interpreter_would(tmp_path):
    proc = _ending(tmp_path, "--doc", "--thread")
    assert proc.returncode == 0, proc.stderr
    assert "thread done" in proc.stderr
    assert "torn down" in proc.stderr  # the usual end: the interpreter waits for the thread


@pytest.mark.broker
def test_the_report_does_not_give_a_share_of_the_raw_bytes_over_100_percent(tmp_path, broker, vin):
    # one frame: its 8 payload bytes against 500+ bytes of summaries ("5437.50% of 8")
    log = tmp_path / "one.log"
    log.write_text("(1.0) can0 542#1234000000000000\n")
    args = [
        "replay", str(log), "--dbc", f"can0={KONA_PCAN}", "--fast", "--broker", broker.url,
        "--vin", vin, "--ledger", str(tmp_path / "l.jsonl"), "--outbox",
        str(tmp_path / "o.sqlite"), "-q",
    ]  # fmt: skip
    proc = run_gateway(*args)
    assert proc.returncode == 0, proc.stderr
    assert "bytes, more than the 8 raw CAN payload bytes)" in proc.stderr
    assert "%" not in proc.stderr.split("released", 1)[1].splitlines()[0]
