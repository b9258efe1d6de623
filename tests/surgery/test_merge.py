"""merge alone: two layers in a row become one (exact by algebra, or measured at the borders)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from models import Builder, f32
from references import run_ort
from surgery_checks import alone, assert_same, node, ops, weights

from egp_onnx.report.records import Rewrite
from egp_onnx.surgery.registry import REWRITES
from egp_onnx.surgery.rewrites.merge import NAME as MERGE
from egp_onnx.surgery.surgeon import Surgeon


def test_a_conv_then_a_1x1_conv_merge_exactly(rng):
    """
    x -> Conv3x3 p1 A (bias) -> Conv1x1 B (bias) -> y
    """
    b = Builder(rng)
    model = b.model(b.conv(b.conv("x", "A", 3, 5, 3, pad=1), "B", 5, 4, 1), ["N", 3, 7, 6])
    result = alone(MERGE, model)
    assert ops(result.model) == Counter({"Conv": 1, "Identity": 1})
    assert result.rewrites == [
        Rewrite(kind=MERGE, nodes=("A", "B"), exact=True, applied=True, detail="Conv + Conv")
    ]
    assert result.states == {"A": "merged", "B": "merged"}
    assert_same(model, result.model, f32(rng.normal(size=(2, 3, 7, 6))), rtol=1e-5)
    w, got = weights(model), weights(result.model)
    merged = node(result.model, "A+B")
    w_b = w["B.w"][:, :, 0, 0]
    np.testing.assert_allclose(got[merged.input[1]], np.einsum("om,mihw->oihw", w_b, w["A.w"]), rtol=1e-5)
    np.testing.assert_allclose(got[merged.input[2]], w_b @ w["A.b"] + w["B.b"], rtol=1e-5)


def test_two_gemms_merge_into_one(rng):
    """
    x(N,5) -> Gemm fc1 -> Gemm fc2 -> y
    """
    b = Builder(rng)
    model = b.model(b.gemm(b.gemm("x", "fc1", 5, 7), "fc2", 7, 3), ["N", 5])
    result = alone(MERGE, model)
    assert ops(result.model) == Counter({"Gemm": 1, "Identity": 1})
    assert result.rewrites[0].detail == "Gemm + Gemm"
    assert_same(model, result.model, f32(rng.normal(size=(4, 5))), rtol=1e-5)
    w, got = weights(model), weights(result.model)
    merged = node(result.model, "fc1+fc2")
    # an independent expectation: y = x W1^T W2^T + W2 b1 + b2 (weights stored as (in, out) now)
    np.testing.assert_allclose(got[merged.input[1]], (w["fc2.w"] @ w["fc1.w"]).T, rtol=1e-5)
    np.testing.assert_allclose(got[merged.input[2]], w["fc2.w"] @ w["fc1.b"] + w["fc2.b"], rtol=1e-5)


def test_two_matmuls_merge_into_one_matmul_without_a_bias(rng):
    """
    x(N,5) -> MatMul m1 -> MatMul m2 -> y
    """
    b = Builder(rng)
    m1 = b.op("MatMul", ["x", b.init("m1.w", rng.normal(size=(5, 6)))], "m1")
    model = b.model(b.op("MatMul", [m1, b.init("m2.w", rng.normal(size=(6, 2)))], "m2"), ["N", 5])
    result = alone(MERGE, model)
    assert ops(result.model) == Counter({"MatMul": 1, "Identity": 1})
    w = weights(model)
    np.testing.assert_allclose(
        weights(result.model)[node(result.model, "m1+m2").input[1]], w["m1.w"] @ w["m2.w"], rtol=1e-5
    )
    assert_same(model, result.model, f32(rng.normal(size=(4, 5))), rtol=1e-5)


def border_pair(rng):
    """
    x -> Conv1x1 A (bias) -> Conv3x3 p1 B -> y   (B's zero padding meets A's bias: not exact)
    """
    b = Builder(rng)
    return b.model(b.conv(b.conv("x", "A", 3, 6, 1), "B", 6, 4, 3, pad=1), ["N", 3, 6, 6])


def test_an_inexact_merge_is_declined_without_a_measurement(rng):
    model = border_pair(rng)
    result = alone(MERGE, model)
    assert ops(result.model) == ops(model) and result.states == {}
    detail = "not exact at the borders; skipped"
    assert result.rewrites == [
        Rewrite(kind=MERGE, nodes=("A", "B"), exact=False, applied=False, detail=detail)
    ]


@pytest.mark.parametrize("tolerance", [0.5, 1e-9])
def test_an_inexact_merge_is_applied_when_its_measured_error_is_within_the_tolerance(tolerance, rng):
    model = border_pair(rng)
    x = f32(rng.normal(size=(8, 3, 6, 6)))
    want = run_ort(model, {"x": x})[0]

    def measure(candidate):
        got = run_ort(candidate, {"x": x})[0]
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))

    result = alone(MERGE, model, measure=measure, tolerance=tolerance)
    [rewrite] = result.rewrites
    assert not rewrite.exact and rewrite.error is not None and 0 < rewrite.error < 0.5
    assert rewrite.applied == (tolerance == 0.5)
    assert (
        rewrite.detail == f"not exact at the borders; measured {rewrite.error:.2e} vs tolerance {tolerance:g}"
    )
    if rewrite.applied:
        assert ops(result.model)["Conv"] == 1
        assert measure(result.model) == pytest.approx(rewrite.error, rel=1e-6)
        # exact away from the borders: the centre positions agree
        got = run_ort(result.model, {"x": x})[0]
        np.testing.assert_allclose(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-5)
    else:
        assert ops(result.model) == ops(model)
        np.testing.assert_array_equal(run_ort(result.model, {"x": x})[0], want)


def test_a_merge_that_would_add_macs_is_declined_once(rng):
    """
    x -> Conv3x3 A (16->2) -> Conv3x3 B (2->16) -> y   (the merged 5x5 kernel is 16x16)
    """
    b = Builder(rng)
    model = b.model(b.conv(b.conv("x", "A", 16, 2, 3), "B", 2, 16, 3), ["N", 16, 9, 9])
    surgeon = Surgeon(model, {})
    assert not REWRITES[MERGE].apply(surgeon) and not REWRITES[MERGE].apply(surgeon)
    growth = (16 * 16 * 5 * 5) / (2 * 16 * 3 * 3 + 16 * 2 * 3 * 3)
    detail = f"would multiply MACs by {growth:.2f}; skipped"
    assert surgeon.result.rewrites == [
        Rewrite(kind=MERGE, nodes=("A", "B"), exact=False, applied=False, detail=detail)
    ]
    result = alone(MERGE, model)
    assert ops(result.model) == ops(model) and len(result.rewrites) == 1
