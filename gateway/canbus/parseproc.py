"""Parsing a candump log in a process of its own, beside the pipeline.

In one process the parse thread and the pipeline take turns on the interpreter lock: timed on
the 2-core VM of ``docs/benchmarks.md``, a replay with a parse thread used one core, and was no
faster than parsing inline. A forked child reads the log in blocks of complete lines, parses
them with its own interpreter and sends each through a pipe (its columns as raw buffers,
pickle protocol 5 with out-of-band data), so parsing and the pipeline run on two cores.

The gateway does what must follow the blocks in file order (``candump._Assembly``): it numbers
bad lines in the file and channels in order of appearance, and cuts the chunks. So the child
can leave a block to the gateway: when the gateway has read all that was sent (nothing in the
pipe, nothing held), it sends the next block as it is, and the gateway parses that one while
the child parses the one after. A replay whose pipeline is quicker than the parse (a
2M-frame Kona log: the gateway waited on the pipe for 165-215 ms of ~0.25 s of batches) then
parses on both cores; one bound by the pipeline leaves nearly every block to the child. The
chunks, counts and bad lines are the same whoever parsed which block.

The child is forked from the gateway itself (nothing to import, a few ms), runs only numpy and
plain writes, and is bounded by the pipe: it parses ahead by at most a block or two, so memory
stays bounded and a paced (real-time) replay does not read the file ahead. Each message
carries the bytes of the file read so far, for progress. If the gateway goes away, the
child's next write fails and it exits; if the reading stops early, the gateway ends it. Stop
signals are the gateway's: the child ignores SIGINT and SIGTERM (``timeout`` and systemd
signal the whole process group), and ends with the reading. Only a regular file is parsed so
(a child blocked reading a pipe would not see the gateway go); where no child can be forked,
the parse runs in threads here. Linux only (fork is unsafe on macOS with its frameworks
loaded; Windows has none).

A fast replay of a candump log starts its child early (``start_early``, from the command line
before the pipeline is imported and built, ~0.1 s): that child parses up to
``HEAD_START_BYTES`` (8 MiB) ahead of the gateway's reads, in its own memory, and parses on
whenever it holds less. (It used to parse no further from the gateway's first read on until
the gateway had read all it held: a million-frame Model 3 replay, which the child's pace
bounds, lost ~40 ms so.) The replay takes the child over when it reaches the same file,
unchanged, with the same blocks; one nobody took is ended when the command ends, or before
a DBC is compiled in a child (three processes at once took 99 MB on a DBC's first replay).
Timed against the late start in ``docs/benchmarks.md`` (stops 15 and 18).

Memory: after blocks 1, 2, 4, 8, ..., when a head start first fills, and at the end, the
child adds its private memory (what it does not share with the gateway) to the gateway's
resident memory of that moment, and reports the highest sum, plus the pipe's buffer
(``peak_combined_kb``); the benchmarks take the higher of that and the gateway's own peak.
Polled from outside every millisecond, the true combined peak of a 2M-frame replay was 0.6-1.3
MB higher (the arrays of a block being parsed, between two samples).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import os
import pickle
import select
import signal
import stat
import struct
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gateway.records import FrameBatch, ReadStats

log = logging.getLogger(__name__)

_HEAD = struct.Struct("<QQ")  # bytes of the pickled message, number of raw buffers
_PIPE_BYTES = 1 << 20  # the pipe's capacity, asked for (Linux caps it for non-root users)
_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032
# what a child started early (``start_early``) may parse ahead of the gateway's reads, in its
# own memory. The child fills it before the gateway reads (~0.1 s of imports and set-up, time
# for ~600k frames of parsing) and then waits; with 4 MiB it was behind the gateway from the
# first read to the last. 8 MiB (~310k frames) against 4, old and new in paired rounds: a
# 1M-frame Model 3 replay -32 ms (faster in 25 of 30), a 2M-frame Kona one -59 ms (18 of 20);
# peak memory 3-5 MB more in the benchmarks. 12 MiB was no faster than 8, and 5-7 MB more
# (docs/benchmarks.md, stop 17). Those were timed when the child stopped parsing from the
# gateway's first read until all it held was read (stop 18 lets it parse on); not again since
HEAD_START_BYTES = 8 << 20

# the highest memory (kB) the gateway and a parse child that ended took together: for the
# benchmarks' memory figures, which must count both processes
peak_combined_kb = 0
_live: set[int] = set()  # parse children running now
_ended_cpu = 0.0  # CPU seconds of the parse children that ended
# children started early, not yet taken by a replay: (file, block size) -> (pid, read end)
_early: dict[tuple[Any, ...], tuple[int, int]] = {}


def available() -> bool:
    """Whether parsing can run in a child here: Linux, with a second core for it (CPU affinity
    and a cgroup's CPU quota both allowing two)."""
    if sys.platform != "linux" or not hasattr(os, "fork"):
        return False
    try:
        if len(os.sched_getaffinity(0)) < 2:
            return False
    except (AttributeError, OSError):
        return False
    try:  # cgroup v2: "max 100000", or "<quota> <period>" in microseconds
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return True
    return quota == "max" or int(quota) >= 2 * int(period)


def usable(path: Path) -> bool:
    """A regular file: a pipe or a device could leave the child blocked on a read, where the
    end of the gateway does not reach it."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def cpu_seconds() -> float:
    """CPU time of this gateway's parse processes, running and ended (for its health)."""
    total = _ended_cpu
    for pid in list(_live):
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def private_mb() -> float:
    """The memory of this gateway's running parse processes that they do not share with it."""
    return sum(_private_kb(pid) for pid in list(_live)) / 1024


def _early_key(path: Path, block_bytes: int) -> Any:
    st = path.stat()  # the same file, unchanged since the child started on it
    return (
        str(path),
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        block_bytes,
    )


def start_early(path: Path, *, block_bytes: int) -> bool:
    """Fork the parse child of ``path`` now, while the gateway is still starting (importing
    its pipeline, loading DBCs, connecting), instead of when the replay reads the file: the
    child parses up to ``HEAD_START_BYTES`` ahead of the gateway's reads, in its own memory.
    ``iter_candump_forked`` with the same file and block size takes it over, in any chunking
    (the replay cuts the chunks); ``drop_early`` ends one no replay took. False where no child
    can parse it (then nothing was started)."""
    if os.environ.get("GATEWAY_PARSE_PROCESS", "1") == "0" or not available() or not usable(path):
        return False
    try:
        key = _early_key(path, block_bytes)
    except OSError:
        return False
    if key in _early:
        return True
    from gateway.canbus import candump  # noqa: F401 - the child's parser, imported once here

    forked = _fork(_PIPE_BYTES)
    if forked is None:
        return False
    pid, r, w = forked
    if pid == 0:  # the child: never returns
        _child(w, path, block_bytes, head_start=HEAD_START_BYTES)
    _live.add(pid)
    _early[key] = (pid, r)
    log.debug("%s: parsing started early, in process %d", path, pid)
    return True


def _take_early(path: Path, block_bytes: int) -> tuple[int, int] | None:
    if not _early:
        return None
    try:
        key = _early_key(path, block_bytes)
    except OSError:
        return None
    return _early.pop(key, None)


def drop_early() -> None:
    """End the children started early that no replay took (the command failed first)."""
    while _early:
        key, (pid, r) = _early.popitem()
        log.debug("%s: the parse started early (process %d) is ended", key[0], pid)
        with contextlib.suppress(OSError):
            os.close(r)
        _end(pid, kill=True)


def _end(pid: int, *, kill: bool) -> None:
    """Reap a parse child (killed first if ``kill``), its CPU time counted."""
    global _ended_cpu
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        _, _, usage = os.wait4(pid, 0)
        _ended_cpu += usage.ru_utime + usage.ru_stime
    _live.discard(pid)


def iter_candump_forked(
    path: Path,
    stats: ReadStats,
    *,
    chunk_frames: int,
    max_chunk_seconds: float,
    block_bytes: int,
) -> Iterator[FrameBatch]:
    """``iter_candump(path)``'s chunks, parsed by a forked child (and by this process, the
    blocks the child leaves to it). ``stats`` is counted as the chunks come. An error the child
    meets is raised here, as the same exception, after the chunks completed before it."""
    global peak_combined_kb, _ended_cpu
    early = _take_early(path, block_bytes)
    if early:
        log.debug("%s: the replay takes over the parse started early (process %d)", path, early[0])
    drop_early()  # one started on a file that changed since: of no use, holding memory
    forked = (*early, -1) if early else _fork(_PIPE_BYTES)  # a larger pipe: fewer wake-ups
    if forked is None:  # no memory or processes left for a child: parse here, in threads
        from gateway.canbus.candump import iter_candump, parse_threads

        yield from iter_candump(
            path,
            stats,
            chunk_frames=chunk_frames,
            max_chunk_seconds=max_chunk_seconds,
            block_bytes=block_bytes,
            workers=parse_threads(),
        )
        return
    pid, r, w = forked
    if pid == 0:  # the child: never returns
        _child(w, path, block_bytes)
    _live.add(pid)
    from gateway.canbus.candump import _Assembly, parse_block

    assembly = _Assembly(stats, chunk_frames, max_chunk_seconds)
    blocks = here = 0  # blocks of the log, and those parsed in this process
    done = reaped = False
    try:
        with open(r, "rb", buffering=0) as src:
            while True:
                try:
                    kind, read, payload = _receive(src)
                except _Gone:  # reaped here, and never signalled again: its pid may be reused
                    _, status, usage = os.wait4(pid, 0)
                    reaped = True
                    _ended_cpu += usage.ru_utime + usage.ru_stime
                    raise RuntimeError(
                        f"the candump parse process ended unexpectedly ({_how(status)})"
                    ) from None
                stats.bytes_read = read
                if kind == "block":  # parsed by the child
                    blocks += 1
                    yield from assembly.feed(*payload)
                elif kind == "raw":  # left to this process: it had read all the child sent
                    blocks, here = blocks + 1, here + 1
                    buf, skipped = payload
                    yield from assembly.feed(parse_block(buf), skipped)
                elif kind == "end":
                    peak_combined_kb = max(peak_combined_kb, int(payload))
                    done = True
                    log.debug(
                        "%s: %d of %d blocks parsed by the gateway, the rest by process %d",
                        path,
                        here,
                        blocks,
                        pid,
                    )
                    yield from assembly.finish()
                    return
                else:  # "error": what the parse raised, raised here
                    done = True
                    raise payload
    finally:
        if not reaped:
            _end(pid, kill=not done)
        _live.discard(pid)


def in_child(fn: Callable[..., Any], *args: Any, timeout: float = 300.0) -> Any:
    """``fn(*args)`` in a forked child, its result (pickled) returned here; None if it failed,
    or gave no answer within ``timeout`` seconds (then it is killed). Nothing the child logs
    is printed (its root logger's handlers are replaced; a handler ``fn`` puts on a logger of
    its own still gets the records), and its memory, with the gateway's, counts in
    ``peak_combined_kb`` (one sample, when ``fn`` has returned). A stop signal ends the child
    at once: a killed child only means the caller does the work. Linux only (None elsewhere)."""
    global peak_combined_kb
    # a parse child started early ends first (its replay forks another when it reaches the
    # log): three processes at once took 99 MB on a DBC's first replay, 77 MB without it
    drop_early()
    forked = _fork(on_stop=signal.SIG_DFL) if sys.platform == "linux" else None
    if forked is None:
        return None
    pid, r, w = forked
    if pid == 0:
        code = 1
        try:
            gc.freeze()  # the gateway's objects: not ours to walk (nor to copy by touching)
            logging.root.handlers[:] = [logging.NullHandler()]
            result = fn(*args)
            with open(w, "wb", buffering=0) as out:
                _send(out, "result", 0, (result, _combined_kb()))
            code = 0
        finally:
            os._exit(code)
    done = False
    try:
        with open(r, "rb", buffering=0) as src:
            if not select.select([src], [], [], timeout)[0]:
                return None  # no answer in time (a deadlock?): killed below
            _, _, (result, combined) = _receive(src)
        done = True
    except (_Gone, Exception):  # noqa: BLE001 - the child failed: the caller does it itself
        return None
    finally:
        if not done:  # failed, or interrupted here (Ctrl-C): the child's work is of no use
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    peak_combined_kb = max(peak_combined_kb, int(combined))
    return result


_STOPS = frozenset({signal.SIGINT, signal.SIGTERM})


def _fork(
    pipe_bytes: int | None = None, on_stop: Any = signal.SIG_IGN
) -> tuple[int, int, int] | None:
    """A child and a pipe from it to here: (pid, read end, write end), pid 0 in the child.
    Each side has closed the end it does not use. None where no child can be made (the pipe
    closed again), or where there is no fork.

    The child handles SIGINT and SIGTERM with ``on_stop`` (ignored: a parse child ends with
    the gateway's reading; ``SIG_DFL``: ends at once), set before any can reach it: the stop
    signals are blocked across the fork. A signal that reached a child just forked, before it
    let go of the gateway's handlers, was written to the gateway's asyncio wake-up socket,
    which the child shares: the gateway took ``timeout``'s one SIGTERM to its process group
    for two, and the second ends the wait to drain."""
    if not hasattr(os, "fork"):
        return None
    r, w = os.pipe()
    if pipe_bytes is not None:
        with contextlib.suppress(OSError):
            import fcntl

            fcntl.fcntl(w, _F_SETPIPE_SZ, pipe_bytes)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        with warnings.catch_warnings():
            # Python 3.12+ warns on a fork beside other threads (asyncio's executor here): a
            # child touches nothing of theirs, only numpy, its own files and the pipe
            warnings.filterwarnings("ignore", ".*multi-threaded.*fork", DeprecationWarning)
            pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(r)
        os.close(w)
        return None
    if pid == 0:  # the gateway's wake-up socket and handlers go, then signals may come
        with contextlib.suppress(ValueError):  # (not the main thread: nothing was set)
            signal.set_wakeup_fd(-1)
            for sig in _STOPS:
                signal.signal(sig, on_stop)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one pending here is handled now
    os.close(r if pid == 0 else w)
    return pid, r, w


def _child(w: int, path: Path, block_bytes: int, head_start: int = 0) -> None:
    """The parse process: reads ``path`` in blocks of complete lines and sends each, in file
    order, parsed ("block") or, when the gateway has read all that was sent and waits, as it
    is ("raw", for the gateway to parse while this one parses the next). The gateway numbers
    the lines and channels and cuts the chunks (``candump._Assembly``), so the chunks are the
    same whoever parsed which block."""
    code = 0
    try:
        # (a stop signal is the gateway's to handle, a Ctrl-C or `timeout` and systemd sending
        # theirs to the whole process group: ignored here since the fork, see _fork)
        gc.disable()  # the gateway's objects are not ours to collect (nor to copy by touching)
        from gateway.canbus.candump import _blocks, parse_block

        stats = ReadStats()
        peak = 0
        ahead = _HeadStart(w, head_start) if head_start > 0 else None
        full = False  # the head start was full once
        with open(w, "wb", buffering=0) as out, open(path, "rb") as fh:
            try:
                for k, (buf, skipped) in enumerate(_blocks(fh, stats, block_bytes)):
                    if k & (k + 1) == 0:  # after blocks 1, 2, 4, 8, ...: reading it costs 1 ms
                        peak = max(peak, _combined_kb())
                    if _waiting(w, ahead):
                        parts = _parts("raw", stats.bytes_read, (buf, skipped))
                    else:
                        parts = _parts("block", stats.bytes_read, (parse_block(buf), skipped))
                    if ahead is not None:
                        if ahead.hold(parts) and not full:
                            peak = max(peak, _combined_kb())  # about the most it holds
                            full = True
                        continue
                    _write_all(out, parts)
                if ahead is not None:
                    if not full:  # the whole file fitted in the head start
                        peak = max(peak, _combined_kb())
                    ahead.flush()
                peak = max(peak, _combined_kb())
                _send(out, "end", stats.bytes_read, peak + _PIPE_BYTES // 1024)
            except BrokenPipeError:
                pass  # the gateway stopped reading
            except BaseException as exc:  # noqa: BLE001 - sent to the gateway, raised there
                with contextlib.suppress(BaseException):
                    if ahead is not None:  # the blocks before the error go first
                        ahead.flush()
                    _send(out, "error", stats.bytes_read, _portable(exc))
                code = 1
    finally:
        os._exit(code)


def _waiting(w: int, ahead: _HeadStart | None) -> bool:
    """Whether the gateway has read all that was sent (nothing in the pipe, nothing held):
    then it waits, or soon will, and parses the next block itself."""
    if ahead is not None and (ahead.views or not ahead.reading):
        return False
    try:
        return _in_pipe(w) == 0
    except OSError:
        return False


def _in_pipe(fd: int) -> int:
    import fcntl
    import termios

    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives the pipe (pickled and rebuilt), else a RuntimeError saying it."""
    try:
        back = pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any exception at all may come here
        back = None
    if isinstance(back, BaseException):
        return exc
    return RuntimeError(f"candump parse process: {type(exc).__name__}: {exc}")


def _combined_kb() -> int:
    """The gateway's resident memory now and this child's own, in kB."""
    rss = 0
    try:
        with open(f"/proc/{os.getppid()}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
                    break
    except OSError:
        pass
    return rss + _private_kb()


def _private_kb(pid: int | str = "self") -> int:
    """A process's pages that are its own (not shared with the gateway), in kB."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                    total += int(line.split()[1])
    except OSError:
        return 0
    return total


def _parts(kind: str, read: int, payload: Any) -> list[memoryview]:
    """One message for the pipe, as byte views: its head, the pickle (with the bytes of the
    file read so far) and the payload's arrays, not copied."""
    buffers: list[pickle.PickleBuffer] = []
    meta = pickle.dumps((kind, read, payload), protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    parts: list[Any] = [
        _HEAD.pack(len(meta), len(raws)),
        struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws)),
        meta,
        *raws,
    ]
    return [memoryview(part).cast("B") for part in parts]


def _send(out: Any, kind: str, read: int, payload: Any) -> None:
    _write_all(out, _parts(kind, read, payload))


def _write_all(out: Any, parts: list[memoryview]) -> None:
    for view in parts:
        while view:
            view = view[out.write(view) :]


class _HeadStart:
    """A child started early parses ahead of the gateway, holding in its own memory what the
    pipe cannot take, up to ``budget`` bytes: it parses on while it holds less, and waits for
    the gateway to read once it holds that much (``hold`` says so). A message larger than the
    pipe cannot reach the gateway by writes that do not wait (the gateway needs all of it
    before it can read more): from the gateway's first read on, such a message is sent at
    once, waiting for the gateway to read it, with what is held before it. ``flush`` sends
    the rest at the end."""

    def __init__(self, fd: int, budget: int) -> None:
        self.fd, self.budget = fd, budget
        self.views: collections.deque[memoryview] = collections.deque()
        self.held = 0
        self.pipe = _pipe_size(fd)
        self.was_full = False  # a write found the pipe full
        self.reading = False  # and a later one went through: the gateway reads
        os.set_blocking(fd, False)

    def hold(self, parts: list[memoryview]) -> bool:
        """Queue one message and write what the pipe takes; while ``budget`` bytes or more
        are held, wait for the pipe to take some. True: the budget was reached."""
        size = 0
        for view in parts:
            if view.nbytes:
                self.views.append(view)
                size += view.nbytes
        self.held += size
        full = self.held >= self.budget
        self._write()
        if self.reading and size > self.pipe:
            self._send_until(0)
        elif self.held >= self.budget:
            # blocking writes of what is held first, until it holds less: waiting in select
            # for room in the pipe instead woke the child for each page the gateway read (a
            # 2M-frame Kona replay +11 ms in paired rounds with it, -9 ms with this)
            self._send_until(self.budget - 1)
        return full

    def _write(self) -> None:
        """Write what the pipe takes now."""
        while self.views:
            view = self.views[0]
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                self.was_full = True
                return
            self.reading = self.reading or self.was_full
            self.held -= n
            if n == view.nbytes:
                self.views.popleft()
            else:
                self.views[0] = view[n:]

    def _send_until(self, most: int) -> None:
        """Blocking writes of what is held, oldest first, until it holds at most ``most``
        bytes (each write returns as the gateway reads)."""
        os.set_blocking(self.fd, True)
        while self.held > most:
            view = self.views.popleft()
            while view:
                n = os.write(self.fd, view)
                self.held -= n
                view = view[n:]
            self.reading = True
        os.set_blocking(self.fd, False)

    def flush(self) -> None:
        """Send all that is held; the pipe stays blocking for the messages after it."""
        self._send_until(0)
        os.set_blocking(self.fd, True)


def _pipe_size(fd: int) -> int:
    """What the pipe of ``fd`` holds (Linux: F_GETPIPE_SZ), 64 KiB where that is not known."""
    with contextlib.suppress(OSError, ImportError):
        import fcntl

        return int(fcntl.fcntl(fd, _F_GETPIPE_SZ))
    return 1 << 16


class _Gone(Exception):
    """The child closed the pipe before its last message."""


def _receive(src: Any) -> tuple[str, int, Any]:
    size, n = _HEAD.unpack(_exactly(src, _HEAD.size))
    sizes = struct.unpack(f"<{n}Q", _exactly(src, 8 * n))
    meta = _exactly(src, size)
    buffers = [_exactly(src, s) for s in sizes]
    kind, read, payload = pickle.loads(meta, buffers=buffers)
    return kind, read, payload


def _exactly(src: Any, n: int) -> Any:
    """``n`` bytes from the pipe, into a buffer of their own (writable, not zeroed first: numpy
    arrays are made on it). The child gone before the end is an error, not an empty log."""
    buf = np.empty(n, np.uint8)
    view = buf.data
    got = 0
    while got < n:
        k = src.readinto(view[got:])
        if not k:
            raise _Gone
        got += k
    return buf


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
