"""Keeping a long relay process's memory flat.

Each batch travels as one buffer of tens of megabytes. glibc serves such buffers
with mmap at first, but after the first one is freed it raises its mmap threshold
and later buffers come from the heap, whose freed space it keeps: the process
grows with the number of batches it has handled. A fixed threshold keeps large
buffers on mmap, returned to the system as soon as they are freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_MMAP_THRESHOLD = -3
LARGE_BUFFER_BYTES = 1 << 20


@functools.cache
def return_large_buffers_to_the_system() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (once per process); False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
