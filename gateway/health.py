"""Health of the gateway itself: rates, errors, outbox depth, CPU and memory."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.canbus import parseproc
from gateway.records import FrameBatch


def rss_mb() -> float:
    """Current resident memory (Linux /proc), with what a running candump parse process has
    of its own; else the peak from getrusage."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024 + parseproc.private_mb()
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time of the gateway, its candump parse processes included."""
    return time.process_time() + parseproc.cpu_seconds()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class HealthMonitor:
    """Frames per channel since the start, and the frame rates and CPU share since the last
    health summary."""

    started: float = field(default_factory=time.monotonic)
    frames: int = 0
    per_channel: dict[str, int] = field(default_factory=dict)
    _last_t: float = field(default_factory=time.monotonic)
    _last_cpu: float = field(default_factory=cpu_seconds)
    _last_counts: dict[str, int] = field(default_factory=dict)

    def on_batch(self, batch: FrameBatch) -> None:
        self.frames += len(batch)
        if len(batch) == 0:
            return
        counts = np.bincount(batch.channel).tolist()  # a counting pass, not a sort (np.unique)
        for idx, n in enumerate(counts):
            if n:
                name = batch.channels[idx]
                self.per_channel[name] = self.per_channel.get(name, 0) + n

    def snapshot(self, **extra: Any) -> dict[str, Any]:
        now, cpu = time.monotonic(), cpu_seconds()
        dt = max(now - self._last_t, 1e-6)
        rates = {
            ch: round((n - self._last_counts.get(ch, 0)) / dt, 1)
            for ch, n in self.per_channel.items()
        }
        cpu_pct = round(100.0 * (cpu - self._last_cpu) / dt, 1)
        self._last_t, self._last_cpu, self._last_counts = now, cpu, dict(self.per_channel)
        return {
            "at": round(time.time(), 3),
            "uptime_s": round(now - self.started, 1),
            "frames_per_s": rates,
            "frames": self.frames,
            "cpu_percent": cpu_pct,
            "rss_mb": round(rss_mb(), 1),
            **extra,
        }
