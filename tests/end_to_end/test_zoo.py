"""An architecture zoo: every model is analysed and compressed; sparsity 0 keeps its outputs.

Each builder returns (model, input shapes for calibration); inputs are float data drawn from a
normal distribution. At sparsity 0 the compressed model must match the original to 1e-5
(relative L2) on the calibration data, whose statistics license every rewrite; at 0.5 it must
pass onnx.checker and run in onnxruntime with finite outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from models import Builder
from references import run_ort

import egp_onnx


def vgg(rng, dtype=np.float32, opset=17):
    """x -> [Conv BN Relu] x2 -> MaxPool -> Conv BN Relu -> Flatten -> Gemm Relu -> Gemm"""
    b = Builder(rng, dtype)
    h = "x"
    for i, (cin, cout) in enumerate([(3, 8), (8, 8)]):
        h = b.op("Relu", [b.bn(b.conv(h, f"conv{i}", cin, cout, 3, pad=1), f"bn{i}", cout)], f"relu{i}")
    h = b.op("MaxPool", [h], "pool", kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("Relu", [b.bn(b.conv(h, "conv2", 8, 8, 3, pad=1), "bn2", 8)], "relu2")
    h = b.op("Flatten", [h], "flatten")
    h = b.op("Relu", [b.gemm(h, "fc1", 8 * 4 * 4, 16)], "fc1.relu")
    return b.model(b.gemm(h, "fc2", 16, 5), ["N", 3, 8, 8], opset), {"x": (3, 8, 8)}


def resnet_basic(rng, dtype=np.float32, opset=17):
    """stem -> basic block (identity) -> basic block (stride 2, 1x1 projection) -> GAP -> Gemm"""
    b = Builder(rng, dtype)
    x = b.op("Relu", [b.bn(b.conv("x", "stem", 3, 8, 3, pad=1), "stem.bn", 8)], "stem.relu")
    for name, cin, cout, stride in (("b1", 8, 8, 1), ("b2", 8, 16, 2)):
        h = b.op(
            "Relu",
            [b.bn(b.conv(x, f"{name}.conv1", cin, cout, 3, stride, 1), f"{name}.bn1", cout)],
            f"{name}.relu1",
        )
        h = b.bn(b.conv(h, f"{name}.conv2", cout, cout, 3, pad=1), f"{name}.bn2", cout)
        short = (
            x
            if stride == 1
            else b.bn(b.conv(x, f"{name}.down", cin, cout, 1, stride), f"{name}.down.bn", cout)
        )
        x = b.op("Relu", [b.op("Add", [h, short], f"{name}.add")], f"{name}.relu2")
    h = b.op("Flatten", [b.op("GlobalAveragePool", [x], "gap")], "flatten")
    return b.model(b.gemm(h, "fc", 16, 4), ["N", 3, 8, 8], opset), {"x": (3, 8, 8)}


def resnet_bottleneck(rng, dtype=np.float32, opset=17):
    """x -> 1x1 BN Relu -> 3x3 BN Relu -> 1x1 BN -> Add(x) -> Relu"""
    b = Builder(rng, dtype)
    h = b.op("Relu", [b.bn(b.conv("x", "c1", 16, 4, 1), "bn1", 4)], "r1")
    h = b.op("Relu", [b.bn(b.conv(h, "c2", 4, 4, 3, pad=1), "bn2", 4)], "r2")
    h = b.bn(b.conv(h, "c3", 4, 16, 1), "bn3", 16)
    out = b.op("Relu", [b.op("Add", [h, "x"], "add")], "r3")
    return b.model(out, ["N", 16, 6, 6], opset), {"x": (16, 6, 6)}


def mobilenet(rng, dtype=np.float32, opset=17):
    """x -> Conv s2 BN Clip(0,6) -> depthwise 3x3 BN Clip -> pointwise 1x1 BN Relu -> GAP -> Gemm"""
    b = Builder(rng, dtype)
    lo, hi = b.init("zero", np.array(0.0)), b.init("six", np.array(6.0))

    def relu6(x, name):
        if opset < 11:
            return b.op("Clip", [x], name, min=0.0, max=6.0)
        return b.op("Clip", [x, lo, hi], name)

    h = relu6(b.bn(b.conv("x", "stem", 3, 8, 3, 2, 1), "stem.bn", 8), "stem.relu6")
    h = relu6(b.bn(b.conv(h, "dw", 8, 8, 3, pad=1, group=8), "dw.bn", 8), "dw.relu6")
    h = b.op("Relu", [b.bn(b.conv(h, "pw", 8, 12, 1), "pw.bn", 12)], "pw.relu")
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h], "gap")], "flatten")
    return b.model(b.gemm(h, "fc", 12, 3), ["N", 3, 8, 8], opset), {"x": (3, 8, 8)}


def squeeze_excitation(rng, dtype=np.float32, opset=17):
    """x -> Conv Relu -> a; a -> GAP -> Conv1x1 Relu -> Conv1x1 -> Sigmoid -> Mul(a) -> Conv Relu"""
    b = Builder(rng, dtype)
    a = b.op("Relu", [b.conv("x", "c0", 3, 8, 3, pad=1)], "r0")
    s = b.op("Relu", [b.conv(b.op("GlobalAveragePool", [a], "gap"), "se.reduce", 8, 2, 1)], "se.relu")
    s = b.op("Sigmoid", [b.conv(s, "se.expand", 2, 8, 1)], "se.sigmoid")
    h = b.op("Mul", [a, s], "se.scale")
    return b.model(b.op("Relu", [b.conv(h, "c1", 8, 4, 3, pad=1)], "r1"), ["N", 3, 6, 6], opset), {
        "x": (3, 6, 6)
    }


def inception(rng, dtype=np.float32, opset=17):
    """x -> (Conv1x1 Relu | Conv3x3 Relu | MaxPool) -> Concat -> Conv Relu"""
    b = Builder(rng, dtype)
    a = b.op("Relu", [b.conv("x", "a", 4, 4, 1)], "ra")
    c = b.op("Relu", [b.conv("x", "c", 4, 4, 3, pad=1)], "rc")
    p = b.op("MaxPool", ["x"], "pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    h = b.op("Concat", [a, c, p], "cat", axis=1)
    return b.model(b.op("Relu", [b.conv(h, "out", 12, 6, 1)], "rout"), ["N", 4, 6, 6], opset), {
        "x": (4, 6, 6)
    }


def matmul_mlp(rng, dtype=np.float32, opset=17):
    """tokens x(N,5,8) -> MatMul+Add Relu -> MatMul+Add Relu -> MatMul+Add (channel-last)"""
    b = Builder(rng, dtype)
    h = b.op("Relu", [b.matmul("x", "fc1", 8, 16)], "r1")
    h = b.op("Relu", [b.matmul(h, "fc2", 16, 16)], "r2")
    return b.model(b.matmul(h, "fc3", 16, 4), ["N", 5, 8], opset), {"x": (5, 8)}


def reshape_head(rng, dtype=np.float32, opset=17):
    """x -> Conv Relu -> Reshape(N, -1) -> Gemm Relu -> Gemm"""
    b = Builder(rng, dtype)
    h = b.op("Relu", [b.conv("x", "c", 3, 4, 3, 2, 1)], "r")
    h = b.op("Reshape", [h, b.init("shape", np.array([0, -1]), np.int64)], "reshape")
    h = b.op("Relu", [b.gemm(h, "fc1", 4 * 3 * 3, 8)], "fc1.relu")
    return b.model(b.gemm(h, "fc2", 8, 2), ["N", 3, 6, 6], opset), {"x": (3, 6, 6)}


def upsampling(rng, dtype=np.float32, opset=17):
    """x -> Conv Relu -> Resize x2 -> ConvTranspose -> Relu -> Conv"""
    b = Builder(rng, dtype)
    h = b.op("Relu", [b.conv("x", "c0", 3, 4, 3, pad=1)], "r0")
    scales = b.init("scales", np.array([1, 1, 2, 2]), np.float32)
    roi = [b.init("roi", np.zeros(0), np.float32)] if opset < 13 else [""]
    h = b.op("Resize", [h, *roi, scales], "resize", mode="nearest")
    h = b.op("ConvTranspose", [h, b.init("ct.w", rng.normal(size=(4, 4, 2, 2)) * 0.3)], "ct", strides=[2, 2])
    h = b.op("Relu", [h], "rct")
    return b.model(b.conv(h, "c1", 4, 2, 1), ["N", 3, "H", "W"], opset), {"x": (3, 5, 6)}


def multi_io(rng, dtype=np.float32, opset=17):
    """image(N,3,6,6) -> Conv Relu -> GAP -> Flatten -> f;  vec(N,4) -> Gemm Relu -> g;
    Concat(f, g) -> Gemm Relu -> Gemm -> logits;  and f itself -> features"""
    b = Builder(rng, dtype)
    f = b.op(
        "Flatten",
        [b.op("GlobalAveragePool", [b.op("Relu", [b.conv("image", "c", 3, 4, 3, pad=1)], "rc")], "gap")],
        "features",
    )
    g = b.op("Relu", [b.gemm("vec", "fv", 4, 4)], "rv")
    h = b.op("Relu", [b.gemm(b.op("Concat", [f, g], "cat", axis=1), "fc1", 8, 8)], "fc1.relu")
    logits = b.gemm(h, "logits", 8, 3)
    model = b.model([logits, f], opset=opset, inputs={"image": ["N", 3, 6, 6], "vec": ["N", 4]})
    return model, {"image": (3, 6, 6), "vec": (4,)}


ZOO = {
    f.__name__: f
    for f in (
        vgg,
        resnet_basic,
        resnet_bottleneck,
        mobilenet,
        squeeze_excitation,
        inception,
        matmul_mlp,
        reshape_head,
        upsampling,
        multi_io,
    )
}


def feeds(rng, shapes, dtype, n=24):
    return {k: rng.normal(size=(n, *s)).astype(dtype) for k, s in shapes.items()}


def rel_error(want, got):
    return max(
        float(np.linalg.norm(g.astype(np.float64) - w) / max(np.linalg.norm(w.astype(np.float64)), 1e-12))
        for w, g in zip(want, got, strict=True)
    )


def check(model, shapes, dtype, rng, tmp_path, tolerance=1e-5):
    calib = feeds(rng, shapes, dtype)
    np.savez(tmp_path / "calib.npz", **calib)
    analysis = egp_onnx.analyze(model, tmp_path / "calib.npz")
    assert analysis.samples == 24 and analysis.layers
    # no guard, all data for calibration: the zoo checks that every architecture goes through
    # pruning, reconstruction (on by default) and surgery, not what the guard would accept
    same = egp_onnx.compress(
        model, tmp_path / "calib.npz", sparsity=0.0, latency=False, guard=False, holdout=0
    )
    onnx.checker.check_model(same.model, full_check=True)
    assert not same.report.surgery.reverted, same.report.surgery.revert_reason
    assert rel_error(run_ort(model, calib), run_ort(same.model, calib)) < tolerance
    half = egp_onnx.compress(
        model, tmp_path / "calib.npz", sparsity=0.5, latency=False, guard=False, holdout=0
    )
    onnx.checker.check_model(half.model, full_check=True)
    assert not half.report.surgery.reverted, half.report.surgery.revert_reason
    outputs = run_ort(half.model, feeds(rng, shapes, dtype, n=3))
    assert all(np.isfinite(o).all() for o in outputs)
    if half.report.stop.reason == "no-weights-left":
        # the budget leaves output heads dense and caps layers every path needs: in small models
        # that can be less than half of the prunable weights
        assert 0 < half.report.model.sparsity < 0.5
    else:
        assert half.report.model.sparsity == pytest.approx(0.5, abs=1e-3)
    return same, half


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model(name, rng, tmp_path):
    model, shapes = ZOO[name](rng)
    check(model, shapes, np.float32, rng, tmp_path)


@pytest.mark.parametrize("opset", [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21])
@pytest.mark.parametrize("name", ["resnet_basic", "upsampling", "mobilenet"])
def test_opsets(name, opset, rng, tmp_path):
    model, shapes = ZOO[name](rng, opset=opset)
    same, _ = check(model, shapes, np.float32, rng, tmp_path)
    assert same.model.opset_import[0].version == opset


@pytest.mark.parametrize("name", ["vgg", "resnet_basic", "matmul_mlp"])
def test_fp16_models(name, rng, tmp_path):
    model, shapes = ZOO[name](rng, dtype=np.float16)
    same, half = check(model, shapes, np.float16, rng, tmp_path, tolerance=1e-5)
    weights = [t for t in half.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert weights, "weights stay float16"


def test_dynamic_spatial_size(rng, tmp_path):
    model, shapes = upsampling(rng)
    same, _ = check(model, shapes, np.float32, rng, tmp_path)
    other = {"x": rng.normal(size=(2, 3, 7, 9)).astype(np.float32)}  # another batch and spatial size
    out = run_ort(same.model, other)[0]
    assert out.shape == run_ort(model, other)[0].shape == (2, 2, 28, 36)
