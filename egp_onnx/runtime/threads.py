"""numpy's BLAS on one thread for a block of small products, and independent parts of it on threads.

:func:`one_blas_thread` (OpenBLAS only; elsewhere a no-op):

A batch of linear systems of a few hundred unknowns gains nothing from BLAS threads, and when the
other cores are busy each call waits for its threads to be scheduled, so such batches run on one.
The count is set with ``openblas_set_num_threads_local`` (OpenBLAS 0.3.27 on), which returns the
count it replaces; in numpy's OpenBLAS it holds for the whole process while the block runs (a
thread started inside the block sees it too), so the block should not overlap other BLAS work.

:func:`map_parts` runs a few independent products at once instead, each on one BLAS thread: the
work is split by the caller into a fixed number of parts (:data:`PARTS`), so the arithmetic and its
rounding are the same whatever the machine's core count; only how many run at once follows it.
Unlike BLAS's own threads, which meet at a barrier after every block of a product, parts do not
wait for each other: with the other core busy, they run one after the other at no extra cost.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Parts a block of independent products is split into (see map_parts): a constant, not the core
#: count, so results do not depend on the machine.
PARTS = 2


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


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """One pool per size and process: a forked child has none of its parent's threads."""
    return ThreadPoolExecutor(workers, thread_name_prefix="egp-parts")


def map_parts(function: Callable[[T], R], parts: Sequence[T]) -> list[R]:
    """``[function(p) for p in parts]``, the parts on up to as many threads as there are cores.

    The results come back in the order of ``parts``. ``function`` must not write to anything
    another part reads, nor call map_parts itself (the parts share one pool of threads). The
    parts run with the caller's BLAS thread count (in numpy's OpenBLAS, see one_blas_thread).
    """
    workers = min(len(parts), cores())
    if workers <= 1:
        return [function(part) for part in parts]
    return list(_pool(workers, os.getpid()).map(function, parts))
