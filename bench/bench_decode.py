"""Decode and candump-parse throughput on the real Kona log, repeated to ~1M frames.

    .venv/bin/python -m bench.bench_decode [--frames 1000000] [--runs 5]

Decode-only rates (frames/s, median of ``runs`` rounds, every decoder once per round):
  cantools       ``Message.decode`` frame by frame, message and bytes resolved beforehand
  reference      ``CantoolsDecoder.decode`` (the project's reference, series built)
  vector/batch   ``VectorDecoder.decode`` on the whole repeated log as one batch
  vector/chunks  ``VectorDecoder.decode`` on the chunks a replay feeds it (``iter_candump``)
Parse rates, also in alternating rounds: ``iter_candump`` vs python-can's ``CanutilsLogReader``,
and the gateway's ASC reader vs python-can's ``ASCReader`` on the same log written as ASC.
Every function is importable, for a ``make bench`` table.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import can
import numpy as np

from gateway.canbus.candump import iter_candump
from gateway.canbus.chunking import FAST
from gateway.canbus.dbc import ChannelDbcs
from gateway.canbus.decode import CantoolsDecoder
from gateway.canbus.fastdecode import VectorDecoder
from gateway.records import FrameBatch

ROOT = Path(__file__).resolve().parents[1]
Job = tuple[int, Callable[[], object]]  # (frames, one timed run)
BATCH_SIZES = (2048, 8192, 65536)


def find_data(pattern: str) -> Path:
    for base in (ROOT / "can_fixtures", ROOT.parent / "shared" / "data" / "can"):
        found = sorted(base.rglob(pattern)) if base.is_dir() else []
        if found:
            return found[0]
    raise FileNotFoundError(f"{pattern} not in can_fixtures/ or ../shared/data/can")


def kona_inputs() -> tuple[Path, ChannelDbcs]:
    """The Kona candump log; P-CAN DBC on can0, C-CAN DBC on can1."""
    dbcs = ChannelDbcs()
    dbcs.add("can0", find_data("kona_pcan.cantools.dbc"))
    dbcs.add("can1", find_data("kona_ccan.cantools.dbc"))
    return find_data("*.candump.log"), dbcs


def repeated_log(src: Path, frames: int, out: Path) -> Path:
    """``src`` written again and again, each copy shifted to start after the previous one."""
    lines = src.read_text().splitlines()
    stamps = [float(line[1 : line.index(")")]) for line in lines]
    span = max(stamps) - min(stamps) + 0.001
    with open(out, "w") as fh:
        written, lap = 0, 0
        while written < frames:
            for ts, line in zip(stamps, lines, strict=True):
                fh.write(f"({ts + lap * span:.6f}){line[line.index(')') + 1 :]}\n")
                written += 1
                if written >= frames:
                    break
            lap += 1
    return out


def concat(batches: list[FrameBatch]) -> FrameBatch:
    return FrameBatch(
        *(
            batches[-1].channels
            if f.name == "channels"
            else np.concatenate([getattr(b, f.name) for b in batches])
            for f in dataclasses.fields(FrameBatch)
        )
    )


def cantools_job(batch: FrameBatch, dbcs: ChannelDbcs, frames: int) -> Job:
    """The first ``frames`` log frames, each decoded with ``Message.decode`` as CantoolsDecoder
    calls it; the lookup is done beforehand and unknown ids cost nothing, so this is the
    decode-only time of the same frames the vector decoder is timed on."""
    work = []
    n = min(frames, len(batch))
    for i in range(n):
        if batch.is_error[i] or batch.is_remote[i]:
            continue
        for db in dbcs.for_channel(batch.channels[batch.channel[i]]):
            try:
                msg = db.get_message_by_frame_id(int(batch.arbitration_id[i]))
            except KeyError:
                continue
            work.append((msg.decode, bytes(batch.data[i, : batch.dlc[i]])))
            break

    def run() -> None:
        for decode, data in work:
            decode(
                data, decode_choices=False, scaling=True, allow_truncated=True, allow_excess=True
            )

    return n, run


def decoded_share(batch: FrameBatch, dbcs: ChannelDbcs) -> float:
    stats = VectorDecoder(dbcs).decode(batch).stats
    return stats.decoded / max(stats.frames, 1)


def vector_job(batches: list[FrameBatch], dbcs: ChannelDbcs) -> Job:
    dec = VectorDecoder(dbcs)
    for b in batches[:3]:
        dec.decode(b)  # plans are built once, on first sight of an id
    n = sum(len(b) for b in batches)
    return n, lambda: [dec.decode(b) for b in batches]


def interleaved_rates(jobs: dict[str, Job], runs: int) -> dict[str, float]:
    """Frames per second of each job, median of ``runs`` rounds in which every job runs once,
    one after another: on a shared machine whose speed drifts over minutes, each ratio then
    compares runs made at the same moments."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(runs):
        for name, (_, fn) in jobs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: jobs[name][0] / statistics.median(t) for name, t in times.items()}


def sized_batches(batch: FrameBatch, size: int) -> list[FrameBatch]:
    return [
        batch.select(np.arange(lo, min(lo + size, len(batch)))) for lo in range(0, len(batch), size)
    ]


def reference_job(batch: FrameBatch, dbcs: ChannelDbcs, frames: int) -> Job:
    part = batch.select(np.arange(min(frames, len(batch))))
    dec = CantoolsDecoder(dbcs)
    return len(part), lambda: dec.decode(part)


def _fast_chunks(path: Path) -> Iterator[FrameBatch]:
    """The chunks ``gateway replay --fast`` reads (a paced replay cuts them every 0.25 s),
    parsed in this process as a replay's candump parse process parses them (one thread; the
    pipe to the gateway is in the end-to-end rows of ``bench/run.py``)."""
    return iter_candump(path, chunk_frames=FAST.frames, max_chunk_seconds=FAST.seconds, workers=0)


def candump_job(path: Path) -> Job:
    n = sum(len(b) for b in _fast_chunks(path))
    return n, lambda: sum(1 for _ in _fast_chunks(path))


def python_can_job(path: Path) -> Job:
    def count() -> Iterator[can.Message]:
        yield from can.CanutilsLogReader(str(path))

    return sum(1 for _ in count()), lambda: sum(1 for _ in count())


def asc_jobs(path: Path, tmp: Path, frames: int) -> dict[str, Job]:
    """The gateway's and python-can's readers on the same Vector ASC file: the candump log
    written as ASC by python-can's ``ASCWriter``."""
    from itertools import islice

    from gateway.canbus.replay import iter_log

    asc = tmp / "kona.asc"
    with can.ASCWriter(str(asc)) as writer:
        for msg in islice(can.LogReader(str(path)), frames):
            writer.on_message_received(msg)
    n = sum(len(b) for b in iter_log(asc, None, FAST))
    return {
        "asc_fps": (n, lambda: sum(len(b) for b in iter_log(asc, None, FAST))),
        "python_can_asc_fps": (n, lambda: sum(1 for _ in can.ASCReader(str(asc)))),
    }


def run(frames: int = 1_000_000, runs: int = 5, cantools_frames: int = 100_000) -> dict[str, float]:
    log, dbcs = kona_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        big = repeated_log(log, frames, Path(tmp) / "kona_x.log")
        small = repeated_log(log, min(frames, 100_000), Path(tmp) / "kona_small.log")
        chunks = list(_fast_chunks(big))
        batch = concat(chunks)
        jobs = {
            "cantools_fps": cantools_job(batch, dbcs, cantools_frames),
            "reference_fps": reference_job(batch, dbcs, cantools_frames),
            "vector_batch_fps": vector_job([batch], dbcs),
            "vector_chunks_fps": vector_job(chunks, dbcs),
            **{
                f"vector_{size}_fps": vector_job(sized_batches(batch, size), dbcs)
                for size in BATCH_SIZES
            },
        }
        out = {
            "frames": float(len(batch)),
            "decoded_share": decoded_share(batch, dbcs),
            "chunks": float(len(chunks)),
            **interleaved_rates(jobs, runs),
        }
        parse = {"candump_fps": candump_job(big), "python_can_fps": python_can_job(small)}
        out |= interleaved_rates(parse, max(2, runs // 2))
        asc = asc_jobs(small, Path(tmp), min(frames, 100_000))
        out |= interleaved_rates(asc, max(2, runs // 2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cantools-frames", type=int, default=100_000)
    args = ap.parse_args()
    r = run(args.frames, args.runs, args.cantools_frames)
    print(
        f"Kona log x{r['frames'] / 39546:.1f}: {int(r['frames'])} frames "
        f"({r['decoded_share']:.0%} known to the DBCs), {int(r['chunks'])} replay chunks "
        f"(avg {r['frames'] / r['chunks']:.0f} frames)"
    )
    print(f"{'decode (log frames/s)':<34}{'frames/s':>14}{'vs cantools':>14}")
    for key, label in (
        ("cantools_fps", "cantools Message.decode"),
        ("reference_fps", "CantoolsDecoder"),
        ("vector_batch_fps", "VectorDecoder, one batch"),
        ("vector_chunks_fps", "VectorDecoder, replay chunks"),
        *((f"vector_{n}_fps", f"VectorDecoder, {n}-frame batches") for n in BATCH_SIZES),
    ):
        print(f"{label:<34}{r[key]:>14,.0f}{r[key] / r['cantools_fps']:>13.1f}x")
    print(f"{'parse candump':<34}{'frames/s':>14}{'vs python-can':>14}")
    for key, label in (
        ("python_can_fps", "python-can CanutilsLogReader"),
        ("candump_fps", "iter_candump"),
    ):
        print(f"{label:<34}{r[key]:>14,.0f}{r[key] / r['python_can_fps']:>13.1f}x")
    print(f"{'parse Vector ASC':<34}{'frames/s':>14}{'vs python-can':>14}")
    for key, label in (("python_can_asc_fps", "python-can ASCReader"), ("asc_fps", "iter_log")):
        print(f"{label:<34}{r[key]:>14,.0f}{r[key] / r['python_can_asc_fps']:>13.1f}x")


if __name__ == "__main__":
    main()
