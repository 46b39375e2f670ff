"""The field's standard path, for comparison: python-can's LogReader + cantools, frame by frame.

    python bench/baseline.py LOG CHANNEL=DBC [CHANNEL=DBC ...]     (CHANNEL * = every channel)

Reads every frame, looks its id up in the channel's DBC and decodes it with
``cantools.database.Database.decode_message`` (truncated frames allowed, as the gateway does).
Prints ``frames seconds``.
"""

from __future__ import annotations

import sys
import time

import can
import cantools


def main() -> None:
    log = sys.argv[1]
    dbs = {}
    for spec in sys.argv[2:]:
        ch, _, path = spec.partition("=")
        try:
            dbs[ch] = cantools.database.load_file(path)
        except Exception:  # what a user of cantools does with a DBC it refuses (Model3CAN.dbc)
            dbs[ch] = cantools.database.load_file(path, strict=False)
    every = dbs.pop("*", None)
    t0 = time.perf_counter()
    n = 0
    for msg in can.LogReader(log):
        n += 1
        db = dbs.get(msg.channel, every)
        if db is None:
            continue
        try:
            db.decode_message(
                msg.arbitration_id, msg.data, decode_choices=False, allow_truncated=True
            )
        except (KeyError, cantools.database.DecodeError, ValueError):
            continue
    print(n, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
