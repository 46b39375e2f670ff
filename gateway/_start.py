"""The ``gateway`` console script and ``python -m gateway``: a Ctrl-C while the gateway's
modules are still being imported (the first ~0.1 s) is "interrupted" and exit 130, as it is
later, not a traceback."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from gateway.cli import entry
    except KeyboardInterrupt:
        print("gateway: interrupted", file=sys.stderr)
        return 130
    return entry()
