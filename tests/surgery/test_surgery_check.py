"""Surgery's final check compares outputs per element (atol + rtol), not by whole-output L2, with the
pruned model's outputs stored or both models run batch by batch."""

from __future__ import annotations

import numpy as np
from models import Builder
from onnx import numpy_helper

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


def test_the_check_is_the_same_with_the_pruned_outputs_stored_or_run_again(rng, tmp_path, monkeypatch):
    """Stored when they take less memory than the pruned model's weights (its session goes first)."""
    import egp_onnx.api.compress as pipeline
    import egp_onnx.runtime.handle as handle

    model = tiny_sigmoid(rng)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(8, 3, 6, 6)).astype(np.float32))
    real = pipeline.simplify

    def broken(pruned, *args, **kwargs):
        """The rewrite with its first conv's weights doubled."""
        result = real(pruned, *args, **kwargs)
        weight = next(t for t in result.model.graph.initializer if len(t.dims) == 4)
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 2, weight.name))
        return result

    records = {}
    for limit, way in ((2**40, "stored"), (0, "run")):
        monkeypatch.setattr(handle, "serialized_size", lambda m, limit=limit: limit)
        monkeypatch.setattr(pipeline, "simplify", real)
        records[way] = egp_onnx.compress(model, tmp_path / "c.npz", sparsity=0.0, latency=False)
        monkeypatch.setattr(pipeline, "simplify", broken)
        records[f"{way}, broken"] = egp_onnx.compress(model, tmp_path / "c.npz", sparsity=0.0, latency=False)
    assert records["stored"].report.surgery == records["run"].report.surgery
    assert not records["stored"].report.surgery.reverted
    for way in ("stored, broken", "run, broken"):
        surgery = records[way].report.surgery
        assert surgery.reverted and "graph surgery changed output y" in surgery.revert_reason
        assert "BatchNormalization" in {n.op_type for n in records[way].model.graph.node}
    assert records["stored, broken"].report.surgery == records["run, broken"].report.surgery
