"""Keeping the memory an ingestion worker frees for the next update, instead of handing it back
to the kernel and faulting it in again.

An encoding worker makes the same large buffers update after update: the compressed frames
(~720 KB each) and their concatenation (41 MB for ResNet-18). glibc serves blocks over its
mmap threshold (128 KB, raised on the fly only up to 32 MB) from fresh mappings and trims
freed heap above 128 KB, so each update paid ~21,000 page faults: compressing a ResNet-18
update measured 85 ms and joining its frames 27 ms, against 60 ms and 5 ms with the memory
kept (min of 6, 2-core host); a 20-update run's process CPU fell from 7.4 s to 6.0 s.

:func:`keep_freed_memory` raises both thresholds for the worker's process (the in-process
runner's: the caller's) — glibc's ``mallopt``, as the ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` environment variables would at start-up. The cost is that the
process keeps up to ``TRIM_BYTES`` of freed heap mapped. Elsewhere (musl, macOS) it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# blocks up to 64 MiB come from the heap: a ResNet-18 update's stored bytes (41 MB) and every
# frame; larger ones are mapped as before. (32 MiB, glibc's cap for its own on-the-fly raise,
# left the 41 MB join faulting: 10,500 faults, 31 ms.)
MMAP_BYTES = 64 << 20
# freed heap kept mapped up to this much: the few updates' buffers of a worker or two
TRIM_BYTES = 512 << 20

_lock = threading.Lock()
_done = False


def keep_freed_memory() -> bool:
    """Set the process's allocator to reuse freed memory (once per process); whether it did
    (glibc only)."""
    global _done
    with _lock:
        if not _done:
            _done = _mallopt(M_MMAP_THRESHOLD, MMAP_BYTES) and _mallopt(
                M_TRIM_THRESHOLD, TRIM_BYTES
            )
        return _done


def _mallopt(param: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(param, value))
    except (OSError, AttributeError):  # no C library by that name, or no mallopt in it
        return False
