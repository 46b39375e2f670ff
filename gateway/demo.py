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
# one vehicle, one ledger: the two drives are two vehicles, each with its own files
KONA_VIN = "DEMOKONAEV0000001"
MODEL3_VIN = "DEMOMODEL30000001"


def _banner(text: str) -> None:
    print("\n" + "=" * 78 + f"\n{text}\n" + "=" * 78, flush=True)


def _replay_steps(out: Path) -> list[tuple[str, str, list[str]]]:
    """(title, VIN, the replay's arguments) of each step."""
    kona = FIX / "kona_ev_2019"
    steps = [
        (
            "Real 2019 Hyundai Kona EV log (P-CAN + C-CAN, power off -> on -> READY -> off), "
            "2 s windows, in real time",
            KONA_VIN,
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
                MODEL3_VIN,
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
        title, vin, cmd = steps[0]
        steps[0] = (
            title + ", with a camera clip blurred on the device (a frame that cannot be "
            "blurred in time is dropped, never sent or kept unblurred; health then says "
            "degraded)",
            vin,
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
        steps = _replay_steps(out)
        vins = list(dict.fromkeys(vin for _, vin, _ in steps))
        views = {vin: io.StringIO() for vin in vins}
        owners = []
        for vin in vins:  # each vehicle's owner, subscribed before its gateway starts
            ready = asyncio.Event()
            owners.append(
                asyncio.create_task(
                    watch(
                        BrokerSettings(url=url),
                        Topics("vehicles", vin),
                        idle_timeout=None,
                        out=views[vin],
                        ready=ready,
                        hint_after=None,  # the gateway starts after its owner: silence is normal
                    )
                )
            )
            await asyncio.wait_for(ready.wait(), 10)
        for title, vin, cmd in steps:
            _banner(title)
            print(f"$ gateway {' '.join(cmd[:2])} ... --vin {vin}", flush=True)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                *cmd,
                "--broker",
                url,
                "--vin",
                vin,
                "--ledger",
                str(out / vin / "ledger.jsonl"),
                "--outbox",
                str(out / vin / "outbox.sqlite"),
            )
            if await proc.wait() != 0:
                print("demo: the replay failed", file=sys.stderr)
                return 1
        await asyncio.sleep(1.0)
        for task in owners:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for vin in vins:
            _banner(
                f"What the owner of {vin} received on vehicles/{vin}/owner/# "
                f"(gateway owner --vin {vin}; windows in UTC, or in the log's own seconds)"
            )
            print(views[vin].getvalue().rstrip())
        for vin in vins:
            _banner(f"The audit ledger of {vin}: every byte that left, hash-chained")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "audit",
                    "verify",
                    str(out / vin / "ledger.jsonl"),
                ],
                check=False,
            )
        _banner(
            "The bench verdict (gateway validate): the Model 3 drive again, with canaries (exact "
            "GPS points, a VIN, raw payloads), every byte on the broker searched for them"
        )
        verdict = subprocess.run(
            [sys.executable, "-m", "gateway", "validate", "--out", str(out / "validate")],
            check=False,
        )
        print(f"\nfiles: {out}/ (a folder per vehicle: ledger.jsonl, outbox.sqlite; validate/)")
        if verdict.returncode != 0:
            return 1
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
