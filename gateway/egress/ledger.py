"""The audit ledger: an append-only, hash-chained record of everything released for egress and
everything blocked. Anyone holding the file can re-check it with ``gateway audit verify``.

One JSON object per line. ``hash = sha256(prev_hash + canonical JSON of the entry without
hash)``; the first entry's ``prev`` is 64 zeros. An entry is written (and fsynced) *before* the
message can reach the network, so every byte that ever left has its line here. Inside
``group()``, the lines are written at once and fsynced together when the group ends (a group
commit): the caller hands the messages to the outbox only after that.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import AuditError, StorageError

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
        self._unsynced = 0  # lines written by a group and not yet fsynced
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = _truncate_torn_tail(self.path) if self.path.exists() else None
            if self.path.exists() and self.path.stat().st_size:
                last = _last_line(self.path)
                try:
                    entry = json.loads(last)
                    self.head, self.count = entry["hash"], int(entry["i"]) + 1
                    self.max_seq = _tail_max_seq(self.path)
                except (ValueError, KeyError, TypeError) as exc:
                    raise StorageError(
                        f"{self.path}: the last ledger line is damaged; run "
                        f"`gateway audit verify {self.path}`"
                    ) from exc
            self._fh = open(self.path, "a", encoding="ascii")  # noqa: SIM115
        except OSError as exc:
            raise StorageError(
                f"{self.path}: cannot open the audit ledger: {exc.strerror}"
            ) from exc
        if torn is not None:
            # a power cut mid-write leaves a line without its newline: that entry never
            # completed (and the message it describes never reached the outbox), so it is cut
            # off, and its bytes' hash is recorded so the cut itself is on the record
            self.append(
                "recovered", torn_bytes=len(torn), torn_sha256=hashlib.sha256(torn).hexdigest()
            )

    def append(self, kind: str, **fields: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "i": self.count,
            "at": round(self._clock(), 6),
            "kind": kind,
            **fields,
            "prev": self.head,
        }
        entry["hash"] = entry_hash(self.head, entry)
        line = _canonical(entry).decode() + "\n"
        try:
            self._fh.write(line)
            if self._depth:
                self._unsynced += 1
            else:
                self._sync()
        except OSError as exc:
            raise StorageError(
                f"{self.path}: cannot append to the audit ledger: {exc.strerror}"
            ) from exc
        self.head = entry["hash"]
        self.count += 1
        seq = fields.get("seq")
        if isinstance(seq, int) and seq > self.max_seq:
            self.max_seq = seq
        return entry

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """Lines appended inside are flushed and fsynced once, when the (outermost) block ends,
        even if it ends with an exception. ``durable`` says whether that sync succeeded; a
        failed sync raises ``StorageError``."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._unsynced:
                try:
                    self._sync()
                except OSError as exc:
                    raise StorageError(
                        f"{self.path}: cannot append to the audit ledger: {exc.strerror}"
                    ) from exc

    @property
    def durable(self) -> bool:
        """Every line appended so far is on the disk (no group holds unsynced lines)."""
        return self._unsynced == 0

    def _sync(self) -> None:
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())
        self._unsynced = 0

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
        block = min(size, 1 << 20)
        fh.seek(size - block)
        tail = fh.read()
        cut = tail.rfind(b"\n")
        keep = size - block + cut + 1 if cut >= 0 else 0
        fh.seek(keep)
        torn = fh.read()
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
        return torn


def _tail_max_seq(path: Path, block: int = 1 << 20) -> int:
    """The highest ``seq`` in the ledger's last MiB (sequence numbers only grow, so the newest
    entries hold it). The outbox keeps its own counter, but if its disk failed the gateway
    numbered summaries in memory: starting again from the ledger's figure means a new summary
    never reuses a number the owner already saw (and would drop as a duplicate)."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(size - block, 0))
        tail = fh.read()
    best = -1
    for raw in tail.splitlines()[1:] if size > block else tail.splitlines():
        try:
            seq = json.loads(raw).get("seq")
        except (ValueError, AttributeError):
            continue
        if isinstance(seq, int) and seq > best:
            best = seq
    return best


def _last_line(path: Path) -> str:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        block = min(size, 65536)
        fh.seek(size - block)
        lines = fh.read().splitlines()
    return lines[-1].decode("ascii", "replace") if lines else ""


def read_entries(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line number, parsed entry or None, raw line)."""
    try:
        fh = open(path, encoding="ascii", errors="replace")  # noqa: SIM115
    except OSError as exc:
        raise AuditError(f"{path}: cannot read the ledger: {exc.strerror}") from exc
    with fh:
        for n, line in enumerate(fh, start=1):
            raw = line.rstrip("\n")
            try:
                entry = json.loads(raw)
                yield n, entry if isinstance(entry, dict) else None, raw
            except ValueError:
                yield n, None, raw


@dataclass
class ChainReport:
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
