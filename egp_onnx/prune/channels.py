"""How many channels each group loses in a step, and which: the EGP budget over channel groups.

Pure numpy. A group (graph/channels.py) takes the place of a layer in EGP's rule
(shared/EGP.md section 3): its entropy is the mean binary entropy of its rectifier's
non-constant channels, and its "magnitude" the mean cost of its channels, the rise of the
consumers' least-squares residual when a channel goes and they are refit
(reconstruct/channels.py). Shares are softmax(T / s) with s = entropy * mean cost, so the groups
whose channels are cheapest and least informative lose the most. Within a group the cheapest
channels go first. Always-OFF channels cost nothing and leave first, outside the budget.
"""

from __future__ import annotations

import math

import numpy as np

from egp_onnx.prune.budget import egp_allocation, integer_amounts

#: At most this fraction of a group's remaining channels leaves in one step: the refit of its
#: consumers is measured against what it can absorb, which shrinks as the group narrows.
MAX_STEP_SHARE = 0.5


def channel_capacity(alive: np.ndarray, channels: np.ndarray, layer_cap: float) -> np.ndarray:
    """How many more channels each group may lose: every group keeps ``1 - layer_cap`` (and 1)."""
    alive = np.asarray(alive, dtype=np.int64)
    floor = np.array([max(1, math.ceil((1.0 - layer_cap) * c - 1e-9)) for c in channels], dtype=np.int64)
    return np.maximum(alive - floor, 0)


def step_amounts(
    entropy: np.ndarray, mean_cost: np.ndarray, capacity: np.ndarray, alive: np.ndarray, step: float
) -> np.ndarray:
    """Channels each group loses in this step: ``step`` of what the groups may lose, by EGP shares.

    No group loses more than :data:`MAX_STEP_SHARE` of its ``alive`` channels (at least one).
    """
    alive = np.asarray(alive, dtype=np.int64)
    cap = np.minimum(capacity, np.maximum(1, np.floor(MAX_STEP_SHARE * alive).astype(np.int64)))
    cap = np.where(np.asarray(capacity) > 0, cap, 0)
    open_ = (np.asarray(entropy) > 0) & (cap > 0)
    if not open_.any():
        return np.zeros_like(alive)
    budget = max(1, int(math.floor(step * float(cap[open_].sum()))))
    amounts = egp_allocation(np.where(open_, entropy, 0.0), mean_cost, cap, budget)
    return integer_amounts(amounts, cap, budget)


def cheapest(costs: np.ndarray, count: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``count`` cheapest channels (ties in channel order), skipping ``exclude``."""
    order = np.argsort(np.asarray(costs, dtype=np.float64), kind="stable")
    if exclude is not None and exclude.size:
        order = order[~np.isin(order, exclude)]
    return np.sort(order[: max(0, count)])


#: Groups whose channel count is a multiple of this keep a multiple of it. onnxruntime's CPU
#: convolutions run a blocked channel layout (NCHWc: blocks of 16 with AVX-512, 8 with AVX2;
#: 16 serves both) only on whole blocks; off it a narrower conv can run slower than the dense one.
#: On the MNIST sample (AVX-512, 1 thread, batch 32, README "Channel removal"): every group kept
#: at multiples of 8 (1.75M MACs) ran 1.09-1.11x dense, at multiples of 16 (2.59M MACs) 1.47-1.82x.
CHANNEL_MULTIPLE = 16


def aligned_count(channels: int, alive: int, want: int, floor: int, multiple: int | None = None) -> int:
    """How many of ``alive`` channels to remove when ``want`` are asked for, keeping the alignment.

    A group of ``channels`` (its original count) that is a multiple of ``multiple`` keeps a
    multiple of it: the kept count is rounded to the nearest multiple (up on a tie); if that
    removes nothing while something was asked, one multiple lower, when ``floor`` allows it.
    Other groups lose exactly ``want`` (at most down to ``floor``). ``multiple``: default
    :data:`CHANNEL_MULTIPLE`.
    """
    multiple = CHANNEL_MULTIPLE if multiple is None else multiple
    want = max(0, min(want, alive - floor))
    if want == 0 or channels % multiple or multiple <= 1:
        return want
    kept = alive - want
    rounded = int(np.floor(kept / multiple + 0.5)) * multiple
    if rounded >= alive:
        rounded = (alive - 1) // multiple * multiple
    if rounded < max(floor, multiple):
        return 0
    return alive - rounded


def exact_count(channels: int, alive: int, dead: int, multiple: int | None = None) -> int:
    """How many of ``dead`` always-OFF channels to remove with nothing else: as many as keep the alignment."""
    multiple = CHANNEL_MULTIPLE if multiple is None else multiple
    dead = max(0, min(dead, alive - 1))
    if channels % multiple or multiple <= 1:
        return dead
    kept = max(multiple, -(-(alive - dead) // multiple) * multiple)
    return max(0, min(dead, alive - kept))
