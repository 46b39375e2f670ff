"""``make demo``: the bundled real data through the gateway to a private broker, shown as the
owner sees it. Starts its own Mosquitto on a free loopback port unless ``--broker`` is given."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

from gateway.egress.schema import Topics
from gateway.localbroker import LocalBroker
from gateway.owner import watch
from gateway.settings import BrokerSettings

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "can_fixtures"
VIN = "DEMOVIN0000000001"


def _banner(text: str) -> None:
    print("\n" + "=" * 78 + f"\n{text}\n" + "=" * 78, flush=True)


def _replay_steps(out: Path) -> list[tuple[str, list[str]]]:
    kona = FIX / "kona_ev_2019"
    steps = [
        (
            "Real 2019 Hyundai Kona EV log (P-CAN + C-CAN, power off -> on -> READY -> off), "
            "2 s windows, in real time",
            [
                "replay",
                str(kona / "230112-7-2019-pcan-ccan-power-off-on-ready-off.csv"),
                "--dbc",
                f"can0={kona / 'kona_pcan.dbc'}",
                "--dbc",
                f"can1={kona / 'kona_ccan.dbc'}",
                "--speed",
                "1",  # the camera clip is paced too: at 4x, most of its frames were dropped
                "--window",
                "2",
            ],
        )
    ]
    drive = FIX / "model3" / "model3_synthetic_drive.log"
    if drive.exists():
        steps.append(
            (
                "SYNTHETIC Tesla Model 3 drive (real DBC): GPS stays in the car without consent",
                [
                    "replay",
                    str(drive),
                    "--dbc",
                    str(FIX / "model3" / "Model3CAN.dbc"),
                    "--fast",
                    "--window",
                    "60",
                ],
            )
        )
    clip = FIX / "camera" / "demo_clip.mp4"
    if clip.exists() and steps:
        title, cmd = steps[0]
        steps[0] = (
            title + ", with a camera clip blurred on the device",
            [*cmd, "--video", str(clip)],
        )
    return steps


async def _main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    broker = None
    url = args.broker
    if url is None:
        broker = LocalBroker(workdir=out / "mosquitto")
        broker.workdir.mkdir()  # type: ignore[union-attr]
        broker.start()
        url = broker.url
        print(f"started a private Mosquitto broker at {url}")
    try:
        buf = io.StringIO()
        ready = asyncio.Event()
        owner = asyncio.create_task(
            watch(
                BrokerSettings(url=url),
                Topics("vehicles", VIN),
                idle_timeout=None,
                out=buf,
                ready=ready,
                hint_after=None,  # the demo's gateway starts after its owner: silence is normal
            )
        )
        await asyncio.wait_for(ready.wait(), 10)
        ledger = out / "ledger.jsonl"
        for title, cmd in _replay_steps(out):
            _banner(title)
            print("$ gateway " + " ".join(cmd[:2]) + " ...", flush=True)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                *cmd,
                "--broker",
                url,
                "--vin",
                VIN,
                "--ledger",
                str(ledger),
                "--outbox",
                str(out / "outbox.sqlite"),
            )
            if await proc.wait() != 0:
                print("demo: the replay failed", file=sys.stderr)
                return 1
        await asyncio.sleep(1.0)
        owner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await owner
        _banner(f"What the owner received on vehicles/{VIN}/owner/# (gateway owner --vin {VIN})")
        print(buf.getvalue().rstrip())
        _banner("The audit ledger: every byte that left, hash-chained")
        subprocess.run(
            [sys.executable, "-m", "gateway", "audit", "verify", str(ledger)], check=False
        )
        print(f"\nfiles: {out}/ (ledger.jsonl, outbox.sqlite)")
    finally:
        if broker is not None:
            broker.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway.demo", description=__doc__)
    p.add_argument("--broker", help="use this broker instead of a private one")
    p.add_argument("--out", default=str(ROOT / "demo-out"), help="where the demo writes its files")
    return asyncio.run(_main(p.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
