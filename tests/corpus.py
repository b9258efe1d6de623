"""Models as real exporters write them, built without network, and the corpus acceptance check.

- The light model zoo inside the onnx wheel (Caffe2-era, IR 3, opset 9): weights are
  ConstantOfShape fills. :func:`light_zoo` replaces each fill by a Constant node holding seeded
  random values (so outputs are informative), which keeps the weights outside the initializers.
- paddle2onnx-style graphs (weights as Constant nodes, opset 11, BatchNormalization unfolded
  into Mul/Add), an IR 3 model listing its initializers in graph.input, Loop/If bodies that read
  outer initializers, and a graph whose names collide with the statistics probe's.
- Small torch nets (MobileNetV2 block with ReLU6, MobileNetV3 block with HardSwish and SE,
  EfficientNet MBConv with SiLU, a DenseNet block, a YOLO-style C2f block) exported by the
  TorchScript exporter (and the dynamo exporter when onnxscript is installed).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from models import _model, _x
from onnx import TensorProto, helper, numpy_helper
from references import run_ort

import egp_onnx

LIGHT = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light"


@dataclass(frozen=True)
class Outcome:
    """What the acceptance check measured on one model."""

    prunable: int
    depth_before: int
    depth_after: int
    removed: int  # activations surgery removed


# ------------------------------------------------------------------ the acceptance check
def run_fixed(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """run_ort on ``feed``, in chunks of the model's batch size when it is fixed."""
    first = next(i for i in model.graph.input if i.name in feed)
    return run_ort(model, feed, batch=first.type.tensor_type.shape.dim[0].dim_value or None)


def rel_error(want: list[np.ndarray], got: list[np.ndarray]) -> float:
    return max(
        float(np.linalg.norm(g.astype(np.float64) - w) / max(np.linalg.norm(w.astype(np.float64)), 1e-12))
        for w, g in zip(want, got, strict=True)
    )


def accept(
    model: onnx.ModelProto,
    shapes: dict[str, tuple[int, ...]],
    tmp_path: Path,
    rng: np.random.Generator,
    samples: int = 8,
    batch_size: int = 4,
    fresh_samples: int = 4,
) -> Outcome:
    """The corpus acceptance: prunable layers found; sparsity 0 keeps outputs on fresh inputs; 0.5 valid.

    Calibration data and the fresh inputs are separate draws of a normal distribution.
    """
    calib = {k: rng.normal(size=(samples, *s)).astype(np.float32) for k, s in shapes.items()}
    np.savez(tmp_path / "calib.npz", **calib)
    path = tmp_path / "calib.npz"
    analysis = egp_onnx.analyze(model, path, batch_size=batch_size)
    prunable = sum(r.prunable for r in analysis.layers)
    assert prunable > 0, "analyze finds prunable layers"
    fresh = {k: rng.normal(size=(fresh_samples, *s)).astype(np.float32) for k, s in shapes.items()}
    # Sparsity 0 runs exact algebra only (statistics-based rewrites count as pruning), so it holds
    # on any input; no guard and all samples for calibration: the corpus tests the machinery.
    plain = {"latency": False, "batch_size": batch_size, "guard": False, "holdout": 0.0}
    same = egp_onnx.compress(model, path, sparsity=0.0, **plain)
    onnx.checker.check_model(same.model, full_check=True)
    assert not same.report.surgery.reverted, same.report.surgery.revert_reason
    assert not any(r.kind in ("zero_off_channels", "remove_rectifier") for r in same.report.surgery.rewrites)
    assert rel_error(run_fixed(model, fresh), run_fixed(same.model, fresh)) < 1e-5
    assert rel_error(run_fixed(model, calib), run_fixed(same.model, calib)) < 1e-5
    half = egp_onnx.compress(model, path, sparsity=0.5, **plain)
    onnx.checker.check_model(half.model, full_check=True)
    assert all(np.isfinite(o).all() for o in run_fixed(half.model, fresh))
    summary = half.report.model
    # the budget leaves output heads dense: a small model may stop short of 0.5
    assert summary.sparsity > 0.45 or half.report.stop.reason == "no-weights-left"
    assert summary.depth_after <= summary.depth_before
    removed = sum(r.kind == "remove_rectifier" and r.applied for r in half.report.surgery.rewrites)
    return Outcome(prunable, summary.depth_before, summary.depth_after, removed)


# ------------------------------------------------------------------ the light model zoo
def light_zoo(name: str, rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """A light zoo model whose ConstantOfShape fills became Constant nodes of seeded random values.

    Values by role: conv/dense weights normal (std sqrt(4 / fan_in)), zero mean per output
    channel, biases small;
    BatchNormalization scale, variance and
    anything multiplied in near 1 (positive); shifts and means small normal.
    """
    model = onnx.load(str(LIGHT / f"light_{name}.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    roles = _roles(model)
    nodes = []
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape":
            nodes.append(node)
            continue
        shape = tuple(int(d) for d in inits[node.input[0]])
        value = _random(roles.get(node.output[0], "shift"), shape, rng)
        nodes.append(
            helper.make_node(
                "Constant", [], list(node.output), name=node.name, value=numpy_helper.from_array(value)
            )
        )
    used = {i for n in nodes for i in n.input}
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    names = {t.name for t in kept}
    inputs = [i for i in model.graph.input if i.name in names or i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.checker.check_model(model)
    data = next(i for i in model.graph.input if i.name not in names)
    dims = tuple(int(d.dim_value) for d in data.type.tensor_type.shape.dim[1:])
    return model, {data.name: dims}


def _roles(model: onnx.ModelProto) -> dict[str, str]:
    """weight / scale / shift of every tensor read by a Conv, Gemm, BN, Mul or Add (through Unsqueeze)."""
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Unsqueeze"}
    roles: dict[str, str] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            role = None
            if node.op_type in ("Conv", "Gemm") and i == 1:
                role = "weight"
            elif node.op_type in ("Conv", "Gemm") and i == 2:
                role = "bias"
            elif node.op_type == "BatchNormalization":
                role = "scale" if i in (1, 4) else "shift"
            elif node.op_type == "Mul":
                role = "scale"
            roles[alias.get(name, name)] = role or roles.get(alias.get(name, name), "shift")
    return roles


def _random(role: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if role == "weight":
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        w = rng.normal(size=shape) * np.sqrt(4.0 / max(fan_in, 1))
        # zero mean per output channel: on non-negative (post-ReLU) inputs a random row of one
        # sign would make its channel always OFF or ON, which trained networks rarely are
        w -= w.mean(axis=tuple(range(1, w.ndim)), keepdims=True) if w.ndim > 1 else 0
        return w.astype(np.float32)
    if role == "bias":
        return (rng.normal(size=shape) * 0.01).astype(np.float32)
    if role == "scale":
        return rng.uniform(0.6, 1.2, size=shape).astype(np.float32)
    return (rng.normal(size=shape) * 0.1).astype(np.float32)


# ------------------------------------------------------------------ exporter habits, by hand
PADDLE_SCALARS = (("lo", 0.0), ("hi", 6.0), ("three", 3.0), ("six", 6.0))


def paddle_style(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """
    paddle2onnx habits: every weight a Constant node, opset 11, BatchNormalization as Mul/Add
    with Unsqueeze'd per-channel constants, ReLU6 as Clip(min 0, max 6) inputs, HardSwish as
    x * Clip(x + 3, 0, 6) / 6:

    x -> Conv(k) -> Mul(Unsqueeze(s)) -> Add(Unsqueeze(t)) -> Clip(0, 6)        (ReLU6)
      -> Conv(k) -> Mul(Unsqueeze(s)) -> Add(Unsqueeze(t)) -> HardSwish (decomposed)
      -> Conv(k) -> Relu -> GlobalAveragePool -> Flatten -> MatMul(k) -> Add(b) -> y
    """
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        tensor = numpy_helper.from_array(value, name)
        nodes.append(helper.make_node("Constant", [], [name], name=f"{name}.const", value=tensor))
        return name

    def conv(h: str, name: str, cin: int, cout: int) -> str:
        w = (rng.normal(size=(cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        nodes.append(
            helper.make_node(
                "Conv", [h, const(f"{name}.w", w)], [f"{name}.out"], name=name, pads=[1, 1, 1, 1]
            )
        )
        return f"{name}.out"

    def bn(h: str, name: str, c: int) -> str:
        out = h
        for op, value in (("Mul", rng.uniform(0.6, 1.4, size=c)), ("Add", rng.normal(size=c) * 0.2)):
            v = const(f"{name}.{op}.v", value.astype(np.float32))
            nodes.append(
                helper.make_node("Unsqueeze", [v], [f"{name}.{op}.u"], name=f"{name}.{op}.unsq", axes=[1, 2])
            )
            nodes.append(
                helper.make_node(op, [out, f"{name}.{op}.u"], [f"{name}.{op}.out"], name=f"{name}.{op}")
            )
            out = f"{name}.{op}.out"
        return out

    h = bn(conv("x", "conv1", 3, 8), "bn1", 8)
    lo, hi, three, six = (const(n, np.array(v, dtype=np.float32)) for n, v in PADDLE_SCALARS)
    nodes.append(helper.make_node("Clip", [h, lo, hi], ["relu6"], name="relu6"))
    h = bn(conv("relu6", "conv2", 8, 8), "bn2", 8)
    nodes.append(helper.make_node("Add", [h, three], ["hs.add"], name="hs.add"))
    nodes.append(helper.make_node("Clip", ["hs.add", lo, hi], ["hs.clip"], name="hs.clip"))
    nodes.append(helper.make_node("Mul", [h, "hs.clip"], ["hs.mul"], name="hs.mul"))
    nodes.append(helper.make_node("Div", ["hs.mul", six], ["hswish"], name="hs.div"))
    nodes.append(helper.make_node("Relu", [conv("hswish", "conv3", 8, 8)], ["relu3"], name="relu3"))
    nodes.append(helper.make_node("GlobalAveragePool", ["relu3"], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    w = const("fc.w", (rng.normal(size=(8, 5)) * 0.5).astype(np.float32))
    b = const("fc.b", (rng.normal(size=5) * 0.1).astype(np.float32))
    nodes.append(helper.make_node("MatMul", ["flat", w], ["fc.out"], name="fc"))
    nodes.append(helper.make_node("Add", ["fc.out", b], ["y"], name="fc.bias"))
    graph = helper.make_graph(
        nodes,
        "paddle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="PaddlePaddle"
    )
    model.ir_version = 6
    onnx.checker.check_model(model)
    return model, {"x": (3, 8, 8)}


def ir3_inputs(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """
    IR 3, opset 8: every initializer is also a graph input (as old exporters wrote them):

    x -> Conv(w1, b1) -> Relu -> Conv(w2, b2) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(w3, b3) -> y
    """
    inits = [
        numpy_helper.from_array((rng.normal(size=(8, 3, 3, 3)) * 0.5).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.normal(size=8) * 0.1).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.normal(size=(8, 8, 3, 3)) * 0.2).astype(np.float32), "w2"),
        numpy_helper.from_array((rng.normal(size=8) * 0.1).astype(np.float32), "b2"),
        numpy_helper.from_array((rng.normal(size=(4, 8)) * 0.5).astype(np.float32), "w3"),
        numpy_helper.from_array((rng.normal(size=4) * 0.1).astype(np.float32), "b3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    listed = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    graph = helper.make_graph(
        nodes,
        "ir3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8]), *listed],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model, {"x": (3, 8, 8)}


def subgraph_reads_outer(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """
    Initializers k (If branches) and m (Loop body) are read only inside subgraphs:

    x -> Conv -> Relu -> r -> Conv -> Relu -> s
    If(ReduceMax(x) > 0): then r2 = s * k, else r2 = s + k
    Loop(2 times, carried v = r2): v = v * m
    -> y = v
    """
    f32 = TensorProto.FLOAT
    inits = [
        numpy_helper.from_array((rng.normal(size=(6, 3, 3, 3)) * 0.5).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.normal(size=(6, 6, 3, 3)) * 0.3).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, size=(1, 6, 1, 1)).astype(np.float32), "k"),
        numpy_helper.from_array(rng.uniform(0.8, 1.2, size=(1, 6, 1, 1)).astype(np.float32), "m"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array(2, dtype=np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "yes"),
    ]
    then_branch = helper.make_graph(
        [helper.make_node("Mul", ["s", "k"], ["t_out"], name="then.mul")],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", f32, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Add", ["s", "k"], ["e_out"], name="else.add")],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", f32, None)],
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body.cond"),
            helper.make_node("Mul", ["v_in", "m"], ["v_out"], name="body.mul"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", f32, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", f32, None),
        ],
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r"], name="relu1"),
        helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["s"], name="relu2"),
        helper.make_node("ReduceMax", ["x"], ["mx"], name="max", keepdims=0),
        helper.make_node("Greater", ["mx", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["r2"], name="if", then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Loop", ["trips", "yes", "r2"], ["y"], name="loop", body=body),
    ]
    graph = helper.make_graph(
        nodes,
        "subgraphs",
        [helper.make_tensor_value_info("x", f32, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", f32, ["N", 6, 6, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model, {"x": (3, 6, 6)}


def probe_names(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """
    Tensors and nodes named like the statistics probe's (egp_on_count__0, egp_stats__0_big, ...):

    x -> Conv(egp_stats__0_big) -> egp_on_count__0 -> Relu(egp_stats__0_scale) -> egp_shape_nc
      -> Conv -> Relu -> egp_size__0 (output)
    """
    inits = [
        numpy_helper.from_array((rng.normal(size=(6, 3, 3, 3)) * 0.5).astype(np.float32), "egp_stats__0_big"),
        numpy_helper.from_array((rng.normal(size=(4, 6, 3, 3)) * 0.3).astype(np.float32), "egp_zero__1"),
    ]
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "egp_stats__0_big"],
            ["egp_on_count__0"],
            name="egp_stats__0_mean",
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["egp_on_count__0"], ["egp_shape_nc"], name="egp_stats__0_scale"),
        helper.make_node(
            "Conv",
            ["egp_shape_nc", "egp_zero__1"],
            ["egp_stats__1_on"],
            name="egp_stats__1_gt",
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["egp_stats__1_on"], ["egp_size__0"], name="egp_stats__1_clip"),
    ]
    output = helper.make_tensor_value_info("egp_size__0", TensorProto.FLOAT, ["N", 4, 6, 6])
    return _model(nodes, [_x()], [output], inits), {"x": (3, 6, 6)}


# ------------------------------------------------------------------ torch nets, exported
def torch_net(
    name: str, dynamo: bool = False, opset: int = 17
) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """One of the small torch nets (see :data:`TORCH_NETS`), exported in eval mode."""
    import torch

    torch.manual_seed(0)
    module = _torch_modules()[name]().eval()
    with torch.no_grad():  # trained-looking BatchNorm statistics, so that BN folding is not trivial
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.6, 1.4)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 16, 16)
    buffer = io.BytesIO()
    kwargs = (
        {"dynamic_axes": {"x": {0: "N"}}}
        if not dynamo
        else {"dynamic_shapes": {"x": {0: torch.export.Dim("N")}}}
    )
    torch.onnx.export(
        module,
        (x,),
        buffer,
        input_names=["x"],
        output_names=["y"],
        opset_version=opset,
        dynamo=dynamo,
        **kwargs,
    )
    model = onnx.load_from_string(buffer.getvalue())
    return model, {"x": (3, 16, 16)}


TORCH_NETS = ("mobilenet_v2", "mobilenet_v3", "efficientnet", "densenet", "yolo_c2f")


def _torch_modules() -> dict[str, type]:
    """The torch modules, defined here so that torch is imported only when a test needs it."""
    import torch
    from torch import nn

    def cbr(
        cin: int, cout: int, k: int, act: nn.Module | None, stride: int = 1, groups: int = 1
    ) -> nn.Sequential:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        return nn.Sequential(*layers, *([act] if act is not None else []))

    class Head(nn.Module):
        def __init__(self, cin: int) -> None:
            super().__init__()
            self.fc = nn.Linear(cin, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean(dim=(2, 3)))

    class MobileNetV2(nn.Module):
        """stem -> inverted residual (1x1 ReLU6, depthwise 3x3 ReLU6, 1x1 linear, + x) -> head"""

        def __init__(self) -> None:
            super().__init__()
            self.stem = cbr(3, 16, 3, nn.ReLU6())
            self.block = nn.Sequential(
                cbr(16, 64, 1, nn.ReLU6()), cbr(64, 64, 3, nn.ReLU6(), groups=64), cbr(64, 16, 1, None)
            )
            self.head = Head(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            return self.head(h + self.block(h))

    class SqueezeExcite(nn.Module):
        def __init__(self, c: int, act: nn.Module, gate: nn.Module) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2, self.gate = (
                nn.Conv2d(c, c // 4, 1),
                act,
                nn.Conv2d(c // 4, c, 1),
                gate,
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gate(self.fc2(self.act(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))

    class MobileNetV3(nn.Module):
        """stem -> 1x1, depthwise (HardSwish), SE (ReLU, HardSigmoid), 1x1 linear, + x -> head"""

        def __init__(self) -> None:
            super().__init__()
            self.stem = cbr(3, 16, 3, nn.Hardswish())
            self.block = nn.Sequential(
                cbr(16, 48, 1, nn.Hardswish()),
                cbr(48, 48, 3, nn.Hardswish(), groups=48),
                SqueezeExcite(48, nn.ReLU(), nn.Hardsigmoid()),
                cbr(48, 16, 1, None),
            )
            self.head = Head(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            return self.head(h + self.block(h))

    class EfficientNet(nn.Module):
        """stem SiLU -> MBConv (1x1 SiLU, depthwise SiLU, SE (SiLU, Sigmoid), 1x1 linear, + x) -> head"""

        def __init__(self) -> None:
            super().__init__()
            self.stem = cbr(3, 16, 3, nn.SiLU())
            self.block = nn.Sequential(
                cbr(16, 64, 1, nn.SiLU()),
                cbr(64, 64, 3, nn.SiLU(), groups=64),
                SqueezeExcite(64, nn.SiLU(), nn.Sigmoid()),
                cbr(64, 16, 1, None),
            )
            self.head = Head(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            return self.head(h + self.block(h))

    class DenseLayer(nn.Module):
        def __init__(self, cin: int, growth: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.BatchNorm2d(cin),
                nn.ReLU(),
                nn.Conv2d(cin, 32, 1, bias=False),
                nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.Conv2d(32, growth, 3, padding=1, bias=False),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, self.body(x)], dim=1)

    class DenseNet(nn.Module):
        """stem -> 3 dense layers (BN ReLU 1x1, BN ReLU 3x3, Concat) -> BN ReLU -> head"""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.block = nn.Sequential(DenseLayer(16, 8), DenseLayer(24, 8), DenseLayer(32, 8))
            self.final = nn.Sequential(nn.BatchNorm2d(40), nn.ReLU())
            self.head = Head(40)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.final(self.block(self.stem(x))))

    class Bottleneck(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.cv1, self.cv2 = cbr(c, c, 3, nn.SiLU()), cbr(c, c, 3, nn.SiLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.cv2(self.cv1(x))

    class C2f(nn.Module):
        """stem -> C2f (1x1 SiLU, split, 2 bottlenecks with shortcut, Concat, 1x1 SiLU) -> head"""

        def __init__(self) -> None:
            super().__init__()
            self.stem = cbr(3, 16, 3, nn.SiLU(), stride=2)
            self.cv1 = cbr(16, 32, 1, nn.SiLU())
            self.m = nn.ModuleList([Bottleneck(16), Bottleneck(16)])
            self.cv2 = cbr(64, 32, 1, nn.SiLU())
            self.head = Head(32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = list(self.cv1(self.stem(x)).chunk(2, 1))
            for m in self.m:
                y.append(m(y[-1]))
            return self.head(self.cv2(torch.cat(y, 1)))

    return {
        "mobilenet_v2": MobileNetV2,
        "mobilenet_v3": MobileNetV3,
        "efficientnet": EfficientNet,
        "densenet": DenseNet,
        "yolo_c2f": C2f,
    }
