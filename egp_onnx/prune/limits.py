"""How far the budget may prune each layer so that the pruned model is still a network.

Without retraining, a layer that every input-to-output path goes through cannot be emptied: its
output becomes a constant and so does the model's. Such layers keep at least ``1 - cap`` of their
weights. A layer from which a graph output is reached without another weighted layer (the output
head) stays dense. Other layers (a residual branch, one branch of a Concat) may be emptied: the
model still computes something, surgery folds the constant, and the guard judges the result.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from egp_onnx.graph.index import GraphIndex
from egp_onnx.graph.layers import layer_of


def _reaches_output(model: onnx.ModelProto, index: GraphIndex, weight: str) -> bool:
    """True when data flows from the graph inputs to some graph output without the layer of ``weight``."""
    reached = set(index.graph_inputs)
    for node in model.graph.node:  # nodes are topologically sorted (onnx.checker)
        if len(node.input) > 1 and node.input[1] == weight and layer_of(node, index) is not None:
            continue
        if any(i in reached for i in node.input if i):
            reached.update(o for o in node.output if o)
    return any(o.name in reached for o in model.graph.output)


#: Ops that carry learned weights: a head is the last of them before an output.
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _weighted(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """True for a layer with a constant weight (including ones egp-onnx does not prune)."""
    return node.op_type in _WEIGHTED_OPS and len(node.input) > 1 and index.is_constant(node.input[1])


def _output_heads(model: onnx.ModelProto, index: GraphIndex) -> set[str]:
    """Weight initializers of the layers whose output reaches a graph output through unweighted nodes."""
    outputs = {o.name for o in model.graph.output}
    heads = set()
    for node in model.graph.node:
        if layer_of(node, index) is None:
            continue
        stack, seen = list(node.output), set()
        while stack:
            tensor = stack.pop()
            if tensor in outputs:
                heads.add(node.input[1])
                break
            if tensor in seen:
                continue
            seen.add(tensor)
            for consumer in index.consumers.get(tensor, []):
                if not _weighted(consumer, index):
                    stack.extend(o for o in consumer.output if o)
    return heads


def sparsity_limits(model: onnx.ModelProto, weights: Iterable[str], cap: float) -> dict[str, float]:
    """The largest sparsity the budget may give each layer, named by its weight initializer.

    Returns:
        0 for output heads (they stay dense), ``cap`` for layers every path to the outputs goes
        through, 1 for the others.

    """
    index = GraphIndex(model.graph)
    heads = _output_heads(model, index)
    limits = {}
    for name in weights:
        if name in heads:
            limits[name] = 0.0
        elif not _reaches_output(model, index, name):
            limits[name] = cap
        else:
            limits[name] = 1.0
    return limits
