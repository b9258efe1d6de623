"""The rectifier family: counts on the activation input, and what surgery may remove."""

from __future__ import annotations

import numpy as np
import pytest
from models import Builder
from references import reference_activations, run_ort

import egp_onnx
from egp_onnx.calibrate.collect import collect_statistics
from egp_onnx.graph.rectifiers import find_rectifiers
from egp_onnx.load.calibration import open_calibration
from egp_onnx.load.model import prepare_model


def family(rng):
    """
    x -> Conv a -> Clip(0, 6) -> Conv b -> LeakyRelu -> Conv c -> c * Sigmoid(c) (SiLU)
      -> Conv d -> HardSwish -> Conv e -> PRelu(slope (C,1,1)) -> Conv f -> Gelu -> y
    """
    b = Builder(rng)
    lo, hi = b.init("lo", np.array(0.0)), b.init("hi", np.array(6.0))
    h = b.op("Clip", [b.conv("x", "a", 3, 4, 3, pad=1), lo, hi], "relu6")
    h = b.op("LeakyRelu", [b.conv(h, "b", 4, 4, 3, pad=1)], "leaky", alpha=0.1)
    c = b.conv(h, "c", 4, 4, 1)
    h = b.op("Mul", [c, b.op("Sigmoid", [c], "sig")], "silu")
    h = b.op("HardSwish", [b.conv(h, "d", 4, 4, 1)], "hswish")
    slope = b.init("slope", rng.uniform(0.1, 0.3, size=(4, 1, 1)))
    h = b.op("PRelu", [b.conv(h, "e", 4, 4, 1), slope], "prelu")
    h = b.op("Gelu", [b.conv(h, "f", 4, 4, 1)], "gelu", domain="")
    return b.model(h, ["N", 3, 6, 6], opset=20)


def test_family_sites_owners_and_counts_on_the_input(rng, tmp_path):
    model = prepare_model(family(rng))
    sites = find_rectifiers(model)
    got = {s.name: (s.op_type, s.kind, s.owner.name if s.owner else None) for s in sites}
    assert got == {
        "relu6": ("Clip", "relu6", "a"),
        "leaky": ("LeakyRelu", "leaky_relu", "b"),
        "silu": ("SiLU", "silu", "c"),
        "hswish": ("HardSwish", "hardswish", "d"),
        "prelu": ("PRelu", "prelu", "e"),
        "gelu": ("Gelu", "gelu", "f"),
    }
    x = rng.normal(size=(7, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    stats = collect_statistics(model, sites, open_calibration(tmp_path / "c.npz", model), 3)
    z = reference_activations(model, [s.input for s in sites], {"x": x})
    for site in sites:
        np.testing.assert_array_equal(stats.counts[site.name].on, (z[site.input] > 0).sum(axis=(0, 2, 3)))


def biased(rng, op: str):
    """
    x -> Conv a (bias +-5 per channel: signs never change) -> op -> Conv b -> Relu -> y
    """
    b = Builder(rng)
    w = b.init("a.w", rng.normal(size=(4, 3, 3, 3)) * 0.1)
    bias = b.init("a.b", np.array([5.0, -5.0, 4.0, -4.0]))
    b.nodes.append(
        __import__("onnx").helper.make_node("Conv", ["x", w, bias], ["a"], name="a", pads=[1, 1, 1, 1])
    )
    if op == "Clip":
        h = b.op("Clip", ["a", b.init("lo", np.array(0.0)), b.init("hi", np.array(6.0))], "act")
    elif op == "PRelu":
        h = b.op("PRelu", ["a", b.init("slope", np.array([0.1, 0.2, 0.3, 0.4]).reshape(4, 1, 1))], "act")
    else:
        h = b.op(op, ["a"], "act", alpha=0.2)
    h = b.op("Relu", [b.conv(h, "b", 4, 4, 3, pad=1)], "relu")
    return b.model(h, ["N", 3, 6, 6])


@pytest.mark.parametrize("op", ["LeakyRelu", "PRelu"])
def test_leaky_with_fixed_signs_is_removed_exactly(op, rng, tmp_path):
    model = biased(rng, op)
    x = rng.normal(size=(8, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    # a sparsity above 0 that prunes no weight: the statistics-based rewrites are allowed
    result = egp_onnx.compress(
        model, tmp_path / "c.npz", sparsity=1e-9, latency=False, holdout=0, guard=False
    )
    assert op not in {n.op_type for n in result.model.graph.node}
    assert any(r.kind == "remove_rectifier" and r.nodes == ("act",) for r in result.report.surgery.rewrites)
    fresh = rng.normal(size=(5, 3, 6, 6)).astype(np.float32)
    want, got = (run_ort(m, {"x": fresh})[0] for m in (model, result.model))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_relu6_off_channels_zeroed_but_clip_kept(rng, tmp_path):
    """Channels 1 and 3 are always OFF: zeroed. Channels 0 and 2 sit near 5: ReLU6 may still clip
    them (no upper count is measured), so the Clip stays."""
    model = biased(rng, "Clip")
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(8, 3, 6, 6)).astype(np.float32))
    result = egp_onnx.compress(
        model, tmp_path / "c.npz", sparsity=1e-9, latency=False, holdout=0, guard=False
    )
    zeroed = [r for r in result.report.surgery.rewrites if r.kind == "zero_off_channels"]
    assert zeroed and zeroed[0].nodes == ("a", "act")
    assert "Clip" in {n.op_type for n in result.model.graph.node}
