"""Start-up: the compiled code of the methods ``dataclasses`` writes, kept between runs.

Python 3.11 writes each method it gives a dataclass (``__init__``, ``__repr__``, ``__eq__``, a
frozen class's ``__setattr__`` and ``__delattr__``, ``__hash__``) as source text and compiles it
with ``exec``, one method at a time, in every process: the 43 dataclasses on a replay's import
path took 24 ms of a 0.35 s replay of a million frames here, more than the rest of the
gateway's own modules together. Python keeps the compiled code of a module in
``__pycache__``; this keeps the code compiled from each of those texts (the gateway's
dataclasses and any other defined in the process, aiomqtt's among them), by the text's SHA-256,
in the cache folder (``code/``, see ``gateway.cachedir``), and reads it back as marshal data
(~1 ms).

Running the kept code is running the text: it is the code ``compile`` made of the text whose
SHA-256 it is kept under, with the flags ``dataclasses``' own ``exec`` has (no ``__future__`` of ours), and it
runs in the namespaces ``dataclasses`` passes, as before. Only the ``exec`` that the
``dataclasses`` module calls is replaced (a name in its namespace); nothing else is.

The file: one per Python build and optimisation level (``-O``: its name holds a digest of
both, which the file repeats inside), its marshal data behind their SHA-256, read only when private to the user
(``cachedir.open_private``). A file that is damaged (a flipped bit, a torn write), of another
build or not private is not read: every text is compiled, and the file written again at the
end. New texts are written at the end of the process that compiled them (the console
script's end), with those kept before, up to ``MAX_ENTRIES`` (then only those this process
ran). Texts are not kept, in the file or in memory: only their digests.

Installed by the console script (``gateway._start``) before anything else of the gateway is
imported; ``GATEWAY_CACHE_DIR=off`` leaves ``dataclasses`` as it is.
"""

from __future__ import annotations

import atexit
import builtins
import hashlib
import marshal
import os
import sys
from pathlib import Path
from types import CodeType
from typing import Any

from gateway.cachedir import cache_dir, open_private, write_private

# the replay path uses ~220 texts (~200 KB of file); above this many, a write keeps only those
# this process ran (a new version of the gateway's classes leaves its old texts behind)
MAX_ENTRIES = 1024
_DIGEST = 32  # bytes of SHA-256 before the marshal data


def _build() -> str:
    """What the compiled code depends on besides its text: the interpreter, and ``-O``."""
    return f"{sys.version}|optimize={sys.flags.optimize}"


def _key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class DataclassCodeCache:
    """The hook put into ``dataclasses``: ``exec`` of a text runs its kept code."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        # the file's entries not yet run: marshal data of the code, by the text's SHA-256
        self.codes: dict[bytes, bytes] = {} if path is None else _read(path)
        self.new: dict[bytes, Any] = {}  # compiled by this process, until written
        self.ran: dict[bytes, Any] = {}  # run by this process (a text met again runs this)
        self.pid = os.getpid()

    @property
    def compiled(self) -> int:
        """Texts this process compiled and has not written yet."""
        return len(self.new)

    def exec(self, source: Any, /, *args: Any, **kwargs: Any) -> None:
        if type(source) is str:
            key = _key(source)
            code = self.ran.get(key)
            if code is None:
                code = _loads(self.codes.pop(key, None))
                if code is None:
                    # as the exec of dataclasses would compile it: its file name, and no
                    # future features inherited from this module (annotations would become
                    # strings)
                    code = compile(source, "<string>", "exec", dont_inherit=True)
                    self.new[key] = code
                self.ran[key] = code
            source = code
        builtins.exec(source, *args, **kwargs)

    def save(self) -> bool:
        """Write the file if this process compiled new texts (and is the one that installed
        the hook: not a forked child). Whether it wrote."""
        if self.path is None or not self.new or os.getpid() != self.pid:
            return False
        try:
            new = {k: marshal.dumps(c) for k, c in self.new.items()}
        except ValueError:  # not marshallable: not ours to keep
            return False
        entries = {**_read(self.path), **new}  # the file as it is now, and the new texts
        if len(entries) > MAX_ENTRIES:
            entries = {k: b for k, b in entries.items() if k in self.ran}
        data = marshal.dumps((_build(), entries))
        digest = hashlib.sha256(data).digest()
        if not write_private(self.path, lambda fh: fh.write(digest + data)):
            return False
        self.new = {}
        return True


def _loads(blob: bytes | None) -> Any:
    """The code object in ``blob``, or None."""
    if blob is None:
        return None
    try:
        code = marshal.loads(blob)
    except Exception:  # noqa: BLE001 - not expected past the digest: compiled instead
        return None
    return code if type(code) is CodeType else None


def _read(path: Path) -> dict[bytes, bytes]:
    """The entries of the file, or none if it cannot be trusted whole."""
    fh = open_private(path)
    if fh is None:
        return {}
    try:
        with fh:
            raw = memoryview(fh.read())
        digest, data = raw[:_DIGEST], raw[_DIGEST:]
        if len(digest) < _DIGEST or hashlib.sha256(data).digest() != digest:
            return {}  # damaged or torn: marshal would read it as other code, or crash
        version, entries = marshal.loads(data)
    except Exception:  # noqa: BLE001 - whatever it is, the texts are compiled again
        return {}
    if version != _build() or not isinstance(entries, dict):
        return {}
    return {
        k: b
        for k, b in entries.items()
        if type(k) is bytes and len(k) == _DIGEST and type(b) is bytes
    }


def cache_file() -> Path | None:
    root = cache_dir()
    if root is None:
        return None
    impl = sys.implementation.cache_tag or sys.implementation.name
    build = hashlib.sha256(_build().encode()).hexdigest()[:12]
    return root / "code" / f"dataclasses.{impl}.{build}.marshal"


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
