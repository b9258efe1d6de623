"""Surgery's final check compares outputs per element (atol + rtol), not by whole-output L2."""

from __future__ import annotations

import numpy as np
from models import Builder

import egp_onnx


def tiny_sigmoid(rng):
    """
    x -> Conv a -> Relu -> Conv b (bias 1e6) -> BN (shift -1e6 - 14) -> Sigmoid -> y (about 1e-6)

    The original rounds 1e6 + z to 1/16 before the BN subtracts it again; the folded conv computes
    z - 14 directly. The outputs differ by ~1e-8 absolute, several percent relative.
    """
    b = Builder(rng)
    h = b.op("Relu", [b.conv("x", "a", 3, 4, 3, pad=1)], "relu")
    h = b.conv(h, "b", 4, 2, 1, bias=1e6)
    bn = [
        b.init("bn.scale", np.ones(2)),
        b.init("bn.shift", np.full(2, -1e6 - 14.0)),
        b.init("bn.mean", np.zeros(2)),
        b.init("bn.var", np.ones(2)),
    ]
    h = b.op("BatchNormalization", [h, *bn], "bn")
    return b.model(b.op("Sigmoid", [h], "sigmoid"), ["N", 3, 6, 6])


def test_tiny_outputs_do_not_revert_an_exact_rewrite(rng, tmp_path):
    model = tiny_sigmoid(rng)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(8, 3, 6, 6)).astype(np.float32))
    result = egp_onnx.compress(model, tmp_path / "c.npz", sparsity=0.0, latency=False)
    surgery = result.report.surgery
    assert any(r.kind == "fold_bn" for r in surgery.rewrites)
    assert surgery.rel_error > 1e-3, "whole-output relative L2 would have reverted this"
    assert not surgery.reverted, surgery.revert_reason
    assert surgery.max_abs_error < 1e-6
