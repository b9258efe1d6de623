"""Structural figures of a graph: op counts, depth and non-linear depth (pure, on ModelProto)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx

from egp_onnx.graph.ops import LAYER_OPS, NONLINEAR_OPS


@dataclass(frozen=True)
class Depth:
    """Longest input-to-output chain of layers, and the rectifiers on that chain."""

    layers: int
    nonlinear: int


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Number of nodes per op type in the main graph."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def depth(model: onnx.ModelProto) -> Depth:
    """Depth = Conv/Gemm/MatMul nodes on the longest path from an input to an output.

    Ties between equally deep paths go to the one with more non-linearities. Nodes are taken in
    the graph's order, which ONNX requires to be topological.
    """
    best: dict[str, tuple[int, int]] = {}
    for node in model.graph.node:
        incoming = max((best.get(i, (0, 0)) for i in node.input if i), default=(0, 0))
        value = (
            incoming[0] + (node.op_type in LAYER_OPS),
            incoming[1] + (node.op_type in NONLINEAR_OPS),
        )
        for out in node.output:
            best[out] = value
    finals = [best.get(o.name, (0, 0)) for o in model.graph.output]
    layers, nonlinear = max(finals, default=(0, 0))
    return Depth(layers, nonlinear)
