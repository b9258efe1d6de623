"""The one layer recogniser, its capabilities (prune, refit, rewrite), and the owners it traces.

Three recognisers used to disagree: topology.layer_of rejected a constant first input only for
Conv, reconstruct.linear_layers rejected it for every op (and listed a MatMul by a rank-3 constant
as a layer it could not refit), surgery.view.layer_view also rejected Gemm alpha/beta != 1 and
grouped or dilated Conv. The rule now: a layer is a Conv/Gemm/MatMul whose weight is a constant
read by that node only, whose first input is not a constant, and (MatMul) whose weight is a
matrix. Every layer may be pruned; refit and surgery are capabilities of the recognised layer.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from models import Builder, conv_bn_relu, gemm_head, no_rectifier, residual_block, single_conv
from onnx import TensorProto, helper, numpy_helper

from egp_onnx.graph.index import GraphIndex
from egp_onnx.graph.layers import layer_of, linear_layers
from egp_onnx.graph.rectifiers import find_rectifiers, prunable_layers
from egp_onnx.load.model import load_model, prepare_model
from egp_onnx.surgery.view import layer_view


def one_layer(rng, op: str, x_shape: tuple, w_shape: tuple, *, const_x=False, bias=None, shared=(), **attrs):
    """
    x (graph input, or an initializer when const_x) -> op(x, w[, b]) "layer" -> y
    [shared: the same initializers also feed a second node "other" -> z]
    """
    inits = [numpy_helper.from_array(rng.normal(size=w_shape).astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(rng.normal(size=bias).astype(np.float32), "b"))
        inputs.append("b")
    graph_inputs = [] if const_x else [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))]
    if const_x:
        inits.append(numpy_helper.from_array(rng.normal(size=x_shape).astype(np.float32), "x"))
    nodes = [helper.make_node(op, inputs, ["y"], name="layer", **attrs)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    for name in shared:
        nodes.append(helper.make_node("Identity", [name], ["z"], name="other"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", graph_inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def capabilities(model: onnx.ModelProto) -> tuple[bool, str | bool, bool]:
    """(prunable, refit: True or why not / False when not a layer at all, rewritable by surgery)."""
    index = GraphIndex(model.graph)
    node = next(n for n in model.graph.node if n.name == "layer")
    layers, skipped = linear_layers(model)
    refit: str | bool = (
        True if any(layer.name == "layer" for layer in layers) else skipped.get("layer", ("", False))[1]
    )
    graph = gs.import_onnx(model)
    view = layer_view(next(n for n in graph.nodes if n.name == "layer"), graph)
    return layer_of(node, index) is not None, refit, view is not None


CASES = {
    # the first input is a constant: the node computes a constant, for every op (was: Gemm and
    # MatMul pruned, not refit, not rewritten)
    "conv, constant input": (("Conv", (1, 3, 5, 5), (4, 3, 3, 3)), {"const_x": True}, (False, False, False)),
    "gemm, constant input": (("Gemm", (2, 6), (6, 4)), {"const_x": True}, (False, False, False)),
    "matmul, constant input": (("MatMul", (2, 6), (6, 4)), {"const_x": True}, (False, False, False)),
    # a batched constant has no one output channel axis (was: listed as a layer refit could not take)
    "matmul, rank-3 weight": (("MatMul", (2, 3, 6), (2, 6, 4)), {}, (False, False, False)),
    "shared weight": (("Gemm", (2, 6), (6, 4)), {"shared": ("w",)}, (False, False, False)),
    # capabilities differ, the layer is one
    "gemm alpha/beta": (
        ("Gemm", (2, 6), (6, 4)),
        {"bias": (4,), "alpha": 0.5, "beta": 2.0},
        (True, True, False),
    ),
    "gemm transA": (("Gemm", (6, 2), (6, 4)), {"transA": 1}, (True, "Gemm with transA", False)),
    "gemm 2-D bias": (("Gemm", (2, 6), (6, 4)), {"bias": (2, 4)}, (True, True, False)),
    "grouped conv": (("Conv", (1, 4, 5, 5), (4, 2, 3, 3)), {"group": 2}, (True, True, False)),
    "dilated conv": (("Conv", (1, 3, 7, 7), (4, 3, 3, 3)), {"dilations": [2, 2]}, (True, True, False)),
    "1-D conv": (
        ("Conv", (1, 3, 7), (4, 3, 3)),
        {},
        (True, "only 2-D convolutions with explicit pads are refit", True),
    ),
    "shared bias": (
        ("Conv", (1, 3, 5, 5), (4, 3, 3, 3)),
        {"bias": (4,), "shared": ("b",)},
        (True, "its bias is shared with another node", False),
    ),
    "plain conv": (("Conv", (1, 3, 5, 5), (4, 3, 3, 3)), {"bias": (4,)}, (True, True, True)),
    "plain matmul": (("MatMul", (2, 6), (6, 4)), {}, (True, True, True)),
}


@pytest.mark.parametrize("case", CASES)
def test_one_rule_per_question(rng, case):
    (op, x_shape, w_shape), options, expected = CASES[case]
    model = one_layer(rng, op, x_shape, w_shape, **options)
    assert capabilities(model) == expected


def test_out_channels_follow_the_weight_layout(rng):
    for op, w_shape, attrs, channels in [
        ("Conv", (4, 3, 3, 3), {}, 4),
        ("Gemm", (6, 5), {}, 5),
        ("Gemm", (5, 6), {"transB": 1}, 5),
        ("MatMul", (6, 5), {}, 5),
    ]:
        x_shape = (1, 3, 5, 5) if op == "Conv" else (2, 6)
        model = one_layer(rng, op, x_shape, w_shape, **attrs)
        layer = layer_of(model.graph.node[0], GraphIndex(model.graph))
        assert layer is not None and (layer.op_type, layer.weight, layer.out_channels) == (op, "w", channels)


def owners(model: onnx.ModelProto) -> dict[str, str | None]:
    return {s.name: (s.owner.name if s.owner else None) for s in find_rectifiers(prepare_model(model))}


def test_single_conv_owner(rng):
    assert owners(single_conv(rng)) == {"relu": "conv"}


def test_owner_through_batchnorm_and_constant_mul(rng):
    assert owners(conv_bn_relu(rng)) == {"relu": "conv"}


def test_residual_add_owner_is_deeper_branch_not_projection(rng):
    assert owners(residual_block(rng)) == {"relu0": "conv0", "relu1": "conv1", "relu2": "conv2"}


def test_gemm_and_matmul_owners_and_channel_axis(rng):
    sites = {s.name: s for s in find_rectifiers(prepare_model(gemm_head(rng)))}
    assert sites["fc1.relu"].owner.name == "fc1" and sites["fc1.relu"].owner.out_channels == 6
    assert sites["fc2.relu"].owner.name == "fc2" and sites["fc2.relu"].owner.out_channels == 5
    assert sites["fc2.relu"].channel_last
    assert not sites["relu0"].channel_last


def test_sample_model_ownership():
    from conftest import SAMPLES

    model = load_model(SAMPLES / "digits_resnet.onnx")
    layers = prunable_layers(find_rectifiers(model))
    assert sorted(layers) == sorted(
        [
            "stem.conv",
            "block1.conv1",
            "block1.conv2",
            "block2.conv1",
            "block2.conv2",
            "block3.conv1",
            "block3.conv2",
            "fc1",
        ]
    )
    assert "block2.down.0" not in layers and "fc2" not in layers, "shortcut and classifier stay dense"


def test_no_rectifier_means_nothing_prunable(rng):
    assert prunable_layers(find_rectifiers(prepare_model(no_rectifier(rng)))) == {}


def test_linear_layers_read_shapes_and_types_not_weights(rng, monkeypatch):
    """
    x -> Conv a (float32) -> Relu -> Conv b (float16 weights, Cast around it) -> y
    """
    b = Builder(rng)
    h = b.op("Relu", [b.conv("x", "a", 3, 4, 3, pad=1)], "r")
    half = b.init("b.w", rng.normal(size=(2, 4, 1, 1)), dtype=np.float16)
    h = b.op("Conv", [b.op("Cast", [h], "to16", to=onnx.TensorProto.FLOAT16), half], "b")
    model = b.model(b.op("Cast", [h], "to32", to=onnx.TensorProto.FLOAT), ("N", 3, 6, 6))
    monkeypatch.setattr(numpy_helper, "to_array", lambda *a: pytest.fail("a weight was read"))
    layers, skipped = linear_layers(model)
    assert [(layer.name, layer.kernel, layer.groups) for layer in layers] == [("a", (3, 3), 1)]
    assert skipped == {"b": ("b.w", "float16 weights")}
