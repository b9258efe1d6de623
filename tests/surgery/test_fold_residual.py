"""fold_residual alone: a shortcut folded into the centre tap of the conv beside it (exact by algebra)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from models import Builder, f32
from references import run_ort
from surgery_checks import alone, assert_same, node, ops, weights

from egp_onnx.surgery.rewrites.fold_residual import NAME as FOLD_RESIDUAL


def test_an_identity_shortcut_folds_into_the_centre_tap(rng):
    """
    x -> Conv3x3 p1 F (4->4) -> Add(+ x) -> y
    """
    b = Builder(rng)
    model = b.model(b.op("Add", ["x", b.conv("x", "F", 4, 4, 3, pad=1)], "add"), ["N", 4, 6, 6])
    result = alone(FOLD_RESIDUAL, model)
    assert ops(result.model) == Counter({"Conv": 1, "Identity": 1})
    [rewrite] = result.rewrites
    assert rewrite.nodes == ("F", "add") and rewrite.detail == "shortcut folded into the centre tap"
    assert result.states == {"F": "merged"}
    want = weights(model)["F.w"].copy()
    want[:, :, 1, 1] += np.eye(4, dtype=np.float32)
    np.testing.assert_array_equal(weights(result.model)[node(result.model, "F").input[1]], want)
    assert_same(model, result.model, f32(rng.normal(size=(2, 4, 6, 6))), rtol=1e-6)


def test_a_1x1_projection_shortcut_folds_into_the_centre_tap(rng):
    """
    x -> Conv3x3 s2 p1 F (3->4) -> Add -> y
    x -> Conv1x1 s2 P (3->4) -------^
    """
    b = Builder(rng)
    f, p = b.conv("x", "F", 3, 4, 3, stride=2, pad=1), b.conv("x", "P", 3, 4, 1, stride=2)
    model = b.model(b.op("Add", [p, f], "add"), ["N", 3, 7, 7])
    result = alone(FOLD_RESIDUAL, model)
    assert ops(result.model) == Counter({"Conv": 1, "Identity": 1})
    assert result.rewrites[0].nodes == ("F", "P", "add")
    assert result.states == {"F": "merged", "P": "removed"}  # P is no longer a node of the graph
    w, got = weights(model), weights(result.model)
    conv = node(result.model, "F")
    want = w["F.w"].copy()
    want[:, :, 1, 1] += w["P.w"][:, :, 0, 0]
    np.testing.assert_array_equal(got[conv.input[1]], want)
    np.testing.assert_allclose(got[conv.input[2]], w["F.b"] + w["P.b"], rtol=1e-6)
    assert_same(model, result.model, f32(rng.normal(size=(2, 3, 7, 7))), rtol=1e-5)


def _also_an_output(b):
    """x -> Conv3x3 p1 F -> Add(+ x) -> y, with F's output a graph output too."""
    f = b.conv("x", "F", 4, 4, 3, pad=1)
    return b.model([b.op("Add", ["x", f], "add"), f], inputs={"x": ["N", 4, 5, 5]})


def _wide_projection(b):
    """x -> Conv3x3 p1 F -> Add(+ Conv3x3 p1 P(x)) -> y: only a 1x1 projection is a centre tap."""
    f, p = b.conv("x", "F", 4, 4, 3, pad=1), b.conv("x", "P", 4, 4, 3, pad=1)
    return b.model(b.op("Add", [f, p], "add"), ["N", 4, 5, 5])


def _off_centre(b):
    """x -> Conv3x3 F padded (0, 0) before, (2, 2) after -> Add(+ x) -> y: the kernel is not centred."""
    w, bias = b.init("F.w", b.rng.normal(size=(4, 4, 3, 3))), b.init("F.b", np.zeros(4))
    f = b.op("Conv", ["x", w, bias], "F", pads=[0, 0, 2, 2])
    return b.model(b.op("Add", [f, "x"], "add"), ["N", 4, 5, 5])


@pytest.mark.parametrize(
    "case", [_also_an_output, _wide_projection, _off_centre], ids=lambda f: f.__name__[1:]
)
def test_shortcuts_that_do_not_fit_the_centre_tap_stay(case, rng):
    model = case(Builder(rng))
    result = alone(FOLD_RESIDUAL, model)
    assert ops(result.model) == ops(model) and not result.rewrites
    x = f32(rng.normal(size=(2, 4, 5, 5)))
    for got, want in zip(run_ort(result.model, {"x": x}), run_ort(model, {"x": x}), strict=True):
        np.testing.assert_array_equal(got, want)


def test_an_even_kernel_keeps_its_projection_and_says_nothing_of_it(rng):
    """
    x (2x2) -> Conv2x2 F (3->4), output 1x1 -> Add (broadcast to 2x2) -> y
    x (2x2) -> Conv1x1 P (3->4), output 2x2 --^
    An even kernel has no centre tap: nothing folds, and P's state is not "merged".
    """
    b = Builder(rng)
    f, p = b.conv("x", "F", 3, 4, 2), b.conv("x", "P", 3, 4, 1)
    model = b.model(b.op("Add", [f, p], "add"), ["N", 3, 2, 2])
    result = alone(FOLD_RESIDUAL, model)
    assert ops(result.model) == ops(model) and not result.rewrites
    assert result.states == {}
    x = f32(rng.normal(size=(2, 3, 2, 2)))
    for got, want in zip(run_ort(result.model, {"x": x}), run_ort(model, {"x": x}), strict=True):
        np.testing.assert_array_equal(got, want)
