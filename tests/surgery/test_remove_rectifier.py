"""remove_rectifier alone, with its zero_off_channels step: exact on the calibration data.

The channel states come from a plain onnxruntime run of each model on the calibration inputs
(surgery_checks.channel_states), independently of egp-onnx's statistics.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import compress_plain
from models import Builder, _model, _x, _y, f32, save
from onnx import helper, numpy_helper
from references import run_ort
from surgery_checks import (
    alone,
    applied,
    assert_same,
    channel_states,
    node,
    ops,
    positive,
    surgery,
    weights,
)

from egp_onnx.report.records import Rewrite
from egp_onnx.surgery import ChannelStates
from egp_onnx.surgery.rewrites.rectifiers import NAME as REMOVE
from egp_onnx.surgery.rewrites.rectifiers import ZERO_OFF_CHANNELS


def conv_act_conv(rng, op: str, bias, *act_inputs, **attrs):
    """
    x -> Conv A (3->4, 3x3 p1, bias ``bias``) -> ``op`` "act" -> Conv1x1 B (4->2) -> y
    """
    b = Builder(rng)
    a = b.conv("x", "A", 3, 4, 3, pad=1)
    b.inits[-1] = numpy_helper.from_array(f32(bias), "A.b")
    act = b.op(op, [a, *(b.init(n, v) for n, v in act_inputs)], "act", **attrs)
    return b.model(b.conv(act, "B", 4, 2, 1), ["N", 3, 6, 6])


def test_an_always_on_relu_is_bypassed(rng):
    b = Builder(rng)
    a = b.conv("x", "A", 3, 4, 3, pad=1, positive=True)
    model = b.model(b.conv(b.op("Relu", [a], "act"), "B", 4, 2, 1), ["N", 3, 6, 6])
    x = positive(rng, (8, 3, 6, 6))
    result = alone(REMOVE, model, channel_states(model, x, {"act": "A"}))
    assert ops(result.model) == Counter({"Conv": 2, "Identity": 1})
    detail = "4 channels always ON, 0 always OFF"
    assert result.rewrites == [Rewrite(kind=REMOVE, nodes=("act",), exact=True, applied=True, detail=detail)]
    assert result.states == {"A": "identity"}
    assert_same(model, result.model, positive(rng, (3, 3, 6, 6)), rtol=1e-6)
    # bypassing moves no weight
    assert sorted(w.tobytes() for w in weights(result.model).values()) == sorted(
        w.tobytes() for w in weights(model).values()
    )


def test_always_off_channels_lose_their_weights_and_the_mixed_relu_stays(rng):
    model = conv_act_conv(rng, "Relu", [-50, 0.1, -50, 0.2])
    x = f32(rng.normal(size=(16, 3, 6, 6)))
    result = alone(REMOVE, model, channel_states(model, x, {"act": "A"}))
    assert ops(result.model) == ops(model), "channels 1 and 3 switch: the Relu stays"
    [zeroed] = result.rewrites
    assert (zeroed.kind, zeroed.nodes, zeroed.applied) == (ZERO_OFF_CHANNELS, ("A", "act"), True)
    before, after = weights(model), weights(result.model)
    off = np.array([True, False, True, False])
    want_w, want_b = before["A.w"].copy(), before["A.b"].copy()
    want_w[off], want_b[off] = 0, 0
    conv = node(result.model, "A")
    np.testing.assert_array_equal(after[conv.input[1]], want_w)
    np.testing.assert_array_equal(after[conv.input[2]], want_b)
    assert result.dead_parameters_zeroed == np.count_nonzero(before["A.w"][off]) + 2
    assert f"2 always-OFF channels, {result.dead_parameters_zeroed} dead parameters zeroed" == zeroed.detail
    assert_same(model, result.model, x, rtol=1e-6)


def test_an_always_off_relu_is_zeroed_then_removed(rng):
    model = conv_act_conv(rng, "Relu", [-50] * 4)
    x = f32(rng.normal(size=(16, 3, 6, 6)))
    result = alone(REMOVE, model, channel_states(model, x, {"act": "A"}))
    assert [r.kind for r in result.rewrites] == [ZERO_OFF_CHANNELS, REMOVE]
    assert ops(result.model) == Counter({"Conv": 2, "Identity": 1})
    assert not weights(result.model)[node(result.model, "A").input[1]].any()
    assert_same(model, result.model, x, rtol=1e-6)


PER_CHANNEL = [0.1, 0.2, 0.3, 0.4]
SLOPES = {
    # name: (op, extra inputs, attributes, negative-side slope per channel)
    "leaky": ("LeakyRelu", [], {"alpha": 0.2}, [0.2] * 4),
    "prelu_per_channel": (
        "PRelu",
        [("slope", np.reshape([0.1, 0.2, 0.3, 0.4], (4, 1, 1)))],
        {},
        [0.1, 0.2, 0.3, 0.4],
    ),
    "prelu_scalar": ("PRelu", [("slope", np.array([0.3]))], {}, [0.3] * 4),
}


@pytest.mark.parametrize("case", sorted(SLOPES))
def test_a_leaky_rectifier_that_never_changes_sign_moves_its_slope_into_the_layer(case, rng):
    op, inputs, attrs, slope = SLOPES[case]
    model = conv_act_conv(rng, op, [50, -50, 50, -50], *inputs, **attrs)
    x = f32(rng.normal(size=(16, 3, 6, 6)))
    result = alone(REMOVE, model, channel_states(model, x, {"act": "A"}))
    assert ops(result.model) == Counter({"Conv": 2, "Identity": 1})
    assert applied(result, REMOVE)[0].detail.startswith("2 channels always positive, 2 always negative")
    factor = np.where([False, True, False, True], slope, 1.0)
    before, after = weights(model), weights(result.model)
    conv = node(result.model, "A")
    np.testing.assert_allclose(after[conv.input[1]], before["A.w"] * factor.reshape(4, 1, 1, 1), rtol=1e-6)
    np.testing.assert_allclose(after[conv.input[2]], before["A.b"] * factor, rtol=1e-6)
    assert_same(model, result.model, x, rtol=1e-5)


def test_rectifiers_that_are_not_the_identity_stay(rng):
    """ReLU6 always ON (its upper side is not measured), a PRelu slope that varies along the width,
    statistics of another channel count."""
    x = f32(rng.normal(size=(16, 3, 6, 6)))
    relu6 = conv_act_conv(rng, "Clip", [50] * 4, ("lo", np.array(0.0)), ("hi", np.array(6.0)))
    wide = conv_act_conv(rng, "PRelu", [-50] * 4, ("slope", np.linspace(0.1, 0.6, 6)))
    relu = conv_act_conv(rng, "Relu", [50] * 4)
    for model, stats in (
        (relu6, channel_states(relu6, x, {"act": "A"})),
        (wide, channel_states(wide, x, {"act": "A"})),
        (relu, {"act": ChannelStates(np.ones(3, bool), np.zeros(3, bool))}),
    ):
        result = alone(REMOVE, model, stats)
        assert ops(result.model) == ops(model) and not result.rewrites
        assert_same(model, result.model, x, rtol=1e-6)


def test_always_off_channels_are_zeroed_and_reported(rng, tmp_path):
    """
    x -> Conv (channels 0, 1 with bias -50: always OFF) -> Relu (mixed) -> Conv -> y
    """
    b = Builder(rng)
    a = b.conv("x", "A", 3, 5, 3, pad=1)
    b.inits[-1] = numpy_helper.from_array(f32([-50, -50, 0.1, 0.2, 0.0]), "A.b")
    model = b.model(b.conv(b.op("Relu", [a], "relu"), "B", 5, 2, 1), ["N", 3, 6, 6])
    result = surgery(model, f32(rng.normal(size=(32, 3, 6, 6))), tmp_path)
    zeroed = applied(result, "zero_off_channels")
    assert zeroed and "2 always-OFF channels" in zeroed[0].detail
    assert result.report.surgery.dead_parameters_zeroed == 2 * 3 * 3 * 3 + 2
    assert ops(result.model)["Relu"] == 1, "the other channels still switch"
    values = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    conv_a = next(n for n in result.model.graph.node if n.name == "A")
    assert not values[conv_a.input[1]][:2].any() and values[conv_a.input[1]][2:].all()
    assert_same(model, result.model, f32(rng.normal(size=(4, 3, 6, 6))))


def relu_output_model() -> onnx.ModelProto:
    """A ReLU whose output is the graph output; positive weights and biases keep both ReLUs ON.

    x(N,3,6,6) -> Conv3x3 c1 (+5) -> Relu r1 -> Conv1x1 c2 (+5) -> Relu r2 = y (graph output)
    """
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.uniform(0.05, 0.5, (4, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.full(4, 5.0, np.float32), "b1"),
        numpy_helper.from_array(rng.uniform(0.05, 0.5, (4, 4, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.full(4, 5.0, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="c1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="c2"),
        helper.make_node("Relu", ["c2"], ["y"], name="r2"),
    ]
    return _model(nodes, [_x()], [_y((4, 4, 4))], inits)


def test_relu_that_is_a_graph_output_is_removed(tmp_path):
    model = relu_output_model()
    x = np.random.default_rng(3).uniform(0, 1, (16, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    save(model, tmp_path / "m.onnx")
    kept = compress_plain(tmp_path / "m.onnx", tmp_path / "c.npz", sparsity=0.5, surgery=False, latency=False)
    result = compress_plain(tmp_path / "m.onnx", tmp_path / "c.npz", sparsity=0.5, latency=False)
    surgery = result.report.surgery
    assert not surgery.reverted
    removed = {r.nodes[0] for r in surgery.rewrites if r.kind == "remove_rectifier"}
    assert removed == {"r1", "r2"}
    assert [o.name for o in result.model.graph.output] == ["y"]
    assert "Relu" not in {n.op_type for n in result.model.graph.node}
    onnx.checker.check_model(result.model, full_check=True)
    np.testing.assert_allclose(
        run_ort(result.model, {"x": x})[0], run_ort(kept.model, {"x": x})[0], rtol=1e-4, atol=1e-4
    )
