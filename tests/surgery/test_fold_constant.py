"""fold_constant alone: an all-zero layer's constant output pushed forward (exact by algebra)."""

from __future__ import annotations

from collections import Counter

import numpy as np
from models import Builder, f32
from onnx import numpy_helper
from references import run_ort
from surgery_checks import alone, applied, assert_same, node, ops, surgery, weights

from egp_onnx.surgery.rewrites.fold_constant import NAME as FOLD_CONSTANT


def zero_conv(b: Builder, x: str, name: str, cin: int, cout: int, **kwargs) -> str:
    """A conv whose weights are all zero: it outputs its bias at every position."""
    out = b.conv(x, name, cin, cout, 3, **kwargs)
    b.inits[-2] = numpy_helper.from_array(np.zeros((cout, cin, 3, 3), np.float32), f"{name}.w")
    return out


def test_element_wise_ops_after_an_all_zero_layer_fold_into_its_bias(rng):
    """
    x -> Conv Z (all-zero weights, bias) -> BatchNormalization -> Relu -> y
    """
    b = Builder(rng)
    model = b.model(
        b.op("Relu", [b.bn(zero_conv(b, "x", "Z", 3, 4, pad=1), "bn", 4)], "relu"), ["N", 3, 6, 6]
    )
    result = alone(FOLD_CONSTANT, model)
    assert ops(result.model) == Counter({"Conv": 1})
    [rewrite] = result.rewrites
    assert rewrite.nodes == ("Z", "bn", "relu", "output") and rewrite.exact and rewrite.applied
    assert result.states == {"Z": "constant"}
    w = weights(model)
    scale, shift, mean, var = (w[f"bn.{p}"] for p in ("scale", "shift", "mean", "var"))
    want = np.maximum((w["Z.b"] - mean) * scale / np.sqrt(var + 1e-5) + shift, 0)
    np.testing.assert_allclose(weights(result.model)[node(result.model, "Z").input[2]], want, rtol=1e-6)
    x = f32(rng.normal(size=(2, 3, 6, 6)))
    assert_same(model, result.model, x, rtol=1e-6)
    np.testing.assert_allclose(
        run_ort(result.model, {"x": x})[0], np.broadcast_to(want[:, None, None], (2, 4, 6, 6))
    )


def test_a_constant_residual_branch_becomes_x_plus_c(rng):
    """
    x -> Conv c0 -> h -> Conv Z (all-zero weights, bias) -> Relu -> Add(+ h) -> y
    """
    b = Builder(rng)
    h = b.conv("x", "c0", 3, 4, 1)
    model = b.model(
        b.op("Add", [h, b.op("Relu", [zero_conv(b, h, "Z", 4, 4, pad=1)], "rz")], "add"), ["N", 3, 5, 5]
    )
    result = alone(FOLD_CONSTANT, model)
    assert ops(result.model) == Counter({"Conv": 1, "Add": 1, "Identity": 1})
    assert [(r.nodes, r.detail) for r in result.rewrites] == [
        (("Z", "add"), "residual branch is constant: x + c")
    ]
    assert result.states == {"Z": "removed"}
    add = node(result.model, "add")
    want = np.maximum(weights(model)["Z.b"], 0).reshape(1, 4, 1, 1)
    np.testing.assert_array_equal(weights(result.model)[add.input[1]], want)
    assert_same(model, result.model, f32(rng.normal(size=(2, 3, 5, 5))), rtol=1e-6)


def test_a_dense_layer_after_a_constant_outputs_a_constant(rng):
    """
    x(N,6) -> Gemm Z (all-zero weights, bias) -> Relu -> Gemm fc2 -> y
    """
    b = Builder(rng)
    z = b.gemm("x", "Z", 6, 4)
    b.inits[-2] = numpy_helper.from_array(np.zeros((4, 6), np.float32), "Z.w")
    b.inits[-1] = numpy_helper.from_array(f32([0.5, -0.5, 1.0, 2.0]), "Z.b")
    model = b.model(b.gemm(b.op("Relu", [z], "rz"), "fc2", 4, 3), ["N", 6])
    result = alone(FOLD_CONSTANT, model)
    assert ops(result.model) == Counter({"Gemm": 1})
    # the merged layer is all-zero too: the output Identity folds into it in a second round
    assert [r.nodes for r in result.rewrites] == [("Z", "fc2"), ("Z+fc2", "output")]
    assert result.rewrites[0].detail == "constant input: the next layer outputs a constant"
    assert result.states == {"Z": "constant", "fc2": "constant"}
    w = weights(model)
    want = np.maximum(w["Z.b"], 0) @ w["fc2.w"].T + w["fc2.b"]
    x = f32(rng.normal(size=(3, 6)))
    np.testing.assert_allclose(run_ort(result.model, {"x": x})[0], np.tile(want, (3, 1)), rtol=1e-6)
    assert_same(model, result.model, x, rtol=1e-6)


def test_a_constant_is_not_merged_into_a_larger_zero_layer(rng):
    """
    x(N,c) -> Gemm Z (all-zero weights, c->k) -> Relu -> Gemm wide (k->16) -> y

    The merge leaves one zero layer of c x 16 weights. For c=3, k=1 that is 48 for the pair's
    3 + 16: declined and reported, the graph unchanged (surgery never grows a model); for c=2,
    k=2, 32 for 4 + 32: taken.
    """
    b = Builder(rng)
    z = b.gemm("x", "Z", 2, 2)
    b.inits[-2] = numpy_helper.from_array(np.zeros((2, 2), np.float32), "Z.w")
    model = b.model(b.gemm(b.op("Relu", [z], "rz"), "wide", 2, 16), ["N", 2])
    b2 = Builder(rng)
    z2 = b2.gemm("x", "Z", 3, 1)
    b2.inits[-2] = numpy_helper.from_array(np.zeros((1, 3), np.float32), "Z.w")
    larger = b2.model(b2.gemm(b2.op("Relu", [z2], "rz"), "wide", 1, 16), ["N", 3])
    result = alone(FOLD_CONSTANT, larger)
    [declined] = [r for r in result.rewrites if r.nodes == ("Z", "wide")]
    assert not declined.applied and "skipped" in declined.detail
    assert ops(result.model)["Gemm"] == 2
    x = f32(rng.normal(size=(3, 3)))
    np.testing.assert_array_equal(run_ort(result.model, {"x": x})[0], run_ort(larger, {"x": x})[0])
    taken = alone(FOLD_CONSTANT, model)
    assert ops(taken.model)["Gemm"] == 1


def test_a_padded_conv_after_a_constant_stays(rng):
    """
    x -> Conv Z (all-zero weights, bias 0.1) -> Conv3x3 p1 -> y   (its zero padding varies the output)
    """
    b = Builder(rng)
    model = b.model(b.conv(zero_conv(b, "x", "Z", 3, 4, pad=1), "c2", 4, 2, 3, pad=1), ["N", 3, 6, 6])
    result = alone(FOLD_CONSTANT, model)
    assert ops(result.model) == ops(model) and not result.rewrites
    x = f32(rng.normal(size=(2, 3, 6, 6)))
    np.testing.assert_array_equal(run_ort(result.model, {"x": x})[0], run_ort(model, {"x": x})[0])


def test_all_zero_layer_is_folded_forward(rng, tmp_path):
    """
    x -> Conv -> Relu -> Conv Z (all-zero weights, bias) -> Relu -> Conv (no pad) -> Relu -> Conv -> y

    Z outputs relu(bias): a constant, which the unpadded convs after it map to other constants:
    Z, c2 and c3 collapse into one all-zero conv whose bias is the output. c0 stays, as the
    carrier of the batch and spatial shape.
    """
    b = Builder(rng)
    h = b.op("Relu", [b.conv("x", "c0", 3, 4, 3, pad=1)], "r0")
    z = b.conv(h, "Z", 4, 4, 3, pad=1)
    b.inits[-2] = numpy_helper.from_array(np.zeros((4, 4, 3, 3), np.float32), "Z.w")
    h = b.op("Relu", [z], "rz")
    h = b.op("Relu", [b.conv(h, "c2", 4, 4, 3)], "r2")
    model = b.model(b.conv(h, "c3", 4, 2, 1), ["N", 3, 8, 8])
    result = surgery(model, f32(rng.normal(size=(16, 3, 8, 8))), tmp_path)
    assert applied(result, "fold_constant")
    states = {layer.name: layer.state for layer in result.report.layers}
    assert states["Z"] == states["c2"] == "constant"  # c3 owns no rectifier: not in the table
    assert result.report.model.depth_before == 4 and result.report.model.depth_after == 2
    assert ops(result.model)["Relu"] == 1
    assert_same(model, result.model, f32(rng.normal(size=(2, 3, 8, 8))))
