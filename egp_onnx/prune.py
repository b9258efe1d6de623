"""Pruning budgets and masks (pure numpy), as in shared/EGP.md section 3."""

from __future__ import annotations

import numpy as np


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


def magnitude_order(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of the non-zero weights, smallest |w| first; equal |w| in seeded order."""
    flat = np.abs(weights.ravel())
    candidates = np.flatnonzero(flat)
    tie_break = rng.permutation(candidates.size)
    order = np.lexsort((tie_break, flat[candidates]))
    return candidates[order]


def prune_smallest(weights: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``weights`` with its ``count`` smallest-magnitude non-zero entries zeroed."""
    result = weights.copy()
    if count <= 0:
        return result
    order = magnitude_order(weights, rng)
    flat = result.reshape(-1)
    flat[order[:count]] = 0
    return result


def global_magnitude_amounts(
    weights: list[np.ndarray], budget: int, capacity: np.ndarray | None = None
) -> np.ndarray:
    """Per-layer counts that remove the ``budget`` smallest |w| over all layers together.

    ``capacity`` caps how many weights each layer may lose (see :func:`capacities`).

    Ties at the threshold go to the earlier layers, so the counts add up to exactly ``budget``.
    """
    nonzero = [np.abs(w[w != 0]).ravel() for w in weights]
    if capacity is not None:  # only a layer's `capacity` smallest weights are candidates
        nonzero = [v if c >= v.size else np.partition(v, max(int(c) - 1, 0))[: max(int(c), 0)]
                   for v, c in zip(nonzero, capacity, strict=True)]
    total = sum(v.size for v in nonzero)
    budget = min(int(budget), total)
    counts = np.zeros(len(weights), dtype=np.int64)
    if budget <= 0:
        return counts
    pooled = np.concatenate(nonzero)
    owner = np.concatenate([np.full(v.size, i) for i, v in enumerate(nonzero)])
    order = np.lexsort((owner, pooled))[:budget]
    np.add.at(counts, owner[order], 1)
    return counts


def capacities(nnz: np.ndarray, sizes: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """How many more weights each layer may lose before its sparsity exceeds its limit."""
    keep = np.ceil((1.0 - np.asarray(limits, dtype=np.float64)) * sizes - 1e-9).astype(np.int64)
    return np.clip(np.asarray(nnz, dtype=np.int64) - keep, 0, None)


def mean_abs_nonzero(weights: np.ndarray) -> float:
    """Mean |w| over the non-zero weights (0 for an empty layer)."""
    nz = weights[weights != 0]
    return float(np.abs(nz).mean()) if nz.size else 0.0
