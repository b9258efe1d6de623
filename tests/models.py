"""Tiny ONNX models built with onnx.helper for the tests, each with a sketch of its graph."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, inits, opset: int = OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _y(shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *shape])


def _x(shape=("N", 3, 6, 6)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))


def single_conv(rng: np.random.Generator, opset: int = OPSET) -> onnx.ModelProto:
    """
    x(N,3,6,6) -> Conv3x3(3->4, pad 1, bias) -> Relu -> y
    """
    inits = [_init("w", rng.normal(size=(4, 3, 3, 3))), _init("b", rng.normal(size=4) * 0.5)]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["z"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["z"], ["y"], name="relu"),
    ]
    return _model(nodes, [_x()], [_y((4, 6, 6))], inits, opset)


def two_convs(rng: np.random.Generator) -> onnx.ModelProto:
    """
    x(N,3,6,6) -> Conv3x3(3->4, pad 1, bias) "conv" -> Relu -> Conv1x1(4->4) "head" -> Relu -> y

    The smallest model compress can prune: "conv" is prunable, "head" feeds the output and stays dense.
    """
    inits = [
        _init("w", rng.normal(size=(4, 3, 3, 3))),
        _init("b", rng.normal(size=4) * 0.5),
        _init("w2", rng.normal(size=(4, 4, 1, 1))),
        _init("b2", rng.normal(size=4) * 0.5),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["z"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["z"], ["h"], name="relu"),
        helper.make_node("Conv", ["h", "w2", "b2"], ["z2"], name="head"),
        helper.make_node("Relu", ["z2"], ["y"], name="relu2"),
    ]
    return _model(nodes, [_x()], [_y((4, 6, 6))], inits)


def conv_bn_relu(rng: np.random.Generator) -> onnx.ModelProto:
    """
    x -> Conv3x3(3->5) -> BatchNormalization -> Mul(const) -> Relu -> y
    """
    inits = [
        _init("w", rng.normal(size=(5, 3, 3, 3))),
        _init("scale", rng.uniform(0.5, 1.5, size=5)),
        _init("shift", rng.normal(size=5)),
        _init("mean", rng.normal(size=5) * 0.1),
        _init("var", rng.uniform(0.5, 2.0, size=5)),
        _init("k", np.full((1, 5, 1, 1), 0.7)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Mul", ["bn", "k"], ["z"], name="mul"),
        helper.make_node("Relu", ["z"], ["y"], name="relu"),
    ]
    return _model(nodes, [_x()], [_y((5, 6, 6))], inits)


def residual_block(rng: np.random.Generator) -> onnx.ModelProto:
    """
    x(N,4,6,6) -> Conv(4->4) -> Relu(relu0) -> a
    a -> Conv(4->4) -> Relu(relu1) -> Conv(4->4) -> Add(+a) -> Relu(relu2) -> y
    a -> Conv1x1(4->4) "proj" -----------------------^ (projection shortcut, shallower)
    """
    inits = [
        _init("w0", rng.normal(size=(4, 4, 3, 3)) * 0.5),
        _init("w1", rng.normal(size=(4, 4, 3, 3)) * 0.5),
        _init("b1", rng.normal(size=4) * 0.2),
        _init("w2", rng.normal(size=(4, 4, 3, 3)) * 0.5),
        _init("wp", rng.normal(size=(4, 4, 1, 1))),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["a"], name="relu0"),
        helper.make_node("Conv", ["a", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "wp"], ["p"], name="proj"),
        helper.make_node("Add", ["p", "c2"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["y"], name="relu2"),
    ]
    return _model(nodes, [_x(("N", 4, 6, 6))], [_y((4, 6, 6))], inits)


def gemm_head(rng: np.random.Generator) -> onnx.ModelProto:
    """
    x(N,3,6,6) -> Conv(3->4) -> Relu -> GlobalAveragePool -> Flatten
      -> Gemm(4->6, transB) -> Relu(fc1.relu)
      -> MatMul(6->5) -> Add(bias) -> Relu(fc2.relu) -> Gemm(5->3) -> y
    """
    inits = [
        _init("w0", rng.normal(size=(4, 3, 3, 3))),
        _init("w1", rng.normal(size=(6, 4))),
        _init("b1", rng.normal(size=6) * 0.3),
        _init("w2", rng.normal(size=(6, 5))),
        _init("b2", rng.normal(size=5) * 0.3),
        _init("w3", rng.normal(size=(5, 3))),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("GlobalAveragePool", ["r0"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w1", "b1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"], name="fc1.relu"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "b2"], ["h2"], name="fc2.bias"),
        helper.make_node("Relu", ["h2"], ["r2"], name="fc2.relu"),
        helper.make_node("Gemm", ["r2", "w3"], ["y"], name="fc3"),
    ]
    return _model(nodes, [_x()], [_y((3,))], inits)


def mixed_ranks(rng: np.random.Generator) -> onnx.ModelProto:
    """
    x(N,3,6,6) -> Conv3x3(3->4) -> Relu(relu2d) -> Reshape(N,4,36) -> Conv1d k3(4->5) -> Relu(relu1d)
      -> GlobalAveragePool -> Flatten -> Gemm(5->3) -> Relu(fc.relu) -> y(N,3)

    Rectifiers on rank-4, rank-3 and rank-2 tensors: two groups of fast probes and a general one.
    """
    inits = [
        _init("w0", rng.normal(size=(4, 3, 3, 3))),
        _init("b0", rng.normal(size=4) * 0.3),
        numpy_helper.from_array(np.array([0, 4, 36], dtype=np.int64), "shape1d"),
        _init("w1", rng.normal(size=(5, 4, 3))),
        _init("b1", rng.normal(size=5) * 0.3),
        _init("w2", rng.normal(size=(3, 5))),
        _init("b2", rng.normal(size=3) * 0.3),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv2d", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu2d"),
        helper.make_node("Reshape", ["r0", "shape1d"], ["s"], name="to1d"),
        helper.make_node("Conv", ["s", "w1", "b1"], ["c1"], name="conv1d", pads=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1d"),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["h"], name="fc", transB=1),
        helper.make_node("Relu", ["h"], ["y"], name="fc.relu"),
    ]
    return _model(nodes, [_x()], [_y((3,))], inits)


def no_rectifier(rng: np.random.Generator) -> onnx.ModelProto:
    """
    x -> Conv -> Sigmoid -> y   (nothing EGP can prune)
    """
    inits = [_init("w", rng.normal(size=(2, 3, 3, 3)))]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["z"], name="conv"),
        helper.make_node("Sigmoid", ["z"], ["y"], name="sigmoid"),
    ]
    return _model(nodes, [_x()], [_y((2, 4, 4))], inits)


def image_model(rng: np.random.Generator) -> onnx.ModelProto:
    """
    x(N,3,6,6) fixed spatial size -> Conv1x1(3->2) -> Relu -> y
    """
    w = numpy_helper.from_array(rng.normal(size=(2, 3, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["z"], name="conv"),
            helper.make_node("Relu", ["z"], ["y"], name="relu"),
        ],
        "image",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def save_external(model: onnx.ModelProto, path, location: str) -> str:
    """Save ``model`` with every initializer in the external file ``location`` beside ``path``.

    A copy is saved: onnx.save turns the proto it is given into an external-data one.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, str(path), save_as_external_data=True, location=location, size_threshold=0)
    return str(path)


def inputs(rng: np.random.Generator, n: int = 10, shape=(3, 6, 6)) -> np.ndarray:
    return rng.normal(size=(n, *shape)).astype(np.float32)


def f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


class Builder:
    """Collects nodes and initializers; layer helpers name everything after the layer.

    ``dtype`` is the models' float type (float32 or float16) for inputs, outputs and weights.
    """

    def __init__(self, rng: np.random.Generator, dtype=np.float32) -> None:
        self.rng, self.dtype, self.nodes, self.inits = rng, np.dtype(dtype), [], []
        self.elem = helper.np_dtype_to_tensor_dtype(self.dtype)

    def init(self, name: str, value, dtype=None) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype or self.dtype), name))
        return name

    def conv(
        self,
        x: str,
        name: str,
        cin: int,
        cout: int,
        k: int,
        stride: int = 1,
        pad: int = 0,
        positive: bool = False,
        bias: float | None = 0.1,
        group: int = 1,
    ) -> str:
        shape = (cout, cin // group, k, k)
        w = self.rng.uniform(0.05, 0.5, shape) if positive else self.rng.normal(size=shape) * 0.4
        inputs = [x, self.init(f"{name}.w", w)]
        if bias is not None:
            jitter = 0 if positive else self.rng.normal(size=cout) * 0.1
            inputs.append(self.init(f"{name}.b", np.full(cout, bias) + jitter))
        self.nodes.append(
            helper.make_node(
                "Conv", inputs, [name], name=name, strides=[stride, stride], pads=[pad] * 4, group=group
            )
        )
        return name

    def bn(self, x: str, name: str, c: int) -> str:
        params = [
            self.init(f"{name}.{p}", v)
            for p, v in (
                ("scale", self.rng.uniform(0.5, 1.5, c)),
                ("shift", self.rng.normal(size=c) * 0.1),
                ("mean", self.rng.normal(size=c) * 0.1),
                ("var", self.rng.uniform(0.5, 2.0, c)),
            )
        ]
        return self.op("BatchNormalization", [x, *params], name)

    def gemm(self, x: str, name: str, cin: int, cout: int, positive: bool = False) -> str:
        w = self.rng.uniform(0.05, 0.5, (cout, cin)) if positive else self.rng.normal(size=(cout, cin))
        inputs = [x, self.init(f"{name}.w", w), self.init(f"{name}.b", np.full(cout, 0.1))]
        self.nodes.append(helper.make_node("Gemm", inputs, [name], name=name, transB=1))
        return name

    def matmul(self, x: str, name: str, cin: int, cout: int) -> str:
        mm = self.op(
            "MatMul", [x, self.init(f"{name}.w", self.rng.normal(size=(cin, cout)) * 0.5)], f"{name}.mm"
        )
        return self.op("Add", [mm, self.init(f"{name}.b", self.rng.normal(size=cout) * 0.1)], name)

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def model(
        self, out: str | list[str], x_shape=None, opset: int = OPSET, inputs: dict | None = None
    ) -> onnx.ModelProto:
        """The model; a single output is named y, several keep their names; inputs default to x."""
        outs = [out] if isinstance(out, str) else list(out)
        if isinstance(out, str):
            self.nodes.append(helper.make_node("Identity", [out], ["y"], name="output"))
            outs = ["y"]
        inputs = inputs or {"x": x_shape}
        graph = helper.make_graph(
            self.nodes,
            "t",
            [helper.make_tensor_value_info(n, self.elem, list(s)) for n, s in inputs.items()],
            [helper.make_tensor_value_info(o, self.elem, None) for o in outs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8 if opset < 21 else 10
        # graph outputs need a shape for onnx.checker: take the inferred ones
        inferred = onnx.shape_inference.infer_shapes(model)
        for i in range(len(outs)):
            model.graph.output[i].CopyFrom(inferred.graph.output[i])
        onnx.checker.check_model(model)
        return model


def toy_files(tmp_path, rng: np.random.Generator) -> tuple[str, str]:
    """A saved two_convs model and random calibration data for it: (model path, calib path)."""
    model = save(two_convs(rng), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=inputs(rng))
    return model, str(tmp_path / "c.npz")


def mobilenet_v3(rng: np.random.Generator) -> onnx.ModelProto:
    """A small MobileNetV3-style classifier like PP-OCR's direction classifier (dynamic H and W).

    x(N,3,H,W) -> Conv stem (3x3 s2) -> BN -> HardSwish -> s
    s -> Conv expand (1x1) -> BN -> HardSwish -> Conv dw (3x3 depthwise) -> BN -> Relu -> d
    d -> GlobalAveragePool -> Conv se1 (1x1) -> Relu -> Conv se2 (1x1) -> HardSigmoid -> Mul(d, .) -> e
    e -> Conv project (1x1) -> BN -> Add(+ s) -> GlobalAveragePool -> Flatten -> Gemm head -> Softmax -> y

    It carries RapidOCR-style metadata (its labels in ``metadata_props["character"]``).
    """
    b = Builder(rng)
    s = b.op("HardSwish", [b.bn(b.conv("x", "stem", 3, 8, 3, stride=2, pad=1), "stem_bn", 8)], "stem_act")
    e = b.op("HardSwish", [b.bn(b.conv(s, "expand", 8, 16, 1), "expand_bn", 16)], "expand_act")
    d = b.op("Relu", [b.bn(b.conv(e, "dw", 16, 16, 3, pad=1, group=16), "dw_bn", 16)], "dw_act")
    squeezed = b.op("Relu", [b.conv(b.op("GlobalAveragePool", [d], "se_pool"), "se1", 16, 4, 1)], "se_act")
    gate = b.op(
        "HardSigmoid", [b.conv(squeezed, "se2", 4, 16, 1, bias=0.5)], "se_gate", alpha=1 / 6, beta=0.5
    )
    excited = b.op("Mul", [d, gate], "se_mul")
    block = b.op("Add", [b.bn(b.conv(excited, "project", 16, 8, 1), "project_bn", 8), s], "residual")
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [block], "pool")], "flatten")
    model = b.model(b.op("Softmax", [b.gemm(pooled, "head", 8, 4)], "softmax", axis=1), ["N", 3, "H", "W"])
    helper.set_model_props(model, {"character": "0\n90\n180\n270"})
    model.doc_string, model.producer_name = "direction classifier", "paddle2onnx"
    return model
