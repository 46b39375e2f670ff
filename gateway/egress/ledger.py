"""The audit ledger: an append-only, hash-chained record of everything released for egress and
everything blocked. Anyone holding the file can re-check it with ``gateway audit verify``.

One JSON object per line. ``hash = sha256(prev_hash + canonical JSON of the entry without
hash)``; the first entry's ``prev`` is 64 zeros. An entry is written (and fsynced) *before* the
message can reach the network, so every byte that ever left has its line here. Inside
``group()``, the lines are held and written with one write and one fsync when the group ends (a
group commit): the caller hands the messages to the outbox only after that. A write or fsync
that fails is cut off the file again and leaves the chain as it was, so the file never holds a
half-written group and the next line still chains to the last one on the disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import AuditError, StorageError, still_named

GENESIS = "0" * 64


def _canonical(entry: Mapping[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def entry_hash(prev: str, entry: Mapping[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(prev.encode() + _canonical(body)).hexdigest()


class Ledger:
    def __init__(self, path: str | Path, *, fsync: bool = True, clock: Any = time.time) -> None:
        self.path = Path(path)
        self._fsync = fsync
        self._clock = clock
        self.head = GENESIS
        self.count = 0
        self.max_seq = -1  # the highest sequence number recorded (see _tail_max_seq)
        self._depth = 0  # open group() blocks
        self._held: list[bytes] = []  # lines of the open group, written when it ends
        self._lost = False  # the last write failed (and was cut off): its messages must not leave
        self._broken = False  # a failed write could not be cut off: refuse to append more
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # unbuffered: a failed write never leaves bytes in a buffer to be flushed later
            self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115
        except OSError as exc:
            raise StorageError(
                f"{self.path}: cannot open the audit ledger: {exc.strerror}"
            ) from exc
        try:
            torn = self._lock_and_read_tail()
        except BaseException:  # the file (and its lock) is not held on to
            self._fh.close()
            raise
        if torn is not None:
            # a power cut mid-write leaves a line without its newline: that entry never
            # completed (and the message it describes never reached the outbox), so it is cut
            # off, and its bytes' hash is recorded so the cut itself is on the record
            self.append(
                "recovered", torn_bytes=len(torn), torn_sha256=hashlib.sha256(torn).hexdigest()
            )

    def _lock_and_read_tail(self) -> bytes | None:
        """Take the lock; cut off a torn last line (returned); continue the chain."""
        try:
            # one writer at a time: a second one would chain from the same head, and the
            # ledger would fail verification from there on. Held until close() (or exit)
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise StorageError(
                f"{self.path}: the audit ledger is in use by another gateway process; stop it "
                "first, or send the owner's command to the running gateway over MQTT"
            ) from exc
        try:
            torn = _truncate_torn_tail(self.path)
            if self.path.stat().st_size:
                last, before = _last_lines(self.path)
                try:
                    entry = json.loads(last)
                    self.head, self.count = entry["hash"], int(entry["i"]) + 1
                    self.max_seq = _tail_max_seq(self.path)
                    prev = json.loads(before) if before is not None else None
                except (ValueError, KeyError, TypeError, RecursionError) as exc:
                    raise StorageError(
                        f"{self.path}: the last ledger line is damaged; run "
                        f"`gateway audit verify {self.path}`"
                    ) from exc
                # the chain goes on from the last line: one that is not the chain's own (a
                # line appended by hand, {"i": 999, "hash": "x", ...}) was built on, and
                # the whole ledger failed verification from there on
                if not _continues(entry, last, prev):
                    raise StorageError(
                        f"{self.path}: the last ledger line does not continue the chain "
                        f"(changed, or added by something other than the gateway); run "
                        f"`gateway audit verify {self.path}`"
                    )
        except OSError as exc:
            raise StorageError(
                f"{self.path}: cannot open the audit ledger: {exc.strerror}"
            ) from exc
        return torn

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "i": self.count,
            "at": round(self._clock(), 6),
            "kind": kind,
            **fields,
            "prev": self.head,
        }
        entry["hash"] = entry_hash(self.head, entry)
        line = _canonical(entry) + b"\n"
        if self._depth:
            self._held.append(line)
        else:
            self._write(line)
        self.head = entry["hash"]
        self.count += 1
        self.max_seq = max(self.max_seq, _highest_seq(entry))
        return entry

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """Lines appended inside are written with one write and one fsync when the (outermost)
        block ends, even if it ends with an exception. If that fails, the file and the chain
        are as before the group, ``durable`` is False (none of its messages may leave) and
        ``StorageError`` is raised."""
        self._depth += 1
        if self._depth > 1:
            try:
                yield
            finally:
                self._depth -= 1
            return
        before = (self.head, self.count, self.max_seq)
        try:
            yield
        finally:
            self._depth = 0
            lines, self._held = self._held, []
            if lines:
                try:
                    self._write(b"".join(lines))
                except StorageError:
                    self.head, self.count, self.max_seq = before
                    raise

    @property
    def durable(self) -> bool:
        """Every line appended so far is on the disk: no group holds lines, and the last
        write did not fail."""
        return not self._held and not self._lost

    def _write(self, data: bytes) -> None:
        """Append ``data`` and fsync; on failure, cut the file back to its size before."""
        self._lost = True  # until the data is on the disk
        if self._broken:
            raise StorageError(
                f"{self.path}: an earlier write failed and could not be undone; run "
                f"`gateway audit verify {self.path}`"
            )
        fd = self._fh.fileno()
        try:
            held = os.fstat(fd)
        except OSError as exc:
            raise StorageError(
                f"{self.path}: cannot read the audit ledger: {exc.strerror}"
            ) from exc
        size = held.st_size
        self._check_named(fd, held)
        try:
            view = memoryview(data)
            while view:
                view = view[self._fh.write(view) :]
            if self._fsync:
                os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                self._broken = True
            raise StorageError(
                f"{self.path}: cannot append to the audit ledger: {exc.strerror}"
            ) from exc
        # and after: deleted between the check and the fsync, the lines are in no file anyone
        # can read, and the write counts as failed (their messages never reach the outbox)
        self._check_named(fd)
        self._lost = False

    def _check_named(self, fd: int, held: os.stat_result | None = None) -> None:
        """Raise ``StorageError`` if the ledger's path no longer names the file written to
        (deleted, or replaced): lines written there go to a file nobody can read, and what
        they describe must not leave."""
        try:
            named = still_named(self.path, fd, held)
        except OSError as exc:
            raise StorageError(
                f"{self.path}: cannot read the audit ledger: {exc.strerror}"
            ) from exc
        if not named:
            raise StorageError(
                f"{self.path}: the audit ledger was deleted or replaced while the gateway ran; "
                "nothing more is sent without its ledger line (put the file back, or start "
                "again with a new ledger)"
            )

    def close(self) -> None:
        self._fh.close()


def _truncate_torn_tail(path: Path) -> bytes | None:
    with open(path, "rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return None
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return None
        torn = next(_lines_backwards(fh, size))  # however long the torn line is
        keep = size - len(torn)
        if keep and not _is_entry(next(_lines_backwards(fh, keep - 1))):
            # not a torn last write after a good entry: a damaged ledger, left as it is for
            # the user to examine (its last line is refused next)
            return None
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
        return torn


def unfinished_egress(path: str | Path, from_seq: int) -> list[tuple[int, str]]:
    """(seq, sha256) of the summaries numbered ``from_seq`` or above that the last run
    released, if that run has no stop entry (it was killed, or lost power): read from the end
    back to its start entry. Empty if the last run ended properly."""
    out: list[tuple[int, str]] = []
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        for raw in _lines_backwards(fh, fh.tell()):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                return []
            kind = entry.get("kind") if isinstance(entry, dict) else None
            if kind == "stop":
                return []
            if kind == "start":
                break
            seq = entry.get("seq")
            if kind == "egress" and isinstance(seq, int) and seq >= from_seq:
                out.append((seq, str(entry.get("sha256"))))
    return out[::-1]


def egress_hashes(
    path: str | Path, seqs: set[int], unsequenced: set[str]
) -> tuple[dict[int, str], set[str]]:
    """The sha256 the ledger recorded for each of ``seqs``, and which of the ``unsequenced``
    hashes (retained messages carry no seq) it recorded: read from the end back until all are
    found, or back past the lowest of ``seqs`` once the unsequenced are found too (numbers only
    grow in a ledger). For the summaries waiting in an outbox: a handful, or none."""
    by_seq: dict[int, str] = {}
    found: set[str] = set()
    if not seqs and not unsequenced:
        return by_seq, found
    lowest = min(seqs, default=0)
    for entry in _entries_backwards(path, b'"egress"'):
        if entry.get("kind") != "egress":
            continue
        seq, sha = entry.get("seq"), str(entry.get("sha256"))
        if isinstance(seq, int):
            if seq in seqs:
                by_seq.setdefault(seq, sha)
            elif seq < lowest and found >= unsequenced:
                break
        elif sha in unsequenced:
            found.add(sha)
        if len(by_seq) == len(seqs) and found >= unsequenced:
            break
    return by_seq, found


def _is_entry(raw: bytes) -> bool:
    """Whether ``raw`` reads as a ledger entry (its hash is checked by ``audit verify``)."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return False
    return isinstance(entry, dict) and isinstance(entry.get("hash"), str) and "i" in entry


def _highest_seq(entry: Any) -> int:
    """The sequence number an entry gives out: an egress's ``seq``, or the last of the numbers
    an ``unrecorded`` entry names (so that the next start does not record them again); -1 for
    none. A ``dropped`` entry names numbers given out before it: not counted."""
    if not isinstance(entry, dict):
        return -1
    seq = entry.get("seq")
    if entry.get("kind") == "unrecorded" and isinstance(entry.get("seqs"), list):
        seq = max((q for q in entry["seqs"] if isinstance(q, int)), default=None)
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else -1


def _tail_max_seq(path: Path) -> int:
    """The highest ``seq`` in the ledger. Sequence numbers only grow in a ledger (the outbox
    numbers summaries from above the ledger's highest), so it is the newest entry that has one:
    read from the end, usually a line or two (parsing every line of the last MiB took ~20 ms at
    each start once the ledger had grown, and missed the seq behind a long run of entries
    without one). The outbox keeps its own counter, but if its disk failed the gateway numbered
    summaries in memory: starting again from the ledger's figure means a new summary never
    reuses a number the owner already saw (and would drop as a duplicate)."""
    for entry in _entries_backwards(path, b'"seq"', b'"unrecorded"'):  # not start, stop...
        seq = _highest_seq(entry)
        if seq >= 0:
            return seq
    return -1


def last_vin(path: str | Path) -> str | None:
    """The VIN of the last run that started in this ledger (its ``start`` entry), or None:
    read from the end, past that run's entries."""
    try:
        for entry in _entries_backwards(path, b'"kind":"start"'):
            vin = entry.get("vin")
            return vin if isinstance(vin, str) else None
    except OSError:
        return None
    return None


def last_stop(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The ``stop`` entry of the last run in this ledger (None: it has none, it was killed),
    and that run's ``start`` entry (None: no run)."""
    stop = None
    try:
        for entry in _entries_backwards(path, b'"kind":"start"', b'"kind":"stop"'):
            if entry.get("kind") == "start":
                return stop, entry
            if stop is None:
                stop = entry
    except OSError:
        return None, None
    return None, None


def _entries_backwards(path: str | Path, *needles: bytes) -> Iterator[dict[str, Any]]:
    """The entries of the ledger at ``path`` whose line holds one of ``needles``, last first
    (a line is parsed only then: most are passed over as bytes); a line that is not a JSON
    object is passed over."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        for raw in _lines_backwards(fh, fh.tell()):
            if not any(n in raw for n in needles):
                continue
            try:
                entry = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if isinstance(entry, dict):
                yield entry


def _lines_backwards(fh: Any, size: int, block: int = 1 << 16) -> Iterator[bytes]:
    """The lines of the first ``size`` bytes of ``fh``, last first, read a block at a time (a
    line may be longer than any block: a ``dropped`` entry lists every dropped message)."""
    pos, head = size, b""
    while pos > 0:
        lo = max(pos - block, 0)
        fh.seek(lo)
        lines = (fh.read(pos - lo) + head).split(b"\n")
        head = lines[0]  # the start of a line that began in an earlier block
        yield from reversed(lines[1:])
        pos = lo
    yield head


def _torn_at_end(path: str | Path, raw: str) -> bool:
    """Whether ``raw``, a line that is no entry, is the ledger's last line, without the newline
    every written line ends with: what ``Ledger`` cuts off as torn."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - len(raw.encode("ascii", "replace")) - 1))
            tail = fh.read()
    except OSError:
        return False
    return bool(tail) and not tail.endswith(b"\n") and tail.endswith(raw.encode("ascii", "replace"))


def _last_lines(path: Path) -> tuple[str, str | None]:
    """The last line of a ledger that ends with a newline (``_truncate_torn_tail`` saw to it),
    whatever its length, and the one before it (None if there is none)."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        lines = _lines_backwards(fh, size - 1) if size else iter([b""])
        last = next(lines)
        before = next(lines, None)
    return last.decode("ascii", "replace"), None if before is None else before.decode(
        "ascii", "replace"
    )


def _continues(entry: Any, raw: str, prev: Any) -> bool:
    """Whether ``entry`` (read from the line ``raw``) is a ledger line that follows ``prev``
    (the entry before it; None: it is the first): its number, its link and its own hash, in
    the canonical form the gateway writes."""
    if not isinstance(entry, dict) or (prev is not None and not isinstance(prev, dict)):
        return False
    head, number = (GENESIS, 0) if prev is None else (prev.get("hash"), prev.get("i"))
    if prev is not None and not isinstance(number, int):
        return False
    return (
        entry.get("prev") == head
        and entry.get("i") == (0 if prev is None else number + 1)
        and entry.get("hash") == entry_hash(head, entry)
        and _canonical(entry).decode() == raw
    )


def read_entries(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line number, parsed entry or None, raw line)."""
    try:
        # newline="": a line's "\r" is kept, and fails the canonical form (a ledger whose
        # line ends were turned into CRLF verified as unchanged)
        fh = open(path, encoding="ascii", errors="replace", newline="")  # noqa: SIM115
    except OSError as exc:
        raise AuditError(f"{path}: cannot read the ledger: {exc.strerror}") from exc
    with fh:
        for n, line in enumerate(fh, start=1):
            raw = line.rstrip("\n")
            try:
                entry = json.loads(raw)
                yield n, entry if isinstance(entry, dict) else None, raw
            except (ValueError, RecursionError):  # nested too deep for json: no entry either
                yield n, None, raw


@dataclass
class ChainReport:
    """The result of walking a ledger's hash chain."""

    entries: int
    head: str
    kinds: dict[str, int]


def verify_chain(path: str | Path) -> ChainReport:
    """Raise ``AuditError`` naming the first bad line: changed, removed, inserted or reordered."""
    prev = GENESIS
    kinds: dict[str, int] = {}
    n_entries = 0
    for n, entry, raw in read_entries(path):
        if entry is None:
            if _torn_at_end(path, raw):
                raise AuditError(
                    f"{path}:{n}: the last line was cut short (a write a crash or power cut "
                    "interrupted); the gateway cuts it off, and records the cut, when it next "
                    f"opens the ledger; the {n - 1} line(s) before it are as written"
                )
            raise AuditError(f"{path}:{n}: not a ledger entry (damaged line: {raw[:60]!r})")
        if entry.get("i") != n_entries:
            raise AuditError(
                f"{path}:{n}: entry number {entry.get('i')!r} where {n_entries} was "
                "expected (a line was removed, inserted or reordered)"
            )
        if entry.get("prev") != prev:
            raise AuditError(
                f"{path}:{n}: does not chain to the line before it (a line was "
                "removed, inserted or reordered)"
            )
        if entry.get("hash") != entry_hash(prev, entry):
            raise AuditError(f"{path}:{n}: content does not match its hash (the line was changed)")
        if _canonical(entry).decode() != raw:
            raise AuditError(f"{path}:{n}: not in canonical form (the line was changed)")
        prev = entry["hash"]
        kinds[str(entry.get("kind"))] = kinds.get(str(entry.get("kind")), 0) + 1
        n_entries += 1
    return ChainReport(n_entries, prev, kinds)
