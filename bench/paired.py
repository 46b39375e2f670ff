"""Paired rounds: ``gateway replay --fast`` at two versions of the code, on this machine.

On a shared VM whose speed moves by +-20 % within minutes, two series of runs measured one after
the other differ by more than most changes do. Here each round runs both versions back to back
(which one goes first alternates from round to round), and the figure that counts is the median
of the per-round differences, with the number of rounds in which the new code was faster. Each
version runs as ``make bench`` runs the gateway: a process of its own, the same wrapper (its peak
memory, the parse process's included), a local Mosquitto, its DBCs read from a cache of its own;
and, as ``make bench`` does, the venv's shared libraries are read from disk again first
(``bench/settle.py``), so that the peak memory printed compares with the bench's.

    .venv/bin/python bench/paired.py --old HEAD~1                  # against the working copy
    .venv/bin/python bench/paired.py --old v1 --new v2 --input kona --rounds 30

``--old``/``--new`` take anything ``git worktree add`` does (a commit, a branch, a tag); the
version is checked out in a temporary worktree and imported from there (the venv's packages are
shared). Without ``--new``, the working copy is the new version.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.settle import settle_libraries  # noqa: E402

if __name__ == "__main__":  # before numpy's libraries are mapped here: memory as the bench has it
    settle_libraries()

from bench import bench_decode, run  # noqa: E402
from gateway.localbroker import LocalBroker  # noqa: E402

MODEL3 = ROOT / "can_fixtures" / "model3"


@contextlib.contextmanager
def checkout(rev: str | None, tmp: Path, name: str) -> Iterator[Path]:
    """The tree of ``rev`` in a temporary git worktree (the working copy for None)."""
    if rev is None:
        yield ROOT
        return
    tree = tmp / name
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), rev], check=True
    )
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)])


def replay(tree: Path, log: Path, dbcs: list[str], url: str, state: Path) -> tuple[float, float]:
    """Wall seconds and peak MB of one fast replay by the gateway in ``tree``."""
    for leftover in state.glob("bench-*"):  # every run starts with a new ledger and outbox
        leftover.unlink()
    cmd = [
        *("replay", str(log), *sum((["--dbc", d] for d in dbcs), []), "--fast", "-q"),
        *("--broker", url, "--ledger", str(state / "bench-ledger.jsonl")),
        *("--outbox", str(state / "bench-outbox.sqlite")),
    ]
    env = dict(os.environ, PYTHONPATH=str(tree), GATEWAY_CACHE_DIR=str(state / "dbc-cache"))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [run.PY, "-c", run._PEAK, *cmd], capture_output=True, text=True, env=env, cwd=tree
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the gateway in {tree} failed: {proc.stderr.strip()[-500:]}")
    peaks = [ln.split()[1] for ln in proc.stderr.splitlines() if ln.startswith("BENCH_PEAK_KB")]
    return wall, int(peaks[-1]) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(
        description="Time the gateway's fast replay at two versions of the code in paired "
        "rounds (both versions in every round, the order alternating).",
    )
    ap.add_argument("--old", required=True, metavar="REV", help="the version to compare against")
    ap.add_argument("--new", metavar="REV", help="the version to test (default: the working copy)")
    ap.add_argument(
        "--input",
        choices=("model3", "kona"),
        default="model3",
        help="model3: the synthetic Model 3 drive repeated to 1M frames (3,172-signal DBC); "
        "kona: the Kona EV capture repeated to 2M frames (as the bench's 9-minute row)",
    )
    ap.add_argument("--rounds", type=int, default=20, help="paired rounds (default 20)")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.input == "model3":
            log, dbcs = tmp / "drive.log", [str(MODEL3 / "Model3CAN.dbc")]
            run._repeat_any(MODEL3 / "model3_synthetic_drive.log", log, 1_000_000)
        else:
            log, dbcs = tmp / "kona.log", run.DBCS
            bench_decode.repeated_log(bench_decode.kona_inputs()[0], 2_000_000, log)
        trees = {
            "old": stack.enter_context(checkout(args.old, tmp, "old")),
            "new": stack.enter_context(checkout(args.new, tmp, "new")),
        }
        for tree in trees.values():
            compileall.compile_dir(tree / "gateway", quiet=1)  # as an installed package has it
        broker = stack.enter_context(LocalBroker())
        states = {name: tmp / f"state-{name}" for name in trees}
        for name, tree in trees.items():  # each parses its DBCs into its own cache, untimed
            states[name].mkdir()
            replay(tree, log, dbcs, broker.url, states[name])
        walls: dict[str, list[float]] = {name: [] for name in trees}
        peaks: dict[str, list[float]] = {name: [] for name in trees}
        for i in range(args.rounds):
            for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
                wall, peak = replay(trees[name], log, dbcs, broker.url, states[name])
                walls[name].append(wall)
                peaks[name].append(peak)
            print(
                f"round {i + 1:>3}: old {walls['old'][-1] * 1e3:5.0f} ms, "
                f"new {walls['new'][-1] * 1e3:5.0f} ms",
                flush=True,
            )
    for name in trees:
        w = walls[name]
        print(
            f"{name}: median {statistics.median(w) * 1e3:.0f} ms, best {min(w) * 1e3:.0f} ms, "
            f"peak memory {max(peaks[name]):.1f} MB (highest run)"
        )
    diffs = [n - o for o, n in zip(walls["old"], walls["new"], strict=True)]
    faster = sum(d < 0 for d in diffs)
    print(
        f"new - old, paired: median {statistics.median(diffs) * 1e3:+.0f} ms; "
        f"new faster in {faster} of {len(diffs)} rounds"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
