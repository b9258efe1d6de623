"""graph/channels: which layers' output channels may leave whole, and the slices that go with them."""

from __future__ import annotations

from models import Builder

from egp_onnx.graph.channels import channel_groups
from egp_onnx.load.model import prepare_model


def groups_of(model):
    groups, tied = channel_groups(prepare_model(model))
    return {g.producer: g for g in groups}, tied


def test_a_conv_bn_relu_read_by_a_conv_is_free_with_its_bn_slices(rng):
    """
    x -> Conv "a" (bias) -> BN "bn" -> Relu "r" -> Conv "b" -> y
    """
    b = Builder(rng)
    out = b.conv(b.op("Relu", [b.bn(b.conv("x", "a", 3, 4, 3, pad=1), "bn", 4)], "r"), "b", 4, 2, 3)
    groups, tied = groups_of(b.model(out, ["N", 3, 6, 6]))
    a = groups["a"]
    assert a.channels == 4 and a.rectifiers == (("r", 0),) and a.producers == ("a",)
    assert set(a.slices) == {
        ("a.w", 0),
        ("a.b", 0),
        *((f"bn.{p}", 0) for p in ("scale", "shift", "mean", "var")),
    }
    assert [(c.node, c.weight, c.axis, c.offset, c.per) for c in a.consumers] == [("b", "b.w", 1, 0, 1)]
    assert set(tied) == {"b"}  # its output goes to the graph output (through an Identity)


def test_a_residual_stream_moves_as_one_group_and_the_branch_inside_is_free(rng):
    """
    x -> Conv "stem" -> Relu "r0" -+-> Conv "c1" -> Relu "r1" -> Conv "c2" -> Add "add" -> Relu "r2"
                                   +-------------------------------------------^
    Relu "r2" -> Conv "head" -> y
    """
    b = Builder(rng)
    r0 = b.op("Relu", [b.conv("x", "stem", 3, 4, 3, pad=1)], "r0")
    c2 = b.conv(b.op("Relu", [b.conv(r0, "c1", 4, 5, 3, pad=1)], "r1"), "c2", 5, 4, 3, pad=1)
    out = b.conv(b.op("Relu", [b.op("Add", [c2, r0], "add")], "r2"), "head", 4, 2, 3)
    groups, tied = groups_of(b.model(out, ["N", 3, 6, 6]))
    assert set(groups) == {"stem", "c1"}
    stream = groups["stem"]
    assert stream.producers == ("stem", "c2") and stream.rectifiers == (("r0", 0), ("r2", 0))
    assert {c.node for c in stream.consumers} == {"c1", "head"}
    assert {("stem.w", 0), ("c2.w", 0)} <= set(stream.slices)
    assert groups["c1"].consumers[0].node == "c2"


def test_a_stream_that_reaches_an_output_is_tied_with_all_its_producers(rng):
    """
    x -> Conv "stem" -> Relu "r0" -+-> Conv "c1" -> Relu "r1" -> Conv "c2" -> Add "add" -> Relu "r2" -> y
                                   +-------------------------------------------^
    """
    b = Builder(rng)
    r0 = b.op("Relu", [b.conv("x", "stem", 3, 4, 3, pad=1)], "r0")
    c2 = b.conv(b.op("Relu", [b.conv(r0, "c1", 4, 5, 3, pad=1)], "r1"), "c2", 5, 4, 3, pad=1)
    groups, tied = groups_of(b.model(b.op("Relu", [b.op("Add", [c2, r0], "add")], "r2"), ["N", 3, 6, 6]))
    assert set(groups) == {"c1"}
    assert "graph output" in tied["stem"] and "graph output" in tied["c2"]


def test_a_depthwise_conv_moves_with_the_group_and_a_grouped_one_ties_it(rng):
    """
    x -> Conv "e" -> Relu "r1" -> Conv depthwise "dw" (group 6) -> Relu "r2" -> Conv "p" -> y
    x -> Conv "f" -> Relu "s1" -> Conv grouped "g" (group 2) -> y2
    """
    b = Builder(rng)
    dw = b.conv(b.op("Relu", [b.conv("x", "e", 3, 6, 1)], "r1"), "dw", 6, 6, 3, pad=1, group=6)
    p = b.conv(b.op("Relu", [dw], "r2"), "p", 6, 2, 1)
    g = b.conv(b.op("Relu", [b.conv("x", "f", 3, 4, 1)], "s1"), "g", 4, 4, 3, pad=1, group=2)
    groups, tied = groups_of(b.model([p, g], inputs={"x": ["N", 3, 6, 6]}))
    e = groups["e"]
    assert e.rectifier == "r2" and e.grouped == ("dw",)
    assert ("dw.w", 0) in e.slices and ("dw.b", 0) in e.slices
    assert [c.node for c in e.consumers] == ["p"]
    assert "grouped Conv" in tied["f"] and "grouped Conv" in tied["dw"]


def test_concat_offsets_and_flatten_columns(rng):
    """
    x -> Conv "a" (3) -> Relu "ra" -+-> Concat "cat" -> MaxPool -> Flatten -> Gemm "fc" -> y
    x -> Conv "b" (2) -> Relu "rb" -+
    """
    b = Builder(rng)
    ra = b.op("Relu", [b.conv("x", "a", 3, 3, 3, pad=1)], "ra")
    rb = b.op("Relu", [b.conv("x", "b", 3, 2, 3, pad=1)], "rb")
    cat = b.op("Concat", [ra, rb], "cat", axis=1)
    pool = b.op("MaxPool", [cat], "pool", kernel_shape=[2, 2], strides=[2, 2])
    flat = b.op("Flatten", [pool], "flat", axis=1)
    out = b.gemm(flat, "fc", 5 * 9, 4)
    groups, _ = groups_of(b.model(out, ["N", 3, 6, 6]))
    (ca,), (cb,) = groups["a"].consumers, groups["b"].consumers
    assert (ca.node, ca.axis, ca.offset, ca.per) == ("fc", 1, 0, 9)  # transB: columns on axis 1
    assert (cb.node, cb.axis, cb.offset, cb.per) == ("fc", 1, 27, 9)  # after a's 3 channels x 9
