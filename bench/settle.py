"""Reading the venv's shared libraries from disk again, as after a reboot, before a benchmark
measures peak memory. Its own module, with nothing but the standard library: a bench calls it
before it imports numpy (whose libraries it would otherwise hold in the page cache as they
are)."""

from __future__ import annotations

import os
from pathlib import Path


def settle_libraries() -> int:
    """Have the kernel read the venv's shared libraries from disk again, as after a reboot.

    Peak RSS counts the pages of shared libraries a process maps, and how many pages one fault
    maps depends on how the page cache holds the file. Right after ``pip install`` wrote them,
    the libraries' pages are held in large pieces, and the same camera replay peaked at 187 MB
    instead of 139 MB (OpenCV's, FFmpeg's and numpy's libraries; the process's own memory was
    the same). Flushing and dropping those files' cached pages (``posix_fadvise`` DONTNEED: no
    root needed, nothing is lost, pages still mapped by a process stay) makes every bench
    measure the state a device is in after a reboot. Returns the number of files settled."""
    if not hasattr(os, "posix_fadvise"):  # not on macOS: measured as it is
        return 0
    import sysconfig

    roots = {Path(sysconfig.get_paths()[k]) for k in ("platlib", "purelib")}
    done = 0
    for path in (p for root in roots if root.is_dir() for p in root.rglob("*.so*")):
        try:  # best effort: a file this user cannot read is measured as it is
            if path.is_symlink() or not path.is_file():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                done += 1
            finally:
                os.close(fd)
        except OSError:
            continue
    return done
