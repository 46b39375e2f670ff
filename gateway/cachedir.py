"""The gateway's cache folder on disk, and the checks that make what it holds safe to load.

``$GATEWAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/car-data-gateway``, else
``~/.cache/car-data-gateway``; ``GATEWAY_CACHE_DIR=off`` turns every cache off. It holds parsed
DBCs (``dbc/``, see ``gateway.canbus.dbc``) and compiled dataclass methods (``code/``, see
``gateway.codecache``): pickles and code, so an entry is read only from a folder and a file
that belong to the user and that nobody else can write to, and written only through a new
file of its own. Both are checked on the opened descriptors, not on the path before it is
opened: a folder swapped for a symbolic link (or for somebody else's folder) between a check
and the open is refused, not followed. Imports nothing beyond the standard library's basics:
the code cache uses it before the gateway's modules are imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

# What a folder of entries may keep (see ``prune``): entries unused for this long go, then the
# least recently used until the folder is under its size. A use marks an entry at most once a
# day, so a Raspberry Pi's SD card is not written at every start.
UNUSED_DAYS = 30
FOLDER_BYTES = 128 * 1024 * 1024
_MARK_AFTER_S = 86400.0


def cache_dir() -> Path | None:
    """Where the caches are, or None when they are off (or there is no home)."""
    if not hasattr(os, "getuid") or not _NOFOLLOW:
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


def _ours(st: os.stat_result) -> bool:
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def private(path: Path) -> bool:
    """A real directory or file (no symlink), owned by this user and writable by nobody else.
    (A check of the path as it is now: to read or write an entry, see ``open_private`` and
    ``write_private``, which check what they opened.)"""
    try:
        st = path.lstat()
    except OSError:
        return False
    return _ours(st) and not stat.S_ISLNK(st.st_mode)


def _open_folder(folder: Path) -> int | None:
    """A descriptor of ``folder`` if it is a private folder (checked on the descriptor), else
    None. Its last component is not followed if it is a symbolic link."""
    try:
        fd = os.open(folder, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode) and _ours(st):
        return fd
    os.close(fd)
    return None


def open_private(path: Path) -> BinaryIO | None:
    """``path`` open for reading if it and its folder are private (see the module), else None.
    The file is opened inside the folder's own descriptor, without following a link."""
    folder = _open_folder(path.parent)
    if folder is None:
        return None
    try:
        fd = os.open(path.name, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=folder)
    except OSError:
        return None
    finally:
        os.close(folder)
    st = os.fstat(fd)
    if not (stat.S_ISREG(st.st_mode) and _ours(st)):
        os.close(fd)
        return None
    if time.time() - st.st_mtime > _MARK_AFTER_S:  # used: not pruned for a while (see prune)
        with contextlib.suppress(OSError):
            os.utime(fd)
    return os.fdopen(fd, "rb")


def prune(folder: Path, keep: str, suffixes: tuple[str, ...]) -> int:
    """Remove from a private ``folder`` the entries (names ending in ``suffixes``; regular
    files of this user, never followed links) not used for ``UNUSED_DAYS``, then the least
    recently used until the folder holds at most ``FOLDER_BYTES``; never ``keep`` (the entry
    just written). A use is the entry's modification time (``open_private`` marks it); the
    entries of one key (``<key><suffix>``) share their latest use. Left behind by a process
    that died while writing, a temporary file an hour old goes too. How many files were
    removed; best effort, like the rest of the cache."""
    fd = _open_folder(folder)
    if fd is None:
        return 0
    try:
        return _prune(fd, folder, keep, suffixes)
    except OSError as exc:  # (a folder that cannot be listed: nothing pruned this time)
        log.debug("cache %s not pruned: %s", folder, exc)
        return 0
    finally:
        os.close(fd)


def _prune(fd: int, folder: Path, keep: str, suffixes: tuple[str, ...]) -> int:
    removed = 0
    now = time.time()
    entries: list[tuple[float, int, str]] = []
    stale: list[str] = []
    with os.scandir(fd) as it:
        for e in it:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if not (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()):
                continue
            if e.name.endswith(suffixes) and e.name != keep:
                entries.append((st.st_mtime, st.st_size, e.name))
            elif e.name.endswith(".tmp") and now - st.st_mtime > 3600:
                stale.append(e.name)
    # entries of one key (the DBC cache's ``<key>.pickle`` and ``<key>.plans``) are used
    # together: a replay reads only the plans, and the model, needed by `--decoder cantools`,
    # must not age out beside them (it would be parsed again); the twins of ``keep`` stay too
    used: dict[str, float] = {_stem(keep, suffixes): now}
    for mtime, _, name in entries:
        stem = _stem(name, suffixes)
        used[stem] = max(used.get(stem, mtime), mtime)
    entries = sorted((used[_stem(n, suffixes)], size, n) for _, size, n in entries)
    total = sum(size for _, size, _ in entries)  # (least recently used first)
    with contextlib.suppress(OSError):
        total += os.stat(keep, dir_fd=fd, follow_symlinks=False).st_size
    for mtime, size, name in entries:
        if now - mtime <= UNUSED_DAYS * 86400 and total <= FOLDER_BYTES:
            break
        stale.append(name)
        total -= size
    for name in stale:
        try:
            os.unlink(name, dir_fd=fd)
            removed += 1
        except OSError:
            pass
    if removed:
        log.debug("cache %s: %d unused entries removed", folder, removed)
    return removed


def _stem(name: str, suffixes: tuple[str, ...]) -> str:
    """The key of an entry: its name without the suffix it ends in."""
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def write_private(path: Path, write: Callable[[BinaryIO], object]) -> bool:
    """Best effort (a cache that cannot be written only costs time): ``path`` made by ``write``
    (given the open file), in a private folder (made mode 0700 if missing), through a new file
    of its own (O_EXCL, mode 0600), flushed to the disk and renamed over it, all inside the
    folder's descriptor. Whether it was written. An error of ``write`` other than an OSError is
    raised, after the new file is removed."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        log.debug("cache %s not written: %s", path, exc)
        return False
    folder = _open_folder(path.parent)
    if folder is None:
        log.debug("cache folder %s is not private to this user: not written", path.parent)
        return False
    tmp = f".{path.name}.{os.urandom(6).hex()}.tmp"
    made = False
    try:
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC,
            0o600,
            dir_fd=folder,
        )
        made = True
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # a power cut leaves the old entry or the new, whole
        os.replace(tmp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
        made = False
        return True
    except OSError as exc:
        log.debug("cache %s not written: %s", path, exc)
        return False
    finally:
        if made:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=folder)
        os.close(folder)
