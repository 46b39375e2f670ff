"""The ``gateway`` console script and ``python -m gateway``: a Ctrl-C while the gateway's
modules are still being imported (the first ~0.1 s, and numpy's later on) is "interrupted"
and exit 130, as it is later, not a traceback. A command that returns ends the process at once
(``_exit_now``). Before anything else of the gateway is imported, the compiled methods of its
dataclasses are read from the cache (``gateway.codecache``), and ``urllib.request`` is made
to load on first use (``_lazy_urllib_request``)."""

from __future__ import annotations

import sys
import types
from contextlib import AbstractContextManager


def main() -> int:
    try:
        _code_cache()
        _lazy_urllib_request()
        from gateway.cli import entry

        code = entry()
    except KeyboardInterrupt:
        pass
    except ImportError as exc:
        # numpy turns a Ctrl-C inside the import of its C extensions into an ImportError
        # ("Importing the numpy C-extensions failed"), which would blame the install
        if not _interrupted(exc):
            raise
    else:
        return _exit_now(code)
    print("gateway: interrupted", file=sys.stderr)
    return 130


def _code_cache() -> None:
    """A cache that cannot be used only costs time: whatever goes wrong in it, the gateway
    starts without it (``dataclasses`` compiles, as it always did)."""
    try:
        from gateway import codecache

        codecache.install()
    except Exception:  # noqa: BLE001, S110 - never a reason not to start
        pass


def _lazy_urllib_request() -> None:
    """paho-mqtt imports ``urllib.request`` (with ``http.client`` and most of ``email``: ~8 ms
    of a replay's start here) for one thing: the proxy of an ``mqtt_proxy`` variable, looked
    up only when PySocks is installed, which the gateway does not need. Until something reads
    one of its names, ``urllib.request`` is a stand-in (``_LaterModule``) that imports the real
    module then and answers from it. (The standard library's ``LazyLoader`` cannot do this in
    Python 3.11: an ``import`` statement reads the module's ``__spec__``, which loads it.)"""
    import urllib
    from importlib.machinery import ModuleSpec

    name = "urllib.request"
    if name in sys.modules or not hasattr(urllib, "__path__"):
        return
    import threading

    stand_in = _LaterModule(name)
    stand_in.__spec__ = ModuleSpec(name, None)
    stand_in._lock = threading.Lock()  # (two threads' first reads import it once)
    sys.modules[name] = stand_in
    urllib.request = stand_in  # type: ignore[attr-defined]  # (as an import would set it)


class _LaterModule(types.ModuleType):
    """A module whose names come from the real one, imported at the first name read."""

    _lock: AbstractContextManager[object]

    def __getattr__(self, attr: str) -> object:  # (a name this stand-in does not hold)
        import importlib
        import urllib

        if attr == "_lock":  # (not set: a stand-in made by hand)
            raise AttributeError(attr)
        with self._lock:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)  # (which sets urllib.request to it)
            urllib.request = real  # type: ignore[attr-defined]
        return getattr(real, attr)


def _exit_now(code: int) -> int:
    """Ends the process with ``code`` once the command is done, as the interpreter would but
    without its teardown: freeing every object of numpy, asyncio and the gateway one by one
    (12 ms of a 0.45 s replay of a million frames here, and 35 ms of CPU; timed with and
    without, alternating). What the teardown does that matters is done first: the ``atexit``
    handlers (logging's flush among them) and the flush of stdout and stderr. Every file,
    database and socket of the gateway is closed by then, by the code that opened it. Where
    that cannot be said (a thread other than a daemon still running, which the interpreter
    would wait for; stdout gone, whose error the interpreter reports), ``code`` is returned
    and the interpreter ends as usual."""
    import atexit
    import os
    import threading

    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return code
    atexit._run_exitfuncs()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        return code
    os._exit(code)


def _interrupted(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
