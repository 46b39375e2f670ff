"""The gateway's error tree: every user mistake becomes one of these, printed as one line.

    GatewayError                  base; ``str(err)`` is the whole one-line message
     ├── ConfigError              a config/policy file or option: names the file and the key
     ├── InputError               an input the user pointed at
     │    ├── LogFormatError      a CAN log: missing, unknown format, unreadable
     │    ├── DbcError            a DBC that cantools refuses even with strict=False
     │    └── CameraError         a video, image folder or device that cannot be read
     ├── BrokerError              the MQTT broker refused or cannot be reached
     ├── StorageError             the outbox/ledger/local store cannot be written
     └── AuditError               a ledger that fails verification (names the first bad line)

Only ``gateway.cli`` turns these into ``gateway: error: ...`` and an exit code; nothing
else catches them broadly.
"""

from __future__ import annotations

import os
from pathlib import Path


class GatewayError(Exception):
    """Base of every error the gateway reports to a user without a traceback."""

    exit_code = 2


class ConfigError(GatewayError):
    """A configuration or policy value is missing, unknown or of the wrong type."""


class InputError(GatewayError):
    """An input file or device named by the user cannot be used."""


class LogFormatError(InputError):
    """A CAN log is missing, of an unknown format, or unreadable."""


class DbcError(InputError):
    """A DBC file cannot be loaded, even with ``strict=False``."""


class CameraError(InputError):
    """A camera source (video file, image folder, V4L2 device) cannot be read."""


class BrokerError(GatewayError):
    """The MQTT broker refused the connection or could not be reached."""

    exit_code = 3


class StorageError(GatewayError):
    """On-device storage (outbox, ledger, frame store) cannot be written."""

    exit_code = 4


def make_folder(path: Path, what: str) -> None:
    """``path`` and its parents made if missing; a failure (a file in the way, no permission,
    a read-only disk) is one ``StorageError`` line naming ``what`` the folder is for."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"{path}: cannot create the {what} ({exc.strerror})") from exc


def still_named(path: str | Path, fd: int, held: os.stat_result | None = None) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not deleted, not replaced by
    another file): what is written to a file no path names is read by nobody. ``held``: the
    caller's ``os.fstat(fd)`` of this moment, if it took one. Errors other than a missing path
    are the caller's (OSError)."""
    held = held or os.fstat(fd)
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    return held.st_nlink > 0 and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


class AuditError(GatewayError):
    """An audit ledger failed verification."""

    exit_code = 1
