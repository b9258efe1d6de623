"""The solver, pure numpy: ridge least squares of every output on its own support, and OBS masks.

For one output y with kept weight columns S of the normal equations (G = A~^T A~, c = A~^T y),
the refit weights are w_S = (G_SS + lambda I_S)^-1 c_S and w = 0 off S, with lambda
(:func:`ridge`) on the weight columns only: the bias column is always kept and unregularised.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from egp_onnx.runtime.threads import PARTS, map_parts

#: Ridge strength relative to the mean diagonal of the Gram matrix over the weight columns.
RIDGE = 1e-3
#: Rounds of OBS selection: drop a share of the count, re-solve, repeat.
OBS_ROUNDS = 3


def ridge(gram: np.ndarray, bias: bool) -> float:
    """The ridge strength: RIDGE * mean(diag G) over the weight columns (the bias, last, left out)."""
    weight_diag = np.diag(gram)[: gram.shape[0] - int(bias)]
    return RIDGE * float(weight_diag.mean()) if weight_diag.size else 0.0


def solve_masked(
    gram: np.ndarray, cross: np.ndarray, support: np.ndarray, bias: bool, inverse: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Ridge solution of every output on its own support; optionally diag of the inverses (OBS).

    Args:
        gram: (d, d) with the bias last when ``bias``.
        cross: (d, outputs).
        support: (columns, outputs) bool, the kept weights of each output.
        bias: whether the last column is the (always kept, unregularised) bias.
        inverse: also return the diagonal of each output's inverse system.

    Returns:
        The solution (d, outputs), exactly 0 off the support, and the inverses' diagonals (same
        shape) or None.

    """
    d, outputs = cross.shape
    lam = ridge(gram, bias)
    keep = np.ones((d, outputs), dtype=bool)
    keep[: support.shape[0]] = support
    regular = np.zeros(d)
    regular[: support.shape[0]] = lam
    if keep.all() and not inverse:  # one system for every output
        return stable_solve(gram + np.diag(regular), cross), None
    solution = np.zeros((d, outputs))
    diag = np.zeros((d, outputs)) if inverse else None
    # Each output's system is its support's rows and columns of the Gram matrix. Outputs are
    # taken in order of support size and solved in batches, each system padded to the batch's
    # largest with identity rows (which solve to 0), so the cost follows the kept weights.
    sizes = keep.sum(axis=0)
    order = np.argsort(sizes, kind="stable")
    largest = max(1, int(sizes.max()))
    chunk = max(1, int(2**23 // (largest * largest)))  # systems per batched call: at most 64 MiB
    # Padding entries index row and column d, zero in these copies, so a gather builds the systems.
    padded = np.zeros((d + 1, d + 1))
    padded[:d, :d] = gram
    padded_cross = np.zeros((d + 1, outputs))
    padded_cross[:d] = cross
    # Batches of sizes in order, each split in PARTS solved at once (the smaller systems first).
    batches = [
        part
        for start in range(0, outputs, chunk)
        for part in np.array_split(order[start : start + chunk], PARTS)
        if part.size
    ]
    solve = partial(_solve_batch, padded, padded_cross, keep, sizes, regular, inverse)
    for where, values, inverse_diag in map_parts(solve, batches):
        solution[where] = values
        if diag is not None and inverse_diag is not None:
            diag[where] = inverse_diag
    solution[~keep] = 0.0
    return solution, diag


def _solve_batch(
    padded: np.ndarray,
    padded_cross: np.ndarray,
    keep: np.ndarray,
    sizes: np.ndarray,
    regular: np.ndarray,
    inverse: bool,
    cols: np.ndarray,
) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray | None]:
    """The solutions of outputs ``cols``: where they go, their values, the inverses' diagonals.

    ``padded`` is G with a zero row and column d appended (``padded_cross`` C with a zero row d):
    padding entries index them, so one gather builds every output's system.
    """
    d = padded.shape[0] - 1
    m = max(1, int(sizes[cols].max()))
    idx = np.argsort(~keep[:, cols].T, axis=1, kind="stable")[:, :m]  # support first, in order
    valid = np.arange(m)[None, :] < sizes[cols][:, None]
    at = np.where(valid, idx, d)
    systems = padded[at[:, :, None], at[:, None, :]]
    diagonal = np.arange(m)
    systems[:, diagonal, diagonal] += np.where(valid, regular[idx], 1.0)
    rhs = padded_cross[at, cols[:, None]][:, :, None]
    where = (idx[valid], np.broadcast_to(cols[:, None], idx.shape)[valid])
    if not inverse:
        return where, stable_solve(systems, rhs)[:, :, 0][valid], None
    inv = np.linalg.inv(systems)
    return where, (inv @ rhs)[:, :, 0][valid], np.diagonal(inv, axis1=1, axis2=2)[valid]


def stable_solve(systems: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """np.linalg.solve, falling back to least squares (pinv) when a system is singular."""
    try:
        return np.linalg.solve(systems, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(systems) @ rhs


def residual_error(gram: np.ndarray, cross: np.ndarray, target_sq: np.ndarray, w: np.ndarray) -> float:
    """Sum over outputs of ||A~ w - y||^2 = w^T G w - 2 w^T c + y^T y, from the normal equations."""
    quad = ((gram @ w) * w).sum(axis=0)
    return float((quad - 2 * (w * cross).sum(axis=0) + target_sq).sum())


def obs_masks(
    gram: np.ndarray, cross: np.ndarray, bias: bool, current: np.ndarray, remove: int
) -> np.ndarray:
    """Kept-weight masks after dropping ``remove`` weights by OBS saliency, in rounds.

    Each round re-solves on the support and drops the share of the count with the least
    saliency w_i^2 / [(G_SS + lambda I)^-1]_ii (a weight whose inverse diagonal is not positive
    costs nothing to drop).

    Args:
        gram: (groups, d, d) per group, the bias last when ``bias``.
        cross: (groups, d, outputs per group).
        bias: whether the last column is the bias.
        current: (groups, d, outputs per group) including the bias row when the layer has one.
        remove: how many weights to drop over all groups.

    """
    columns = current.shape[1] - int(bias)
    support = np.ascontiguousarray(current[:, :columns] != 0)
    left = remove
    for round_ in range(OBS_ROUNDS):
        if left <= 0:
            break
        share = int(np.ceil(left / (OBS_ROUNDS - round_)))
        saliency = np.full(support.shape, np.inf)
        for g in range(support.shape[0]):
            solution, inv_diag = solve_masked(gram[g], cross[g], support[g], bias, inverse=True)
            assert inv_diag is not None
            w, h = solution[:columns], inv_diag[:columns]
            with np.errstate(divide="ignore", invalid="ignore"):
                saliency[g] = np.where(support[g] & (h > 0), w**2 / h, np.inf)
            saliency[g][support[g] & ~(h > 0)] = 0.0
        flat = saliency.ravel()
        kept = np.flatnonzero(np.isfinite(flat))
        share = min(share, kept.size)
        drop = kept[np.argsort(flat[kept], kind="stable")[:share]]
        support.flat[drop] = False
        left -= share
    return support


def block_costs(gram: np.ndarray, cross: np.ndarray, bias: bool, blocks: list[np.ndarray]) -> np.ndarray:
    """The rise of the residual error when each block of weight columns is removed and the rest refit.

    With H = G + lambda I (ridge on the weight columns) and W = H^-1 C the full ridge solution,
    forcing the columns B of every output to 0 and re-solving the others raises
    sum over outputs of ||A~ w - y||^2 by trace(W_B^T [(H^-1)_BB]^-1 W_B) (group OBS: exact for
    the quadratic). A channel the other inputs can stand in for costs little; a dead one nothing.

    Args:
        gram: (d, d), the bias last when ``bias``.
        cross: (d, outputs).
        bias: whether the last column is the (unregularised) bias.
        blocks: the weight columns of each block (e.g. one input channel's k_h * k_w taps).

    Returns:
        The cost of each block (>= 0), in the target's squared units.

    """
    d = gram.shape[0]
    regular = np.zeros(d)
    regular[: d - int(bias)] = ridge(gram, bias)
    system = gram + np.diag(regular)
    try:
        inverse = np.linalg.inv(system)
    except np.linalg.LinAlgError:
        inverse = np.linalg.pinv(system)
    w = inverse @ cross
    costs = np.zeros(len(blocks))
    for k, block in enumerate(blocks):
        inner = inverse[np.ix_(block, block)]
        w_b = w[block]
        try:
            costs[k] = float(np.sum(w_b * np.linalg.solve(inner, w_b)))
        except np.linalg.LinAlgError:
            costs[k] = float(np.sum(w_b * (np.linalg.pinv(inner) @ w_b)))
    return np.maximum(costs, 0.0)
