"""``gateway synth``: a realistic, clearly labelled SYNTHETIC drive as a candump log.

No real log that can be shipped has GPS or a moving car, so the location, trip and consent paths
are exercised with a drive written here, encoded frame by frame with the real Tesla Model 3 DBC
(Josh Wardell's ``Model3CAN.dbc``) through cantools, so every byte is what that DBC describes.

The drive: parked in P, then D through an urban speed profile (cruise phases, traffic-light
stops, limited acceleration) along a route of waypoints, then P again. Position follows the
route by the distance driven; energy comes from a simple road-load model (mass, drag, rolling
resistance, drive efficiency, regeneration, auxiliary load), so the state of charge falls with
energy used and the HV current and voltage agree with it. Frames:

=======  ======================  ======  ===========================================
ID       message                 rate    signals written
=======  ======================  ======  ===========================================
0x04F    ID04FGPSLatLong         1 Hz    latitude / longitude (1e-6 deg), accuracy
0x118    ID118DriveSystemStatus  10 Hz   gear, system state, accelerator, counter, checksum
0x132    ID132HVBattAmpVolt      10 Hz   HV voltage and current
0x155    ID155WheelAngles        10 Hz   vehicle speed, standstill, counter, checksum
0x292    ID292BMS_SOC            10 Hz   state of charge (UI, min, max, average)
0x3B6    ID3B6odometer           1 Hz    odometer
0x405    ID405VIN                5 Hz    VIN in three multiplexed parts (16, 17, 18)
=======  ======================  ======  ===========================================

The VIN defaults to ``5YJ3E1EASYNTH0001`` ("SYNTH") and the file name should say so too; a
candump log has no room for a comment that every reader skips. ``--truth`` writes the ground
truth once per second (position, speed, gear, SOC, odometer, energy) for tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import ConfigError, DbcError, InputError

DEFAULT_VIN = "5YJ3E1EASYNTH0001"
DEFAULT_START = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC: fixed, so a seed gives the same file
BATTERY_KWH = 75.0  # usable energy; the default policy's [trips].battery_kwh says the same
TICK = 0.1  # simulation step (s): the 10 Hz messages are written every tick

GPS, DRIVE, HV, SPEED, SOC, ODO, VIN = (
    "ID04FGPSLatLong",
    "ID118DriveSystemStatus",
    "ID132HVBattAmpVolt",
    "ID155WheelAngles",
    "ID292BMS_SOC",
    "ID3B6odometer",
    "ID405VIN",
)
NEEDED = (GPS, DRIVE, HV, SPEED, SOC, ODO, VIN)
# (message, every n ticks)
SCHEDULE = ((DRIVE, 1), (HV, 1), (SPEED, 1), (SOC, 1), (VIN, 2), (GPS, 10), (ODO, 10))
GEAR_P, GEAR_D = 1, 4

_EARTH_M = 6_371_008.8


@dataclass(frozen=True)
class Drive:
    """The simulated drive, one row per tick (arrays of equal length)."""

    t: np.ndarray  # seconds since start
    speed_kph: np.ndarray
    accel: np.ndarray  # m/s^2
    gear: np.ndarray  # DI_gear raw value
    dist_m: np.ndarray  # along the route, cumulative
    lat: np.ndarray
    lon: np.ndarray
    energy_kwh: np.ndarray  # cumulative, net of regeneration
    soc: np.ndarray  # percent
    power_kw: np.ndarray


# -- route ------------------------------------------------------------------------------------
def load_route(path: str | Path | None) -> np.ndarray:
    """Waypoints as an (n, 2) array of lat, lon. CSV (``lat,lon`` per line, ``#`` comments and
    a header allowed) or GeoJSON (a LineString, or a Feature / FeatureCollection holding one)."""
    if path is None:
        text = resources.files("gateway.data").joinpath("route_default.csv").read_text()
        name = "route_default.csv"
    else:
        p = Path(path)
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise InputError(f"{p}: cannot read the route ({why})") from exc
        name = str(p)
    stripped = text.lstrip()
    points = _geojson_points(name, text) if stripped.startswith("{") else _csv_points(name, text)
    if len(points) < 2:
        raise InputError(f"{name}: a route needs at least 2 waypoints, found {len(points)}")
    arr = np.asarray(points, dtype=np.float64)
    if _route_lengths(arr)[-1] < 50.0:
        raise InputError(f"{name}: the route is shorter than 50 m")
    return arr


def _check_point(name: str, where: str, lat: float, lon: float) -> tuple[float, float]:
    if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 90 or abs(lon) > 180:
        raise InputError(f"{name}: {where}: ({lat}, {lon}) is not a latitude, longitude")
    return lat, lon


def _csv_points(name: str, text: str) -> list[tuple[float, float]]:
    points = []
    for no, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line or line.replace(" ", "").lower() in ("lat,lon", "latitude,longitude"):
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            lat, lon = float(parts[0]), float(parts[1])
        except (ValueError, IndexError):
            raise InputError(f"{name}: line {no}: expected 'lat,lon', got {line[:60]!r}") from None
        points.append(_check_point(name, f"line {no}", lat, lon))
    return points


def _geojson_points(name: str, text: str) -> list[tuple[float, float]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{name}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    geom: Any = doc
    if isinstance(geom, dict) and geom.get("type") == "FeatureCollection":
        feats = [f for f in geom.get("features", []) if isinstance(f, dict)]
        geom = feats[0] if feats else {}
    if isinstance(geom, dict) and geom.get("type") == "Feature":
        geom = geom.get("geometry") or {}
    if not isinstance(geom, dict) or geom.get("type") != "LineString":
        raise InputError(f"{name}: GeoJSON route must be a LineString (or a Feature holding one)")
    points = []
    for i, c in enumerate(geom.get("coordinates", [])):
        try:
            lon, lat = float(c[0]), float(c[1])  # GeoJSON order is lon, lat
        except (TypeError, ValueError, IndexError):
            raise InputError(f"{name}: coordinate {i}: expected [lon, lat]") from None
        points.append(_check_point(name, f"coordinate {i}", lat, lon))
    return points


def _route_lengths(route: np.ndarray) -> np.ndarray:
    """Cumulative distance (m) at each waypoint (equirectangular, exact enough at city scale)."""
    lat = np.radians(route[:, 0])
    lon = np.radians(route[:, 1])
    mid = (lat[1:] + lat[:-1]) / 2
    dx = (lon[1:] - lon[:-1]) * np.cos(mid)
    dy = lat[1:] - lat[:-1]
    seg = np.hypot(dx, dy) * _EARTH_M
    return np.concatenate([[0.0], np.cumsum(seg)])


def position(route: np.ndarray, dist_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lat, lon at each distance along the route; past the end it drives back (and forth)."""
    cum = _route_lengths(route)
    total = cum[-1]
    d = np.mod(dist_m, 2 * total)
    d = np.where(d > total, 2 * total - d, d)
    return np.interp(d, cum, route[:, 0]), np.interp(d, cum, route[:, 1])


# -- the drive --------------------------------------------------------------------------------
def simulate(minutes: float, route: np.ndarray, seed: int = 1, soc_start: float = 80.0) -> Drive:
    """Speed, gear, position and energy at every tick of a drive ``minutes`` long."""
    rng = np.random.default_rng(seed)
    n = max(int(round(minutes * 60 / TICK)), 1)
    t = np.arange(n) * TICK
    total = n * TICK
    park = min(15.0, total * 0.1)  # parked in P at both ends
    stop_at = total - park - min(40.0, total * 0.15)  # then braking to a stand
    # target speed: cruise phases and traffic-light stops
    target = np.zeros(n)
    cursor = park
    while cursor < stop_at:
        if rng.random() < 0.3:
            kph, dur = 0.0, rng.uniform(8.0, 25.0)
        else:
            kph, dur = (
                rng.choice([30.0, 40.0, 50.0, 60.0, 70.0]) + rng.uniform(-4, 4),
                rng.uniform(20, 80),
            )
        a, b = int(cursor / TICK), int(min(cursor + dur, stop_at) / TICK)
        target[a:b] = kph
        cursor += dur
    speed = np.zeros(n)  # m/s
    accel = np.zeros(n)
    v = 0.0
    for i in range(1, n):
        want = target[i] / 3.6
        step = np.clip(want - v, -2.5 * TICK, 1.8 * TICK)  # braking 2.5, accelerating 1.8 m/s^2
        v = max(v + step, 0.0)
        speed[i] = v
        accel[i] = step / TICK
    # a little road noise while moving, never below zero
    moving = speed > 0.3
    speed = np.where(moving, np.maximum(speed + rng.normal(0, 0.08, n), 0.05), speed)
    gear = np.where((t < park) | ((t >= stop_at) & (speed < 0.05)), GEAR_P, GEAR_D)
    gear[(t >= park) & (t < stop_at)] = GEAR_D
    dist = np.cumsum(speed * TICK)
    lat, lon = position(route, dist)
    # road load (Model 3 class): mass, CdA, rolling resistance, drive efficiency, regen, aux
    m, cda, crr, rho, g = 1850.0, 0.51, 0.010, 1.2, 9.81
    wheel = m * accel * speed + 0.5 * rho * cda * speed**3 + crr * m * g * speed  # W
    battery = np.where(wheel >= 0, wheel / 0.85, wheel * 0.65) + np.where(
        gear == GEAR_D, 600.0, 150.0
    )
    energy = np.cumsum(battery * TICK) / 3.6e6  # kWh
    soc = soc_start - 100.0 * energy / BATTERY_KWH
    return Drive(t, speed * 3.6, accel, gear, dist, lat, lon, energy, soc, battery / 1000.0)


# -- encoding ---------------------------------------------------------------------------------
def _messages(db: Any, dbc_name: str) -> dict[str, Any]:
    out = {}
    for name in NEEDED:
        try:
            out[name] = db.get_message_by_name(name)
        except KeyError:
            raise DbcError(
                f"{dbc_name}: has no message {name}: synth needs the Tesla Model 3 DBC "
                "(Model3CAN.dbc)"
            ) from None
    return out


def _filler(msg: Any) -> dict[str, float]:
    """A value for every non-multiplexed signal: 0, or the minimum when 0 is out of range."""
    vals = {}
    for s in msg.signals:
        if s.multiplexer_ids:
            continue
        lo = s.minimum if s.minimum is not None else 0.0
        vals[s.name] = lo if lo > 0 else 0.0
    return vals


def _tesla_checksum(data: bytearray, frame_id: int, at: int) -> None:
    """Tesla's 8-bit checksum: sum of the other bytes plus both bytes of the ID."""
    data[at] = (
        sum(b for i, b in enumerate(data) if i != at) + (frame_id & 0xFF) + (frame_id >> 8)
    ) & 0xFF


def vin_parts(vin: str) -> list[tuple[int, int]]:
    """The three multiplexed VIN frames as (mux, 56-bit value): 16 holds characters 1-3, 17
    characters 4-10, 18 characters 11-17, ASCII, first character in the lowest byte."""
    raw = vin.encode("ascii")
    return [
        (16, int.from_bytes(raw[:3].ljust(7, b"\0"), "little")),
        (17, int.from_bytes(raw[3:10].ljust(7, b"\0"), "little")),
        (18, int.from_bytes(raw[10:17].ljust(7, b"\0"), "little")),
    ]


_VIN_SIGNAL = {16: "VINA405", 17: "VINB405", 18: "VINC405"}


def frames(
    db: Any, drive: Drive, vin: str, start: float, seed: int = 1, dbc_name: str = "DBC"
) -> Iterator[tuple[float, int, bytes]]:
    """(timestamp, arbitration id, payload) of every frame of the drive, in time order."""
    msgs = _messages(db, dbc_name)
    base = {name: _filler(m) for name, m in msgs.items()}
    rng = np.random.default_rng(seed + 7919)
    jitter = rng.uniform(0.0, 0.004, size=(len(drive.t), len(SCHEDULE)))
    gps_noise = rng.normal(0.0, 1.5 / 111_000, size=(len(drive.t), 2))  # ~1.5 m
    parts = vin_parts(vin)
    counter = 0
    odo0 = 12_345.678  # km
    hv0 = 392.0
    for i in range(len(drive.t)):
        out = []
        speed = float(drive.speed_kph[i])
        soc = float(np.clip(drive.soc[i], 0.0, 100.0))
        gear = int(drive.gear[i])
        for k, (name, every) in enumerate(SCHEDULE):
            if i % every:
                continue
            msg = msgs[name]
            vals = dict(base[name])
            checksum_at = None
            if name == DRIVE:
                vals.update(
                    DI_gear=gear,
                    DI_systemState=5 if gear == GEAR_D else 1,
                    DI_accelPedalPos=round(min(max(drive.accel[i], 0.0) * 20.0, 100.0) / 0.4) * 0.4,
                    DI_systemStatusCounter=counter,
                    DI_immobilizerState=3,
                )
                checksum_at = 0
            elif name == SPEED:
                vals.update(
                    ESP_vehicleSpeed=round(speed / 0.5) * 0.5,
                    ESP_vehicleStandstillSts=int(speed < 0.1),
                    ESP_wheelSpeedsQF=1,
                    ESP_wheelRotationCounter=counter,
                )
                checksum_at = 7
            elif name == HV:
                volts = hv0 - 0.6 * (80.0 - soc) - 0.02 * float(drive.power_kw[i]) * 10
                amps = float(drive.power_kw[i]) * 1000.0 / volts
                vals.update(
                    BattVoltage132=round(volts, 2),
                    SmoothBattCurrent132=round(amps / -0.1) * -0.1,
                    RawBattCurrent132=round((amps - 500) / -0.05) * -0.05 + 500,
                )
            elif name == SOC:
                ui = round(soc, 1)
                vals.update(
                    SOCUI292=ui,
                    SOCave292=ui,
                    SOCmin292=round(max(soc - 0.4, 0.0), 1),
                    SOCmax292=round(min(soc + 0.3, 100.0), 1),
                    BattBeginningOfLifeEnergy292=80.5,
                    BMS_battTempPct=40.0,
                )
            elif name == ODO:
                vals.update(Odometer3B6=round(odo0 + drive.dist_m[i] / 1000.0, 3))
            elif name == GPS:
                vals.update(
                    GPSLatitude04F=round(float(drive.lat[i] + gps_noise[i, 0]), 6),
                    GPSLongitude04F=round(float(drive.lon[i] + gps_noise[i, 1]), 6),
                    GPSAccuracy04F=round(1.0 + abs(gps_noise[i, 0]) * 111_000, 1),
                )
            elif name == VIN:
                mux, value = parts[(i // every) % 3]
                vals = {"mux405": mux, _VIN_SIGNAL[mux]: value}
            data = bytearray(msg.encode(vals, scaling=True, strict=False, padding=False))
            if checksum_at is not None:
                _tesla_checksum(data, msg.frame_id, checksum_at)
            out.append((start + drive.t[i] + jitter[i, k], msg.frame_id, bytes(data)))
        counter = (counter + 1) & 0xF
        out.sort()
        yield from out


def candump_line(ts: float, channel: str, frame_id: int, data: bytes) -> str:
    ident = f"{frame_id:08X}" if frame_id > 0x7FF else f"{frame_id:03X}"
    return f"({ts:.6f}) {channel} {ident}#{data.hex().upper()}\n"


def write_truth(path: Path, drive: Drive, start: float) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["time", "lat", "lon", "speed_kph", "gear", "soc_pct", "distance_km", "energy_kwh"]
        )
        for i in range(0, len(drive.t), int(round(1 / TICK))):
            w.writerow(
                [
                    f"{start + drive.t[i]:.1f}",
                    f"{drive.lat[i]:.6f}",
                    f"{drive.lon[i]:.6f}",
                    f"{drive.speed_kph[i]:.2f}",
                    "D" if drive.gear[i] == GEAR_D else "P",
                    f"{drive.soc[i]:.3f}",
                    f"{drive.dist_m[i] / 1000:.4f}",
                    f"{drive.energy_kwh[i]:.5f}",
                ]
            )


@dataclass(frozen=True)
class SynthResult:
    """What ``gateway synth`` wrote: the log, its frames, duration and distance."""

    out: Path
    frames: int
    seconds: float
    distance_km: float
    energy_kwh: float
    soc_start: float
    soc_end: float


def synthesise(
    dbc: str | Path,
    out: str | Path,
    *,
    minutes: float = 10.0,
    route: str | Path | None = None,
    vin: str = DEFAULT_VIN,
    seed: int = 1,
    start: float = DEFAULT_START,
    channel: str = "vcan0",
    soc_start: float = 80.0,
    truth: str | Path | None = None,
    progress: bool | None = None,
) -> SynthResult:
    from gateway.canbus.dbc import load_dbc
    from gateway.progress import Progress

    if not (0.1 <= minutes <= 24 * 60):
        raise ConfigError(f"--minutes: {minutes} is outside 0.1 .. 1440")
    if len(vin) != 17 or not vin.isascii() or not vin.isalnum():
        raise ConfigError(f"--vin: {vin!r} is not a 17-character VIN")
    if not (5.0 <= soc_start <= 100.0):
        raise ConfigError(f"--soc: {soc_start} is outside 5 .. 100")
    db = load_dbc(Path(dbc))
    _messages(db, str(dbc))
    waypoints = load_route(route)
    drive = simulate(minutes, waypoints, seed=seed, soc_start=soc_start)
    out = Path(out)
    bar = Progress(f"synth {out.name}", enabled=progress)
    n = 0
    try:
        with out.open("w") as f:
            for ts, fid, data in frames(db, drive, vin.upper(), start, seed, str(dbc)):
                f.write(candump_line(ts, channel, fid, data))
                n += 1
                if n % 4096 == 0:
                    bar.update(n, done=int((ts - start) / TICK), total=len(drive.t))
            bar.update(n, done=len(drive.t), total=len(drive.t))  # written: 100 %
    except OSError as exc:
        raise InputError(f"{out}: cannot write ({exc.strerror or exc})") from exc
    finally:
        bar.close()
    if truth:
        write_truth(Path(truth), drive, start)
    return SynthResult(
        out,
        n,
        float(len(drive.t) * TICK),
        float(drive.dist_m[-1] / 1000),
        float(drive.energy_kwh[-1]),
        float(drive.soc[0]),
        float(drive.soc[-1]),
    )


# -- command line ------------------------------------------------------------------------------
_DEFAULT_DBC = Path(__file__).resolve().parents[1] / "can_fixtures" / "model3" / "Model3CAN.dbc"


def _cmd_synth(args: argparse.Namespace) -> int:
    r = synthesise(
        args.dbc,
        args.out,
        minutes=args.minutes,
        route=args.route,
        vin=args.vin,
        seed=args.seed,
        start=args.start,
        channel=args.channel,
        soc_start=args.soc,
        truth=args.truth,
        progress=None if not args.quiet else False,
    )
    print(
        f"wrote {r.out}: SYNTHETIC drive, {r.frames:,} frames over {r.seconds / 60:.1f} min, "
        f"{r.distance_km:.2f} km, {r.energy_kwh:.2f} kWh, SOC {r.soc_start:.1f}% -> "
        f"{r.soc_end:.1f}%, VIN {args.vin}"
    )
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic Model 3 drive (GPS, speed, gear, SOC, odometer, VIN) as candump",
        description=(
            "Write a realistic, clearly labelled SYNTHETIC drive as a candump log, every frame "
            "encoded with the real Tesla Model 3 DBC: parked in P, an urban speed profile in D "
            "along a route (GPS at 1e-6 degree resolution), SOC falling with the energy a "
            "road-load model says was used, odometer, HV voltage/current and the VIN frames. "
            "The same seed gives the same file."
        ),
        epilog=(
            "example:\n"
            "  gateway synth --dbc can_fixtures/model3/Model3CAN.dbc --out drive.log --minutes 10\n"
            "  gateway replay drive.log --dbc can_fixtures/model3/Model3CAN.dbc --speed 20\n\n"
            "A route file is CSV (lat,lon per line; '#' comments and a header allowed) or a "
            "GeoJSON LineString. Past its end the drive turns back along it."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dbc",
        default=str(_DEFAULT_DBC),
        metavar="DBC",
        help="the Model 3 DBC (default: can_fixtures/model3/Model3CAN.dbc)",
    )
    p.add_argument("--out", required=True, metavar="LOG", help="candump log to write")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the drive (default 10)")
    p.add_argument(
        "--route",
        metavar="FILE",
        help="waypoints, CSV or GeoJSON (default: a bundled 8.6 km route)",
    )
    p.add_argument(
        "--vin", default=DEFAULT_VIN, help=f"VIN in the 0x405 frames (default {DEFAULT_VIN})"
    )
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument(
        "--start", type=float, default=DEFAULT_START, help="epoch time of the first frame"
    )
    p.add_argument("--channel", default="vcan0", help="channel name in the log (default vcan0)")
    p.add_argument(
        "--soc", type=float, default=80.0, help="state of charge at the start, %% (default 80)"
    )
    p.add_argument("--truth", metavar="CSV", help="also write the ground truth, once per second")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - use `gateway synth`
    from gateway.cli import main as cli_main

    return cli_main(["synth", *(argv or [])])
