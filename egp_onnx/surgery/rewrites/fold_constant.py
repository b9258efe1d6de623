"""An all-zero layer's constant output pushed forward as far as it stays exact (algebra).

The constant goes through element-wise ops (BatchNormalization, per-channel affine constants,
ReLU, LeakyRelu, Clip) and then into whatever reads it: a residual Add becomes ``x + c``, an
unpadded conv or a dense layer after it outputs a constant of its own, or else the element-wise
chain folds into the layer's bias.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from egp_onnx.surgery import algebra
from egp_onnx.surgery.registry import register_rewrite
from egp_onnx.surgery.surgeon import Surgeon
from egp_onnx.surgery.view import LayerView, layer_view, single_consumer, through_elementwise

NAME = "fold_constant"


@register_rewrite(NAME, order=30, licence="algebra")
def fold_constants(s: Surgeon) -> bool:
    """Fold the first all-zero layer whose constant output can go anywhere."""
    for node in list(s.graph.nodes):
        layer = layer_view(node, s.graph)
        if layer is not None and layer.float_exact and not layer.weight.any() and _fold_from(s, layer):
            s.commit()
            return True
    return False


def _fold_from(s: Surgeon, layer: LayerView) -> bool:
    """Push the constant output of an all-zero layer forward as far as it stays exact."""
    value, tensor, chain = _through_chain(s, layer)
    consumer = single_consumer(tensor, s.graph)
    if consumer is not None and (
        _into_residual_add(s, layer, consumer, tensor, value)
        or _into_next_layer(s, layer, consumer, tensor, value)
    ):
        return True
    if not chain:
        return False
    # Absorb the element-wise chain (BN, ReLU, affine constants) into the layer's bias.
    s.set_layer(layer, layer.weight, value)
    last = chain[-1].outputs[0]
    chain[-1].outputs = []
    layer.node.outputs = [last]
    s.state(layer.node.name, "constant")
    nodes = (layer.node.name, *(n.name for n in chain))
    detail = "all-zero layer: element-wise ops folded into its bias"
    s.record(NAME, nodes, exact=True, applied=True, detail=detail)
    return True


def _through_chain(s: Surgeon, layer: LayerView) -> tuple[np.ndarray, gs.Tensor, list[gs.Node]]:
    """The layer's constant output (C,) after the element-wise ops that alone read it one by one.

    Returns:
        the constant, the tensor that carries it, and the element-wise nodes on the way.

    """
    value = layer.bias().astype(np.float64)
    tensor, chain = layer.node.outputs[0], []
    while (consumer := single_consumer(tensor, s.graph)) is not None:
        new_value = through_elementwise(consumer, tensor, value, _rank(layer))
        if new_value is None:
            break
        value, tensor = new_value, consumer.outputs[0]
        chain.append(consumer)
    return value, tensor, chain


def _into_residual_add(
    s: Surgeon, layer: LayerView, add: gs.Node, tensor: gs.Tensor, value: np.ndarray
) -> bool:
    """A residual Add of two variables, one of them the constant ``tensor``, becomes ``x + c``."""
    if add.op != "Add" or len(add.inputs) != 2 or any(isinstance(t, gs.Constant) for t in add.inputs):
        return False
    other = add.inputs[1] if add.inputs[0] is tensor else add.inputs[0]
    shape = (1, -1) + (1,) * (_rank(layer) - 2) if layer.conv else (-1,)
    add.inputs = [other, s.constant(f"{add.name}.const", value.reshape(shape).astype(layer.weight.dtype))]
    s.state(layer.node.name, "removed")
    detail = "residual branch is constant: x + c"
    s.record(NAME, (layer.node.name, add.name), exact=True, applied=True, detail=detail)
    return True


def _into_next_layer(
    s: Surgeon, layer: LayerView, consumer: gs.Node, tensor: gs.Tensor, value: np.ndarray
) -> bool:
    """Replace ``layer ... nxt`` by one all-zero layer whose bias is nxt's constant output."""
    nxt = layer_view(consumer, s.graph)
    if nxt is None or not nxt.float_exact or nxt.node.inputs[0] is not tensor or nxt.conv != layer.conv:
        return False
    if layer.conv:
        geo_a, geo_b = layer.geometry(), nxt.geometry()
        assert geo_a is not None and geo_b is not None
        if geo_b.padded and value.any():
            return False  # nxt's zero padding makes its output position dependent
        zeros = np.zeros((layer.out_channels, *layer.weight.shape[1:]), dtype=np.float64)
        merged = algebra.compose_conv(zeros, value, geo_a, nxt.weight.astype(np.float64), nxt.bias(), geo_b)
        weight, bias = np.zeros_like(merged.weight), merged.bias
        attrs = {
            "strides": list(merged.geometry.strides),
            "pads": list(merged.geometry.pads),
            "kernel_shape": list(weight.shape[2:]),
        }
        op = "Conv"
    else:
        m_b, c_b = nxt.dense()
        bias = value @ m_b + c_b
        weight = np.zeros((layer.dense()[0].shape[0], m_b.shape[1]))
        op, attrs = ("Gemm", {}) if "Gemm" in (layer.node.op, nxt.node.op) else ("MatMul", {})
    if weight.size > layer.weight.size + nxt.weight.size:
        # the zero layer that replaces the pair would hold more (zero) weights than both: skipped
        nodes = (layer.node.name, nxt.node.name)
        if not s.recorded(NAME, nodes):
            pair = layer.weight.size + nxt.weight.size
            detail = f"skipped: the merged zero layer would have {weight.size} weights, the pair has {pair}"
            s.record(NAME, nodes, exact=True, applied=False, detail=detail)
        return False
    s.replace_pair(layer, nxt, op, attrs, weight, bias)
    s.state(layer.node.name, "removed")
    s.state(nxt.node.name, "constant")
    detail = "constant input: the next layer outputs a constant"
    s.record(NAME, (layer.node.name, nxt.node.name), exact=True, applied=True, detail=detail)
    return True


def _rank(layer: LayerView) -> int:
    """The rank of the layer's output: the weight's for a conv, 2 for a dense layer."""
    return layer.weight.ndim if layer.conv else 2
