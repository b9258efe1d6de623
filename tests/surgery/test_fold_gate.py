"""fold_gate alone: an emptied squeeze-excitation branch becomes its per-channel scale (exact by algebra)."""

from __future__ import annotations

from collections import Counter

import numpy as np
from models import Builder, f32
from onnx import numpy_helper
from references import reference_activations, run_ort
from surgery_checks import alone, assert_same, ops, weights

from egp_onnx.graph.weights import count_parameters
from egp_onnx.surgery import simplify
from egp_onnx.surgery.rewrites.fold_gate import NAME as FOLD_GATE

C, R = 8, 4  # channels, squeezed channels


def se_block(rng, zero: str | None, gated_input: str = "h"):
    """
    x -> Conv c0 (3x3) -> h -> GlobalAveragePool -> Conv se1 (1x1) -> Relu -> Conv se2 (1x1)
                         |                          -> HardSigmoid -> Mul(h, gate) -> y
                         '------------------------------------------------^

    ``zero`` names the SE conv whose weights are all zero (None: neither); ``gated_input`` is the
    Mul's other operand (``h``: a squeeze-excitation block; ``x0``: another tensor of h's shape).
    """
    b = Builder(rng)
    h = b.conv("x", "c0", 3, C, 3, pad=1)
    other = b.conv("x", "x0", 3, C, 3, pad=1) if gated_input == "x0" else h
    pooled = b.op("GlobalAveragePool", [h], "pool")
    s1 = b.op("Relu", [b.conv(pooled, "se1", C, R, 1)], "relu")
    gate = b.op("HardSigmoid", [b.conv(s1, "se2", R, C, 1)], "hsig", alpha=1 / 6, beta=0.5)
    if zero is not None:
        index = next(i for i, t in enumerate(b.inits) if t.name == f"{zero}.w")
        shape = numpy_helper.to_array(b.inits[index]).shape
        b.inits[index] = numpy_helper.from_array(np.zeros(shape, np.float32), f"{zero}.w")
    return b.model(b.op("Mul", [other, gate], "scale"), ["N", 3, "H", "W"])


def _hard_sigmoid(v: np.ndarray) -> np.ndarray:
    return np.clip(v / 6 + 0.5, 0, 1)


def test_an_emptied_excitation_conv_leaves_its_scale(rng):
    model = se_block(rng, zero="se2")
    result = alone(FOLD_GATE, model)
    assert ops(result.model) == Counter({"Conv": 1, "Mul": 1, "Identity": 1})
    [rewrite] = result.rewrites
    assert rewrite.applied and rewrite.exact and rewrite.nodes[0] == "pool" and rewrite.nodes[-1] == "scale"
    assert result.states == {"se1": "removed", "se2": "removed"}
    w = weights(model)
    want = _hard_sigmoid(w["se2.b"].astype(np.float64))  # independent: the gate of a zero conv is its bias's
    [scale] = [v for v in weights(result.model).values() if v.shape == (1, C, 1, 1)]
    np.testing.assert_allclose(scale.reshape(-1), want, rtol=1e-6)
    for shape in ((2, 3, 6, 6), (1, 3, 5, 9)):  # any H and W: the scale is the same constant
        x = f32(rng.normal(size=shape))
        assert_same(model, result.model, x, rtol=1e-6)
        h = reference_activations(model, ["c0"], {"x": x})["c0"]
        np.testing.assert_allclose(
            run_ort(result.model, {"x": x})[0], h * want[None, :, None, None], rtol=1e-5
        )
    assert count_parameters(result.model)[0] < count_parameters(model)[0]


def test_an_emptied_squeeze_conv_makes_the_rest_of_the_branch_constant(rng):
    model = se_block(rng, zero="se1")
    result = alone(FOLD_GATE, model)
    assert "GlobalAveragePool" not in ops(result.model) and ops(result.model)["Conv"] == 1
    w = weights(model)
    squeezed = np.maximum(w["se1.b"].astype(np.float64), 0)
    want = _hard_sigmoid(w["se2.w"].reshape(C, R).astype(np.float64) @ squeezed + w["se2.b"])
    [scale] = [v for v in weights(result.model).values() if v.shape == (1, C, 1, 1)]
    np.testing.assert_allclose(scale.reshape(-1), want, rtol=1e-6)
    assert_same(model, result.model, f32(rng.normal(size=(2, 3, 7, 4))), rtol=1e-6)


def test_a_live_branch_or_a_gate_on_another_tensor_stays(rng):
    for model in (se_block(rng, zero=None), se_block(rng, zero="se2", gated_input="x0")):
        result = alone(FOLD_GATE, model)
        assert result.rewrites == [] and ops(result.model) == ops(model)


def test_surgery_never_grows_an_emptied_se_block(rng):
    """All rewrites together: the branch goes, nothing is merged into a larger zero conv."""
    model = se_block(rng, zero="se1")
    result = simplify(model, {})
    assert (
        count_parameters(result.model)[0] <= count_parameters(model)[0] - (C * R + R + R * C + C) + C
    )  # + the scale
    assert_same(model, result.model, f32(rng.normal(size=(2, 3, 6, 6))), rtol=1e-6)
