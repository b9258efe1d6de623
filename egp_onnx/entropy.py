"""Entropy of rectifier channels from ON counts (pure numpy), as in shared/EGP.md section 2."""

from __future__ import annotations

import numpy as np

#: The reference clamps p and 1 - p at this value inside the logarithm.
CLAMP = 1e-5


def on_fraction(on_counts: np.ndarray, totals: np.ndarray | int) -> np.ndarray:
    """Fraction of ON events per channel; ``totals`` is the number of events per channel."""
    counts = np.asarray(on_counts, dtype=np.float64)
    total = np.asarray(totals, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, counts / np.where(total > 0, total, 1.0), 0.0)


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """h(p) = -p log2 p - (1 - p) log2 (1 - p), with the reference clamp inside the logs."""
    p = np.asarray(p, dtype=np.float64)
    q = 1.0 - p
    return -p * np.log2(np.maximum(p, CLAMP)) - q * np.log2(np.maximum(q, CLAMP))


def constant_channels(on_counts: np.ndarray, totals: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """Masks (always_on, always_off) over channels, decided on exact counts."""
    counts = np.asarray(on_counts)
    total = np.broadcast_to(np.asarray(totals), counts.shape)
    return counts == total, counts == 0


def layer_entropy(on_counts: np.ndarray, totals: np.ndarray | int) -> float:
    """Mean binary entropy over the channels that are not constant; 0 if all are constant."""
    always_on, always_off = constant_channels(on_counts, totals)
    varying = ~(always_on | always_off)
    if not varying.any():
        return 0.0
    p = on_fraction(on_counts, totals)[varying]
    return float(binary_entropy(p).mean())
