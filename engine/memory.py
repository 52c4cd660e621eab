"""Handing freed heap memory back to the operating system between layer groups.

Activations of a few MiB each are allocated and freed thousands of times during calibration; glibc keeps the
freed pages in its heap, so the process's resident size creeps up with fragmentation although nothing is alive.
``malloc_trim(0)`` returns every whole free page. Elsewhere (macOS, musl, Windows) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache

__all__ = ["release_free_memory"]


@lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS; True when something was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
