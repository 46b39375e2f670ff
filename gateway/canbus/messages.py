"""What the python-can reader paths share: the lines a reader pulled, channel names, and what
every message must satisfy before it becomes a frame of a batch."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import can

# what python-can's text readers raise on a line (or a header line) they cannot read: the
# line is counted and the reading goes on. ArithmeticError: a TRC start time too large for a
# date (OverflowError from timedelta)
READ_ERRORS = (ValueError, ArithmeticError, LookupError, TypeError, AttributeError)


def channel_name(channel: Any) -> str:
    """python-can channels are ints, strings or None; a bus name is always a string here.
    Vector ASC numbers channels from 1 and python-can reports them from 0, so a file that
    numbers from 0 (python-can says -1) is still the first channel, ``can0``."""
    if channel is None:
        return "can0"
    if isinstance(channel, int):
        return f"can{max(channel, 0)}"
    return str(channel)


def message_problem(msg: can.Message) -> str | None:
    """Why a message a reader returned from a damaged line cannot be a CAN frame (None: it
    can). python-can's text readers accept ids and lengths no bus carries."""
    if not 0 <= msg.arbitration_id <= 0x1FFFFFFF:
        return f"id {msg.arbitration_id:#x} is longer than 29 bits"
    if len(msg.data or b"") > 64:
        return f"{len(msg.data)} data bytes (a frame has at most 64)"
    if not math.isfinite(msg.timestamp):
        return "bad timestamp"
    return None


class CountingLines:
    """A text file proxy that counts the lines python-can's reader pulled, so a parse error can
    be pinned to its line, and that lets a restarted reader resume right after it."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.line_no = 0
        self.chars = 0
        self.nonblank = 0  # lines with more than white space
        self.pushback: list[str] = []
        # shown every line pulled from the file, with its number (an ASC body's, for lines its
        # reader would skip in silence)
        self.watch: Callable[[str, int], None] | None = None

    def __iter__(self) -> CountingLines:
        return self

    def __next__(self) -> str:
        if self.pushback:
            return self.pushback.pop()
        line = next(self._fh)
        self.line_no += 1
        self.chars += len(line)
        if not line.isspace():
            self.nonblank += 1
        if self.watch is not None:
            self.watch(line, self.line_no)
        return line

    def readline(self) -> str:
        try:
            return next(self)
        except StopIteration:
            return ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


@contextlib.contextmanager
def divert_logging(name: str, handler: logging.Handler) -> Iterator[None]:
    """While in the block, the records of logger ``name`` (python-can's ``can.io``, cantools)
    go to ``handler`` only: counted, kept or dropped by it, never printed by the root logger."""
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    level = logger.level
    if handler.level and handler.level < logger.getEffectiveLevel():
        logger.setLevel(handler.level)  # else the records the handler wants are never made
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        logger.setLevel(level)
