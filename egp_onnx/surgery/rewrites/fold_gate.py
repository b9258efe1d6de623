"""An emptied squeeze-excitation branch becomes the per-channel scale it computes (algebra).

A squeeze-excitation block gates its input by a function of the input's global average::

    x -> GlobalAveragePool -> Conv1x1 -> Relu -> Conv1x1 -> HardSigmoid -> Mul(x, gate)
    ^---------------------------------------------------------------------------'

When one of its layers is all zero, everything after it is a constant: the gate is a (1, C, 1, 1)
scale, exactly, for every input. The branch goes and ``Mul(x, scale)`` stays (the scale folds
into the next layer where :mod:`.fold_bn`'s per-channel rules take it). Folding the zero layer
forward instead (:mod:`.fold_constant`) merged the branch's two convs into one zero conv of
(out, in) channels: the model grew.

The branch is recognised by its shape, not its op names: it starts at a GlobalAveragePool of
``x``, goes through single-consumer 1x1 unpadded convs and per-channel element-wise ops (the
activations included), and ends in a binary op whose other operand is ``x`` itself; then the
branch's tensors are (N, C, 1, 1) and broadcasting the constant over ``x`` gives ``x``'s shape.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from egp_onnx.surgery.registry import register_rewrite
from egp_onnx.surgery.surgeon import Surgeon
from egp_onnx.surgery.view import LayerView, layer_view, single_consumer, through_elementwise

NAME = "fold_gate"

#: Binary ops that a gate's constant may end in, with the block's input as the other operand.
_GATED = ("Mul", "Add")


@register_rewrite(NAME, order=25, licence="algebra")
def fold_gates(s: Surgeon) -> bool:
    """Fold the first squeeze-excitation branch that an all-zero layer makes constant."""
    for node in list(s.graph.nodes):
        if node.op == "GlobalAveragePool" and len(node.inputs) == 1 and _fold_branch(s, node):
            s.commit()
            return True
    return False


def _fold_branch(s: Surgeon, pool: gs.Node) -> bool:
    """Replace the branch from ``pool`` by its constant when an all-zero layer on it makes it one."""
    x = pool.inputs[0]
    tensor = pool.outputs[0]
    value: np.ndarray | None = None  # the branch's constant (C,), from its first all-zero layer on
    layers: list[LayerView] = []
    nodes = [pool]
    dtype = None
    while (consumer := single_consumer(tensor, s.graph)) is not None:
        operands = list(consumer.inputs)
        if consumer.op in _GATED and len(operands) == 2 and any(t is x for t in operands):
            if value is None or not any(t is tensor for t in operands) or x is tensor:
                return False
            position = 0 if operands[0] is tensor else 1
            scale = s.constant(
                f"{consumer.name}.gate", value.reshape(1, -1, 1, 1).astype(dtype or np.float32)
            )
            consumer.inputs[position] = scale
            for gone in layers:
                s.state(gone.node.name, "removed")
            names = (*(n.name for n in nodes), consumer.name)
            detail = f"squeeze-excitation branch is constant: {consumer.op} by a per-channel scale"
            s.record(NAME, names, exact=True, applied=True, detail=detail)
            return True
        layer = layer_view(consumer, s.graph)
        if layer is not None:
            if not (_pointwise(layer) and layer.float_exact and consumer.inputs[0] is tensor):
                return False
            dtype = layer.weight.dtype
            if value is None and not layer.weight.any():
                value = layer.bias().astype(np.float64)
            elif value is not None:
                matrix = layer.weight.reshape(layer.weight.shape[0], -1).astype(np.float64)
                value = matrix @ value + layer.bias().astype(np.float64)
            layers.append(layer)
        elif value is not None:
            new = _activation(consumer, tensor, value)
            if new is None:
                return False
            value = new
        elif not _elementwise(consumer, tensor):
            return False
        nodes.append(consumer)
        tensor = consumer.outputs[0]
    return False


def _pointwise(layer: LayerView) -> bool:
    """A 2-D 1x1 conv without padding: on a (N, C, 1, 1) input it is a dense layer."""
    if not layer.conv or layer.weight.ndim != 4:  # the scale is written (1, C, 1, 1)
        return False
    geometry = layer.geometry()
    return all(k == 1 for k in layer.weight.shape[2:]) and geometry is not None and not any(geometry.pads)


#: Ops that act on each element alone, with at most one constant operand besides the branch.
_ELEMENTWISE = (
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "BatchNormalization", "Identity",
    "Add", "Sub", "Mul", "Div",
)  # fmt: skip


def _elementwise(node: gs.Node, tensor: gs.Tensor) -> bool:
    """True when ``node`` keeps the branch (N, C, 1, 1): element-wise on it, any other operand constant."""
    others = [t for t in node.inputs if t is not tensor and t.name]
    return (
        node.op in _ELEMENTWISE
        and len(node.outputs) == 1
        and any(t is tensor for t in node.inputs)
        and all(isinstance(t, gs.Constant) for t in others)
    )


def _activation(node: gs.Node, tensor: gs.Tensor, value: np.ndarray) -> np.ndarray | None:
    """A per-channel constant after ``node``: the affine and rectifier ops, and the gates' sigmoids."""
    if not _elementwise(node, tensor):
        return None
    if len(node.inputs) == 1:
        if node.op == "Sigmoid":
            return 1.0 / (1.0 + np.exp(-value))
        if node.op == "HardSigmoid":
            alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
            return np.clip(alpha * value + beta, 0.0, 1.0)
        if node.op == "HardSwish":
            return value * np.clip(value / 6.0 + 0.5, 0.0, 1.0)
    return through_elementwise(node, tensor, value, 4)
