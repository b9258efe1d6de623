"""The entropy-guided budget against a direct transcription of the reference formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from egp_onnx.prune.budget import (
    egp_allocation,
    global_magnitude_amounts,
    integer_amounts,
    mean_abs_nonzero,
    prune_smallest,
)


def transcription(entropy, mean_abs, nnz, budget):
    """shared/EGP.md section 3, line by line, in plain Python."""
    amounts = [0.0] * len(nnz)
    waiting = [i for i in range(len(nnz)) if entropy[i] > 0 and nnz[i] > 0]
    s = {i: entropy[i] * mean_abs[i] for i in waiting}
    b = float(budget)
    changed = True
    while changed and waiting:
        changed = False
        t = sum(s[i] for i in waiting)
        x = {i: t / s[i] for i in waiting}
        top = max(x.values())
        e = {i: math.exp(x[i] - top) for i in waiting}
        z = sum(e.values())
        for i in waiting:
            amounts[i] = b * e[i] / z
        emptied = [i for i in waiting if nnz[i] < amounts[i]]
        for i in emptied:
            amounts[i] = nnz[i]
            b -= nnz[i]
            waiting.remove(i)
            changed = True
    return amounts


CASES = {
    # entropies, mean |w|, nnz, budget
    "balanced": ([0.9, 0.8, 0.95], [0.10, 0.12, 0.11], [1000, 2000, 3000], 1500),
    # layer 0 has the smallest s by far and only 50 weights: it runs out and the rest is shared
    "runs_out": ([0.05, 0.9, 0.95, 0.7], [0.01, 0.2, 0.3, 0.25], [50, 4000, 4000, 800], 2000),
    # layer 1 has zero entropy: it takes nothing; layer 3 is already empty
    "zero_entropy": ([0.6, 0.0, 0.7, 0.5], [0.2, 0.01, 0.3, 0.0], [500, 900, 700, 0], 600),
    # a cascade: two layers empty one after the other
    "cascade": ([0.3, 0.31, 0.9, 0.95], [0.1, 0.1, 0.2, 0.2], [100, 150, 2000, 2000], 1200),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_allocation_matches_transcription(case):
    h, m, n, b = CASES[case]
    got = egp_allocation(np.array(h), np.array(m), np.array(n), b)
    want = transcription(h, m, n, b)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    assert (got <= np.array(n) + 1e-9).all(), "never more than a layer holds"
    assert got.sum() == pytest.approx(b)


def test_runs_out_layer_is_emptied_and_rest_redistributed():
    h, m, n, b = CASES["runs_out"]
    got = egp_allocation(np.array(h), np.array(m), np.array(n), b)
    assert got[0] == 50
    assert got[1:].sum() == pytest.approx(b - 50)


def test_zero_entropy_and_empty_layers_get_nothing():
    h, m, n, b = CASES["zero_entropy"]
    got = egp_allocation(np.array(h), np.array(m), np.array(n), b)
    assert got[1] == 0 and got[3] == 0


def test_softmax_is_sharp_towards_lowest_importance():
    got = egp_allocation(np.array([0.5, 0.9]), np.array([0.1, 0.1]), np.array([10_000, 10_000]), 1000)
    # x = T/s: 2.8 vs 1.556, so layer 0 takes e^1.244 / (1 + e^1.244) of the budget
    share = math.exp(1.4 / 0.5 - 1.4 / 0.9)
    assert got[0] == pytest.approx(1000 * share / (1 + share))


def test_integer_amounts_spend_exact_budget_within_capacity():
    amounts = np.array([10.4, 20.3, 0.0, 5.3])
    nnz = np.array([11, 100, 50, 5])
    got = integer_amounts(amounts, nnz, 36)
    assert got.sum() == 36
    assert (got <= nnz).all()
    assert got[2] == 0, "layers outside the budget get nothing"
    np.testing.assert_array_equal(got, [11, 20, 0, 5])


def test_prune_smallest_zeroes_smallest_nonzero_and_keeps_zeros():
    rng = np.random.default_rng(0)
    w = np.array([[0.5, -0.1, 0.0], [0.3, -0.9, 0.2]], dtype=np.float32)
    got = prune_smallest(w, 2, rng)
    np.testing.assert_array_equal(got, np.array([[0.5, 0.0, 0.0], [0.3, -0.9, 0.0]], dtype=np.float32))
    assert w[0, 1] == -0.1, "input array untouched"


def test_prune_ties_follow_seed():
    w = np.ones(100, dtype=np.float32)
    a = prune_smallest(w, 10, np.random.default_rng(1))
    b = prune_smallest(w, 10, np.random.default_rng(1))
    c = prune_smallest(w, 10, np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert (a == 0).sum() == (c == 0).sum() == 10
    assert not np.array_equal(a, c)


def test_global_magnitude_counts_match_threshold():
    rng = np.random.default_rng(3)
    weights = [rng.normal(size=50), rng.normal(size=(10, 20)) * 0.1, rng.normal(size=30) * 2]
    counts = global_magnitude_amounts(weights, 120)
    assert counts.sum() == 120
    pooled = np.sort(np.concatenate([np.abs(w).ravel() for w in weights]))
    threshold = pooled[119]
    want = [int((np.abs(w) <= threshold).sum()) for w in weights]
    np.testing.assert_array_equal(counts, want)


def test_mean_abs_ignores_zeros():
    assert mean_abs_nonzero(np.array([0.0, -2.0, 4.0])) == 3.0
    assert mean_abs_nonzero(np.zeros(3)) == 0.0
