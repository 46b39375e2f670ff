"""``make bench``: the gateway against the field's standard tools, in one run, as ratios.

Everything runs on this machine, one measurement after another, on the same real logs (the
Kona EV capture repeated with shifted timestamps into long replays; the synthetic Model 3 drive
when it is there). Each figure is the median of ``--runs`` runs; the gateway's own end to end
runs, short, are ``--gateway-runs`` (5), alternating with the baseline's so that both sample
the same minutes of a VM whose speed drifts, each input's DBCs read from the cache (the Model 3
drive's first run, which parses its DBC into the cache, is a row of its own).

  end to end   ``gateway replay --fast`` as a process (read + decode + aggregate + policy +
               guard + ledger + outbox + publish to a real local Mosquitto) vs. python-can
               ``LogReader`` + cantools ``decode_message`` frame by frame (bench/baseline.py)
               as a process, on the same file: frames / wall second of each whole process,
               start-up (imports, DBC) included on both sides. On a 9-minute log (2M frames)
               and on one hour of the Kona buses (13M frames, ``--hour``)
  decode       the vector decoder vs. cantools ``Message.decode`` (bench/bench_decode.py)
  parse        the candump parser vs. python-can's ``CanutilsLogReader``; the ASC reader vs.
               python-can's ``ASCReader`` on the same log written as ASC
  memory       peak RSS of the gateway process, CAN only and CAN + camera; the Model 3 row
               gives the highest run that read its DBC from the cache, and the first run's
               figure (it parses the DBC: 3-8 MB more); CAN + camera is the median of
               ``--runs`` runs, with their range. The venv's shared libraries are read from
               disk again first (``settle_libraries``): a fresh install otherwise adds up to
               ~50 MB of library pages to the same run
  camera       anonymised frames per second at 640x360 and 1280x720
  latency      end of a window (frame time, real-time replay) to the summary at the owner

Each row that carries one of the issue's targets (end to end >= 20x, decoding >= 30x, peak
RSS <= 80 MB CAN only and <= 150 MB with a camera, >= 15 frames/s at 1280x720) says whether it
held, judged on the figure as printed; the last line counts them and names those that did not.
``--check`` makes a missed target the exit status (1).
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.settle import settle_libraries  # noqa: E402

if __name__ == "__main__":  # before this process maps numpy's libraries below
    settle_libraries()

from bench import bench_decode  # noqa: E402
from gateway.localbroker import LocalBroker  # noqa: E402

KONA = ROOT / "can_fixtures" / "kona_ev_2019"
DBCS = [f"can0={KONA / 'kona_pcan.cantools.dbc'}", f"can1={KONA / 'kona_ccan.cantools.dbc'}"]
PY = sys.executable
KONA_FPS = 39546 / 10.8404  # frames per second of the two Kona buses in the capture


# The child reports its own peak: ``ru_maxrss`` from wait4 is no good here, because the child is
# started by vfork + exec and Linux carries the parent's (this bench's, with its big arrays)
# high-water mark into the child's figure at exec. A replay parses candump in a forked process
# of its own (gateway.canbus.parseproc), which reports the highest memory both took together
# (the gateway's resident memory and its own private memory, sampled); the figure is the higher
# of that and the gateway's own peak.
_PEAK = (
    "import atexit, sys\n"
    "def peak():\n"
    "    from gateway.canbus import parseproc\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            kb = max(int(line.split()[1]), parseproc.peak_combined_kb)\n"
    "            print('BENCH_PEAK_KB', kb, file=sys.stderr)\n"
    "atexit.register(peak)\n"
    "from gateway._start import main\n"  # what the console script runs, its end included
    "sys.exit(main())\n"
)


def _child_rss(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak resident MB (VmHWM of the child itself) and stderr of a gateway run;
    ``cmd`` is the gateway's argument list."""
    t0 = time.perf_counter()
    proc = subprocess.run([PY, "-c", _PEAK, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"gateway {' '.join(cmd[:2])} failed: {proc.stderr[-500:]}")
    peaks = [ln.split()[1] for ln in proc.stderr.splitlines() if ln.startswith("BENCH_PEAK_KB")]
    return wall, int(peaks[-1]) / 1024, proc.stderr


def gateway_replay(
    log: Path, dbcs: list[str], url: str, tmp: Path, *extra: str
) -> tuple[float, float]:
    cmd = [
        "replay",
        str(log),
        *sum((["--dbc", d] for d in dbcs), []),
        "--fast",
        "--broker",
        url,
        "-q",
        "--ledger",
        str(tmp / "bench-ledger.jsonl"),
        "--outbox",
        str(tmp / "bench-outbox.sqlite"),
        *extra,
    ]
    wall, rss, _ = _child_rss(cmd)
    return wall, rss


def baseline(log: Path, dbcs: list[str]) -> float:
    """Frames per wall second of the whole baseline process, as the gateway is timed."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [PY, str(ROOT / "bench" / "baseline.py"), str(log), *dbcs],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]) / (time.perf_counter() - t0)


def latency(url: str, tmp: Path, runs: int) -> float:
    """Median seconds from a window's end (mapped to wall time) to its arrival at the owner."""
    import aiomqtt

    from gateway import settings as settings_mod
    from gateway.app import Gateway
    from gateway.canbus.replay import ReplaySource
    from gateway.egress.schema import unpack

    async def one() -> list[float]:
        s = settings_mod.load(
            None,
            env={},
            overrides={
                "broker.url": url,
                "gateway.window": 1.0,
                "gateway.vin": "BENCHLATENCY00001",
                "gateway.ledger": str(tmp / "lat.jsonl"),
                "gateway.outbox": str(tmp / "lat.sqlite"),
            },
        )
        s = dataclasses.replace(s, dbc={"can0": [DBCS[0].split("=", 1)[1]]})
        src = ReplaySource([KONA / "230112-7-2019-pcan-ccan-power-off-on-ready-off.csv"], speed=1.0)
        gw = Gateway(s, [src])
        host, port = url.removeprefix("mqtt://").split(":")
        delays: list[float] = []
        async with aiomqtt.Client(host, int(port)) as owner:
            await owner.subscribe("vehicles/BENCHLATENCY00001/owner/signals", qos=1)
            task = asyncio.create_task(gw.run())

            async def read() -> None:
                async for m in owner.messages:
                    body = unpack(m.payload)
                    due = src.due(body["window"][1])
                    if due is not None:
                        delays.append(time.monotonic() - due)

            reader = asyncio.create_task(read())
            await task
            await asyncio.sleep(0.5)
            reader.cancel()
        return delays[:-1]  # the last window is flushed at the end of the log, not on time

    out: list[float] = []
    for _ in range(runs):
        out += asyncio.run(one())
    return statistics.median(out)


def camera_fps(runs: int) -> dict[str, float]:
    """The camera stage at its defaults, as fast as it goes, on the labelled photos made into a
    panning clip (bench/eval_anonymisation.py); empty when ../shared/data/vision is absent."""
    from bench import eval_anonymisation as ev
    from gateway.camera.options import AnonymiserSettings

    if not (ev.VISION / "faces" / "gt.json").is_file():
        print(f"  camera fps: SKIPPED, {ev.VISION} is absent", flush=True)
        return {}
    photos = ev.stream_photos(20)
    out = {}
    for w, h in ((640, 360), (1280, 720)):
        clip = ev.StreamClip((w, h), photos)
        k2 = AnonymiserSettings(detect_every=2, memory=5)  # the [[camera]] defaults
        fps = [ev.stream_fps(clip, k2)[0] for _ in range(runs)]
        out[f"{w}x{h}"] = statistics.median(fps)
    return out


@dataclasses.dataclass(frozen=True)
class Target:
    """One of the issue's targets on a row: the row's figure, as printed, against a bound."""

    op: str  # ">=" or "<="
    bound: float
    unit: str = ""

    def holds(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}{self.unit}"


E2E = Target(">=", 20, "x")  # end to end against python-can + cantools frame by frame
DECODE = Target(">=", 30, "x")  # decoding alone against cantools
RSS_CAN = Target("<=", 80, " MB")
RSS_CAMERA = Target("<=", 150, " MB")
CAMERA_720P = Target(">=", 15, " frames/s")  # at 1280x720, detection on every 2nd frame


@dataclasses.dataclass
class Table:
    """The bench's rows, printed as they come (runs are long), each with its target's verdict
    where the issue sets one; ``summary`` says how many targets held and which did not."""

    rows: list[tuple[str, str, str, str, str]] = dataclasses.field(default_factory=list)
    checked: int = 0
    missed: list[str] = dataclasses.field(default_factory=list)
    unmeasured: list[str] = dataclasses.field(default_factory=list)  # targets with no row

    HEAD = ("measure", "gateway", "standard tool", "ratio", "target, notes")

    def add(
        self,
        measure: str,
        gateway: str,
        tool: str = "",
        ratio: str = "",
        note: str = "",
        *,
        target: Target | None = None,
        value: float | None = None,
    ) -> None:
        """``value``: the row's figure as printed (a ratio to one decimal, MB to the unit), so
        that what the table shows is what is judged."""
        cells = []
        if target is not None:
            assert value is not None
            self.checked += 1
            held = target.holds(value)
            if not held:
                shown = ratio or f"{gateway}{target.unit}"  # as the row shows it
                self.missed.append(f"{measure}: {shown} (target {target})")
            cells.append(f"target {target}: {'met' if held else 'NOT MET'}")
        if note:
            cells.append(note)
        row = (measure, gateway, tool, ratio, "; ".join(cells))
        self.rows.append(row)
        print("  " + " | ".join(c for c in row if c), flush=True)

    def ratio(
        self, measure: str, gateway: float, tool: float, target: Target | None, note: str = ""
    ) -> None:
        """A row of rates: the gateway's, the standard tool's and their ratio."""
        r = round(gateway / tool, 1)
        self.add(
            measure, f"{gateway:,.0f}", f"{tool:,.0f}", f"{r:.1f}x", note, target=target, value=r
        )

    def summary(self) -> str:
        text = f"the issue's targets: {self.checked - len(self.missed)} of {self.checked} met"
        if self.missed:
            text += "; NOT MET: " + "; ".join(self.missed)
        if self.unmeasured:
            text += "; not measured: " + "; ".join(self.unmeasured)
        return text

    def show(self) -> None:
        widths = [max(len(r[i]) for r in [self.HEAD, *self.rows]) for i in range(5)]
        for r in [self.HEAD, tuple("-" * w for w in widths), *self.rows]:
            print(
                "  ".join(
                    c.ljust(w) if i in (0, 4) else c.rjust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=True))
                ).rstrip()
            )
        print(self.summary())

    def markdown(self) -> str:
        md = ["| " + " | ".join(self.HEAD) + " |", "|---|---:|---:|---:|---|"]
        md += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(md) + "\n\n" + self.summary() + "\n"


def interleaved(
    gateway: Callable[[], tuple[float, float]],
    base: Callable[[], float],
    gateway_runs: int,
    base_runs: int,
) -> tuple[list[float], list[float], list[float]]:
    """The gateway's runs and the baseline's, alternating: the VM's speed drifts over minutes,
    so each side is sampled over the same stretch of time (in ``base_runs`` rounds, or one
    baseline run between two halves of the gateway's). (walls and peak RSS of the gateway's
    runs, rates of the baseline's)."""
    walls: list[float] = []
    rss: list[float] = []
    rates: list[float] = []
    rounds = 2 if base_runs == 1 else base_runs
    left = gateway_runs
    for i in range(rounds):
        n = -(-left // (rounds - i))  # the gateway's runs spread over the rounds
        left -= n
        for _ in range(n):
            w, r = gateway()
            walls.append(w)
            rss.append(r)
        if i < base_runs:
            rates.append(base())
    return walls, rss, rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--gateway-runs",
        type=int,
        default=5,
        help="runs of the gateway per end-to-end row (short: more of them steady the median)",
    )
    ap.add_argument("--frames", type=int, default=2_000_000, help="length of the long Kona replay")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    ap.add_argument(
        "--hour",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also replay one hour of Kona traffic (13M frames, 0.5 GB in a temporary folder; "
        "the baseline takes ~2 minutes on it and runs once)",
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="exit with status 1 if any of the issue's targets is not met",
    )
    args = ap.parse_args()
    table = Table()

    # the gateway's bytecode, as a pip-installed package has it (pip compiles site-packages,
    # where the baseline's python-can and cantools live; an editable install under
    # PYTHONDONTWRITEBYTECODE=1 would otherwise compile ~40 modules in every timed run)
    compileall.compile_dir(ROOT / "gateway", quiet=1)
    with tempfile.TemporaryDirectory() as tmpdir, LocalBroker() as broker:
        tmp = Path(tmpdir)
        # a DBC cache of this run: the first gateway run parses each DBC, later runs read it
        # from the cache, as a bench user's repeated replays do (nothing lands in ~/.cache)
        os.environ["GATEWAY_CACHE_DIR"] = str(tmp / "dbc-cache")
        log = bench_decode.repeated_log(
            bench_decode.kona_inputs()[0], args.frames, tmp / "kona_long.log"
        )
        print(
            f"long replay: Kona EV capture x{args.frames / 39546:.0f} = {args.frames:,} frames, "
            f"{log.stat().st_size / 1e6:.0f} MB; {args.gateway_runs} gateway runs and "
            f"{args.runs} baseline runs each",
            flush=True,
        )
        # untimed: parses the Kona DBCs into the cache, so that every timed run reads them
        # from it (the Model 3 drive's first run is a row of its own, below)
        gateway_replay(bench_decode.kona_inputs()[0], DBCS, broker.url, tmp)
        walls, rsss, bases = interleaved(
            lambda: gateway_replay(log, DBCS, broker.url, tmp),
            lambda: baseline(log, DBCS),
            args.gateway_runs,
            args.runs,
        )
        table.ratio(
            f"end to end, frames/s (Kona, {args.frames / KONA_FPS / 60:.0f} min)",
            args.frames / statistics.median(walls),
            statistics.median(bases),
            E2E,
        )
        if args.hour:
            frames = round(3600 * KONA_FPS)
            hour = bench_decode.repeated_log(
                bench_decode.kona_inputs()[0], frames, tmp / "kona_hour.log"
            )
            print(f"hour replay: {frames:,} frames, {hour.stat().st_size / 1e6:.0f} MB", flush=True)
            # the baseline (~2 minutes) once, between the gateway's runs
            hour_walls, hour_rss, (b,) = interleaved(
                lambda: gateway_replay(hour, DBCS, broker.url, tmp),
                lambda: baseline(hour, DBCS),
                args.gateway_runs,
                1,
            )
            rsss += hour_rss  # streaming: an hour needs no more memory than minutes
            hour.unlink()
            table.ratio(
                "end to end, frames/s (Kona, one hour)",
                frames / statistics.median(hour_walls),
                b,
                E2E,
            )
        else:
            table.unmeasured.append("end to end, Kona, one hour (--no-hour)")
        drive = ROOT / "can_fixtures" / "model3" / "model3_synthetic_drive.log"
        m3 = [f"{ROOT / 'can_fixtures' / 'model3' / 'Model3CAN.dbc'}"]
        if drive.exists():
            long_drive = tmp / "drive_long.log"
            n = _repeat_any(drive, long_drive, args.frames // 2)
            # the first run parses the DBC (3,172 signals) into the cache: a row of its own
            first = gateway_replay(long_drive, m3, broker.url, tmp)
            m3_walls, m3_rsss, m3_bases = interleaved(
                lambda: gateway_replay(long_drive, m3, broker.url, tmp),
                lambda: baseline(long_drive, [f"*={m3[0]}"]),
                args.gateway_runs,
                args.runs,
            )
            m3_rss = round(max(m3_rsss))
            b = statistics.median(m3_bases)
            table.ratio(
                "end to end, frames/s (Model 3 drive)", n / statistics.median(m3_walls), b, E2E
            )
            table.ratio(
                "end to end, frames/s (Model 3 drive, first run: parses and caches its DBC)",
                n / first[0],
                b,
                None,
                "no target: a DBC is parsed once, on its first replay",
            )
        else:
            table.unmeasured.append("end to end and peak RSS, Model 3 drive (no drive log)")
        d = bench_decode.run(frames=1_000_000, runs=args.runs, cantools_frames=100_000)
        cantools_fps = d["cantools_fps"]
        table.ratio(
            "decode only, frames/s (65k batches)", d["vector_65536_fps"], cantools_fps, DECODE
        )
        table.ratio(
            "decode only, frames/s (one 1M batch)", d["vector_batch_fps"], cantools_fps, DECODE
        )
        table.ratio("candump parse, frames/s", d["candump_fps"], d["python_can_fps"], None)
        table.ratio("Vector ASC parse, frames/s", d["asc_fps"], d["python_can_asc_fps"], None)
        # bench_decode.kona_inputs() above already put the Kona DBCs in the cache: every run
        # reads them from it
        rss_can = round(max(rsss))
        table.add(
            "peak RSS, CAN only, MB (highest run)", f"{rss_can}", target=RSS_CAN, value=rss_can
        )
        if drive.exists():
            table.add(
                "peak RSS, CAN only, Model 3 drive (3,172-signal DBC), MB",
                f"{m3_rss}",
                note=f"{first[1]:.0f} in the first run, which parses the DBC",
                target=RSS_CAN,
                value=m3_rss,
            )
        clip = ROOT / "can_fixtures" / "camera" / "demo_clip.mp4"
        if clip.exists():
            kona_log = KONA / "230112-7-2019-pcan-ccan-power-off-on-ready-off.converted.candump.log"
            whole = tmp / "whole-frame.toml"
            whole.write_text(f'[[camera]]\nsource = "{clip}"\nplate_strips = 1\n')
            # alternating, as the end-to-end runs, and the median: a single run is no figure
            cam: dict[str, list[float]] = {"strips": [], "whole": []}
            for _ in range(args.runs):
                for key, extra in (("strips", ()), ("whole", ("--config", str(whole)))):
                    _, rss = gateway_replay(
                        kona_log, DBCS, broker.url, tmp, *extra, "--video", str(clip)
                    )
                    cam[key].append(rss)
            rss_cam = round(statistics.median(cam["strips"]))
            table.add(
                "peak RSS, CAN + camera, MB",
                f"{rss_cam}",
                note=f"runs {min(cam['strips']):.0f}-{max(cam['strips']):.0f}",
                target=RSS_CAMERA,
                value=rss_cam,
            )
            table.add(
                "peak RSS, CAN + camera, plates on the whole frame (plate_strips = 1), MB",
                f"{statistics.median(cam['whole']):.0f}",
                note="no target: the default runs them in 3 strips",
            )
        else:
            table.unmeasured.append("peak RSS with a camera (no demo clip)")
        camera = camera_fps(args.runs)
        if not camera:
            table.unmeasured.append("camera frames/s at 1280x720 (no labelled photos)")
        for size, fps in camera.items():
            shown = round(fps, 1)
            hd = size == "1280x720"  # the target's size; detection on every 2nd frame
            table.add(
                f"camera anonymised frames/s, {size}",
                f"{shown:.1f}",
                note="" if hd else "no target at this size",
                target=CAMERA_720P if hd else None,
                value=shown,
            )
        lat = latency(broker.url, tmp, 1)
        table.add("latency, window end -> owner, s (real-time replay)", f"{lat:.2f}")
    table.show()
    if args.markdown:
        Path(args.markdown).write_text(table.markdown())
    return 1 if args.check and table.missed else 0


def _repeat_any(src: Path, out: Path, frames: int) -> int:
    return sum(1 for _ in open(bench_decode.repeated_log(src, frames, out)))


if __name__ == "__main__":
    raise SystemExit(main())
