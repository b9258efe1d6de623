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


def light_vgg19_path() -> str:
    """The onnx package's light-zoo VGG-19 (graph only: its weights are ConstantOfShape fills)."""
    from pathlib import Path

    return str(Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_vgg19.onnx")


def vgg19(seed: int = 0) -> onnx.ModelProto:
    """The light zoo's VGG-19 (143.7 M parameters) with seeded He-normal weights as initializers.

    Its ConstantOfShape fills become real initializers (no longer graph inputs), and the batch
    dimension becomes symbolic ("N"; the Reshape before fc6 gets -1) so calibration can batch.
    """
    rng = np.random.default_rng(seed)
    source = onnx.load(light_vgg19_path())
    shapes = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
    inits = [t for t in source.graph.initializer if not t.name.endswith("__SHAPE")]
    nodes = []
    for node in source.graph.node:
        if node.op_type != "ConstantOfShape":
            nodes.append(node)
            continue
        shape = tuple(int(d) for d in shapes[node.input[0]])
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = np.sqrt(2.0 / fan_in) if len(shape) > 1 else 0.1
        value = (rng.standard_normal(size=shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)
        inits.append(numpy_helper.from_array(value, node.output[0]))
    reshape = next(t for t in inits if t.name == "OC2_DUMMY_1")
    reshape.CopyFrom(numpy_helper.from_array(np.array([-1, 25088], dtype=np.int64), "OC2_DUMMY_1"))
    x = helper.make_tensor_value_info("data_0", TensorProto.FLOAT, ["N", 3, 224, 224])
    graph = helper.make_graph(
        nodes, "vgg19", [x], [helper.make_tensor_value_info("prob_1", TensorProto.FLOAT, ["N", 1000])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    onnx.checker.check_model(model)
    return model


def mobilenet(
    channels: tuple[int, ...] = (32, 64, 64, 128, 128), size: int = 32, seed: int = 0
) -> onnx.ModelProto:
    """MobileNet-style: x -> Conv3x3/2(3->16) Relu -> [DWConv3x3 Relu, Conv1x1 Relu] x 5 -> GAP -> y

    Depthwise-separable blocks (stride 2 where the width doubles), ReLU after every convolution.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    h = _conv(nodes, inits, rng, "x", "stem", 3, 16, stride=2)
    nodes.append(helper.make_node("Relu", [h], ["stem.relu"], name="stem.relu"))
    h, c = "stem.relu", 16
    for i, out in enumerate(channels):
        stride = 2 if out > c else 1
        w = (rng.normal(size=(c, 1, 3, 3)) * np.sqrt(2 / 9)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"dw{i}.w"),
            numpy_helper.from_array((rng.normal(size=c) * 0.1).astype(np.float32), f"dw{i}.b"),
        ]
        nodes.append(
            helper.make_node(
                "Conv",
                [h, f"dw{i}.w", f"dw{i}.b"],
                [f"dw{i}"],
                name=f"dw{i}",
                group=c,
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            )
        )
        nodes.append(helper.make_node("Relu", [f"dw{i}"], [f"dw{i}.relu"], name=f"dw{i}.relu"))
        p = (rng.normal(size=(out, c, 1, 1)) * np.sqrt(2 / c)).astype(np.float32)
        inits += [
            numpy_helper.from_array(p, f"pw{i}.w"),
            numpy_helper.from_array((rng.normal(size=out) * 0.1).astype(np.float32), f"pw{i}.b"),
        ]
        nodes.append(
            helper.make_node("Conv", [f"dw{i}.relu", f"pw{i}.w", f"pw{i}.b"], [f"pw{i}"], name=f"pw{i}")
        )
        nodes.append(helper.make_node("Relu", [f"pw{i}"], [f"pw{i}.relu"], name=f"pw{i}.relu"))
        h, c = f"pw{i}.relu", out
    nodes.append(helper.make_node("GlobalAveragePool", [h], ["y"], name="pool"))
    return _model(nodes, inits, ["N", 3, size, size], "y", ["N", c, 1, 1])
