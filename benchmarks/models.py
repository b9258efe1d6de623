"""Generated benchmark models (onnx.helper, seeded): an 8-conv chain and a ResNet-style net."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inits, x_shape, out, out_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _conv(nodes, inits, rng, x, name, cin, cout, stride=1):
    w = (rng.normal(size=(cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
    inits += [
        numpy_helper.from_array(w, f"{name}.w"),
        numpy_helper.from_array((rng.normal(size=cout) * 0.1).astype(np.float32), f"{name}.b"),
    ]
    nodes.append(
        helper.make_node(
            "Conv",
            [x, f"{name}.w", f"{name}.b"],
            [name],
            name=name,
            pads=[1, 1, 1, 1],
            strides=[stride, stride],
        )
    )
    return name


def conv_chain(layers: int = 8, channels: int = 64, size: int = 32, seed: int = 0) -> onnx.ModelProto:
    """x(N,3,size,size) -> [Conv3x3(channels) Relu] x layers -> GlobalAveragePool -> y"""
    rng = np.random.default_rng(seed)
    nodes, inits, h, c = [], [], "x", 3
    for i in range(layers):
        h = _conv(nodes, inits, rng, h, f"conv{i}", c, channels)
        nodes.append(helper.make_node("Relu", [h], [f"relu{i}"], name=f"relu{i}"))
        h, c = f"relu{i}", channels
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["y"], name="pool"))
    return _model(nodes, inits, ["N", 3, size, size], "y", ["N", channels, 1, 1])


def resnet(blocks: int = 4, channels: int = 32, size: int = 32, seed: int = 0) -> onnx.ModelProto:
    """x -> Conv Relu -> [Conv Relu Conv Add Relu] x blocks -> GlobalAveragePool -> y"""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    h = _conv(nodes, inits, rng, "x", "stem", 3, channels)
    nodes.append(helper.make_node("Relu", [h], ["stem.relu"], name="stem.relu"))
    h = "stem.relu"
    for i in range(blocks):
        a = _conv(nodes, inits, rng, h, f"b{i}.conv1", channels, channels)
        nodes.append(helper.make_node("Relu", [a], [f"b{i}.relu1"], name=f"b{i}.relu1"))
        b = _conv(nodes, inits, rng, f"b{i}.relu1", f"b{i}.conv2", channels, channels)
        nodes.append(helper.make_node("Add", [b, h], [f"b{i}.add"], name=f"b{i}.add"))
        nodes.append(helper.make_node("Relu", [f"b{i}.add"], [f"b{i}.relu2"], name=f"b{i}.relu2"))
        h = f"b{i}.relu2"
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["y"], name="pool"))
    return _model(nodes, inits, ["N", 3, size, size], "y", ["N", channels, 1, 1])
