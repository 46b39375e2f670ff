"""A one-line progress bar on a terminal; silent when stderr is not a terminal."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


class Progress:
    def __init__(
        self,
        label: str,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        min_interval: float = 0.2,
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.t0 = time.monotonic()
        self._last = -math.inf  # the first update is shown
        self.min_interval = min_interval
        self._shown = False
        self._skipped: tuple[int, int | None, int | None, str] | None = None

    def update(
        self,
        count: int,
        done: int | None = None,
        total: int | None = None,
        unit: str = "frames",
        force: bool = False,
    ) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            self._skipped = (count, done, total, unit)  # shown at close: the bar ends at 100 %
            return
        self._skipped = None
        self._last = now
        rate = count / max(now - self.t0, 1e-9)
        if total:
            frac = min(max(done or 0, 0) / total, 1.0)
            bar = "#" * int(frac * 24)
            text = f"{self.label} [{bar:<24}] {frac * 100:5.1f}%  {count:,} {unit}  {rate:,.0f} {unit}/s"
        else:
            text = f"{self.label} {count:,} {unit}  {rate:,.0f} {unit}/s"
        self.stream.write("\r" + text[:120].ljust(80))
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self.enabled and self._shown and self._skipped is not None:
            count, done, total, unit = self._skipped
            self.update(count, done, total, unit, force=True)
        if self.enabled and self._shown:
            self.stream.write("\n")
            self.stream.flush()
