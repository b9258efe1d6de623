"""A few entries of ``rng.permutation(n)`` without the shuffle, with the generator left as it leaves it.

``prune.prune_smallest`` orders weights of equal magnitude by a seeded permutation of a layer's
non-zero entries, and only the few tied at the threshold ever consult it. Shuffling a large array
is slow (every swap of the Fisher-Yates loop is a cache miss); its random numbers alone are cheap.
numpy's ``Generator.shuffle`` (n - 1 swaps, for i = n-1 .. 1, with
j = ``random_interval(i)``: the next 32-bit output masked to the smallest ``2**b - 1 >= i``,
drawn again while it exceeds i) is replayed here in vectorised chunks, and an entry of the
permutation is found by following the swaps that moved it. Generators other than PCG64 (whose
32-bit outputs are the halves of its 64-bit ones) and small n take numpy's own shuffle.
"""

from __future__ import annotations

import math
import sys
from typing import Any, cast

import numpy as np

#: Below this n numpy's shuffle is fast enough (and the only code path, so tests cover both).
REPLAY_FROM = 1 << 16

#: More tied entries than this: following each one's swaps costs more than the shuffle.
MAX_FOLLOWED = 32


def permutation_entries(rng: np.random.Generator, n: int, ranks: np.ndarray) -> np.ndarray:
    """``rng.permutation(n)[ranks]``, advancing ``rng`` exactly as ``rng.permutation(n)`` does."""
    if not _replayable(rng, n) or len(ranks) > MAX_FOLLOWED:
        return _shuffled(rng, n)[ranks]
    swaps = shuffle_swaps(cast(np.random.PCG64, rng.bit_generator), n)
    assert swaps is not None  # kept
    return np.array([_entry(swaps, int(r)) for r in np.asarray(ranks).ravel()], dtype=np.int64)


def skip_permutation(rng: np.random.Generator, n: int) -> None:
    """Advance ``rng`` as ``rng.permutation(n)`` would, without computing the permutation."""
    if _replayable(rng, n):
        shuffle_swaps(cast(np.random.PCG64, rng.bit_generator), n, keep=False)
    else:
        _shuffled(rng, n)


def _replayable(rng: np.random.Generator, n: int) -> bool:
    return n >= REPLAY_FROM and type(rng.bit_generator) is np.random.PCG64 and sys.byteorder == "little"


def _shuffled(rng: np.random.Generator, n: int) -> np.ndarray:
    """NumPy's own: the draws of rng.permutation(n), in half the memory for n under 2**31."""
    order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    rng.shuffle(order)
    return order


def shuffle_swaps(bit_generator: np.random.PCG64, n: int, keep: bool = True) -> np.ndarray | None:
    """The partner j of every swap ``a[i], a[j]`` of ``shuffle`` of n entries (index i; entry 0 unused).

    ``bit_generator`` advances by exactly the draws of that shuffle. With ``keep`` False nothing
    is stored and None is returned.
    """
    stream = _Halves(dict(bit_generator.state))
    swaps = np.zeros(n, dtype=np.int32 if n < 2**31 else np.int64) if keep else None
    i = n - 1
    while i >= 1:
        low = 1 << (i.bit_length() - 1)  # i in [low, 2 * low): one mask for the whole block
        mask = 2 * low - 1
        # A chunk of `width` draws moves i by at most `width`: a draw <= i - width + 1 is accepted
        # whatever came before it, one > i rejected; the few in between are decided one by one.
        width = min(max(8 * math.isqrt(mask + 1), 1024), 1 << 20)
        while i >= low:
            width = min(width, i + 1)
            draws = stream.peek(width) & np.uint32(mask)
            sure = i - width + 1
            taken = np.flatnonzero(draws <= sure)
            # sure < draw <= i in one comparison: the subtraction wraps the smaller draws around.
            unsure = np.flatnonzero(draws - np.uint32(sure + 1) <= width - 2) if width > 1 else taken[:0]
            if unsure.size:
                sure_before = np.searchsorted(taken, unsure).tolist()
                extra, kept = 0, []
                for t, value, before in zip(
                    unsure.tolist(), draws[unsure].tolist(), sure_before, strict=True
                ):
                    if value <= i - before - extra:
                        kept.append(t)
                        extra += 1
                if kept:
                    taken = np.insert(taken, np.searchsorted(taken, kept), kept)
            steps = min(taken.size, i - low + 1)
            if swaps is not None and steps:
                swaps[i - steps + 1 : i + 1] = draws[taken[:steps]][::-1]
            stream.consume(int(taken[steps - 1]) + 1 if steps == i - low + 1 else width)
            i -= steps
    stream.settle(bit_generator)
    return swaps


def _entry(swaps: np.ndarray, rank: int) -> int:
    """Entry ``rank`` of the permutation the swaps make of 0..n-1 (see :func:`shuffle_swaps`).

    After swap i, position i is final and holds what position swaps[i] held just before; a
    position p <= t holds, just before swap t, what the first later swap s > t with swaps[s] == p
    moved there (position s's content before swap s), or p itself if no swap touched it.
    """
    position, time = (0, 0) if rank == 0 else (int(swaps[rank]), rank)
    while True:
        later = swaps[time + 1 :] == position
        first = int(later.argmax()) if later.size else 0
        if not later.size or not later[first]:
            return position
        position = time = time + 1 + first


class _Halves:
    """The 32-bit outputs of a PCG64 state: a buffered half first, then each 64-bit output low, high."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.start = state
        self.work = np.random.PCG64()
        self.work.state = cast(Any, state)  # a plain dict: numpy types it as a TypedDict
        self.buffered = int(state["has_uint32"])
        self.buf = np.array([state["uinteger"]] if self.buffered else [], dtype=np.uint32)
        self.offset = 0
        self.used = 0

    def peek(self, count: int) -> np.ndarray:
        if self.buf.size - self.offset < count:
            raw = self.work.random_raw((max(count, 1 << 22) + 1) // 2)
            self.buf = np.concatenate([self.buf[self.offset :], raw.view(np.uint32)])
            self.offset = 0
        return self.buf[self.offset : self.offset + count]

    def consume(self, count: int) -> None:
        self.offset += count
        self.used += count

    def settle(self, bit_generator: np.random.PCG64) -> None:
        """Put ``bit_generator`` where ``used`` 32-bit draws from the start state leave it."""
        halves = self.used - self.buffered if self.used else 0
        state: dict[str, Any] = dict(self.start)
        if halves > 0:
            bit_generator.state = cast(Any, self.start)
            bit_generator.advance((halves + 1) // 2 - 1)
            last = int(bit_generator.random_raw())
            state = dict(bit_generator.state)
            state["uinteger"] = last >> 32
            state["has_uint32"] = halves % 2
        elif self.used:  # only the buffered half was used
            state["has_uint32"] = 0
        bit_generator.state = cast(Any, state)
