"""The op tables: the names other stages use are derived from them, and each layer kind's layout."""

from __future__ import annotations

import numpy as np
import pytest

from egp_onnx.graph.layers import LinearLayer
from egp_onnx.graph.ops import (
    ACTIVATIONS,
    LAYER_KINDS,
    LAYER_OPS,
    NONLINEAR_OPS,
    RECTIFIER_OPS,
    REMOVABLE_KINDS,
    REPORTED_ACTIVATIONS,
)


def test_the_derived_names_are_the_ones_the_stages_used():
    assert RECTIFIER_OPS == ("Relu", "Clip", "LeakyRelu", "PRelu", "HardSwish", "SiLU", "Gelu")
    assert REPORTED_ACTIVATIONS == ("HardSigmoid", "Elu", "Selu")
    assert REMOVABLE_KINDS == ("relu", "relu6", "leaky_relu", "prelu")
    assert set(NONLINEAR_OPS) == set(RECTIFIER_OPS) | set(REPORTED_ACTIVATIONS)
    assert LAYER_OPS == ("Conv", "Gemm", "MatMul")
    assert [op for op, a in ACTIVATIONS.items() if a.probe_output] == ["Relu"]
    assert all(bool(a.kind) == a.prunes for a in ACTIVATIONS.values())


def layer(op_type: str, **fields) -> LinearLayer:
    return LinearLayer("l", op_type, "w", "b", "x", "y", 0, **fields)


@pytest.mark.parametrize(
    ("op_type", "shape", "fields"),
    [
        ("Conv", (6, 2, 3, 3), {"groups": 2, "kernel": (3, 3)}),
        ("Gemm", (5, 4), {"trans_b": True, "alpha": 0.5, "beta": 2.0}),
        ("Gemm", (4, 5), {"alpha": 2.0}),
        ("MatMul", (4, 5), {}),
    ],
)
def test_columns_round_trip_and_compute_the_layer(rng, op_type, shape, fields):
    lay, kind = layer(op_type, **fields), LAYER_KINDS[op_type]
    w = rng.normal(size=shape)
    cols = kind.to_columns(lay, w)
    groups = fields.get("groups", 1)
    assert cols.shape[0] == groups and cols.shape[1] == kind.columns(lay, shape)
    np.testing.assert_allclose(kind.from_columns(lay, cols, w), w)
    bias = rng.normal(size=shape[0] if op_type == "Conv" else cols.shape[2])
    row = kind.bias_row(lay, bias)
    assert row.shape == (groups, 1, cols.shape[2])
    np.testing.assert_allclose(kind.bias_from_row(lay, row, bias), bias)
    if op_type != "Conv":  # x @ columns + bias row is the layer: alpha x @ op(w) + beta c
        x = rng.normal(size=(3, cols.shape[1]))
        op_w = w.T if fields.get("trans_b") else w
        want = fields.get("alpha", 1.0) * x @ op_w + fields.get("beta", 1.0) * bias
        np.testing.assert_allclose(x @ cols[0] + row[0], want)
