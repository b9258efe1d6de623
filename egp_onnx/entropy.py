"""ON counts of rectifier channels and their entropy (pure numpy), as in shared/EGP.md section 2."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChannelCounts:
    """ON events per channel of one rectifier input, over the whole calibration set."""

    on: np.ndarray  # int64, shape (C,)
    total: int  # events per channel (samples x spatial positions)

    def merged(self, other: ChannelCounts) -> ChannelCounts:
        """Counts of two disjoint data sets together."""
        return ChannelCounts(self.on + other.on, self.total + other.total)


@dataclass(frozen=True)
class Statistics:
    """Counts per rectifier name, and how many samples produced them."""

    counts: dict[str, ChannelCounts]
    samples: int

    def merged(self, other: Statistics) -> Statistics:
        """Statistics of two disjoint data sets together (the same rectifiers)."""
        if self.counts.keys() != other.counts.keys():
            raise ValueError("statistics of different rectifiers cannot be merged")
        counts = {k: v.merged(other.counts[k]) for k, v in self.counts.items()}
        return Statistics(counts, self.samples + other.samples)


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
