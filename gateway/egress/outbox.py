"""The durable outbox: released messages wait here until the broker acknowledged them.

SQLite in WAL mode with ``synchronous=FULL``: a message is committed before the publisher may
send it and deleted only after its PUBACK, so neither a broker outage nor a power cut loses a
summary (a crash between PUBACK and delete re-sends it; the owner drops it by ``seq``).

Bounds and the overflow rule: at most ``max_messages`` wait, none older than ``max_age_s``.
When full, the OLDEST waiting messages are dropped first (an owner gains more from the latest
state than from a stale one), and every drop is reported through ``on_drop`` (the app writes
it to the audit ledger). If the disk is full or read-only, messages are kept in memory up to
``memory_limit`` and the outbox reports itself ``degraded``; the CAN path carries on.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.egress.guard import Released
from gateway.errors import StorageError, still_named

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER, topic TEXT NOT NULL, payload BLOB NOT NULL, retain INTEGER NOT NULL,
    schema TEXT NOT NULL, created REAL NOT NULL, categories TEXT);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS outbox_retained ON outbox (retain, id);
"""


@dataclass(frozen=True)
class Pending:
    """A message waiting in the outbox to be sent."""

    key: tuple[str, int]  # ("db", rowid) or ("mem", n)
    seq: int | None
    topic: str
    payload: bytes
    retain: bool
    schema: str
    created: float
    # the categories of its data, space-separated (``Released.categories``); None for a row
    # an older version wrote, which did not keep them
    categories: str | None = None
    # why its row is not one the gateway wrote (a topic that is not UTF-8, a seq that is no
    # number: the file was changed), or None. Such a message is never sent (``unchanged``)
    damaged: str | None = None


# a row of the outbox as ``_pending`` reads it
_ROW = "id, seq, topic, payload, retain, schema, created, categories"


def _pending(r: tuple, key: tuple[str, int] | None = None) -> Pending:  # type: ignore[type-arg]
    """A row as read (its text as bytes: ``text_factory``), checked: a value of a type the outbox
    never writes, or text that is not UTF-8, makes it ``damaged``, not an error. Python's
    sqlite3 raised OperationalError for one such value, taken for a failing disk: the whole
    outbox went unread, none of it sent, and nothing said."""
    n, seq, topic, payload, retain, schema, created, categories = r
    bad: list[str] = []

    def text(name: str, value: object) -> str:
        if isinstance(value, bytes):
            try:
                return value.decode()
            except UnicodeDecodeError:
                bad.append(f"its {name} is not UTF-8 text")
                return value.decode(errors="replace")
        bad.append(f"its {name} is not text ({value!r:.40})")
        return str(value)

    if seq is not None and (type(seq) is not int):
        bad.append(f"its seq is not a whole number ({seq!r:.40})")
        seq = None
    if not isinstance(payload, bytes):  # (a payload stored as text is read as its bytes)
        bad.append(f"its payload is not bytes ({payload!r:.40})")
        payload = b""
    if retain not in (0, 1) or type(retain) is not int:
        bad.append(f"its retain flag is not 0 or 1 ({retain!r:.40})")
        retain = 0
    if type(created) not in (int, float):
        bad.append(f"its time is not a number ({created!r:.40})")
        created = 0.0
    return Pending(
        key or ("db", n),
        seq,
        text("topic", topic),
        payload,
        bool(retain),
        text("schema", schema),
        float(created),
        None if categories is None else text("categories", categories),
        "; ".join(bad) or None,
    )


@dataclass
class Withdrawn:
    """What a delete took out of the outbox: each message's ``seq`` and its payload's sha256,
    in the order the outbox would have sent them, and the seqs of those already handed to the
    MQTT client (they may have left). No payloads: a week's backlog is not held in memory."""

    seqs: list[int | None] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    in_flight: list[int | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)


class Outbox:
    def __init__(
        self,
        path: str | Path | None,
        *,
        max_messages: int = 100_000,
        max_age_s: float = 7 * 86400.0,
        memory_limit: int = 10_000,
        on_drop: Callable[[list[Pending], str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path) if path else None
        self.max_messages = max_messages
        self.max_age_s = max_age_s
        self.memory_limit = memory_limit
        self.on_drop = on_drop or (lambda items, why: None)
        self._clock = clock
        self._mem: collections.OrderedDict[int, Pending] = collections.OrderedDict()
        self._mem_n = 0
        self.storage_error: str | None = None
        self.dropped = 0
        self._db: sqlite3.Connection | None = None
        self._listeners: list[Callable[[], None]] = []
        self._acked: set[int] = set()  # rows acknowledged by the broker, not yet deleted
        self._withdrawn: set[tuple[str, int]] = set()  # deleted unsent (see ``withdraw``)
        self._drops_said: dict[str, tuple[float, int]] = {}  # why: (said at, dropped since)
        # see ``expect``: the sha256 of each waiting message, by seq (None: not checked), and
        # of the unnumbered retained states (few: kept for the process's life)
        self._expected: dict[int, str] | None = None
        self._expected_loose: collections.Counter[str] = collections.Counter()
        self._since_prune = 0
        # handed to the client, in this batch or one before, and not acknowledged (then it is
        # in ``_acked`` until its row is deleted, or gone from memory): the PUBLISH may be in the
        # socket of a broker that stalled, and reach it later. Never dropped by the bounds
        # (it would be on the record as dropped, and delivered); it waits to be sent again
        self._unconfirmed: set[tuple[str, int]] = set()
        # retained states put so far: a publisher sending a batch of summaries stops at this
        # changing, and sends the new state first (``peek``)
        self.retained_put = 0
        self._in_file: set[int] = set()  # memory entries that are copies of rows of the file
        # acknowledged by the broker in this run, but their rows stay in the file, which could
        # not be written: a later run sends them again, with the same seq (the owner drops the
        # repeats). Not ``left`` (delivered), nor lost with a file deleted later
        self.sent_kept = 0
        self._lock_fd: int | None = None  # holds the flock on the outbox file
        stored_seq = 0
        existed = False
        if self.path is not None:
            existed = self.path.is_file() and self.path.stat().st_size > 0
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._lock()
                self._db = sqlite3.connect(str(self.path), isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                columns = {r[1] for r in self._db.execute("PRAGMA table_info(outbox)")}
                if "categories" not in columns:  # a file of an older version: its rows NULL
                    self._db.execute("ALTER TABLE outbox ADD COLUMN categories TEXT")
                stored_seq = _stored_seq(self._db)
                # text is read as bytes, decoded by ``_pending``: one value that is not UTF-8
                # made sqlite3 raise on every read of the table, so that no row was sent
                self._db.text_factory = bytes
            except (sqlite3.Error, OSError) as exc:  # OSError: its folder cannot be made
                damaged = type(exc) is sqlite3.DatabaseError  # not a disk full or read-only
                if existed and damaged:
                    # what waits in it cannot be read: starting on an empty outbox in memory
                    # would lose it without a word; the user decides
                    if self._db is not None:
                        self._db.close()
                    raise StorageError(
                        f"{self.path}: the outbox is damaged ({exc}); the summaries waiting in "
                        "it cannot be read. Move it aside to start with an empty one"
                    ) from exc
                if existed:
                    stored_seq = self._read_only(exc)
                else:
                    self._degrade(exc)
        self._next_seq = stored_seq
        # the first number no summary in the file ever had (None: no file was there to read)
        self.stored_seq: int | None = stored_seq if existed else None

    # -- sequence numbers ------------------------------------------------------------------
    def reserve_seq(self, floor: int) -> None:
        """Never hand out a number below ``floor`` (the ledger's highest seq + 1)."""
        self._next_seq = max(self._next_seq, floor)

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def give_back(self, first: int | None) -> None:
        """The numbers from ``first`` on were handed to summaries that never left and never
        will (their ledger lines could not be written): the next summaries take them, so the
        owner's ``seq`` has no gap that nothing explains."""
        if first is not None and first < self._next_seq:
            self._next_seq = first

    # -- writing ---------------------------------------------------------------------------
    def put(self, msg: Released) -> None:
        self.put_many([msg])

    def put_many(self, msgs: list[Released]) -> None:
        """Commit ``msgs`` in one transaction (one fsync however many), then wake the
        publisher: a fast replay closes many windows per batch of frames."""
        if not msgs:
            return
        if self._expected is not None:
            # first what is no longer waiting is forgotten (rows the bounds dropped too), then
            # these are added: a prune after would not find them waiting yet, and forget them
            self._since_prune += len(msgs)
            if self._since_prune >= 256:
                self._prune_expected()
            for m in msgs:
                if m.seq is None:
                    self._expected_loose[m.sha256] += 1
                else:
                    self._expected[m.seq] = m.sha256
        self.retained_put += sum(m.retain for m in msgs)
        now = self._clock()
        if self._db is not None:
            committed = False
            try:
                with self._tx():
                    self._db.executemany(
                        "INSERT INTO outbox(seq, topic, payload, retain, schema, created, "
                        "categories) VALUES (?,?,?,?,?,?,?)",
                        [
                            (m.seq, m.topic, m.payload, int(m.retain), m.schema, now, _cats(m))
                            for m in msgs
                        ],
                    )
                    self._db.execute(
                        "INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (self._next_seq,)
                    )
                committed = True
                self._enforce_bounds(now)
                self._notify()
                return
            except sqlite3.Error as exc:
                self._degrade(exc)  # reads what the disk holds (``msgs`` too, if committed)
                if committed:
                    self._notify()
                    return
        for msg in msgs:
            self._mem_n += 1
            self._mem[self._mem_n] = Pending(
                ("mem", self._mem_n),
                msg.seq,
                msg.topic,
                msg.payload,
                msg.retain,
                msg.schema,
                now,
                _cats(msg),
            )
            if len(self._mem) > self.memory_limit:
                # the oldest not handed to the client: one in flight may leave, and its
                # egress line stands (it is never on the record as dropped)
                # (nor a copy of a row still in the file: it is not lost, the next run sends it)
                key = next(
                    (
                        k
                        for k, p in self._mem.items()
                        if p.key not in self._unconfirmed and k not in self._in_file
                    ),
                    None,
                )
                if key is not None:
                    oldest = self._mem.pop(key)
                    self._dropped([oldest], f"in-memory outbox over {self.memory_limit} messages")
        self._notify()

    def _tx(self) -> sqlite3.Connection:
        assert self._db is not None

        class _Tx:
            def __init__(s, db: sqlite3.Connection) -> None:
                s.db = db

            def __enter__(s) -> sqlite3.Connection:
                s.db.execute("BEGIN IMMEDIATE")
                return s.db

            def __exit__(s, exc_type: object, *rest: object) -> None:
                if exc_type:
                    s.db.execute("ROLLBACK")
                    return
                try:
                    s.db.execute("COMMIT")
                except sqlite3.Error:
                    # a COMMIT that fails may leave the transaction open, and reads would then
                    # see its rows as if they were stored
                    with contextlib.suppress(sqlite3.Error):
                        s.db.execute("ROLLBACK")
                    raise

        return _Tx(self._db)  # type: ignore[return-value]

    def _read_only(self, exc: BaseException) -> int:
        """A file that holds what waits, but cannot be opened to be written (a read-only disk
        or file: ``_lock`` needs O_RDWR, and nothing was read, so none of it was sent, and the
        stop entry said none was left): it is read without writing to it, into memory
        (``_degrade``), and sent in this run. Its rows stay in the file (``sent_kept``). What
        cannot be read so stops the start: a run would say nothing waits. The stored seq."""
        assert self.path is not None
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        try:
            if self._lock_fd is None:
                self._lock(os.O_RDONLY)  # (one gateway per outbox all the same)
            # immutable: SQLite writes nothing, and makes no -shm file (mode=ro alone cannot
            # open a WAL file on a read-only disk without one; on a read-only file it left a
            # -shm the next, writable run could not write). Not while a -wal holds rows the
            # file does not (a run killed before its checkpoint): mode=ro reads them
            wal = Path(f"{self.path}-wal")
            in_wal = wal.is_file() and wal.stat().st_size > 0
            uri = self.path.resolve().as_uri() + ("?mode=ro" if in_wal else "?mode=ro&immutable=1")
            db = sqlite3.connect(uri, uri=True, isolation_level=None)
            try:
                columns = {r[1] for r in db.execute("PRAGMA table_info(outbox)")}
                stored_seq = _stored_seq(db)
                db.text_factory = bytes
                kept = _ROW if "categories" in columns else _ROW.replace("categories", "NULL")
                rows = db.execute(f"SELECT {kept} FROM outbox ORDER BY id").fetchall()
            finally:
                db.close()
        except (sqlite3.Error, OSError) as read_exc:
            self.close()
            raise StorageError(
                f"{self.path}: the outbox cannot be written ({exc}), nor read without writing "
                f"({read_exc}): the summaries waiting in it could be neither sent nor kept "
                "track of. Make it writable, or move it aside to start with an empty one"
            ) from read_exc
        self._degrade(exc, rows)
        if rows:
            log.warning(
                "outbox %s: read the %d message(s) waiting in it without writing to it: a run "
                "sends them from memory, and they stay in the file, so that the next run that "
                "can write it sends them again (the owner drops the repeats by seq)",
                self.path,
                len(rows),
            )
        return stored_seq

    def _degrade(self, exc: BaseException, rows: list[tuple] | None = None) -> None:  # type: ignore[type-arg]
        """The disk failed (full, read-only, gone): carry on in memory. What still waits on the
        disk is read into memory first (reading usually still works on a full disk; ``rows``:
        read already), so it is sent in this run, in order; it stays on the disk too, and a
        later run re-sends it with the same ``seq``, which the owner drops. Rows the broker
        already acknowledged stay out."""
        if self.storage_error is None:
            log.error(
                "outbox %s cannot be written (%s): keeping up to %d messages in memory",
                self.path,
                exc,
                self.memory_limit,
            )
        self.storage_error = f"{self.path}: {exc}"
        if self._db is not None:
            rows = []
            # (a file of an older version that could not take the column has no categories)
            for columns in (_ROW, _ROW.replace("categories", "NULL")):
                with contextlib.suppress(sqlite3.Error):
                    rows = self._db.execute(f"SELECT {columns} FROM outbox ORDER BY id").fetchall()
                    break
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db = None
        rows = rows or []
        # acknowledged (their delete failed, or had not come yet): delivered, and in the file
        self.sent_kept += sum(
            r[0] in self._acked and ("db", r[0]) not in self._withdrawn for r in rows
        )
        rescued = [r for r in rows if r[0] not in self._acked]
        if rescued:
            newer = list(self._mem.values())
            self._mem.clear()
            for r in rescued:
                self._mem_n += 1
                self._mem[self._mem_n] = _pending(r, ("mem", self._mem_n))
                self._in_file.add(self._mem_n)  # still in the file too: not lost at exit
                if ("db", r[0]) in self._unconfirmed:
                    self._unconfirmed.add(("mem", self._mem_n))
            for p in newer:  # keep their keys: the publisher may hold them in flight
                self._mem[p.key[1]] = p

    def _enforce_bounds(self, now: float) -> None:
        assert self._db is not None
        # what was handed to the client, acknowledged or not, is not dropped: it may leave
        # (or has), and its egress line stands
        flying = {n for kind, n in self._unconfirmed if kind == "db"} | self._acked
        old = self._db.execute(
            f"SELECT {_ROW} FROM outbox WHERE created < ? ORDER BY id",
            (now - self.max_age_s,),
        ).fetchall()
        old = [r for r in old if r[0] not in flying]
        if old:
            self._delete_rows(old, f"older than {self.max_age_s:.0f} s")
        (depth,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        if depth > self.max_messages:
            rows = self._db.execute(
                f"SELECT {_ROW} FROM outbox ORDER BY id LIMIT ?",
                (depth - self.max_messages + len(flying),),
            ).fetchall()
            rows = [r for r in rows if r[0] not in flying][: depth - self.max_messages]
            if rows:
                self._delete_rows(rows, f"outbox over {self.max_messages} messages")

    def _delete_rows(self, rows: list[tuple], why: str) -> None:  # type: ignore[type-arg]
        assert self._db is not None
        with self._tx():
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(r[0],) for r in rows])
        self._dropped(
            [_pending(r) for r in rows],
            why,
        )

    def _dropped(self, items: list[Pending], why: str) -> None:
        # a publisher that read them into its batch does not send them (``waiting``): sent,
        # they would leave though on the record as dropped
        self._withdrawn.update(i.key for i in items)
        self.dropped += len(items)
        # said once a minute per reason at most (a bound hit by every put said it 16,000
        # times); every drop is on the record (``on_drop``), and the total in the report
        now = time.monotonic()
        said, since = self._drops_said.get(why, (-math.inf, 0))
        if now - said >= 60.0:
            more = f" (and {since} before, since this was last said)" if since else ""
            log.warning("outbox dropped %d message(s)%s: %s", len(items), more, why)
            self._drops_said[why] = (now, 0)
        else:
            self._drops_said[why] = (said, since + len(items))
        self.on_drop(items, why)

    # -- reading ---------------------------------------------------------------------------
    def digests(self) -> list[tuple[int | None, str]]:
        """(seq, sha256 of the payload) of every message waiting, oldest first, read a row at
        a time (the payloads of a week's backlog are not held in memory at once).

        A ``damaged`` row raises StorageError: it was changed after it was written (no gateway
        writes such a value), like a row whose bytes differ from its egress line, which stops
        the start too (``Gateway._check_waiting``): the user decides, before anything is sent."""
        out: list[tuple[int | None, str]] = []

        def check(p: Pending) -> tuple[int | None, str]:
            if p.damaged is not None:
                which = f"seq {p.seq}" if p.seq is not None else f"{p.schema}, no seq"
                raise StorageError(
                    f"{self.path}: a message waiting in the outbox ({which}) is damaged "
                    f"({p.damaged}): the file was changed after it was written. Nothing was "
                    "sent; move it aside to start with an empty one"
                )
            return p.seq, hashlib.sha256(p.payload).hexdigest()

        if self._db is not None:
            try:
                for r in self._db.execute(f"SELECT {_ROW} FROM outbox ORDER BY id"):
                    out.append(check(_pending(r)))
            except sqlite3.Error as exc:
                self._degrade(exc)
        out += [check(m) for m in self._mem.values()]
        return out

    def peek(self, limit: int = 100) -> list[Pending]:
        """The next ``limit`` messages to send: the retained states (status and consent, not
        numbered) first, then the rest in order. The owner's answer to a stop or a consent
        command does not wait behind a backlog of summaries (a fast replay's, or a week's
        offline): it came 17 s after the command, which had said "no answer" at 5 s."""
        out: list[Pending] = []
        if self._db is not None:
            try:
                rows = self._db.execute(
                    f"SELECT {_ROW} FROM outbox WHERE retain = 1 ORDER BY id LIMIT ?",
                    (limit,),
                ).fetchall()
                rows += self._db.execute(  # (!= 1: a damaged flag is read, and not sent)
                    f"SELECT {_ROW} FROM outbox WHERE retain != 1 ORDER BY id LIMIT ?",
                    (limit - len(rows),),
                ).fetchall()
                out = [_pending(r) for r in rows]
            except sqlite3.Error as exc:
                self._degrade(exc)
        if len(out) < limit:
            held = sorted(self._mem.values(), key=lambda p: not p.retain)  # stable: in order
            out += held[: limit - len(out)]
        return out

    def ack(self, item: Pending) -> None:
        self.ack_many([item])

    def note_acked(self, item: Pending) -> None:
        """The broker acknowledged ``item``; ``ack_many`` deletes it later, with the rest of
        its batch. Until then, a disk failure must not bring it back to be sent again."""
        kind, n = item.key
        self._unconfirmed.discard(item.key)
        if kind == "mem":
            self._mem.pop(n, None)
            if n in self._in_file:  # the broker has it; its row stays in the file
                self._in_file.discard(n)
                self.sent_kept += item.key not in self._withdrawn
        else:
            self._acked.add(n)

    def ack_many(self, items: list[Pending]) -> None:
        """Delete messages the broker acknowledged, in one transaction. A crash before it
        commits re-sends them on the next run, with the same ``seq`` (the owner drops them)."""
        for item in items:
            self.note_acked(item)
        rows = [(n,) for kind, n in (i.key for i in items) if kind == "db"]
        if rows and self._db is not None:
            try:
                with self._tx():
                    self._db.executemany("DELETE FROM outbox WHERE id = ?", rows)
            except sqlite3.Error as exc:
                self._degrade(exc)
        self._acked.difference_update(r[0] for r in rows)
        self._since_prune += len(items)
        if self._expected and self._since_prune >= 256:
            self._prune_expected()

    def _prune_expected(self) -> None:
        """Forget the digests of numbers below the lowest still waiting: sent or dropped (a
        copy in memory of a row of a failing file keeps its number, and so its digest)."""
        self._since_prune = 0
        lowest: int | None = None
        if self._db is not None:
            try:
                lowest = self._db.execute("SELECT MIN(seq) FROM outbox").fetchone()[0]
            except sqlite3.Error as exc:
                self._degrade(exc)
        held = [p.seq for p in self._mem.values() if p.seq is not None]
        if held:
            lowest = min(held) if lowest is None else min(lowest, min(held))
        assert self._expected is not None
        if lowest is None:
            self._expected.clear()
        else:
            for q in [q for q in self._expected if q < lowest]:
                del self._expected[q]

    def memory_only(self) -> list[Pending]:
        """What waits in memory only (the file could not take it): lost when this process
        ends, unlike what waits in the file (rows read from it when it failed stay in it)."""
        return [p for k, p in self._mem.items() if k not in self._in_file]

    def depth(self) -> int:
        n = len(self._mem)
        if self._db is not None:
            try:
                n += self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            except sqlite3.Error as exc:
                self._degrade(exc)
                n = len(self._mem)
        return n

    @property
    def storage(self) -> str:
        return "ok" if self.storage_error is None else "degraded"

    # -- listeners -------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def _notify(self) -> None:
        for cb in self._listeners:
            cb()

    def foreign_topic(self, base: str) -> str | None:
        """A waiting message's topic that is not under ``base`` (another vehicle's, or another
        topic prefix's), or None. Sent by this gateway, it would go out under the wrong login
        (the broker's ACL drops it, after a PUBACK: lost) or to the wrong owner."""
        base = base.rstrip("/") + "/"
        if self._db is not None:
            try:
                for (topic,) in self._db.execute(
                    "SELECT topic FROM outbox WHERE substr(topic, 1, ?) != ?", (len(base), base)
                ):
                    with contextlib.suppress(UnicodeDecodeError, AttributeError):
                        # (one that is not UTF-8 text is damaged, not another's: ``digests``)
                        return topic.decode()  # type: ignore[no-any-return]
            except sqlite3.Error as exc:
                self._degrade(exc)
        for p in self._mem.values():
            if not p.topic.startswith(base) and p.damaged is None:
                return p.topic
        return None

    def withdraw(self, items: list[Pending]) -> None:
        """Delete ``items`` unsent (the owner's delete): a publisher that read them into a
        batch before does not send them (``waiting``)."""
        self._withdrawn.update(i.key for i in items)
        self.ack_many(items)

    def withdraw_category(self, category: str | None, legacy: Collection[str] = ()) -> Withdrawn:
        """``withdraw`` every waiting message that carries data of ``category`` (all when
        None), in one transaction, reading the file a row at a time. A row an older version
        wrote did not keep its categories: it goes if its schema is in ``legacy``."""

        def doomed(schema: str, categories: str | None) -> bool:
            if category is None:
                return True
            if categories is None:
                return schema in legacy
            return category in categories.split()

        out = Withdrawn()
        if self._db is not None:
            ids: list[int] = []
            scanned = False
            try:
                with self._tx() as db:
                    rows = db.execute(f"SELECT {_ROW} FROM outbox ORDER BY retain DESC, id")
                    for p in map(_pending, rows):
                        if doomed(p.schema, p.categories):
                            n = p.key[1]
                            ids.append(n)
                            out.seqs.append(p.seq)
                            out.sha256.append(hashlib.sha256(p.payload).hexdigest())
                            if ("db", n) in self._unconfirmed or n in self._acked:
                                out.in_flight.append(p.seq)
                    scanned = True
                    for n in ids:  # as ``withdraw`` leaves them, before the rows go: a batch
                        # read before does not send them, and a failing disk (``_degrade``)
                        # does not bring them back to be sent
                        self._withdrawn.add(("db", n))
                        self._unconfirmed.discard(("db", n))
                        self._acked.add(n)
                    db.executemany("DELETE FROM outbox WHERE id = ?", ((n,) for n in ids))
            except sqlite3.Error as exc:
                if not scanned:  # what was read waits in memory now: withdrawn from there
                    out, ids = Withdrawn(), []
                self._degrade(exc)
            self._acked.difference_update(ids)
            self._since_prune += len(ids)
        held = [
            p
            for p in sorted(self._mem.values(), key=lambda p: not p.retain)
            if doomed(p.schema, p.categories)
        ]
        if held:
            out.in_flight += [p.seq for p in self.sent_or_sending(held)]
            out.seqs += [p.seq for p in held]
            out.sha256 += [hashlib.sha256(p.payload).hexdigest() for p in held]
            self.withdraw(held)
        if self._expected and self._since_prune >= 256:
            self._prune_expected()
        return out

    def waiting(self, item: Pending) -> bool:
        """Whether ``item`` may still be sent: not withdrawn since it was read."""
        return item.key not in self._withdrawn

    def expect(self, waiting: list[tuple[int | None, str]]) -> None:
        """From now on, only bytes on record may be sent: the payloads waiting now (``waiting``:
        (seq, sha256) of each, checked against the ledger's egress lines) and those put from
        now on (each with its egress line written first). A row whose payload was changed in
        the file meanwhile is not ``unchanged`` (the file is checked against the ledger only
        at the start; these digests are held in this process, out of the file's reach)."""
        self._expected = {q: h for q, h in waiting if q is not None}
        self._expected_loose = collections.Counter(h for q, h in waiting if q is None)

    def unchanged(self, item: Pending) -> bool:
        """Whether ``item``'s payload is bytes on record (see ``expect``; True without it), in
        a row that is not ``damaged``."""
        if item.damaged is not None:
            return False
        if self._expected is None:
            return True
        h = hashlib.sha256(item.payload).hexdigest()
        if item.seq is None:
            return self._expected_loose[h] > 0
        return self._expected.get(item.seq) == h

    def sending(self, item: Pending) -> None:
        """``item`` is handed to the MQTT client now: it may leave, whatever comes after."""
        self._unconfirmed.add(item.key)

    def sent_or_sending(self, items: list[Pending]) -> list[Pending]:
        """Those of ``items`` handed to the client, acknowledged or not yet (a row is deleted
        when its batch ends): a delete cannot hold them back, and their egress lines stand."""
        return [
            i
            for i in items
            if i.key in self._unconfirmed or (i.key[0] == "db" and i.key[1] in self._acked)
        ]

    def batch_done(self) -> None:
        """The batch being sent is over: what it did not send waits (what it handed to the
        client stays ``_unconfirmed`` until acknowledged). What was withdrawn from it is gone
        from the outbox: no later batch reads it."""
        self._withdrawn.clear()

    def file_gone(self) -> bool:
        """Whether the outbox file was deleted or replaced while this process held it: what
        waits in it then waits in a file nobody will open again."""
        if self.path is None or self._lock_fd is None:
            return False
        try:
            return not still_named(self.path, self._lock_fd)
        except OSError:
            return False

    def each_waiting(self) -> Iterator[Pending]:
        """Every message waiting, in ``peek``'s order, read from the file a row at a time (for
        an export of a week's backlog; nothing may change the outbox until it is done)."""
        if self._db is not None:
            try:
                for r in self._db.execute(f"SELECT {_ROW} FROM outbox ORDER BY retain DESC, id"):
                    yield _pending(r)
            except sqlite3.Error as exc:
                raise StorageError(f"{self.path}: cannot read the outbox ({exc})") from exc
        yield from sorted(self._mem.values(), key=lambda p: not p.retain)

    def waiting_items(self) -> list[Pending]:
        """Every message waiting (file and memory), oldest first."""
        return self.peek(max(1, self.depth()))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # and with it the lock
            self._lock_fd = None

    def _lock(self, mode: int = os.O_RDWR | os.O_CREAT) -> None:
        """One gateway at a time: a second one on the same outbox would send the same rows
        and number new summaries from the same counter (the owner drops repeated numbers as
        duplicates: real data lost). ``flock`` on the file, held until ``close`` or exit; it
        does not touch SQLite's own (POSIX) locks. ``mode``: O_RDONLY for a file that cannot
        be written (``flock`` takes any open file)."""
        assert self.path is not None
        fd = os.open(self.path, mode | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StorageError(
                    f"{self.path}: the outbox is in use by another gateway process; stop it "
                    "first, or give this one an outbox of its own"
                ) from exc
            raise
        self._lock_fd = fd


def _stored_seq(db: sqlite3.Connection) -> int:
    """The first number no summary in the file ever had (a seq that is no number, in a
    damaged row, is not one)."""
    (seq,) = db.execute(
        "SELECT MAX(v) FROM (SELECT value AS v FROM meta WHERE key='next_seq' "
        "AND typeof(value) = 'integer' "
        "UNION ALL SELECT MAX(seq) + 1 FROM outbox WHERE typeof(seq) = 'integer')"
    ).fetchone()
    return int(seq or 0)


def _cats(msg: Released) -> str:
    """A message's categories as the outbox keeps them."""
    return " ".join(msg.categories)
