"""Small models and data of the reconstruction tests (each builder sketches its graph)."""

from __future__ import annotations

import numpy as np
import onnx
from models import Builder, f32

from egp_onnx.load.calibration import in_memory, input_specs


def data_for(model: onnx.ModelProto, x: np.ndarray):
    return in_memory(input_specs(model), {"x": x}, None, "test data")


def correlated(rng, n: int, c: int, size: int = 9) -> np.ndarray:
    """Inputs with correlated channels and smooth neighbourhoods, like activations (white noise
    would make the pruned weights the least-squares answer already: nothing to refit)."""
    z = rng.normal(size=(n, c, size, size))
    z = np.einsum("dc,nchw->ndhw", rng.normal(size=(c, c)) + 2 * np.eye(c), z)
    z = sum(np.roll(z, (i, j), axis=(2, 3)) for i in (-1, 0, 1) for j in (-1, 0, 1)) / 3 + 0.5
    return f32(z)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CONVS = {
    "plain": dict(cin=4, cout=6, k=3, stride=1, pad=1, group=1),
    "strided": dict(cin=4, cout=6, k=3, stride=2, pad=1, group=1),
    "grouped": dict(cin=4, cout=6, k=3, stride=1, pad=1, group=2),
    "depthwise": dict(cin=6, cout=6, k=3, stride=1, pad=1, group=6),
    "1x1": dict(cin=4, cout=6, k=1, stride=1, pad=0, group=1),
}


def conv_model(rng, cin, cout, k, stride, pad, group, dilation=1) -> onnx.ModelProto:
    """
    x(N,cin,9,9) -> Conv(k, stride, pad, group, dilation, bias) "conv" -> y
    """
    b = Builder(rng)
    w = b.init("conv.w", rng.normal(size=(cout, cin // group, k, k)) * 0.4)
    bias = b.init("conv.b", rng.normal(size=cout) * 0.1)
    b.nodes.append(
        onnx.helper.make_node(
            "Conv",
            ["x", w, bias],
            ["conv"],
            name="conv",
            strides=[stride] * 2,
            pads=[pad, pad, pad + 1, pad],
            group=group,
            dilations=[dilation] * 2,
        )
    )
    return b.model("conv", ("N", cin, 9, 9))


def residual_model(rng) -> onnx.ModelProto:
    """
    x(N,4,8,8) -> Conv "c0" -> Relu -> a
    a -> Conv "c1" -> Relu -> Conv "c2" -> BN "bn" -> Add(+a) -> Relu -> GAP -> Flatten -> Gemm "fc" -> y
    """
    b = Builder(rng)
    a = b.op("Relu", [b.conv("x", "c0", 4, 4, 3, pad=1)], "r0")
    h = b.op("Relu", [b.conv(a, "c1", 4, 4, 3, pad=1)], "r1")
    s = b.op("Add", [b.bn(b.conv(h, "c2", 4, 4, 3, pad=1, bias=None), "bn", 4), a], "add")
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [s], "r2")], "gap")], "flat")
    return b.model(b.gemm(pooled, "fc", 4, 5), ("N", 4, 8, 8))
