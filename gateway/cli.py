"""The ``gateway`` command: one sub-command per job. User mistakes end as one line on stderr
(``gateway: error: ...``) and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from gateway import __version__
from gateway.errors import ConfigError, GatewayError, StorageError

log = logging.getLogger("gateway")

EPILOG_REPLAY = """\
examples:
  gateway replay can_fixtures/kona_ev_2019/230112-7-2019-pcan-ccan-power-off-on-ready-off.converted.candump.log \\
      --dbc can0=can_fixtures/kona_ev_2019/kona_pcan.dbc \\
      --dbc can1=can_fixtures/kona_ev_2019/kona_ccan.dbc --fast
  gateway replay drive.log --dbc Model3CAN.dbc --speed 10 --window 30 --vin 5YJ3E1EA7KF000001

Logs: candump .log, Vector .asc, .blf, PEAK .trc, python-can .csv, SavvyCAN/GVRET .csv, .mf4.
Lines a reader cannot parse are skipped and counted; the count is reported at the end.
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    _add_vehicle(p)
    p.add_argument(
        "--broker",
        metavar="URL",
        help="broker, mqtt://host:port or mqtts://host:port (default mqtt://127.0.0.1:1883)",
    )


def _add_vehicle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config; options given here override it")
    p.add_argument("--vin", help="vehicle identification number: topics are vehicles/VIN/owner/...")
    p.add_argument("--topic-prefix", metavar="PREFIX", help="topic prefix (default 'vehicles')")


def _add_files(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ledger", metavar="PATH", help="audit ledger file (default gateway-ledger.jsonl)"
    )
    p.add_argument(
        "--outbox", metavar="PATH", help="durable outbox (default gateway-outbox.sqlite)"
    )


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above 0."""
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds, got 0")
    return value


def _positive_int(text: str) -> int:
    """An argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _add_drain(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--drain-timeout",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="how long to wait at the end for the broker to take every summary (30)",
    )


def _add_pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--policy", metavar="FILE", help="egress policy TOML (default: the bundled policy)"
    )
    p.add_argument(
        "--window",
        type=float,
        metavar="SECONDS",
        help="aggregation window in seconds of frame time (default 60)",
    )
    _add_files(p)
    p.add_argument(
        "--decoder",
        choices=("vector", "cantools"),
        help="'vector': numpy, fast (default); 'cantools': per frame, the reference",
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    get = lambda name: getattr(args, name, None)  # noqa: E731
    return {
        "broker.url": get("broker"),
        "gateway.vin": get("vin"),
        "broker.topic_prefix": get("topic_prefix"),
        "gateway.policy": get("policy"),
        "gateway.window": get("window"),
        "gateway.ledger": get("ledger"),
        "gateway.outbox": get("outbox"),
        "gateway.decoder": get("decoder"),
    }


def _settings(args: argparse.Namespace) -> Any:
    from gateway import settings as settings_mod

    ov = _overrides(args)
    s = settings_mod.load(args.config, overrides=ov)
    # command-line paths are relative to the working directory, not the config file
    for key in ("policy", "ledger", "outbox"):
        if ov.get(f"gateway.{key}"):
            import dataclasses

            path: dict[str, Any] = {key: str(Path(ov[f"gateway.{key}"]).expanduser().resolve())}
            s = dataclasses.replace(s, gateway=dataclasses.replace(s.gateway, **path))
    if Path(s.gateway.ledger).resolve() == Path(s.gateway.outbox).resolve():
        raise ConfigError(
            f"{s.gateway.ledger}: given as both the ledger and the outbox (--ledger, --outbox; "
            "[gateway].ledger, .outbox): they are two files"
        )
    return s


# -- replay ---------------------------------------------------------------------------------
def _cmd_replay(args: argparse.Namespace) -> int:
    import dataclasses

    from gateway.app import Gateway
    from gateway.canbus.replay import ReplaySource, detect_format
    from gateway.progress import Progress

    s = _settings(args)
    if args.dbc:
        s = dataclasses.replace(s, dbc=_dbc_specs(args.dbc))
    if not s.dbc:
        raise ConfigError("no DBC given: use --dbc [CHANNEL=]FILE (or [dbc] in --config)")
    paths = [Path(p) for p in args.logs]
    for p in paths:
        detect_format(p)  # a missing or unknown file fails here, before anything starts
    fast = bool(args.fast) or (s.replay.fast and args.speed is None)
    speed = None if fast else (args.speed if args.speed is not None else s.replay.speed)
    if speed is not None and not 0 < speed < math.inf:  # NaN too
        raise ConfigError(f"--speed must be a positive number, got {speed}")
    # the camera paces its clip by the same settings as the CAN log
    s = dataclasses.replace(
        s, replay=dataclasses.replace(s.replay, fast=fast, speed=speed or s.replay.speed)
    )
    progress = Progress("replay", enabled=None if not args.quiet else False)
    frames_seen = [0]

    def on_progress(stats: Any, done: int, total: int) -> None:
        progress.update(frames_seen[0], done, total)

    source = ReplaySource(paths, speed=speed, loop=args.loop, on_progress=on_progress)
    cameras = _camera_sources(args, s)
    gw = Gateway(
        s,
        [source],
        cameras=cameras,
        on_batch=lambda b: frames_seen.__setitem__(0, frames_seen[0] + len(b)),
    )
    t0 = time.monotonic()
    try:
        report = _run_until_signal(gw, drain_timeout=args.drain_timeout)
    finally:
        progress.close()
    report.read = source.stats
    elapsed = time.monotonic() - t0
    _print_report(report, s, elapsed, quiet=args.quiet, files=len(paths), laps=source.laps)
    return _undelivered(report, s)


def _dbc_specs(specs: Sequence[str]) -> dict[str, list[str]]:
    """``--dbc [CHANNEL=]FILE`` options by channel (``*``: every channel)."""
    dbc: dict[str, list[str]] = {}
    for spec in specs:
        ch, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():
            ch, path = "*", spec
        elif not ch.strip():
            raise ConfigError(f"--dbc {spec}: no channel before '=' (give CHANNEL=FILE, or FILE)")
        dbc.setdefault(ch, []).append(path)
    return dbc


def _start_parsing(args: argparse.Namespace) -> None:
    """A fast replay's first log, if it is candump, starts being parsed in a process of its
    own now (``parseproc.start_early``), while the gateway imports and builds its pipeline
    (~0.1 s): the replay takes that process over when it reaches the file. Fast as
    ``_cmd_replay`` decides it: ``--fast``, or ``fast`` in the settings without ``--speed``."""
    if not args.fast:
        if args.speed is not None:
            return
        try:
            if not _settings(args).replay.fast:
                return
        except GatewayError:
            return  # said by the replay itself
    from gateway.canbus import parseproc
    from gateway.canbus.candump import BLOCK_BYTES
    from gateway.canbus.replay import LogFormat, detect_format

    path = Path(args.logs[0])
    try:
        if detect_format(path) is not LogFormat.CANDUMP:
            return
    except GatewayError:
        return  # said by the replay itself, as for any other log
    parseproc.start_early(path, block_bytes=BLOCK_BYTES)


def _undelivered(report: Any, s: Any) -> int:
    """Exit code 3 and one line if summaries are left undelivered, else 0."""
    kept = getattr(report, "outbox_sent_kept", 0)
    if kept:  # delivered: not a reason for 3, but the file is not empty, and says so
        print(
            f"gateway: warning: {kept} summaries sent in this run stay in {s.gateway.outbox}, "
            "which could not be written: the next run that can write it sends them again "
            "(with the same seq: the owner drops the repeats)",
            file=sys.stderr,
        )
    left = report.outbox_left
    lost = getattr(report, "lost_in_memory", 0)
    dropped = getattr(report, "dropped", 0) + getattr(report, "changed_in_outbox", 0)
    gone = getattr(report, "outbox_lost", 0) + getattr(report, "outbox_deleted", 0)
    if not (left or lost or dropped or gone):
        return 0
    parts = []
    if left:
        parts.append(f"{left} wait in {s.gateway.outbox} and are sent on the next run")
    if lost:
        parts.append(
            f"{lost} were held in memory only, because the outbox file could not be written, "
            "and are lost (the ledger records them as dropped)"
        )
    if getattr(report, "dropped", 0):
        parts.append(
            f"{report.dropped} were dropped by the outbox's bounds (its size, or the policy's "
            "retention) before the broker took them (on the record)"
        )
    if getattr(report, "changed_in_outbox", 0):
        parts.append(
            f"{report.changed_in_outbox} were not sent, their rows changed or damaged in "
            f"{s.gateway.outbox} while the gateway ran (on the record)"
        )
    if getattr(report, "outbox_lost", 0):
        parts.append(
            f"{report.outbox_lost} left waiting by the last run were lost with its outbox "
            "file, which is gone (on the record)"
        )
    if getattr(report, "outbox_deleted", 0):
        parts.append(
            f"{report.outbox_deleted} were lost with the outbox file, deleted while the "
            "gateway ran (on the record)"
        )
    if left or lost:
        why = getattr(report, "drain_cut", None) or report.broker_error or "broker unavailable"
        head = f"{left + lost + dropped + gone} summaries could not be delivered ({why})"
    else:  # all sent that could be, but some were not: the exit status says so too
        head = f"{dropped + gone} summaries were never delivered"
    print(f"gateway: error: {head}; " + "; ".join(parts), file=sys.stderr)
    return 3


def _camera_sources(args: argparse.Namespace, s: Any) -> list[Any]:
    videos = list(getattr(args, "video", None) or []) + [c.source for c in s.camera]
    if not videos:
        return []
    from gateway.camera.wiring import camera_stages

    return camera_stages(videos, s)


def _run_until_signal(gw: Any, drain_timeout: float = 30.0, require_broker: bool = True) -> Any:
    """``gw.run()`` until it ends or SIGINT/SIGTERM. ``require_broker``: a broker that cannot be
    reached at the start is an error (a replay on the bench); else the gateway collects anyway
    and its summaries wait in the outbox (the vehicle's service, often offline)."""
    import asyncio

    _settle()  # the pipeline is built: what exists now lives until the end

    async def main() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        from gateway.egress.mqtt import quiet_lost_connections

        loop.set_exception_handler(quiet_lost_connections)

        def on_signal(sig: signal.Signals) -> None:
            # the first stops the sources; a second, the wait to drain
            if stop.is_set():
                gw.stop_draining()
            elif not gw.report.stopped_by:
                gw.report.stopped_by = sig.name
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal, sig)
        return await gw.run(stop, drain_timeout=drain_timeout, require_broker=require_broker)

    return asyncio.run(main())


def _utc(at: Any) -> str:
    """A UNIX time as UTC text (what the owner reads); anything else as it is."""
    if not isinstance(at, int | float):
        return str(at)
    import datetime

    try:
        return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):  # beyond year 9999: said as it came
        return f"{at:g} (UNIX time)"


def _printable(text: str) -> str:
    """``text`` with control characters escaped (a reason quoting a binary file's bytes must
    not drive the terminal): one line, as it was."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _print_report(
    report: Any,
    s: Any,
    elapsed: float,
    quiet: bool = False,
    files: int | None = None,
    laps: int = 1,
    live: int = 0,
) -> None:
    """The end-of-replay report on stderr. ``files``: the logs given (default: one per read),
    ``laps``: how often they were read (``--loop``), ``live``: the live buses read."""
    out = sys.stderr
    rate = report.frames / elapsed if elapsed > 0 else 0.0
    if files is None:  # the logs read (a live bus has its read stats too)
        files = sum(not getattr(st, "live", False) for st in report.read)
    lapped = f" ({laps} laps)" if laps > 1 else ""
    parts = [f"{files} file(s){lapped}"] if files or not live else []
    if live:
        parts.append(f"{live} live bus(es)")
    origin = " and ".join(parts)
    stopped = getattr(report, "stopped_by", "")
    print(
        f"{'read' if live else 'replayed'} {report.frames:,} frames from {origin} in "
        f"{elapsed:.1f} s ({rate:,.0f} frames/s)" + (f"; stopped by {stopped}" if stopped else ""),
        file=out,
    )
    for st in report.read:
        if st.frames == 0 and st.path and st.live:
            print(f"  {st.path}: no frame came: is the bus up, at its bitrate?", file=out)
        elif st.frames == 0 and st.path:  # a file of another kind, or empty: not silently
            print(
                f"  {st.path}: no frame in it ({st.bytes_read:,} bytes read): is it a CAN log "
                "of the format its name says?",
                file=out,
            )
        if st.bad_lines or st.stopped_early:
            unit = "frame" if st.live else "line"
            where = "; ".join(f"{unit} {n}: {_printable(why)}" for n, why in st.first_bad)
            more = f" (first: {where})" if where else ""
            if st.bad_lines:
                print(f"  {st.path}: skipped {st.bad_lines} bad {unit}(s){more}", file=out)
            if st.stopped_early:
                print(
                    f"  {st.path}: the rest of the file could not be read: "
                    f"{_printable(st.stopped_early)}",
                    file=out,
                )
        times = [  # what the replay's time check did (``canbus.timeline``)
            (
                st.off_time,
                f"skipped {st.off_time} frame(s) whose time was far off the log's and was not "
                f"followed (first: {'; '.join(st.first_off_time)})",
            ),
            (
                st.separate_clocks,
                "its channels run on clocks of their own (times far apart from bus to bus): "
                "frame times were not checked against one another",
            ),
            (
                st.steps_back,
                f"the log's time went back {st.steps_back} time(s) (first: "
                f"{'; '.join(st.first_steps)}); the windows open before each were closed",
            ),
        ]
        for happened, what in times:
            if happened:
                print(f"  {st.path}: {what}", file=out)
    d = report.decode
    unknown = sum(d.unknown_id.values())
    errors = sum(d.errors.values())
    print(
        f"decoded {d.decoded:,} frames; {unknown:,} with ids not in the DBCs "
        f"({len(d.unknown_id)} ids), {errors:,} decode errors, "
        f"{d.skipped_special:,} error/remote frames",
        file=out,
    )
    decodable = d.decoded + unknown
    if decodable >= 1000 and unknown > 0.9 * decodable:
        print(
            f"  {unknown / decodable:.0%} of the frames have ids in no DBC given: are these the "
            "DBCs of this log (and of its channels)?",
            file=out,
        )
    # (frames that came while collection was stopped are not counted per channel: a stop
    # hides the bus's activity too, so which channels were silent cannot be said)
    idle = [ch for ch in s.dbc if ch != "*" and report.frames and ch not in report.channels]
    if idle and not report.frames_while_stopped:
        seen = ", ".join(sorted(report.channels)) or "none"
        print(
            f"  no frames on {', '.join(idle)}, which a DBC is given for (the log's channels: {seen})",
            file=out,
        )
    if report.frames_while_stopped:
        print(
            f"  {report.frames_while_stopped:,} frames came while the owner had stopped "
            "collection: not decoded (a trip running at the stop ended at its last moving "
            "moment before it)",
            file=out,
        )
    if report.late_samples:
        print(
            f"  {report.late_samples:,} signal samples came after their window had been "
            "published (the log's time went backwards) and are in no summary",
            file=out,
        )
    if report.invalid_samples:
        print(
            f"  {report.invalid_samples:,} signal samples were no value (NaN, infinity, a "
            "'not available' state, or a time outside any window) and are in no summary",
            file=out,
        )
    withheld = getattr(report, "withheld", {})
    if withheld:
        cats = ", ".join(f"{c} {n:,}" for c, n in sorted(withheld.items()))
        print(
            f"  {sum(withheld.values()):,} window values of sensitive signals were withheld for "
            f"lack of consent ({cats}) and never left",
            file=out,
        )
    held = [
        (getattr(report, "positions_withheld", 0), "without location consent"),
        (getattr(report, "positions_in_geofence", 0), "inside a geofence"),
        (getattr(report, "positions_limited", 0), "within the policy's minimum time or distance"),
        (getattr(report, "positions_no_fix", 0), "not a position (a coordinate not a number)"),
    ]
    if any(n for n, _ in held):
        fixes = "; ".join(f"{n:,} {why}" for n, why in held if n)
        print(f"  GPS fixes that never left: {fixes}", file=out)
    fences = getattr(report, "positions_by_fence", None)
    if fences:  # (a fence a drive passes through that holds no fix is not where it was meant)
        each = ", ".join(f"{name} {n:,}" for name, n in fences.items())
        print(f"  GPS fixes inside each geofence (held back): {each}", file=out)
    share = 100.0 * report.bytes_released / report.raw_bytes if report.raw_bytes else 0.0
    # (a short log's summaries can outweigh its frames: a share over 100 % says nothing)
    of_raw = (
        f"{share:.2f}% of {report.raw_bytes:,}"
        if share <= 100
        else f"more than the {report.raw_bytes:,}"
    )
    print(
        f"released {report.released} message(s) ({report.bytes_released:,} bytes, {of_raw} "
        f"raw CAN payload bytes), blocked {report.blocked}, sent "
        f"{report.sent} to {s.broker.url} under {s.broker.topic_prefix}/{s.gateway.vin}/owner/",
        file=out,
    )
    if report.camera:
        cams = report.camera
        print(
            f"camera: {sum(c.frames_seen for c in cams):,} frames seen, "
            f"{sum(c.frames_anonymised for c in cams):,} anonymised, "
            f"{sum(c.frames_dropped for c in cams):,} dropped (never stored or sent); "
            f"{sum(c.faces_blurred for c in cams):,} face and "
            f"{sum(c.plates_blurred for c in cams):,} plate boxes blurred; "
            + (
                "only these counts left the car"
                if getattr(report, "camera_summaries", True)
                else "not even these counts left the car (the policy's camera_summaries = false)"
            )
            + f" (anonymised frames are kept on the device in "
            f"{s.gateway.frames_path})",
            file=out,
        )
    print(f"audit ledger: {s.gateway.ledger}", file=out)


# -- run ------------------------------------------------------------------------------------
def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import Gateway
    from gateway.canbus.replay import ReplaySource
    from gateway.canbus.source import BusSpec, LiveBusSource

    s = _settings(args)
    if not s.can and not s.camera:
        raise ConfigError(
            f"{args.config or 'gateway run'}: no sources: add [[can]] tables (logs, or interface "
            "and channel) or [[camera]] tables to a config file given with --config"
        )
    sources: list[Any] = []
    buses = [
        BusSpec(c.interface, c.channel, c.bitrate, c.name, c.options) for c in s.can if not c.logs
    ]
    if buses:  # one stream: one aggregator sees every bus, as a replay's channels
        live = LiveBusSource(buses)
        live.open()  # a bus that cannot be opened is said before anything starts
        sources.append(live)
    for c in s.can:
        if c.logs:
            speed = None if s.replay.fast else s.replay.speed
            sources.append(ReplaySource([Path(p) for p in c.logs], speed=speed, loop=s.replay.loop))
    try:
        gw = Gateway(s, sources, cameras=_camera_sources(argparse.Namespace(video=[]), s))
        t0 = time.monotonic()
        # a vehicle is often offline: collect anyway, the outbox keeps what waits for the broker
        report = _run_until_signal(gw, drain_timeout=args.drain_timeout, require_broker=False)
    finally:  # (the run closes its buses when it reads them; not if it failed before)
        for src in sources:
            if isinstance(src, LiveBusSource):
                src.close()
    _print_report(report, s, time.monotonic() - t0, live=len(buses))
    for src in sources:
        if isinstance(src, LiveBusSource) and (src.errors or src.clock_steps):
            print(
                f"  live buses: {src.errors} receive error(s), each followed by opening the bus "
                f"again; {src.clock_steps} clock step(s) (the windows open were closed)",
                file=sys.stderr,
            )
    return _undelivered(report, s)


# -- owner ----------------------------------------------------------------------------------
def _cmd_owner(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.egress.schema import Topics
    from gateway.owner import watch

    s = _settings(args)
    topics = Topics(s.broker.topic_prefix, s.gateway.vin)

    async def subscribed_then_watch() -> Any:
        # said once the broker acknowledged the subscription (on stderr: stdout stays the
        # messages), so that a script knows when a replay it starts next cannot be missed
        ready = asyncio.Event()

        async def say() -> None:
            await ready.wait()
            print(
                f"owner view of {topics.all} on {s.broker.url}: subscribed (Ctrl-C to stop)",
                file=sys.stderr,
                flush=True,
            )

        announce = asyncio.create_task(say())
        try:
            return await watch(
                s.broker,
                topics,
                as_json=args.json,
                count=args.count,
                idle_timeout=args.idle_timeout,
                ready=ready,
            )
        finally:
            announce.cancel()

    try:
        view = asyncio.run(subscribed_then_watch())
    except KeyboardInterrupt:
        return 0
    if view.duplicates:
        print(
            f"dropped {view.duplicates} redelivered message(s) (seq and payload already seen)",
            file=sys.stderr,
        )
    if view.reused:
        print(
            f"{view.reused} message(s) reused a seq of an earlier, different one (shown): a "
            "gateway numbered again from an earlier point (a new outbox and ledger?)",
            file=sys.stderr,
        )
    return 0


# -- audit ----------------------------------------------------------------------------------
def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from gateway.audit import verify_ledger

    result = verify_ledger(
        args.ledger, policy_path=args.policy, digests=[_digest(d) for d in args.digest]
    )
    if result.entries == 0:  # nothing on record is no evidence: not an "OK"
        print(
            f"gateway: {args.ledger}: the ledger holds no entry: nothing to verify (no run has "
            "written to it; is it the gateway's --ledger?)",
            file=sys.stderr,
        )
        return 1
    print(result.summary())
    # a file given that no run used: the re-check asked for was not done (a wrong file, or an
    # edit without a new version); runs under other policies are said, not failed
    return 1 if result.unused else 0


def _digest(spec: str) -> tuple[int, str]:
    """``--digest ENTRIES:HEAD`` as the owner received it."""
    import re

    m = re.fullmatch(r"\s*(?:entries=)?(\d+)\s*[:,\s]\s*(?:head=)?([0-9a-fA-F]{16,64})\s*", spec)
    if not m:
        raise ConfigError(
            f"--digest {spec!r}: expected ENTRIES:HEAD as the owner received them on "
            ".../owner/ledger, e.g. 36:9f2c4e1a0b7d3c55 (at least 16 hex digits of the head)"
        )
    return int(m.group(1)), m.group(2).lower()


# -- consent (the owner's side) -------------------------------------------------------------
def _cmd_consent(args: argparse.Namespace) -> int:
    import asyncio
    import hashlib
    import json

    from gateway.egress.mqtt import describe_error, make_client
    from gateway.egress.schema import Topics
    from gateway.errors import BrokerError

    s = _settings(args)
    topics = Topics(s.broker.topic_prefix, s.gateway.vin)
    if args.action in ("stop", "resume"):
        if args.category:
            raise ConfigError(
                f"consent {args.action} takes no category: it {args.action}s all collection "
                f"(withdraw one category's consent with: consent withdraw {args.category})"
            )
        topic, body = topics.command, {"command": args.action}
    elif args.action == "delete":
        if not args.category:  # deleting everything is said, not assumed
            raise ConfigError("consent delete needs a category (or all)")
        topic, body = topics.command, {"command": "delete", "category": args.category}
    elif args.action == "grant":
        if not args.category:
            raise ConfigError(
                "consent grant needs a category (location, cabin, exterior_camera, biometric)"
            )
        if args.days is None:
            raise ConfigError("consent grant needs --days N: a consent always expires")
        if not 0 < args.days < math.inf:
            raise ConfigError(f"--days must be a positive number, got {args.days}")
        if args.days * 86400 < 60:  # over before the gateway could use it
            raise ConfigError(f"--days {args.days:g} is less than a minute")
        from gateway.telemetry.policy import Category

        if args.category == "all" or not Category(args.category).sensitive:
            raise ConfigError(
                f"{args.category} is not a sensitive category: it needs no consent (grant one "
                "of location, cabin, exterior_camera, biometric)"
            )
        topic, body = (
            topics.consent_set,
            {"category": args.category, "grant": True, "days": args.days},
        )
    else:
        topic, body = topics.consent_set, {"category": args.category or "all", "grant": False}

    answers = topics.stream_name("consent")
    payload = json.dumps(body)
    mine = hashlib.sha256(payload.encode()).hexdigest()

    async def send() -> dict[str, Any] | None:
        """Publish, then the gateway's answer: the consent state it publishes after this
        command (its ``last_change`` names the command's sha256), within ``--wait`` s."""
        import aiomqtt

        from gateway.egress.mqtt import SubscriptionRefused, message_queue, subscribe
        from gateway.egress.schema import unpack

        try:
            async with (
                make_client(s.broker, identifier=None) as client,
                message_queue(client) as incoming,
            ):
                if args.wait > 0:
                    await subscribe(client, answers)
                await client.publish(topic, payload, qos=1)
                deadline = time.monotonic() + args.wait
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        m = await incoming.get(left)
                    except TimeoutError:
                        break
                    if m.retain or not isinstance(m.payload, bytes):
                        continue
                    with contextlib.suppress(Exception):
                        state = unpack(m.payload)
                        if state["last_change"].get("command_sha256") == mine:
                            return state
        except SubscriptionRefused as exc:
            raise BrokerError(
                f"{describe_error(s.broker, exc)}; nothing was sent (--wait 0 sends without "
                "waiting for the gateway's answer)"
            ) from exc
        except aiomqtt.MqttError as exc:
            raise BrokerError(describe_error(s.broker, exc)) from exc
        return None

    state = asyncio.run(send())
    print(f"sent {json.dumps(body)} to {topic}")
    if args.wait <= 0:
        return 0
    if state is None:
        print(
            f"gateway: no answer on {answers} within {args.wait:g} s: the gateway of VIN "
            f"{s.gateway.vin} is offline or has another VIN (check --vin), or the broker's "
            "ACL does not let this user command it; an owner command is not kept for it",
            file=sys.stderr,
        )
        return 1
    change = state["last_change"]
    if change.get("action") == "refused":
        print(f"gateway: refused: {change.get('reason', '')}", file=sys.stderr)
        return 1
    grants = ", ".join(
        f"{k} until {_utc(v.get('until'))}" for k, v in state.get("grants", {}).items()
    )
    done = str(change.get("action", "?"))
    if done == "delete":  # what it removed (the running gateway's count)
        done += f": {change.get('removed', 0)} waiting message(s) removed"
        if change.get("in_flight"):
            done += f" ({change['in_flight']} more had already been handed to the broker)"
        if change.get("frames_removed"):
            done += f", {change['frames_removed']} stored camera frame(s)"
        # what it held in memory, not yet sent (a gateway before this count says nothing)
        held = change.get("discarded") or {}
        if held.get("windows") or held.get("trips") or held.get("trip_areas"):
            done += (
                f"; discarded in memory: {held.get('values', 0)} value(s) of "
                f"{held.get('windows', 0)} open window(s), {held.get('trips', 0)} trip(s)"
                + (f", the areas of {held['trip_areas']} trip(s)" if held.get("trip_areas") else "")
            )
    print(f"gateway: {done}; collection {state.get('collection', '?')}; grants: {grants or 'none'}")
    return 0


# -- data rights ----------------------------------------------------------------------------
def _cmd_data(args: argparse.Namespace) -> int:
    import json

    from gateway.datarights import (
        delete_category,
        delete_frames,
        export_frames,
        export_outbox,
        on_record,
        write_export,
    )
    from gateway.egress.ledger import Ledger
    from gateway.egress.outbox import Outbox
    from gateway.telemetry.policy import Category

    s = _settings(args)
    if not Path(s.gateway.outbox).is_file():  # opening it would make an empty one
        raise ConfigError(
            f"{s.gateway.outbox}: no outbox here (give the gateway's --outbox, or --config)"
        )
    if not Path(s.gateway.ledger).is_file():  # the action goes on the gateway's record
        raise ConfigError(
            f"{s.gateway.ledger}: no ledger here, beside the outbox {s.gateway.outbox} (give "
            "the gateway's --ledger, or --config)"
        )
    # the ledger first: its lock says whether a gateway is running on these files, before
    # anything is exported or deleted (and then not recorded)
    ledger = Ledger(s.gateway.ledger)
    outbox = Outbox(s.gateway.outbox)
    if outbox.storage_error is not None:
        outbox.close()
        ledger.close()
        raise StorageError(f"{s.gateway.outbox}: cannot read the outbox ({outbox.storage_error})")
    try:
        from gateway.app import check_vehicle_files
        from gateway.egress.schema import Topics

        # another vehicle's data is not exported or deleted under this one's name
        check_vehicle_files(
            s.gateway.ledger,
            s.gateway.outbox,
            s.gateway.vin,
            outbox,
            Topics(s.broker.topic_prefix, s.gateway.vin),
        )
        if args.data_command == "export":
            data: dict[str, Any] = {"vin": s.gateway.vin}
            data["frames"] = export_frames(s.gateway.frames_path)
            consent_file = s.gateway.consent_file
            if consent_file.exists():
                data["consent"] = json.loads(consent_file.read_text())
            if args.out and args.out != "-":
                try:
                    # the owner's data, positions among it: readable by this user only, as
                    # the outbox it comes from
                    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with contextlib.suppress(OSError):
                        os.fchmod(fd, 0o600)
                    with open(fd, "w") as out:
                        n = write_export(out, data, export_outbox(outbox))
                except OSError as exc:
                    raise StorageError(
                        f"{args.out}: cannot write the export ({exc.strerror})"
                    ) from exc
            else:
                n = write_export(sys.stdout, data, export_outbox(outbox))
            ledger.append(
                "data-export",
                messages=n,
                frames=len(data["frames"]["files"]),
                to=args.out if args.out and args.out != "-" else "stdout",
            )
            return 0
        category = None if args.category == "all" else Category(args.category)
        withdrew = ""
        if category is None:  # all: the consent grants too, as the help says; first, so that a
            import time  # state that cannot be saved stops it before anything is deleted

            from gateway.telemetry.consent import ConsentState

            path = s.gateway.consent_file
            consent = ConsentState.load(path)
            if consent.grants:
                withdrew = ", ".join(sorted(c.value for c in consent.grants))
                consent.withdraw(None, time.time())
                consent.save(path)
        doomed = delete_category(outbox, category)  # (no gateway is sending: its lock)
        n = len(doomed)
        frames, stuck = delete_frames(s.gateway.frames_path, category)
        ledger.append(
            "data-delete",
            category=args.category,
            removed=n,
            **on_record(doomed),
            frames_removed=frames,
            frames_failed=stuck or None,
            withdrew=withdrew or None,
        )
        print(
            f"deleted {n} waiting message(s)"
            + (f" and {frames} stored camera frame(s)" if frames else "")
            + f" of category {args.category}"
            + (f" and withdrew the consent for {withdrew}" if withdrew else "")
            + f"; recorded in {s.gateway.ledger}"
        )
        if stuck:
            print(
                f"gateway: error: {stuck} stored camera frame(s) in {s.gateway.frames_path} "
                "could not be deleted (permissions? a read-only disk?); recorded in the ledger",
                file=sys.stderr,
            )
            return 4
        return 0
    finally:
        outbox.close()
        ledger.close()


# -- validate -------------------------------------------------------------------------------
_DEFAULT_DRIVE = Path(__file__).resolve().parents[1] / "can_fixtures" / "model3"


def _cmd_validate(args: argparse.Namespace) -> int:
    import dataclasses

    from gateway.validate import run_validation

    s = _settings(args)
    log_path = Path(args.log) if args.log else _DEFAULT_DRIVE / "model3_synthetic_drive.log"
    if args.dbc:
        s = dataclasses.replace(s, dbc=_dbc_specs(args.dbc))
    elif not s.dbc:
        if args.log:  # the bundled Model 3 DBC decodes the bundled drive, not another log
            raise ConfigError(
                "--log needs the DBCs that decode it: --dbc [CHANNEL=]FILE (or [dbc] in --config)"
            )
        s = dataclasses.replace(s, dbc={"*": [str(_DEFAULT_DRIVE / "Model3CAN.dbc")]})
    if args.consent:
        import time

        from gateway.app import _apply_config_consent
        from gateway.telemetry.consent import ConsentState
        from gateway.telemetry.policy import load_policy

        # said as the option's mistake here, not as the config file's in the run
        policy = load_policy(s.gateway.policy or None)
        _apply_config_consent(ConsentState(), args.consent, policy, time.time(), "--consent")
        s = dataclasses.replace(
            s, gateway=dataclasses.replace(s.gateway, consent=list(args.consent))
        )
    if not log_path.exists():
        raise ConfigError(f"{log_path}: drive log not found (give one with --log)")
    out = Path(args.out)
    result = run_validation(s, log_path, out, broker_url=args.broker)
    r = result.report
    print(
        f"verdict: {r['verdict']}  ({r['messages_out']} messages, {r['bytes_out']:,} bytes out of "
        f"{r['raw_bytes_in']:,} raw bytes in; {r['leak_count']} leak(s))"
    )
    for leak in result.leaks[:10]:
        print(f"  LEAK {leak.kind} on {leak.topic}: {leak.detail}")
    if r.get("geofences"):
        each = ", ".join(f"{name} {n:,}" for name, n in r["geofences"].items())
        print(f"GPS fixes of the drive inside each geofence (held back): {each}")
    print(f"report: {out / 'report.md'} and {out / 'report.json'}")
    return 0 if result.ok else 1


# -- config ---------------------------------------------------------------------------------
def _cmd_config(args: argparse.Namespace) -> int:
    from gateway import settings as settings_mod

    if args.doc:
        print(settings_mod.describe())
        return 0
    s = _settings(args)
    _check_config(s)
    print(
        f"config OK: vin={s.gateway.vin} broker={s.broker.url} can sources={len(s.can)} "
        f"cameras={len(s.camera)} dbc channels={sorted(s.dbc)}"
    )
    return 0


def _check_config(s: Any) -> None:
    """What ``gateway run`` would refuse, found without running: the policy, the DBCs, the
    logs, the consents and the camera tables (the broker and the cameras are not contacted)."""
    import time

    from gateway.app import _apply_config_consent
    from gateway.canbus.dbc import ChannelDbcs
    from gateway.canbus.replay import detect_format
    from gateway.telemetry.consent import ConsentState
    from gateway.telemetry.policy import load_policy

    policy = load_policy(s.gateway.policy or None)
    dbcs = ChannelDbcs.from_specs(s.dbc)
    if s.dbc:  # the policy's signals the DBCs lack: said as a run would say them
        from gateway.app import say_missing

        say_missing(policy, dbcs, thorough=True)
    for i, c in enumerate(s.can, start=1):
        for log_path in c.logs:
            detect_format(Path(log_path))
        if c.interface:  # the bus is not opened: a name python-can does not know is found
            import can.interfaces

            known = can.interfaces.VALID_INTERFACES  # its own and those of installed plugins
            if c.interface not in known:
                raise ConfigError(
                    f"{s.source_file}: [[can]] #{i}: interface {c.interface!r} is not one "
                    f"python-can knows (known: {', '.join(sorted(known))})"
                )
            label = c.name or c.channel
            if s.dbc and label not in s.dbc and "*" not in s.dbc:
                log.warning(
                    "%s: [[can]] #%d: no DBC applies to bus %r ([dbc] names %s): every frame "
                    "on it would be an unknown id; name the bus as the [dbc] does (name = ...)",
                    s.source_file, i, label, ", ".join(sorted(s.dbc)),
                )  # fmt: skip
    _apply_config_consent(
        ConsentState(),
        s.gateway.consent,
        policy,
        time.time(),
        f"{s.source_file}: [gateway].consent",
    )
    # the [[camera]] tables' values were checked as the settings were read; a recording
    # named as a source must be there (a device may be plugged in later)
    for i, cam in enumerate(s.camera, start=1):
        src = cam.source
        if src and src != "synthetic" and not src.startswith("/dev/") and not Path(src).exists():
            raise ConfigError(
                f"{s.source_file}: [[camera]] #{i}: source {src}: no such video file or image "
                "folder"
            )


# the data categories of consent and deletion (gateway.telemetry.policy.Category), and "all";
# spelled out here: the parser is built before the policy module is imported
CATEGORY_CHOICES = (
    "location",
    "cabin",
    "exterior_camera",
    "biometric",
    "vehicle_status",
    "driving_behaviour",
    "all",
)


class _Parser(argparse.ArgumentParser):
    """argparse, its mistakes said as every other one is: one line, ``gateway: error: ...``,
    exit status 2 (argparse printed its usage first, then ``gateway replay: error: ...``)."""

    # set on the top parser by build_parser: the command line and the commands' parsers (an
    # unknown option is found by the top parser once the command's own was done)
    argv: Sequence[str] = ()
    commands: Mapping[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> NoReturn:
        prog, hint = self.prog, ""
        command: argparse.ArgumentParser | None = None  # the innermost command named
        table: Mapping[str, argparse.ArgumentParser] = self.commands
        for word in self.argv:
            if word in table:
                command = table[word]
                table = {  # its own commands (gateway data export)
                    name: p
                    for a in command._actions
                    if isinstance(a, argparse._SubParsersAction)
                    for name, p in a.choices.items()
                }
        if message.startswith("unrecognized arguments:") and command is not None:
            # the command's help, and the option meant where one is close ("--dcb", "--dbc")
            import difflib

            prog = command.prog
            known = [o for a in command._actions for o in a.option_strings]
            for word in message.split(":", 1)[1].split():
                close = word.startswith("-") and difflib.get_close_matches(
                    word.split("=")[0], known, n=1
                )
                if close:
                    hint = f"; did you mean {close[0]}?"
                    break
        self.exit(2, f"gateway: error: {_printable(message)}{hint} (see: {prog} --help)\n")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; given the command line ``argv``, one that names a command
    of this module gets a parser without the sub-commands of the stages (``_EXTRA_COMMANDS``),
    which it does not need: importing them (numpy, msgpack, ...) would delay a fast replay's
    early start of parsing (``_start_parsing``)."""
    parser = _Parser(
        prog="gateway",
        description="In-vehicle data gateway: reads CAN (recorded logs or a live bus) and camera "
        "frames, keeps raw data on the device, and publishes only the summaries a "
        "policy permits to the owner's MQTT channel, with an audit ledger of every "
        "byte that left.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "replay",
        help="replay recorded CAN logs through the gateway and publish",
        description="Replay recorded CAN logs through decode, aggregation, policy "
        "and guard, and publish the permitted summaries. Ends by "
        "flushing every summary.",
        epilog=EPILOG_REPLAY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("logs", nargs="+", metavar="LOG", help="log files, replayed in order")
    p.add_argument(
        "--dbc",
        action="append",
        metavar="[CHANNEL=]DBC",
        help="DBC for one channel (can1=ccan.dbc) or, bare, for every channel; repeatable",
    )
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=float, metavar="X", help="X times real time (default 1)")
    pace.add_argument("--fast", action="store_true", help="as fast as possible")
    p.add_argument(
        "--loop", action="store_true", help="start again after the last log (Ctrl-C stops)"
    )
    p.add_argument(
        "--video",
        action="append",
        metavar="FILE",
        help="a camera clip (or image folder) replayed beside the CAN log: faces and plates "
        "blurred on the device (gaussian, detection on every 2nd frame, boxes kept 5 frames; "
        "a [[camera]] table in --config changes them, docs/camera.md), anonymised frames "
        "kept in frames/VIN/ beside the ledger, only counts published",
    )
    _add_drain(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_common(p)
    _add_pipeline(p)
    p.set_defaults(func=_cmd_replay, settles_itself=True, prepare=_start_parsing)

    p = sub.add_parser(
        "run",
        help="the long-running gateway described by a config file",
        description="Run the gateway from a TOML config: CAN sources (logs or live "
        "python-can buses such as socketcan can0), cameras, DBCs, "
        "policy, broker. Stops cleanly on SIGINT/SIGTERM. A broker that cannot be reached "
        "does not stop it: summaries wait in the outbox until it can.",
    )
    _add_drain(p)
    _add_common(p)
    _add_pipeline(p)
    p.set_defaults(func=_cmd_run, settles_itself=True)

    p = sub.add_parser(
        "owner",
        help="the owner's view: subscribe and print what arrives",
        description="Subscribe to PREFIX/VIN/owner/# and print each message as it "
        "arrives; redeliveries (a seq already seen with the same payload) are dropped.",
    )
    _add_common(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=_positive_int, metavar="N", help="exit after N messages")
    p.add_argument(
        "--idle-timeout",
        type=_positive_seconds,
        metavar="S",
        help="exit after S seconds without a message",
    )
    p.set_defaults(func=_cmd_owner)

    p = sub.add_parser("audit", help="check an audit ledger")
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    v = asub.add_parser(
        "verify",
        help="verify the hash chain and re-check entries against the policy",
        description="Verify the ledger's hash chain and re-check every entry "
        "against the policy. Exits 1 naming the first bad line.",
    )
    v.add_argument("ledger", metavar="PATH", help="the ledger file (JSON lines), e.g. ledger.jsonl")
    v.add_argument(
        "--policy",
        metavar="FILE",
        action="append",
        help="a policy the runs used, to re-check their messages against (repeatable: a ledger "
        "spans every version of a policy; the bundled one is always at hand); exits 1 if a "
        "file given is the policy of no run",
    )
    v.add_argument(
        "--digest",
        action="append",
        default=[],
        metavar="ENTRIES:HEAD",
        help="a ledger digest the owner received on .../owner/ledger (its entries=N and "
        "head=HASH; the first 16 hex digits of the head are enough): the ledger must still "
        "hold that entry unchanged. Lines cut from the END of a ledger leave a valid chain: "
        "only a digest kept outside the vehicle shows they are gone. Repeatable",
    )
    v.set_defaults(func=_cmd_audit_verify)

    p = sub.add_parser(
        "validate",
        help="the bench verdict: replay canaries, search every byte out",
        description="Replay a drive with canaries injected (exact GPS points, a "
        "VIN, distinctive raw payloads), observe every topic on the "
        "broker, search every byte that left, and write a report. "
        "Exits 1 if anything leaked. Starts a private broker unless "
        "--broker is given.",
    )
    p.add_argument(
        "--log", metavar="LOG", help="drive log (default: the bundled synthetic Model 3 drive)"
    )
    p.add_argument("--dbc", action="append", metavar="[CHANNEL=]DBC", help="DBCs for --log")
    p.add_argument(
        "--consent",
        action="append",
        metavar="CATEGORY:DAYS",
        help="run with this consent given (e.g. location:1) to check coarsening",
    )
    p.add_argument(
        "--out", default="validate-report", metavar="DIR", help="report folder (validate-report)"
    )
    p.add_argument("--config", metavar="FILE", help="TOML config (policy, window, VIN)")
    p.add_argument(
        "--broker",
        metavar="URL",
        help="an existing broker to validate against (default: a private one on a free port). "
        "Every message on it is judged: another publisher's show as unledgered egress, so give "
        "one nobody else publishes to",
    )
    p.add_argument("--vin", help="VIN of the gateway under test (default: the config's)")
    p.add_argument("--policy", metavar="FILE", help="policy to validate (default: the bundled one)")
    p.add_argument(
        "--window", type=float, metavar="SECONDS", help="aggregation window (default 60)"
    )
    p.set_defaults(func=_cmd_validate, topic_prefix=None, decoder=None, ledger=None, outbox=None)

    p = sub.add_parser(
        "config",
        help="check a config file, or print the option reference",
        description="Check a TOML config without running it: its keys and values, the policy, "
        "the DBCs, the logs, the consents and the camera tables (not the broker, not the "
        "cameras themselves). --doc prints every option, its default and its environment "
        "variable (docs/config.md).",
    )
    _add_common(p)
    _add_pipeline(p)
    p.add_argument("--doc", action="store_true", help="print docs/config.md")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser(
        "consent",
        help="the owner's controls: grant/withdraw consent, stop/resume, delete",
        description="Publish an owner command to the gateway: consent for a "
        "sensitive category (always with an expiry), the one-touch "
        "stop, resume, or deletion of waiting data.",
    )
    p.add_argument("action", choices=("grant", "withdraw", "stop", "resume", "delete"))
    p.add_argument(
        "category",
        nargs="?",
        help="for grant and withdraw (withdraw without one: every grant), and delete "
        "(all: every waiting message and the consent grants); not for stop and resume",
        choices=CATEGORY_CHOICES,
    )
    p.add_argument("--days", type=float, help="how long a grant lasts (required for grant)")
    p.add_argument(
        "--wait",
        type=_seconds,
        default=5.0,
        metavar="S",
        help="wait this long for the gateway's answer and print it; exit 1 if it refused or "
        "did not answer (default 5; 0: just send)",
    )
    _add_common(p)
    p.set_defaults(func=_cmd_consent)

    p = sub.add_parser(
        "data",
        help="the owner's data on this device: export or delete",
        description="Export or delete what the gateway keeps on the device "
        "(messages waiting in the outbox, the anonymised camera frames, the consent state); "
        "each action is recorded in the audit ledger.",
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    e = dsub.add_parser(
        "export",
        help="write the locally kept data as JSON",
        description="Write what the gateway keeps on the device (the messages waiting in the "
        "outbox, the consent state, and the list of anonymised camera frames with their folder: "
        "the images stay files there) as one JSON document; recorded in the audit ledger.",
    )
    e.add_argument(
        "--out", metavar="FILE", help="file to write, readable by you only (default, or -: stdout)"
    )
    d = dsub.add_parser(
        "delete",
        help="delete locally kept data of one category",
        description="Delete the messages of one category waiting in the outbox, and for "
        "exterior_camera the anonymised frames kept on the device (all: every one of both, and "
        "the consent grants); recorded in the audit ledger. A running gateway is asked over "
        "MQTT instead: gateway consent delete.",
    )
    d.add_argument(
        "--category",
        required=True,
        choices=CATEGORY_CHOICES,
        help="what to delete (the categories of gateway consent)",
    )
    for q in (e, d):  # (the vehicle's files only: no broker, policy or pipeline is used)
        _add_vehicle(q)
        _add_files(q)
        q.set_defaults(func=_cmd_data)

    words = list(argv or ())
    named = next((i for i, a in enumerate(words) if not a.startswith("-")), None)
    if (
        named is None
        or words[named] not in sub.choices
        or any(a in ("-h", "--help") for a in words[:named])  # the help of every command
    ):
        for module in _EXTRA_COMMANDS:
            __import__(module, fromlist=["add_parser"]).add_parser(sub)
    _verbose_everywhere(sub)
    parser.argv, parser.commands = list(argv or ()), sub.choices
    return parser


def _verbose_everywhere(sub: Any) -> None:
    """``-v`` after the command too (``gateway replay ... -v``), as before it: a user adds it at
    the end of the line. Not given there, the value before the command stands."""
    for p in sub.choices.values():
        if "-v" not in p._option_string_actions:
            p.add_argument(
                "-v", "--verbose", action="count", default=argparse.SUPPRESS,
                help="more log output (-vv: debug)",
            )  # fmt: skip
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                _verbose_everywhere(action)


# sub-commands that live with their stage
_EXTRA_COMMANDS: tuple[str, ...] = ("gateway.synth", "gateway.brokerconf", "gateway.camera.cli")


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            msg += f" ({record.exc_info[1]!r})"
        return f"gateway: {record.levelname.lower()}: {' '.join(msg.split())}"


# (collector was on, objects were frozen) at each main() call still running
_GC_STATE: list[tuple[bool, int]] = []


def _settle() -> None:
    """Start-up is over: move every object made so far (modules, parsed DBCs, the pipeline)
    into the collector's permanent generation and switch the collector back on.

    Start-up makes only objects that live until the process ends; with the collector on,
    ``gateway replay`` walked them in ~120 collections (30 ms for each full one on this 2-core
    machine), and the interpreter walked them again at exit. ``main`` switches the collector
    off first; commands that build a pipeline call this once it is built."""
    if _GC_STATE:
        gc.freeze()
        if _GC_STATE[-1][0]:
            gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    _GC_STATE.append((gc.isenabled(), gc.get_freeze_count()))
    gc.disable()  # until _settle(): start-up makes no garbage worth looking for
    try:
        return _main(argv)
    finally:
        parseproc = sys.modules.get("gateway.canbus.parseproc")
        if parseproc is not None:
            parseproc.drop_early()  # a replay that failed before it read its first log
        enabled, frozen = _GC_STATE.pop()
        if not frozen and not _GC_STATE:
            gc.unfreeze()  # an in-process caller (a test) gets its collector back as it was
        if enabled:
            gc.enable()


def entry(argv: Sequence[str] | None = None) -> int:
    """The ``gateway`` console script and ``python -m gateway`` (through ``_start.main``, which
    then ends the process without the interpreter's teardown): ``main()``, then every object
    left goes into the permanent generation, so that the interpreter's last collections at exit,
    where it does end the process, skip what the operating system frees anyway (~0.1 s of each
    run here).

    Before numpy is imported: one OpenBLAS thread, unless the environment says otherwise.
    numpy's OpenBLAS starts a thread per further core at import, and each spins ~0.1 s waiting
    for work that the gateway never gives it (it does no floating-point linear algebra). On a
    2-core VM that was 80-110 ms of CPU in every run, taken from the other core: a 1M-frame
    replay had used 196-234 ms of CPU by the time it forked its parse child, 119-139 ms
    without. Wall, in paired rounds: -16 ms (faster in 12 of 20); -67 ms (13 of 14) with a
    busy process on the other core (both on an Intel VM); on an AMD EPYC VM, -4 ms (12 of 20),
    no difference to measure. A Raspberry Pi 4 would start three such threads."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    code = main(argv)
    gc.freeze()
    return code


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = build_parser(argv if argv is not None else sys.argv[1:])
    except KeyboardInterrupt:
        print("gateway: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    level = (
        logging.WARNING
        if args.verbose == 0
        else logging.INFO
        if args.verbose == 1
        else logging.DEBUG
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    if not getattr(args, "settles_itself", False):
        _settle()
    try:
        if getattr(args, "prepare", None) is not None:
            args.prepare(args)
        return int(args.func(args) or 0)
    except GatewayError as exc:
        print(f"gateway: error: {_printable(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gateway: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(entry())
