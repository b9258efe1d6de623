"""Merged kernels against onnxruntime running the two original layers."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from references import run_ort

from egp_onnx.surgery.algebra import (
    ConvGeometry,
    add_identity,
    compose_conv,
    compose_dense,
    fold_batchnorm,
)


def run_convs(x: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray, ConvGeometry]]) -> np.ndarray:
    """Conv layers in sequence, in onnxruntime."""
    nodes, inits = [], []
    current = "x"
    for i, (w, b, geo) in enumerate(layers):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(
            helper.make_node(
                "Conv", [current, f"w{i}", f"b{i}"], [f"y{i}"], strides=list(geo.strides), pads=list(geo.pads)
            )
        )
        current = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return run_ort(model, {"x": x})[0]


def geometry(stride: int, pad: int) -> ConvGeometry:
    return ConvGeometry((stride, stride), (pad,) * 4)


CASES = {
    # name: (k_a, s_a, p_a, k_b, s_b, p_b, bias_a, exact)
    "3x3p1_then_1x1": (3, 1, 1, 1, 1, 0, True, True),
    "1x1_then_3x3p1_nobias": (1, 1, 0, 3, 1, 1, False, True),
    "1x1_then_3x3p1_bias": (1, 1, 0, 3, 1, 1, True, False),
    "3x3p1_then_3x3p1": (3, 1, 1, 3, 1, 1, True, False),
    "3x3s2p1_then_1x1": (3, 2, 1, 1, 1, 0, True, True),
    "3x3s2p1_then_3x3s1p0": (3, 2, 1, 3, 1, 0, True, True),
    "1x1s2_then_3x3s2p0": (1, 2, 0, 3, 2, 0, True, True),
    "3x3p0_then_3x3s2p0": (3, 1, 0, 3, 2, 0, True, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_merge_matches_two_convs(case, rng):
    k_a, s_a, p_a, k_b, s_b, p_b, bias_a, exact = CASES[case]
    w_a = rng.normal(size=(5, 3, k_a, k_a)).astype(np.float32)
    b_a = (rng.normal(size=5) if bias_a else np.zeros(5)).astype(np.float32)
    w_b = rng.normal(size=(4, 5, k_b, k_b)).astype(np.float32)
    b_b = rng.normal(size=4).astype(np.float32)
    x = rng.normal(size=(2, 3, 11, 11)).astype(np.float32)
    merged = compose_conv(w_a, b_a, geometry(s_a, p_a), w_b, b_b, geometry(s_b, p_b))
    assert merged.exact == exact
    want = run_convs(x, [(w_a, b_a, geometry(s_a, p_a)), (w_b, b_b, geometry(s_b, p_b))])
    got = run_convs(x, [(merged.weight, merged.bias, merged.geometry)])
    assert got.shape == want.shape
    ring = -(-p_b // s_b)  # ceil(p_B / s_B): the border that can differ
    interior = (
        slice(None),
        slice(None),
        slice(ring, want.shape[2] - ring),
        slice(ring, want.shape[3] - ring),
    )
    np.testing.assert_allclose(got[interior], want[interior], rtol=1e-4, atol=1e-4)
    if exact:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    else:
        assert np.abs(got - want).max() > 1e-3, "an inexact merge really differs at the border"


def test_dense_merge(rng):
    x = rng.normal(size=(7, 6))
    m_a, c_a = rng.normal(size=(6, 5)), rng.normal(size=5)
    m_b, c_b = rng.normal(size=(5, 3)), rng.normal(size=3)
    m, c = compose_dense(m_a, c_a, m_b, c_b)
    np.testing.assert_allclose(x @ m + c, (x @ m_a + c_a) @ m_b + c_b, rtol=1e-12)


def test_fold_batchnorm_conv(rng):
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    scale, shift, mean = rng.normal(size=(3, 4)).astype(np.float32)
    var = rng.uniform(0.5, 2, size=4).astype(np.float32)
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)
    geo = geometry(1, 1)
    conv = run_convs(x, [(w, b, geo)])
    channel = (slice(None), None, None)  # the BatchNormalization formula, written out: per channel of axis 1
    want = (conv - mean[channel]) / np.sqrt(var[channel] + 1e-5) * scale[channel] + shift[channel]
    fw, fb = fold_batchnorm(w, b, scale, shift, mean, var, 1e-5)
    np.testing.assert_allclose(run_convs(x, [(fw, fb, geo)]), want, rtol=1e-4, atol=1e-5)


def test_identity_and_projection_at_centre_tap(rng):
    w = rng.normal(size=(4, 4, 3, 3)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    x = rng.normal(size=(2, 4, 7, 7)).astype(np.float32)
    geo = geometry(1, 1)
    folded = add_identity(w)
    np.testing.assert_allclose(
        run_convs(x, [(folded, b, geo)]), run_convs(x, [(w, b, geo)]) + x, rtol=1e-4, atol=1e-5
    )
    p = rng.normal(size=(4, 4, 1, 1)).astype(np.float32)
    zero = np.zeros(4, np.float32)
    want = run_convs(x, [(w, b, geo)]) + run_convs(x, [(p, zero, geometry(1, 0))])
    np.testing.assert_allclose(run_convs(x, [(add_identity(w, p), b, geo)]), want, rtol=1e-4, atol=1e-5)
    assert add_identity(np.zeros((2, 2, 2, 2), np.float32)) is None


def test_strided_merge_with_padding_is_flagged_inexact(rng):
    merged = compose_conv(
        rng.normal(size=(2, 2, 3, 3)),
        np.zeros(2),
        geometry(2, 1),
        rng.normal(size=(2, 2, 3, 3)),
        np.zeros(2),
        geometry(1, 1),
    )
    assert not merged.exact
    assert merged.weight.shape[2:] == (7, 7)
    assert merged.geometry == ConvGeometry((2, 2), (3, 3, 3, 3))
