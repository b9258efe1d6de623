"""Layer-wise reconstruction: re-solve the kept weights so each layer reproduces the dense model.

This is shared/RECONSTRUCT.md. After a pruning step, every Conv/Gemm/MatMul from the first pruned
layer on is refit in topological order by ridge least squares: its input is the activation of the
*current* model (upstream layers already refit), its target the *dense* model's output of the same
layer, and for a layer that ends a residual branch, the dense Add output minus the current
shortcut, so the branch also absorbs the shortcut's error. Pruned weights stay exactly zero.

Gram matrices are streamed into float64 sums (reconstruct/normal.py) of im2col rows
(reconstruct/im2col.py) and solved on each output's support (reconstruct/solve.py). Every layer
sees the first ``MAX_SAMPLES`` samples (reconstruct/parts.py; rounded up to a whole batch); a
conv layer about ``ROWS_PER_COLUMN`` rows per column of its normal equations (seeded output
positions; samples of several sizes get positions in proportion to their output area, each
batch one size). The
activations of the current and the dense model stay in memory from one layer to the next
(egp_onnx.runtime.segments), so a step runs each node of both models once over those samples.
Per-channel affine ops between a layer and its target (BatchNormalization, Mul/Add/Sub/Div by
constants) are folded into the target rather than into the weights: with an unregularised bias
the ridge solution scales with the target column, so this equals solving with BN folded, and the
graph keeps its structure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import onnx

from egp_onnx.graph.layers import LinearLayer, linear_layers
from egp_onnx.graph.weights import replace_initializers, split_weights
from egp_onnx.load.calibration import CalibrationData
from egp_onnx.prune.budget import prune_smallest
from egp_onnx.reconstruct.normal import MIN_ROWS_PER_COLUMN, NormalEquations, enough_rows
from egp_onnx.reconstruct.parts import ClusterSums, LocalSums, PartSums, first_samples, part_size
from egp_onnx.reconstruct.solve import obs_masks, residual_error, solve_masked
from egp_onnx.report.records import LayerFit
from egp_onnx.runtime.threads import one_blas_thread

if TYPE_CHECKING:
    from egp_onnx.runtime.cluster import Cluster

log = logging.getLogger(__name__)

#: Layers wider than this (columns of the normal equations) are left as they are: the Gram matrix
#: alone would take WIDTH_LIMIT^2 * 8 bytes (128 MiB at 4096).
WIDTH_LIMIT = 4096
#: A refit layer's status when no weight is left (its bias alone was fit).
EMPTIED = "refit: bias only, no weights left"


@dataclass(frozen=True)
class ReconstructionResult:
    """The refit model and a record per layer."""

    model: onnx.ModelProto
    fits: tuple[LayerFit, ...]


def reconstruct(
    dense: onnx.ModelProto,
    current: onnx.ModelProto,
    data: CalibrationData,
    batch_size: int,
    *,
    remove: Mapping[str, int],
    masked: Iterable[str],
    select: str = "magnitude",
    seed: int = 0,
    on_layer: Callable[[str], None] | None = None,
    known: Mapping[str, np.ndarray] | None = None,
    cluster: Cluster | None = None,
) -> ReconstructionResult:
    """Prune ``remove[weight]`` weights of each named layer, then refit the layers from there on.

    Args:
        dense: the original model: the targets.
        current: the model being compressed (same graph as ``dense``, other values).
        data: calibration data to fit on.
        batch_size: samples per onnxruntime call.
        remove: per weight initializer, how many of its non-zero weights to prune now.
        masked: weight initializers whose zeros are pruned weights (they stay zero); other layers
            are refit on their full support.
        select: ``magnitude`` (smallest |w| first, before the fit) or ``obs`` (OBS saliency on the
            normal equations, in rounds).
        seed: position subsample and magnitude tie order.
        on_layer: called with each layer's name as its refit starts (progress).
        known: values of ``current``'s initializers already read (e.g. the loop's weights): they
            are used as they are instead of being read and copied again (never written).
        cluster: sum the normal equations per part of the data on this Dask cluster
            (reconstruct/parts.py): the same sums, so the same model, as without it.

    Returns:
        The new model (``current`` is not modified) and a record per layer from the first pruned
        one on (layers that cannot be refit say why; a count they were given is removed by
        magnitude).

    """
    layers, skipped = linear_layers(current)
    rng = np.random.default_rng(seed)
    first = next((i for i, layer in enumerate(layers) if remove.get(layer.weight, 0) > 0), None)
    todo = [] if first is None else layers[first:]
    changing = [n for layer in layers for n in (layer.weight, layer.bias) if n]
    changing_names = [*changing, *(w for w, _ in skipped.values())]
    ours, values = split_weights(current, always=changing_names, known=known)
    original = dict(values)  # the arrays themselves are never modified, only replaced in ``values``
    updates = _prune_unrefittable(values, [w for w, _ in skipped.values()], remove, rng)
    values.update(updates)
    fits = [LayerFit(name, 0, 0, None, None, f"not refit: {why}") for name, (_, why) in skipped.items()]
    if todo:
        sums: PartSums
        if cluster is None:
            # The first step refits the dense model itself: its weights are read once, not twice.
            theirs = (ours, original) if dense is current else split_weights(dense)
            batches = first_samples(data, batch_size)
            sums = LocalSums((ours, values), theirs, batches, part_size(data, batch_size))
        else:
            asking = [layer.name for layer in todo if _width(layer, values[layer.weight]) <= WIDTH_LIMIT]
            sums = ClusterSums(cluster, dense, current, changing_names, updates, data, batch_size, asking)
        refit = partial(
            _refit_in_turn, values=values, remove=remove, masked=set(masked), select=select, rng=rng
        )
        # numpy's BLAS on one thread: a product split over two threads waits for the slower, and
        # each of the many small solves for both, so one thread is as fast and, with the other
        # core busy, much faster.
        with one_blas_thread():
            for k, layer in enumerate(todo):
                if on_layer is not None:
                    on_layer(layer.name)
                equations = partial(sums.equations, layer, later=todo[k + 1 :], rng=rng)
                fit, new = refit(layer, equations)
                values.update(new)  # the next requests to ``now`` run this layer with its new weights
                sums.update(new)
                updates.update(new)
                fits.append(fit)
    return ReconstructionResult(replace_initializers(current, updates), tuple(fits))


def _prune_unrefittable(
    values: Mapping[str, np.ndarray],
    weights: Sequence[str],
    remove: Mapping[str, int],
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The layers the solver cannot take still lose their share, by magnitude, first."""
    updates = {}
    for weight_name in weights:
        count = int(remove.get(weight_name, 0))
        if count > 0:
            updates[weight_name] = prune_smallest(values[weight_name], count, rng)
    return updates


def _refit_in_turn(
    layer: LinearLayer,
    equations: Callable[[int], NormalEquations],
    *,
    values: Mapping[str, np.ndarray],
    remove: Mapping[str, int],
    masked: set[str],
    select: str,
    rng: np.random.Generator,
) -> tuple[LayerFit, dict[str, np.ndarray]]:
    """Prune the layer's count (by magnitude, or by OBS inside the fit), refit it: record and values."""
    weight = values[layer.weight]
    count = int(remove.get(layer.weight, 0))
    by_magnitude = select == "magnitude" or _width(layer, weight) > WIDTH_LIMIT
    if count > 0 and by_magnitude:
        weight = prune_smallest(weight, count, rng)
    fit, refit = refit_layer(
        layer,
        weight,
        values,
        equations,
        remove=0 if by_magnitude else count,
        full_support=layer.weight not in masked and count == 0,
    )
    if count > 0 and not by_magnitude and layer.weight not in refit:
        refit[layer.weight] = prune_smallest(weight, count, rng)  # OBS impossible: magnitude
    refit.setdefault(layer.weight, weight)
    return fit, refit


def _width(layer: LinearLayer, weight: np.ndarray) -> int:
    """Columns of the layer's normal equations (the bias included)."""
    return layer.kind.columns(layer, weight.shape) + int(layer.bias is not None)


def refit_layer(
    layer: LinearLayer,
    weight: np.ndarray,
    values: Mapping[str, np.ndarray],
    equations: Callable[[int], NormalEquations],
    *,
    remove: int,
    full_support: bool,
) -> tuple[LayerFit, dict[str, np.ndarray]]:
    """Solve one layer; returns its record and the new initializer values (empty if not refit)."""
    width = _width(layer, weight)
    if width > WIDTH_LIMIT:
        return LayerFit(layer.name, 0, width, None, None, f"not refit: {width} columns > {WIDTH_LIMIT}"), {}
    normal = equations(width)
    if not enough_rows(normal.rows, width):
        why = f"not refit: {normal.rows} rows < {MIN_ROWS_PER_COLUMN} x {width} columns"
        return LayerFit(layer.name, normal.rows, width, None, None, why), {}
    if not all(np.isfinite(a).all() for a in (normal.gram, normal.cross, normal.target_sq)):
        # Activations near float32's range (inputs ~1e30) overflow the sums of products: there is
        # no system to solve, and the layer keeps its pruned weights.
        why = "not refit: its normal equations overflow (activations too large)"
        return LayerFit(layer.name, normal.rows, width, None, None, why), {}
    try:
        return _refit(layer, weight, values, normal, width, remove=remove, full_support=full_support)
    except np.linalg.LinAlgError as exc:  # e.g. "SVD did not converge" on a system near overflow
        return LayerFit(layer.name, normal.rows, width, None, None, f"not refit: {exc}"), {}


def _refit(
    layer: LinearLayer,
    weight: np.ndarray,
    values: Mapping[str, np.ndarray],
    normal: NormalEquations,
    width: int,
    *,
    remove: int,
    full_support: bool,
) -> tuple[LayerFit, dict[str, np.ndarray]]:
    kind, columns = layer.kind, width - int(layer.bias is not None)
    bias = values[layer.bias] if layer.bias else None
    state = kind.to_columns(layer, weight).astype(np.float64)
    if bias is not None:
        state = np.concatenate([state, kind.bias_row(layer, bias)], axis=1)
    if remove > 0:
        support = obs_masks(normal.gram, normal.cross, normal.bias, state, remove)
    elif full_support:
        support = np.ones(state[:, :columns].shape, dtype=bool)
    else:
        support = state[:, :columns] != 0
    start = state.copy()
    start[:, :columns][~support] = 0.0
    solved, before, after = _solve_groups(normal, support, start, columns)
    dead = np.abs(layer.scale) < 1e-12 if layer.scale is not None else np.zeros(0, dtype=bool)
    if dead.any():
        # A channel whose affine map is zero has no target: it keeps its (pruned) values.
        per = state.shape[2]
        flat = solved.transpose(0, 2, 1).reshape(-1, solved.shape[1])
        flat[dead] = start.transpose(0, 2, 1).reshape(-1, start.shape[1])[dead]
        solved = flat.reshape(state.shape[0], per, -1).transpose(0, 2, 1)
    total = float(normal.target_sq.sum()) or 1.0
    updates = {layer.weight: kind.from_columns(layer, solved[:, :columns], weight).astype(weight.dtype)}
    if layer.bias is not None and bias is not None:
        updates[layer.bias] = kind.bias_from_row(layer, solved[:, columns:], bias)
    # A layer with no weights left has only its bias to fit: its error stays about 1 (it is
    # bypassed or deleted by surgery), and the steps table leaves it out of "worst layer error".
    if not all(np.isfinite(v).all() for v in updates.values()):
        why = "not refit: the solution is not finite"
        return LayerFit(layer.name, normal.rows, width, None, None, why), {}
    if support.any() and after >= before:
        # The ridge's shrinkage can cost a layer that pruning barely moved more than it gains
        # (RapidOCR's det: its first conv, 2.8e-6 -> 3.5e-3): keep the pruned weights then.
        why = f"not refit: the refit's error {after / total:.2e} >= the pruned layer's {before / total:.2e}"
        return LayerFit(layer.name, normal.rows, width, None, None, why), {}
    status = "refit" if support.any() else EMPTIED
    fit = LayerFit(layer.name, normal.rows, width, before / total, after / total, status)
    return fit, updates


def _solve_groups(
    normal: NormalEquations, support: np.ndarray, start: np.ndarray, columns: int
) -> tuple[np.ndarray, float, float]:
    """Each group's solution on its support, and the residual error before (at ``start``) and after."""
    solved = np.zeros_like(start)
    before = after = 0.0
    per = start.shape[2]
    for g in range(start.shape[0]):
        solved[g], _ = solve_masked(normal.gram[g], normal.cross[g], support[g], normal.bias)
        # An input that was zero on every calibration row says nothing about its weight (the
        # ridge would set it to 0): keep it as it was, it still acts on inputs not seen here.
        unseen = np.diag(normal.gram[g])[:columns] == 0
        solved[g][:columns][unseen] = start[g][:columns][unseen]
        target_sq = normal.target_sq[g * per : (g + 1) * per]
        before += residual_error(normal.gram[g], normal.cross[g], target_sq, start[g])
        after += residual_error(normal.gram[g], normal.cross[g], target_sq, solved[g])
    return solved, before, after
