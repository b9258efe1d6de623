"""Graph surgery end to end: the rewrites one after another on tiny onnx.helper models.

The models are driven through ``egp_onnx.compress(..., sparsity=STATISTICS_ONLY)`` (see
surgery_checks): no weight is pruned, so every change comes from the statistics and from algebra.
Each rewrite alone is tested in tests/surgery/test_<rewrite>.py.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from models import Builder
from onnx import numpy_helper
from surgery_checks import applied, assert_same, ops, positive, surgery

from egp_onnx.graph.structure import Depth, depth

# --------------------------------------------------------------------------- conv pairs
PAIRS = {
    # name: (A: k, stride, pad, bias), (B: k, stride, pad), exact merge expected
    "3x3p1_then_1x1": ((3, 1, 1, 0.1), (1, 1, 0), True),
    "1x1_then_3x3p1_nobias": ((1, 1, 0, None), (3, 1, 1), True),
    "1x1_then_3x3p1_bias": ((1, 1, 0, 0.1), (3, 1, 1), False),
    "3x3s2p1_then_1x1": ((3, 2, 1, 0.1), (1, 1, 0), True),
    "3x3s2p1_then_3x3s2": ((3, 2, 1, 0.1), (3, 2, 0), True),
}


@pytest.mark.parametrize("case", sorted(PAIRS))
def test_always_on_relu_between_convs(case, rng, tmp_path):
    """
    x -> Conv A (positive) -> Relu (always ON) -> Conv B -> y
    """
    (ka, sa, pa, ba), (kb, sb, pb), exact = PAIRS[case]
    b = Builder(rng)
    a = b.conv("x", "A", 3, 6, ka, sa, pa, positive=True, bias=ba)
    out = b.conv(b.op("Relu", [a], "relu"), "B", 6, 4, kb, sb, pb)
    model = b.model(out, ["N", 3, "H", "W"])
    x = positive(rng, (16, 3, 9, 9))
    result = surgery(model, x, tmp_path)
    assert applied(result, "remove_rectifier")
    assert ops(result.model)["Relu"] == 0
    merged = applied(result, "merge")
    if exact:
        assert ops(result.model)["Conv"] == 1 and len(merged) == 1 and merged[0].exact
        assert {layer.state for layer in result.report.layers} == {"merged"}
        assert result.report.model.depth_after == 1
        assert_same(model, result.model, positive(rng, (3, 3, 13, 11)))
    else:
        assert ops(result.model)["Conv"] == 2, "inexact merge declined at tolerance 0"
        declined = [r for r in result.report.surgery.rewrites if r.kind == "merge" and not r.applied]
        assert declined and not declined[0].exact
        assert_same(model, result.model, positive(rng, (3, 3, 13, 11)))
        loose = surgery(model, x, tmp_path, merge_tolerance=0.5)
        merge = applied(loose, "merge")
        assert ops(loose.model)["Conv"] == 1 and merge and merge[0].error is not None and merge[0].error > 0
        assert loose.report.surgery.rel_error == pytest.approx(merge[0].error, rel=1e-3)


def test_always_on_relu_between_gemms(rng, tmp_path):
    """
    x(N,5) -> Gemm (positive) -> Relu (always ON) -> Gemm -> Relu (mixed) -> Gemm -> y
    """
    b = Builder(rng)
    h = b.op("Relu", [b.gemm("x", "fc1", 5, 7, positive=True)], "relu1")
    h = b.op("Relu", [b.gemm(h, "fc2", 7, 6)], "relu2")
    model = b.model(b.gemm(h, "fc3", 6, 3), ["N", 5])
    x = positive(rng, (64, 5))
    result = surgery(model, x, tmp_path)
    assert ops(result.model) == Counter({"Gemm": 2, "Relu": 1, "Identity": 1})
    states = {layer.name: layer.state for layer in result.report.layers}
    assert states["fc1"] == "merged" and states["fc2"] == "merged"
    assert result.report.model.depth_before == 3 and result.report.model.depth_after == 2
    assert_same(model, result.model, positive(rng, (9, 5)))
    # an independent expectation: W = W2 W1, b = W2 b1 + b2
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    merged = next(n for n in result.model.graph.node if n.op_type == "Gemm" and "fc1" in n.name)
    got = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    weight, bias = got[merged.input[1]], got[merged.input[2]]
    # channels of relu2 that are always OFF were zeroed after the merge (and say so)
    off = ~weight.any(axis=0)
    assert not off.any() or applied(result, "zero_off_channels")
    np.testing.assert_allclose(weight[:, ~off], (w["fc2.w"] @ w["fc1.w"]).T[:, ~off], rtol=1e-5)
    np.testing.assert_allclose(bias[~off], (w["fc2.w"] @ w["fc1.b"] + w["fc2.b"])[~off], rtol=1e-5)


@pytest.mark.parametrize("shortcut", ["identity", "projection"])
def test_residual_block_with_always_on_inner_relu_becomes_one_conv(shortcut, rng, tmp_path):
    """
    x -> Conv1x1 (positive, no bias) -> Relu (always ON) -> Conv3x3 p1 -> Add -> Relu -> y
    x ----------------------------------------------------(identity | Conv1x1)-^
    """
    b = Builder(rng)
    inner = b.op("Relu", [b.conv("x", "conv1", 4, 4, 1, positive=True, bias=None)], "relu1")
    branch = b.conv(inner, "conv2", 4, 4, 3, pad=1)
    short = "x" if shortcut == "identity" else b.conv("x", "proj", 4, 4, 1)
    out = b.op("Relu", [b.op("Add", [branch, short], "add")], "relu2")
    model = b.model(out, ["N", 4, 7, 7])
    result = surgery(model, positive(rng, (16, 4, 7, 7)), tmp_path)
    assert ops(result.model) == Counter({"Conv": 1, "Relu": 1, "Identity": 1})
    assert applied(result, "fold_residual")
    assert result.report.model.depth_after == 1
    assert_same(model, result.model, positive(rng, (3, 4, 7, 7)))


def test_batchnorm_between_conv_and_relu(rng, tmp_path):
    """
    x -> Conv3x3 p1 (positive) -> BatchNormalization -> Relu (always ON) -> Conv1x1 -> y
    """
    b = Builder(rng)
    c = b.conv("x", "conv", 3, 5, 3, pad=1, positive=True)
    params = [
        b.init(n, v)
        for n, v in (
            ("s", rng.uniform(0.5, 1.5, 5)),
            ("t", np.full(5, 2.0)),
            ("m", rng.normal(size=5) * 0.1),
            ("v", rng.uniform(0.5, 2, 5)),
        )
    ]
    bn = b.op("BatchNormalization", [c, *params], "bn")
    model = b.model(b.conv(b.op("Relu", [bn], "relu"), "head", 5, 3, 1), ["N", 3, 6, 6])
    result = surgery(model, positive(rng, (16, 3, 6, 6)), tmp_path)
    assert applied(result, "fold_bn") and applied(result, "remove_rectifier") and applied(result, "merge")
    assert ops(result.model) == Counter({"Conv": 1, "Identity": 1})
    assert_same(model, result.model, positive(rng, (3, 3, 6, 6)))


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_unknown_ops_untouched_across_opsets(opset, rng, tmp_path):
    """
    x -> Conv (positive) -> Relu (ON) -> ConvTranspose -> Sigmoid -> Concat(x') -> Clip -> Resize -> y
    """
    b = Builder(rng)
    h = b.op("Relu", [b.conv("x", "c0", 3, 4, 3, pad=1, positive=True)], "r0")
    h = b.op("ConvTranspose", [h, b.init("ct.w", rng.normal(size=(4, 3, 2, 2)) * 0.3)], "ct", strides=[2, 2])
    h = b.op("Sigmoid", [h], "sig")
    h = b.op("Concat", [h, h], "cat", axis=1)
    lo, hi = b.init("lo", np.array(0.2)), b.init("hi", np.array(0.7))
    h = b.op("Clip", [h, lo, hi], "clip")
    scales = b.init("scales", np.array([1, 1, 2, 2]))
    resize_inputs = [h, "", scales] if opset >= 13 else [h, b.init("roi", np.zeros(0)), scales]
    model = b.model(b.op("Resize", resize_inputs, "resize", mode="nearest"), ["N", 3, "H", "W"], opset)
    result = surgery(model, positive(rng, (8, 3, 5, 5)), tmp_path)
    after = ops(result.model)
    for op in ("ConvTranspose", "Sigmoid", "Concat", "Clip", "Resize"):
        assert after[op] == 1
    assert after["Relu"] == 0
    assert_same(model, result.model, positive(rng, (2, 3, 6, 7)))
    assert result.model.opset_import[0].version == opset


def test_depth_counts_layers_and_nonlinearities(rng):
    b = Builder(rng)
    h = b.op("Relu", [b.conv("x", "c0", 3, 4, 3, pad=1)], "r0")
    side = b.conv("x", "side", 3, 4, 1)
    h = b.op("Relu", [b.conv(h, "c1", 4, 4, 3, pad=1)], "r1")
    model = b.model(b.op("Add", [h, side], "add"), ["N", 3, 6, 6])
    assert depth(model) == Depth(layers=2, nonlinear=2)


def test_the_graph_surgeon_graph_is_freed_when_simplify_returns(rng, monkeypatch):
    """gs graphs are webs of cycles that hold the weights: simplify collects its own at once
    (for models from COLLECT_BYTES on; here every model)."""
    import gc

    import onnx_graphsurgeon as gs

    import egp_onnx.surgery as surgery
    from egp_onnx.surgery import simplify

    monkeypatch.setattr(surgery, "COLLECT_BYTES", 0)

    b = Builder(rng)
    h = b.op("Relu", [b.conv("x", "a", 3, 4, 3, pad=1)], "relu")
    model = b.model(b.conv(h, "b", 4, 2, 1), ["N", 3, 6, 6])
    gc.collect()
    gc.disable()
    try:
        result = simplify(model, {})
        alive = [o for o in gc.get_objects() if type(o) is gs.Graph]  # isinstance reads __class__
    finally:
        gc.enable()
    assert result.model.graph.node and alive == []
