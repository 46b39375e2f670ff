"""Shared fixtures: paths to the real fixtures, a real Mosquitto broker per test session, and
helpers to run the gateway as a user would (a subprocess) and to listen as the owner would."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.localbroker import LocalBroker

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "can_fixtures"
KONA = FIXTURES / "kona_ev_2019"
KONA_CSV = KONA / "230112-7-2019-pcan-ccan-power-off-on-ready-off.csv"
KONA_CANDUMP = KONA / "230112-7-2019-pcan-ccan-power-off-on-ready-off.converted.candump.log"
KONA_PCAN = KONA / "kona_pcan.dbc"
KONA_CCAN = KONA / "kona_ccan.dbc"
SHARED = Path(os.environ.get("GATEWAY_SHARED", ROOT.parent / "shared"))
SHARED_CAN = SHARED / "data" / "can"

# the gateways these tests start keep their DBC cache in a folder of this run, not in ~/.cache
_CACHE = tempfile.TemporaryDirectory(prefix="gateway-test-cache-")
os.environ.setdefault("GATEWAY_CACHE_DIR", _CACHE.name)


def unsalted(body: Any) -> Any:
    """A message's body without its salt (32 random hex digits, ``schema.SALT``), which makes
    two releases of the same summary differ: for comparing what two runs published. A salt of
    any other form fails the test."""
    import re

    if not isinstance(body, dict) or "salt" not in body:
        return body
    assert re.fullmatch(r"[0-9a-f]{32}", body["salt"]), body["salt"]
    return {k: v for k, v in body.items() if k != "salt"}


def shared_or_skip(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent (the shared data folder is not beside the repository)")
    return p


@pytest.fixture(autouse=True)
def _root_logger_as_it_was() -> Iterator[None]:
    """A test that runs ``cli.main()`` in this process points the root logger at the stderr
    of that moment (pytest's capture of that test, closed after it): later tests' warnings
    would then end in "--- Logging error ---" on their own stderr. Put back after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _dataclasses_as_they_were() -> Iterator[None]:
    """A test that runs the console script's ``main`` in this process puts the code cache's
    hook into ``dataclasses`` (``gateway.codecache``): taken out again after it, with its
    write at exit, so that the other tests define their dataclasses as Python does."""
    import atexit
    import dataclasses

    had = vars(dataclasses).get("exec")
    yield
    hook = vars(dataclasses).get("exec")
    if hook is not had:
        if had is None:
            del dataclasses.exec  # type: ignore[attr-defined]
        else:
            dataclasses.exec = had  # type: ignore[attr-defined]
        cache = getattr(hook, "__self__", None)
        if cache is not None:
            atexit.unregister(cache.save)


@pytest.fixture(scope="session")
def broker() -> Iterator[LocalBroker]:
    """One real Mosquitto on a free loopback port for the whole session."""
    with LocalBroker() as b:
        yield b


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker of the test's own (fault tests stop and start it)."""
    b = LocalBroker(workdir=tmp_path / "mosquitto")
    b.workdir.mkdir()  # type: ignore[union-attr]
    b.start()
    yield b
    b.close()


@pytest.fixture
def vin() -> str:
    """A fresh VIN per test, so retained messages of other tests never mix in."""
    return "TEST" + uuid.uuid4().hex[:13].upper()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool


async def _read_until(client: aiomqtt.Client, stop: Any, into: list[Received]) -> None:
    """Collect messages until ``stop`` (a threading.Event) is set. The reader is ONE task
    cancelled once at the end: cancelling aiomqtt's ``__anext__`` on a timeout (wait_for) can
    drop a message that had just arrived, which once made a test see a loss that was not there."""

    async def read() -> None:
        async for m in client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else b""
            into.append(Received(str(m.topic), payload, bool(m.retain)))

    reader = asyncio.create_task(read())
    try:
        while not stop.is_set() and not reader.done():
            await asyncio.sleep(0.05)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    if reader.done() and not reader.cancelled() and reader.exception() is not None:
        raise reader.exception()  # type: ignore[misc]


@dataclass
class Listener:
    """Subscribes (to ``#`` by default) in a background thread with its own event loop."""

    url: str
    topic: str = "#"
    messages: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        import threading

        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("listener did not subscribe")

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        host, port = self.url.removeprefix("mqtt://").split(":")
        async with aiomqtt.Client(host, int(port)) as client:
            await client.subscribe(self.topic, qos=1)
            self._ready.set()
            await _read_until(client, self._stop, self.messages)

    def settle(self, quiet: float = 0.5, timeout: float = 20.0) -> list[Received]:
        """Wait until no message arrived for ``quiet`` seconds, then stop listening."""
        import time

        deadline = time.monotonic() + timeout
        n = -1
        while time.monotonic() < deadline:
            if len(self.messages) == n:
                break
            n = len(self.messages)
            time.sleep(quiet)
        self._stop.set()
        self._thread.join(5)
        return self.messages


@pytest.fixture
def listen():
    made: list[Listener] = []

    def make(url: str, topic: str = "#") -> Listener:
        lst = Listener(url, topic)
        made.append(lst)
        return lst

    yield make
    for lst in made:
        lst._stop.set()


def replay_args(
    log: Path | str, dbcs: Sequence[str], broker_url: str, vin: str, state: Path, *extra: str
) -> list[str]:
    """``gateway replay`` as the tests run it: each ``--dbc`` spec, the broker and VIN, and the
    ledger and outbox in the folder ``state`` (``ledger.jsonl``, ``outbox.sqlite``)."""
    return [
        "replay",
        str(log),
        *(arg for spec in dbcs for arg in ("--dbc", spec)),
        "--broker",
        broker_url,
        "--vin",
        vin,
        "--ledger",
        str(state / "ledger.jsonl"),
        "--outbox",
        str(state / "outbox.sqlite"),
        *extra,
    ]


def run_gateway(
    *args: str, cwd: Path | None = None, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The gateway as a user runs it: a separate process, stdin closed."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=full_env,
    )


def gateway_settings(
    tmp_path: Path,
    dbc: dict[str, list[str]],
    *,
    url: str | None = None,
    consent: Sequence[str] = (),
    **gateway: Any,
) -> Any:
    """Settings for a gateway built in a test: its ledger and outbox in ``tmp_path``, the DBCs
    by channel, ``[gateway]`` values by keyword (vin, window, decoder, policy, ...), and a
    broker on a free port where nothing listens unless ``url`` is given."""
    import dataclasses

    from gateway import settings as settings_mod
    from gateway.localbroker import free_port

    s = settings_mod.load(
        None,
        env={},
        overrides={
            "broker.url": url or f"mqtt://127.0.0.1:{free_port()}",
            "gateway.ledger": str(tmp_path / "l.jsonl"),
            "gateway.outbox": str(tmp_path / "o.sqlite"),
            **{f"gateway.{k}": v for k, v in gateway.items()},
        },
    )
    g = dataclasses.replace(s.gateway, consent=list(consent))
    return dataclasses.replace(s, gateway=g, dbc=dbc)


@contextlib.contextmanager
def ledger_held(path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``path``'s ledger open (a running gateway), killed at the end."""
    hold = (
        "import sys, time\n"
        "from gateway.egress.ledger import Ledger\n"
        "led = Ledger(sys.argv[1], fsync=False)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", hold, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("gateway: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@dataclass
class DurableListener:
    """An owner that survives broker restarts: a persistent session (clean_session=False,
    QoS 1), reconnecting in a loop, so messages published while it was away are delivered."""

    url: str
    topic: str
    messages: list[Received] = field(default_factory=list)
    connects: int = 0

    def __post_init__(self) -> None:
        import threading

        self._ready = threading.Event()
        self._stop = threading.Event()
        self._id = "owner-" + uuid.uuid4().hex[:8]
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("listener did not subscribe")

    async def _main(self) -> None:
        host, port = self.url.removeprefix("mqtt://").split(":")
        while not self._stop.is_set():
            try:
                async with aiomqtt.Client(
                    host, int(port), identifier=self._id, clean_session=False, timeout=2
                ) as client:
                    self.connects += 1
                    await client.subscribe(self.topic, qos=1)
                    self._ready.set()
                    await _read_until(client, self._stop, self.messages)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    def wait_until(self, done: Callable[[list[Received]], bool], timeout: float = 30.0) -> None:
        """Wait (bounded) until ``done(messages)`` holds: after a broker restart the owner
        reconnects with its own backoff, so its queued messages arrive some time later."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done(list(self.messages)):
            time.sleep(0.1)

    def stop(self) -> list[Received]:
        self._stop.set()
        self._thread.join(10)
        return self.messages


@pytest.fixture
def durable_listen():
    made: list[DurableListener] = []

    def make(url: str, topic: str) -> DurableListener:
        lst = DurableListener(url, topic)
        made.append(lst)
        return lst

    yield make
    for lst in made:
        lst._stop.set()


MODEL3_DRIVE = FIXTURES / "model3" / "model3_synthetic_drive.log"
MODEL3_DBC = FIXTURES / "model3" / "Model3CAN.dbc"


def write_policy(path: Path, *rules: tuple[str, str, str, str], more: str = "") -> str:
    """A policy file of ``(signal, publish_as, category, aggregates)`` rules (aggregates as
    TOML, ``'["last"]'``), no quantum, then the TOML ``more`` (a ``[trips]`` table): its path,
    for ``gateway_settings(policy=...)``."""
    path.write_text(
        f'[policy]\nname = "{path.stem}"\nversion = 1\n'
        + "".join(
            f'\n[[signal]]\nsignal = "{sig}"\npublish_as = "{pub}"\ncategory = "{cat}"\n'
            f"aggregates = {aggs}\n"
            for sig, pub, cat, aggs in rules
        )
        + more
    )
    return str(path)


class OwnerMidDrive:
    """A paced source: the bundled Model 3 drive in slices of ``step`` s of frame time, the
    gateway's clock (``clock[0]``) a second further at each. The owner's messages of
    ``script``, each (s into the drive, topic tail, body), e.g. (250, "command", {"command":
    "stop"}), reach the gateway in ``box[0]`` before the first slice at or past their time,
    each awaited until the gateway answered it, half a second apart on the clock: through the
    broker at ``url`` as an owner sends them (so between two batches, as the MQTT task hands
    them over), or, without ``url``, by a direct call of its handler. ``said_at``: the frame
    time of the slice after each message."""

    def __init__(
        self,
        box: list[Any],
        clock: list[float],
        script: Sequence[tuple[float, str, dict[str, Any]]],
        url: str | None = None,
        step: float = 10.0,
    ) -> None:
        self.box, self.clock, self.script = box, clock, list(script)
        self.url, self.step = url, step
        self.said_at: list[float] = []

    async def batches(self) -> Any:
        import hashlib
        import json

        import numpy as np

        from gateway.canbus.chunking import FAST
        from gateway.canbus.replay import iter_log

        (batch,) = iter_log(MODEL3_DRIVE, chunking=FAST)
        t0 = float(batch.timestamp[0])
        piece = np.floor((batch.timestamp - t0) / self.step).astype(np.int64)
        for k in np.unique(piece).tolist():
            part = batch.select(np.flatnonzero(piece == k))
            first = float(part.timestamp[0])
            while (
                len(self.said_at) < len(self.script)
                and first - t0 >= self.script[len(self.said_at)][0]
            ):
                _, tail, body = self.script[len(self.said_at)]
                self.said_at.append(first)
                self.clock[0] += 0.5
                await self._say(tail, json.dumps(body).encode(), hashlib.sha256)
            self.clock[0] += 1.0
            yield part

    @classmethod
    def run(
        cls,
        settings: Any,
        script: Sequence[tuple[float, str, dict[str, Any]]],
        url: str | None = None,
    ) -> tuple[OwnerMidDrive, Any]:
        """A gateway of ``settings`` on its own clock (from 2e9 s), replaying the drive with
        the owner's ``script`` (through the broker at ``url``, which it must reach, or by
        direct calls): the source (its ``said_at``) and the run's report."""
        from gateway.app import Gateway

        clock = [2_000_000_000.0]
        box: list[Any] = []
        source = cls(box, clock, script, url=url)
        gw = Gateway(settings, [source], clock=lambda: clock[0])
        box.append(gw)
        report = asyncio.run(gw.run(require_broker=url is not None, drain_timeout=10))
        return source, report

    async def _say(self, tail: str, payload: bytes, sha256: Any) -> None:
        gw = self.box[0]
        topic = f"{gw.topics.base}/{tail}"
        if self.url is None:
            await gw.handle_owner_message(topic, payload)
            return
        mine = sha256(payload).hexdigest()
        host, port = self.url.removeprefix("mqtt://").split(":")
        async with aiomqtt.Client(host, int(port)) as owner:
            await owner.publish(topic, payload, qos=1)
        for _ in range(200):
            if gw.consent.last_change.get("command_sha256") == mine:
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"the gateway did not answer {payload!r}")
