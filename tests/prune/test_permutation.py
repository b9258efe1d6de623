"""The replayed shuffle against numpy's own: the same permutation and the same generator state after."""

from __future__ import annotations

import numpy as np
import pytest
from references import lexsort_prune_smallest  # the definition the partition must match

from egp_onnx.prune.budget import prune_smallest
from egp_onnx.prune.permutation import REPLAY_FROM, permutation_entries, shuffle_swaps, skip_permutation


def generator(seed: int, buffered_half: bool) -> np.random.Generator:
    """A PCG64 generator; with ``buffered_half`` it holds the unused high half of a 64-bit draw."""
    rng = np.random.default_rng(seed)
    if buffered_half:
        rng.integers(0, 2**32, dtype=np.uint32)
    return rng


def apply_swaps(swaps: np.ndarray) -> np.ndarray:
    """Fisher-Yates on 0..n-1 with the given partners, as numpy's shuffle runs it."""
    order = np.arange(swaps.size)
    for i in range(swaps.size - 1, 0, -1):
        j = swaps[i]
        order[i], order[j] = order[j], order[i]
    return order


@pytest.mark.parametrize("buffered_half", [False, True])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 31, 32, 33, 64, 65, 1000, 4097])
def test_swaps_replay_numpy_shuffle(n, buffered_half):
    for seed in range(3):
        numpy_rng, replay_rng = generator(seed, buffered_half), generator(seed, buffered_half)
        want = numpy_rng.permutation(n)
        swaps = shuffle_swaps(replay_rng.bit_generator, n)
        np.testing.assert_array_equal(apply_swaps(swaps), want)
        assert replay_rng.bit_generator.state == numpy_rng.bit_generator.state


@pytest.mark.parametrize("buffered_half", [False, True])
def test_entries_and_skip_of_a_large_permutation(buffered_half):
    n = REPLAY_FROM + 12345
    ranks = np.array([0, 1, 2, n // 3, n - 2, n - 1])
    numpy_rng, replay_rng = generator(7, buffered_half), generator(7, buffered_half)
    want = numpy_rng.permutation(n)
    np.testing.assert_array_equal(permutation_entries(replay_rng, n, ranks), want[ranks])
    assert replay_rng.bit_generator.state == numpy_rng.bit_generator.state
    skip_rng = generator(7, buffered_half)
    skip_permutation(skip_rng, n)
    assert skip_rng.bit_generator.state == numpy_rng.bit_generator.state


@pytest.mark.parametrize("tied", [5, 100])  # followed one by one; more than MAX_FOLLOWED: shuffled
@pytest.mark.parametrize("bit_generator", [np.random.PCG64, np.random.MT19937])
def test_prune_large_layer_with_ties_at_the_threshold(tied, bit_generator):
    rng = np.random.default_rng(3)
    size = 2 * REPLAY_FROM
    weights = rng.uniform(0.5, 1.0, size).astype(np.float32)
    weights[rng.choice(size, 1000, replace=False)] = 0.0  # zeros are skipped in the tie order
    places = rng.choice(np.flatnonzero(weights), tied, replace=False)
    weights[places] = 0.25 * rng.choice([-1, 1], tied)  # tied, below every other magnitude
    count = tied // 2 + 1
    new, old = np.random.Generator(bit_generator(11)), np.random.Generator(bit_generator(11))
    got = prune_smallest(weights.reshape(256, -1), count, new)
    np.testing.assert_array_equal(got.ravel(), lexsort_prune_smallest(weights, count, old))
    assert new.integers(2**62) == old.integers(2**62), "the generator advances alike"
