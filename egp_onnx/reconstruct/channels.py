"""Least squares for channel removal: what each channel costs its consumers, and their refit.

The consumer of a removed channel is refit with the equations of reconstruct/refit.py: its input
is the narrowed model's, its target the dense model's output of the same layer (for a layer whose
own output channels were cut, the dense output's kept channels; for one that ends a residual
branch, the dense Add output minus the current shortcut). Before removal, the same equations
price each input channel: :func:`egp_onnx.reconstruct.solve.block_costs`, the rise of the
consumer's residual when that channel is gone and the rest refit: what the refit cannot recover.
A residual branch that loses every channel is a constant: :func:`branch_constant` is the least
squares one, the mean of what the dense block added to the current shortcut.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial

import numpy as np
import onnx

from egp_onnx.graph.channels import Branch
from egp_onnx.graph.layers import LinearLayer, linear_layers
from egp_onnx.graph.weights import replace_initializers, split_weights
from egp_onnx.load.calibration import CalibrationData
from egp_onnx.reconstruct.normal import NormalEquations, normal_equations
from egp_onnx.reconstruct.parts import activation_pair, first_samples
from egp_onnx.reconstruct.refit import WIDTH_LIMIT, refit_layer
from egp_onnx.reconstruct.solve import block_costs
from egp_onnx.report.records import LayerFit
from egp_onnx.runtime.threads import one_blas_thread


def _in_turn(
    dense: onnx.ModelProto,
    current: onnx.ModelProto,
    data: CalibrationData,
    batch_size: int,
    names: Sequence[str],
    outputs: Mapping[str, np.ndarray],
    seed: int,
    visit: Callable[[LinearLayer, NormalEquations | None, dict[str, np.ndarray]], dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Build each named layer's normal equations in refit order and hand them to ``visit``.

    ``visit`` returns new initializer values, which the next layers' inputs are computed with.
    Returns the values it changed and the names of the layers it could not take (and why).
    """
    layers, skipped = linear_layers(current)
    wanted = set(names)
    # A layer whose output channels were cut and that ends a residual branch is fit to its own
    # dense output (its kept channels): the dense Add output minus the narrowed shortcut would
    # not line up channel for channel.
    todo = [
        replace(layer, residual=None, shortcut=None, scale=None, shift=None)
        if layer.residual and layer.name in outputs
        else layer
        for layer in layers
        if layer.name in wanted
    ]
    missing = [f"{name}: not refit ({skipped[name][1]})" for name in names if name in skipped]
    changing = [n for layer in todo for n in (layer.weight, layer.bias) if n]
    ours, values = split_weights(current, always=changing)
    updates: dict[str, np.ndarray] = {}
    if not todo:
        return updates, missing
    rng = np.random.default_rng(seed)
    batches = first_samples(data, batch_size)
    now, then = activation_pair((ours, values), split_weights(dense), batches)
    with one_blas_thread():
        for k, layer in enumerate(todo):
            weight = values[layer.weight]
            width = layer.kind.columns(layer, weight.shape) + int(layer.bias is not None)
            normal = None
            if width <= WIDTH_LIMIT and layer.groups == 1:
                normal = normal_equations(layer, width, now, then, todo[k + 1 :], rng)
                kept = outputs.get(layer.name)
                if kept is not None and normal.cross.shape[2]:
                    normal.cross = normal.cross[:, :, kept]
                    normal.target_sq = normal.target_sq[kept]
            new = visit(layer, normal, values)
            values.update(new)
            updates.update(new)
    return updates, missing


def removal_costs(
    dense: onnx.ModelProto,
    current: onnx.ModelProto,
    data: CalibrationData,
    batch_size: int,
    blocks: Mapping[str, Sequence[np.ndarray]],
    outputs: Mapping[str, np.ndarray],
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per consumer layer, the relative cost of removing each block of its input channels.

    Args:
        dense: the original model (the targets).
        current: the model being narrowed (its consumers' inputs).
        data: calibration data.
        batch_size: samples per onnxruntime call.
        blocks: per consumer layer name, the input indices (along the weight's input axis) of
            each block: one channel, or its Flatten columns.
        outputs: per layer whose output channels were cut, the dense output channels it keeps.
        seed: the position subsample.

    Returns:
        Per consumer the rise of its residual for each block, over the target's energy; a layer
        the solver cannot take (too wide, too few rows) is absent.

    """
    costs: dict[str, np.ndarray] = {}

    def visit(
        layer: LinearLayer, normal: NormalEquations | None, values: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        if normal is None or normal.rows < normal.gram.shape[1] or not normal.cross.shape[2]:
            return {}
        per = int(np.prod(layer.kernel)) if layer.kind.spatial else 1
        columns = [
            (np.asarray(b)[:, None] * per + np.arange(per)[None, :]).ravel() for b in blocks[layer.name]
        ]
        energy = float(normal.target_sq.sum()) or 1.0
        costs[layer.name] = block_costs(normal.gram[0], normal.cross[0], normal.bias, columns) / energy
        return {}

    _in_turn(dense, current, data, batch_size, list(blocks), outputs, seed, visit)
    return costs


def refit_consumers(
    dense: onnx.ModelProto,
    current: onnx.ModelProto,
    data: CalibrationData,
    batch_size: int,
    names: Sequence[str],
    outputs: Mapping[str, np.ndarray],
    seed: int = 0,
) -> tuple[onnx.ModelProto, tuple[LayerFit, ...]]:
    """``current`` with the named layers refit by least squares (full support), and their records.

    ``outputs`` as in :func:`removal_costs`. A layer that cannot be refit keeps its weights and
    says why in its record.
    """
    fits: list[LayerFit] = []

    def visit(
        layer: LinearLayer, normal: NormalEquations | None, values: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        if normal is None:
            fits.append(LayerFit(layer.name, 0, 0, None, None, "not refit: too wide or grouped"))
            return {}
        fit, new = refit_layer(
            layer, values[layer.weight], values, partial(_given, normal), remove=0, full_support=True
        )
        fits.append(fit)
        return new

    updates, missing = _in_turn(dense, current, data, batch_size, names, outputs, seed, visit)
    fits.extend(LayerFit(text.split(":")[0], 0, 0, None, None, text.split(": ", 1)[1]) for text in missing)
    return replace_initializers(current, updates), tuple(fits)


def branch_constant(
    dense: onnx.ModelProto, current: onnx.ModelProto, data: CalibrationData, batch_size: int, branch: Branch
) -> np.ndarray:
    """The per-channel constant (C,) that best replaces ``branch`` in ``current``, by least squares.

    The Add's output should stay the dense model's: ``c`` minimises the squared difference of
    ``shortcut + c`` from it over the calibration samples, positions and batch alike, so it is the
    mean of the dense Add output minus the current model's other operand.
    """
    add = next(node for node in current.graph.node if (node.name or node.output[0]) == branch.add)
    other = next(t for t in add.input if t != branch.operand)
    batches = first_samples(data, batch_size)
    now, then = activation_pair(split_weights(current), split_weights(dense), batches)
    (shortcut,) = now.get([other])
    (target,) = then.get([add.output[0]])
    axes = (0, 2, 3) if branch.rank == 4 else (0,)
    total = sum(
        np.asarray(t, np.float64).sum(axis=axes) - np.asarray(x, np.float64).sum(axis=axes)
        for t, x in zip(target, shortcut, strict=True)
    )
    count = sum(int(np.prod(t.shape)) // t.shape[1] for t in target)
    return np.asarray(total / count)


def _given(normal: NormalEquations, width: int) -> NormalEquations:
    return normal
