"""numpy's BLAS on one thread for a block of small products (OpenBLAS only; elsewhere a no-op).

A batch of linear systems of a few hundred unknowns gains nothing from BLAS threads, and when the
other cores are busy each call waits for its threads to be scheduled: 128 masked systems of 290
unknowns took 1.1-1.5 s on OpenBLAS's two threads against 0.2-0.3 s on one, on the loaded machine.
The count is set with ``openblas_set_num_threads_local`` (OpenBLAS 0.3.27 on), which returns the
count it replaces; in numpy's OpenBLAS it holds for the whole process while the block runs (a
thread started inside the block sees it too), so the block should not overlap other BLAS work.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@functools.cache
def openblas_local() -> Callable[[int], int] | None:
    """OpenBLAS's per-thread thread-count setter (returns the previous count), if numpy loaded one."""
    try:
        maps = Path("/proc/self/maps").read_text()  # the libraries this process has loaded (Linux)
    except OSError:
        return None
    # a maps line: address perms offset dev inode path (the path may hold spaces)
    fields = [line.split(maxsplit=5) for line in maps.splitlines() if "openblas" in line.lower()]
    paths = sorted({f[5] for f in fields if len(f) == 6})
    for path in paths:
        try:
            setter = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        setter.argtypes = [ctypes.c_int]
        setter.restype = ctypes.c_int
        return setter
    return None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block's BLAS and LAPACK calls from this thread on one thread."""
    setter = openblas_local()
    if setter is None:
        yield
        return
    previous = setter(1)
    try:
        yield
    finally:
        setter(previous)
