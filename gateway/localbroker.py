"""A private Mosquitto process on a free loopback port, for the demo, `validate` and tests.

The gateway itself never needs this in a car; it exists so that a bench or a test run can prove
its claims against a real broker without depending on one already running.
"""

from __future__ import annotations

import contextlib
import os
import random
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


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out as source ports of outgoing connections."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free loopback port outside the kernel's ephemeral range where there is room for one.

    A port from the ephemeral range (what ``bind(0)`` gives) can be taken as the source port of
    any outgoing connection while its broker is stopped; the socket's TIME_WAIT then keeps the
    port from Mosquitto for a minute, and a fault test that restarts its broker on the same port
    fails. Below the range no connection is ever given it.
    """
    low, _ = _ephemeral_range()
    if low > 11000:
        for _ in range(200):
            port = random.randrange(10000, low)
            if _bindable(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Returns once ``host:port`` takes connections, and, given ``proc``, once it is ``proc``
    that listens there: another program listening on the port (Mosquitto then fails to bind
    it and exits) answered the probe, and the broker was taken as started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            if proc is None or _listens(proc.pid, port) is not False:
                return
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"mosquitto exited with status {proc.returncode}")
        time.sleep(0.02)
    raise BrokerError(f"mosquitto did not open {host}:{port} within {timeout:.0f} s")


def _listens(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a TCP socket listening on ``port``; None where this
    cannot be told (no /proc, or its entries hidden)."""
    inodes: set[str] = set()
    read = 0  # tables read (none without /proc: macOS)
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(FileNotFoundError), open(table) as f:
                read += 1
                next(f, None)  # the heading
                for row in f:
                    cols = row.split()
                    # local address "0100007F:075B", state 0A: LISTEN; the inode is column 9
                    if cols[3] == "0A" and int(cols[1].rpartition(":")[2], 16) == port:
                        inodes.add(f"socket:[{cols[9]}]")
        if not read:
            return None
        if not inodes:
            return False
        fds = Path(f"/proc/{pid}/fd")
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in inodes:
                    return True
    except (OSError, ValueError, IndexError):
        return None
    return False


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
        if os.geteuid() == 0 and "\nuser " not in "\n" + self.extra_config:
            # As root, Mosquitto drops to the user `mosquitto`, which cannot write this private
            # folder: its log and persistence were silently lost. The broker listens on loopback
            # only and exists for a bench or a test run.
            lines.append("user root")
        if "allow_anonymous" not in self.extra_config and "password_file" not in self.extra_config:
            lines.append("allow_anonymous true")
        conf.write_text("\n".join(lines) + "\n" + self.extra_config + "\n")
        return conf

    def start(self, timeout: float = 10.0) -> LocalBroker:
        if self.running:
            return self
        conf = self._write_config()
        assert self.workdir is not None
        # What Mosquitto says before its log file is open (a port in use, a bad config line).
        with open(self.workdir / "mosquitto.stderr", "ab") as err:
            said_before = err.tell()
            self._proc = subprocess.Popen(
                [find_mosquitto(), "-c", str(conf)],
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
        try:
            wait_for_port(self.host, self.port, timeout, self._proc)
        except BrokerError as exc:
            self.stop()
            with open(self.workdir / "mosquitto.stderr", "rb") as err:
                err.seek(said_before)
                said = err.read().decode(errors="replace").strip()
            if self.log_path.exists():
                said += " " + self.log_path.read_text(errors="replace").strip()[-200:]
            raise BrokerError(
                f"mosquitto failed to start on port {self.port} ({exc}): {said[-300:]}"
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
