"""Pruning budgets and masks (pure numpy), as in shared/EGP.md section 3."""

from __future__ import annotations

import numpy as np

from egp_onnx.prune.permutation import permutation_entries, skip_permutation


def egp_allocation(entropy: np.ndarray, mean_abs: np.ndarray, nnz: np.ndarray, budget: float) -> np.ndarray:
    """Split ``budget`` weights over layers by the entropy-guided rule of the reference.

    Only layers with positive entropy and at least one non-zero weight take part. Importance is
    ``s = entropy * mean_abs``; shares are ``softmax(T / s)`` with ``T = sum(s)``, so the least
    important layers take almost everything. A layer whose share exceeds its non-zero count is
    emptied, leaves, and the rest of the budget is shared again among the others.

    Args:
        entropy: layer entropies H_l.
        mean_abs: mean |w| over each layer's non-zero weights.
        nnz: non-zero weight count per layer.
        budget: weights to remove in this step (B).

    Returns:
        Float amounts per layer (0 for layers outside the budget), summing to ``budget`` unless
        every participating layer is emptied first.

    """
    entropy = np.asarray(entropy, dtype=np.float64)
    mean_abs = np.asarray(mean_abs, dtype=np.float64)
    nnz = np.asarray(nnz, dtype=np.float64)
    amounts = np.zeros_like(nnz)
    waiting = (entropy > 0) & (nnz > 0)
    remaining = float(budget)
    while waiting.any() and remaining > 0:
        idx = np.flatnonzero(waiting)
        s = entropy[idx] * mean_abs[idx]
        a = _softmax_of_inverse(s)
        share = remaining * a
        full = nnz[idx] < share
        if not full.any():
            amounts[idx] = share
            break
        emptied = idx[full]
        amounts[emptied] = nnz[emptied]
        remaining -= float(nnz[emptied].sum())
        waiting[emptied] = False
    return amounts


def _softmax_of_inverse(s: np.ndarray) -> np.ndarray:
    """softmax(T / s) with T = sum(s); where T / s overflows, its limit (equal shares of the top)."""
    with np.errstate(over="ignore", divide="ignore"):
        x = s.sum() / s
    top = np.isinf(x)
    if top.any():
        return top / top.sum()
    a = np.exp(x - x.max())
    return a / a.sum()


def integer_amounts(amounts: np.ndarray, nnz: np.ndarray, budget: int) -> np.ndarray:
    """Round float amounts to whole weights that add up to ``budget`` (where capacity allows).

    The reference floors each amount; the few weights lost to flooring go, one each, to the
    layers with the largest fractional parts that still have weights (largest remainder), so
    that a step removes exactly its budget and the final sparsity is the one asked for.
    """
    amounts = np.asarray(amounts, dtype=np.float64)
    nnz = np.asarray(nnz, dtype=np.int64)
    result = np.minimum(np.floor(amounts).astype(np.int64), nnz)
    short = int(budget) - int(result.sum())
    if short <= 0:
        return result
    order = np.argsort(-(amounts - np.floor(amounts)), kind="stable")
    for i in order:
        if short == 0:
            break
        if amounts[i] > 0 and result[i] < nnz[i]:
            result[i] += 1
            short -= 1
    return result


def prune_smallest(weights: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``weights`` with its ``count`` smallest-magnitude non-zero entries zeroed.

    Equal magnitudes are ordered by a seeded permutation of the non-zero entries (in flat order),
    drawn from ``rng`` whenever ``count > 0``. Only the ties at the threshold consult it: the
    threshold comes from a partition (O(n)), not a sort, with the result a full sort by
    (|w|, permutation) would give, and only their entries of the permutation are computed
    (:mod:`egp_onnx.prune.permutation`; ``rng`` advances as ``rng.permutation`` advances it).
    """
    result = weights.copy()
    if count <= 0:
        return result
    flat = result.reshape(-1)
    nonzero = flat != 0
    candidates = int(np.count_nonzero(nonzero))
    if count >= candidates:
        skip_permutation(rng, candidates)  # the draws of the tie order, used or not
        flat[nonzero] = 0
        return result
    magnitude = np.abs(flat)
    # Zeros (and -0.0) sort first, NaN last: the count-th smallest non-zero magnitude is at
    # position zeros + count - 1 of the whole layer's order.
    k = flat.size - candidates + count - 1
    threshold = np.partition(magnitude, k)[k]
    if np.isnan(threshold):
        chosen, ties = ~np.isnan(magnitude), np.flatnonzero(np.isnan(magnitude))
    else:
        chosen, ties = magnitude < threshold, np.flatnonzero(magnitude == threshold)
    chosen &= nonzero  # -0.0 stays as it is
    need = count - int(np.count_nonzero(chosen))
    if need < ties.size:  # break the ties by the permutation, indexed by rank among the non-zeros
        ranks = ties - np.searchsorted(np.flatnonzero(~nonzero), ties)
        ties = ties[np.argpartition(permutation_entries(rng, candidates, ranks), need - 1)[:need]]
    else:
        skip_permutation(rng, candidates)
    chosen[ties] = True
    flat[chosen] = 0
    return result


def global_magnitude_amounts(
    weights: list[np.ndarray], budget: int, capacity: np.ndarray | None = None
) -> np.ndarray:
    """Per-layer counts that remove the ``budget`` smallest |w| over all layers together.

    ``capacity`` caps how many weights each layer may lose (see :func:`capacities`).

    Ties at the threshold go to the earlier layers, so the counts add up to exactly ``budget``.
    The threshold comes from a partition of the pooled magnitudes (O(n), one copy of them).
    """
    # Candidates: each layer's non-zero magnitudes, or only its `capacity` smallest.
    candidates = [np.abs(w[w != 0]).ravel() for w in weights]
    if capacity is not None:
        candidates = [
            v if c >= v.size else np.partition(v, max(int(c) - 1, 0))[: max(int(c), 0)]
            for v, c in zip(candidates, capacity, strict=True)
        ]
    total = sum(v.size for v in candidates)
    budget = min(int(budget), total)
    counts = np.zeros(len(weights), dtype=np.int64)
    if budget <= 0:
        return counts
    pooled = np.concatenate(candidates)
    pooled.partition(budget - 1)
    threshold = pooled[budget - 1]
    del pooled
    ties = np.zeros(len(weights), dtype=np.int64)
    for i, v in enumerate(candidates):
        if np.isnan(threshold):
            counts[i] = np.count_nonzero(~np.isnan(v))
            ties[i] = np.count_nonzero(np.isnan(v))
        else:
            counts[i] = np.count_nonzero(v < threshold)
            ties[i] = np.count_nonzero(v == threshold)
    left = budget - int(counts.sum())
    for i in range(len(weights)):
        take = min(int(ties[i]), left)
        counts[i] += take
        left -= take
    return counts


def capacities(nnz: np.ndarray, sizes: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """How many more weights each layer may lose before its sparsity exceeds its limit."""
    keep = np.ceil((1.0 - np.asarray(limits, dtype=np.float64)) * sizes - 1e-9).astype(np.int64)
    return np.clip(np.asarray(nnz, dtype=np.int64) - keep, 0, None)


def mean_abs_nonzero(weights: np.ndarray) -> float:
    """Mean |w| over the non-zero weights (0 for an empty layer)."""
    if np.count_nonzero(weights) == weights.size:  # dense: the same values in the same order, no gather
        nz = np.ravel(weights)
    else:
        nz = weights[weights != 0]
    return float(np.abs(nz).mean()) if nz.size else 0.0
