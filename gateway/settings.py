"""Settings: frozen dataclasses, each option declared once, and ONE load function.

Precedence: the TOML file < environment ``GATEWAY_<SECTION>_<KEY>`` < the command line. Every
option carries its help text in its field metadata; ``docs/config.md`` is generated from it
(``gateway config --doc``), so the docs cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from gateway.errors import ConfigError

T = TypeVar("T")


def opt(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    if isinstance(default, list | dict):
        # a copy for each instance (a list or dict default must not be shared)
        return field(default_factory=partial(type(default), default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class GatewaySettings:
    """The ``[gateway]`` section: vehicle, windows, policy and where state is kept."""

    vin: str = opt("TESTVIN0000000001", "Vehicle identification number: names the owner channel.")
    window: float = opt(60.0, "Aggregation window in seconds of frame time.")
    policy: str = opt(
        "", "Policy TOML (default: the bundled default policy); its keys: docs/policy.md."
    )
    ledger: str = opt(
        "gateway-ledger.jsonl", "Audit ledger (append-only, hash-chained JSON lines)."
    )
    outbox: str = opt(
        "gateway-outbox.sqlite",
        "Durable outbox (SQLite, WAL): summaries wait here until the broker acknowledged them.",
    )
    state_dir: str = opt(
        "", "Directory for on-device state (frame store, consent); default: beside the ledger."
    )
    decoder: str = opt(
        "vector", "CAN decoder: 'vector' (numpy, fast) or 'cantools' (per frame, reference)."
    )
    health_interval: float = opt(
        30.0, "Seconds between health summaries on the health topic (0: off)."
    )
    digest_interval: float = opt(
        300.0,
        "Seconds between ledger digests on the ledger topic (0: off; one is always sent at stop).",
    )
    consent: list[str] = opt(
        [],
        "Consents given in the config, 'CATEGORY:DAYS' (e.g. 'location:7'); bounded by the policy's max_consent_days. "
        "Granted again at every start, for the bench: an owner's withdrawal lasts until the next start.",
    )

    @property
    def state_path(self) -> Path:
        """The folder of the gateway's own state (consent, anonymised frames): ``state_dir``,
        or the ledger's folder."""
        return Path(self.state_dir) if self.state_dir else Path(self.ledger).resolve().parent

    @property
    def consent_file(self) -> Path:
        """Where the consent state of this vehicle is kept."""
        return self.state_path / f"consent-{self.vin}.json"

    @property
    def frames_path(self) -> Path:
        """Where the camera stages keep this vehicle's anonymised frames: a folder per VIN, as
        the consent file is one per VIN (vehicles whose configs share a folder must not export
        or delete each other's frames)."""
        return self.state_path / "frames" / self.vin


@dataclass(frozen=True)
class BrokerSettings:
    """The ``[broker]`` section: where summaries are published, and how to log in."""

    url: str = opt(
        "mqtt://127.0.0.1:1883", "Broker URL: mqtt://host:port, or mqtts://host:port for TLS."
    )
    topic_prefix: str = opt("vehicles", "Topic prefix: topics are PREFIX/VIN/owner/STREAM.")
    client_id: str = opt("", "MQTT client id (default: gateway-VIN).")
    username: str = opt("", "Username for the broker.")
    password: str = opt("", "Password for the broker (prefer password_file).", secret=True)
    password_file: str = opt("", "File holding the broker password (first line).")
    tls_ca: str = opt("", "CA certificate that signed the broker's certificate (enables TLS).")
    tls_insecure: bool = opt(False, "Skip broker hostname verification (bench only).")
    keepalive: int = opt(30, "MQTT keepalive in seconds (0 to 65535; 0: off).")
    backoff_max: float = opt(
        30.0, "Longest wait between reconnect attempts, in seconds (0.1 to 86400)."
    )

    @property
    def host(self) -> str:
        return _parse_broker_url(self.url)[1]

    @property
    def port(self) -> int:
        return _parse_broker_url(self.url)[2]

    @property
    def tls_by_url(self) -> bool:
        """Whether the URL itself asks for TLS (mqtts://, ssl://)."""
        return _parse_broker_url(self.url)[0] == "mqtts"

    @property
    def tls(self) -> bool:
        return self.tls_by_url or bool(self.tls_ca)

    def secret(self) -> str:
        if self.password_file:
            try:
                return Path(self.password_file).read_text(encoding="utf-8").splitlines()[0]
            except (OSError, IndexError, UnicodeDecodeError) as exc:
                why = (
                    "not UTF-8 text"
                    if isinstance(exc, UnicodeDecodeError)
                    else ("empty" if isinstance(exc, IndexError) else exc.strerror or str(exc))
                )
                raise ConfigError(
                    f"{self.password_file}: cannot read the broker password ({why})"
                ) from exc
        return self.password


@dataclass(frozen=True)
class CanSource:
    """One ``[[can]]`` source: recorded logs, or a live bus."""

    logs: list[str] = opt([], "Recorded logs to replay, in order (candump, ASC, BLF, TRC, CSV).")
    interface: str = opt("", "python-can interface of a live bus: socketcan, virtual, pcan, ...")
    channel: str = opt("", "Channel of the live bus: can0, vcan0, ...")
    bitrate: int = opt(0, "Bitrate for interfaces that set it (0: leave as configured).")
    name: str = opt("", "Channel name the DBC mapping uses for this bus (default: channel).")
    options: dict[str, Any] = opt(
        {},
        "More settings of the live bus's python-can interface, as a table, passed to can.Bus "
        "as they are: e.g. { fd = true, data_bitrate = 2000000 } for CAN FD on socketcan's "
        "kin, { receive_own_messages = true }. Which ones exist: python-can's page of the "
        "interface.",
    )


@dataclass(frozen=True)
class ReplaySettings:
    """The ``[replay]`` section: how recorded logs are paced."""

    speed: float = opt(1.0, "Replay speed: 1 is real time, 10 ten times faster.")
    fast: bool = opt(False, "Replay as fast as possible (ignores speed).")
    loop: bool = opt(False, "Start again at the end of the last log.")


@dataclass(frozen=True)
class CameraSource:
    """One ``[[camera]]`` source and how its frames are anonymised."""

    source: str = opt("", "Video file, image folder, /dev/videoN, or 'synthetic'.")
    name: str = opt("front", "Camera name used in summaries.")
    method: str = opt("gaussian", "Anonymisation: gaussian, pixelate or fill.")
    detect_every: int = opt(
        2,
        "Run detection on every k-th frame; the frames between wait for the next detection and "
        "get the boxes of both (k-1 frames of latency, no frame leaves before it was covered).",
    )
    memory: int = opt(5, "Apply each box to the next N frames too.")
    face_width: int = opt(
        640,
        "Face detector input width in pixels for a frame up to 1280 px wide (the frame is scaled "
        "to it); a wider frame is seen proportionally wider, up to 2560 (a 1920 px frame at 960, "
        "a 3840 px one at 1920: at 640, faces of the labelled photos in a 3840x2160 frame were "
        "found 0.26 of the time, 0.79 now). Lower saves memory and time and misses more small "
        "faces.",
    )
    plate_width: int = opt(
        960,
        "Plate detector input width in pixels, for a frame up to 1280 px wide as `face_width` "
        "(a wider frame: proportionally wider, up to 2560). 640 saves ~12 MB of peak memory and "
        "lowers plate recall on the labelled photos from 0.97 to 0.935 (docs/camera.md).",
    )
    plate_strips: int = opt(
        3,
        "Run the plate detector on this many overlapping horizontal strips of the scaled frame "
        "(1-4): its working memory follows its input area. 1 (the whole frame at once) takes "
        "~30 MB more and is ~10-20 % faster (docs/camera.md).",
    )
    edges: bool = opt(
        False,
        "A second look at each frame mirrored at its edges, which finds the faces and plates "
        "the frame's edge cuts (half inside: plates were found 0.03-0.70 of the time by edge, "
        "0.87-0.98 so; docs/camera.md). Twice the detection time: a 1280x720 stream ~13 "
        "frames/s instead of ~28 on the 2-core VM of docs/benchmarks.md (stop 31).",
    )
    rotate: int = opt(
        0,
        "Turn each frame this many degrees clockwise (0, 90, 180 or 270) before anything else: "
        "for a camera mounted on its side or upside down. The detectors find upright faces and "
        "level plates; turned 90 degrees, most plates and faces are missed (docs/camera.md).",
    )


@dataclass(frozen=True)
class Settings:
    """A whole configuration file, with the defaults for what it leaves out."""

    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    replay: ReplaySettings = field(default_factory=ReplaySettings)
    can: list[CanSource] = field(default_factory=list)
    camera: list[CameraSource] = field(default_factory=list)
    dbc: dict[str, list[str]] = field(default_factory=dict)
    source_file: str = ""


_SECTIONS: dict[str, Any] = {
    "gateway": GatewaySettings,
    "broker": BrokerSettings,
    "replay": ReplaySettings,
}
_ARRAYS: dict[str, Any] = {"can": CanSource, "camera": CameraSource}


def _parse_broker_url(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url if "://" in url else "mqtt://" + url)
    if "@" in parts.netloc:  # said without the URL: it may hold a password
        raise ConfigError(
            "[broker].url: give the user as [broker].username and the password in "
            "[broker].password_file, not in the URL"
        )
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"[broker].url {url!r}: scheme must be mqtt:// or mqtts://")
    try:
        port = parts.port or (8883 if parts.scheme in ("mqtts", "ssl") else 1883)
    except ValueError as exc:
        raise ConfigError(f"[broker].url {url!r}: bad port") from exc
    if not parts.hostname:
        raise ConfigError(f"[broker].url {url!r}: no host")
    return ("mqtts" if parts.scheme in ("mqtts", "ssl") else "mqtt"), parts.hostname, port


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp,
        "a list of strings" if origin is list else "a table" if origin is dict else str(tp),
    )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value == value and abs(value) != float("inf"):
                return float(value)
        elif isinstance(value, str):
            try:
                f = float(value)
                if f == f and abs(f) != float("inf"):
                    return f
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")


def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type[T], table: Mapping[str, Any], where: str) -> T:
    """One dataclass from one TOML table; unknown keys and wrong types name ``where``."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    hints = _hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in table.items()}
    return cls(**kwargs)


def _resolve(base: Path, value: str) -> str:
    if (
        not value
        or value.startswith("/dev/")
        or value in ("synthetic",)
        or value.startswith("synthetic:")
    ):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _read_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: {what} not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:  # TOML is UTF-8
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): not a TOML {what}") from exc


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file's tables; a missing or broken file is one ConfigError naming ``what``."""
    return _read_toml(Path(path), what)


def load(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """File < environment ``GATEWAY_SECTION_KEY`` < ``overrides`` ({"gateway.vin": ...})."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    base = Path.cwd()
    where = "settings"
    if path is not None:
        p = Path(path)
        raw = _read_toml(p)
        base = p.resolve().parent
        where = str(p)
    allowed = set(_SECTIONS) | set(_ARRAYS) | {"dbc"}
    for key in raw:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown section [{key}] (known: {', '.join(sorted(allowed))})"
            )
    sections: dict[str, dict[str, Any]] = {}
    for name in _SECTIONS:
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        sections[name] = dict(table)
    # environment, then explicit overrides; where a value came from, for its error
    origin: dict[str, str] = {}
    names: set[str] = set()  # every variable read
    for name, cls in _SECTIONS.items():
        for f in fields(cls):
            var = f"GATEWAY_{name.upper()}_{f.name.upper()}"
            names.add(var)
            if var in env:
                value = env[var]
                if (name, f.name) in _PATH_KEYS and value:
                    # relative to where the command runs, as a path on the command line is
                    # (the file's own paths are relative to the file)
                    value = str(Path(value).expanduser().absolute())
                sections[name][f.name] = value
                origin[f"[{name}].{f.name}"] = f"the environment variable {var}"
    _check_environment(env, names)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        sec, _, key = dotted.partition(".")
        sections[sec][key] = value
        flag = "broker" if dotted == "broker.url" else key.replace("_", "-")
        origin[f"[{sec}].{key}"] = f"the option --{flag}"
    try:
        return _build_all(raw, sections, base, where, overrides)
    except ConfigError as exc:
        said = str(exc)
        for key, source in origin.items():
            if re.search(re.escape(key) + r"(?!\w)", said):  # not [broker].password_file
                # the value is not the file's: the file is not blamed
                said = said.removeprefix(f"{where}: ")
                raise ConfigError(f"{said} (set by {source})") from exc
        raise


def _check_environment(env: Mapping[str, str], names: set[str]) -> None:
    """A ``GATEWAY_<SECTION>_<KEY>`` variable of a known section that is none of the variables
    read (``names``) is refused, as an unknown key in the file is: a misspelt one (or one in
    other case: ``GATEWAY_BROKER_Url``) was ignored."""
    for var in env:
        name = next((n for n in _SECTIONS if var.startswith(f"GATEWAY_{n.upper()}_")), None)
        if name is None or var in names:
            continue
        if var.upper() in names:
            raise ConfigError(
                f"the environment variable {var} names no setting: the names are in capitals "
                f"(did you mean {var.upper()}?)"
            )
        prefix = f"GATEWAY_{name.upper()}_"
        known = sorted(f.name for f in fields(_SECTIONS[name]))
        key = var.removeprefix(prefix).lower()
        import difflib  # only for a mistake: ~1-4 ms to import at every start

        close = difflib.get_close_matches(key, known, 1)
        hint = (
            f"did you mean {prefix}{close[0].upper()}?" if close else f"known: {', '.join(known)}"
        )
        raise ConfigError(
            f"the environment variable {var} names no setting: [{name}] has no key {key!r} ({hint})"
        )


# the settings that are paths: in the file, relative to the file; elsewhere, to the working folder
_PATH_KEYS = {
    ("gateway", "policy"),
    ("gateway", "ledger"),
    ("gateway", "outbox"),
    ("gateway", "state_dir"),
    ("broker", "password_file"),
    ("broker", "tls_ca"),
}


def _topic_problem(text: str) -> str | None:
    """Why ``text`` cannot be part of the owner's topics, or None. MQTT allows more, but a VIN
    or a prefix with a space or a control character in it is a typing or copying mistake, and
    the owner would subscribe to (and the broker's ACL name) another topic than the one used."""
    if not text:
        return "it is empty"
    if "+" in text or "#" in text:
        return "'+' and '#' are MQTT wildcards"
    if any(c.isspace() or not c.isprintable() for c in text):
        return "it holds a space or a control character"
    return None


def _build_all(
    raw: dict[str, Any],
    sections: dict[str, dict[str, Any]],
    base: Path,
    where: str,
    overrides: Mapping[str, Any] | None,
) -> Settings:
    built = {
        name: build(
            cls, sections[name], f"{where}: [{name}]" if name not in (overrides or {}) else name
        )
        for name, cls in _SECTIONS.items()
    }
    g: GatewaySettings = built["gateway"]
    g = dataclasses.replace(
        g,
        policy=_resolve(base, g.policy),
        ledger=_resolve(base, g.ledger),
        outbox=_resolve(base, g.outbox),
        state_dir=_resolve(base, g.state_dir),
    )
    if not 0.001 <= g.window <= 1e7:  # 1e-300 s put every sample outside any window
        raise ConfigError(
            f"{where}: [gateway].window must be 0.001 to 10,000,000 seconds, got {g.window}"
        )
    for key in ("health_interval", "digest_interval"):
        if getattr(g, key) < 0:
            raise ConfigError(
                f"{where}: [gateway].{key} must be >= 0 (0: off), got {getattr(g, key)}"
            )
    # one topic level: a '/' would move the owner's channel, '+' and '#' are MQTT wildcards
    why = "it holds a '/'" if "/" in g.vin else _topic_problem(g.vin)
    if why:
        raise ConfigError(
            f"{where}: [gateway].vin must be one MQTT topic level ({why}), got {g.vin!r}"
        )
    if g.decoder not in ("vector", "cantools"):
        raise ConfigError(
            f"{where}: [gateway].decoder must be 'vector' or 'cantools', got {g.decoder!r}"
        )
    broker: BrokerSettings = built["broker"]
    broker = dataclasses.replace(
        broker,
        password_file=_resolve(base, broker.password_file),
        tls_ca=_resolve(base, broker.tls_ca),
    )
    try:
        _parse_broker_url(broker.url)
    except ConfigError as exc:  # named in the file it came from (or the command line's --broker)
        raise ConfigError(f"{where}: {exc}") from None
    if not 0 <= broker.keepalive <= 65535:  # paho refused it at the connection, with a traceback
        raise ConfigError(
            f"{where}: [broker].keepalive must be 0 to 65535 seconds (0: off), got "
            f"{broker.keepalive}"
        )
    if not 0.1 <= broker.backoff_max <= 86_400:  # 0 reconnected in a tight loop
        raise ConfigError(
            f"{where}: [broker].backoff_max must be 0.1 to 86,400 seconds, got {broker.backoff_max}"
        )
    if broker.tls_ca and not Path(broker.tls_ca).is_file():
        raise ConfigError(f"{where}: [broker].tls_ca {broker.tls_ca}: no such CA certificate file")
    if broker.password_file:
        broker.secret()  # unreadable: said now, not when the first connection is tried
    why = _topic_problem(broker.topic_prefix)
    # a leading '/' (an empty first level) is legal MQTT, and in use: kept; others are typos
    if not why and "" in broker.topic_prefix.removeprefix("/").split("/"):
        why = "an empty level: '//', or a '/' at the end"
    if not why and broker.topic_prefix.startswith("$"):
        why = "topics that start with '$' are the broker's own, as $SYS"
    if why:
        raise ConfigError(
            f"{where}: [broker].topic_prefix must be MQTT topic levels ({why}), "
            f"got {broker.topic_prefix!r}"
        )
    arrays: dict[str, list[Any]] = {}
    for name, cls in _ARRAYS.items():
        items = raw.get(name, [])
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            raise ConfigError(f"{where}: [[{name}]] must be an array of tables")
        out: list[Any] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ConfigError(f"{where}: [[{name}]] #{i + 1} must be a table")
            obj = build(cls, item, f"{where}: [[{name}]] #{i + 1}")
            if isinstance(obj, CanSource):
                obj = dataclasses.replace(obj, logs=[_resolve(base, x) for x in obj.logs])
                if obj.bitrate < 0:
                    raise ConfigError(
                        f"{where}: [[can]] #{i + 1}: bitrate must be >= 0, got {obj.bitrate}"
                    )
                if bool(obj.logs) == bool(obj.interface) or (
                    obj.interface and not obj.channel.strip()
                ):
                    raise ConfigError(
                        f"{where}: [[can]] #{i + 1}: give either logs or interface and channel"
                    )
                if obj.logs and (obj.options or obj.bitrate or obj.name):
                    raise ConfigError(
                        f"{where}: [[can]] #{i + 1}: bitrate, name and options are for a live bus "
                        "(interface and channel), not for logs"
                    )
                given = {"interface", "channel", "bitrate"} & set(obj.options)
                if given:
                    raise ConfigError(
                        f"{where}: [[can]] #{i + 1}: options may not hold "
                        f"{', '.join(sorted(given))}: give them as keys of the table"
                    )
                if obj.interface:
                    for j, o in enumerate(out):
                        if not o.interface:
                            continue
                        if (o.interface, o.channel) == (obj.interface, obj.channel):
                            raise ConfigError(
                                f"{where}: [[can]] #{i + 1} is the bus of [[can]] #{j + 1} "
                                f"({obj.interface}:{obj.channel}): one table per bus"
                            )
                        if (o.name or o.channel) == (obj.name or obj.channel):
                            raise ConfigError(
                                f"{where}: [[can]] #{i + 1} and #{j + 1} are both named "
                                f"{obj.name or obj.channel!r} (name, or else channel): the "
                                "DBCs could not tell their frames apart; give each its own name"
                            )
            else:
                if not obj.source.strip():  # `run` refused it, without the file's name
                    raise ConfigError(
                        f"{where}: [[camera]] #{i + 1}: source is missing (a video file, an "
                        "image folder, /dev/videoN or 'synthetic')"
                    )
                obj = dataclasses.replace(obj, source=_resolve(base, obj.source))
                from gateway.camera.options import check_camera  # no OpenCV there

                check_camera(obj, f"{where}: [[camera]] #{i + 1}")
                twin = next((j for j, o in enumerate(out) if o.source == obj.source), None)
                if twin is not None:  # one source is read once: the second table went unused
                    raise ConfigError(
                        f"{where}: [[camera]] #{i + 1} has the source of [[camera]] #{twin + 1} "
                        f"({obj.source}): one camera per source"
                    )
            out.append(obj)
        arrays[name] = out
    dbc_raw = raw.get("dbc", {})
    if not isinstance(dbc_raw, dict):
        raise ConfigError(f'{where}: [dbc] must be a table of channel = "file.dbc"')
    dbc = {
        ch: [_resolve(base, p) for p in _coerce(v, list[str], f"{where}: [dbc].{ch}")]
        for ch, v in dbc_raw.items()
    }
    replay: ReplaySettings = built["replay"]
    if not replay.fast and not 0 < replay.speed < math.inf:  # NaN fails too
        raise ConfigError(f"{where}: [replay].speed must be a positive number, got {replay.speed}")
    return Settings(
        gateway=g,
        broker=broker,
        replay=replay,
        can=arrays["can"],
        camera=arrays["camera"],
        dbc=dbc,
        source_file=where,
    )


def describe() -> str:
    """Markdown reference of every option (docs/config.md is this text)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `gateway config --doc` from `gateway/settings.py`. Precedence: the TOML "
        "file < environment variables `GATEWAY_<SECTION>_<KEY>` (single-valued sections "
        "only) < command-line options. A relative path in the file is relative to the file's "
        "folder; in an environment variable or an option, to the working folder. A variable "
        "of a section here whose key is none of the section's (`GATEWAY_BROKER_URI`) is "
        "refused, as an unknown key in the file is.",
        "",
    ]
    for name, cls in list(_SECTIONS.items()) + [(f"[{n}]", c) for n, c in _ARRAYS.items()]:
        lines += [f"## [{name}]", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = _hints(cls)
        for f in fields(cls):
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else typing.cast("typing.Callable[[], Any]", f.default_factory)()
            )
            shown = "(secret)" if f.metadata.get("secret") else repr(default)
            tp = hints[f.name]
            tname = (
                getattr(tp, "__name__", str(tp))
                if not isinstance(tp, types.GenericAlias)
                else str(tp)
            )
            lines.append(f"| `{f.name}` | {tname} | `{shown}` | {f.metadata.get('help', '')} |")
        lines.append("")
    lines += [
        "## [dbc]",
        "",
        '`CHANNEL = "file.dbc"` or a list of files; `"*"` applies to every '
        "channel without its own DBC. Paths are relative to the config file.",
        "",
        "## Other environment variables",
        "",
        "| variable | meaning |",
        "|---|---|",
        "| `GATEWAY_CACHE_DIR` | the gateway's cache folder (default "
        "`$XDG_CACHE_HOME/car-data-gateway`, else `~/.cache/car-data-gateway`); `off` turns the "
        "caches off. `dbc/`: two entries per parsed DBC, cantools' model and the vector "
        "decoder's plans (which a replay reads without importing cantools), pickles keyed by the "
        "SHA-256 of the DBC, the installed cantools and the gateway and Python versions; when "
        "one is written, entries unused for 30 days go, then the least recently used above "
        "128 MB. "
        "`code/`: the compiled methods of the dataclasses the gateway makes, which Python 3.11 "
        "would compile again at every start (13-16 ms of a fast replay), one file per Python "
        "build. Read only when the folder and the file belong to the user and nobody else can "
        "write to them (checked on the opened file, links not followed). |",
        "| `GATEWAY_PARSE_PROCESS` | `0`: parse a candump log in threads of the gateway's own "
        "process instead of a process of its own (the default on Linux with 2 or more cores; "
        "see `gateway/canbus/parseproc.py`). |",
        "",
    ]
    return "\n".join(lines)
