"""Freed blocks back to the operating system at once (glibc's malloc; elsewhere a no-op).

glibc maps a block of at least its mmap threshold on its own and unmaps it when it is freed; a
smaller block comes from the heap, whose freed space the process keeps. The threshold starts at
128 KiB, and freeing a mapped block of up to 32 MiB raises it to that block's size: once one
such weight has been freed, the later blocks under it (most of a model's weights, onnxruntime's
buffers) come from the heap, and what a run frees there stays resident. On VGG-19 (575 MB) that
was 0.36 GB of the peak (3.84 against 3.48 GB, in the same time). A threshold set with
``mallopt`` stays where it is set.
"""

from __future__ import annotations

import ctypes

#: mallopt's parameter number for the mmap threshold (glibc's malloc.h).
M_MMAP_THRESHOLD = -3
#: Blocks of at least this many bytes are mapped on their own.
MMAP_THRESHOLD = 1 << 20


def return_freed_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process; False where there is no mallopt.

    Process-wide: the CLI sets it when it starts; a program calling the library may too.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter is linked with
    except (OSError, AttributeError, TypeError):  # no mallopt (not glibc), or no such handle (Windows)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
