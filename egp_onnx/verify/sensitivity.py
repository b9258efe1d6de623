"""Per-layer sensitivity: how far each layer may be pruned alone before the held-out outputs move.

EGP's budget goes to the layers of lowest entropy first, and empties them whole. Some layers
cannot be emptied without retraining, and no refit gives back what an empty layer lost: a
squeeze-excitation gate becomes a constant per-channel scale, an expansion or depthwise stage
feeds its block nothing. Such layers are found by measurement before the loop spends anything on
them: each layer alone is pruned (by magnitude, no refit) to a few sparsity levels, highest first,
and the held-out data says how much of the guard's slack that takes. The highest level that
takes at most :data:`SHARE` of it is the layer's cap; the budget never goes past it. Entropy still
decides where the budget goes; the cap only says where it cannot.

The caps are measured only when the held-out data are few (:data:`ENOUGH_SAMPLES`): they stand
in for held-out samples. A loop that judges many candidates on a few hundred of them keeps the
lucky ones, and its estimate of unseen agreement drifts above what unseen data show once the run
goes far; capping each layer where pruning it alone moves those samples keeps the run where the
estimate still holds. With enough held-out samples the estimate holds without them, and the caps
only cost sparsity (README "The guard", measured on both Fashion-MNIST models and MNIST).

The measurement is one held-out run per layer and level tried; most layers pass the first level
(emptied) or are already capped by the graph (:mod:`egp_onnx.prune.limits`), which skips them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from egp_onnx.graph.weights import replace_initializers
from egp_onnx.report.records import Fidelity, LayerBlame
from egp_onnx.verify.fidelity import PROBABILITY, Reference

log = logging.getLogger(__name__)

#: Sparsity levels tried per layer, highest first. They are measured without the refit, which
#: gives back much of what a partly pruned layer loses (nothing of an emptied one): a layer that
#: fails them all is capped at the last, and the guard judges the refit steps.
LEVELS = (1.0, 0.9, 0.75, 0.5)
#: The share of the guard's slack (1 - min agreement, or the largest relative error) one layer
#: pruned alone may take: many layers are pruned together, and their damage adds up.
SHARE = 0.25
#: Held-out samples a layer is measured on (the first of the reference), and at most this many
#: input values: 290 of the cls model's 3x48x192 lines, 3 of the det model's 3x736x1000 pages.
SAMPLES = 256
ELEMENTS = 8_000_000
#: Held-out samples from which the caps are not measured unless asked for (``sensitivity=True``):
#: on 500, runs without them stated estimates well above unseen agreement; on 1000, as close to it
#: as runs with them, and further pruned (README "The guard").
ENOUGH_SAMPLES = 1000


def caps_wanted(sensitivity: bool | None, held_samples: int) -> bool:
    """Whether to measure the caps: as asked, or (None) with fewer than :data:`ENOUGH_SAMPLES` held out."""
    return held_samples < ENOUGH_SAMPLES if sensitivity is None else sensitivity


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's measured cap: the highest level it passed (the lowest tried if none) and its damage."""

    weight: str
    cap: float
    damage: float  # share of the guard's slack at the first level tried (1.0: emptied)


def damage(
    fidelity: Fidelity, min_agreement: float | None, max_rel_error: float | None, min_iou: float | None = None
) -> float:
    """The share of the guard's slack ``fidelity`` takes: 0 unchanged, 1 at the guard's limit.

    A guard without slack (agreement 1, relative error 0, IoU 1) makes any change infinite damage.
    With ``min_iou``, probability maps count by their region IoU, not their relative error.
    """
    shares = [0.0]
    if min_agreement is not None and fidelity.top1_agreement is not None:
        shares.append(_share(1.0 - fidelity.top1_agreement, 1.0 - min_agreement))
    if min_iou is not None:
        shares.extend(_share(1.0 - o.iou, 1.0 - min_iou) for o in fidelity.outputs if o.iou is not None)
    if max_rel_error is not None:
        if min_iou is None:
            shares.append(_share(fidelity.rel_error, max_rel_error))
        else:
            rel = [o.rel_error for o in fidelity.outputs if o.kind != PROBABILITY]
            shares.append(_share(max(rel, default=0.0), max_rel_error))
    return max(shares)


def _share(used: float, slack: float) -> float:
    if slack > 0:
        return used / slack
    return float("inf") if used > 0 else 0.0


def sensitivity_caps(
    model: onnx.ModelProto,
    weights: Mapping[str, np.ndarray],
    limits: Mapping[str, float],
    reference: Reference,
    min_agreement: float | None,
    max_rel_error: float | None,
    levels: Sequence[float] = LEVELS,
    share: float = SHARE,
    min_iou: float | None = None,
) -> list[LayerSensitivity]:
    """Each layer's measured cap, for the layers the graph lets go past the lowest level.

    Args:
        model: the original.
        weights: the prunable layers' weights by initializer name (as ``model`` holds them).
        limits: the graph's limits (:func:`egp_onnx.prune.limits.sparsity_limits`); only levels
            below a layer's limit are tried.
        reference: the original's outputs on the held-out data.
        min_agreement: the guard's agreement threshold (None: not used).
        max_rel_error: the guard's relative-error threshold (None: not used).
        levels: the sparsity levels tried, highest first.
        share: the share of the guard's slack a layer alone may take.
        min_iou: the guard's region-IoU threshold for probability maps (None: not used).

    """
    subset = reference.head(SAMPLES, ELEMENTS)
    caps = []
    for name, weight in weights.items():
        tried = [level for level in levels if level <= limits.get(name, 1.0)]
        if not tried or not np.count_nonzero(weight):
            continue
        cap, first = tried[-1], None
        for level in tried:
            pruned = _magnitude(weight, level)
            fidelity = subset.evaluate(replace_initializers(model, {name: pruned}))
            measured = damage(fidelity, min_agreement, max_rel_error, min_iou)
            first = measured if first is None else first
            if measured <= share:
                cap = level
                break
        if cap < tried[0]:
            log.info(
                "layer %s: capped at sparsity %.2f (emptied alone it takes %.2f of the guard)",
                name,
                cap,
                first,
            )
        caps.append(LayerSensitivity(name, cap, float(first or 0.0)))
    return caps


def _magnitude(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """``weight`` with its ``sparsity`` smallest-magnitude entries zeroed."""
    out = np.array(weight, copy=True)
    flat = out.reshape(-1)
    drop = int(round(sparsity * flat.size))
    if drop >= flat.size:
        return np.zeros_like(out)
    if drop > 0:
        flat[np.argpartition(np.abs(flat), drop - 1)[:drop]] = 0
    return out


def layer_blame(
    candidate: onnx.ModelProto,
    accepted: Mapping[str, np.ndarray],
    removed: Mapping[str, int],
    reference: Reference,
    min_agreement: float | None,
    max_rel_error: float | None,
    top: int = 8,
    min_iou: float | None = None,
) -> list[LayerBlame]:
    """Which layers of a rejected step hurt most: each put back alone, and what the guard then reads.

    Args:
        candidate: the rejected step's model.
        accepted: the weights before the step, by initializer name.
        removed: weights the step removed per layer; the ``top`` layers that lost most are measured.
        reference: the original's outputs on the held-out data.
        min_agreement: the guard's agreement threshold (None: not used).
        max_rel_error: the guard's relative-error threshold (None: not used).
        top: how many layers are measured.
        min_iou: the guard's region-IoU threshold for probability maps (None: not used).

    Returns:
        the measured layers, the one whose restoring helps most first.

    """
    subset = reference.head(SAMPLES, ELEMENTS)
    blamed = []
    for name in sorted(removed, key=lambda n: -removed[n])[:top]:
        fidelity = subset.evaluate(replace_initializers(candidate, {name: accepted[name]}))
        share = damage(fidelity, min_agreement, max_rel_error, min_iou)
        blamed.append((share, fidelity.rel_error, name, fidelity))
    blamed.sort(key=lambda b: (b[0], b[1]))
    return [
        LayerBlame(
            weight=name,
            removed=removed[name],
            rel_error=fidelity.rel_error,
            top1_agreement=fidelity.top1_agreement,
            samples=fidelity.samples,
        )
        for _, _, name, fidelity in blamed
    ]
