"""Where a replay cuts its batches: by content only, never by the clock.

A chunk ends after ``frames`` frames or once it spans ``seconds`` of log time, whichever comes
first. A paced replay uses small chunks so that frames reach the pipeline close to their time;
an unpaced one uses large chunks, where the vectorised decoder is fast. Summaries do not
depend on the cut: the aggregator's sums are exactly rounded (``math.fsum``), and count, min,
max and last do not depend on order, so ``--fast`` and ``--speed X`` publish identical bytes
(for a log whose time never goes backwards: a sample older than a window already emitted is
late, and which samples are late depends on where the chunks were cut).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Chunking:
    """Where a reader ends a chunk: after ``frames`` frames, or at the first frame ``seconds``
    or more after the chunk's first."""

    frames: int
    seconds: float


PACED = Chunking(frames=8192, seconds=0.25)
FAST = Chunking(frames=32768, seconds=math.inf)

# defaults for readers called without a preference
CHUNK_FRAMES = PACED.frames
CHUNK_SECONDS = PACED.seconds
