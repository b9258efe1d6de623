"""A residual shortcut folded into the centre tap of the conv beside it: exact by algebra.

``x + F(x)`` becomes one conv when F is centred, unstrided and square (K[:, :, centre] += I), and
``P(x) + F(x)`` when P is an unpadded 1x1 conv with F's strides (K[:, :, centre] += P).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from egp_onnx.surgery import algebra
from egp_onnx.surgery.registry import register_rewrite
from egp_onnx.surgery.surgeon import Surgeon
from egp_onnx.surgery.view import LayerView, feeds_only, layer_view

NAME = "fold_residual"


@register_rewrite(NAME, order=50, licence="algebra")
def fold_residuals(s: Surgeon) -> bool:
    """Fold the first Add of two variables that one of its branches can absorb."""
    for node in list(s.graph.nodes):
        if node.op != "Add" or len(node.inputs) != 2 or any(isinstance(t, gs.Constant) for t in node.inputs):
            continue
        first, second = node.inputs
        for branch, other in ((first, second), (second, first)):
            if _fold_residual(s, node, branch, other):
                s.commit()
                return True
    return False


def _fold_residual(s: Surgeon, add: gs.Node, branch: gs.Tensor, other: gs.Tensor) -> bool:
    """Fold ``add``'s ``other`` input into the conv F that alone produces ``branch``."""
    producer = branch.inputs[0] if branch.inputs else None
    f = layer_view(producer, s.graph) if producer is not None else None
    if f is None or not f.conv or not f.float_exact or not feeds_only(branch, add, s.graph):
        return False
    geo = f.geometry()
    assert geo is not None
    k = f.weight.shape[2:]
    centred = all(geo.pads[j] == geo.pads[j + geo.rank] == (k[j] - 1) // 2 for j in range(geo.rank))
    if not centred:
        return False
    weight: np.ndarray | None
    p: LayerView | None = None  # the 1x1 projection on the shortcut, if there is one
    square = f.weight.shape[0] == f.weight.shape[1]
    if other is f.node.inputs[0] and all(st == 1 for st in geo.strides) and square:
        weight, bias = algebra.add_identity(f.weight), f.bias()
    else:
        p = _projection(s, f, geo, add, other)
        if p is None:
            return False
        weight, bias = algebra.add_identity(f.weight, p.weight), f.bias() + p.bias()
    if weight is None:
        return False  # an even kernel has no centre tap: nothing folds, no state changes
    parts = (f.node.name, add.name) if p is None else (f.node.name, p.node.name, add.name)
    if p is not None:
        s.state(p.node.name, "merged")
    s.set_layer(f, weight, bias)
    f.node.outputs = list(add.outputs)
    add.outputs = []
    s.state(f.node.name, "merged")
    s.record(NAME, parts, exact=True, applied=True, detail="shortcut folded into the centre tap")
    return True


def _projection(
    s: Surgeon, f: LayerView, geo: algebra.ConvGeometry, add: gs.Node, other: gs.Tensor
) -> LayerView | None:
    """The unpadded 1x1 conv P of F's input and strides that alone produces ``other``, if it is one."""
    p_node = other.inputs[0] if other.inputs else None
    p = layer_view(p_node, s.graph) if p_node is not None else None
    if (
        p is None
        or not p.conv
        or not p.float_exact
        or p.node.inputs[0] is not f.node.inputs[0]
        or not feeds_only(other, add, s.graph)
    ):
        return None
    p_geo = p.geometry()
    if (
        p_geo is None
        or p_geo.padded
        or p_geo.strides != geo.strides
        or any(d != 1 for d in p.weight.shape[2:])
    ):
        return None
    return p
