"""Freed heap memory back to the operating system (glibc's malloc; elsewhere a no-op).

glibc maps a block of at least its mmap threshold on its own and unmaps it when it is freed; a
smaller block comes from the heap, whose freed space the process keeps. The threshold starts at
128 KiB, and freeing a mapped block of up to 32 MiB raises it to that block's size: once one such
weight has been freed, later weights and onnxruntime's buffers under it come from the heap, and
what a stage frees there stays resident. ``malloc_trim`` gives the free pages of the heap back.

Called where a run has just let go of a model's worth of memory (before graph surgery), not after
every free; the threshold is left as glibc sets it, because fixing it low (``mallopt``) has every
temporary array above it mapped and faulted in afresh (the README's memory figures give both).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the interpreter is linked with
    except (OSError, AttributeError, TypeError):  # not glibc, or no such handle (Windows)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def trim() -> bool:
    """Give the heap's free pages back to the operating system; False where there is no malloc_trim."""
    release = _malloc_trim()
    if release is None:
        return False
    release(0)  # 1 if it gave pages back, 0 if there were none
    return True
