"""GraphIndex and node attributes: producers, consumers, constants, depth."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from egp_onnx.graph.index import GraphIndex, attr, attrs


def chain(length: int):
    """
    x -> Relu -> Relu -> ... (length nodes) -> y;  k = Constant(3.0), unused w initializer
    """
    names = ["x", *(f"t{i}" for i in range(length - 1)), "y"]
    nodes = [
        helper.make_node("Relu", [a], [b], name=f"r{i}")
        for i, (a, b) in enumerate(zip(names, names[1:], strict=False))
    ]
    nodes.append(
        helper.make_node("Constant", [], ["k"], name="k", value=numpy_helper.from_array(np.float32(3.0)))
    )
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")],
    )
    return graph


def test_producers_consumers_constants_and_channels():
    index = GraphIndex(chain(3))
    assert index.producer["y"].name == "r2" and [n.name for n in index.consumers["x"]] == ["r0"]
    assert index.graph_inputs == {"x"}
    assert index.is_constant("w") and index.is_constant("k") and not index.is_constant("t0")
    np.testing.assert_array_equal(index.value("w"), np.arange(6).reshape(2, 3))
    assert index.value("t0") is None and index.scalar("k") == 3.0 and index.scalar("w") is None
    assert index.scalar("") is None
    assert index.channels("x") == 4 and index.channels("t0") is None
    assert index.private("x") and not index.private("w")


def test_depth_counts_nodes_and_goes_deeper_than_the_recursion_limit():
    index = GraphIndex(chain(5000))
    assert index.depth("y") == 5000 and index.depth("x") == 0 and index.depth("t9") == 10


def test_attributes_are_read_as_helper_reads_them():
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], auto_pad="NOTSET", alpha=0.5)
    assert attr(node, "strides") == [2, 2] and attr(node, "group", 1) == 1
    assert attrs(node) == {"strides": [2, 2], "auto_pad": b"NOTSET", "alpha": 0.5}
