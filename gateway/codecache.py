"""Start-up: the compiled code of the methods ``dataclasses`` writes, kept between runs.

Python 3.11 writes each method it gives a dataclass (``__init__``, ``__repr__``, ``__eq__``, a
frozen class's ``__setattr__`` and ``__delattr__``, ``__hash__``) as source text and compiles it
with ``exec``, one method at a time, in every process: the 43 dataclasses on a replay's import
path took 24 ms of a 0.35 s replay of a million frames here, more than the rest of the
gateway's own modules together. Python keeps the compiled code of a module in
``__pycache__``; this keeps the code compiled from each of those texts, by its text, in the
cache folder (``code/``, see ``gateway.cachedir``), and reads it back as marshal data (~1 ms).

Running the kept code is running the text: it is the code ``compile`` makes of that exact
text, with the flags ``dataclasses``' own ``exec`` has (no ``__future__`` of ours), and it
runs in the namespaces ``dataclasses`` passes, as before. Only the ``exec`` that the
``dataclasses`` module calls is replaced (a name in its namespace); nothing else is. The file
is tied to the Python build (``sys.version``): another build starts afresh. A file that is
damaged, of another build, or not private to this user is ignored and written again. New
texts are written at the end of the process that compiled them (the console script's end).

Installed by the console script (``gateway._start``) before anything else of the gateway is
imported; ``GATEWAY_CACHE_DIR=off`` leaves ``dataclasses`` as it is.
"""

from __future__ import annotations

import atexit
import builtins
import marshal
import os
import sys
from pathlib import Path
from typing import Any

from gateway.cachedir import cache_dir, private, write_private

# above this many texts, a write keeps only those this process used (a new version of the
# gateway's classes leaves the old texts behind; the replay path uses ~220)
MAX_ENTRIES = 4096


class DataclassCodeCache:
    """The hook put into ``dataclasses``: ``exec`` of a text runs its kept code."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.codes: dict[str, Any] = {}
        self.used: set[str] = set()
        self.compiled = 0  # texts compiled by this process (written at its end)
        self.pid = os.getpid()
        if path is not None:
            self.codes = _read(path)

    def exec(self, source: Any, /, *args: Any, **kwargs: Any) -> None:
        if type(source) is str:
            code = self.codes.get(source)
            if code is None:
                # as the exec of dataclasses would compile it: its file name, and no future
                # features inherited from this module (annotations would become strings)
                code = compile(source, "<string>", "exec", dont_inherit=True)
                self.codes[source] = code
                self.compiled += 1
            self.used.add(source)
            source = code
        builtins.exec(source, *args, **kwargs)

    def save(self) -> bool:
        """Write the texts to the file if this process compiled new ones (and is the one that
        installed the hook: not a forked child). Whether it wrote."""
        if self.path is None or not self.compiled or os.getpid() != self.pid:
            return False
        codes = self.codes
        if len(codes) > MAX_ENTRIES:
            codes = {t: c for t, c in codes.items() if t in self.used}
        try:
            data = marshal.dumps((sys.version, codes))
        except ValueError:  # not marshallable: not ours to keep
            return False
        if not write_private(self.path, lambda fh: fh.write(data)):
            return False
        self.compiled = 0
        return True


def _read(path: Path) -> dict[str, Any]:
    if not (private(path.parent) and private(path)):
        return {}
    try:
        version, codes = marshal.loads(path.read_bytes())
    except (OSError, EOFError, ValueError, TypeError):  # missing, damaged, another format
        return {}
    if version != sys.version or not isinstance(codes, dict):
        return {}
    return {t: c for t, c in codes.items() if type(t) is str and type(c) is _CODE}


_CODE = type(_read.__code__)


def cache_file() -> Path | None:
    root = cache_dir()
    impl = sys.implementation.cache_tag or sys.implementation.name
    return None if root is None else root / "code" / f"dataclasses.{impl}.marshal"


def install() -> DataclassCodeCache | None:
    """Put the hook into ``dataclasses`` (once), to be saved at the end of the process. None
    where the cache is off."""
    import dataclasses

    hook = getattr(dataclasses, "exec", None)
    if isinstance(getattr(hook, "__self__", None), DataclassCodeCache):
        return hook.__self__  # type: ignore[union-attr, no-any-return]
    path = cache_file()
    if path is None:
        return None
    cache = DataclassCodeCache(path)
    dataclasses.exec = cache.exec  # type: ignore[attr-defined]
    atexit.register(cache.save)
    return cache
