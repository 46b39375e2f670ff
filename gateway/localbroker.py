"""A private Mosquitto process on a free loopback port, for the demo, `validate` and tests.

The gateway itself never needs this in a car; it exists so that a bench or a test run can prove
its claims against a real broker without depending on one already running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import BrokerError

_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str:
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise BrokerError(
        "mosquitto not found: install it (sudo apt-get install mosquitto) or run `make demo`, "
        "which installs it"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise BrokerError(f"mosquitto did not open {host}:{port} within {timeout:.0f} s")


@dataclass
class LocalBroker:
    """One Mosquitto process. ``start()``/``stop()`` may be called repeatedly (fault tests stop
    the broker mid-replay and start it again on the same port and persistence directory)."""

    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    extra_config: str = ""
    workdir: Path | None = None
    persistence: bool = True
    _proc: subprocess.Popen[bytes] | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "mosquitto.log"

    def _write_config(self) -> Path:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="gateway-mosquitto-")
            self.workdir = Path(self._tmp.name)
        conf = self.workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {self.host}",
            "log_dest file " + str(self.workdir / "mosquitto.log"),
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/"]
        if "allow_anonymous" not in self.extra_config and "password_file" not in self.extra_config:
            lines.append("allow_anonymous true")
        conf.write_text("\n".join(lines) + "\n" + self.extra_config + "\n")
        return conf

    def start(self, timeout: float = 10.0) -> LocalBroker:
        if self.running:
            return self
        conf = self._write_config()
        self._proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for_port(self.host, self.port, timeout)
        except BrokerError as exc:
            self.stop()
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            raise BrokerError(
                f"mosquitto failed to start on port {self.port}: {log[-300:]}"
            ) from exc
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def local_broker(**kwargs: object) -> Iterator[LocalBroker]:
    broker = LocalBroker(**kwargs)  # type: ignore[arg-type]
    with broker:
        yield broker


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
