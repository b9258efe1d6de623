"""surgery/narrow: dead channels cut out of the initializers change no output, on any input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import Builder, f32
from onnx import numpy_helper
from references import run_ort

from egp_onnx.graph.channels import channel_groups
from egp_onnx.load.model import prepare_model
from egp_onnx.surgery.narrow import narrowed, without_branch


def _values(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _set(model, name, value):
    """``model`` with initializer ``name`` replaced (the builder's random values, edited)."""
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(f32(value), name))
    return model


def _narrow_and_compare(model, removed, rng, shape):
    prepared = prepare_model(model)
    groups, _ = channel_groups(prepared)
    out = narrowed(prepared, groups, removed)
    onnx.checker.check_model(out, full_check=True)
    x = f32(rng.normal(size=(5, *shape)) * 3)  # any input: not calibration data
    (want,), (got,) = run_ort(model, {"x": x}), run_ort(out, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    return prepared, out


def test_dead_channels_through_bn_bias_residual_add_and_concat_go_exactly(rng):
    """
    x -> Conv "stem" -> Relu "r0" -+-> Conv "c1" (bias) -> BN "bn1" -> Relu "r1" -> Conv "c2" -> Add
                                   +----------------------------------------------------------^
    Add -> Relu "r2" -+-> Concat "cat" -> Conv "head" -> y
    x -> Conv "d" (bias) -> Relu "rd" -+
    c1's channel 2 is dead on any input: zero weights and bias, and BN maps 0 below 0; d's channel 1 too.
    """
    b = Builder(rng)
    r0 = b.op("Relu", [b.conv("x", "stem", 3, 4, 3, pad=1)], "r0")
    r1 = b.op("Relu", [b.bn(b.conv(r0, "c1", 4, 5, 3, pad=1), "bn1", 5)], "r1")
    r2 = b.op("Relu", [b.op("Add", [b.conv(r1, "c2", 5, 4, 3, pad=1), r0], "add")], "r2")
    rd = b.op("Relu", [b.conv("x", "d", 3, 3, 3, pad=1)], "rd")
    cat = b.op("Concat", [r2, rd], "cat", axis=1)
    model = b.model(b.conv(cat, "head", 7, 2, 3, pad=1), ["N", 3, 6, 6])
    v = _values(model)
    c1w, c1b = v["c1.w"].copy(), v["c1.b"].copy()
    c1w[2], c1b[2] = 0.0, 0.0
    mean, shift = v["bn1.mean"].copy(), v["bn1.shift"].copy()
    mean[2], shift[2] = 1.0, -0.5
    dw, db = v["d.w"].copy(), v["d.b"].copy()
    dw[1], db[1] = 0.0, -1.0
    for name, value in (
        ("c1.w", c1w),
        ("c1.b", c1b),
        ("bn1.mean", mean),
        ("bn1.shift", shift),
        ("d.w", dw),
        ("d.b", db),
    ):
        _set(model, name, value)
    before, out = _narrow_and_compare(model, {"c1": np.array([2]), "d": np.array([1])}, rng, (3, 6, 6))
    w = _values(out)
    assert w["c1.w"].shape == (4, 4, 3, 3) and w["c1.b"].shape == (4,)
    assert all(w[f"bn1.{p}"].shape == (4,) for p in ("scale", "shift", "mean", "var"))
    assert w["c2.w"].shape == (4, 4, 3, 3)  # its input lost channel 2, its output (the stream) stays
    np.testing.assert_array_equal(w["c2.w"], np.delete(_values(before)["c2.w"], 2, axis=1))
    # head reads the Concat: d's channel 1 is column 4 + 1
    np.testing.assert_array_equal(w["head.w"], np.delete(_values(before)["head.w"], 5, axis=1))
    assert w["d.w"].shape == (2, 3, 3, 3)


def test_a_dead_channel_after_a_depthwise_conv_takes_its_filter_and_group(rng):
    """
    x -> Conv1x1 "e" -> Relu "r1" -> Conv3x3 depthwise "dw" (group 6) -> Relu "r2" -> Conv1x1 "p" -> y
    dw's channel 3 is dead: zero filter, bias -1.
    """
    b = Builder(rng)
    dw = b.conv(b.op("Relu", [b.conv("x", "e", 3, 6, 1)], "r1"), "dw", 6, 6, 3, pad=1, group=6)
    model = b.model(b.conv(b.op("Relu", [dw], "r2"), "p", 6, 2, 1), ["N", 3, 6, 6])
    v = _values(model)
    w, bias = v["dw.w"].copy(), v["dw.b"].copy()
    w[3], bias[3] = 0.0, -1.0
    _set(_set(model, "dw.w", w), "dw.b", bias)
    _, out = _narrow_and_compare(model, {"e": np.array([3])}, rng, (3, 6, 6))
    got = _values(out)
    assert (
        got["e.w"].shape == (5, 3, 1, 1)
        and got["dw.w"].shape == (5, 1, 3, 3)
        and got["p.w"].shape == (2, 5, 1, 1)
    )
    (dw_node,) = [n for n in out.graph.node if n.name == "dw"]
    assert onnx.helper.get_attribute_value(next(a for a in dw_node.attribute if a.name == "group")) == 5


def test_flatten_into_gemm_slices_the_channel_columns(rng):
    """
    x -> Conv3x3 "a" (3 channels, bias) -> Relu "r" -> Flatten -> Gemm "fc" (27 -> 4) -> y
    a's channel 1 is dead: Gemm columns 9..17 (channel 1's 3x3 positions) go.
    """
    b = Builder(rng)
    r = b.op("Relu", [b.conv("x", "a", 2, 3, 3, pad=1)], "r")
    model = b.model(b.gemm(b.op("Flatten", [r], "flat", axis=1), "fc", 27, 4), ["N", 2, 3, 3])
    v = _values(model)
    w, bias = v["a.w"].copy(), v["a.b"].copy()
    w[1], bias[1] = 0.0, -1.0
    _set(_set(model, "a.w", w), "a.b", bias)
    before, out = _narrow_and_compare(model, {"a": np.array([1])}, rng, (2, 3, 3))
    np.testing.assert_array_equal(
        _values(out)["fc.w"], np.delete(_values(before)["fc.w"], range(9, 18), axis=1)
    )


def test_a_dead_channel_of_a_residual_stream_leaves_every_producer_and_consumer(rng):
    """
    x -> Conv "stem" -> Relu "r0" -+-> Conv "c1" -> Relu "r1" -> Conv "c2" -> Add -> Relu "r2"
                                   +---------------------------------------------^
    Relu "r2" -> Conv "head" -> y
    Stream channel 1 is dead at r0 (stem: zero filter, bias -1) and at r2 (c2: zero filter, bias -1).
    """
    b = Builder(rng)
    r0 = b.op("Relu", [b.conv("x", "stem", 3, 4, 3, pad=1)], "r0")
    c2 = b.conv(b.op("Relu", [b.conv(r0, "c1", 4, 5, 3, pad=1)], "r1"), "c2", 5, 4, 3, pad=1)
    model = b.model(
        b.conv(b.op("Relu", [b.op("Add", [c2, r0], "add")], "r2"), "head", 4, 2, 3), ["N", 3, 6, 6]
    )
    v = _values(model)
    for layer in ("stem", "c2"):
        w, bias = v[f"{layer}.w"].copy(), v[f"{layer}.b"].copy()
        w[1], bias[1] = 0.0, -1.0
        _set(_set(model, f"{layer}.w", w), f"{layer}.b", bias)
    before, out = _narrow_and_compare(model, {"stem": np.array([1])}, rng, (3, 6, 6))
    got, then = _values(out), _values(before)
    assert got["stem.w"].shape[0] == got["c2.w"].shape[0] == 3  # both producers lose the row
    np.testing.assert_array_equal(got["c1.w"], np.delete(then["c1.w"], 1, axis=1))
    np.testing.assert_array_equal(got["head.w"], np.delete(then["head.w"], 1, axis=1))


def _two_blocks(rng, scale=1.0):
    """
    x -> Conv "stem" -> Relu "r0" -+-> Conv "c1" -> BN "bn1" -> Relu "r1" -> Conv "c2" -> BN "bn2" -> Add
                                   +---------------------------------------------------------------^
    add1 -> Relu "r2" -+-> Conv "p1" -> Relu "rp" -> Conv "p2" (stride 2) -> Add "add2" -> Relu "r3"
                       +-> Conv "down" (1x1, stride 2) ---------------------------^
    r3 -> Conv "head" -> y
    ``scale`` multiplies c2's weights (0: the first branch outputs bn2's constant on any input).
    """
    b = Builder(rng)
    r0 = b.op("Relu", [b.conv("x", "stem", 3, 4, 3, pad=1)], "r0")
    r1 = b.op("Relu", [b.bn(b.conv(r0, "c1", 4, 6, 3, pad=1), "bn1", 6)], "r1")
    c2 = b.conv(r1, "c2", 6, 4, 3, pad=1)
    r2 = b.op("Relu", [b.op("Add", [b.bn(c2, "bn2", 4), r0], "add1")], "r2")
    p2 = b.conv(b.op("Relu", [b.conv(r2, "p1", 4, 5, 3, pad=1)], "rp"), "p2", 5, 4, 3, stride=2, pad=1)
    r3 = b.op("Relu", [b.op("Add", [p2, b.conv(r2, "down", 4, 4, 1, stride=2)], "add2")], "r3")
    model = b.model(b.conv(r3, "head", 4, 2, 3, pad=1), ["N", 3, 6, 6])
    return _set(model, "c2.w", _values(model)["c2.w"] * scale)


def test_residual_branches_are_the_nodes_only_one_add_operand_reads(rng):
    from egp_onnx.graph.channels import residual_branches

    found = {(b.add, b.operand): b for b in residual_branches(prepare_model(_two_blocks(rng)))}
    # add1's other operand r0 is read by c1 too: not a branch; add2 has two (p2's and the projection)
    assert set(found) == {("add1", "bn2"), ("add2", "p2"), ("add2", "down")}
    assert found["add1", "bn2"].nodes == ("c1", "bn1", "r1", "c2", "bn2")
    assert found["add1", "bn2"].layers == ("c1", "c2")
    assert found["add2", "p2"].layers == ("p1", "p2") and found["add2", "down"].layers == ("down",)
    assert {(b.rank, b.channels) for b in found.values()} == {(4, 4)}


def test_a_branch_that_is_constant_leaves_exactly_and_takes_its_weights_with_it(rng):
    """c2 all zero: the branch is bn2(c2.b) on any input, so x + c with that c is the same model."""
    from egp_onnx.graph.channels import residual_branches

    model = prepare_model(_two_blocks(rng, scale=0.0))
    branch = next(b for b in residual_branches(model) if b.add == "add1")
    v = _values(model)
    c = v["bn2.scale"] * (v["c2.b"] - v["bn2.mean"]) / np.sqrt(v["bn2.var"] + 1e-5) + v["bn2.shift"]
    out = without_branch(model, branch, c)
    onnx.checker.check_model(out, full_check=True)
    ops = {n.name: n.op_type for n in out.graph.node}
    assert not {"c1", "bn1", "r1", "c2", "bn2"} & set(ops) and ops["add1"] == "BatchNormalization"
    gone = {t.name for t in model.graph.initializer if t.name.startswith(("c1.", "c2.", "bn1.", "bn2."))}
    assert len(gone) == 12 and not gone & {t.name for t in out.graph.initializer}
    x = f32(rng.normal(size=(5, 3, 6, 6)) * 3)
    (want,), (got,) = run_ort(model, {"x": x}), run_ort(out, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the stream stays one channel group: the stem and the projection block still narrow it
    assert any("stem" in g.producers for g in channel_groups(out)[0])


@pytest.mark.parametrize("named", [True, False], ids=["named_add", "unnamed_add"])
def test_an_emptied_branch_is_read_back_from_the_model(rng, named):
    """``emptied_branches`` finds the x + c that ``without_branch`` wrote, an unnamed Add by its output."""
    from egp_onnx.graph.channels import emptied_branches, residual_branches

    model = prepare_model(_two_blocks(rng))
    if not named:
        next(n for n in model.graph.node if n.name == "add1").name = ""
    branch = next(b for b in residual_branches(model) if b.operand == "bn2")
    out = without_branch(model, branch, np.arange(4.0))
    (found,) = emptied_branches(model, out)
    assert (found.add, found.operand) == (branch.add, "bn2")
    assert np.array_equal(_values(out)[found.bias], np.arange(4.0, dtype=np.float32))
    assert emptied_branches(model, model) == []
