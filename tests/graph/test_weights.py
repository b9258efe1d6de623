"""Weights and protobuf plumbing: counts, skeletons, static shapes, sizes, replaced and stubbed weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import gemm_head, residual_block, single_conv
from onnx import TensorProto, helper, numpy_helper

from egp_onnx.graph.weights import (
    count_parameters,
    drop_unread,
    initializer_counts,
    replace_initializers,
    serialized_size,
    shape_skeleton,
    split_weights,
    static_shapes,
)
from egp_onnx.load.model import prepare_model


def test_count_parameters(rng):
    total, nonzero = count_parameters(single_conv(rng))
    assert total == 4 * 3 * 3 * 3 + 4
    assert nonzero == total


def full_model_shapes(model: onnx.ModelProto, shapes: dict) -> dict:
    """Reference: shape inference on a full copy of the model, weights included (the old way)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for value in fixed.graph.input:
        for dim, size in zip(value.type.tensor_type.shape.dim, shapes.get(value.name, ()), strict=False):
            dim.Clear()
            dim.dim_value = size
    inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    out = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[value.name] = tuple(d.dim_value for d in dims)
    return out


def test_shape_skeleton_drops_weights_and_keeps_every_shape():
    """
    x(N,3,6,6) -> Conv(3->8) -> Relu -> Reshape(to [-1, 288] by a small int64 initializer) -> Gemm -> y
    """
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(size=(288, 5)).astype(np.float32), "fc")
    target = numpy_helper.from_array(np.array([-1, 288], dtype=np.int64), "target")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Reshape", ["r", "target"], ["f"]),
            helper.make_node("Gemm", ["f", "fc"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [w, fc, target],
    )
    model = prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    skeleton = shape_skeleton(model)
    assert [t.name for t in skeleton.graph.initializer] == ["target"]
    assert {"w", "fc"} <= {i.name for i in skeleton.graph.input}
    assert skeleton.ByteSize() < model.ByteSize() / 5
    onnx.checker.check_model(skeleton)
    for models in (model, residual_block(rng), gemm_head(rng)):
        first = models.graph.input[0]
        shapes = {first.name: (2, *[d.dim_value for d in first.type.tensor_type.shape.dim[1:]])}
        got = static_shapes(models, shapes)
        want = full_model_shapes(models, shapes)
        assert want and all(got[name] == shape for name, shape in want.items())
    assert static_shapes(model, {"x": (2, 3, 6, 6)})["f"] == (2, 288)


def test_serialized_size_is_bytesize_without_encoding_the_weights(rng):
    # raw float32, float16 and int64 weights, float_data and string tensors, an in-memory stub,
    # and a raw tensor past 127 bytes (a two-byte length)
    model = gemm_head(rng)
    extra = [
        numpy_helper.from_array(rng.normal(size=(40, 3)).astype(np.float16), "half"),
        numpy_helper.from_array(np.arange(7, dtype=np.int64), "ints"),
        helper.make_tensor("listed", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),
        helper.make_tensor("words", TensorProto.STRING, [2], [b"a", b"bc"]),
        numpy_helper.from_array(np.zeros(0, dtype=np.float32), "empty"),
    ]
    extra[0].doc_string = "a half-precision table"
    model.graph.initializer.extend(extra)
    stubbed, _ = split_weights(model)
    for m in (model, stubbed, onnx.ModelProto(), helper.make_model(helper.make_graph([], "g", [], []))):
        assert serialized_size(m) == m.ByteSize()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64, np.int8, np.uint8, np.bool_])
def test_replace_initializers_writes_what_from_array_writes(rng, dtype):
    values = (rng.normal(size=(3, 4)) * 3).astype(dtype)
    model = helper.make_model(
        helper.make_graph(
            [],
            "g",
            [],
            [],
            [
                numpy_helper.from_array(np.zeros((3, 4), dtype), "t"),
                numpy_helper.from_array(np.ones(2, np.float32), "u"),
            ],
        )
    )
    replaced = replace_initializers(model, {"t": values.astype(np.float64)})  # cast to the model's type
    want = numpy_helper.from_array(values, "t")
    assert replaced.graph.initializer[0].SerializeToString() == want.SerializeToString()
    assert replaced.graph.initializer[1] == model.graph.initializer[1]
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), np.zeros((3, 4), dtype))


def test_split_weights_and_counts_take_known_values_only_when_they_fit(rng):
    model = gemm_head(rng)
    _, read = split_weights(model)
    name = next(iter(read))
    known = {name: read[name].copy()}
    _, weights = split_weights(model, known=known)
    assert weights[name] is known[name], "the known array is used, not a new copy"
    for misfit in (known[name].astype(np.float64), known[name].reshape(-1)):
        _, weights = split_weights(model, known={name: misfit})
        assert weights[name] is not misfit and weights[name].shape == read[name].shape
        assert weights[name].dtype == read[name].dtype
    zeroed = {name: np.zeros_like(read[name])}  # counts follow the values given (they are trusted)
    counts, with_known = initializer_counts(model), initializer_counts(model, zeroed)
    assert with_known[name] == (counts[name][0], counts[name][1], 0)
    others = set(counts) - {name}
    assert {k: with_known[k] for k in others} == {k: counts[k] for k in others}
    assert initializer_counts(model, read) == counts


def test_drop_unread_keeps_what_a_body_reads_and_drops_an_unread_initializer_with_its_input():
    """
    y = If(cond) then (x + inner) else x;  "inner" is read in the body only, "stale" by nothing
    (IR 3 style: both initializers are listed as graph inputs too).
    """
    f = TensorProto.FLOAT
    then = helper.make_graph(
        [helper.make_node("Add", ["x", "inner"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", f, [2])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", f, [2])]
    )
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)
    inits = [numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("inner", "stale")]
    inputs = [
        helper.make_tensor_value_info(n, t, s) for n, t, s in (("x", f, [2]), ("cond", TensorProto.BOOL, []))
    ]
    inputs += [helper.make_tensor_value_info(n, f, [2]) for n in ("inner", "stale")]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", f, [2])], inits)
    drop_unread(graph)
    assert [t.name for t in graph.initializer] == ["inner"]
    assert [v.name for v in graph.input] == ["x", "cond", "inner"]


def test_drop_unread_keeps_an_initializer_that_is_a_graph_output():
    """y = Identity(x) and the constant c is the second output: no node reads c, yet it stays."""
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", f, [2])],
        [helper.make_tensor_value_info(n, f, [2]) for n in ("y", "c")],
        [numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("c", "stale")],
    )
    drop_unread(graph)
    assert [t.name for t in graph.initializer] == ["c"]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
