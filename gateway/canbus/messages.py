"""What the python-can reader paths share: the lines a reader pulled, channel names, and what
every message must satisfy before it becomes a frame of a batch."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
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


# characters no text log holds (26, cp/m's end of file, is left to the readers)
_CONTROL = [chr(c) for c in (*range(1, 9), *range(14, 26), *range(27, 32), 127)]


def looks_binary(head: bytes) -> bool:
    """Whether the first bytes of a file are binary data, not text: a third of them control
    characters or no UTF-8 (random bytes: ~60 %, a BLF more). NUL bytes are left out: a power
    cut leaves whole blocks of them at a text log's end, and such a log, or one damaged here
    and there (a cp1252 comment), stays a text log, read line by line."""
    text = head.replace(b"\x00", b"").decode("utf-8", "replace")
    if not text:
        return False  # nothing but NULs: the readers say there is no frame in it
    odd = text.count("\ufffd") + sum(map(text.count, _CONTROL))
    return odd * 3 > len(text)


class CountingLines:
    """A text file proxy that counts the lines python-can's reader pulled, so a parse error can
    be pinned to its line, and that lets a restarted reader resume right after it."""

    def __init__(self, fh: Any, *, skip_blank: bool = False) -> None:
        self._fh = fh
        self._skip_blank = skip_blank  # lines of white space never reach the reader
        self.line_no = 0
        self.chars = 0
        self.nonblank = 0  # lines with more than white space
        self.pushback: list[str] = []
        self.last = ""  # the last line pulled from the file
        # shown every line pulled from the file, with its number (an ASC body's, for lines its
        # reader would skip in silence)
        self.watch: Callable[[str, int], None] | None = None

    def __iter__(self) -> CountingLines:
        return self

    def __next__(self) -> str:
        if self.pushback:
            return self.pushback.pop()
        while True:
            line = next(self._fh)
            _LAST.lines = self
            self.last = line
            self.line_no += 1
            self.chars += len(line)
            if not line.isspace():
                self.nonblank += 1
            elif self._skip_blank:
                continue
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
    go to ``handler`` only: counted, kept or dropped by it, never printed by the root logger.
    Blocks may overlap (two logs read side by side): the logger propagates again once the last
    one has ended, whatever the order they end in."""
    logger = logging.getLogger(name)
    with _DIVERTED_LOCK:
        if _DIVERTED.get(name, 0) == 0:
            _PROPAGATE[name] = logger.propagate
            logger.propagate = False
        _DIVERTED[name] = _DIVERTED.get(name, 0) + 1
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        with _DIVERTED_LOCK:
            _DIVERTED[name] -= 1
            if _DIVERTED[name] == 0:
                logger.propagate = _PROPAGATE.pop(name)


# blocks of divert_logging running, and the propagation they found, per logger
_DIVERTED: dict[str, int] = {}
_PROPAGATE: dict[str, bool] = {}
_DIVERTED_LOCK = threading.Lock()
# the CountingLines a thread read its last line from: a reader's warning is about that line
_LAST = threading.local()


def last_lines() -> CountingLines | None:
    """The ``CountingLines`` this thread read its last line from (a python-can reader logs a
    line it cannot parse right after reading it: the warning belongs to that file)."""
    return getattr(_LAST, "lines", None)
