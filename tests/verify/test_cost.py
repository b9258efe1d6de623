"""MAC and parameter counts (verify/cost.py), by hand and in the report."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from conftest import SAMPLES
from models import toy_files
from onnx import TensorProto, helper, numpy_helper

import egp_onnx
from egp_onnx.graph.structure import depth
from egp_onnx.graph.weights import count_parameters, serialized_chunks
from egp_onnx.load.model import load_model
from egp_onnx.verify import cost as cost_module
from egp_onnx.verify.cost import count_macs, deflate_size, model_cost


def test_mac_count_matches_hand_computation(rng):
    """
    x(N,3,6,6) -> Conv3x3(3->4, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(4->5) -> y
    """
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w[0] = 0  # 27 zero weights
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], transB=1),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(rng.normal(size=(5, 4)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.zeros(5, np.float32), "fb"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    dense, sparse = count_macs(model, {"x": (1, 3, 6, 6)})
    conv = 4 * 3 * 3 * 3 * 6 * 6  # every output position: C_out x C_in x k x k
    gemm = 4 * 5
    assert dense == conv + gemm == 3908
    assert sparse == (4 - 1) * 3 * 3 * 3 * 6 * 6 + gemm
    cost = model_cost(model, {"x": (1, 3, 6, 6)})  # reads each weight once for both figures
    assert (cost.macs, cost.nonzero_macs) == (dense, sparse)
    assert (cost.params, cost.nonzero_params) == count_parameters(model) == (4 * 27 + 20 + 5, 3 * 27 + 20)
    assert cost.file_bytes == model.ByteSize()
    assert cost.deflate_bytes == len(zlib.compress(model.SerializeToString(), 9))


@pytest.mark.parametrize("latency", [True, False])
def test_the_report_counts_both_models_as_an_independent_count_does(latency, rng, tmp_path):
    """The original's figures are taken before the loop (its weights go after it), the result's
    from its session's counts."""
    model, calib = toy_files(tmp_path, rng)
    options = {"sparsity": 0.5, "step": 1.0, "guard": False, "batch_size": 8, "latency": latency}
    result = egp_onnx.compress(model, calib, **options)
    original, shapes = load_model(model), {"x": (1, 3, 6, 6)}
    assert result.report.cost.before == model_cost(original, shapes)
    assert result.report.cost.after == model_cost(result.model, shapes)
    assert result.report.cost.after.nonzero_params < result.report.cost.before.nonzero_params
    summary = result.report.model
    assert (summary.depth_before, summary.nodes_before) == (depth(original).layers, len(original.graph.node))


def test_macs_inference_cannot_give_are_measured_on_a_sample(rng):
    """
    x(N,3,H,W) -> Conv3x3(3->4, pad 1) -> Relu -> GlobalAveragePool -> g
    Reshape(g, Concat(Slice(Shape(g), 0, 1), [-1])) -> Gemm(4->5) -> y        (opset 11)

    At opset 11 ONNX does not propagate the shape computation's values: the Gemm's input stays
    of unknown shape whatever the input's size, as in PaddleOCR's exported models.
    """
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Shape", ["g"], ["s"]),
        helper.make_node("Slice", ["s", "zero", "one", "zero"], ["n"]),
        helper.make_node("Concat", ["n", "minus_one"], ["to"], axis=0),
        helper.make_node("Reshape", ["g", "to"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], transB=1),
    ]
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=(5, 4)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.zeros(5, np.float32), "fb"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    shapes = {"x": (1, 3, 10, 7)}
    assert count_macs(model, shapes) is None, "inference alone leaves the Gemm unknown"
    feed = {"x": rng.normal(size=(1, 3, 10, 7)).astype(np.float32)}
    want = 4 * 3 * 3 * 3 * 10 * 7 + 4 * 5
    assert count_macs(model, shapes, feed=feed) == (want, want)
    assert model_cost(model, shapes, feed=feed).macs == want
    assert len(model.graph.output) == 1, "the caller's model is not modified"


@pytest.mark.parametrize("name", ["digits_resnet.onnx", "mnist_resnet.onnx"])
def test_the_streamed_deflate_size_is_that_of_the_whole_file(name):
    """serialized_chunks gives the serialised model piece by piece; deflating them is deflating the file."""
    model = load_model(SAMPLES / name)
    model.graph.doc_string = "after the initializers"  # a field numbered above the initializers' 5
    model.metadata_props.add(key="k", value="v")  # and one above the graph's 7
    encoded = model.SerializeToString()
    assert b"".join(serialized_chunks(model)) == encoded
    assert deflate_size(model) == len(zlib.compress(encoded, 9)) < len(encoded)


def test_the_report_leaves_the_deflate_size_of_a_large_model_out(monkeypatch):
    """Level 9 deflates pruned weights at a few MB/s: above the limit the report says None."""
    model = load_model(SAMPLES / "digits_resnet.onnx")
    assert model_cost(model, None).deflate_bytes == deflate_size(model)
    monkeypatch.setattr(cost_module, "DEFLATE_MAX_BYTES", model.ByteSize() - 1)
    assert model_cost(model, None).deflate_bytes is None
