"""The gateway's cache folder on disk, and the checks that make what it holds safe to load.

``$GATEWAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/car-data-gateway``, else
``~/.cache/car-data-gateway``; ``GATEWAY_CACHE_DIR=off`` turns every cache off. It holds parsed
DBCs (``dbc/``, see ``gateway.canbus.dbc``) and compiled dataclass methods (``code/``, see
``gateway.codecache``): pickles and code, so it is read only from a folder and files that
belong to the user and that nobody else can write to, and written only through new files of
its own. Imports nothing beyond the standard library's basics: the code cache uses it before
the gateway's modules are imported.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def cache_dir() -> Path | None:
    """Where the caches are, or None when they are off (or there is no home)."""
    if not hasattr(os, "getuid"):
        return None  # no owner check on this platform: no pickles, no code either
    env = os.environ.get("GATEWAY_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "no") else Path(env)
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except (RuntimeError, KeyError):  # no HOME and no passwd entry (a container's UID)
            return None
    return Path(base) / "car-data-gateway"


def private(path: Path) -> bool:
    """A real directory or file (no symlink), owned by this user and writable by nobody else:
    what is found there is ours to trust, and a file made there cannot be redirected."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode)


def write_private(path: Path, write: Callable[[BinaryIO], object]) -> bool:
    """Best effort (a cache that cannot be written only costs time): ``path`` made by ``write``
    (given the open file), in a private folder (made mode 0700 if missing), through a new file
    of its own (``mkstemp``: O_EXCL, mode 0600) renamed over it. Whether it was written. An
    error of ``write`` other than an OSError is raised, after the new file is removed."""
    tmp: str | None = None
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not private(path.parent):
            return False
        import tempfile  # here: only a cache miss writes (tempfile imports random, shutil)

        fd, tmp = tempfile.mkstemp(prefix=path.stem[:16], suffix=".tmp", dir=path.parent)
        with open(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
        tmp = None
        return True
    except OSError:
        return False
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
