"""DBC loading: cantools' model, made tolerant of the real-world files a bench meets.

A parsed DBC is kept in the cache folder (``gateway.cachedir``: ``$GATEWAY_CACHE_DIR``, else
``$XDG_CACHE_HOME/car-data-gateway``, else ``~/.cache/car-data-gateway``; ``GATEWAY_CACHE_DIR=off``
turns it off), keyed by the SHA-256 of the file's bytes, the installed cantools and the gateway
and Python versions: a large DBC (the Model 3 one) loads in 0.1 s instead of 0.6 s. Two entries
per file: cantools' model (``<key>.pickle``) and the vector decoder's plans (``<key>.plans``,
see ``DbcPlans``), which a replay reads without importing cantools. The cache holds pickles, so
it is read only from a directory that belongs to the user and nobody else can write to.

cantools (and python-can, which it imports) is imported only where a DBC is parsed or cantools'
model is wanted: ~45 ms of every start-up on the 2-core VM of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import logging
import os
import pickle
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cachedir import cache_dir, open_private, prune, write_private
from gateway.cachedir import private as _private
from gateway.canbus.messages import divert_logging, looks_binary
from gateway.canbus.signalplan import DbcPlans
from gateway.errors import DbcError

if TYPE_CHECKING:
    import cantools.database

log = logging.getLogger(__name__)

ALL_CHANNELS = "*"
_MISSING_SECTIONS = re.compile(r"(BS_\s*:|BU_\s*:)")
_BO = re.compile(r"BO_\s+(\d+)\s")
_BO_SENDER = re.compile(r"BO_\s+\d+\s+\w+\s*:\s*\d+\s+(\w+)")
_SG = re.compile(r"\s*SG_\s+(\w+)")
_VAL = re.compile(r"VAL_\s+(\d+)\s+(\w+)")
_VALTYPE = re.compile(r"SIG_VALTYPE_\s+(\d+)\s+(\w+)")
_LINE_REF = re.compile(r"(\bline )(\d+)")


def _load(path: Path, text: str | None, strict: bool) -> cantools.database.can.Database:
    import cantools.database

    if text is None:
        db = cantools.database.load_file(str(path), database_format="dbc", strict=strict)
    else:
        db = cantools.database.load_string(text, database_format="dbc", strict=strict)
    assert isinstance(db, cantools.database.can.Database)
    return db


Lines = list[tuple[int | None, str]]  # (line number in the file, or None if added; the line)


def _add_missing_sections(lines: Lines) -> Lines | None:
    """Real DBCs written by hand often lack the (empty) ``BS_:``/``BU_:`` sections that
    cantools' grammar requires; add them right before the first message."""
    present = {m.group(1)[:3] for _, ln in lines if (m := _MISSING_SECTIONS.match(ln))}
    if {"BS_", "BU_"} <= present:
        return None
    nodes = sorted({m.group(1) for _, ln in lines if (m := _BO_SENDER.match(ln))})
    insert: list[str] = []
    if "BS_" not in present:
        insert += ["BS_:", ""]
    if "BU_" not in present:
        insert += ["BU_: " + " ".join(nodes or ["XXX"]), ""]
    first = next((i for i, (_, ln) in enumerate(lines) if _BO.match(ln)), None)
    if first is None:
        return None
    return [*lines[:first], *((None, ln) for ln in insert), *lines[first:]]


def _drop_dangling_values(lines: Lines) -> tuple[Lines, list[str]] | None:
    """Without the ``VAL_`` and ``SIG_VALTYPE_`` lines of signals the file does not define:
    cantools refuses a whole DBC for one (opendbc's tesla_can.dbc has one), though they
    describe nothing that could be decoded. Returns (lines, what was dropped), or None."""
    signals: dict[int, set[str]] = {}
    current: set[str] | None = None
    for _, ln in lines:
        if m := _BO.match(ln):
            current = signals.setdefault(int(m.group(1)), set())
        elif (m := _SG.match(ln)) and current is not None:
            current.add(m.group(1))
    kept: Lines = []
    dropped: list[str] = []
    skipping = False  # inside a dropped VAL_ that goes on over more lines
    for num, ln in lines:
        if skipping:
            skipping = not ln.rstrip().endswith(";")
            continue
        m = _VAL.match(ln) or _VALTYPE.match(ln)
        if m and m.group(2) not in signals.get(int(m.group(1)), ()):
            dropped.append(" ".join(ln.split()[:3]))
            skipping = m.re is _VAL and not ln.rstrip().endswith(";")
            continue
        kept.append((num, ln))
    return (kept, dropped) if dropped else None


def _located(exc: BaseException, lines: Lines) -> str:
    """cantools' error about a repaired text, its ``line N`` put back to the file's own."""

    def back(m: re.Match[str]) -> str:
        i = int(m.group(2)) - 1
        if 0 <= i < len(lines) and lines[i][0] is not None:
            return f"{m.group(1)}{lines[i][0]}"
        return m.group(0)

    return _LINE_REF.sub(back, _one_line(exc))


def load_dbc(path: str | Path) -> cantools.database.can.Database:
    """Load a DBC strictly; fall back to ``strict=False`` (with a warning), then to adding the
    missing ``BS_:``/``BU_:`` sections. Raise ``DbcError`` naming the file if all fail.
    A file is parsed (and warned about) once per process while it is unchanged. The model
    keeps no DBC attributes or comments (``_slim``), so it cannot be written back as a DBC."""
    return _load_cached(*_identity(path))[0]


def load_plans(path: str | Path) -> DbcPlans:
    """The vector decoder's plans of a DBC (``DbcPlans``): read from the cache without
    importing cantools; on a miss, the DBC is loaded as ``load_dbc`` does and compiled into the
    cache by a forked child (in this process where that cannot be done). Warns (once) and
    raises as ``load_dbc`` does. ``plans.database()`` gives cantools' model of the same file
    when something needs it."""
    return _plans_cached(*_identity(path))


def _identity(path: str | Path) -> tuple[Path, int, int]:
    """(resolved path, mtime, size): what the per-process memos of a DBC are keyed by."""
    path = Path(path)
    if not str(path) or str(path) == ".":
        raise DbcError("--dbc: no file given (use [CHANNEL=]FILE)")
    if path.is_dir():
        raise DbcError(f"{path}: is a folder, not a DBC file")
    if not path.is_file():
        raise DbcError(f"{path}: DBC file not found")
    st = path.stat()
    return path.resolve(), st.st_mtime_ns, st.st_size


def _strict_problem(db: cantools.database.can.Database) -> Exception | None:
    """What ``strict=True`` would have refused (overlapping signals, signals that do not fit),
    checked on the already parsed model: a large DBC is parsed once, not twice."""
    for m in db.messages:
        try:
            m.refresh(strict=True)
        except Exception as exc:  # noqa: BLE001 - cantools raises several kinds here
            m.refresh(strict=False)
            return exc
    return None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DbcError(f"{path}: cannot read DBC: {exc.strerror}") from exc


# the files (path, mtime, size) whose load notes this process has said as warnings
_said: set[tuple[Path, int, int]] = set()


def _say(path: Path, mtime: int, size: int, notes: list[str]) -> None:
    """A file's load notes, as warnings, once per process while it is unchanged: whether its
    plans, its model or both are loaded."""
    if (path, mtime, size) not in _said:
        _said.add((path, mtime, size))
        for note in notes:
            log.warning("%s: %s", path, note)


def _forget() -> None:
    """Forget what this process loaded and said (for tests: as a new process would)."""
    _load_cached.cache_clear()
    _plans_cached.cache_clear()
    _said.clear()


@functools.lru_cache(maxsize=32)
def _load_cached(
    path: Path, _mtime: int, _size: int
) -> tuple[cantools.database.can.Database, list[str]]:
    """(cantools' model, what its load had to relax or repair), said as warnings."""
    raw = _read(path)
    cache = _cache_file(raw)
    hit = _cache_get(cache) if cache is not None else None
    if hit is not None:
        db, notes = hit
    else:
        notes = []
        # said once, by load_dbc below, with the path; and again on every cache hit
        with divert_logging("cantools", _Notes(notes)):
            db = _slim(_parse(path, notes))
        if cache is not None:
            _cache_put(cache, (db, notes))
    _say(path, _mtime, _size, notes)
    return db, notes


@functools.lru_cache(maxsize=32)
def _plans_cached(path: Path, mtime: int, size: int) -> DbcPlans:
    cache = _cache_file(_read(path), ".plans")
    hit = _plans_get(cache) if cache is not None else None
    if hit is None and cache is not None and _compiled_in_child(path, mtime, size, cache):
        hit = _plans_get(cache)
    if hit is None:  # no cache, or the child could not fill it: parsed and compiled here
        db, notes = _load_cached(path, mtime, size)
        plans = DbcPlans.of(db, build=cache is not None)  # without a cache: as they are met
        if cache is not None:
            _write_private(cache, (plans, notes))
        return plans  # plans.database() gives the model parsed here
    plans, notes = hit
    _say(path, mtime, size, notes)
    if plans.needs_model:
        # messages cantools decodes itself: its model of the file as it is now, as the plans
        db = _load_cached(path, mtime, size)[0]
        plans.database = lambda: db
    else:
        plans.database = functools.partial(_model_later, path, mtime, size)
    return plans


def _compiled_in_child(path: Path, mtime: int, size: int, cache: Path) -> bool:
    """Parse the DBC and write its plans (and cantools' model) into the cache in a forked
    child, so that this process never holds cantools, its parser's garbage or its model: on
    the first replay of the Model 3 DBC the gateway and its candump parse process then took
    70 MB together instead of 90. False where that cannot be done (then it is done here)."""
    from gateway.canbus import parseproc

    try:
        cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return False
    if not (_private(cache.parent) and os.access(cache.parent, os.W_OK | os.X_OK)):
        return False  # the child could not write its entries: the work is done here, once
    return parseproc.in_child(_compile_into_cache, path, mtime, size, cache) is True


def _compile_into_cache(path: Path, mtime: int, size: int, cache: Path) -> bool:
    """In the child: what ``_plans_cached`` does on a miss, written to the cache only (its
    notes, cantools' own warnings among them, are said by the gateway from the entry)."""
    db, notes = _load_cached(path, mtime, size)
    return _write_private(cache, (DbcPlans.of(db, build=True), notes))


def _model_later(path: Path, mtime: int, size: int) -> cantools.database.can.Database:
    """cantools' model of a DBC whose plans came from the cache, when something asks for it
    later: of the file the plans were made of, or a DbcError if it has changed since."""
    try:
        st = path.stat()
    except OSError:
        st = None
    if st is None or (st.st_mtime_ns, st.st_size) != (mtime, size):
        raise DbcError(f"{path}: changed or removed since the gateway read it; start it again")
    return _load_cached(path, mtime, size)[0]


def _plans_get(path: Path) -> tuple[DbcPlans, list[str]] | None:
    fh = open_private(path)
    if fh is None:
        return None
    try:
        with fh:
            plans, notes = pickle.load(fh)
        if not isinstance(plans, DbcPlans) or not all(isinstance(n, str) for n in notes):
            raise TypeError("not a plans entry")
    except Exception:  # noqa: BLE001 - a damaged or stale entry is compiled again
        log.debug("DBC plans cache entry %s unreadable; compiling again", path)
        return None
    return plans, list(notes)


def _slim(db: cantools.database.can.Database) -> cantools.database.can.Database:
    """Drop what the gateway never reads from a message or a signal: its DBC attributes
    (``BA_``, one ``DbcSpecifics`` with its ordered dicts each) and its comments. Decoding,
    units, choices and limits do not use them. The Model 3 DBC (148 messages, 3,172 signals),
    read from the cache, then adds 10 MB to the resident memory instead of 15 MB."""
    for m in db.messages:
        m.dbc = None
        m.comment = None
        for sig in m.signals:
            sig.dbc = None  # type: ignore[assignment]  # cantools' own default is None too
            sig.comments = None
    return db


@functools.cache
def _loader_digest() -> str:
    """The source of this module, of the plans, of the child that compiles them and of the
    records their names are kept in: a change to how DBCs are loaded, repaired or compiled
    retires the entries it made, without anyone having to remember a format number."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(Path(__file__).with_name("signalplan.py").read_bytes())
    h.update(Path(__file__).with_name("parseproc.py").read_bytes())  # compiles on a miss
    h.update(Path(__file__).parent.parent.joinpath("records.py").read_bytes())
    return h.hexdigest()


@functools.cache
def _package_stamp(name: str) -> str:
    """Which version of an installed package, found without importing it: its distribution's
    name and version (the ``dist-info`` folder beside it) and where and when its main file was
    written. cantools parses the DBC; bitstruct decides which layouts fail (kept in plans)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return f"no {name}"
    origin = Path(spec.origin)
    top = origin.parent.parent if origin.name == "__init__.py" else origin.parent
    try:
        dists = sorted(p.name for p in top.glob(f"{name}-*.dist-info"))
        st = origin.stat()
    except OSError:
        return str(origin)
    return f"{dists}|{origin}|{st.st_mtime_ns}|{st.st_size}"


def _cache_file(raw: bytes, suffix: str = ".pickle") -> Path | None:
    """The cache entry of a DBC's bytes: ``.pickle`` for cantools' model, ``.plans``."""
    root = cache_dir()
    if root is None:
        return None
    from gateway import __version__

    h = hashlib.sha256(raw)
    h.update(
        f"|{_package_stamp('cantools')}|{_package_stamp('bitstruct')}|{__version__}"
        f"|{sys.version_info[:2]}|{_loader_digest()}".encode()
    )
    return root / "dbc" / f"{h.hexdigest()}{suffix}"


def _cache_get(path: Path) -> tuple[cantools.database.can.Database, list[str]] | None:
    fh = open_private(path)
    if fh is None:
        return None
    try:
        with fh:
            entry = pickle.load(fh)
        db = _unpack(entry[:-1])
        notes = list(entry[-1])
    except Exception:  # noqa: BLE001 - a damaged or stale entry is parsed again
        log.debug("DBC cache entry %s unreadable; parsing again", path)
        return None
    return db, notes


# A cache entry: the database without its messages, each message pickled on its own, and the
# two lookup tables as (key, message number) pairs. Unpickled whole, the Model 3 database held
# ~4 MB of pickle state (every object's __dict__, kept by the unpickler's memo until the end of
# the load) that, freed, stayed in the resident memory as fragmented small-object arenas:
# +9.5 MB RSS; a message at a time: +6.9 MB, in the same time.
_Packed = tuple[Any, list[bytes], list[tuple[Any, int]], list[tuple[Any, int]]]


def _pack(db: cantools.database.can.Database) -> _Packed:
    msgs = db.messages
    number = {id(m): i for i, m in enumerate(msgs)}
    shell = copy.copy(db)
    shell._messages, shell._name_to_message, shell._frame_id_to_message = [], {}, {}
    return (
        shell,
        [pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL) for m in msgs],
        [(k, number[id(m)]) for k, m in db._name_to_message.items()],
        [(k, number[id(m)]) for k, m in db._frame_id_to_message.items()],
    )


def _unpack(entry: tuple[Any, ...]) -> cantools.database.can.Database:
    import cantools.database

    shell, blobs, names, ids = entry
    if not isinstance(shell, cantools.database.can.Database):
        raise TypeError(f"not a cantools database: {type(shell).__name__}")
    msgs = [pickle.loads(b) for b in blobs]
    if not all(isinstance(m, cantools.database.can.Message) for m in msgs):
        raise TypeError("not a cantools message")
    shell._messages = msgs
    shell._name_to_message = {k: msgs[i] for k, i in names}
    shell._frame_id_to_message = {k: msgs[i] for k, i in ids}
    return shell


def _cache_put(path: Path, value: tuple[cantools.database.can.Database, list[str]]) -> None:
    try:
        entry = (*_pack(value[0]), value[1])
    except (pickle.PicklingError, RecursionError, TypeError, AttributeError) as exc:
        log.debug("DBC cache not written (%s)", exc)
        return
    _write_private(path, entry)


def _write_private(path: Path, entry: Any) -> bool:
    """Best effort: a cache that cannot be written only costs time (see
    ``cachedir.write_private``). Whether the entry was written."""
    try:
        written = write_private(
            path, functools.partial(pickle.dump, entry, protocol=pickle.HIGHEST_PROTOCOL)
        )
    except (pickle.PicklingError, RecursionError, TypeError, AttributeError) as exc:
        log.debug("DBC cache not written (%s)", exc)
        return False
    if written:  # (a new entry: the old ones of earlier versions and other DBCs may go)
        prune(path.parent, path.name, (".pickle", ".plans"))
    return written


class _Notes(logging.Handler):
    """cantools' own warnings while it parses (e.g. a message overwriting another with the
    same id): kept with the parsed DBC, so that a load from the cache says them again."""

    def __init__(self, notes: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        self.notes.append(" ".join(record.getMessage().split()))


def _parse(path: Path, notes: list[str]) -> cantools.database.can.Database:
    """cantools' model of the file; what had to be relaxed or repaired goes into ``notes``."""
    import cantools.database

    first_error: BaseException | None
    try:
        db = _load(path, None, strict=False)
    except (cantools.database.UnsupportedDatabaseFormatError, ValueError, KeyError) as exc:
        first_error = exc
    except UnicodeDecodeError:
        # cantools opens with the platform encoding; many DBCs are cp1252
        first_error = None
    else:
        relaxed = _strict_problem(db)
        if relaxed is not None:
            notes.append(f"loaded with strict=False ({_one_line(relaxed)})")
        return db
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DbcError(f"{path}: cannot read DBC: {exc.strerror}") from exc
    if not raw.removeprefix(b"\xef\xbb\xbf").strip():  # (a BOM alone, too)
        raise DbcError(f"{path}: the DBC is empty ({len(raw)} bytes, no message in it)")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or looks_binary(raw[:65536]):
        raise DbcError(
            f"{path}: not a DBC: binary data, or text saved as UTF-16 (save it as UTF-8 or "
            "cp1252 text)"
        )
    bom = raw.startswith(b"\xef\xbb\xbf")  # saved by an editor as UTF-8 with a BOM
    text = raw[3:].decode("utf-8", errors="replace") if bom else raw.decode("cp1252", "replace")
    lines: Lines = list(enumerate(text.splitlines(), start=1))
    # the repairs, each on top of the ones before; the last error is the file's own problem
    # (the first may be only the missing sections), said at the line of the file
    reread = "re-read without its UTF-8 byte-order mark" if bom else "re-read as cp1252"
    steps: list[str] = []
    problem = _one_line(first_error) if first_error is not None else "not valid text"
    for repair in ("reread", "sections", "values"):
        note = None
        if repair == "reread":
            note = reread
        elif repair == "sections" and (added := _add_missing_sections(lines)) is not None:
            lines, note = added, "added the missing BS_:/BU_: sections"
        elif repair == "values" and (dropped := _drop_dangling_values(lines)) is not None:
            lines, gone = dropped
            note = (
                f"left out {len(gone)} VAL_/SIG_VALTYPE_ line(s) of signals it does not define "
                f"({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''})"
            )
        if note is None:
            continue
        steps.append(note)
        try:
            db = _load(path, "\n".join(ln for _, ln in lines) + "\n", strict=False)
        except (cantools.database.UnsupportedDatabaseFormatError, ValueError, KeyError) as exc:
            problem = _located(exc, lines)
            continue
        loose = _strict_problem(db) is not None
        if steps[0] == reread and not bom and len(steps) > 1:
            steps = steps[1:]  # re-read as cp1252 only to be repaired: not worth saying
        notes.append(
            f"loaded after a repair: {', '.join(steps)}{', strict=False' if loose else ''}"
        )
        return db
    raise DbcError(f"{path}: cantools cannot load this DBC, even with strict=False: {problem}")


def _one_line(exc: BaseException | None) -> str:
    if exc is None:
        return "not valid text"
    inner = getattr(exc, "e_dbc", None)  # cantools' own error, inside its "no format" one
    undefined = exc if type(exc) is KeyError else inner if type(inner) is KeyError else None
    if undefined is not None and undefined.args:  # a name looked up, never defined
        name = undefined.args[0]
        return f"DBC: it refers to {name!r}, which it does not define (a BA_ without its BA_DEF_?)"
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _defines(plans: DbcPlans, name: str) -> bool:
    """Whether one DBC's plans define ``MESSAGE.SIGNAL`` (a plan that cannot be built: yes,
    it is not judged here)."""
    msg = name.partition(".")[0]
    if msg not in plans.names:
        return False
    try:
        return name in plans.plan(plans.names.index(msg)).meta
    except Exception:  # noqa: BLE001 - its own error is raised where the plan is used
        return True


def _closest(name: str, names: list[str], cutoff: float = 0.6) -> list[str]:
    import difflib  # only when a name is missing (~1 ms to import, on a replay's start)

    return difflib.get_close_matches(name, names, n=1, cutoff=cutoff)


class ChannelDbcs:
    """Which DBC decodes which channel. ``"*"`` applies to every channel without its own DBC;
    several DBCs on one channel are searched in the order given.

    A DBC added by path (``add``, ``from_specs``) is read as its decode plans (``load_plans``:
    no cantools import when the cache holds them); ``for_channel`` gives cantools' models,
    loaded on first use. A mapping of cantools databases, given to the constructor, is used
    as it is (its plans are built message by message as they are needed)."""

    def __init__(
        self, by_channel: Mapping[str, list[cantools.database.can.Database]] | None = None
    ) -> None:
        self._plans: dict[str, list[DbcPlans]] = {}
        self.paths: dict[str, list[Path]] = {}
        of_db: dict[int, DbcPlans] = {}  # one set of plans per database, shared by channels
        for ch, dbs in (by_channel or {}).items():
            for db in dbs:
                if id(db) not in of_db:
                    of_db[id(db)] = DbcPlans.of(db)
                self._plans.setdefault(ch, []).append(of_db[id(db)])

    def add(self, channel: str, path: str | Path) -> None:
        plans = load_plans(path)
        for earlier, before in zip(
            self._plans.get(channel, []), self.paths.get(channel, []), strict=False
        ):
            both = sorted(set(earlier.ids) & set(plans.ids))
            if both:
                shown = ", ".join(f"0x{i & 0x1FFFFFFF:X}" for i in both[:5])
                log.warning(
                    "%s: %d frame id(s) (%s%s) are in %s too; on %s the first DBC given "
                    "decodes them",
                    path,
                    len(both),
                    shown,
                    ", ..." if len(both) > 5 else "",
                    before,
                    "every channel" if channel == ALL_CHANNELS else channel,
                )
        self._plans.setdefault(channel, []).append(plans)
        self.paths.setdefault(channel, []).append(Path(path))

    def plans_for(self, channel: str) -> list[DbcPlans]:
        return self._plans.get(channel) or self._plans.get(ALL_CHANNELS, [])

    def for_channel(self, channel: str) -> list[cantools.database.can.Database]:
        return [p.database() for p in self.plans_for(channel) if p.database is not None]

    def missing(self, signals: Iterable[str]) -> list[str]:
        """Of ``MESSAGE.SIGNAL`` names, those in none of these DBCs (read from the plans: the
        named messages' plans only, no cantools)."""
        every = list({id(p): p for plans in self._plans.values() for p in plans}.values())
        return [name for name in sorted(signals) if not any(_defines(p, name) for p in every)]

    def near(self, name: str, *, other_messages: bool = True) -> tuple[bool, str | None]:
        """For a ``MESSAGE.SIGNAL`` in none of these DBCs: whether one of them has its message
        (then its signal name is mistyped, or the DBC is another version), and the closest
        name of a signal of that message, or (``other_messages``) of a message, for a "did
        you mean"."""
        every = list({id(p): p for plans in self._plans.values() for p in plans}.values())
        msg, _, _ = name.partition(".")
        for p in every:
            if msg in p.names:
                try:
                    names = list(p.plan(p.names.index(msg)).meta)
                except Exception:  # noqa: BLE001 - said where the plan is used
                    return True, None
                close = _closest(name, names)
                return True, close[0] if close else None
        if not other_messages:
            return False, None
        # closer than for a signal of a known message: the bundled policy's Model 3 messages,
        # checked against the Kona's DBCs, drew "ID118DriveSystemStatus ... did you mean
        # InverterStatus?" (0.61); a typo is closer (BMS_54 for BMS_542: 0.92)
        names = [m for p in every for m in p.names]
        close = _closest(msg, names, cutoff=0.8)
        return False, close[0] if close else None

    def all_databases(self) -> Iterable[cantools.database.can.Database]:
        seen: set[int] = set()
        for plans in self._plans.values():
            for p in plans:
                if id(p) not in seen and p.database is not None:
                    seen.add(id(p))
                    yield p.database()

    @classmethod
    def from_specs(cls, specs: Iterable[str] | Mapping[str, str | list[str]]) -> ChannelDbcs:
        """``["can0=pcan.dbc", "any.dbc"]`` or ``{"can0": "pcan.dbc", "*": ["a.dbc"]}``."""
        out = cls()
        items: list[tuple[str, str]] = []
        if isinstance(specs, Mapping):
            for ch, paths in specs.items():
                for p in [paths] if isinstance(paths, str) else paths:
                    items.append((ch, p))
        else:
            for spec in specs:
                ch, sep, p = spec.partition("=")
                items.append((ch, p) if sep and not Path(spec).exists() else (ALL_CHANNELS, spec))
        for ch, p in items:
            out.add(ch.strip() or ALL_CHANNELS, p.strip())
        return out
