"""fold_bn alone: a BatchNormalization folded into the Conv or Gemm before it (exact by algebra)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from models import Builder, f32
from references import run_ort
from surgery_checks import alone, assert_same, node, ops, weights

FOLD_BN = "fold_bn"


def folded(w, b, scale, shift, mean, var, axis, eps=1e-5):
    """W' = W s / sqrt(v + eps) along the output axis, b' = (b - m) s / sqrt(v + eps) + t."""
    factor = scale / np.sqrt(var + eps)
    shape = [1] * w.ndim
    shape[axis] = -1
    return w * factor.reshape(shape), (b - mean) * factor + shift


def bn_params(w: dict, name: str) -> list[np.ndarray]:
    return [w[f"{name}.{p}"] for p in ("scale", "shift", "mean", "var")]


def test_batchnorm_folds_into_the_conv_before_it(rng):
    """
    x -> Conv3x3 p1 "conv" (bias) -> BatchNormalization "bn" -> y
    """
    b = Builder(rng)
    model = b.model(b.bn(b.conv("x", "conv", 3, 5, 3, pad=1), "bn", 5), ["N", 3, 6, 6])
    result = alone(FOLD_BN, model)
    assert ops(result.model) == Counter({"Conv": 1, "Identity": 1})
    [rewrite] = result.rewrites
    assert (rewrite.kind, rewrite.nodes, rewrite.exact, rewrite.applied) == (
        FOLD_BN,
        ("conv", "bn"),
        True,
        True,
    )
    assert_same(model, result.model, f32(rng.normal(size=(4, 3, 6, 6))), rtol=1e-5)
    w, got = weights(model), weights(result.model)
    conv = node(result.model, "conv")
    want_w, want_b = folded(
        w["conv.w"], w["conv.b"], *(w[f"bn.{p}"] for p in ("scale", "shift", "mean", "var")), 0
    )
    np.testing.assert_allclose(got[conv.input[1]], want_w, rtol=1e-5)
    np.testing.assert_allclose(got[conv.input[2]], want_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_batchnorm_folds_into_a_gemm_along_its_output_axis(trans_b, rng):
    """
    x(N,6) -> Gemm(6->4, transB) "fc" -> BatchNormalization "bn" -> y
    """
    b = Builder(rng)
    w = rng.normal(size=(4, 6) if trans_b else (6, 4))
    fc = b.op("Gemm", ["x", b.init("fc.w", w), b.init("fc.b", rng.normal(size=4))], "fc", transB=trans_b)
    model = b.model(b.bn(fc, "bn", 4), ["N", 6])
    result = alone(FOLD_BN, model)
    assert ops(result.model) == Counter({"Gemm": 1, "Identity": 1})
    assert_same(model, result.model, f32(rng.normal(size=(5, 6))), rtol=1e-5)
    init, got = weights(model), weights(result.model)
    gemm = node(result.model, "fc")
    want_w, want_b = folded(init["fc.w"], init["fc.b"], *bn_params(init, "bn"), axis=0 if trans_b else 1)
    np.testing.assert_allclose(got[gemm.input[1]], want_w, rtol=1e-5)
    np.testing.assert_allclose(got[gemm.input[2]], want_b, rtol=1e-5, atol=1e-6)


def _read_twice(b):
    """x -> Conv -> BN -> Add(+ the conv's output) -> y: the conv's output has a second reader."""
    c = b.conv("x", "conv", 3, 3, 3, pad=1)
    return b.model(b.op("Add", [b.bn(c, "bn", 3), c], "add"), ["N", 3, 6, 6]), (2, 3, 6, 6)


def _matmul(b):
    """x(N,6) -> MatMul -> BN -> y: a MatMul has no bias input to fold the shift into."""
    mm = b.op("MatMul", ["x", b.init("mm.w", b.rng.normal(size=(6, 4)))], "mm")
    return b.model(b.bn(mm, "bn", 4), ["N", 6]), (2, 6)


def _half(b):
    """x -> Conv (float16) -> BN -> y: float16 weights are left to the model's own arithmetic."""
    return b.model(b.bn(b.conv("x", "conv", 3, 4, 3, pad=1), "bn", 4), ["N", 3, 6, 6]), (2, 3, 6, 6)


@pytest.mark.parametrize("case", [_read_twice, _matmul, _half], ids=lambda f: f.__name__[1:])
def test_batchnorm_stays_where_folding_is_not_exact(case, rng):
    b = Builder(rng, np.float16 if case is _half else np.float32)
    model, shape = case(b)
    result = alone(FOLD_BN, model)
    assert ops(result.model) == ops(model) and not result.rewrites
    x = rng.normal(size=shape).astype(b.dtype)
    np.testing.assert_array_equal(run_ort(result.model, {"x": x})[0], run_ort(model, {"x": x})[0])
