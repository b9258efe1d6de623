"""BatchNormalization folded into the Conv or Gemm before it: exact by algebra."""

from __future__ import annotations

from egp_onnx.surgery import algebra
from egp_onnx.surgery.registry import register_rewrite
from egp_onnx.surgery.surgeon import Surgeon
from egp_onnx.surgery.view import batchnorm_params, feeds_only, layer_view

NAME = "fold_bn"


@register_rewrite(NAME, order=10, licence="algebra")
def fold_batchnorms(s: Surgeon) -> bool:
    """Fold every inference-mode BatchNormalization whose input only a Conv/Gemm layer produces."""
    changed = False
    for node in list(s.graph.nodes):
        params = batchnorm_params(node)
        producer = node.inputs[0].inputs[0] if node.inputs and node.inputs[0].inputs else None
        if params is None or producer is None:
            continue
        layer = layer_view(producer, s.graph)
        if (
            layer is None
            or not layer.float_exact
            or layer.node.op == "MatMul"
            or not feeds_only(node.inputs[0], node, s.graph)
        ):
            continue
        weight, bias = algebra.fold_batchnorm(layer.weight, layer.bias(), *params, out_axis=layer.out_axis)
        s.set_layer(layer, weight, bias)
        layer.node.outputs = list(node.outputs)
        node.outputs = []
        s.record(NAME, (layer.node.name, node.name), exact=True, applied=True)
        changed = True
    return changed
