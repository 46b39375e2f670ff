"""The ``gateway`` console script and ``python -m gateway``: a Ctrl-C while the gateway's
modules are still being imported (the first ~0.1 s, and numpy's later on) is "interrupted"
and exit 130, as it is later, not a traceback."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from gateway.cli import entry

        return entry()
    except KeyboardInterrupt:
        pass
    except ImportError as exc:
        # numpy turns a Ctrl-C inside the import of its C extensions into an ImportError
        # ("Importing the numpy C-extensions failed"), which would blame the install
        if not _interrupted(exc):
            raise
    print("gateway: interrupted", file=sys.stderr)
    return 130


def _interrupted(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
